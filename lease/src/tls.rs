//! TLS material for the controller API: PEM files read into rustls
//! configurations, for the nodes and weftctl ([`ClientTlsFiles`]) and for
//! the controller itself.
//!
//! Certificates made by `weftctl pki`, openssl, cfssl or step-ca all work:
//! a CA certificate, and a certificate and key (PKCS#8, PKCS#1 or SEC1) per
//! party. Errors name the file and what is wrong with it.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// The Organization of node certificates: a node, acting only on its own
/// lease (CN = its name).
pub const NODES_ORG: &str = "weft:nodes";
/// The Organization of administrator certificates.
pub const ADMINS_ORG: &str = "weft:admins";

/// Why TLS material could not be loaded.
#[derive(Debug, Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    /// The file holds no PEM private key.
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    /// The files do not make a usable configuration (e.g. the key does not
    /// match the certificate).
    #[error("{what}: {reason}")]
    Config { what: String, reason: String },
}

/// The crypto provider weft uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file (a chain: the leaf first).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
        path: path.to_path_buf(),
    })
}

/// The CA certificates of a PEM file as trust anchors.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Config {
            what: format!("CA certificate in {}", path.display()),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// What a client (weft-node, weftctl) uses to talk to the controller over
/// HTTPS: the CA that signed the controller's certificate, and its own
/// certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificate(s) to verify the controller with.
    pub ca: PathBuf,
    /// This client's certificate (chain), PEM.
    pub cert: Option<PathBuf>,
    /// This client's private key, PEM.
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// From the three flags; `None` when none is given. A certificate
    /// without its key (or the other way round), or either without a CA, is
    /// an error naming what is missing.
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        let missing = |what: &str| TlsError::Config {
            what: "client TLS".into(),
            reason: format!("{what} is missing"),
        };
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (None, _, _) => Err(missing(
                "--ca-file (the CA of the controller's certificate)",
            )),
            (Some(_), Some(_), None) => Err(missing("--key-file (given --cert-file)")),
            (Some(_), None, Some(_)) => Err(missing("--cert-file (given --key-file)")),
            (Some(ca), cert, key) => Ok(Some(ClientTlsFiles { ca, cert, key })),
        }
    }

    /// The files, for noticing that they changed.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.ca.as_path())
            .chain(self.cert.as_deref())
            .chain(self.key.as_deref())
    }

    /// Reads the files into a rustls client configuration (TLS 1.2 and
    /// 1.3, only the given CA trusted, the client certificate presented
    /// when the controller asks for one).
    pub fn config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let roots = read_roots(&self.ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                what: "TLS versions".into(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
                .map_err(|e| TlsError::Config {
                    what: format!("{} with {}", cert.display(), key.display()),
                    reason: e.to_string(),
                }),
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_must_come_together() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(ClientTlsFiles::from_flags(None, None, None).unwrap(), None);
        let e = ClientTlsFiles::from_flags(None, p("c"), p("k")).unwrap_err();
        assert!(e.to_string().contains("--ca-file"), "{e}");
        let e = ClientTlsFiles::from_flags(p("ca"), p("c"), None).unwrap_err();
        assert!(e.to_string().contains("--key-file"), "{e}");
        let e = ClientTlsFiles::from_flags(p("ca"), None, p("k")).unwrap_err();
        assert!(e.to_string().contains("--cert-file"), "{e}");
        let ok = ClientTlsFiles::from_flags(p("ca"), p("c"), p("k"))
            .unwrap()
            .unwrap();
        assert_eq!(ok.paths().count(), 3);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = read_certs(&missing).unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = read_certs(&junk).unwrap_err();
        assert!(e.to_string().contains("junk.pem") && e.to_string().contains("no PEM certificate"));
        let e = read_key(&junk).unwrap_err();
        assert!(e.to_string().contains("no PEM private key"), "{e}");
    }
}
