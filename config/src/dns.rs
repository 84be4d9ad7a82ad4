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
}
