//! The PKI of one rna installation: a CA, the hub's server certificate and the agents' client
//! certificates, made with rcgen, written to disk with private keys at mode 0600 (see
//! `issue.rs`), and read back and checked here: names, expiry, PEM files.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

mod issue;

pub(crate) use issue::LAST_X509_SECOND;
pub use issue::{init_dir, issue_agent_files, write_private, Ca, IssuedCert};

// A certificate's common name is an agent name; callers that check names for certificates
// find the rule here too.
pub use crate::identity::valid_agent_name;

/// How long before a certificate's expiry hub and agent start warning about it.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Errors making, writing or reading certificates; messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading, writing or creating a file or directory failed.
    #[error("cannot read or write {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// rcgen refused to make or sign a certificate.
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    /// A PEM file is malformed or holds nothing of the wanted kind.
    #[error("{}: {message}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// In-memory PEM text is malformed or holds nothing of the wanted kind.
    #[error("PEM text: {0}")]
    PemText(String),
    /// A file would be overwritten without `force`.
    #[error("{} already exists (use --force to overwrite it)", .0.display())]
    Exists(PathBuf),
    /// The file to write is a symbolic link; rna never writes through one.
    #[error("{} is a symbolic link; rna does not write through links (remove it, or give --dir a folder without links)", .0.display())]
    Symlink(PathBuf),
    /// The certificate has no subject common name, so it names no agent.
    #[error("certificate has no subject common name")]
    NoCommonName,
    /// The agent name is not `^[A-Za-z0-9_-]{1,63}$`.
    #[error("invalid agent name {0:?}: use 1 to 63 letters, digits, '-' or '_'")]
    BadName(String),
    /// A hub name is neither a DNS name nor an IP address.
    #[error("invalid hub name {0:?}: expected a DNS name or an IP address")]
    BadHubName(String),
    /// The hub certificate was asked for without any name.
    #[error("the hub certificate needs at least one DNS name or IP address")]
    NoHubName,
    /// A DER certificate could not be parsed or is ambiguous.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The CA certificate and key cannot issue certificates together.
    #[error("CA: {0}")]
    BadCa(String),
    /// The validity window is empty or outside what X.509 can express.
    #[error("invalid validity window: {0}")]
    Validity(&'static str),
}

/// The `Io` error of `path`, for `map_err`.
fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The subject common name of a DER certificate (the agent's identity). A certificate with
/// several common names is refused, since it would name more than one agent.
pub fn common_name(cert_der: &[u8]) -> Result<String, CertError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::Certificate(e.to_string()))?;
    let mut names = x509.subject().iter_common_name();
    let first = names.next().ok_or(CertError::NoCommonName)?;
    if names.next().is_some() {
        return Err(CertError::Certificate(
            "more than one subject common name".into(),
        ));
    }
    first
        .as_str()
        .map(str::to_string)
        .map_err(|e| CertError::Certificate(format!("subject common name: {e}")))
}

/// An X.509 time as a `SystemTime`; `None` before 1970.
fn system_time(t: x509_parser::time::ASN1Time) -> Option<SystemTime> {
    let secs = u64::try_from(t.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The last instant a DER certificate is valid (its `notAfter`).
pub fn not_after(cert_der: &[u8]) -> Result<SystemTime, CertError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::Certificate(e.to_string()))?;
    system_time(x509.validity().not_after).ok_or(CertError::Validity("notAfter before 1970"))
}

/// Whether every certificate of a peer's chain is within its validity period at `now`: what
/// the certificate check of a full TLS handshake ensures and a resumed session, whose chain
/// comes from its ticket (`transport::tickets`), has to ensure after the handshake. The
/// reason when not.
pub fn chain_valid_at(chain: &[CertificateDer<'_>], now: SystemTime) -> Result<(), String> {
    for cert in chain {
        let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| format!("certificate: {e}"))?;
        let validity = x509.validity();
        let subject = x509.subject();
        if system_time(validity.not_after).is_none_or(|end| now > end) {
            return Err(format!(
                "certificate {subject} expired at {}",
                validity.not_after
            ));
        }
        if system_time(validity.not_before).is_some_and(|start| now < start) {
            return Err(format!(
                "certificate {subject} is not valid before {}",
                validity.not_before
            ));
        }
    }
    Ok(())
}

/// The `notAfter` of the first certificate in a PEM file, for `rna certs` to print (`None`
/// for a key file).
pub fn file_expiry(path: &Path) -> Option<SystemTime> {
    let certs = load_certs(path).ok()?;
    not_after(certs.first()?.as_ref()).ok()
}

/// A warning for a certificate that expires within [`EXPIRY_WARNING`] of `now` (or has
/// expired): `what` names it ("this hub's certificate"). `None` while it has longer to live.
pub fn expiry_warning(what: &str, not_after: SystemTime, now: SystemTime) -> Option<String> {
    let at = crate::clock::format_rfc3339(
        not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    match not_after.duration_since(now) {
        Ok(left) if left > EXPIRY_WARNING => None,
        Ok(left) => Some(format!(
            "{what} expires in {} days, at {at}; renew it before then (docs/operations.md, \
             Certificates)",
            left.as_secs() / 86_400
        )),
        Err(_) => Some(format!(
            "{what} expired at {at}; renew it (docs/operations.md, Certificates)"
        )),
    }
}

/// Logs a warning for each certificate of `expiries` (`(role, notAfter)`, as
/// `ServerTls::expiries` gives them) that expires within [`EXPIRY_WARNING`]; `whose` names
/// the owner of the non-CA ones ("this hub's").
pub fn warn_expiring(expiries: &[(&'static str, SystemTime)], whose: &str) {
    let now = SystemTime::now();
    for (role, not_after) in expiries {
        let what = match *role {
            "ca" => "the CA certificate (--ca)".to_string(),
            _ => format!("{whose} certificate (--cert)"),
        };
        if let Some(warning) = expiry_warning(&what, *not_after, now) {
            tracing::warn!(role = *role, "{warning}");
        }
    }
}

/// `rna_certificate_expiry_timestamp_seconds{role}`: when each certificate a process uses
/// expires (`role` = `hub`, `agent` or `ca`; the agent also reports the `hub` certificate it
/// was shown), so an alert can fire long before a certificate lapses.
#[derive(Debug, Clone, Default)]
pub struct ExpiryMetric(
    prometheus_client::metrics::family::Family<
        Vec<(&'static str, String)>,
        prometheus_client::metrics::gauge::Gauge,
    >,
);

impl ExpiryMetric {
    /// Registers the gauge family in `registry` (prefixed `rna_` by the registry).
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> ExpiryMetric {
        let metric = ExpiryMetric::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each certificate in use expires (Unix time), by role",
            metric.0.clone(),
        );
        metric
    }

    /// Records when the certificate of `role` expires.
    pub fn set(&self, role: &str, not_after: SystemTime) {
        let secs = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.0
            .get_or_create(&vec![("role", role.to_string())])
            .set(secs);
    }
}

/// The first certificate of a non-empty list (`load_certs` and `parse_certs` never return empty).
fn first_cert(certs: Vec<CertificateDer<'static>>) -> Result<CertificateDer<'static>, CertError> {
    certs
        .into_iter()
        .next()
        .ok_or_else(|| CertError::PemText("no certificate".into()))
}

/// Loads all certificates from a PEM file (rustls_pki_types::CertificateDer<'static>), error if
/// none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read_pem_file(path)?;
    certs_from_pem(&bytes).map_err(|message| CertError::Pem {
        path: path.to_path_buf(),
        message,
    })
}

/// Loads one private key (PKCS#8, PKCS#1 or SEC1) from a PEM file (PrivateKeyDer<'static>),
/// error if none.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read_pem_file(path)?;
    key_from_pem(&bytes).map_err(|message| CertError::Pem {
        path: path.to_path_buf(),
        message,
    })
}

/// Reads a PEM file of at most [`MAX_PEM_FILE`](crate::fsutil::MAX_PEM_FILE) bytes; a FIFO or
/// device is refused rather than read.
fn read_pem_file(path: &Path) -> Result<Vec<u8>, CertError> {
    crate::fsutil::read_bytes(path, crate::fsutil::MAX_PEM_FILE).map_err(|e| CertError::Io {
        path: e.path,
        source: e.problem.into(),
    })
}

/// Same as [`load_certs`] from in-memory PEM text (tests and `rna dev` use this).
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    certs_from_pem(pem.as_bytes()).map_err(CertError::PemText)
}

/// Same as [`load_key`] from in-memory PEM text (tests and `rna dev` use this).
pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    key_from_pem(pem.as_bytes()).map_err(CertError::PemText)
}

fn certs_from_pem(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate (-----BEGIN CERTIFICATE-----) found".into());
    }
    Ok(certs)
}

fn key_from_pem(bytes: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no private key (-----BEGIN PRIVATE KEY-----) found".to_string()
        }
        other => format!("malformed PEM: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use rustls_pki_types::ServerName;

    use super::issue::{pem_encode, write_public};
    use super::*;
    use std::net::Ipv4Addr;
    use x509_parser::extensions::GeneralName;

    fn parse(pem: &str) -> CertificateDer<'static> {
        parse_certs(pem).unwrap().remove(0)
    }

    #[test]
    fn ca_is_a_constrained_ca() {
        let ca = Ca::generate("test CA").unwrap();
        let der = ca.cert_der();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let bc = x509.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
        assert_eq!(common_name(&der).unwrap(), "test CA");
        assert_eq!(parse(&ca.cert_pem()).as_ref(), der.as_slice());
        parse_key(&ca.key_pem()).unwrap();
    }

    #[test]
    fn hub_certificate_names() {
        let ca = Ca::generate("test CA").unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let hub = ca.issue_hub(&names).unwrap();
        let der = parse(&hub.cert_pem);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            san.general_names,
            vec![
                GeneralName::DNSName("localhost"),
                GeneralName::IPAddress(&Ipv4Addr::LOCALHOST.octets()),
            ]
        );
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!x509.basic_constraints().unwrap().unwrap().value.ca);
        assert_eq!(common_name(&der).unwrap(), "localhost");
        assert_eq!(
            x509.issuer(),
            x509_parser::parse_x509_certificate(&ca.cert_der())
                .unwrap()
                .1
                .subject()
        );
        let days = (x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, 825);
        parse_key(&hub.key_pem).unwrap();
    }

    #[test]
    fn hub_names_are_checked() {
        let ca = Ca::generate("test CA").unwrap();
        assert!(matches!(ca.issue_hub(&[]), Err(CertError::NoHubName)));
        for bad in ["", "has space", "a..b", "-"] {
            let err = ca.issue_hub(&[bad.to_string()]).unwrap_err();
            assert!(
                matches!(err, CertError::BadHubName(ref n) if n == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn agent_certificate_names_the_agent() {
        let ca = Ca::generate("test CA").unwrap();
        let agent = ca.issue_agent("prod-eu_1").unwrap();
        let der = parse(&agent.cert_pem);
        assert_eq!(common_name(&der).unwrap(), "prod-eu_1");
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(x509.validity().is_valid());
    }

    #[test]
    fn agent_validity_window() {
        let ca = Ca::generate("test CA").unwrap();
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let expired = ca
            .issue_agent_with_validity("old", now - 10 * day, now - day)
            .unwrap();
        let der = parse(&expired.cert_pem);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x509.validity().is_valid());
        assert!(matches!(
            ca.issue_agent_with_validity("a", now, now - day),
            Err(CertError::Validity(_))
        ));
        assert!(matches!(
            ca.issue_agent_with_validity("a", SystemTime::UNIX_EPOCH - day, now),
            Err(CertError::Validity(_))
        ));
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_X509_SECOND + 1);
        assert!(matches!(
            ca.issue_agent_with_validity("a", now, far),
            Err(CertError::Validity(_))
        ));
    }

    #[test]
    fn from_pem_round_trip_can_issue() {
        let ca = Ca::generate("test CA").unwrap();
        let loaded = Ca::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let agent = loaded.issue_agent("a1").unwrap();
        let der = parse(&agent.cert_pem);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca_der = ca.cert_der();
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(x509.issuer(), ca_x509.subject());
        x509.verify_signature(Some(ca_x509.public_key())).unwrap();
    }

    #[test]
    fn from_pem_refuses_mismatched_or_non_ca() {
        let ca = Ca::generate("one").unwrap();
        let other = Ca::generate("two").unwrap();
        let err = Ca::from_pem(&ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let leaf = ca.issue_agent("a").unwrap();
        let err = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
        assert!(matches!(
            Ca::from_pem("", &ca.key_pem()),
            Err(CertError::PemText(_))
        ));
        assert!(matches!(
            Ca::from_pem(&ca.cert_pem(), ""),
            Err(CertError::PemText(_))
        ));
    }

    #[test]
    fn agent_names() {
        let long = "a".repeat(63);
        let too_long = "a".repeat(64);
        let table: &[(&str, bool)] = &[
            ("a", true),
            ("prod-eu_1", true),
            ("ABC-xyz_09", true),
            (&long, true),
            ("", false),
            (&too_long, false),
            ("has space", false),
            ("dot.ted", false),
            ("slash/x", false),
            ("../etc", false),
            ("ünïcode", false),
            ("tab\t", false),
        ];
        let ca = Ca::generate("test CA").unwrap();
        for &(name, ok) in table {
            assert_eq!(valid_agent_name(name), ok, "{name:?}");
            if !ok {
                let err = ca.issue_agent(name).unwrap_err();
                assert!(
                    matches!(err, CertError::BadName(ref n) if n == name),
                    "{name:?}"
                );
            }
        }
    }

    #[test]
    fn init_dir_writes_four_files_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let paths = init_dir(&dir, &names, false).unwrap();
        let files: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(files, ["ca.pem", "ca-key.pem", "hub.pem", "hub-key.pem"]);
        for path in &paths {
            assert!(path.is_file());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&paths[1]), 0o600);
            assert_eq!(mode(&paths[3]), 0o600);
        }
        let ca_before = fs::read(&paths[0]).unwrap();
        let err = init_dir(&dir, &names, false).unwrap_err();
        assert!(
            matches!(err, CertError::Exists(ref p) if p == &paths[0]),
            "{err}"
        );
        assert!(err.to_string().contains("ca.pem"));
        assert_eq!(fs::read(&paths[0]).unwrap(), ca_before);

        init_dir(&dir, &names, true).unwrap();
        assert_ne!(fs::read(&paths[0]).unwrap(), ca_before);
        // The loaded files make a working pair: the hub chains to the CA.
        let ca = load_certs(&paths[0]).unwrap();
        let hub = load_certs(&paths[2]).unwrap();
        load_key(&paths[3]).unwrap();
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca[0]).unwrap();
        let (_, hub_x509) = x509_parser::parse_x509_certificate(&hub[0]).unwrap();
        hub_x509
            .verify_signature(Some(ca_x509.public_key()))
            .unwrap();
    }

    #[test]
    fn init_dir_with_bad_hub_name_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let err = init_dir(&dir, &["bad name".to_string()], false).unwrap_err();
        assert!(matches!(err, CertError::BadHubName(_)));
        assert!(!dir.exists());
    }

    #[test]
    fn issue_agent_files_uses_the_ca_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let paths = init_dir(dir, &["localhost".to_string()], false).unwrap();
        let (cert, key) = issue_agent_files(dir, "edge-1", false).unwrap();
        assert_eq!(cert, dir.join("agent-edge-1.pem"));
        assert_eq!(key, dir.join("agent-edge-1-key.pem"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let certs = load_certs(&cert).unwrap();
        load_key(&key).unwrap();
        assert_eq!(common_name(&certs[0]).unwrap(), "edge-1");
        let ca = load_certs(&paths[0]).unwrap();
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca[0]).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
        x509.verify_signature(Some(ca_x509.public_key())).unwrap();

        let err = issue_agent_files(dir, "edge-1", false).unwrap_err();
        assert!(matches!(err, CertError::Exists(ref p) if p == &cert));
        issue_agent_files(dir, "edge-1", true).unwrap();
        assert!(matches!(
            issue_agent_files(dir, "../x", false),
            Err(CertError::BadName(_))
        ));

        let empty = tempfile::tempdir().unwrap();
        let err = issue_agent_files(empty.path(), "edge-1", false).unwrap_err();
        assert!(matches!(err, CertError::Io { ref path, .. } if path.ends_with("ca.pem")));
    }

    #[test]
    fn load_certs_without_certificates_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("empty.pem");
        fs::write(&path, "just text\n").unwrap();
        let err = load_certs(&path).unwrap_err();
        assert!(matches!(err, CertError::Pem { .. }));
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let err = load_key(&path).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let missing = tmp.path().join("missing.pem");
        let err = load_certs(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let broken = tmp.path().join("broken.pem");
        fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let err = load_certs(&broken).unwrap_err();
        assert!(err.to_string().contains("broken.pem"), "{err}");
        assert!(parse_certs("").is_err());
        assert!(parse_key("").is_err());
    }

    #[test]
    fn write_private_modes_and_force() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("token");
        write_private(&path, b"one", false).unwrap();
        assert!(matches!(
            write_private(&path, b"two", false),
            Err(CertError::Exists(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), b"one");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            write_private(&path, b"2", true).unwrap();
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(fs::read(&path).unwrap(), b"2");
    }

    #[test]
    fn a_link_at_the_target_is_never_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let link = tmp.path().join("key.pem");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        for force in [false, true] {
            let err = write_private(&link, b"key", force).unwrap_err();
            assert!(matches!(err, CertError::Symlink(_)), "force {force}: {err}");
            assert!(err.to_string().contains("symbolic link"), "{err}");
        }
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        // A dangling link is refused too (it would create its target).
        let dangling = tmp.path().join("dangling.pem");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        assert!(write_public(&dangling, b"cert", true).is_err());
        assert!(!tmp.path().join("nowhere").exists());
        // Nothing but the files made here is left behind (no temporary file).
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 3);
    }

    #[test]
    fn expiry_warnings_start_30_days_before() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(expiry_warning("x", now + 31 * day, now), None);
        let soon = expiry_warning("this hub's certificate", now + 10 * day, now).unwrap();
        assert!(
            soon.starts_with("this hub's certificate expires in 10 days, at 2027-"),
            "{soon}"
        );
        assert!(soon.contains("renew it"), "{soon}");
        let gone = expiry_warning("x", now - day, now).unwrap();
        assert!(gone.starts_with("x expired at "), "{gone}");
        let ca = Ca::generate("test CA").unwrap();
        let hub = ca
            .issue_hub_with_validity(&["localhost".into()], now - day, now + 10 * day)
            .unwrap();
        let der = parse(&hub.cert_pem);
        assert_eq!(not_after(&der).unwrap(), now + 10 * day);
    }

    #[test]
    fn debug_masks_keys() {
        let ca = Ca::generate("test CA").unwrap();
        let issued = ca.issue_agent("a").unwrap();
        let shown = format!("{issued:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains("MASKED"));
        let shown = format!("{ca:?}");
        assert!(
            !shown.contains("PRIVATE KEY") && shown.contains("MASKED"),
            "{shown}"
        );
    }

    /// Runs a TLS 1.3 handshake in memory: the hub's certificate for `server_name`, the agent's
    /// client certificate, both verified by rustls (webpki) against `ca`.
    fn handshake(
        ca: &Ca,
        hub: &IssuedCert,
        agent: &IssuedCert,
        server_name: &str,
    ) -> Result<(), rustls::Error> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.cert_der())).unwrap();
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                parse_certs(&hub.cert_pem).unwrap(),
                parse_key(&hub.key_pem).unwrap(),
            )
            .unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                parse_certs(&agent.cert_pem).unwrap(),
                parse_key(&agent.key_pem).unwrap(),
            )
            .unwrap();
        let name = ServerName::try_from(server_name.to_string()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client_config), name).unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                let peer = server.peer_certificates().unwrap();
                assert_eq!(
                    common_name(&peer[0]).unwrap(),
                    common_name(&parse(&agent.cert_pem)).unwrap()
                );
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn rustls_accepts_the_pki() {
        let ca = Ca::generate("test CA").unwrap();
        let hub = ca
            .issue_hub(&["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
        let agent = ca.issue_agent("edge-1").unwrap();
        handshake(&ca, &hub, &agent, "localhost").unwrap();
        handshake(&ca, &hub, &agent, "127.0.0.1").unwrap();
        // A CA loaded back from PEM issues certificates that chain the same way.
        let loaded = Ca::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        handshake(
            &ca,
            &hub,
            &loaded.issue_agent("edge-2").unwrap(),
            "localhost",
        )
        .unwrap();
    }

    #[test]
    fn rustls_refuses_wrong_name_expired_agent_and_foreign_ca() {
        use rustls::{CertificateError as C, Error::InvalidCertificate};
        let ca = Ca::generate("test CA").unwrap();
        let hub = ca.issue_hub(&["localhost".to_string()]).unwrap();
        let agent = ca.issue_agent("edge-1").unwrap();
        let err = handshake(&ca, &hub, &agent, "other.example").unwrap_err();
        assert!(
            matches!(err, InvalidCertificate(C::NotValidForNameContext { .. })),
            "{err:?}"
        );
        // An agent certificate used as a server certificate lacks ServerAuth.
        let wrong_use = ca.issue_agent("localhost").unwrap();
        let err = handshake(&ca, &wrong_use, &agent, "localhost").unwrap_err();
        assert!(
            matches!(err, InvalidCertificate(C::InvalidPurposeContext { .. })),
            "{err:?}"
        );
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let expired = ca
            .issue_agent_with_validity("old", now - 10 * day, now - day)
            .unwrap();
        let err = handshake(&ca, &hub, &expired, "localhost").unwrap_err();
        assert!(
            matches!(err, InvalidCertificate(C::ExpiredContext { .. })),
            "{err:?}"
        );
        let foreign = Ca::generate("other CA")
            .unwrap()
            .issue_agent("edge-1")
            .unwrap();
        let err = handshake(&ca, &hub, &foreign, "localhost").unwrap_err();
        assert!(
            matches!(err, InvalidCertificate(C::UnknownIssuer)),
            "{err:?}"
        );
    }

    #[test]
    fn pem_encoding_matches_base64() {
        // RFC 4648 section 10 test vectors, through the PEM body.
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let pem = pem_encode("X", input.as_bytes());
            let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            assert_eq!(body, expected);
        }
        let long = pem_encode("X", &[0u8; 100]);
        assert!(long.lines().all(|l| l.len() <= 64));
        // Unix line ends only, like the key files beside it, and a final newline.
        assert!(!long.contains('\r'), "{long:?}");
        assert!(long.starts_with("-----BEGIN X-----\nAAAA"), "{long:?}");
        assert!(long.ends_with("AA==\n-----END X-----\n"), "{long:?}");
    }

    #[test]
    fn a_chain_is_valid_only_within_every_certificates_period() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["agent".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 2, 1);
        let cert = params.self_signed(&key).unwrap().der().clone();
        let jan_15 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_768_435_200);
        assert_eq!(chain_valid_at(std::slice::from_ref(&cert), jan_15), Ok(()));
        let march = jan_15 + Duration::from_secs(50 * 86_400);
        let expired = chain_valid_at(std::slice::from_ref(&cert), march).unwrap_err();
        assert!(expired.contains("expired"), "{expired}");
        let december = jan_15 - Duration::from_secs(30 * 86_400);
        let early = chain_valid_at(std::slice::from_ref(&cert), december).unwrap_err();
        assert!(early.contains("not valid before"), "{early}");
        assert!(chain_valid_at(&[CertificateDer::from(vec![1, 2, 3])], jan_15).is_err());
    }
}
