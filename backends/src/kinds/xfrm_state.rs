//! ESP security associations (XFRM states) in tunnel mode, with weft's
//! reqid ([`WEFT_XFRM_REQID`]): the ipsec backend's keys in the kernel.

use super::{Kind, Table};
use crate::dataplane::{Errno, Failure};
use crate::netlink::Applying;
use crate::state::{Change, Dev, NetState};
use crate::xfrm::{err_text, failure, gone_ok, ip_of, IPPROTO_ESP, XFRM_MODE_TUNNEL};
use futures::TryStreamExt;
use netlink_packet_xfrm::{XfrmAttrs, XFRM_STATE_ESN};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// weft's reqid on every XFRM state and policy template it owns ("weft"
/// in ASCII); entries with any other reqid are never touched.
pub const WEFT_XFRM_REQID: u32 = 0x7765_6674;

/// The AEAD every weft SA uses, and its ICV length in bits.
pub const XFRM_AEAD: &str = "rfc4106(gcm(aes))";
pub const XFRM_ICV_BITS: u32 = 128;

/// Key material of an SA: the AES-256 key and the 4-byte GCM salt, as the
/// kernel takes them (36 bytes). Never shown: `Debug` prints a fingerprint
/// length only.
#[derive(Clone, PartialEq, Eq)]
pub struct AeadKey(pub Arc<[u8]>);

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AeadKey(<{} bytes, redacted>)", self.0.len())
    }
}

/// An ESP SA in tunnel mode, identified as the kernel does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XfrmSaId {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
}

/// What an SA holds besides its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XfrmSa {
    pub reqid: u32,
    pub key: AeadKey,
    pub replay_window: u32,
}

/// An SA: identity -> the rest.
#[derive(Debug)]
pub struct XfrmState;

impl Kind for XfrmState {
    type Key = XfrmSaId;
    type Value = XfrmSa;

    fn table(st: &NetState) -> &Table<Self> {
        &st.xfrm_states
    }
    fn table_mut(st: &mut NetState) -> &mut Table<Self> {
        &mut st.xfrm_states
    }
    fn dev<'a>(_: &'a XfrmSaId, _: &'a XfrmSa) -> Option<&'a Dev> {
        None
    }
    /// An SA cannot change in place: one with other contents is deleted
    /// and added again.
    fn set(id: &XfrmSaId, sa: &XfrmSa, have: Option<&XfrmSa>, out: &mut Vec<Change>) {
        if have.is_some() {
            out.push(Change::XfrmState(XfrmStateChange::Del { id: *id }));
        }
        out.push(Change::XfrmState(XfrmStateChange::Add {
            id: *id,
            sa: sa.clone(),
        }));
    }
    fn del(id: &XfrmSaId, _: &XfrmSa) -> Change {
        Change::XfrmState(XfrmStateChange::Del { id: *id })
    }
}

/// A change to an SA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XfrmStateChange {
    Add { id: XfrmSaId, sa: XfrmSa },
    Del { id: XfrmSaId },
}

impl fmt::Display for XfrmStateChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The key is never written out, here or anywhere.
            XfrmStateChange::Add { id, sa } => write!(
                f,
                "ip xfrm state add src {} dst {} proto esp spi {:#010x} reqid {} mode tunnel replay-window {} aead '{XFRM_AEAD}' <key> {XFRM_ICV_BITS}",
                id.src, id.dst, id.spi, sa.reqid, sa.replay_window
            ),
            XfrmStateChange::Del { id } => write!(
                f,
                "ip xfrm state del src {} dst {} proto esp spi {:#010x}",
                id.src, id.dst, id.spi
            ),
        }
    }
}

impl XfrmStateChange {
    pub(crate) fn fake(&self, st: &mut NetState) -> Result<(), Failure> {
        match self {
            XfrmStateChange::Add { id, sa } => {
                if st.xfrm_states.contains_key(id) {
                    return Err(Failure::of(Errno::EEXIST));
                }
                st.xfrm_states.insert(*id, sa.clone());
            }
            XfrmStateChange::Del { id } => {
                st.xfrm_states.remove(id).ok_or(Failure::of(Errno::ESRCH))?;
            }
        }
        Ok(())
    }

    pub(crate) async fn apply(&self, k: &Applying<'_>) -> Result<(), Failure> {
        let h = k.xfrm()?;
        match self {
            XfrmStateChange::Add { id, sa } => add(h, id, sa).await.map_err(|e| failure(&e)),
            XfrmStateChange::Del { id } => gone_ok(
                h.state()
                    .delete(id.src, id.dst)
                    .protocol(IPPROTO_ESP)
                    .spi(id.spi)
                    .execute()
                    .await,
            ),
        }
    }
}

/// Adds an SA as weft makes them.
pub(crate) async fn add(
    h: &xfrmnetlink::Handle,
    id: &XfrmSaId,
    sa: &XfrmSa,
) -> Result<(), xfrmnetlink::Error> {
    h.state()
        .add(id.src, id.dst)
        .protocol(IPPROTO_ESP)
        .spi(id.spi)
        .mode(XFRM_MODE_TUNNEL)
        .reqid(sa.reqid)
        // 64-bit extended sequence numbers: 32 bits would run out after
        // 2^32 packets (about 80 minutes at 10 Gbit/s of full-size
        // packets) and the SA would stop sending until the next rotation.
        // Set before the replay window, which then uses the ESN format.
        .flags(XFRM_STATE_ESN)
        .replay_window(sa.replay_window, 0, 0, 0, 0)
        .encryption_aead(XFRM_AEAD, &sa.key.0.to_vec(), XFRM_ICV_BITS)?
        .execute()
        .await
}

/// Reads the SAs with weft's reqid into `st`.
pub(crate) async fn read(h: &xfrmnetlink::Handle, st: &mut NetState) -> Result<(), String> {
    let mut dump = Box::pin(h.state().get_dump().execute());
    while let Some(m) = dump.try_next().await.map_err(|e| err_text(&e))? {
        let info = &m.user_sa_info;
        if info.reqid != WEFT_XFRM_REQID || info.id.proto != IPPROTO_ESP {
            continue;
        }
        let key = m.nlas.iter().find_map(|a| match a {
            XfrmAttrs::EncryptionAlgAead(alg) => Some(alg.alg_key.clone()),
            _ => None,
        });
        let replay_window = m
            .nlas
            .iter()
            .find_map(|a| match a {
                XfrmAttrs::ReplayStateEsn(r) => Some(r.replay_window),
                _ => None,
            })
            .unwrap_or(u32::from(info.replay_window));
        st.xfrm_states.insert(
            XfrmSaId {
                src: ip_of(&info.saddr, info.family),
                dst: ip_of(&info.id.daddr, info.family),
                spi: info.id.spi,
            },
            XfrmSa {
                reqid: info.reqid,
                // An SA without an AEAD key is not one weft made; an empty
                // key makes the diff replace it.
                key: AeadKey(Arc::from(key.unwrap_or_default())),
                replay_window,
            },
        );
    }
    Ok(())
}
