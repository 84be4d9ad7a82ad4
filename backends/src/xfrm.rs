//! XFRM (IPsec) through netlink: what the XFRM kinds
//! ([`crate::kinds::xfrm_state`], [`crate::kinds::xfrm_policy`]) share,
//! and probing that the kernel can do what the ipsec backend needs. No `ip
//! xfrm`, no IKE.

use crate::dataplane::{Errno, Failure};
use crate::kinds::xfrm_state::{add, AeadKey, XfrmSa, XfrmSaId, XFRM_AEAD};
use ipnet::IpNet;
use netlink_packet_xfrm::Address;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use xfrmnetlink::Handle;

pub(crate) const IPPROTO_ESP: u8 = 50;
pub(crate) const XFRM_MODE_TUNNEL: u8 = 1;
const AF_INET: u16 = 2;

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
pub(crate) fn failure(e: &xfrmnetlink::Error) -> Failure {
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

pub(crate) fn ip_of(a: &Address, family: u16) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(a.to_ipv4())
    } else {
        IpAddr::V6(a.to_ipv6())
    }
}

pub(crate) fn net_of(a: &Address, family: u16, len: u8) -> Option<IpNet> {
    IpNet::new(ip_of(a, family), len).ok()
}

/// A delete's result: gone already counts as done.
pub(crate) fn gone_ok(r: Result<(), xfrmnetlink::Error>) -> Result<(), Failure> {
    match r {
        Err(e) if !already_gone(&e) => Err(failure(&e)),
        _ => Ok(()),
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
    match add(h, &id, &sa).await {
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
