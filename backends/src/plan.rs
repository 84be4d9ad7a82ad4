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

use crate::backend::PerPeer;
use crate::local::LocalNode;
use crate::peer::{claims, judge, resolve, Candidate, Claim, HostView, Judged, Peer, Skipped};
use crate::state::{Dev, NetState};
use rustc_hash::FxHashMap as HashMap;
use std::collections::BTreeMap;
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
    programmed: usize,
}

/// Why `update` gave up: the plan must be built again.
struct Contested;

impl Plan {
    /// Everything from scratch: the plan and the whole desired state.
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
        let mut skipped = Vec::new();
        let mut fitting = Vec::new();
        for c in candidates {
            match judge(c, local, *backend, host) {
                Judged::Ours => {}
                Judged::Refused(s) => skipped.push(s),
                Judged::Fits(p) => {
                    for c in claims(p) {
                        *counts.entry(c).or_default() += 1;
                    }
                    fitting.push(p)
                }
            }
        }
        let mut programmable = Vec::with_capacity(fitting.len());
        for p in resolve(fitting, claims, &mut skipped) {
            match b.refuse(local, p) {
                Some(reason) => skipped.push(Skipped::of(p, reason)),
                None => {
                    if let Some(c) = b.claims(p) {
                        *counts.entry(c).or_default() += 1;
                    }
                    programmable.push(p);
                }
            }
        }
        let peers = resolve(programmable, |p| b.claims(p), &mut skipped);
        let ext = local.ext.name.clone();
        let mut st = b.base(local);
        for p in &peers {
            b.add(local, &ext, p, &mut st);
        }
        let plan = Plan {
            ext,
            counts,
            skipped: skipped.into_iter().map(|s| (s.key, s)).collect(),
            programmed: peers.len(),
            inputs,
        };
        (plan, st)
    }

    /// What the plan was built for.
    pub fn inputs(&self) -> &PlanInputs {
        &self.inputs
    }

    /// Peers programmed.
    pub fn programmed(&self) -> usize {
        self.programmed
    }

    /// Leases not programmed, and why.
    pub fn skipped(&self) -> impl Iterator<Item = &Skipped> {
        self.skipped.values()
    }

    /// Takes in changed leases, each as (key, before, now), every key
    /// once. `None` if one of them touches a claim another lease makes:
    /// the plan is then spent, and the caller builds a new one.
    pub fn update<'a>(
        &mut self,
        b: &dyn PerPeer,
        changes: impl IntoIterator<Item = (SubnetKey, Option<&'a Candidate>, Option<&'a Candidate>)>,
    ) -> Option<Delta> {
        let mut delta = Delta::default();
        for (key, before, now) in changes {
            if let Some(c) = before {
                self.take_out(b, key, c, &mut delta.gone).ok()?;
            }
            if let Some(c) = now {
                self.put_in(b, key, c, &mut delta.want).ok()?;
            }
        }
        Some(delta)
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

    fn take_out(
        &mut self,
        b: &dyn PerPeer,
        key: SubnetKey,
        c: &Candidate,
        gone: &mut NetState,
    ) -> Result<(), Contested> {
        let p: &Peer = match self.judge(c) {
            Judged::Ours => return Ok(()),
            Judged::Refused(_) => {
                self.skipped.remove(&key);
                return Ok(());
            }
            Judged::Fits(p) => p,
        };
        // Alone with its claims, it kept them.
        self.release(claims(p))?;
        if b.refuse(&self.inputs.local, p).is_some() {
            self.skipped.remove(&key);
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
        let p: &Peer = match self.judge(c) {
            Judged::Ours => return Ok(()),
            Judged::Refused(s) => {
                self.skipped.insert(key, s);
                return Ok(());
            }
            Judged::Fits(p) => p,
        };
        self.hold(claims(p))?;
        if let Some(reason) = b.refuse(&self.inputs.local, p) {
            self.skipped.insert(key, Skipped::of(p, reason));
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
    use crate::peer::select;
    use crate::{HostGw, Vxlan};
    use std::sync::Arc;
    use weft_config::{NetworkConfig, VxlanConfig};
    use weft_lease::{BackendData, MacAddr};

    fn local() -> LocalNode {
        LocalNode::new(
            "host-1",
            "10.244.1.0-24".parse().unwrap(),
            "198.18.0.1".parse().unwrap(),
            ExternalIface {
                name: "eth0".into(),
                index: 2,
                mtu: 1500,
                addr: "198.18.0.1/24".parse().unwrap(),
            },
            Arc::new(NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap()),
        )
    }

    fn inputs(backend: BackendType) -> PlanInputs {
        PlanInputs {
            local: local(),
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
    }

    /// A lease at subnet `k` drawn from few public IPs and MACs, so they
    /// collide now and then, with now and then one that is ours, of
    /// another VNI, unreadable, or off the host's L2.
    fn candidate(rng: &mut Rng, k: u8, revision: i64) -> Candidate {
        let key: SubnetKey = format!("10.244.{k}.0-24").parse().unwrap();
        let node = match rng.below(30) {
            0 => "host-1".to_string(),
            _ => format!("host-{}", 100 + u32::from(k)),
        };
        if rng.below(25) == 0 {
            return Err(Skipped {
                key,
                node: Some(node),
                reason: "unreadable".into(),
            });
        }
        let ip = 2 + rng.below(250) as u8;
        let public_ip = if rng.below(20) == 0 {
            format!("198.18.7.{ip}")
        } else {
            format!("198.18.0.{ip}")
        };
        Ok(Peer {
            key,
            node: Some(node),
            subnet: key.ipv4().unwrap(),
            subnet6: None,
            public_ip: public_ip.parse().unwrap(),
            public_ipv6: None,
            backend: BackendData::Vxlan {
                vni: if rng.below(20) == 0 { 2 } else { 1 },
                vtep_mac: MacAddr([2, 0, 0, 0, 0, rng.below(250) as u8]),
            },
            revision,
        })
    }

    fn skipped(plan: &Plan) -> Vec<(SubnetKey, String)> {
        plan.skipped().map(|s| (s.key, s.reason.clone())).collect()
    }

    /// Random lease changes, a few at a time: after each batch the plan,
    /// updated or built again when it says so, and the state patched with
    /// its deltas are what a plan built from scratch gives, and what
    /// `select` and the backend's `desired` give.
    fn updates_match_a_fresh_build(b: &dyn PerPeer, backend: BackendType, seed: u64) {
        let mut rng = Rng(seed);
        let mut table: BTreeMap<SubnetKey, Candidate> = BTreeMap::new();
        let (mut plan, mut state) = Plan::build(b, inputs(backend), table.values());
        let (mut updated, mut rebuilt) = (0, 0);
        for step in 0..3000i64 {
            let mut changes = BTreeMap::new();
            for _ in 0..=rng.below(3) {
                let k = rng.below(80) as u8 + 2;
                let key: SubnetKey = format!("10.244.{k}.0-24").parse().unwrap();
                let before = table.get(&key).cloned();
                let now = (rng.below(3) != 0).then(|| candidate(&mut rng, k, step));
                match &now {
                    Some(c) => table.insert(key, c.clone()),
                    None => table.remove(&key),
                };
                changes.entry(key).or_insert(before);
            }
            let list: Vec<_> = changes
                .iter()
                .map(|(k, before)| (*k, before.as_ref(), table.get(k)))
                .collect();
            match plan.update(b, list) {
                Some(delta) => {
                    updated += 1;
                    state.patch(&delta.gone, &delta.want);
                }
                None => {
                    rebuilt += 1;
                    (plan, state) = Plan::build(b, inputs(backend), table.values());
                }
            }
            let (fresh, want) = Plan::build(b, inputs(backend), table.values());
            assert_eq!(state, want, "step {step}");
            assert_eq!(plan.programmed(), fresh.programmed(), "step {step}");
            assert_eq!(skipped(&plan), skipped(&fresh), "step {step}");
            let i = inputs(backend);
            let (peers, mut skips) = select(table.values(), &i.local, backend, &i.host);
            let (whole, more) = per_peer_desired(b, &i.local, &peers);
            skips.extend(more);
            assert_eq!(whole, want, "step {step}");
            let mut skips: Vec<_> = skips.into_iter().map(|s| (s.key, s.reason)).collect();
            skips.sort();
            assert_eq!(skips, skipped(&fresh), "step {step}");
        }
        // Both ways were taken, often.
        assert!(
            updated > 1000 && rebuilt > 100,
            "{updated} updated, {rebuilt} built again"
        );
    }

    #[test]
    fn vxlan_updates_match_a_fresh_build() {
        updates_match_a_fresh_build(
            &Vxlan::new(VxlanConfig::default()),
            BackendType::Vxlan,
            0x5eed,
        );
    }

    #[test]
    fn vxlan_direct_routing_updates_match_a_fresh_build() {
        let cfg = VxlanConfig {
            direct_routing: true,
            ..VxlanConfig::default()
        };
        updates_match_a_fresh_build(&Vxlan::new(cfg), BackendType::Vxlan, 0xd1);
    }

    #[test]
    fn host_gw_updates_match_a_fresh_build() {
        // Judged as the vxlan leases they are, so they fit; host-gw then
        // refuses those whose public IP is off its L2.
        updates_match_a_fresh_build(&HostGw, BackendType::Vxlan, 0x9e);
    }

    #[test]
    fn an_uncontested_change_is_taken_alone_and_a_contested_one_is_not() {
        let b = Vxlan::new(VxlanConfig::default());
        let mut rng = Rng(7);
        let mut table: BTreeMap<SubnetKey, Candidate> = BTreeMap::new();
        let peer = |k: u8, ip: u8, mac: u8| -> Candidate {
            let mut c = candidate(&mut Rng(1), k, 1);
            if let Ok(p) = &mut c {
                p.node = Some(format!("host-{k}"));
                p.public_ip = format!("198.18.0.{ip}").parse().unwrap();
                p.backend = BackendData::Vxlan {
                    vni: 1,
                    vtep_mac: MacAddr([2, 0, 0, 0, 0, mac]),
                };
            }
            c
        };
        let _ = rng.below(1);
        for k in 2..6 {
            let c = peer(k, k, k);
            table.insert(c.as_ref().unwrap().key, c);
        }
        let (mut plan, _) = Plan::build(&b, inputs(BackendType::Vxlan), table.values());
        assert_eq!(plan.programmed(), 4);
        let new = peer(9, 9, 9);
        let delta = plan
            .update(&b, [(new.as_ref().unwrap().key, None, Some(&new))])
            .expect("nothing else claims its subnet, IP or MAC");
        assert_eq!(delta.want.object_count(), 3, "{delta:?}");
        assert_eq!(delta.gone.object_count(), 0);
        assert_eq!(plan.programmed(), 5);
        // Host 3's MAC, again: the older lease keeps it, which takes
        // every lease into account.
        let clone = peer(10, 10, 3);
        assert!(plan
            .update(&b, [(clone.as_ref().unwrap().key, None, Some(&clone))])
            .is_none());
    }
}
