//! The ipsec backend: ESP in tunnel mode between the nodes' public IPs for
//! traffic between pod subnets, keyed without IKE (see [`keys`]).
//!
//! Per peer the kernel gets an SA for each direction, policies out (our
//! subnet to theirs), in and fwd (theirs to ours) whose template names
//! both public IPs and weft's reqid, and a route to the peer's subnet via
//! its public IP (onlink), so forwarding works on hosts without a default
//! route and across routers: only the ESP packet is routed to the peer,
//! the route just brings pod traffic to the policy.
//!
//! Key changes without losing traffic. A key pair of this node or of a
//! peer gives a new pair of SAs ("generation"). Its inbound SA is
//! installed at once; the outbound one replaces the old outbound SA only
//! [`Timing::switch_delay`] after both sides can know the new keys (after
//! we published our new key, or after we saw the peer's), so the other end
//! already has the matching inbound SA; old inbound SAs stay for
//! [`Timing::grace`] after that. The first generation with a new peer
//! sends at once (there is nothing to switch from). A peer that is gone
//! loses everything at once.
//!
//! An outbound SA cannot simply be put back. Its sequence numbers restart
//! at 1, and the peer's inbound SA (same SPI and key, derived again) has
//! already seen higher ones, so its replay check drops every packet. So
//! when a pass finds that an outbound SA the kernel had is wanted but
//! gone (a reboot, `ip xfrm state flush`, a hand deletion, a peer that left
//! and came back with the same key), the backend asks for a new key
//! ([`Ipsec::rekey_wanted`]): a new generation means new SPIs on both
//! ends. The same goes for two peers whose inbound SAs here drew the same
//! SPI ([`drop_inbound_spi_collisions`]).

pub mod keys;

use crate::backend::Backend;
use crate::local::LocalNode;
use crate::peer::{Peer, Skipped};
use crate::state::{
    NetState, RouteTarget, XfrmDir, XfrmPolicyId, XfrmSa, XfrmSaId, XfrmTmpl, WEFT_XFRM_REQID,
};
use ipnet::IpNet;
use keys::{derive_pair, End, NodeKey, PairSas};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use weft_config::BackendType;
use weft_lease::BackendData;
use zeroize::Zeroizing;

/// Bytes ESP in tunnel mode adds to an inner IPv4 packet with weft's AEAD,
/// before padding: outer IPv4 header 20, SPI and sequence 8, IV 8, pad
/// length and next header 2, ICV 16.
pub const ESP_OVERHEAD: u32 = 54;

/// The largest inner packet that fits `underlay_mtu` once encrypted: the
/// ESP payload plus its 2 trailer bytes is padded to a multiple of 4.
pub fn pod_mtu(underlay_mtu: u32) -> u32 {
    (underlay_mtu.saturating_sub(ESP_OVERHEAD - 2) & !3).saturating_sub(2)
}

/// When SAs of a new generation take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// From "both ends can have the new SAs" to sending with them.
    pub switch_delay: Duration,
    /// How long old inbound SAs stay after the switch.
    pub grace: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            switch_delay: Duration::from_secs(5),
            grace: Duration::from_secs(120),
        }
    }
}

/// Why the backend wants a new key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RekeyCause {
    /// The outbound SAs to these peers were lost: put back, they would
    /// restart their sequence numbers and the peers would drop them as
    /// replays.
    LostOutbound(Vec<Ipv4Addr>),
    /// These peers' inbound SAs drew an SPI that another peer's inbound SA
    /// already has (the kernel finds inbound SAs by destination and SPI
    /// alone), so they could not be installed.
    SpiCollision(Vec<Ipv4Addr>),
}

/// Removes inbound SAs (to `me`) whose SPI another inbound SA already
/// has, keeping the one from the lowest source address; returns those
/// removed. SPIs are 32 bits from HKDF: with n peers a
/// node has a collision with probability about n²/2³³ (0.3% at 5,000
/// peers), and a new key draws new SPIs.
pub fn drop_inbound_spi_collisions(st: &mut NetState, me: IpAddr) -> Vec<XfrmSaId> {
    let mut first: HashMap<u32, IpAddr> = HashMap::new();
    let mut inbound: Vec<XfrmSaId> = st
        .xfrm_states
        .keys()
        .filter(|id| id.dst == me)
        .copied()
        .collect();
    inbound.sort_by_key(|id| id.src);
    let mut dropped = Vec::new();
    for id in inbound {
        match first.get(&id.spi) {
            Some(src) if *src != id.src => {
                st.xfrm_states.remove(&id);
                dropped.push(id);
            }
            _ => {
                first.insert(id.spi, id.src);
            }
        }
    }
    dropped
}

/// The replay window of every SA (packets).
pub const REPLAY_WINDOW: u32 = 128;

/// One generation of SAs with a peer.
#[derive(Debug, Clone)]
struct Generation {
    my_epoch: u64,
    peer_epoch: u64,
    peer_key: [u8; 32],
    my_ip: Ipv4Addr,
    sas: PairSas,
    /// When this node first computed it.
    seen: Instant,
    /// Made when there was no other generation with this peer (first
    /// contact): nothing to switch from, so it sends at once.
    first: bool,
}

/// The key state that desired state depends on, besides the leases.
#[derive(Debug)]
struct Keyring {
    key: NodeKey,
    /// Epoch the peers can know (our lease carries it) and since when.
    published: Option<(u64, Instant)>,
    generations: HashMap<Ipv4Addr, Vec<Generation>>,
    /// Per peer, the outbound SA the last desired state sends with.
    /// With the epoch of our key it belongs to.
    sending: HashMap<Ipv4Addr, (XfrmSaId, u64)>,
    /// Outbound SAs the kernel has had, with the epoch of our key they
    /// belong to. Their peers know their sequence numbers, so none may be
    /// installed afresh: not after a deletion, and not when a peer that
    /// left (its lease expired, say) comes back with the same key. Kept
    /// while our key has that epoch or a generation of it is still in use
    /// (after a rotation, until the switch).
    burnt: HashMap<XfrmSaId, u64>,
    /// Burnt outbound SAs the kernel no longer has: never put back (their
    /// sequence numbers would start again and the peer would drop every
    /// packet as a replay); the policy stays, so packets to that peer are
    /// dropped until a rotation gives new SAs.
    lost: HashSet<XfrmSaId>,
    /// The key was in use before this process started (loaded from the
    /// state directory) and no pass has looked at the kernel yet: the
    /// first pass counts every outbound SA it wants as burnt, since the
    /// kernel may have held it before a reboot.
    restored_unchecked: bool,
    /// The SAs the kernel had at the last observation (`None`: none yet).
    /// A burnt SA a pass wants to send with that is not among them was
    /// lost (deleted by hand, by a reboot, or with a peer that left and
    /// came back with the same key).
    kernel: Option<HashSet<XfrmSaId>>,
    /// Why a new key is wanted, not yet taken by [`Ipsec::rekey_wanted`].
    wanted: Option<RekeyCause>,
    /// A cause was reported for the current key (one rotation fixes all).
    wanted_reported: bool,
}

/// What the ipsec backend reports about its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub epoch: u64,
    pub published_epoch: Option<u64>,
    pub public_key: [u8; 32],
    /// Peers with an SA generation still pending or still in its grace.
    pub peers_in_transition: usize,
}

/// The ipsec backend.
#[derive(Debug)]
pub struct Ipsec {
    psk: Option<Zeroizing<Vec<u8>>>,
    timing: Timing,
    ring: Mutex<Keyring>,
    wanted_signal: tokio::sync::Notify,
}

impl Ipsec {
    /// The backend with this node's key and the cluster PSK, if any.
    pub fn new(key: NodeKey, psk: Option<Zeroizing<Vec<u8>>>, timing: Timing) -> Self {
        Ipsec {
            psk,
            timing,
            ring: Mutex::new(Keyring {
                key,
                published: None,
                generations: HashMap::new(),
                sending: HashMap::new(),
                burnt: HashMap::new(),
                lost: HashSet::new(),
                restored_unchecked: false,
                kernel: None,
                wanted: None,
                wanted_reported: false,
            }),
            wanted_signal: tokio::sync::Notify::new(),
        }
    }

    /// The key was loaded from the state directory, not made now: until
    /// the first pass, treat every generation as one the peers may
    /// have received from (this may be a restart after a reboot).
    pub fn key_restored(&self) {
        self.ring().restored_unchecked = true;
    }

    /// The rotation for a [`Ipsec::rekey_wanted`] cause failed: report
    /// it again.
    pub fn rekey_wanted_again(&self, cause: RekeyCause) {
        let mut r = self.ring();
        r.wanted = Some(cause);
        r.wanted_reported = true;
        self.wanted_signal.notify_one();
    }

    /// Waits until this backend needs a new key (see the module docs) and
    /// says why; the node should rotate. Reported once per key:
    /// [`Ipsec::rotate`] re-arms it.
    pub async fn rekey_wanted(&self) -> RekeyCause {
        loop {
            if let Some(c) = self.ring().wanted.take() {
                return c;
            }
            self.wanted_signal.notified().await;
        }
    }

    fn want_rekey(&self, r: &mut Keyring, cause: RekeyCause) {
        if !r.wanted_reported {
            r.wanted = Some(cause);
            r.wanted_reported = true;
            self.wanted_signal.notify_one();
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Keyring> {
        // A panic while holding the lock cannot leave the ring half
        // changed in a way that matters: every field is replaced whole.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current key's epoch.
    pub fn epoch(&self) -> u64 {
        self.ring().key.epoch()
    }

    /// Makes `key` (with a higher epoch, already stored) the node's key.
    /// Inbound SAs for it go in with the next pass; outbound ones follow
    /// once [`Ipsec::published`] says the peers can know it.
    pub fn rotate(&self, key: NodeKey) {
        let mut r = self.ring();
        r.key = key;
        r.wanted = None;
        r.wanted_reported = false;
    }

    /// Our lease now carries `epoch`.
    pub fn published(&self, epoch: u64) {
        self.published_at(epoch, Instant::now());
    }

    /// Our lease carries `epoch` since `at`.
    pub fn published_at(&self, epoch: u64, at: Instant) {
        let mut r = self.ring();
        if r.published.map(|(e, _)| e) != Some(epoch) {
            r.published = Some((epoch, at));
        }
    }

    /// Key state, for status reports.
    pub fn key_status(&self) -> KeyStatus {
        let r = self.ring();
        KeyStatus {
            epoch: r.key.epoch(),
            published_epoch: r.published.map(|(e, _)| e),
            public_key: r.key.public(),
            peers_in_transition: r.generations.values().filter(|g| g.len() > 1).count(),
        }
    }

    /// When a generation may send: after both ends can have it, plus the
    /// switch delay. `None`: not yet (our key for it is not published).
    fn ready_at(&self, g: &Generation, published: Option<(u64, Instant)>) -> Option<Instant> {
        let (pe, pt) = published?;
        if g.my_epoch > pe {
            return None;
        }
        let since = if g.my_epoch == pe {
            g.seen.max(pt)
        } else {
            g.seen
        };
        Some(if g.first {
            since
        } else {
            since + self.timing.switch_delay
        })
    }

    /// Desired state at `now` (the trait's `desired` uses the clock).
    pub fn desired_at(
        &self,
        local: &LocalNode,
        peers: &[&Peer],
        now: Instant,
    ) -> (NetState, Vec<Skipped>) {
        let mut st = NetState::default();
        let mut skipped = Vec::new();
        let mut ring = self.ring();
        let published = ring.published;
        let ext = local.ext.name.clone();
        // ipsec carries IPv4 only. Pods that also have IPv6 addresses (a
        // network with IPv6) must not reach other nodes' pods over IPv6 in
        // the clear: a blackhole for the IPv6 network at the worst metric
        // drops it (the node's own subnet is more specific, on weft0).
        if let Some(pool6) = &local.network.ipv6 {
            st.fallback_routes.insert(IpNet::V6(pool6.network()), ());
        }
        let Some(my_subnet) = local.subnet.ipv4() else {
            return (st, skipped);
        };
        let me = local.public_ip;
        // Outbound SAs lost after use, which must not come back, and what
        // tells them: the ones sent with before, and the kernel's.
        let mut lost = std::mem::take(&mut ring.lost);
        let mut burnt = std::mem::take(&mut ring.burnt);
        let kernel = ring.kernel.take();
        let restored_unchecked = ring.restored_unchecked;
        let mut newly_lost = Vec::new();
        // Fail closed: pod traffic to the cluster network that no peer's
        // policy encrypts (a peer skipped for a bad key, another backend, a
        // lease not yet seen) is dropped, not routed out in the clear.
        if let Some(pool) = &local.network.ipv4 {
            st.xfrm_blocks.insert(
                XfrmPolicyId {
                    dir: XfrmDir::Out,
                    src: IpNet::V4(my_subnet),
                    dst: IpNet::V4(pool.network()),
                },
                (),
            );
        }
        let mut live = Vec::with_capacity(peers.len());
        let mut sends = Vec::with_capacity(peers.len());
        for p in peers {
            let BackendData::Ipsec {
                public_key,
                key_epoch,
            } = &p.backend
            else {
                continue;
            };
            let Some(their_subnet) = p.subnet else {
                skipped.push(Skipped::of(
                    p,
                    "no IPv4 subnet (ipsec carries IPv4 only)".into(),
                ));
                continue;
            };
            let key = ring.key.clone();
            let gens = ring.generations.entry(p.public_ip).or_default();
            let current = gens.iter().position(|g| {
                g.my_epoch == key.epoch()
                    && g.peer_epoch == *key_epoch
                    && g.peer_key == *public_key
                    && g.my_ip == me
            });
            // The generation of the current keys is always the last one: a
            // lease that goes back to older keys makes them new again.
            if let Some(i) = current.filter(|i| *i + 1 != gens.len()) {
                let mut g = gens.remove(i);
                g.seen = now;
                g.first = false;
                gens.push(g);
            }
            if current.is_none() {
                let peer_end = End {
                    ip: p.public_ip,
                    epoch: *key_epoch,
                };
                let psk = self.psk.as_ref().map(|k| k.as_slice());
                match derive_pair(&key, me, public_key, peer_end, psk) {
                    Ok(sas) => {
                        let first = gens.is_empty();
                        gens.push(Generation {
                            my_epoch: key.epoch(),
                            peer_epoch: *key_epoch,
                            peer_key: *public_key,
                            my_ip: me,
                            sas,
                            seen: now,
                            first,
                        })
                    }
                    Err(e) => {
                        // Like a lease that cannot be read: not programmed.
                        skipped.push(Skipped::of(p, e.to_string()));
                        continue;
                    }
                }
            }
            live.push(p.public_ip);
            let ready: Vec<Option<Instant>> =
                gens.iter().map(|g| self.ready_at(g, published)).collect();
            // Sending: the newest generation that may send; else the newest
            // one the peer can know (first contact: no older one exists).
            let newest_eligible = (0..gens.len()).rev().find(|&i| ready[i].is_some());
            let sending = (0..gens.len())
                .rev()
                .find(|&i| ready[i].is_some_and(|t| t <= now))
                .or(newest_eligible);
            // Receiving: every generation until a newer one has been
            // sending for the grace period.
            let keep: Vec<bool> = (0..gens.len())
                .map(|i| {
                    !(i + 1..gens.len())
                        .any(|j| ready[j].is_some_and(|t| t + self.timing.grace <= now))
                })
                .collect();
            let mut i = 0;
            gens.retain(|_| {
                let k = keep[i];
                i += 1;
                k
            });
            let sending = sending.and_then(|s| {
                let dropped_before = keep[..s].iter().filter(|k| !**k).count();
                keep[s].then(|| s - dropped_before)
            });
            let (pip, mip) = (IpAddr::V4(p.public_ip), IpAddr::V4(me));
            for g in gens.iter() {
                st.xfrm_states.insert(
                    XfrmSaId {
                        src: pip,
                        dst: mip,
                        spi: g.sas.inbound.spi,
                    },
                    XfrmSa {
                        reqid: WEFT_XFRM_REQID,
                        key: g.sas.inbound.key.clone(),
                        replay_window: REPLAY_WINDOW,
                    },
                );
            }
            if let Some(g) = sending.map(|s| &gens[s]) {
                let id = XfrmSaId {
                    src: mip,
                    dst: pip,
                    spi: g.sas.out.spi,
                };
                sends.push((p.public_ip, (id, g.my_epoch)));
                if let Some(kernel) = &kernel {
                    if kernel.contains(&id) || restored_unchecked {
                        burnt.insert(id, g.my_epoch);
                    }
                    // Sent with before, and gone since: putting it back
                    // would restart its sequence numbers.
                    if burnt.contains_key(&id) && !kernel.contains(&id) && lost.insert(id) {
                        newly_lost.push(p.public_ip);
                    }
                }
                if !lost.contains(&id) {
                    st.xfrm_states.insert(
                        id,
                        XfrmSa {
                            reqid: WEFT_XFRM_REQID,
                            key: g.sas.out.key.clone(),
                            replay_window: REPLAY_WINDOW,
                        },
                    );
                }
            }
            let (mine, theirs) = (IpNet::V4(my_subnet), IpNet::V4(their_subnet));
            let out = XfrmTmpl {
                src: mip,
                dst: pip,
                reqid: WEFT_XFRM_REQID,
            };
            let inbound = XfrmTmpl {
                src: pip,
                dst: mip,
                reqid: WEFT_XFRM_REQID,
            };
            st.xfrm_policies.insert(
                XfrmPolicyId {
                    dir: XfrmDir::Out,
                    src: mine,
                    dst: theirs,
                },
                out,
            );
            for dir in [XfrmDir::In, XfrmDir::Fwd] {
                st.xfrm_policies.insert(
                    XfrmPolicyId {
                        dir,
                        src: theirs,
                        dst: mine,
                    },
                    inbound,
                );
            }
            st.routes.insert(
                theirs,
                RouteTarget {
                    via: Some(pip),
                    dev: ext.clone(),
                    onlink: true,
                },
            );
        }
        // Peers that are gone take their SAs along at once.
        ring.generations.retain(|ip, _| live.contains(ip));
        ring.sending = sends.into_iter().collect();
        // An old key's SAs are forgotten once no generation of it is left:
        // none can be wanted again.
        let in_use: HashSet<u64> = ring
            .generations
            .values()
            .flatten()
            .map(|g| g.my_epoch)
            .chain([ring.key.epoch()])
            .collect();
        burnt.retain(|_, epoch| in_use.contains(epoch));
        lost.retain(|id| burnt.contains_key(id));
        ring.lost = lost;
        ring.burnt = burnt;
        if kernel.is_some() {
            ring.restored_unchecked = false;
        }
        ring.kernel = kernel;
        if !newly_lost.is_empty() {
            newly_lost.sort();
            self.want_rekey(&mut ring, RekeyCause::LostOutbound(newly_lost));
        }
        // A collision with an SA of an older key ends with its grace; one
        // of the current key's needs a new key.
        let epoch = ring.key.epoch();
        let mut collided: Vec<Ipv4Addr> = drop_inbound_spi_collisions(&mut st, IpAddr::V4(me))
            .into_iter()
            .filter_map(|id| match id.src {
                IpAddr::V4(v4) => Some((v4, id.spi)),
                IpAddr::V6(_) => None,
            })
            .filter(|(peer, spi)| {
                ring.generations.get(peer).is_some_and(|gens| {
                    gens.iter()
                        .any(|g| g.my_epoch == epoch && g.sas.inbound.spi == *spi)
                })
            })
            .map(|(peer, _)| peer)
            .collect();
        collided.dedup();
        if !collided.is_empty() {
            self.want_rekey(&mut ring, RekeyCause::SpiCollision(collided));
        }
        (st, skipped)
    }

    /// The next moment desired state changes by itself (an outbound switch
    /// or the end of a grace period), if any.
    pub fn next_change_at(&self, now: Instant) -> Option<Instant> {
        let ring = self.ring();
        let mut next: Option<Instant> = None;
        for gens in ring.generations.values() {
            if gens.len() < 2 {
                continue;
            }
            // A newer generation starts sending when ready, and ends the
            // older ones' grace after it.
            for g in &gens[1..] {
                if let Some(t) = self.ready_at(g, ring.published) {
                    for at in [t, t + self.timing.grace] {
                        if at > now {
                            next = Some(next.map_or(at, |n| n.min(at)));
                        }
                    }
                }
            }
        }
        next
    }
}

impl Backend for Ipsec {
    fn backend_type(&self) -> BackendType {
        BackendType::Ipsec
    }

    fn lease_data(&self, _local_name: &str) -> BackendData {
        let r = self.ring();
        BackendData::Ipsec {
            public_key: r.key.public(),
            key_epoch: r.key.epoch(),
        }
    }

    fn pod_mtu(&self, underlay_mtu: u32) -> u32 {
        pod_mtu(underlay_mtu)
    }

    fn desired(&self, local: &LocalNode, peers: &[&Peer]) -> (NetState, Vec<Skipped>) {
        self.desired_at(local, peers, Instant::now())
    }

    fn next_change(&self) -> Option<Instant> {
        self.next_change_at(Instant::now())
    }

    fn observed(&self, have: &NetState) {
        let mut guard = self.ring();
        let r = &mut *guard;
        let mut lost = Vec::new();
        for (peer, (id, epoch)) in &r.sending {
            if have.xfrm_states.contains_key(id) {
                r.burnt.insert(*id, *epoch);
            } else if r.burnt.contains_key(id) && r.lost.insert(*id) {
                lost.push(*peer);
            }
        }
        r.kernel = Some(have.xfrm_states.keys().copied().collect());
        if !lost.is_empty() {
            lost.sort();
            self.want_rekey(r, RekeyCause::LostOutbound(lost));
        }
    }
}
