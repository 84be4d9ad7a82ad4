//! The desired state of a [`PerPeer`] backend, kept between passes so that
//! a lease change costs work in proportion to it, not to the number of
//! peers.
//!
//! [`Plan::build`] computes everything, exactly as [`select`] followed by
//! the backend's `desired` does, and remembers how many leases claim each
//! subnet, public IP and backend claim (VTEP MAC). [`Plan::update`] then
//! takes changed leases one by one. A lease whose claims nobody else makes
//! cannot change what happens to any other lease (the older lease keeps a
//! claim only against another lease that makes it), so its part is taken
//! out and the new one put in. A change that touches a claim another lease
//! also makes is answered with `None`: the caller builds again, and the
//! rules that pick the older lease run over everything.
//!
//! [`select`]: crate::peer::select

use crate::backend::{programmable, with_peers, PerPeer};
use crate::local::LocalNode;
use crate::peer::{claims, fitting, judge, resolve, Candidate, Claim, HostView, Judged, Skipped};
use crate::state::{Dev, NetState};
use rustc_hash::FxHashMap as HashMap;
use std::collections::BTreeMap;
use std::sync::Arc;
use weft_config::BackendType;
use weft_lease::SubnetKey;

/// What a pass needs besides the leases; a plan holds for these only.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInputs {
    pub local: LocalNode,
    pub backend: BackendType,
    pub host: HostView,
}

/// The parts of the desired state a batch of lease changes takes out and
/// puts in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The changed peers' objects before.
    pub gone: NetState,
    /// Their objects now.
    pub want: NetState,
}

/// The desired state's bookkeeping between passes.
#[derive(Debug)]
pub struct Plan {
    inputs: PlanInputs,
    ext: Dev,
    /// How many leases make each claim: subnets and public IPs among the
    /// leases that fit on their own; the backend's claims among those
    /// that also keep their subnets and IP and that the backend can
    /// program.
    counts: HashMap<Claim, u32>,
    skipped: BTreeMap<SubnetKey, Skipped>,
    /// `skipped` as the status shows it, made again only after a change.
    lines: Option<Arc<Vec<String>>>,
    programmed: usize,
}

/// Why `update` gave up: the plan must be built again.
struct Contested;

impl Plan {
    /// Everything from scratch: the plan and the whole desired state, as
    /// [`crate::peer::select`] and [`crate::per_peer_desired`] make it
    /// (the same stages, counting claims on the way).
    pub fn build<'a>(
        b: &dyn PerPeer,
        inputs: PlanInputs,
        candidates: impl IntoIterator<Item = &'a Candidate>,
    ) -> (Plan, NetState) {
        let PlanInputs {
            local,
            backend,
            host,
        } = &inputs;
        let mut counts: HashMap<Claim, u32> = HashMap::default();
        let mut count = |c: Claim| *counts.entry(c).or_default() += 1;
        let mut skipped = Vec::new();
        let fit = fitting(candidates, local, *backend, host, &mut skipped);
        fit.iter()
            .flat_map(|p| claims(p, local))
            .for_each(&mut count);
        let kept = resolve(fit, |p| claims(p, local), &mut skipped);
        let able = programmable(b, local, kept, &mut skipped);
        able.iter().filter_map(|p| b.claims(p)).for_each(&mut count);
        let peers = resolve(able, |p| b.claims(p), &mut skipped);
        let st = with_peers(b, local, &peers);
        let plan = Plan {
            ext: local.ext.name.clone(),
            counts,
            skipped: skipped.into_iter().map(|s| (s.key, s)).collect(),
            lines: None,
            programmed: peers.len(),
            inputs,
        };
        (plan, st)
    }

    /// Whether the plan was built for this local node, backend and host.
    pub fn holds_for(&self, local: &LocalNode, backend: BackendType, host: &HostView) -> bool {
        let i = &self.inputs;
        i.backend == backend && i.local == *local && i.host == *host
    }

    /// Peers programmed.
    pub fn programmed(&self) -> usize {
        self.programmed
    }

    /// Leases not programmed, and why.
    pub fn skipped(&self) -> impl Iterator<Item = &Skipped> {
        self.skipped.values()
    }

    /// The skipped leases as lines (`Skipped`'s `Display`), the same
    /// `Arc` until they change.
    pub fn skip_lines(&mut self) -> Arc<Vec<String>> {
        let skipped = &self.skipped;
        self.lines
            .get_or_insert_with(|| Arc::new(skipped.values().map(|s| s.to_string()).collect()))
            .clone()
    }

    /// Takes in changed leases, each as (key, before, now), every key
    /// once. `None` if one of them touches a claim another lease makes:
    /// then the plan is gone, and the caller builds a new one.
    pub fn update<'a>(
        mut self,
        b: &dyn PerPeer,
        changes: impl IntoIterator<Item = (SubnetKey, Option<&'a Candidate>, Option<&'a Candidate>)>,
    ) -> Option<(Plan, Delta)> {
        let mut delta = Delta::default();
        for (key, before, now) in changes {
            if let Some(c) = before {
                self.take_out(b, key, c, &mut delta.gone).ok()?;
            }
            if let Some(c) = now {
                self.put_in(b, key, c, &mut delta.want).ok()?;
            }
        }
        Some((self, delta))
    }

    fn judge<'a>(&self, c: &'a Candidate) -> Judged<'a> {
        let i = &self.inputs;
        judge(c, &i.local, i.backend, &i.host)
    }

    /// Removes `claims`, each of which only this lease may make.
    fn release(&mut self, claims: impl IntoIterator<Item = Claim>) -> Result<(), Contested> {
        for c in claims {
            match self.counts.get(&c) {
                Some(1) => {
                    self.counts.remove(&c);
                }
                _ => return Err(Contested),
            }
        }
        Ok(())
    }

    /// Adds `claims`, none of which another lease may make.
    fn hold(&mut self, claims: impl IntoIterator<Item = Claim> + Clone) -> Result<(), Contested> {
        if claims
            .clone()
            .into_iter()
            .any(|c| self.counts.contains_key(&c))
        {
            return Err(Contested);
        }
        for c in claims {
            self.counts.insert(c, 1);
        }
        Ok(())
    }

    fn unskip(&mut self, key: &SubnetKey) {
        if self.skipped.remove(key).is_some() {
            self.lines = None;
        }
    }

    fn skip(&mut self, s: Skipped) {
        self.skipped.insert(s.key, s);
        self.lines = None;
    }

    fn take_out(
        &mut self,
        b: &dyn PerPeer,
        key: SubnetKey,
        c: &Candidate,
        gone: &mut NetState,
    ) -> Result<(), Contested> {
        let p = match self.judge(c) {
            Judged::Ours => return Ok(()),
            Judged::Refused(_) => {
                self.unskip(&key);
                return Ok(());
            }
            Judged::Fits(p) => p,
        };
        // Alone with its claims, it kept them.
        self.release(claims(p, &self.inputs.local))?;
        if b.refuse(&self.inputs.local, p).is_some() {
            self.unskip(&key);
            return Ok(());
        }
        self.release(b.claims(p))?;
        self.programmed -= 1;
        b.add(&self.inputs.local, &self.ext, p, gone);
        Ok(())
    }

    fn put_in(
        &mut self,
        b: &dyn PerPeer,
        key: SubnetKey,
        c: &Candidate,
        want: &mut NetState,
    ) -> Result<(), Contested> {
        let p = match self.judge(c) {
            Judged::Ours => return Ok(()),
            Judged::Refused(s) => {
                self.skip(s);
                return Ok(());
            }
            Judged::Fits(p) => p,
        };
        debug_assert_eq!(p.key, key);
        self.hold(claims(p, &self.inputs.local))?;
        if let Some(reason) = b.refuse(&self.inputs.local, p) {
            self.skip(Skipped::of(p, reason));
            return Ok(());
        }
        self.hold(b.claims(p))?;
        self.programmed += 1;
        b.add(&self.inputs.local, &self.ext, p, want);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::per_peer_desired;
    use crate::local::ExternalIface;
    use crate::peer::{select, Peer};
    use crate::{HostGw, Vxlan};
    use weft_config::{NetworkConfig, VxlanConfig};
    use weft_lease::{BackendData, MacAddr};

    const V4: &str = r#"{"Network":"10.244.0.0/16"}"#;
    const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd5e:7:1::/48","IPv6SubnetLen":64}"#;

    fn inputs(backend: BackendType, network: &str) -> PlanInputs {
        let key = if network == DUAL {
            "10.244.1.0-24&fd5e:7:1:1::-64"
        } else {
            "10.244.1.0-24"
        };
        let local = LocalNode::new(
            "host-1",
            key.parse().unwrap(),
            "198.18.0.1".parse().unwrap(),
            ExternalIface {
                name: "eth0".into(),
                index: 2,
                mtu: 1500,
                addr: "198.18.0.1/24".parse().unwrap(),
            },
            Arc::new(NetworkConfig::parse(network).unwrap()),
        );
        PlanInputs {
            local,
            backend,
            host: HostView::default(),
        }
    }

    /// A small generator, so the test is the same on every run.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        fn one_in(&mut self, n: u64) -> bool {
            self.below(n) == 0
        }
    }

    /// A lease at subnet `k` (k = 1 is the local node's), with public IPs,
    /// MACs and IPv6 subnets drawn from small pools so that they collide
    /// now and then; now and then one names the local node, is of another
    /// backend or VNI, cannot be read, is off the host's L2, or has an IPv6
    /// subnet of the wrong length.
    fn candidate(rng: &mut Rng, k: u8, revision: i64, backend: BackendType) -> Candidate {
        let key: SubnetKey = format!("10.244.{k}.0-24").parse().unwrap();
        let node = if rng.one_in(30) {
            "host-1".to_string()
        } else {
            format!("host-{}", 100 + u32::from(k))
        };
        if rng.one_in(25) {
            return Err(Skipped {
                key,
                node: Some(node),
                reason: "unreadable".into(),
            });
        }
        let ip = 2 + rng.below(250) as u8;
        let public_ip = if rng.one_in(20) {
            format!("198.18.7.{ip}")
        } else {
            format!("198.18.0.{ip}")
        };
        let subnet6 = match rng.below(10) {
            0 => None,
            1 => Some(format!("fd5e:7:1:{:x}::/64", rng.below(80) + 1)),
            2 => Some(format!("fd5e:7:1:{k:x}00::/56")),
            _ => Some(format!("fd5e:7:1:{k:x}::/64")),
        };
        let vxlan = BackendData::Vxlan {
            vni: if rng.one_in(20) { 2 } else { 1 },
            vtep_mac: MacAddr([2, 0, 0, 0, 0, rng.below(250) as u8]),
        };
        let backend = match (backend, rng.one_in(20)) {
            (BackendType::Vxlan, false) | (_, true) => vxlan,
            _ => BackendData::HostGw,
        };
        Ok(Peer {
            key,
            node: Some(node),
            subnet: key.ipv4(),
            subnet6: subnet6.map(|s| s.parse().unwrap()),
            public_ip: public_ip.parse().unwrap(),
            public_ipv6: (!rng.one_in(5)).then(|| format!("fd5e:7:0:0::{ip:x}").parse().unwrap()),
            backend,
            revision,
        })
    }

    fn skipped(plan: &Plan) -> Vec<(SubnetKey, String)> {
        plan.skipped().map(|s| (s.key, s.reason.clone())).collect()
    }

    /// Random lease changes, a few at a time, handed over as the lease
    /// table's log does (first value per key, in the order they came):
    /// after each batch the plan, updated or built again when it says so,
    /// and the state patched with its deltas are what a plan built from
    /// scratch gives, and what `select` and the backend's `desired` give.
    fn updates_match_a_fresh_build(
        b: &dyn PerPeer,
        backend: BackendType,
        network: &str,
        seed: u64,
    ) {
        let mut rng = Rng(seed);
        let mut table: BTreeMap<SubnetKey, Candidate> = BTreeMap::new();
        let (mut plan, mut state) = Plan::build(b, inputs(backend, network), table.values());
        let (mut updated, mut rebuilt, mut v6_routes) = (0, 0, 0);
        for step in 0..3000i64 {
            let mut log: Vec<(SubnetKey, Option<Candidate>)> = Vec::new();
            for _ in 0..=rng.below(3) {
                let k = rng.below(80) as u8 + 1;
                let key: SubnetKey = format!("10.244.{k}.0-24").parse().unwrap();
                let now = (!rng.one_in(3)).then(|| candidate(&mut rng, k, step / 7, backend));
                let before = match &now {
                    Some(c) => table.insert(key, c.clone()),
                    None => table.remove(&key),
                };
                if !log.iter().any(|(k, _)| *k == key) {
                    log.push((key, before));
                }
            }
            let changes = log
                .iter()
                .map(|(k, before)| (*k, before.as_ref(), table.get(k)))
                .filter(|(_, before, now)| before != now);
            match plan.update(b, changes) {
                Some((p, delta)) => {
                    updated += 1;
                    plan = p;
                    state.patch(&delta.gone, &delta.want);
                }
                None => {
                    rebuilt += 1;
                    (plan, state) = Plan::build(b, inputs(backend, network), table.values());
                }
            }
            let (mut fresh, want) = Plan::build(b, inputs(backend, network), table.values());
            assert_eq!(state, want, "step {step}");
            v6_routes += want.routes.keys().filter(|d| d.addr().is_ipv6()).count();
            assert_eq!(plan.programmed(), fresh.programmed(), "step {step}");
            assert_eq!(skipped(&plan), skipped(&fresh), "step {step}");
            assert_eq!(plan.skip_lines(), fresh.skip_lines(), "step {step}");
            let i = inputs(backend, network);
            let (peers, mut skips) = select(table.values(), &i.local, backend, &i.host);
            let (whole, more) = per_peer_desired(b, &i.local, &peers);
            skips.extend(more);
            assert_eq!(whole, want, "step {step}");
            let mut skips: Vec<_> = skips.into_iter().map(|s| (s.key, s.reason)).collect();
            skips.sort();
            assert_eq!(skips, skipped(&fresh), "step {step}");
        }
        // Both ways were taken, often, and IPv6 was there to take.
        assert!(
            updated > 1000 && rebuilt > 100,
            "{updated} updated, {rebuilt} built again"
        );
        assert_eq!(v6_routes > 0, network == DUAL, "{v6_routes} IPv6 routes");
    }

    #[test]
    fn vxlan_updates_match_a_fresh_build() {
        let b = Vxlan::new(VxlanConfig::default());
        updates_match_a_fresh_build(&b, BackendType::Vxlan, V4, 0x5eed);
        updates_match_a_fresh_build(&b, BackendType::Vxlan, DUAL, 0x5eee);
    }

    #[test]
    fn vxlan_direct_routing_updates_match_a_fresh_build() {
        let cfg = VxlanConfig {
            direct_routing: true,
            ..VxlanConfig::default()
        };
        let b = Vxlan::new(cfg);
        updates_match_a_fresh_build(&b, BackendType::Vxlan, V4, 0xd1);
        updates_match_a_fresh_build(&b, BackendType::Vxlan, DUAL, 0xd2);
    }

    #[test]
    fn host_gw_updates_match_a_fresh_build() {
        updates_match_a_fresh_build(&HostGw, BackendType::HostGw, V4, 0x9e);
        updates_match_a_fresh_build(&HostGw, BackendType::HostGw, DUAL, 0x9f);
    }

    /// Host `k`'s vxlan lease with public IP 198.18.0.`ip` and a MAC
    /// ending in `mac`.
    fn vxlan_peer(k: u8, ip: u8, mac: u8) -> Candidate {
        let key: SubnetKey = format!("10.244.{k}.0-24").parse().unwrap();
        Ok(Peer {
            key,
            node: Some(format!("host-{k}")),
            subnet: key.ipv4(),
            subnet6: None,
            public_ip: format!("198.18.0.{ip}").parse().unwrap(),
            public_ipv6: None,
            backend: BackendData::Vxlan {
                vni: 1,
                vtep_mac: MacAddr([2, 0, 0, 0, 0, mac]),
            },
            revision: 1,
        })
    }

    #[test]
    fn an_uncontested_change_is_taken_alone_and_a_contested_one_is_not() {
        let b = Vxlan::new(VxlanConfig::default());
        let table: Vec<Candidate> = (2..6).map(|k| vxlan_peer(k, k, k)).collect();
        let (plan, _) = Plan::build(&b, inputs(BackendType::Vxlan, V4), &table);
        assert_eq!(plan.programmed(), 4);
        let new = vxlan_peer(9, 9, 9);
        let key = new.as_ref().unwrap().key;
        let (plan, delta) = plan
            .update(&b, [(key, None, Some(&new))])
            .expect("nothing else claims its subnet, IP or MAC");
        assert_eq!(delta.want.object_count(), 3, "{delta:?}");
        assert_eq!(delta.gone.object_count(), 0);
        assert_eq!(plan.programmed(), 5);
        // Host 3's MAC, again: the older lease keeps it, which takes
        // every lease into account.
        let clone = vxlan_peer(10, 10, 3);
        let key = clone.as_ref().unwrap().key;
        assert!(plan.update(&b, [(key, None, Some(&clone))]).is_none());
    }
}
