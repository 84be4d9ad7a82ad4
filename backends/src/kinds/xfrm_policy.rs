//! XFRM policies weft owns: per peer, the ones whose single template has
//! weft's reqid (which traffic goes into which SA); and the dropping ones
//! with [`WEFT_BLOCK_PRIORITY`], below them, so pod traffic no peer's
//! policy encrypts is never sent in the clear.

use super::xfrm_state::WEFT_XFRM_REQID;
use super::{Kind, Table};
use crate::dataplane::{Errno, Failure};
use crate::netlink::Applying;
use crate::state::{Change, Dev, NetState};
use crate::xfrm::{err_text, failure, gone_ok, ip_of, net_of, IPPROTO_ESP, XFRM_MODE_TUNNEL};
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_xfrm::{UserTemplate, XfrmAttrs};
use std::fmt;
use std::net::IpAddr;

/// XFRM_POLICY_BLOCK: drop what matches.
const XFRM_POLICY_BLOCK: u8 = 1;

/// Priority of weft's per-peer policies (the kernel's default for `ip
/// xfrm policy`).
const POLICY_PRIORITY: u32 = 0;

/// The priority of weft's dropping policies ("weft" in ASCII, as the reqid):
/// larger than the per-peer policies' (0), so those match first; it also
/// tells weft's block policies from others.
pub const WEFT_BLOCK_PRIORITY: u32 = 0x7765_6674;

/// Direction of an XFRM policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XfrmDir {
    In,
    Out,
    Fwd,
}

impl XfrmDir {
    /// The kernel's number (XFRM_POLICY_IN/OUT/FWD).
    pub fn kernel(self) -> u8 {
        match self {
            XfrmDir::In => 0,
            XfrmDir::Out => 1,
            XfrmDir::Fwd => 2,
        }
    }

    /// From the kernel's number.
    pub fn from_kernel(d: u8) -> Option<Self> {
        match d {
            0 => Some(XfrmDir::In),
            1 => Some(XfrmDir::Out),
            2 => Some(XfrmDir::Fwd),
            _ => None,
        }
    }
}

impl fmt::Display for XfrmDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XfrmDir::In => "in",
            XfrmDir::Out => "out",
            XfrmDir::Fwd => "fwd",
        })
    }
}

/// An XFRM policy's identity: direction and selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XfrmPolicyId {
    pub dir: XfrmDir,
    pub src: IpNet,
    pub dst: IpNet,
}

/// The one template of a weft policy: ESP in tunnel mode between two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XfrmTmpl {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub reqid: u32,
}

/// A per-peer policy: identity -> template.
#[derive(Debug)]
pub struct XfrmPolicy;

impl Kind for XfrmPolicy {
    type Key = XfrmPolicyId;
    type Value = XfrmTmpl;

    fn table(st: &NetState) -> &Table<Self> {
        &st.xfrm_policies
    }
    fn table_mut(st: &mut NetState) -> &mut Table<Self> {
        &mut st.xfrm_policies
    }
    fn dev<'a>(_: &'a XfrmPolicyId, _: &'a XfrmTmpl) -> Option<&'a Dev> {
        None
    }
    fn set(id: &XfrmPolicyId, tmpl: &XfrmTmpl, _: Option<&XfrmTmpl>, out: &mut Vec<Change>) {
        out.push(Change::XfrmPolicy(XfrmPolicyChange::Set {
            id: *id,
            tmpl: *tmpl,
        }));
    }
    fn del(id: &XfrmPolicyId, _: &XfrmTmpl) -> Change {
        Change::XfrmPolicy(XfrmPolicyChange::Del { id: *id })
    }
}

/// A dropping policy (action block, priority [`WEFT_BLOCK_PRIORITY`]).
#[derive(Debug)]
pub struct XfrmBlock;

impl Kind for XfrmBlock {
    type Key = XfrmPolicyId;
    type Value = ();

    fn table(st: &NetState) -> &Table<Self> {
        &st.xfrm_blocks
    }
    fn table_mut(st: &mut NetState) -> &mut Table<Self> {
        &mut st.xfrm_blocks
    }
    fn dev<'a>(_: &'a XfrmPolicyId, _: &'a ()) -> Option<&'a Dev> {
        None
    }
    fn set(id: &XfrmPolicyId, _: &(), _: Option<&()>, out: &mut Vec<Change>) {
        out.push(Change::XfrmPolicy(XfrmPolicyChange::AddBlock { id: *id }));
    }
    fn del(id: &XfrmPolicyId, _: &()) -> Change {
        Change::XfrmPolicy(XfrmPolicyChange::DelBlock { id: *id })
    }
}

/// A change to a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XfrmPolicyChange {
    /// Adds the policy or updates its template.
    Set {
        id: XfrmPolicyId,
        tmpl: XfrmTmpl,
    },
    Del {
        id: XfrmPolicyId,
    },
    /// A dropping policy ([`NetState::xfrm_blocks`]).
    AddBlock {
        id: XfrmPolicyId,
    },
    DelBlock {
        id: XfrmPolicyId,
    },
}

impl fmt::Display for XfrmPolicyChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XfrmPolicyChange::Set { id, tmpl } => write!(
                f,
                "ip xfrm policy update src {} dst {} dir {} tmpl src {} dst {} proto esp reqid {} mode tunnel",
                id.src, id.dst, id.dir, tmpl.src, tmpl.dst, tmpl.reqid
            ),
            XfrmPolicyChange::Del { id } => write!(
                f,
                "ip xfrm policy del src {} dst {} dir {}",
                id.src, id.dst, id.dir
            ),
            XfrmPolicyChange::AddBlock { id } => write!(
                f,
                "ip xfrm policy add src {} dst {} dir {} priority {WEFT_BLOCK_PRIORITY} action block",
                id.src, id.dst, id.dir
            ),
            XfrmPolicyChange::DelBlock { id } => write!(
                f,
                "ip xfrm policy del src {} dst {} dir {} (action block)",
                id.src, id.dst, id.dir
            ),
        }
    }
}

impl XfrmPolicyChange {
    pub(crate) fn fake(&self, st: &mut NetState) -> Result<(), Failure> {
        match self {
            XfrmPolicyChange::Set { id, tmpl } => {
                st.xfrm_policies.insert(*id, *tmpl);
            }
            XfrmPolicyChange::Del { id } => {
                st.xfrm_policies
                    .remove(id)
                    .ok_or(Failure::of(Errno::ENOENT))?;
            }
            XfrmPolicyChange::AddBlock { id } => {
                if st.xfrm_blocks.insert(*id, ()).is_some() {
                    return Err(Failure::of(Errno::EEXIST));
                }
            }
            XfrmPolicyChange::DelBlock { id } => {
                st.xfrm_blocks
                    .remove(id)
                    .ok_or(Failure::of(Errno::ENOENT))?;
            }
        }
        Ok(())
    }

    pub(crate) async fn apply(&self, k: &Applying<'_>) -> Result<(), Failure> {
        let h = k.xfrm()?;
        match self {
            XfrmPolicyChange::Set { id, tmpl } => h
                .policy()
                .update(
                    id.src.addr(),
                    id.src.prefix_len(),
                    id.dst.addr(),
                    id.dst.prefix_len(),
                )
                .direction(id.dir.kernel())
                .priority(POLICY_PRIORITY)
                .add_template(template(tmpl))
                .execute()
                .await
                .map_err(|e| failure(&e)),
            XfrmPolicyChange::AddBlock { id } => h
                .policy()
                .add(
                    id.src.addr(),
                    id.src.prefix_len(),
                    id.dst.addr(),
                    id.dst.prefix_len(),
                )
                .direction(id.dir.kernel())
                .priority(WEFT_BLOCK_PRIORITY)
                .action(XFRM_POLICY_BLOCK)
                .execute()
                .await
                .map_err(|e| failure(&e)),
            XfrmPolicyChange::Del { id } | XfrmPolicyChange::DelBlock { id } => gone_ok(
                h.policy()
                    .delete(
                        id.src.addr(),
                        id.src.prefix_len(),
                        id.dst.addr(),
                        id.dst.prefix_len(),
                    )
                    .direction(id.dir.kernel())
                    .execute()
                    .await,
            ),
        }
    }
}

fn template(t: &XfrmTmpl) -> UserTemplate {
    let mut u = UserTemplate::default();
    u.source(&t.src);
    u.destination(&t.dst);
    u.protocol(IPPROTO_ESP);
    u.mode(XFRM_MODE_TUNNEL);
    u.reqid(t.reqid);
    // Any algorithm: the SA decides.
    u.aalgos = u32::MAX;
    u.ealgos = u32::MAX;
    u.calgos = u32::MAX;
    u
}

/// Reads weft's policies into `st`: those whose (single) template has
/// weft's reqid, and the dropping ones with weft's priority.
pub(crate) async fn read(h: &xfrmnetlink::Handle, st: &mut NetState) -> Result<(), String> {
    let mut dump = Box::pin(h.policy().get_dump().execute());
    while let Some(m) = dump.try_next().await.map_err(|e| err_text(&e))? {
        let info = &m.user_policy_info;
        let Some(dir) = XfrmDir::from_kernel(info.direction) else {
            continue;
        };
        let sel = &info.selector;
        let (Some(src), Some(dst)) = (
            net_of(&sel.saddr, sel.family, sel.prefixlen_s),
            net_of(&sel.daddr, sel.family, sel.prefixlen_d),
        ) else {
            continue;
        };
        let id = XfrmPolicyId { dir, src, dst };
        if info.action == XFRM_POLICY_BLOCK && info.priority == WEFT_BLOCK_PRIORITY {
            st.xfrm_blocks.insert(id, ());
            continue;
        }
        let tmpls: Vec<&UserTemplate> = m
            .nlas
            .iter()
            .filter_map(|a| match a {
                XfrmAttrs::Template(t) => Some(t.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        let [t] = tmpls.as_slice() else { continue };
        if t.reqid != WEFT_XFRM_REQID {
            continue;
        }
        st.xfrm_policies.insert(
            id,
            XfrmTmpl {
                src: ip_of(&t.saddr, t.family),
                dst: ip_of(&t.id.daddr, t.family),
                reqid: t.reqid,
            },
        );
    }
    Ok(())
}
