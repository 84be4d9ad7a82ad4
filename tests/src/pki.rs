//! Certificates for tests, made in process with rcgen: a CA, the
//! controller's certificate, node and admin certificates, and the kinds the
//! controller must refuse (expired, signed by another CA). The lab uses
//! `weftctl pki` instead, as operators do.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::{Duration, OffsetDateTime};
use weft_controller::tls::{ServerTlsFiles, ADMINS_ORG, NODES_ORG};
use weft_lease::tls::ClientTlsFiles;

/// A CA and the certificates it signed, as PEM files in a temporary
/// directory.
pub struct TestPki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// From 5 minutes ago for a day.
    Now,
    /// Ended an hour ago.
    Expired,
    /// From 5 minutes ago for this long.
    For(std::time::Duration),
}

impl TestPki {
    /// A new CA.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("weft-pki-").tempdir()?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // Each CA its own name, as two real CAs would have.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        dn.push(
            DnType::CommonName,
            format!("weft test CA {} {n}", std::process::id()),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut p, Validity::Now);
        let cert = p.self_signed(&key)?;
        std::fs::write(dir.path().join("ca.pem"), cert.pem())?;
        let issuer = Issuer::new(p, key);
        Ok(TestPki { dir, issuer })
    }

    /// One PKI per test process (certificates are cheap, but each test
    /// need not make its own).
    pub fn shared() -> Arc<TestPki> {
        static PKI: std::sync::OnceLock<Arc<TestPki>> = std::sync::OnceLock::new();
        PKI.get_or_init(|| Arc::new(TestPki::new().expect("test PKI")))
            .clone()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// The controller's files: a server certificate for `127.0.0.1` and
    /// `localhost`, and this CA for client certificates.
    pub fn server(&self) -> Result<ServerTlsFiles> {
        let (cert, key) = self.issue(
            "server",
            "127.0.0.1",
            None,
            &["127.0.0.1", "localhost"],
            Validity::Now,
        )?;
        Ok(ServerTlsFiles {
            cert,
            key,
            client_ca: self.ca_file(),
        })
    }

    /// A node's client files (CN=name, O=weft:nodes).
    pub fn node(&self, name: &str) -> Result<ClientTlsFiles> {
        self.client(
            &format!("node-{name}"),
            name,
            Some(NODES_ORG),
            Validity::Now,
        )
    }

    /// An admin's client files (CN=name, O=weft:admins).
    pub fn admin(&self, name: &str) -> Result<ClientTlsFiles> {
        self.client(
            &format!("admin-{name}"),
            name,
            Some(ADMINS_ORG),
            Validity::Now,
        )
    }

    /// Client files with any subject and validity, stored as `stem`.
    pub fn client(
        &self,
        stem: &str,
        cn: &str,
        org: Option<&str>,
        when: Validity,
    ) -> Result<ClientTlsFiles> {
        let (cert, key) = self.issue(stem, cn, org, &[], when)?;
        Ok(ClientTlsFiles {
            ca: self.ca_file(),
            cert: Some(cert),
            key: Some(key),
        })
    }

    /// Writes `<stem>.pem` and `<stem>-key.pem`, signed by this CA.
    pub fn issue(
        &self,
        stem: &str,
        cn: &str,
        org: Option<&str>,
        sans: &[&str],
        when: Validity,
    ) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        if let Some(o) = org {
            dn.push(DnType::OrganizationName, o);
        }
        p.distinguished_name = dn;
        for s in sans {
            p.subject_alt_names.push(match s.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*s).try_into()?),
            });
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = if sans.is_empty() {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ServerAuth]
        };
        validity(&mut p, when);
        let cert = p.signed_by(&key, &self.issuer)?;
        let cert_path = self.dir().join(format!("{stem}.pem"));
        let key_path = self.dir().join(format!("{stem}-key.pem"));
        std::fs::write(&key_path, key.serialize_pem())
            .with_context(|| format!("writing {}", key_path.display()))?;
        std::fs::write(&cert_path, cert.pem())?;
        Ok((cert_path, key_path))
    }
}

fn validity(p: &mut CertificateParams, when: Validity) {
    let now = OffsetDateTime::now_utc();
    let (from, to) = match when {
        Validity::Now => (now - Duration::minutes(5), now + Duration::days(1)),
        Validity::Expired => (now - Duration::days(2), now - Duration::hours(1)),
        Validity::For(d) => (
            now - Duration::minutes(5),
            now + Duration::try_from(d).unwrap_or(Duration::days(1)),
        ),
    };
    p.not_before = from;
    p.not_after = to;
}
