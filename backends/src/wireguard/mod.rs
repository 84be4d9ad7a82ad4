//! The wireguard backend: kernel WireGuard between the nodes' public IPs,
//! with flannel's config fields and BackendData (`{"PublicKey": ...}`), so
//! weft and flannel nodes read each other's leases.
//!
//! Per family a device (`weft-wg` for IPv4, `weft-wg-v6` for IPv6 in
//! `separate` mode; `weft-wg` for both otherwise) holding the subnet's
//! first address, one route for the whole cluster network into it, and
//! one peer per node: allowed IPs its subnet, endpoint its public IP. A
//! pod packet to a subnet no peer holds (a skipped lease, one not yet
//! seen) meets no peer and is dropped by WireGuard; and under that route
//! a blackhole for the network at the worst metric ([`crate::kinds::fallback`])
//! drops pod traffic while the device is down or gone. Encryption fails
//! closed, never to the underlay in the clear.

use crate::backend::{per_peer_desired, Backend, PerPeer};
use crate::kinds::link::{Link, WgLink};
use crate::kinds::wireguard::{WgDevice, WgKey, WgPeer, WgSecret};
use crate::local::LocalNode;
use crate::peer::{Claim, Peer, Skipped};
use crate::state::{dev, Dev, NetState, RouteTarget};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use weft_config::{BackendType, WireguardConfig, WireguardMode};
use weft_lease::BackendData;

/// WireGuard's overhead: outer IPv6 (40), UDP (8), WireGuard's header
/// (16) and its authentication tag (16). flannel and `wg-quick` take this
/// IPv6 figure for both families, and so does weft.
pub const WIREGUARD_OVERHEAD: u32 = 80;

/// The device for IPv4 (and for both families outside `separate` mode).
pub const WG_DEVICE: &str = "weft-wg";
/// The device for IPv6 in `separate` mode.
pub const WG_DEVICE_V6: &str = "weft-wg-v6";

/// The wireguard backend.
#[derive(Debug, Clone)]
pub struct Wireguard {
    cfg: WireguardConfig,
    /// The node's key pair on the device; [`Wireguard::rotate`] replaces
    /// it.
    keys: Arc<RwLock<KeyPair>>,
    /// The public key the lease carries: the device's once a rotation has
    /// put it in place ([`Wireguard::publish`]), so a lease renewal never
    /// publishes a key the device does not have yet.
    published: Arc<RwLock<[u8; 32]>>,
    psk: Option<WgSecret>,
    v4: Dev,
    v6: Dev,
}

#[derive(Debug, Clone)]
struct KeyPair {
    private: WgSecret,
    public: [u8; 32],
}

impl KeyPair {
    fn new(private_key: [u8; 32]) -> Self {
        let private = WgSecret::private(private_key);
        let public = *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*private.0))
            .as_bytes();
        KeyPair { private, public }
    }
}

impl Wireguard {
    /// The backend with the node's private key (32 bytes, as stored).
    pub fn new(cfg: WireguardConfig, private_key: [u8; 32]) -> Self {
        let v6 = match cfg.mode {
            WireguardMode::Separate => dev(WG_DEVICE_V6),
            _ => dev(WG_DEVICE),
        };
        let keys = KeyPair::new(private_key);
        Wireguard {
            psk: cfg.psk.map(|k| WgSecret(Arc::new(k))),
            cfg,
            published: Arc::new(RwLock::new(keys.public)),
            keys: Arc::new(RwLock::new(keys)),
            v4: dev(WG_DEVICE),
            v6,
        }
    }

    /// Makes `private_key` (already stored) the node's key: the next pass
    /// sets it on the device. The lease data keeps the old public key
    /// until [`Wireguard::publish`]. The kernel keeps receiving on the
    /// sessions made with the old key and holds what it sends to a peer
    /// until a handshake with the new one succeeds, which it does once the
    /// peer has the new public key.
    pub fn rotate(&self, private_key: [u8; 32]) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = KeyPair::new(private_key);
    }

    /// The device has the current key: the lease data carries it from now.
    pub fn publish(&self) {
        let public = self.key_pair().public;
        *self
            .published
            .write()
            .unwrap_or_else(PoisonError::into_inner) = public;
    }

    fn published_key(&self) -> [u8; 32] {
        *self
            .published
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn key_pair(&self) -> KeyPair {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The node's public key on the device (peers know it once published).
    pub fn public_key(&self) -> WgKey {
        WgKey(self.key_pair().public)
    }

    fn device(&self, mtu: u32) -> (Link, WgDevice) {
        let keys = self.key_pair();
        (
            Link::Wireguard(WgLink { mtu, up: true }),
            WgDevice {
                private_key: Some(keys.private),
                public_key: WgKey(keys.public),
                listen_port: self.cfg.listen_port,
            },
        )
    }

    /// Where a peer's packets go, over the family the mode picks.
    fn endpoint(&self, p: &Peer, v6_device: bool) -> Option<SocketAddr> {
        let v4 = SocketAddr::new(IpAddr::V4(p.public_ip), self.cfg.listen_port);
        let v6 = p
            .public_ipv6
            .map(|a| SocketAddr::new(IpAddr::V6(a), self.port_v6()));
        match (self.cfg.mode, v6_device) {
            (WireguardMode::Separate, false) | (WireguardMode::Ipv4, _) => Some(v4),
            (WireguardMode::Separate, true) | (WireguardMode::Ipv6, _) => v6,
            (WireguardMode::Auto, _) => v6.or(Some(v4)),
        }
    }

    /// The port of the device that carries IPv6 (its own device only in
    /// `separate` mode).
    fn port_v6(&self) -> u16 {
        match self.cfg.mode {
            WireguardMode::Separate => self.cfg.listen_port_v6,
            _ => self.cfg.listen_port,
        }
    }

    fn v6_wanted(&self, local: &LocalNode) -> Option<(Ipv6Net, Ipv6Net)> {
        let pool = local.network.ipv6.as_ref()?;
        Some((local.subnet.ipv6()?, pool.network()))
    }
}

impl Backend for Wireguard {
    fn backend_type(&self) -> BackendType {
        BackendType::Wireguard
    }

    fn lease_data(&self, _local_name: &str) -> BackendData {
        BackendData::Wireguard {
            public_key: self.published_key(),
        }
    }

    fn pod_mtu(&self, underlay_mtu: u32) -> u32 {
        self.cfg
            .mtu
            .unwrap_or(underlay_mtu.saturating_sub(WIREGUARD_OVERHEAD))
    }

    fn desired(&self, local: &LocalNode, peers: &[&Peer]) -> (NetState, Vec<Skipped>) {
        per_peer_desired(self, local, peers)
    }

    fn per_peer(&self) -> Option<&dyn PerPeer> {
        Some(self)
    }
}

impl PerPeer for Wireguard {
    fn base(&self, local: &LocalNode) -> NetState {
        let mut st = NetState::default();
        let mtu = self.pod_mtu(local.ext.mtu);
        let add_device = |st: &mut NetState, name: &Dev, port: u16| {
            let (link, mut device) = self.device(mtu);
            device.listen_port = port;
            st.links.insert(name.clone(), link);
            st.wg_devices.insert(name.clone(), device);
        };
        if let (Some(s), Some(pool)) = (local.subnet.ipv4(), local.network.ipv4.as_ref()) {
            add_device(&mut st, &self.v4, self.cfg.listen_port);
            st.addresses.insert(
                (
                    self.v4.clone(),
                    IpNet::V4(Ipv4Net::new(s.network(), 32).expect("/32")),
                ),
                (),
            );
            st.routes
                .insert(IpNet::V4(pool.network()), RouteTarget::device(&self.v4));
            st.fallback_routes.insert(IpNet::V4(pool.network()), ());
        }
        if let Some((s6, pool6)) = self.v6_wanted(local) {
            if !st.links.contains_key(&self.v6) {
                add_device(&mut st, &self.v6, self.port_v6());
            }
            st.addresses.insert(
                (
                    self.v6.clone(),
                    IpNet::V6(Ipv6Net::new(s6.network(), 128).expect("/128")),
                ),
                (),
            );
            st.routes
                .insert(IpNet::V6(pool6), RouteTarget::device(&self.v6));
            st.fallback_routes.insert(IpNet::V6(pool6), ());
        }
        st
    }

    fn refuse(&self, local: &LocalNode, p: &Peer) -> Option<String> {
        let BackendData::Wireguard { public_key } = &p.backend else {
            return Some("not a wireguard lease".into());
        };
        if WgKey(*public_key) == self.public_key() || *public_key == self.published_key() {
            return Some(format!(
                "WireGuard public key {} is ours",
                WgKey(*public_key)
            ));
        }
        if self.cfg.mode == WireguardMode::Ipv6 && p.public_ipv6.is_none() {
            return Some("no public IPv6 address, and the network's wireguard Mode is ipv6".into());
        }
        if self.cfg.mode == WireguardMode::Separate
            && local.network.ipv4.is_none()
            && p.public_ipv6.is_none()
        {
            return Some(
                "no public IPv6 address, and weft-wg-v6 reaches peers of an IPv6-only network \
                 over IPv6"
                    .into(),
            );
        }
        None
    }

    fn claims(&self, p: &Peer) -> Option<Claim> {
        match &p.backend {
            BackendData::Wireguard { public_key } => Some(Claim::PublicKey(*public_key)),
            _ => None,
        }
    }

    fn add(&self, local: &LocalNode, _ext: &Dev, p: &Peer, st: &mut NetState) {
        let BackendData::Wireguard { public_key } = &p.backend else {
            return;
        };
        let key = WgKey(*public_key);
        let peer = |endpoint, allowed_ips| WgPeer {
            endpoint,
            allowed_ips,
            keepalive: self.cfg.persistent_keepalive,
            psk: self.psk.clone(),
        };
        let v6 = self.v6_wanted(local).and(p.subnet6).map(IpNet::V6);
        let mut v4_ips: Vec<IpNet> = p.subnet.map(IpNet::V4).into_iter().collect();
        if self.v4 == self.v6 {
            v4_ips.extend(v6);
            v4_ips.sort();
        } else if let Some(s6) = v6 {
            if let Some(e) = self.endpoint(p, true) {
                st.wg_peers
                    .insert((self.v6.clone(), key), peer(Some(e), vec![s6]));
            }
        }
        // The IPv4 device's peer; in a mode with one device, also (or, in an
        // IPv6-only network, only) its IPv6 subnet.
        if !v4_ips.is_empty() {
            st.wg_peers.insert(
                (self.v4.clone(), key),
                peer(self.endpoint(p, false), v4_ips),
            );
        }
    }
}
