//! `weftctl pki`: the certificates of a small cluster, as PEM files in one
//! directory. ECDSA P-256 keys (rcgen), keys written 0600 in a 0700
//! directory, every file replaced atomically (a node that re-reads its
//! certificate never sees half a file).
//!
//! | command | writes | subject |
//! |---|---|---|
//! | `init` | `ca.pem`, `ca-key.pem` | CN=weft CA |
//! | `server --host H...` | `server.pem`, `server-key.pem` | CN=H[0], SAN = every H (DNS name or IP) |
//! | `node NAME` | `node-NAME.pem`, `node-NAME-key.pem` | CN=NAME, O=weft:nodes |
//! | `admin NAME` | `admin-NAME.pem`, `admin-NAME-key.pem` | CN=NAME, O=weft:admins |
//!
//! Existing files are replaced only with `--force` (a rotation); `init`
//! never replaces a CA key, which would invalidate every certificate.

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

use weft_lease::tls::{ADMINS_ORG, NODES_ORG};

/// What to make.
#[derive(Debug)]
pub enum Request {
    Ca,
    Server { hosts: Vec<String> },
    Node { name: String },
    Admin { name: String },
}

/// How to write the files.
#[derive(Debug, Default)]
pub struct Options {
    /// Valid for this many days.
    pub days: u32,
    /// Replace existing files (a rotation); never a CA.
    pub force: bool,
    /// Group that may read the key (mode 0640): the user a service runs as,
    /// e.g. `weft-controller`.
    pub key_group: Option<String>,
}

/// Makes `req`'s certificate and key in `dir`; returns the files written.
pub fn issue(dir: &Path, req: &Request, opts: &Options) -> Result<Vec<PathBuf>> {
    let days = opts.days;
    if days == 0 {
        bail!("--days must be at least 1");
    }
    let key_gid = opts.key_group.as_deref().map(group_id).transpose()?;
    let (stem, params) = match req {
        Request::Ca => ("ca".to_string(), ca_params(days)),
        Request::Server { hosts } => ("server".to_string(), server_params(hosts, days)?),
        Request::Node { name } => {
            check_name(name)?;
            (format!("node-{name}"), client_params(name, NODES_ORG, days))
        }
        Request::Admin { name } => {
            check_name(name)?;
            (
                format!("admin-{name}"),
                client_params(name, ADMINS_ORG, days),
            )
        }
    };
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}-key.pem"));
    let exists = cert_path.exists() || key_path.exists();
    if matches!(req, Request::Ca) && exists {
        bail!(
            "{} already holds a CA (ca.pem or ca-key.pem); a new CA would invalidate every \
             certificate it signed. Use another --dir for a new cluster",
            dir.display()
        );
    }
    if exists && !opts.force {
        bail!(
            "{} exists; give --force to replace it (a rotation)",
            cert_path.display()
        );
    }
    // A rotation keeps who may read the key, unless told otherwise.
    let key_gid = match key_gid {
        Some(g) => Some(g),
        None => shared_group(&key_path)?,
    };
    prepare_dir(dir, key_gid.is_some())?;
    let key = KeyPair::generate().context("generating a key")?;
    let cert = match req {
        Request::Ca => params.self_signed(&key).context("signing the CA")?,
        _ => {
            let issuer = load_ca(dir)?;
            params
                .signed_by(&key, &issuer)
                .context("signing with the CA")?
        }
    };
    // A CA is never replaced, not even by a run racing this one.
    let replace = !matches!(req, Request::Ca);
    // The key first: a node that reads both sees the new key with the old
    // certificate for a moment, keeps its old pair, and takes the new one
    // once the certificate follows.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), key_gid, replace)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), None, replace)?;
    Ok(vec![cert_path, key_path])
}

/// The group an existing key is shared with (mode 0640), if any.
fn shared_group(key: &Path) -> Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(key) {
        Ok(m) if m.mode() & 0o040 != 0 => Ok(Some(m.gid())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", key.display())),
    }
}

/// Creates `dir` 0700, or checks an existing one. A key shared with a
/// service's group needs the directory passable (0711: entering, not
/// listing; every key keeps its own mode). An existing directory is never
/// made stricter (that would lock out a service given access before), and
/// one others may write to is refused (they could swap the files).
fn prepare_dir(dir: &Path, shared: bool) -> Result<()> {
    let mode = if dir.exists() {
        let current = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
        if current & 0o022 != 0 {
            bail!(
                "{} is writable by others (mode {current:o}); keys do not belong there",
                dir.display()
            );
        }
        current
    } else {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        0o700
    };
    let wanted = if shared { mode | 0o711 } else { mode };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(wanted))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

fn check_name(name: &str) -> Result<()> {
    weft_lease::NodeName::new(name.to_string())
        .map(|_| ())
        .with_context(|| format!("{name:?} is not a valid node name"))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that are behind.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(i64::from(days));
}

fn ca_params(days: u32) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "weft CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, days);
    p
}

fn server_params(hosts: &[String], days: u32) -> Result<CertificateParams> {
    let Some(first) = hosts.first() else {
        bail!("give the names and addresses nodes use for the controller: --host NAME_OR_IP ...");
    };
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, first.as_str());
    p.distinguished_name = dn;
    for h in hosts {
        let san = match h.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.clone().try_into().with_context(|| {
                format!("--host {h:?} is neither an IP address nor a DNS name")
            })?),
        };
        p.subject_alt_names.push(san);
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut p, days);
    Ok(p)
}

fn client_params(name: &str, org: &str, days: u32) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, org);
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut p, days);
    p
}

fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    let cert = std::fs::read_to_string(&cert_path).with_context(|| {
        format!(
            "reading {} (make the CA first: weftctl pki init --dir {})",
            cert_path.display(),
            dir.display()
        )
    })?;
    let key = std::fs::read_to_string(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key).with_context(|| format!("{}", key_path.display()))?;
    Issuer::from_ca_cert_pem(&cert, key).with_context(|| format!("{}", cert_path.display()))
}

/// The id of group `name` (from /etc/group).
fn group_id(name: &str) -> Result<u32> {
    let groups = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(n, _)| *n == name)
        .and_then(|(_, gid)| gid.parse().ok())
        .with_context(|| {
            format!("no group {name:?} in /etc/group (is the package that creates it installed?)")
        })
}

/// Writes `path` through a temporary file in the same directory (renamed
/// over it, or with `replace` false linked to a name that must be new). A
/// certificate gets 0644; a key (`*-key.pem`) 0600, or 0640 with group
/// `key_gid`, set before it gets its name: never readable by others, not
/// even for a moment.
fn write_atomic(path: &Path, bytes: &[u8], key_gid: Option<u32>, replace: bool) -> Result<()> {
    let is_key = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with("-key.pem"));
    let mode = match (is_key, key_gid) {
        (false, _) => 0o644,
        (true, None) => 0o600,
        (true, Some(_)) => 0o640,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("pki")
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    if let (true, Some(gid)) = (is_key, key_gid) {
        std::os::unix::fs::fchown(&f, None, Some(gid))
            .with_context(|| format!("setting the group of {}", path.display()))?;
    }
    if replace {
        return std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()));
    }
    // A new name only: a link fails if the name exists.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.with_context(|| format!("writing {} (it must not exist)", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(force: bool) -> Options {
        Options {
            days: 30,
            force,
            key_group: None,
        }
    }

    #[test]
    fn a_key_for_a_service_group() {
        let dir = tempfile::tempdir().unwrap();
        let d = &dir.path().join("pki");
        issue(d, &Request::Ca, &opts(false)).unwrap();
        // "root" is in every /etc/group, with id 0.
        let o = Options {
            key_group: Some("root".into()),
            ..opts(false)
        };
        issue(
            d,
            &Request::Server {
                hosts: vec!["127.0.0.1".into()],
            },
            &o,
        )
        .unwrap();
        let m = std::fs::metadata(d.join("server-key.pem")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o640);
        // The service can reach it: the directory is passable, not listable.
        let dm = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(dm & 0o011, 0o011);
        assert_eq!(dm & 0o044, 0, "{dm:o}");
        // A later issue without a group does not lock the service out.
        issue(d, &Request::Admin { name: "y".into() }, &opts(false)).unwrap();
        assert_eq!(
            std::fs::metadata(d).unwrap().permissions().mode() & 0o011,
            0o011
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.gid(), 0);
        let o = Options {
            key_group: Some("no-such-group-here".into()),
            ..opts(true)
        };
        let e = issue(d, &Request::Admin { name: "x".into() }, &o).unwrap_err();
        assert!(e.to_string().contains("no group"), "{e}");
    }

    #[test]
    fn a_cluster_pki_with_modes_and_subjects() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("pki");
        issue(&d, &Request::Ca, &opts(false)).unwrap();
        let e = issue(&d, &Request::Ca, &opts(true)).unwrap_err();
        assert!(e.to_string().contains("already holds a CA"), "{e}");
        // With the CA key moved offline, ca.pem alone still counts.
        std::fs::rename(d.join("ca-key.pem"), dir.path().join("offline.pem")).unwrap();
        let e = issue(&d, &Request::Ca, &opts(false)).unwrap_err();
        assert!(e.to_string().contains("already holds a CA"), "{e}");
        std::fs::rename(dir.path().join("offline.pem"), d.join("ca-key.pem")).unwrap();
        issue(
            &d,
            &Request::Server {
                hosts: vec!["controller.example".into(), "198.18.0.1".into()],
            },
            &opts(false),
        )
        .unwrap();
        let files = issue(
            &d,
            &Request::Node {
                name: "host-1".into(),
            },
            &opts(false),
        )
        .unwrap();
        assert_eq!(files[0], d.join("node-host-1.pem"));
        let e = issue(
            &d,
            &Request::Node {
                name: "host-1".into(),
            },
            &opts(false),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        issue(
            &d,
            &Request::Node {
                name: "host-1".into(),
            },
            &opts(true),
        )
        .unwrap();
        issue(&d, &Request::Admin { name: "ops".into() }, &opts(false)).unwrap();
        assert!(issue(
            &d,
            &Request::Node {
                name: "Bad Name".into()
            },
            &opts(false)
        )
        .is_err());
        let mode = |f: &str| std::fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("ca-key.pem"), 0o600);
        assert_eq!(mode("node-host-1-key.pem"), 0o600);
        assert_eq!(mode("node-host-1.pem"), 0o644);
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Subjects, read back with the same parser the controller uses.
        use x509_parser::prelude::{FromDer, X509Certificate};
        let pem = std::fs::read(d.join("admin-ops.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "ops");
        let o = cert.subject().iter_organization().next().unwrap();
        assert_eq!(o.as_str().unwrap(), ADMINS_ORG);
    }

    #[test]
    fn leaf_certificates_need_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let e = issue(
            dir.path(),
            &Request::Node { name: "n".into() },
            &opts(false),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("weftctl pki init"), "{e:#}");
    }
}
