//! The kinds of kernel object weft owns, one module each: the object's
//! type, the changes that make and remove it (with the iproute2 command
//! each stands for), how the kernel ([`crate::NetlinkDataplane`]) and the
//! fake ([`crate::FakeDataplane`]) apply them, and how the kernel's are
//! read back.
//!
//! A kind's objects are a [`Table`] in [`NetState`], keyed as the kernel
//! keys them. [`Kind`] is what the one declarative diff ([`crate::diff`])
//! and the changed-only pass ([`NetState::patch`]) need to know of a kind;
//! devices ([`link`]) are the one kind with more rules (an object lives on
//! its device and goes with it).
//!
//! A new kind is a module here, its table in [`NetState`], its variant in
//! [`Change`], and its line in each place that goes through every kind in
//! order: the diff, observing, applying (netlink and fake).

use crate::dataplane::{Errno, Failure};
use crate::state::{Change, Dev, NetState};
use rustc_hash::FxHashMap;
use std::fmt::Debug;
use std::hash::Hash;

pub mod address;
pub mod fallback;
pub mod fdb;
pub mod link;
pub mod neighbour;
pub mod route;
pub mod vxlan;
pub mod wireguard;
pub mod xfrm_policy;
pub mod xfrm_state;

/// One kind's objects by key. FxHash: fast for these small keys, which
/// come from controller-checked leases, not from strangers; a pass with
/// thousands of peers builds and compares them, in no order.
pub type Table<K> = FxHashMap<<K as Kind>::Key, <K as Kind>::Value>;

/// What the shared diff needs to know of a kind of object.
pub trait Kind {
    /// What the kernel identifies an object by.
    type Key: Clone + Eq + Hash + Debug;
    /// The rest of it: an object whose value differs is set again.
    type Value: Clone + PartialEq + Debug;

    /// This kind's table in `st`.
    fn table(st: &NetState) -> &Table<Self>;
    fn table_mut(st: &mut NetState) -> &mut Table<Self>;

    /// The weft device the object lives on, if it lives on one: it is
    /// gone with its device, and made again when the device is.
    fn dev<'a>(key: &'a Self::Key, value: &'a Self::Value) -> Option<&'a Dev>;

    /// Adds to `out` the change(s) that make `want`; `have` is what the kernel has under
    /// the same key (`None`: nothing, or nothing that outlives the pass).
    fn set(key: &Self::Key, want: &Self::Value, have: Option<&Self::Value>, out: &mut Vec<Change>);

    /// The change that removes `have`.
    fn del(key: &Self::Key, have: &Self::Value) -> Change;
}

/// Adds to `out` what makes `desired`'s objects of kind `K` exist as they
/// are there. `gone`: devices recreated in this pass, whose objects are
/// gone with the old device.
pub(crate) fn add<K: Kind>(
    desired: &NetState,
    observed: &NetState,
    gone: &dyn Fn(&Dev) -> bool,
    out: &mut Vec<Change>,
) {
    let lost = |k: &K::Key, v: &K::Value| K::dev(k, v).is_some_and(gone);
    let have_all = K::table(observed);
    for (k, want) in K::table(desired) {
        // What is on a device made again is not there any more; `want` on
        // such a device is made whatever the old one had.
        let have = have_all.get(k).filter(|h| !lost(k, h));
        if lost(k, want) || have != Some(want) {
            K::set(k, want, have, out);
        }
    }
}

/// Adds to `out` the removal of `observed`'s objects of kind `K` that
/// `desired` does not have, but for those on a device that goes anyway
/// (`leaving`).
pub(crate) fn remove<K: Kind>(
    desired: &NetState,
    observed: &NetState,
    leaving: &dyn Fn(&Dev) -> bool,
    out: &mut Vec<Change>,
) {
    let want = K::table(desired);
    for (k, have) in K::table(observed) {
        if !want.contains_key(k) && !K::dev(k, have).is_some_and(leaving) {
            out.push(K::del(k, have));
        }
    }
}

/// `from`'s objects of kind `K` with a key that `a` or `b` has.
pub(crate) fn pick<K: Kind>(from: &NetState, a: &NetState, b: &NetState) -> Table<K> {
    let from = K::table(from);
    K::table(a)
        .keys()
        .chain(K::table(b).keys())
        .filter_map(|k| from.get_key_value(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Takes `gone`'s keys of kind `K` out of `into`, then puts `want`'s in.
pub(crate) fn swap<K: Kind>(into: &mut NetState, gone: &NetState, want: &NetState) {
    let t = K::table_mut(into);
    for k in K::table(gone).keys() {
        t.remove(k);
    }
    t.extend(K::table(want).iter().map(|(k, v)| (k.clone(), v.clone())));
}

/// How the fake kernel answers a change to an object on a device that
/// does not exist.
pub(crate) fn no_device() -> Failure {
    Failure::of(Errno::ENODEV)
}
