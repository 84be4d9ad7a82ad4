//! Keys without IKE. Every node has an X25519 key pair and publishes the
//! public half with a key epoch in its lease. For each direction between
//! two nodes, both ends compute the same ESP key, GCM salt and SPI:
//!
//! ```text
//! shared = X25519(own secret, peer public)          (all-zero: refused)
//! salt   = SHA-256("weft ipsec psk v1" || PSK)      with a cluster PSK
//!        = "weft ipsec v1"                          without
//! info   = "weft esp v1" || src IP || dst IP || src epoch || dst epoch
//!          (IPv4 addresses as 4 bytes, epochs as 8 bytes big-endian)
//! okm    = HKDF-SHA256(salt, shared, info, 40 bytes)
//! key    = okm[0..32] (AES-256)   salt = okm[32..36]
//! SPI    = 0x100 + (okm[36..40] as u32 mod (0xffffff00 - 0x100))
//! ```
//!
//! `src` is the sending node. No secret crosses the network or sits in
//! etcd; a new epoch (a new key pair) gives new keys and SPIs for every
//! pair that involves the node.

use crate::state::AeadKey;
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Length of the key material an SA takes: AES-256 key and 4-byte salt.
pub const SA_KEY_LEN: usize = 36;

/// A node's X25519 key pair and its epoch. The secret never leaves this
/// type except to be stored ([`NodeKey::secret_bytes`]); `Debug` shows
/// only the public key.
#[derive(Clone)]
pub struct NodeKey {
    secret: StaticSecret,
    public: [u8; 32],
    epoch: u64,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("public", &hex(&self.public))
            .field("epoch", &self.epoch)
            .field("secret", &"<redacted>")
            .finish()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Why a key cannot be made or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("the peer's public key is a low-order point (the shared secret would be all zeros)")]
    LowOrder,
}

impl NodeKey {
    /// A key pair from a stored secret.
    pub fn from_secret(secret: [u8; 32], epoch: u64) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret).to_bytes();
        NodeKey {
            secret,
            public,
            epoch,
        }
    }

    /// A fresh key pair from the operating system's random source.
    pub fn generate(epoch: u64) -> Result<Self, KeyError> {
        use rand::TryRngCore;
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng
            .try_fill_bytes(bytes.as_mut())
            .map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(NodeKey::from_secret(*bytes, epoch))
    }

    /// The secret, for storing it (and nothing else).
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The shared secret with a peer; refuses low-order points, which would
    /// make it all zeros (and every key derivable by anyone).
    pub fn shared(&self, peer_public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let s = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !s.was_contributory() {
            return Err(KeyError::LowOrder);
        }
        Ok(Zeroizing::new(s.to_bytes()))
    }
}

/// One direction's SA parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaParams {
    pub spi: u32,
    pub key: AeadKey,
}

/// Both directions between this node and a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSas {
    /// This node to the peer.
    pub out: SaParams,
    /// The peer to this node.
    pub inbound: SaParams,
}

/// One endpoint of a direction: its public IP and key epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub ip: Ipv4Addr,
    pub epoch: u64,
}

/// The HKDF salt: the cluster PSK hashed, or a fixed label.
pub fn salt(psk: Option<&[u8]>) -> Vec<u8> {
    match psk {
        Some(p) => {
            let mut h = Sha256::new();
            h.update(b"weft ipsec psk v1");
            h.update(p);
            h.finalize().to_vec()
        }
        None => b"weft ipsec v1".to_vec(),
    }
}

/// The SA for traffic from `src` to `dst`, from their shared secret.
pub fn derive_sa(shared: &[u8; 32], psk: Option<&[u8]>, src: End, dst: End) -> SaParams {
    let mut info = Vec::with_capacity(11 + 4 + 4 + 8 + 8);
    info.extend_from_slice(b"weft esp v1");
    info.extend_from_slice(&src.ip.octets());
    info.extend_from_slice(&dst.ip.octets());
    info.extend_from_slice(&src.epoch.to_be_bytes());
    info.extend_from_slice(&dst.epoch.to_be_bytes());
    let hk = Hkdf::<Sha256>::new(Some(&salt(psk)), shared);
    let mut okm = Zeroizing::new([0u8; 40]);
    hk.expand(&info, okm.as_mut())
        .expect("40 bytes is a valid HKDF-SHA256 output length");
    let raw = u32::from_be_bytes([okm[36], okm[37], okm[38], okm[39]]);
    SaParams {
        // 0..=255 are reserved; the top block is left out too.
        spi: 0x100 + raw % (0xffff_ff00 - 0x100),
        key: AeadKey(Arc::from(&okm[..SA_KEY_LEN])),
    }
}

/// Both directions between `me` (with `key`) and a peer.
pub fn derive_pair(
    key: &NodeKey,
    me: Ipv4Addr,
    peer_public: &[u8; 32],
    peer: End,
    psk: Option<&[u8]>,
) -> Result<PairSas, KeyError> {
    let shared = key.shared(peer_public)?;
    let me = End {
        ip: me,
        epoch: key.epoch(),
    };
    Ok(PairSas {
        out: derive_sa(&shared, psk, me, peer),
        inbound: derive_sa(&shared, psk, peer, me),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    fn unhex_vec(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn x25519_rfc7748_section_5_2_vectors() {
        let cases = [
            (
                "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
                "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
                "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
            ),
            (
                "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
                "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
                "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
            ),
        ];
        for (scalar, point, want) in cases {
            let got = x25519_dalek::x25519(unhex(scalar), unhex(point));
            assert_eq!(got, unhex::<32>(want));
        }
    }

    #[test]
    fn x25519_rfc7748_section_6_1_diffie_hellman() {
        let alice = NodeKey::from_secret(
            unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"),
            1,
        );
        let bob = NodeKey::from_secret(
            unhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"),
            1,
        );
        assert_eq!(
            alice.public(),
            unhex::<32>("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            bob.public(),
            unhex::<32>("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        );
        let want: [u8; 32] =
            unhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(*alice.shared(&bob.public()).unwrap(), want);
        assert_eq!(*bob.shared(&alice.public()).unwrap(), want);
    }

    #[test]
    fn hkdf_sha256_rfc5869_vectors() {
        // RFC 5869 appendix A, test cases 1-3: (IKM, salt, info, OKM).
        let cases = [
            (
                "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
                "000102030405060708090a0b0c",
                "f0f1f2f3f4f5f6f7f8f9",
                "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf
                 34007208d5b887185865",
            ),
            (
                "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f
                 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f
                 404142434445464748494a4b4c4d4e4f",
                "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f
                 808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f
                 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
                "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf
                 d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef
                 f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
                "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c
                 59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71
                 cc30c58179ec3e87c14c01d5c1f3434f1d87",
            ),
            (
                "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
                "",
                "",
                "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d
                 9d201395faa4b61a96c8",
            ),
        ];
        for (ikm, salt, info, okm) in cases {
            let want = unhex_vec(okm);
            let salt = unhex_vec(salt);
            let hk = Hkdf::<Sha256>::new(Some(&salt), &unhex_vec(ikm));
            let mut got = vec![0u8; want.len()];
            hk.expand(&unhex_vec(info), &mut got).unwrap();
            assert_eq!(got, want);
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn both_ends_derive_the_same_sas() {
        let a = NodeKey::generate(3).unwrap();
        let b = NodeKey::generate(7).unwrap();
        let (ia, ib) = (ip("198.18.0.11"), ip("198.18.0.12"));
        for psk in [None, Some(&b"cluster secret"[..])] {
            let at_a = derive_pair(&a, ia, &b.public(), End { ip: ib, epoch: 7 }, psk).unwrap();
            let at_b = derive_pair(&b, ib, &a.public(), End { ip: ia, epoch: 3 }, psk).unwrap();
            assert_eq!(at_a.out, at_b.inbound, "a->b");
            assert_eq!(at_a.inbound, at_b.out, "b->a");
            assert_ne!(at_a.out.spi, at_a.inbound.spi);
            assert_ne!(at_a.out.key, at_a.inbound.key);
            assert_eq!(at_a.out.key.0.len(), SA_KEY_LEN);
        }
        // The PSK changes everything; so does a wrong public key.
        let plain = derive_pair(&a, ia, &b.public(), End { ip: ib, epoch: 7 }, None).unwrap();
        let with = derive_pair(&a, ia, &b.public(), End { ip: ib, epoch: 7 }, Some(b"x")).unwrap();
        assert_ne!(plain.out.key, with.out.key);
        let other = NodeKey::generate(7).unwrap();
        let wrong = derive_pair(&a, ia, &other.public(), End { ip: ib, epoch: 7 }, None).unwrap();
        assert_ne!(plain.out.key, wrong.out.key);
    }

    #[test]
    fn spis_are_unique_per_direction_and_epoch_and_never_reserved() {
        let mut seen = std::collections::HashSet::new();
        let peers: Vec<NodeKey> = (0..20).map(|e| NodeKey::generate(e).unwrap()).collect();
        let me_ip = ip("198.18.0.10");
        for my_epoch in 1..=5 {
            let me = NodeKey::from_secret(*peers[0].secret_bytes(), my_epoch);
            for (i, p) in peers.iter().enumerate().skip(1) {
                let pe = End {
                    ip: Ipv4Addr::from(0xc612_0000 + i as u32 + 20),
                    epoch: p.epoch(),
                };
                let s = derive_pair(&me, me_ip, &p.public(), pe, None).unwrap();
                for spi in [s.out.spi, s.inbound.spi] {
                    assert!((0x100..0xffff_ff00).contains(&spi), "{spi:#x}");
                    assert!(seen.insert(spi), "SPI {spi:#x} repeated");
                }
            }
        }
        assert_eq!(seen.len(), 5 * 19 * 2);
    }

    #[test]
    fn low_order_points_are_refused() {
        let a = NodeKey::generate(1).unwrap();
        assert_eq!(a.shared(&[0u8; 32]).unwrap_err(), KeyError::LowOrder);
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(a.shared(&one).unwrap_err(), KeyError::LowOrder);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = NodeKey::from_secret([0xab; 32], 1);
        let text = format!("{k:?}");
        assert!(!text.contains(&"ab".repeat(32)), "{text}");
        assert!(text.contains("redacted"));
        let sa = derive_sa(
            &[7; 32],
            None,
            End {
                ip: ip("198.18.0.1"),
                epoch: 1,
            },
            End {
                ip: ip("198.18.0.2"),
                epoch: 1,
            },
        );
        assert!(format!("{sa:?}").contains("redacted"));
    }
}
