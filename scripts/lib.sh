# Sourced by the scripts in this directory: messages, checks, and the
# Debian packages each script needs, installed when missing.
# shellcheck shell=bash

script=scripts/$(basename "$0")
log() { printf '\n==> %s  [%s]\n' "$*" "$(date +%T)"; }
die() { printf '%s: %s\n' "$script" "$*" >&2; exit 1; }

# Downloads kept between runs and between checkouts, so that a clean clone
# (as CI makes) does not fetch them again: the minbase root and the .deb
# files of the fresh roots, the VM kernel and virtme-ng, the Vagrant base
# image's tarball. WEFT_CACHE moves it. (Not under /var/cache: virtme-ng
# hides that in the VM, and the VM needs the kernel's modules.)
cache_root=${WEFT_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/weft}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root ($*)"
}

need_cargo() {
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"
}

# What each script needs. Building: a C linker for rustc (gcc, libc6-dev);
# protoc and its well-known .proto files for etcd-client, which only the
# controller links (protobuf-compiler ships without them; they are in
# libprotobuf-dev).
PKGS_BUILD=(gcc libc6-dev protobuf-compiler libprotobuf-dev)
# The lab: etcd and etcdctl, the tools the lab drives, ping.
PKGS_LAB=(etcd-server etcd-client iproute2 nftables iputils-ping procps)
# Benchmarks: iperf3 (data plane), the reference CNI plugins (cni),
# dnsmasq (the name server weft-node's is measured against).
PKGS_BENCH=(iperf3 containernetworking-plugins iptables dnsmasq-base)
# Tests beyond the lab and the benchmark smoke runs: containerd, runc and
# busybox-static for `ctr run --cni` with a locally built image; nsenter
# and unshare (util-linux); openssl (certificates not made by weft).
PKGS_TEST=(containerd runc busybox-static util-linux openssl)
# Fuzzing: libFuzzer is C++.
PKGS_FUZZ=(g++)

# ensure_packages PKG...: installs the ones that are missing, then checks
# that all are there (naming any that are not).
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]}; run as root to have them installed"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed (see above)"
    # Debian's etcd-server and containerd packages would start system
    # services; the lab and the tests start their own (private ports and
    # state directories), so keep the system ones from starting.
    local added_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # Removed also when the install is interrupted: left behind, it would
        # keep every later upgrade from restarting services.
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        trap 'rm -f /usr/sbin/policy-rc.d; exit 130' INT TERM
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    local rc=0
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    if [ -n "$added_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT INT TERM
    fi
    local still=()
    for p in "${missing[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || still+=("$p")
    done
    [ "${#still[@]}" -eq 0 ] || die "could not install ${still[*]} (apt-get exit $rc)"
}

# links_etcd_client PACKAGE: whether the package's build pulls etcd-client
# in (only weft-controller may). A failing `cargo tree` is an error, not a no.
links_etcd_client() {
    local tree
    tree=$(cargo tree --locked -q -e normal,build -p "$1" --prefix none -f '{p}') \
        || die "cargo tree -p $1 failed"
    grep -q '^etcd-client ' <<<"$tree"
}

# ensure_cargo_tool CRATE VERSION BINARY: cargo install, pinned, if missing.
ensure_cargo_tool() {
    local crate=$1 version=$2 bin=$3
    if ! command -v "$bin" >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/$bin" ]; then
        log "installing $crate $version (cargo install)"
        cargo install -q --locked "$crate" --version "$version" || die "cargo install $crate failed"
    fi
}

# Fresh Debian roots (scripts/fresh-check, scripts/vagrant-image).
#
# The host's CA bundle: this machine's egress re-signs TLS, and a user's
# machine has its own CA certificates; a new root gets the host's bundle
# as /etc/ssl/host-ca.crt.
host_ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

# The Debian mirror the host's apt uses.
mirror() {
    local uri
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -m1 '/debian$' || true)
    [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -m1 '/debian$' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

# minbase_tarball FILE: `debootstrap --variant=minbase bookworm`, packed as
# FILE (a .tar.gz), unless FILE exists already.
minbase_tarball() {
    local base=$1 tmp
    # A month-old root is made again (its packages would all be upgraded).
    [ -s "$base" ] && [ -z "$(find "$base" -mtime +30)" ] && return 0
    ensure_packages debootstrap
    log "debootstrap --variant=minbase bookworm (cached as $base)"
    mkdir -p "$(dirname "$base")"
    tmp=$base.bootstrap.$$
    rm -rf "$tmp"
    # In a private mount namespace: whatever debootstrap mounts in the new
    # root is gone before the root is removed.
    unshare --mount --propagation private -- \
        debootstrap --variant=minbase bookworm "$tmp" "$(mirror)" > "$base.log" 2>&1 \
        || { tail -20 "$base.log" >&2; rm -rf "$tmp"; die "debootstrap failed (log: $base.log)"; }
    tar -C "$tmp" -czf "$base.$$.tmp" . && mv "$base.$$.tmp" "$base"
    rm -rf "$tmp"
}

# root_apt_config ROOT: the host's CA bundle (/etc/ssl/host-ca.crt), name
# resolution, and the host's Debian sources and proxy settings in ROOT.
root_apt_config() {
    local root=$1 f keyring copied=
    mkdir -p "$root/etc/ssl"
    cp "$host_ca" "$root/etc/ssl/host-ca.crt"
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    # The host's Debian sources (deb822), those whose keyring the new root
    # has: a third-party repository would fail apt-get update there.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        keyring=$(awk '/^Signed-By:/ {print $2; exit}' "$f")
        if [ -n "$keyring" ] && [ -e "$root$keyring" ]; then
            cp "$f" "$root/etc/apt/sources.list.d/"
            copied=1
        fi
    done
    [ -n "$copied" ] && rm -f "$root/etc/apt/sources.list"
    for f in /etc/apt/apt.conf.d/*; do
        grep -q '^Acquire::' "$f" 2>/dev/null && cp "$f" "$root/etc/apt/apt.conf.d/"
    done
    return 0
}
