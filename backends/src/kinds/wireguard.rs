//! WireGuard devices (`weft-wg`, `weft-wg-v6`) through generic netlink:
//! the device's own settings (private key, listen port) and its peers
//! (public key -> endpoint, allowed IPs, keepalive, preshared key). The
//! device itself is a [`super::link::Link::Wireguard`]. No `wg` binary.

use super::{no_device, Kind, Table};
use crate::dataplane::{Errno, Failure};
use crate::netlink::Applying;
use crate::state::{Change, Dev, NetState};
use futures::StreamExt;
use genetlink::{GenetlinkError, GenetlinkHandle};
use ipnet::IpNet;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The names of weft's WireGuard devices: only these are read back as
/// weft's (an operator's `weft-wg0` is not).
pub const WG_NAMES: [&str; 2] = ["weft-wg", "weft-wg-v6"];

/// A WireGuard public key (Curve25519, 32 bytes). Shown in base64, as `wg`
/// shows it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgKey(pub [u8; 32]);

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64::Engine;
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({self})")
    }
}

/// Secret key material (a device's private key, a preshared key): never
/// shown, compared as the kernel keeps it.
#[derive(Clone, PartialEq, Eq)]
pub struct WgSecret(pub Arc<[u8; 32]>);

impl WgSecret {
    /// A private key as the kernel stores it (clamped, RFC 7748), so that
    /// what is read back compares equal to what was set.
    pub fn private(mut k: [u8; 32]) -> Self {
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        WgSecret(Arc::new(k))
    }
}

impl fmt::Debug for WgSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WgSecret(<redacted>)")
    }
}

/// A WireGuard device's own settings. Compared by the public key: the
/// private key is only ever sent, never read back (so it is not kept in
/// what the kernel has, and not in anything logged about it).
#[derive(Debug, Clone)]
pub struct WgDevice {
    /// What is set (desired state); `None` in what is read back.
    pub private_key: Option<WgSecret>,
    /// The public key of the private key the device has (all zeros: none).
    pub public_key: WgKey,
    pub listen_port: u16,
}

impl PartialEq for WgDevice {
    fn eq(&self, other: &Self) -> bool {
        self.public_key == other.public_key && self.listen_port == other.listen_port
    }
}

impl Eq for WgDevice {}

/// A peer of a WireGuard device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    pub endpoint: Option<SocketAddr>,
    /// Sorted: the kernel gives them back in its own order.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; 0 is off.
    pub keepalive: u16,
    pub psk: Option<WgSecret>,
}

/// The settings of a WireGuard device, by device.
#[derive(Debug)]
pub struct WireguardDeviceKind;

impl Kind for WireguardDeviceKind {
    type Key = Dev;
    type Value = WgDevice;

    fn table(st: &NetState) -> &Table<Self> {
        &st.wg_devices
    }
    fn table_mut(st: &mut NetState) -> &mut Table<Self> {
        &mut st.wg_devices
    }
    fn dev<'a>(dev: &'a Dev, _: &'a WgDevice) -> Option<&'a Dev> {
        Some(dev)
    }
    fn set(dev: &Dev, device: &WgDevice, _: Option<&WgDevice>, out: &mut Vec<Change>) {
        out.push(Change::Wireguard(WireguardChange::SetDevice {
            dev: dev.clone(),
            device: device.clone(),
        }));
    }
    /// A device's settings go with the device; nothing to do alone.
    fn del(dev: &Dev, device: &WgDevice) -> Change {
        Change::Wireguard(WireguardChange::SetDevice {
            dev: dev.clone(),
            device: device.clone(),
        })
    }
}

/// A peer of a WireGuard device: (device, public key) -> the rest.
#[derive(Debug)]
pub struct WireguardPeerKind;

impl Kind for WireguardPeerKind {
    type Key = (Dev, WgKey);
    type Value = WgPeer;

    fn table(st: &NetState) -> &Table<Self> {
        &st.wg_peers
    }
    fn table_mut(st: &mut NetState) -> &mut Table<Self> {
        &mut st.wg_peers
    }
    fn dev<'a>((dev, _): &'a Self::Key, _: &'a WgPeer) -> Option<&'a Dev> {
        Some(dev)
    }
    fn set((dev, key): &Self::Key, peer: &WgPeer, have: Option<&WgPeer>, out: &mut Vec<Change>) {
        out.push(Change::Wireguard(WireguardChange::SetPeer {
            dev: dev.clone(),
            key: *key,
            peer: peer.clone(),
            // Replacing a peer's allowed IPs leaves it without any for a
            // moment: only when they differ.
            replace_ips: have.is_none_or(|h| h.allowed_ips != peer.allowed_ips),
        }));
    }
    fn del((dev, key): &Self::Key, _: &WgPeer) -> Change {
        Change::Wireguard(WireguardChange::DelPeer {
            dev: dev.clone(),
            key: *key,
        })
    }
}

/// A change to a WireGuard device's settings or peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireguardChange {
    SetDevice {
        dev: Dev,
        device: WgDevice,
    },
    /// Adds the peer, or sets everything of it; its allowed IPs are
    /// replaced with `replace_ips`, left as they are without. A peer whose
    /// allowed IPs are set (one new to the device: a node that joined, a
    /// node's new key) is sent a keepalive at once, so the handshake starts
    /// now: a node that rotated its key and has packets waiting for this
    /// peer gets them through now, not at its next handshake attempt
    /// (WireGuard tries every 5 s).
    SetPeer {
        dev: Dev,
        key: WgKey,
        peer: WgPeer,
        replace_ips: bool,
    },
    DelPeer {
        dev: Dev,
        key: WgKey,
    },
}

impl fmt::Display for WireguardChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // No key is ever written out.
            WireguardChange::SetDevice { dev, device } => write!(
                f,
                "wg set {dev} private-key <key> listen-port {}",
                device.listen_port
            ),
            WireguardChange::SetPeer { dev, key, peer, .. } => {
                write!(f, "wg set {dev} peer {key}")?;
                if let Some(e) = peer.endpoint {
                    write!(f, " endpoint {e}")?;
                }
                let ips: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
                write!(f, " allowed-ips {}", ips.join(","))?;
                if peer.keepalive > 0 {
                    write!(f, " persistent-keepalive {}", peer.keepalive)?;
                }
                if peer.psk.is_some() {
                    f.write_str(" preshared-key <key>")?;
                }
                Ok(())
            }
            WireguardChange::DelPeer { dev, key } => write!(f, "wg set {dev} peer {key} remove"),
        }
    }
}

impl WireguardChange {
    fn dev(&self) -> &Dev {
        match self {
            WireguardChange::SetDevice { dev, .. }
            | WireguardChange::SetPeer { dev, .. }
            | WireguardChange::DelPeer { dev, .. } => dev,
        }
    }

    pub(crate) fn fake(&self, st: &mut NetState) -> Result<(), Failure> {
        let is_wg = matches!(
            st.links.get(self.dev()),
            Some(super::link::Link::Wireguard(_))
        );
        match self {
            WireguardChange::DelPeer { dev, key } => {
                // The kernel ignores a peer it does not have.
                if !is_wg {
                    return Err(no_device());
                }
                st.wg_peers.remove(&(dev.clone(), *key));
            }
            _ if !is_wg => return Err(no_device()),
            WireguardChange::SetDevice { dev, device } => {
                let mut kept = device.clone();
                kept.private_key = None;
                st.wg_devices.insert(dev.clone(), kept);
            }
            WireguardChange::SetPeer { dev, key, peer, .. } => {
                st.wg_peers.insert((dev.clone(), *key), peer.clone());
            }
        }
        Ok(())
    }

    pub(crate) async fn apply(&self, k: &Applying<'_>) -> Result<(), Failure> {
        let name = self.dev().to_string();
        k.index(&name)?;
        let mut attributes = vec![WireguardAttribute::IfName(name.clone())];
        // The kernel sends a keepalive when a peer's persistent keepalive
        // goes from 0 to more; with none configured, 1 for a moment.
        let mut kick = None;
        match self {
            WireguardChange::SetDevice { device, .. } => {
                let Some(private) = &device.private_key else {
                    return Err(Failure::other("no private key to set"));
                };
                attributes.push(WireguardAttribute::PrivateKey(*private.0));
                attributes.push(WireguardAttribute::ListenPort(device.listen_port));
            }
            WireguardChange::SetPeer {
                key,
                peer,
                replace_ips,
                ..
            } => {
                let mut p = vec![WireguardPeerAttribute::PublicKey(key.0)];
                if *replace_ips {
                    p.push(WireguardPeerAttribute::Flags(
                        WireguardPeerFlags::ReplaceAllowedIps,
                    ));
                }
                let mut keepalive = peer.keepalive;
                if *replace_ips && keepalive == 0 {
                    keepalive = 1;
                    kick = Some(vec![
                        WireguardAttribute::IfName(name),
                        WireguardAttribute::Peers(vec![WireguardPeer(vec![
                            WireguardPeerAttribute::PublicKey(key.0),
                            WireguardPeerAttribute::PersistentKeepalive(0),
                        ])]),
                    ]);
                }
                p.extend([
                    // All zeros: no preshared key.
                    WireguardPeerAttribute::PresharedKey(
                        peer.psk.as_ref().map_or([0; 32], |s| *s.0),
                    ),
                    WireguardPeerAttribute::PersistentKeepalive(keepalive),
                ]);
                if let Some(e) = peer.endpoint {
                    p.push(WireguardPeerAttribute::Endpoint(e));
                }
                if *replace_ips {
                    p.push(WireguardPeerAttribute::AllowedIps(
                        peer.allowed_ips.iter().map(allowed_ip).collect(),
                    ));
                }
                attributes.push(WireguardAttribute::Peers(vec![WireguardPeer(p)]));
            }
            WireguardChange::DelPeer { key, .. } => {
                attributes.push(WireguardAttribute::Peers(vec![WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(key.0),
                    WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                ])]));
            }
        }
        set_device(k, attributes)
            .await
            .map_err(|f| match (self, f.errno) {
                (WireguardChange::SetDevice { device, .. }, Some(Errno::EADDRINUSE)) => {
                    Failure::with(
                        Errno::EADDRINUSE,
                        format!(
                            "UDP port {} is in use (another WireGuard device, flannel-wg?); \
                     the device has no key until it is free",
                            device.listen_port
                        ),
                    )
                }
                _ => f,
            })?;
        match kick {
            Some(back) => set_device(k, back).await,
            None => Ok(()),
        }
    }
}

/// One WG_CMD_SET_DEVICE request, answered.
async fn set_device(k: &Applying<'_>, attributes: Vec<WireguardAttribute>) -> Result<(), Failure> {
    let mut h = k.wireguard()?.clone();
    let mut m = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes,
    }));
    m.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut answers = h.request(m).await.map_err(|e| genl_failure(&e))?;
    while let Some(a) = answers.next().await {
        let a = a.map_err(|e| Failure::other(format!("decoding WireGuard's answer: {e}")))?;
        if let NetlinkPayload::Error(e) = a.payload {
            if e.code.is_some() {
                return Err(Failure::from_netlink(e.code, || e.to_string()));
            }
        }
    }
    Ok(())
}

fn allowed_ip(n: &IpNet) -> WireguardAllowedIp {
    let family = match n {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(n.network()),
        WireguardAllowedIpAttr::Cidr(n.prefix_len()),
    ])
}

/// A generic netlink failure, with the kernel's errno where it gave one.
pub(crate) fn genl_failure(e: &GenetlinkError) -> Failure {
    match e {
        GenetlinkError::NetlinkError(io) => match io.raw_os_error() {
            Some(n) => Failure::from_raw(n),
            None => Failure::other(io.to_string()),
        },
        other => Failure::other(other.to_string()),
    }
}

/// What the kernel lacks for the wireguard backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WgSupport {
    #[error(
        "the kernel has no WireGuard (module wireguard, CONFIG_WIREGUARD; Linux 5.6 or later): {0}"
    )]
    Missing(String),
    #[error("probing WireGuard support failed: {0}")]
    Other(String),
}

/// Checks that the kernel has WireGuard: its generic netlink family
/// resolves (the kernel loads the module on demand).
pub async fn probe(h: &GenetlinkHandle) -> Result<(), WgSupport> {
    match h.resolve_family::<WireguardMessage>().await {
        Ok(_) => Ok(()),
        Err(GenetlinkError::NetlinkError(io))
            if io.raw_os_error() == Some(Errno::ENOENT as i32) =>
        {
            Err(WgSupport::Missing(Failure::of(Errno::ENOENT).to_string()))
        }
        Err(e) => Err(WgSupport::Other(genl_failure(&e).to_string())),
    }
}

/// Reads the settings and peers of WireGuard device `dev` into `st`.
/// A dump the device changed in the middle of is read again.
pub(crate) async fn read(h: &GenetlinkHandle, dev: &Dev, st: &mut NetState) -> Result<(), Failure> {
    for _ in 0..5 {
        let mut h = h.clone();
        let mut m = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(dev.to_string())],
        }));
        m.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut answers = h.request(m).await.map_err(|e| genl_failure(&e))?;
        let mut device: Option<WgDevice> = None;
        let mut peers: Vec<(WgKey, WgPeer)> = Vec::new();
        let mut interrupted = false;
        while let Some(a) = answers.next().await {
            let a = a.map_err(|e| Failure::other(format!("decoding WireGuard's answer: {e}")))?;
            if a.header.flags & netlink_packet_core::NLM_F_DUMP_INTR != 0 {
                interrupted = true;
            }
            match a.payload {
                NetlinkPayload::InnerMessage(g) => {
                    merge(&mut device, &mut peers, g.payload.attributes)
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(Failure::from_netlink(e.code, || e.to_string()))
                }
                _ => {}
            }
        }
        if interrupted {
            continue;
        }
        if let Some(d) = device {
            st.wg_devices.insert(dev.clone(), d);
        }
        for (key, mut p) in peers {
            p.allowed_ips.sort();
            st.wg_peers.insert((dev.clone(), key), p);
        }
        return Ok(());
    }
    Err(Failure::other(format!(
        "reading {dev}: the device kept changing while it was read"
    )))
}

/// Adds one message of a device dump: the device's settings come in the
/// first; a peer whose allowed IPs did not fit goes on in the next one,
/// under its public key again.
fn merge(
    device: &mut Option<WgDevice>,
    peers: &mut Vec<(WgKey, WgPeer)>,
    attributes: Vec<WireguardAttribute>,
) {
    let mut public_key = None;
    let mut listen_port = None;
    for a in attributes {
        match a {
            WireguardAttribute::PublicKey(k) => public_key = Some(k),
            WireguardAttribute::ListenPort(p) => listen_port = Some(p),
            WireguardAttribute::Peers(ps) => {
                for WireguardPeer(attrs) in ps {
                    merge_peer(peers, attrs);
                }
            }
            _ => {}
        }
    }
    if device.is_none() {
        if let Some(port) = listen_port {
            *device = Some(WgDevice {
                private_key: None,
                // A device without a key has no public key: all zeros,
                // which no desired key is, so the diff sets it.
                public_key: WgKey(public_key.unwrap_or([0; 32])),
                listen_port: port,
            });
        }
    }
}

fn merge_peer(peers: &mut Vec<(WgKey, WgPeer)>, attrs: Vec<WireguardPeerAttribute>) {
    let Some(key) = attrs.iter().find_map(|a| match a {
        WireguardPeerAttribute::PublicKey(k) => Some(WgKey(*k)),
        _ => None,
    }) else {
        return;
    };
    if peers.last().map(|(k, _)| *k) != Some(key) {
        peers.push((
            key,
            WgPeer {
                endpoint: None,
                allowed_ips: Vec::new(),
                keepalive: 0,
                psk: None,
            },
        ));
    }
    let Some((_, p)) = peers.last_mut() else {
        return;
    };
    for a in attrs {
        match a {
            WireguardPeerAttribute::PresharedKey(k) if k != [0; 32] => {
                p.psk = Some(WgSecret(Arc::new(k)))
            }
            WireguardPeerAttribute::Endpoint(e) => p.endpoint = Some(e),
            WireguardPeerAttribute::PersistentKeepalive(s) => p.keepalive = s,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for WireguardAllowedIp(attrs) in ips {
                    let mut ip: Option<IpAddr> = None;
                    let mut cidr = None;
                    for x in attrs {
                        match x {
                            WireguardAllowedIpAttr::IpAddr(a) => ip = Some(a),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
                            _ => {}
                        }
                    }
                    if let Some(n) = ip.zip(cidr).and_then(|(a, c)| IpNet::new(a, c).ok()) {
                        p.allowed_ips.push(n);
                    }
                }
            }
            _ => {}
        }
    }
}
