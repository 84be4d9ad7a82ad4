//! Names of containers (service discovery): what a name may be.
//!
//! A name is one or more DNS labels as RFC 1123 allows them (letters,
//! digits and hyphens, 1 to 63 characters, neither starting nor ending
//! with a hyphen), joined by dots: `web`, `api-2`, `<pod>.<namespace>`.
//! DNS compares names without regard to case, so a name is kept in lower
//! case. Anything else (underscores, empty labels, a trailing dot, more
//! than 253 characters) is refused with the reason.

use std::fmt;
use std::str::FromStr;

/// The domain names are served under when the network config sets none.
pub const DEFAULT_DNS_DOMAIN: &str = "weft";

/// The longest name, dots included (a DNS name's limit in text).
pub const MAX_DNS_NAME: usize = 253;

/// The longest label.
pub const MAX_DNS_LABEL: usize = 63;

/// A validated, lower-case DNS name without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsName(Box<str>);

/// Why a text is not a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsNameError {
    #[error("a name cannot be empty")]
    Empty,
    #[error("{len} characters is too long for a name (at most {MAX_DNS_NAME})")]
    TooLong { len: usize },
    #[error("{name:?}: {reason} (names are RFC 1123 labels joined by dots: letters, digits and hyphens, 1 to 63 characters, not starting or ending with a hyphen)")]
    Invalid { name: String, reason: String },
}

impl DnsName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name's labels, first to last.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }

    /// This name followed by `domain` (`web` in `weft` is `web.weft`).
    pub fn within(&self, domain: &DnsName) -> String {
        format!("{}.{}", self.0, domain.0)
    }
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("it has an empty label (two dots in a row, or a dot at an end)".into());
    }
    if label.len() > MAX_DNS_LABEL {
        return Err(format!(
            "label {:?} has {} characters (at most {MAX_DNS_LABEL})",
            label,
            label.len()
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!("{c:?} is not allowed"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with a hyphen"));
    }
    Ok(())
}

impl FromStr for DnsName {
    type Err = DnsNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(DnsNameError::Empty);
        }
        if s.len() > MAX_DNS_NAME {
            return Err(DnsNameError::TooLong { len: s.len() });
        }
        for label in s.split('.') {
            check_label(label).map_err(|reason| DnsNameError::Invalid {
                name: s.to_string(),
                reason,
            })?;
        }
        Ok(DnsName(s.to_ascii_lowercase().into_boxed_str()))
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for DnsName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DnsName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The names file weft-cni keeps next to its address store
/// (`<dataDir>/<network>/names.json`) and weft-node reads: which names each
/// attachment has, with its addresses. It survives restarts of both, so a
/// node that starts again registers what its containers have.
// Unknown fields are read past: a newer weft-cni may write more.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NamesFile {
    pub attachments: Vec<AttachmentNames>,
}

/// One attachment's names and addresses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttachmentNames {
    pub container_id: String,
    pub ifname: String,
    pub names: Vec<DnsName>,
    pub addresses: Vec<std::net::IpAddr>,
}

/// The file's name in the store directory.
pub const NAMES_FILE: &str = "names.json";

/// The largest names file read (bytes): room for thousands of attachments.
pub const MAX_NAMES_FILE: u64 = 4 << 20;

/// Most names one attachment may have.
pub const MAX_NAMES_PER_CONTAINER: usize = 16;

impl NamesFile {
    /// Reads the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not a names file: {e}"))
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a names file always serializes");
        s.push('\n');
        s
    }

    /// Sets (or with no names, removes) an attachment's entry.
    pub fn set(&mut self, entry: AttachmentNames) {
        self.remove(&entry.container_id, &entry.ifname);
        if !entry.names.is_empty() && !entry.addresses.is_empty() {
            self.attachments.push(entry);
        }
    }

    /// Removes an attachment's entry; whether there was one.
    pub fn remove(&mut self, container_id: &str, ifname: &str) -> bool {
        let before = self.attachments.len();
        self.attachments
            .retain(|a| !(a.container_id == container_id && a.ifname == ifname));
        self.attachments.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_rfc1123_labels_in_lower_case() {
        for ok in ["web", "api-2", "a", "0day", "frontend.shop", "Web.Shop"] {
            let n: DnsName = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(n.as_str(), ok.to_ascii_lowercase());
        }
        let max_label = "a".repeat(MAX_DNS_LABEL);
        assert!(max_label.parse::<DnsName>().is_ok());
        let long: String = [max_label.as_str(); 4].join(".");
        assert_eq!(long.len(), 255);
        assert_eq!(
            long.parse::<DnsName>(),
            Err(DnsNameError::TooLong { len: 255 })
        );
        assert!(long[..MAX_DNS_NAME].parse::<DnsName>().is_ok());
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        assert_eq!("".parse::<DnsName>(), Err(DnsNameError::Empty));
        for (bad, why) in [
            ("web_1", "'_' is not allowed"),
            ("-web", "starts or ends with a hyphen"),
            ("web-", "starts or ends with a hyphen"),
            ("web.", "empty label"),
            (".web", "empty label"),
            ("a..b", "empty label"),
            ("wéb", "'é' is not allowed"),
            ("web server", "' ' is not allowed"),
            ("web\0", "'\\0' is not allowed"),
            ("*.weft", "'*' is not allowed"),
        ] {
            let e = bad.parse::<DnsName>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains("RFC 1123"), "{bad:?}: {e}");
        }
        let e = "a".repeat(64).parse::<DnsName>().unwrap_err().to_string();
        assert!(e.contains("64 characters"), "{e}");
    }

    #[test]
    fn a_name_within_a_domain() {
        let n: DnsName = "web".parse().unwrap();
        let d: DnsName = DEFAULT_DNS_DOMAIN.parse().unwrap();
        assert_eq!(n.within(&d), "web.weft");
        assert_eq!(n.labels().count(), 1);
        let j: DnsName = "\"Web.Shop\"".trim_matches('"').parse().unwrap();
        assert_eq!(serde_json::to_string(&j).unwrap(), "\"web.shop\"");
        assert!(serde_json::from_str::<DnsName>("\"a_b\"").is_err());
    }

    #[test]
    fn the_names_file_keeps_one_entry_per_attachment() {
        let entry = |id: &str, names: &[&str]| AttachmentNames {
            container_id: id.into(),
            ifname: "eth0".into(),
            names: names.iter().map(|n| n.parse().unwrap()).collect(),
            addresses: vec!["10.244.3.5".parse().unwrap()],
        };
        let mut f = NamesFile::default();
        f.set(entry("c1", &["web"]));
        f.set(entry("c2", &["db"]));
        f.set(entry("c1", &["web", "api"]));
        assert_eq!(f.attachments.len(), 2);
        assert_eq!(f.attachments[1], entry("c1", &["web", "api"]));
        assert_eq!(NamesFile::parse(&f.render()).unwrap(), f);
        f.set(entry("c2", &[]));
        assert_eq!(f.attachments.len(), 1);
        assert!(f.remove("c1", "eth0"));
        assert!(!f.remove("c1", "eth0"));
        assert!(NamesFile::parse(
            r#"{"attachments":[{"container_id":"c","ifname":"e","names":["a_b"],"addresses":[]}]}"#
        )
        .is_err());
        assert!(NamesFile::parse("[]").is_err());
    }
}
