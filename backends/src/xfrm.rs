//! XFRM (IPsec) through netlink: reading and changing the ESP SAs and
//! policies weft owns (those with [`WEFT_XFRM_REQID`]), and probing that
//! the kernel can do what the ipsec backend needs. No `ip xfrm`, no IKE.

use crate::dataplane::{Errno, Failure};
use crate::state::{
    AeadKey, Change, XfrmDir, XfrmPolicyId, XfrmSa, XfrmSaId, XfrmTmpl, WEFT_BLOCK_PRIORITY,
    WEFT_XFRM_REQID, XFRM_AEAD, XFRM_ICV_BITS,
};
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_xfrm::{Address, UserTemplate, XfrmAttrs, XFRM_STATE_ESN};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use xfrmnetlink::Handle;

const IPPROTO_ESP: u8 = 50;
const XFRM_MODE_TUNNEL: u8 = 1;
const AF_INET: u16 = 2;
/// XFRM_POLICY_BLOCK: drop what matches.
const XFRM_POLICY_BLOCK: u8 = 1;

/// Priority of weft's policies (the kernel's default for `ip xfrm policy`).
const POLICY_PRIORITY: u32 = 0;

/// What the kernel lacks for the ipsec backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelSupport {
    #[error("the kernel has no XFRM netlink interface (module xfrm_user, CONFIG_XFRM_USER): {0}")]
    NoXfrmUser(String),
    #[error(
        "the kernel has no ESP (module esp4, CONFIG_INET_ESP){also}: {reason}",
        also = if *.aead_missing { format!(" and no AEAD {XFRM_AEAD} (modules gcm, ghash_generic, aes_generic or aesni_intel; CONFIG_CRYPTO_GCM)") } else { String::new() }
    )]
    NoEsp { aead_missing: bool, reason: String },
    #[error("the kernel has no AEAD {XFRM_AEAD} (modules gcm, ghash_generic, aes_generic or aesni_intel; CONFIG_CRYPTO_GCM): {0}")]
    NoAead(String),
    #[error("probing IPsec support failed: {0}")]
    Other(String),
}

/// The (negative) errno code of a failed request, if the kernel sent one.
fn code_of(e: &xfrmnetlink::Error) -> Option<std::num::NonZeroI32> {
    match e {
        xfrmnetlink::Error::NetlinkError(m) => m.code,
        _ => None,
    }
}

/// The errno of a failed request, if the kernel sent one.
fn errno(e: &xfrmnetlink::Error) -> Option<Errno> {
    code_of(e).map(|c| Errno::from_raw(-c.get()))
}

/// A failed request.
fn failure(e: &xfrmnetlink::Error) -> Failure {
    Failure::from_netlink(code_of(e), || e.to_string())
}

/// A failed request, as text.
pub fn err_text(e: &xfrmnetlink::Error) -> String {
    failure(e).to_string()
}

/// Whether a failed delete means "it was not there" (ENOENT, ESRCH).
pub fn already_gone(e: &xfrmnetlink::Error) -> bool {
    matches!(errno(e), Some(Errno::ENOENT | Errno::ESRCH))
}

fn ip_of(a: &Address, family: u16) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(a.to_ipv4())
    } else {
        IpAddr::V6(a.to_ipv6())
    }
}

fn net_of(a: &Address, family: u16, len: u8) -> Option<IpNet> {
    IpNet::new(ip_of(a, family), len).ok()
}

/// The SAs with weft's reqid.
pub async fn states(h: &Handle) -> Result<Vec<(XfrmSaId, XfrmSa)>, String> {
    let mut out = Vec::new();
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
        out.push((
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
        ));
    }
    Ok(out)
}

/// Weft's policies: those whose (single) template has weft's reqid, and
/// the dropping ones with weft's priority.
pub async fn policies(
    h: &Handle,
) -> Result<(Vec<(XfrmPolicyId, XfrmTmpl)>, Vec<XfrmPolicyId>), String> {
    let mut out = Vec::new();
    let mut blocks = Vec::new();
    let mut dump = Box::pin(h.policy().get_dump().execute());
    while let Some(m) = dump.try_next().await.map_err(|e| err_text(&e))? {
        let info = &m.user_policy_info;
        let Some(dir) = XfrmDir::from_kernel(info.direction) else {
            continue;
        };
        let sel = &info.selector;
        if info.action == XFRM_POLICY_BLOCK && info.priority == WEFT_BLOCK_PRIORITY {
            if let (Some(src), Some(dst)) = (
                net_of(&sel.saddr, sel.family, sel.prefixlen_s),
                net_of(&sel.daddr, sel.family, sel.prefixlen_d),
            ) {
                blocks.push(XfrmPolicyId { dir, src, dst });
            }
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
        let (Some(src), Some(dst)) = (
            net_of(&sel.saddr, sel.family, sel.prefixlen_s),
            net_of(&sel.daddr, sel.family, sel.prefixlen_d),
        ) else {
            continue;
        };
        out.push((
            XfrmPolicyId { dir, src, dst },
            XfrmTmpl {
                src: ip_of(&t.saddr, t.family),
                dst: ip_of(&t.id.daddr, t.family),
                reqid: t.reqid,
            },
        ));
    }
    Ok((out, blocks))
}

async fn add_state(h: &Handle, id: &XfrmSaId, sa: &XfrmSa) -> Result<(), xfrmnetlink::Error> {
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

/// A delete's result: gone already counts as done.
fn gone_ok(r: Result<(), xfrmnetlink::Error>) -> Result<(), Failure> {
    match r {
        Err(e) if !already_gone(&e) => Err(failure(&e)),
        _ => Ok(()),
    }
}

/// Applies one XFRM change. Deleting what is gone counts as done.
pub async fn apply(h: &Handle, c: &Change) -> Result<(), Failure> {
    match c {
        Change::AddXfrmState { id, sa } => add_state(h, id, sa).await.map_err(|e| failure(&e)),
        Change::DelXfrmState { id } => gone_ok(
            h.state()
                .delete(id.src, id.dst)
                .protocol(IPPROTO_ESP)
                .spi(id.spi)
                .execute()
                .await,
        ),
        Change::SetXfrmPolicy { id, tmpl } => h
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
        Change::AddXfrmBlock { id } => h
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
        Change::DelXfrmPolicy { id } | Change::DelXfrmBlock { id } => gone_ok(
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
        other => Err(Failure::other(format!("not an XFRM change: {other}"))),
    }
}

/// Checks that the kernel can hold weft's SAs: adds an SA with weft's AEAD
/// between two loopback addresses (no policy uses it, so no traffic ever
/// does) and deletes it again. The kernel loads esp4 and the crypto modules
/// on demand; if it cannot, the error names what is missing.
pub async fn probe(h: &Handle) -> Result<(), KernelSupport> {
    let lo = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    let id = XfrmSaId {
        src: lo,
        dst: lo,
        // A fixed SPI in a block nobody allocates from (SPIs are random
        // 32-bit values); reqid 0, so it is never taken for weft's own.
        spi: 0xffff_ff77,
    };
    let sa = XfrmSa {
        reqid: 0,
        key: AeadKey(Arc::from(vec![0x77u8; 36])),
        replay_window: 32,
    };
    let del = |h: Handle| async move {
        let _ = h
            .state()
            .delete(lo, lo)
            .protocol(IPPROTO_ESP)
            .spi(id.spi)
            .execute()
            .await;
    };
    // A leftover of a probe that was interrupted.
    del(h.clone()).await;
    match add_state(h, &id, &sa).await {
        Ok(()) => {
            del(h.clone()).await;
            Ok(())
        }
        // "Requested AEAD algorithm not found" (ENOSYS): is ESP there at all?
        Err(e) if errno(&e) == Some(Errno::ENOSYS) => {
            let reason = err_text(&e);
            let plain = h
                .state()
                .add(lo, lo)
                .protocol(IPPROTO_ESP)
                .spi(id.spi)
                .mode(XFRM_MODE_TUNNEL)
                .encryption("ecb(cipher_null)", &Vec::new())
                .map_err(|e| KernelSupport::Other(e.to_string()))?
                .authentication("digest_null", &Vec::new())
                .map_err(|e| KernelSupport::Other(e.to_string()))?
                .execute()
                .await;
            match plain {
                Err(e2) if errno(&e2) == Some(Errno::EPROTONOSUPPORT) => {
                    Err(KernelSupport::NoEsp {
                        aead_missing: true,
                        reason: format!("{reason}; {}", err_text(&e2)),
                    })
                }
                r => {
                    if r.is_ok() {
                        del(h.clone()).await;
                    }
                    Err(KernelSupport::NoAead(reason))
                }
            }
        }
        // "Requested type not found" (EPROTONOSUPPORT).
        Err(e) if errno(&e) == Some(Errno::EPROTONOSUPPORT) => Err(KernelSupport::NoEsp {
            aead_missing: false,
            reason: err_text(&e),
        }),
        Err(e) => Err(KernelSupport::Other(err_text(&e))),
    }
}
