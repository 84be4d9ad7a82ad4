//! HTTPS with client certificates: the controller's TLS configuration and
//! who a verified certificate says the caller is.
//!
//! The identity is the certificate's Common Name; its Organization gives
//! the role: `weft:nodes` (a node, acting only on its own lease) or
//! `weft:admins` (everything). A certificate that is missing, expired or
//! not signed by the client CA is refused in the handshake.

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use weft_lease::tls::{provider, read_certs, read_key, read_roots, TlsError};

pub use weft_lease::tls::{ADMINS_ORG, NODES_ORG};

/// The controller's own certificate and the CA its clients' certificates
/// must be signed by.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl ServerTlsFiles {
    /// From the three flags; `None` when none is given, an error naming the
    /// missing ones when only some are.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key, client_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(client_ca)) => Ok(Some(ServerTlsFiles {
                cert,
                key,
                client_ca,
            })),
            (cert, key, ca) => {
                let missing: Vec<&str> = [
                    (cert.is_none(), "--tls-cert-file"),
                    (key.is_none(), "--tls-key-file"),
                    (ca.is_none(), "--client-ca-file"),
                ]
                .into_iter()
                .filter_map(|(m, f)| m.then_some(f))
                .collect();
                Err(TlsError::Config {
                    what: "controller TLS".into(),
                    reason: format!(
                        "{} missing: HTTPS needs all of --tls-cert-file, --tls-key-file and \
                         --client-ca-file",
                        missing.join(", ")
                    ),
                })
            }
        }
    }

    /// Reads the files into a server configuration that requires a client
    /// certificate signed by the client CA.
    pub fn config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let roots = Arc::new(read_roots(&self.client_ca)?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Config {
                what: format!("client CA {}", self.client_ca.display()),
                reason: e.to_string(),
            })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                what: "TLS versions".into(),
                reason: e.to_string(),
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(read_certs(&self.cert)?, read_key(&self.key)?)
            .map_err(|e| TlsError::Config {
                what: format!("{} with {}", self.cert.display(), self.key.display()),
                reason: e.to_string(),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A role a certificate's Organization grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `weft:admins`: everything.
    Admin,
    /// `weft:nodes`: its own lease, and reading.
    Node,
    /// Neither: nothing.
    None,
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The API served without TLS (on loopback, or `--insecure-listen`):
    /// whoever reaches it may do everything.
    Unauthenticated,
    /// A verified client certificate.
    Cert {
        /// The certificate's Common Name (a node's name).
        name: String,
        /// Its Organizations.
        orgs: Vec<String>,
        role: Role,
    },
}

impl Caller {
    /// The caller a verified certificate (DER) names. A certificate that
    /// cannot be read has no role.
    pub fn from_cert(der: &[u8]) -> Caller {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Caller::Cert {
                name: String::new(),
                orgs: Vec::new(),
                role: Role::None,
            };
        };
        let subject = cert.subject();
        // Exactly one Common Name; tools disagree on which of several
        // counts, so a certificate with more names none.
        let names: Vec<_> = subject.iter_common_name().collect();
        let name = match names.as_slice() {
            [cn] => cn.as_str().unwrap_or_default().to_string(),
            _ => String::new(),
        };
        let orgs: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .map(str::to_string)
            .collect();
        let role = if orgs.iter().any(|o| o == ADMINS_ORG) {
            Role::Admin
        } else if orgs.iter().any(|o| o == NODES_ORG) && !name.is_empty() {
            Role::Node
        } else {
            Role::None
        };
        Caller::Cert { name, orgs, role }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Unauthenticated => f.write_str("an unauthenticated client"),
            Caller::Cert { name, orgs, .. } => {
                write!(f, "certificate CN={name:?} O={orgs:?}")
            }
        }
    }
}
