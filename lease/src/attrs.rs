//! The value of a lease key: flannel's `LeaseAttrs` JSON plus `NodeName`.
//!
//! ```json
//! {"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan",
//!  "BackendData":{"VNI":1,"VtepMAC":"0e:5a:00:00:00:01"},"NodeName":"host-1"}
//! ```
//!
//! The JSON is kept as written (so leases of other flannel versions and
//! backends survive a round trip); [`LeaseAttrs::backend`] gives the typed
//! view that weft's own code uses.

use crate::mac::MacAddr;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::net::{Ipv4Addr, Ipv6Addr};
use thiserror::Error;
use weft_config::BackendType;

/// A JSON value kept as its text: compact, object keys sorted (as
/// serde_json writes a parsed object, without its `preserve_order`
/// feature, which nothing here enables), so two equal values have the
/// same text. Only serde_json can write it (other serde formats would see
/// serde_json's private marker). Backend data is two or three fields; parsed into a map it took
/// about 700 bytes per lease (room for eleven entries), which at 50,000
/// leases was a fifth of the controller's memory. As text it is about 50.
#[derive(Clone)]
pub struct JsonText(Box<RawValue>);

impl JsonText {
    /// The text, e.g. `{"VNI":1,"VtepMAC":"0e:5a:00:00:00:01"}`.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The value, parsed.
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).expect("JsonText holds valid JSON")
    }
}

impl From<&Value> for JsonText {
    fn from(v: &Value) -> Self {
        JsonText(serde_json::value::to_raw_value(v).expect("a JSON value always serializes"))
    }
}

impl From<Value> for JsonText {
    fn from(v: Value) -> Self {
        JsonText::from(&v)
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for JsonText {}

impl std::fmt::Debug for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for JsonText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    /// Read as a value and written back, so the text is the canonical one
    /// whatever spacing and key order the writer used.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(JsonText::from)
    }
}

/// One lease's attributes, field for field as flannel stores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// The node's underlay IPv4 address; `0.0.0.0` when it has none yet
    /// (a reservation for a node that has not joined).
    #[serde(rename = "PublicIP", default = "unspecified_v4")]
    pub public_ip: Ipv4Addr,
    /// The node's underlay IPv6 address.
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Backend name as written (`vxlan`, `host-gw`, `ipsec`, or another
    /// flannel backend such as `udp` or `wireguard`).
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    /// Backend-specific data, as written.
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<JsonText>,
    /// flannel's IPv6 VTEP data, kept as written.
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<JsonText>,
    /// The node that owns the lease; absent in leases written by flannel.
    #[serde(rename = "NodeName", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

fn unspecified_v4() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

/// Backend data, typed, for the backends weft implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendData {
    /// `{"VNI":1,"VtepMAC":"0e:5a:..."}`
    Vxlan { vni: u32, vtep_mac: MacAddr },
    /// host-gw carries no data.
    HostGw,
    /// `{"PublicKey":"<base64 X25519>","KeyEpoch":1}`
    Ipsec {
        public_key: [u8; 32],
        key_epoch: u64,
    },
    /// `{"PublicKey":"<base64 Curve25519>"}`, as flannel's wireguard
    /// backend writes it.
    Wireguard { public_key: [u8; 32] },
}

/// Why a lease's backend data cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendDataError {
    #[error("backend type {0:?} is not one weft implements")]
    UnknownType(String),
    #[error("{backend} BackendData is invalid: {reason}")]
    Invalid {
        backend: &'static str,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VxlanData {
    #[serde(rename = "VNI")]
    vni: u32,
    #[serde(rename = "VtepMAC")]
    vtep_mac: MacAddr,
}

/// flannel's wireguard data. Unknown fields are allowed: a newer flannel
/// may add some, and the key is all a peer needs.
#[derive(Deserialize)]
struct WireguardData {
    #[serde(rename = "PublicKey")]
    public_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IpsecData {
    #[serde(rename = "PublicKey")]
    public_key: String,
    #[serde(rename = "KeyEpoch")]
    key_epoch: u64,
}

/// Backend data to read: a value (an acquire request's) or text (a
/// stored lease's).
#[derive(Clone, Copy)]
enum Data<'a> {
    Value(&'a Value),
    Text(&'a str),
}

impl Data<'_> {
    fn decode<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        match self {
            Data::Value(v) => T::deserialize(v).map_err(|e| e.to_string()),
            Data::Text(t) => serde_json::from_str(t).map_err(|e| e.to_string()),
        }
    }

    fn is_empty_object(self) -> bool {
        match self {
            Data::Value(v) => v.as_object().is_some_and(|m| m.is_empty()),
            // Canonical text: an empty object is exactly this.
            Data::Text(t) => t == "{}",
        }
    }
}

impl std::fmt::Display for Data<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Data::Value(v) => write!(f, "{v}"),
            Data::Text(t) => f.write_str(t),
        }
    }
}

/// Whether an X25519 public key is a point of small order (the zero
/// point, the points of order 2, 4, 8, their non-canonical encodings): the
/// shared secret with it is all zeros whatever the secret key, so whoever
/// publishes one knows the key of every peer's SA. A clamped scalar is a
/// multiple of 8, which takes exactly those points to zero.
pub fn low_order(public_key: &[u8; 32]) -> bool {
    let probe = x25519_dalek::StaticSecret::from([0x55; 32]);
    !probe
        .diffie_hellman(&x25519_dalek::PublicKey::from(*public_key))
        .was_contributory()
}

/// A Curve25519 public key from base64, refused if it is not 32 bytes or
/// is a point of small order ([`low_order`]).
fn public_key(b64: &str) -> Result<[u8; 32], String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| format!("PublicKey is not base64: {e}"))?;
    let key: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| format!("PublicKey is {} bytes; an X25519 key is 32", raw.len()))?;
    if low_order(&key) {
        return Err(
            "PublicKey is a low-order X25519 point: every key agreed with it would be all zeros"
                .into(),
        );
    }
    Ok(key)
}

impl BackendData {
    /// Reads backend data of the given type, checking it fully.
    pub fn parse(backend_type: &str, data: Option<&Value>) -> Result<Self, BackendDataError> {
        Self::parse_from(backend_type, data.map(Data::Value))
    }

    /// Reads backend data kept as text ([`LeaseAttrs::backend_data`]),
    /// without making a value of it first.
    pub fn parse_text(
        backend_type: &str,
        data: Option<&JsonText>,
    ) -> Result<Self, BackendDataError> {
        Self::parse_from(backend_type, data.map(|t| Data::Text(t.as_str())))
    }

    fn parse_from(backend_type: &str, data: Option<Data<'_>>) -> Result<Self, BackendDataError> {
        let kind: BackendType = backend_type
            .parse()
            .map_err(|_| BackendDataError::UnknownType(backend_type.to_string()))?;
        let invalid = |reason: String| BackendDataError::Invalid {
            backend: kind.as_str(),
            reason,
        };
        match kind {
            BackendType::Vxlan => {
                let data = data.ok_or_else(|| invalid("missing (needs VNI and VtepMAC)".into()))?;
                let d: VxlanData = data.decode().map_err(invalid)?;
                if d.vni > 0xFF_FFFF {
                    return Err(invalid(format!("VNI {} does not fit in 24 bits", d.vni)));
                }
                if !d.vtep_mac.is_unicast() {
                    return Err(invalid(format!(
                        "VtepMAC {} is not a unicast address",
                        d.vtep_mac
                    )));
                }
                Ok(BackendData::Vxlan {
                    vni: d.vni,
                    vtep_mac: d.vtep_mac,
                })
            }
            BackendType::HostGw => match data {
                None => Ok(BackendData::HostGw),
                Some(d) if d.is_empty_object() => Ok(BackendData::HostGw),
                Some(other) => Err(invalid(format!("expected no data, got {other}"))),
            },
            BackendType::Ipsec => {
                let data =
                    data.ok_or_else(|| invalid("missing (needs PublicKey and KeyEpoch)".into()))?;
                let d: IpsecData = data.decode().map_err(invalid)?;
                Ok(BackendData::Ipsec {
                    public_key: public_key(&d.public_key).map_err(invalid)?,
                    key_epoch: d.key_epoch,
                })
            }
            BackendType::Wireguard => {
                let data = data.ok_or_else(|| invalid("missing (needs PublicKey)".into()))?;
                let d: WireguardData = data.decode().map_err(invalid)?;
                Ok(BackendData::Wireguard {
                    public_key: public_key(&d.public_key).map_err(invalid)?,
                })
            }
        }
    }

    /// The backend this data belongs to.
    pub fn backend_type(&self) -> BackendType {
        match self {
            BackendData::Vxlan { .. } => BackendType::Vxlan,
            BackendData::HostGw => BackendType::HostGw,
            BackendData::Ipsec { .. } => BackendType::Ipsec,
            BackendData::Wireguard { .. } => BackendType::Wireguard,
        }
    }

    /// The data as lease JSON (`None` for host-gw, which has none).
    pub fn to_value(&self) -> Option<Value> {
        match self {
            BackendData::Vxlan { vni, vtep_mac } => {
                Some(json!({"VNI": vni, "VtepMAC": vtep_mac.to_string()}))
            }
            BackendData::HostGw => None,
            BackendData::Ipsec {
                public_key,
                key_epoch,
            } => Some(json!({
                "PublicKey": base64::engine::general_purpose::STANDARD.encode(public_key),
                "KeyEpoch": key_epoch,
            })),
            BackendData::Wireguard { public_key } => Some(json!({
                "PublicKey": base64::engine::general_purpose::STANDARD.encode(public_key),
            })),
        }
    }
}

impl LeaseAttrs {
    /// Attributes for a weft node.
    pub fn new(
        node_name: &str,
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
        backend: &BackendData,
    ) -> Self {
        LeaseAttrs {
            public_ip: public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6,
            backend_type: backend.backend_type().as_str().to_string(),
            backend_data: backend.to_value().map(JsonText::from),
            backend_v6_data: None,
            node_name: Some(node_name.to_string()),
        }
    }

    /// The typed backend data.
    pub fn backend(&self) -> Result<BackendData, BackendDataError> {
        BackendData::parse_text(&self.backend_type, self.backend_data.as_ref())
    }

    /// The public IPv4 address, unless it is unset (`0.0.0.0`).
    pub fn public_ipv4(&self) -> Option<Ipv4Addr> {
        (!self.public_ip.is_unspecified()).then_some(self.public_ip)
    }

    /// Reads lease JSON.
    pub fn from_json(text: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(text).map_err(|e| e.to_string())
    }

    /// Writes lease JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease attributes always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (fuzz/regressions/lease): a number in backend data
    /// that another writer put there changed when weft wrote the lease back.
    #[test]
    fn backend_data_numbers_pass_through_unchanged() {
        let big = "1".to_string() + &"2".repeat(123);
        let text = format!(
            r#"{{"PublicIP":"198.18.0.5","BackendType":"vxlan","BackendData":{{"VNI":{big},"Other":0.1000000000000000055511151231257827}}}}"#
        );
        let a = LeaseAttrs::from_json(text.as_bytes()).unwrap();
        let again = LeaseAttrs::from_json(a.to_json().as_bytes()).unwrap();
        assert_eq!(again, a);
        assert!(a.backend().is_err(), "a VNI of 1.2e123 is no VNI");
    }

    #[test]
    fn backend_data_text_is_the_same_whatever_order_and_spacing_it_was_written_in() {
        let a = br#"{"PublicIP":"198.18.0.5","BackendType":"vxlan","BackendData":{ "VtepMAC" : "c6:d2:32:6f:8f:44", "VNI": 1 }}"#;
        let b = br#"{"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},"PublicIP":"198.18.0.5","BackendType":"vxlan"}"#;
        let (a, b) = (
            LeaseAttrs::from_json(a).unwrap(),
            LeaseAttrs::from_json(b).unwrap(),
        );
        assert_eq!(a, b);
        let data = a.backend_data.as_ref().unwrap();
        assert_eq!(data.as_str(), r#"{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}"#);
        assert_eq!(
            data.value(),
            json!({"VtepMAC": "c6:d2:32:6f:8f:44", "VNI": 1})
        );
        // Written back as JSON, not as a string holding JSON.
        let written: Value = serde_json::from_str(&a.to_json()).unwrap();
        assert_eq!(written["BackendData"]["VNI"], 1);
        // A different value is a different text.
        let other = LeaseAttrs::from_json(
            br#"{"PublicIP":"198.18.0.5","BackendType":"vxlan","BackendData":{"VNI":2,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
        )
        .unwrap();
        assert_ne!(a, other);
    }

    #[test]
    fn host_gw_data_may_be_absent_null_or_an_empty_object_and_nothing_else() {
        for data in [
            "",
            r#","BackendData":null"#,
            r#","BackendData":{}"#,
            r#","BackendData":{ }"#,
        ] {
            let text = format!(r#"{{"PublicIP":"198.18.0.5","BackendType":"host-gw"{data}}}"#);
            let a = LeaseAttrs::from_json(text.as_bytes()).unwrap();
            assert_eq!(a.backend(), Ok(BackendData::HostGw), "{text}");
        }
        let a = LeaseAttrs::from_json(
            br#"{"PublicIP":"198.18.0.5","BackendType":"host-gw","BackendData":{"x":1}}"#,
        )
        .unwrap();
        assert!(a.backend().is_err());
    }

    #[test]
    fn a_lease_view_goes_over_the_api_and_back_unchanged() {
        let attrs = LeaseAttrs::new(
            "host-1",
            Some(Ipv4Addr::new(198, 18, 0, 5)),
            None,
            &BackendData::Vxlan {
                vni: 1,
                vtep_mac: "0e:5a:00:00:00:01".parse().unwrap(),
            },
        );
        let lease = crate::Lease {
            key: "10.244.3.0-24".parse().unwrap(),
            attrs,
            etcd_lease: Some(crate::LeaseId(0x694d)),
            create_revision: 4,
            mod_revision: 7,
        };
        let view = crate::api::LeaseView::new(&lease, true, None);
        let text = serde_json::to_string(&view).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["backend_data"],
            json!({"VNI": 1, "VtepMAC": "0e:5a:00:00:00:01"})
        );
        let back: crate::api::LeaseView = serde_json::from_str(&text).unwrap();
        assert_eq!(back, view);
        assert_eq!(back.attrs(), lease.attrs);
    }

    #[test]
    fn reads_flannel_written_leases() {
        let flannel = br#"{"PublicIP":"198.18.0.5","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let attrs = LeaseAttrs::from_json(flannel).unwrap();
        assert_eq!(attrs.node_name, None);
        assert_eq!(
            attrs.backend().unwrap(),
            BackendData::Vxlan {
                vni: 1,
                vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap()
            }
        );
        // Older flannel: no PublicIPv6, no VNI.
        let old = br#"{"PublicIP":"198.18.0.5","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}"#;
        let attrs = LeaseAttrs::from_json(old).unwrap();
        assert!(attrs.backend().is_err());
        // Backends weft does not implement are still leases.
        let udp = br#"{"PublicIP":"198.18.0.6","BackendType":"udp","BackendData":{"Addr":"x"}}"#;
        let attrs = LeaseAttrs::from_json(udp).unwrap();
        assert!(matches!(
            attrs.backend(),
            Err(BackendDataError::UnknownType(_))
        ));
        // flannel's wireguard lease: its key, and nothing to refuse in a
        // field weft does not know.
        let key = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([9u8; 32]));
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
        let wg = format!(
            r#"{{"PublicIP":"198.18.0.6","BackendType":"wireguard","BackendData":{{"PublicKey":"{b64}","Later":1}}}}"#
        );
        let attrs = LeaseAttrs::from_json(wg.as_bytes()).unwrap();
        let data = attrs.backend().unwrap();
        assert_eq!(
            data,
            BackendData::Wireguard {
                public_key: *key.as_bytes()
            }
        );
        assert_eq!(data.to_value().unwrap(), json!({ "PublicKey": b64 }));
        let bad = br#"{"PublicIP":"198.18.0.6","BackendType":"wireguard","BackendData":{"PublicKey":"abc"}}"#;
        let e = LeaseAttrs::from_json(bad).unwrap().backend().unwrap_err();
        assert!(
            e.to_string().contains("wireguard BackendData is invalid"),
            "{e}"
        );
        let round = LeaseAttrs::from_json(attrs.to_json().as_bytes()).unwrap();
        assert_eq!(round, attrs);
    }

    #[test]
    fn writes_flannel_readable_json() {
        let attrs = LeaseAttrs::new(
            "host-1",
            Some("198.18.0.11".parse().unwrap()),
            None,
            &BackendData::Vxlan {
                vni: 1,
                vtep_mac: "0e:5a:00:00:00:01".parse().unwrap(),
            },
        );
        let v: Value = serde_json::from_str(&attrs.to_json()).unwrap();
        assert_eq!(v["PublicIP"], "198.18.0.11");
        assert_eq!(v["PublicIPv6"], Value::Null);
        assert_eq!(v["BackendType"], "vxlan");
        assert_eq!(v["BackendData"]["VNI"], 1);
        assert_eq!(v["BackendData"]["VtepMAC"], "0e:5a:00:00:00:01");
        assert_eq!(v["NodeName"], "host-1");
    }

    #[test]
    fn low_order_ipsec_keys_are_refused() {
        use base64::Engine;
        let enc = |k: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
        let mut p_plus_1 = [0xffu8; 32];
        p_plus_1[0] = 0xee;
        p_plus_1[31] = 0x7f;
        for bad in [
            [0u8; 32],
            {
                let mut one = [0u8; 32];
                one[0] = 1;
                one
            },
            p_plus_1,
        ] {
            let e = BackendData::parse(
                "ipsec",
                Some(&json!({"PublicKey": enc(bad), "KeyEpoch": 1})),
            )
            .unwrap_err();
            assert!(e.to_string().contains("low-order"), "{e}");
        }
        let good = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7u8; 32]));
        assert!(BackendData::parse(
            "ipsec",
            Some(&json!({"PublicKey": enc(*good.as_bytes()), "KeyEpoch": 1}))
        )
        .is_ok());
    }

    #[test]
    fn backend_data_validation() {
        assert!(BackendData::parse(
            "vxlan",
            Some(&json!({"VNI":1,"VtepMAC":"01:00:00:00:00:01"}))
        )
        .is_err());
        assert!(BackendData::parse(
            "vxlan",
            Some(&json!({"VNI":16777216,"VtepMAC":"02:00:00:00:00:01"}))
        )
        .is_err());
        assert!(BackendData::parse("vxlan", Some(&json!("garbage"))).is_err());
        assert!(BackendData::parse("vxlan", None).is_err());
        assert_eq!(
            BackendData::parse("host-gw", None).unwrap(),
            BackendData::HostGw
        );
        assert!(BackendData::parse("host-gw", Some(&json!({"x":1}))).is_err());
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let ipsec =
            BackendData::parse("ipsec", Some(&json!({"PublicKey": key, "KeyEpoch": 3}))).unwrap();
        assert_eq!(
            ipsec,
            BackendData::Ipsec {
                public_key: [7; 32],
                key_epoch: 3
            }
        );
        assert_eq!(
            BackendData::parse("ipsec", ipsec.to_value().as_ref()).unwrap(),
            ipsec
        );
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 31]);
        assert!(
            BackendData::parse("ipsec", Some(&json!({"PublicKey": short, "KeyEpoch": 3}))).is_err()
        );
        assert!(matches!(
            BackendData::parse("udp", None),
            Err(BackendDataError::UnknownType(_))
        ));
    }
}
