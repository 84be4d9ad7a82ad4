//! Node names: the identity a lease belongs to.

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// Longest node name accepted: a DNS name's limit, like Kubernetes node names.
pub const MAX_NODE_NAME_LEN: usize = 253;

/// A validated node name: 1 to 253 characters of `[A-Za-z0-9._-]`, starting
/// and ending with a letter or digit, without `..`. Such a name is safe in
/// URL paths, etcd values, file names and logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NodeName(String);

/// Why a node name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NodeNameError {
    #[error("node name is empty")]
    Empty,
    #[error("node name is {0} characters long; the limit is {MAX_NODE_NAME_LEN}")]
    TooLong(usize),
    #[error("node name contains {0:?}; use letters, digits, '.', '-' and '_'")]
    BadCharacter(char),
    #[error("node name must start and end with a letter or digit")]
    BadEdge,
    #[error("node name must not contain \"..\"")]
    DotDot,
}

impl NodeName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, NodeNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NodeNameError::Empty);
        }
        let chars = name.chars().count();
        if chars > MAX_NODE_NAME_LEN {
            return Err(NodeNameError::TooLong(chars));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(NodeNameError::BadCharacter(c));
        }
        let bytes = name.as_bytes();
        if !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
            return Err(NodeNameError::BadEdge);
        }
        if name.contains("..") {
            return Err(NodeNameError::DotDot);
        }
        Ok(NodeName(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NodeName::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_usual_names() {
        for ok in [
            "host-1",
            "node.example.com",
            "a",
            "ip-10-0-0-1.ec2.internal",
            "n_1",
        ] {
            assert_eq!(NodeName::new(ok).unwrap().as_str(), ok);
        }
        assert!(NodeName::new("a".repeat(253)).is_ok());
    }

    #[test]
    fn rejects_unsafe_names() {
        assert_eq!(NodeName::new(""), Err(NodeNameError::Empty));
        assert_eq!(
            NodeName::new("a".repeat(254)),
            Err(NodeNameError::TooLong(254))
        );
        assert_eq!(NodeName::new("a/b"), Err(NodeNameError::BadCharacter('/')));
        assert_eq!(
            NodeName::new("a\nb"),
            Err(NodeNameError::BadCharacter('\n'))
        );
        assert_eq!(
            NodeName::new("a\u{7f}"),
            Err(NodeNameError::BadCharacter('\u{7f}'))
        );
        assert_eq!(NodeName::new("nöde"), Err(NodeNameError::BadCharacter('ö')));
        assert_eq!(NodeName::new("a..b"), Err(NodeNameError::DotDot));
        assert_eq!(NodeName::new(".."), Err(NodeNameError::BadEdge));
        assert_eq!(NodeName::new("-a"), Err(NodeNameError::BadEdge));
        assert_eq!(NodeName::new("a b"), Err(NodeNameError::BadCharacter(' ')));
    }
}
