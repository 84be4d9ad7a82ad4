//! Address management in host-local's layout, so operators' tools and
//! habits carry over: under `<dataDir>/<network>/`, one file per address
//! in use holding `<container id>\r\n<ifname>`, `last_reserved_ip.0` (IPv4)
//! and `last_reserved_ip.1` (IPv6) with the last address handed out, and
//! `lock`. Every operation holds an exclusive lock on `lock`, so parallel
//! ADDs never hand out one address twice.

use ipnet::IpNet;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// The addresses containers get in one family: the node subnet without
/// its network, gateway and last (IPv4 broadcast) addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub gateway: IpAddr,
}

fn num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

/// The address numbered `n` in `subnet`'s family (`n` is one of its own).
fn addr_in(subnet: &IpNet, n: u128) -> IpAddr {
    match subnet {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

impl Range {
    /// The range of a node subnet whose first address is the gateway.
    pub fn of(subnet: impl Into<IpNet>) -> Self {
        let subnet = subnet.into().trunc();
        let gateway = addr_in(&subnet, num(subnet.network()).wrapping_add(1));
        Range { subnet, gateway }
    }

    /// The range of a node subnet, which must hold a gateway and at least
    /// one container besides its first and last addresses.
    pub fn new(subnet: impl Into<IpNet>) -> Result<Self, String> {
        let subnet = subnet.into();
        if subnet.max_prefix_len() - subnet.prefix_len() < 2 {
            return Err(format!(
                "the node subnet {subnet} is too small for containers: a /{} holds no \
                 address besides the gateway (a /{} holds one; use a larger subnet)",
                subnet.prefix_len(),
                subnet.max_prefix_len() - 2,
            ));
        }
        Ok(Range::of(subnet))
    }

    /// Whether `ip` may be handed to a container.
    pub fn usable(&self, ip: IpAddr) -> bool {
        self.subnet.contains(&ip)
            && ip != self.subnet.network()
            && ip != self.subnet.broadcast()
            && ip != self.gateway
    }

    /// Number of usable addresses.
    pub fn size(&self) -> u128 {
        let bits = u32::from(self.subnet.max_prefix_len() - self.subnet.prefix_len());
        1u128
            .checked_shl(bits)
            .unwrap_or(u128::MAX)
            .saturating_sub(3)
    }

    /// The file of the last address handed out: `last_reserved_ip.0` for
    /// IPv4 and `.1` for IPv6 (host-local's names for the first and second
    /// range of a dual-stack config; `.1` also in an IPv6-only network).
    fn last_file(&self) -> &'static str {
        match self.subnet {
            IpNet::V4(_) => "last_reserved_ip.0",
            IpNet::V6(_) => "last_reserved_ip.1",
        }
    }
}

/// An address in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ip: IpAddr,
    pub container_id: String,
    pub ifname: String,
}

/// Why allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address in {subnet}: all {size} are in use")]
    Exhausted { subnet: IpNet, size: u128 },
    #[error("address store {dir}: {source}")]
    Io { dir: String, source: io::Error },
}

/// The store of one network, locked while this value lives.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Opens (creating it if needed) and locks the store of `network`.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, IpamError> {
        let dir = data_dir.join(network);
        let io_err = |source| IpamError::Io {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io_err)?;
        lock.lock().map_err(io_err)?;
        Ok(Store { dir, _lock: lock })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn err(&self, source: io::Error) -> IpamError {
        IpamError::Io {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    /// Every address in use.
    pub fn entries(&self) -> Result<Vec<Entry>, IpamError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)
            .map_err(|e| self.err(e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
            let container_id = lines.next().unwrap_or_default().trim().to_string();
            let ifname = lines.next().unwrap_or_default().trim().to_string();
            out.push(Entry {
                ip,
                container_id,
                ifname,
            });
        }
        out.sort_by_key(|e| e.ip);
        Ok(out)
    }

    /// The address a container holds in `range`, reserving the next free
    /// one (round robin after the last handed out) if it has none. An
    /// address of the range's family the container held outside the range
    /// (the node's subnet changed) is released.
    pub fn allocate(
        &self,
        range: &Range,
        container_id: &str,
        ifname: &str,
    ) -> Result<IpAddr, IpamError> {
        let entries = self.entries()?;
        let v4 = range.subnet.addr().is_ipv4();
        for e in entries.iter().filter(|e| {
            e.container_id == container_id && e.ifname == ifname && e.ip.is_ipv4() == v4
        }) {
            if range.usable(e.ip) {
                return Ok(e.ip);
            }
            self.remove(e.ip)?;
        }
        let used: std::collections::HashSet<IpAddr> = entries.iter().map(|e| e.ip).collect();
        let first = num(range.subnet.network()) + 1;
        let last = num(range.subnet.broadcast()) - 1;
        let after = std::fs::read_to_string(self.dir.join(range.last_file()))
            .ok()
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .filter(|ip| range.subnet.contains(ip))
            .map(num)
            // A hand-edited file naming the network or last address.
            .filter(|n| (first..=last).contains(n))
            .unwrap_or(last);
        let span = last - first + 1;
        // Among any `used + 2` candidates in a row one is free (the gateway
        // is the one other address skipped): no need to walk a whole /64.
        let tries = span.min(used.len() as u128 + 2);
        for step in 1..=tries {
            let candidate = addr_in(&range.subnet, first + (after - first + step) % span);
            if range.usable(candidate) && !used.contains(&candidate) {
                std::fs::write(
                    self.dir.join(candidate.to_string()),
                    format!("{container_id}\r\n{ifname}"),
                )
                .map_err(|e| self.err(e))?;
                std::fs::write(self.dir.join(range.last_file()), candidate.to_string())
                    .map_err(|e| self.err(e))?;
                return Ok(candidate);
            }
        }
        Err(IpamError::Exhausted {
            subnet: range.subnet,
            size: range.size(),
        })
    }

    fn remove(&self, ip: IpAddr) -> Result<(), IpamError> {
        match std::fs::remove_file(self.dir.join(ip.to_string())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(self.err(e)),
            _ => Ok(()),
        }
    }

    /// Releases what a container holds; returns the addresses freed.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let mut freed = Vec::new();
        for e in self
            .entries()?
            .into_iter()
            .filter(|e| e.container_id == container_id && e.ifname == ifname)
        {
            self.remove(e.ip)?;
            freed.push(e.ip);
        }
        Ok(freed)
    }

    /// Releases every address whose holder is not in `keep`.
    pub fn retain(&self, keep: impl Fn(&Entry) -> bool) -> Result<Vec<Entry>, IpamError> {
        let mut freed = Vec::new();
        for e in self.entries()?.into_iter().filter(|e| !keep(e)) {
            self.remove(e.ip)?;
            freed.push(e);
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_too_small_for_a_container_are_refused() {
        for small in ["10.244.1.0/31", "10.244.1.7/32", "fdc6::/127"] {
            let e = Range::new(small.parse::<IpNet>().unwrap()).unwrap_err();
            assert!(e.contains("too small"), "{e}");
        }
        let r = Range::new("10.244.1.4/30".parse::<IpNet>().unwrap()).unwrap();
        assert_eq!(r.size(), 1);
        assert!(r.usable("10.244.1.6".parse().unwrap()));
        let r6 = Range::new("fdc6:0:0:3::/64".parse::<IpNet>().unwrap()).unwrap();
        assert_eq!(r6.gateway, "fdc6:0:0:3::1".parse::<IpAddr>().unwrap());
        assert_eq!(r6.size(), (1u128 << 64) - 3);
        assert!(!r6.usable("10.244.1.6".parse().unwrap()));
    }

    fn range(s: &str) -> Range {
        Range::of(s.parse::<IpNet>().unwrap())
    }

    #[test]
    fn skips_network_gateway_and_broadcast_and_reuses_per_container() {
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.244.3.0/29");
        assert_eq!(r.size(), 5);
        let s = Store::open(dir.path(), "weft").unwrap();
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(s.allocate(&r, &format!("c{i}"), "eth0").unwrap());
        }
        let texts: Vec<String> = got.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            texts,
            [
                "10.244.3.2",
                "10.244.3.3",
                "10.244.3.4",
                "10.244.3.5",
                "10.244.3.6"
            ]
        );
        assert!(matches!(
            s.allocate(&r, "c5", "eth0"),
            Err(IpamError::Exhausted { size: 5, .. })
        ));
        // Asking again gives the same address (ADD is idempotent).
        assert_eq!(s.allocate(&r, "c2", "eth0").unwrap(), got[2]);
        // The file is host-local's format.
        let text = std::fs::read_to_string(dir.path().join("weft/10.244.3.4")).unwrap();
        assert_eq!(text, "c2\r\neth0");
        assert_eq!(s.release("c2", "eth0").unwrap(), vec![got[2]]);
        assert!(s.release("c2", "eth0").unwrap().is_empty());
        // The only free address is the one just released.
        assert_eq!(s.allocate(&r, "c6", "eth0").unwrap(), got[2]);
    }

    #[test]
    fn a_changed_subnet_never_hands_out_stale_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "weft").unwrap();
        let old = range("10.244.3.0/24");
        let a = s.allocate(&old, "c1", "eth0").unwrap();
        s.allocate(&old, "c2", "eth0").unwrap();
        let new = range("10.244.9.0/24");
        let b = s.allocate(&new, "c1", "eth0").unwrap();
        assert!(new.usable(b));
        assert!(
            !s.entries().unwrap().iter().any(|e| e.ip == a),
            "c1's old address was released"
        );
        // c2's stale entry stays until its DEL or GC, and is never handed out in the new range.
        assert!(s
            .entries()
            .unwrap()
            .iter()
            .any(|e| e.container_id == "c2" && e.ip.to_string().starts_with("10.244.3.")));
    }

    #[test]
    fn both_families_in_one_store_each_round_robin_and_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "weft").unwrap();
        let (v4, v6) = (range("10.244.3.0/24"), range("fdc6:0:0:3::/64"));
        let a4 = s.allocate(&v4, "c1", "eth0").unwrap();
        let a6 = s.allocate(&v6, "c1", "eth0").unwrap();
        assert_eq!(a4.to_string(), "10.244.3.2");
        assert_eq!(a6.to_string(), "fdc6:0:0:3::2");
        // Each family keeps its own address: asking for one never
        // releases the other.
        assert_eq!(s.allocate(&v4, "c1", "eth0").unwrap(), a4);
        assert_eq!(s.allocate(&v6, "c1", "eth0").unwrap(), a6);
        assert_eq!(
            s.allocate(&v6, "c2", "eth0").unwrap().to_string(),
            "fdc6:0:0:3::3"
        );
        // host-local's files: one per address, one "last" per range.
        for f in ["fdc6:0:0:3::2", "last_reserved_ip.0", "last_reserved_ip.1"] {
            assert!(dir.path().join("weft").join(f).exists(), "{f}");
        }
        let last6 = std::fs::read_to_string(dir.path().join("weft/last_reserved_ip.1")).unwrap();
        assert_eq!(last6, "fdc6:0:0:3::3");
        // A "last" file naming the network address (edited by hand) is
        // ignored, not a panic.
        std::fs::write(dir.path().join("weft/last_reserved_ip.1"), "fdc6:0:0:3::").unwrap();
        assert_eq!(
            s.allocate(&v6, "c3", "eth0").unwrap().to_string(),
            "fdc6:0:0:3::4"
        );
        let mut freed = s.release("c1", "eth0").unwrap();
        freed.sort();
        assert_eq!(freed, [a4, a6]);
    }

    #[test]
    fn retain_releases_what_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "weft").unwrap();
        let r = range("10.244.3.0/24");
        for c in ["a", "b", "c"] {
            s.allocate(&r, c, "eth0").unwrap();
        }
        let freed = s.retain(|e| e.container_id == "b").unwrap();
        assert_eq!(freed.len(), 2);
        assert_eq!(s.entries().unwrap().len(), 1);
    }

    #[test]
    fn parallel_allocations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.244.3.0/24");
        let threads: Vec<_> = (0..40)
            .map(|i| {
                let path = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    Store::open(&path, "weft")
                        .unwrap()
                        .allocate(&r, &format!("c{i}"), "eth0")
                        .unwrap()
                })
            })
            .collect();
        let mut ips: Vec<IpAddr> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 40);
    }
}
