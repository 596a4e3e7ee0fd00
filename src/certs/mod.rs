//! The PKI of one rna installation: a CA, the hub's server certificate and the agents' client
//! certificates, made with rcgen, written to disk with private keys at mode 0600, and read back.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

// A certificate's common name is an agent name; callers that check names for certificates
// find the rule here too.
pub use crate::identity::valid_agent_name;

/// One day, the backdating of `not_before` that absorbs clock skew between machines.
const SKEW: Duration = Duration::from_secs(24 * 60 * 60);
/// The CA lives ten years from its creation: replacing it means re-issuing every certificate.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Leaf certificates live 825 days, the longest validity clients commonly still accept.
const LEAF_VALIDITY: Duration = Duration::from_secs(825 * 24 * 60 * 60);
/// 9999-12-31T23:59:59Z: the last instant an X.509 time (GeneralizedTime) can hold.
const LAST_X509_SECOND: u64 = 253_402_300_799;
/// How long before a certificate's expiry hub and agent start warning about it.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 60 * 60);

// File names inside a certificate directory, shared by `init_dir` and `issue_agent_files`.
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const HUB_CERT_FILE: &str = "hub.pem";
const HUB_KEY_FILE: &str = "hub-key.pem";

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

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, `-----BEGIN CERTIFICATE-----`.
    pub cert_pem: String,
    /// The PKCS#8 private key, `-----BEGIN PRIVATE KEY-----`; never printed by `Debug`.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"MASKED")
            .finish()
    }
}

/// A certificate authority that signs the hub's and the agents' certificates.
pub struct Ca {
    /// The CA's subject name, key identifier method and signing key, as rcgen signs with them.
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate itself, which hub and agents trust.
    cert_der: CertificateDer<'static>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("common_name", &common_name(&self.cert_der).ok())
            .field("key", &"MASKED")
            .finish()
    }
}

impl Ca {
    /// Makes a new self-signed CA: ECDSA P-256, may sign leaf certificates only (path length 0),
    /// valid from one day ago until ten years from now.
    pub fn generate(common_name: &str) -> Result<Ca, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after) = window_from_now(CA_VALIDITY.saturating_add(SKEW))?;
        set_validity(&mut params, not_before, not_after)?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_der: cert.der().clone(),
        })
    }

    /// Loads a CA from its PEM certificate (the first one in `cert_pem`) and its PEM PKCS#8 key,
    /// to issue agent certificates after `rna certs init`. Checks that the certificate is a CA
    /// and that the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        let cert = first_cert(parse_certs(cert_pem)?)?;
        let key = parse_key(key_pem)?;
        Self::from_der(cert, &key)
    }

    fn from_der(
        cert_der: CertificateDer<'static>,
        key: &PrivateKeyDer<'_>,
    ) -> Result<Ca, CertError> {
        let key = KeyPair::try_from(key)
            .map_err(|e| CertError::BadCa(format!("unusable key (PKCS#8 expected): {e}")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CertError::Certificate(e.to_string()))?;
        let is_ca = x509
            .basic_constraints()
            .map_err(|e| CertError::Certificate(e.to_string()))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(CertError::BadCa(
                "the certificate is not a CA certificate".into(),
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::BadCa(
                "the key does not belong to the certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Ca { issuer, cert_der })
    }

    /// The CA certificate as PEM (`ca.pem`).
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// The CA private key as PKCS#8 PEM (`ca-key.pem`).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate as DER, for trust stores.
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert_der.to_vec()
    }

    /// Hub server cert: SANs = names (each parsed as IP address if it parses, else DNS name);
    /// CN = first name; EKU ServerAuth; validity 825 days.
    pub fn issue_hub(&self, names: &[String]) -> Result<IssuedCert, CertError> {
        let (not_before, not_after) = window_from_now(LEAF_VALIDITY)?;
        self.issue_hub_with_validity(names, not_before, not_after)
    }

    /// Like [`issue_hub`](Ca::issue_hub) with an explicit validity window (tests of expiry).
    pub fn issue_hub_with_validity(
        &self,
        names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CertError> {
        let first = names.first().ok_or(CertError::NoHubName)?;
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            // The agent checks the hub with rustls, so accept exactly what rustls accepts.
            if ServerName::try_from(name.as_str()).is_err() {
                return Err(CertError::BadHubName(name.clone()));
            }
            sans.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into()?),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(first);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_leaf(params, not_before, not_after)
    }

    /// Agent client cert: subject CN = agent name (validated `^[A-Za-z0-9_-]{1,63}$`, else
    /// `BadName`), EKU ClientAuth; validity 825 days.
    pub fn issue_agent(&self, name: &str) -> Result<IssuedCert, CertError> {
        let (not_before, not_after) = window_from_now(LEAF_VALIDITY)?;
        self.issue_agent_with_validity(name, not_before, not_after)
    }

    /// Like issue_agent but with an explicit validity window (for tests of expired certificates).
    pub fn issue_agent_with_validity(
        &self,
        name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CertError> {
        if !valid_agent_name(name) {
            return Err(CertError::BadName(name.to_string()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_leaf(params, not_before, not_after)
    }

    /// Signs a leaf certificate for a fresh P-256 key: no CA rights, digital signature only.
    fn issue_leaf(
        &self,
        mut params: CertificateParams,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CertError> {
        set_validity(&mut params, not_before, not_after)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A validity window that starts one day ago (clock skew) and lasts `validity`.
fn window_from_now(validity: Duration) -> Result<(SystemTime, SystemTime), CertError> {
    let clock = || CertError::Validity("the system clock is out of range");
    let not_before = SystemTime::now().checked_sub(SKEW).ok_or_else(clock)?;
    let not_after = not_before.checked_add(validity).ok_or_else(clock)?;
    Ok((not_before, not_after))
}

/// A subject with only a common name (rcgen's default carries a placeholder CN).
fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Sets the validity window after checking that it is non-empty and fits X.509 times.
fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), CertError> {
    if not_after <= not_before {
        return Err(CertError::Validity(
            "not_after must be later than not_before",
        ));
    }
    for time in [not_before, not_after] {
        // Converting a time outside 1970..=9999 would panic in the time crate or not encode.
        match time.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(since) if since.as_secs() <= LAST_X509_SECOND => {}
            _ => return Err(CertError::Validity("times must lie between 1970 and 9999")),
        }
    }
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(())
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

/// The last instant a DER certificate is valid (its `notAfter`).
pub fn not_after(cert_der: &[u8]) -> Result<SystemTime, CertError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::Certificate(e.to_string()))?;
    let secs = x509.validity().not_after.timestamp();
    let secs = u64::try_from(secs).map_err(|_| CertError::Validity("notAfter before 1970"))?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
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

/// `rna certs init`: writes ca.pem, ca-key.pem, hub.pem, hub-key.pem into `dir` (created if
/// missing) and returns their paths in that order. Keys get mode 0600. Unless `force`, an
/// existing file is never overwritten (`CertError::Exists`) and nothing is written at all.
pub fn init_dir(dir: &Path, hub_names: &[String], force: bool) -> Result<Vec<PathBuf>, CertError> {
    // Make everything before writing anything, so a bad hub name leaves no half-made directory.
    let ca = Ca::generate("rna CA")?;
    let hub = ca.issue_hub(hub_names)?;
    let files = [
        (CA_CERT_FILE, ca.cert_pem(), false),
        (CA_KEY_FILE, ca.key_pem(), true),
        (HUB_CERT_FILE, hub.cert_pem, false),
        (HUB_KEY_FILE, hub.key_pem, true),
    ];
    let paths: Vec<PathBuf> = files.iter().map(|(file, _, _)| dir.join(file)).collect();
    if !force {
        refuse_existing(&paths)?;
    }
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    for ((_, pem, private), path) in files.iter().zip(&paths) {
        if *private {
            write_private(path, pem.as_bytes(), force)?;
        } else {
            write_public(path, pem.as_bytes(), force)?;
        }
    }
    Ok(paths)
}

/// `rna certs agent`: loads `dir/ca.pem` + `dir/ca-key.pem`, writes `agent-<name>.pem` and
/// `agent-<name>-key.pem` (key at mode 0600). Returns (cert path, key path).
pub fn issue_agent_files(
    dir: &Path,
    name: &str,
    force: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    // Check the name before it becomes part of a path.
    if !valid_agent_name(name) {
        return Err(CertError::BadName(name.to_string()));
    }
    let cert_path = dir.join(format!("agent-{name}.pem"));
    let key_path = dir.join(format!("agent-{name}-key.pem"));
    if !force {
        refuse_existing(&[cert_path.clone(), key_path.clone()])?;
    }
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_cert = first_cert(load_certs(&ca_cert_path)?)?;
    let ca_key = load_key(&ca_key_path)?;
    let ca = Ca::from_der(ca_cert, &ca_key).map_err(|e| match e {
        CertError::BadCa(message) => CertError::BadCa(format!(
            "{} and {}: {message}",
            ca_cert_path.display(),
            ca_key_path.display()
        )),
        CertError::Certificate(message) => CertError::Pem {
            path: ca_cert_path.clone(),
            message,
        },
        other => other,
    })?;
    let issued = ca.issue_agent(name)?;
    write_public(&cert_path, issued.cert_pem.as_bytes(), force)?;
    write_private(&key_path, issued.key_pem.as_bytes(), force)?;
    Ok((cert_path, key_path))
}

/// The first certificate of a non-empty list (`load_certs` and `parse_certs` never return empty).
fn first_cert(certs: Vec<CertificateDer<'static>>) -> Result<CertificateDer<'static>, CertError> {
    certs
        .into_iter()
        .next()
        .ok_or_else(|| CertError::PemText("no certificate".into()))
}

fn refuse_existing(paths: &[PathBuf]) -> Result<(), CertError> {
    // `create_new` still guards each write; this check only avoids writing half a set.
    match paths.iter().find(|path| path.exists()) {
        Some(path) => Err(CertError::Exists(path.clone())),
        None => Ok(()),
    }
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

/// Writes a file with mode 0600 (for keys and token files), create_new unless force (then a
/// new file replaces the old one by rename, so the mode is 0600 even if the old file was more
/// open). A symbolic link at `path` is refused, never followed.
pub fn write_private(path: &Path, contents: &[u8], force: bool) -> Result<(), CertError> {
    write_file(path, contents, force, 0o600)
}

/// Writes a certificate (public) with mode 0644, create_new unless force.
fn write_public(path: &Path, contents: &[u8], force: bool) -> Result<(), CertError> {
    write_file(path, contents, force, 0o644)
}

fn write_file(path: &Path, contents: &[u8], force: bool, mode: u32) -> Result<(), CertError> {
    // A link at the target could point anywhere (another user's file, a system file): never
    // write through it, even with --force.
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(CertError::Symlink(path.to_path_buf()));
    }
    if !force {
        // `create_new` (O_EXCL) fails on any existing name, a link included.
        let mut file = create_new_file(path, mode)?;
        file.write_all(contents).map_err(io_error(path))?;
        return file.sync_all().map_err(io_error(path));
    }
    // Overwrite by writing a new file beside it and renaming it over the old name: rename
    // replaces the name itself, never a file a link at that name points to, and readers see
    // the old or the new file, never half of one.
    let name = path.file_name().ok_or_else(|| CertError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let temp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = create_new_file(&temp, mode).and_then(|mut file| {
        file.write_all(contents).map_err(io_error(&temp))?;
        file.sync_all().map_err(io_error(&temp))?;
        fs::rename(&temp, path).map_err(io_error(path))
    });
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    // Make the rename itself durable.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Creates `path` exclusively with `mode`, refusing to follow a link at that name.
fn create_new_file(path: &Path, mode: u32) -> Result<fs::File, CertError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options
            .mode(mode)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let file = options.open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            CertError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    // The umask may have narrowed `mode`; set it exactly (0644 stays readable).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_error(path))?;
    }
    Ok(file)
}

/// PEM-encodes DER (RFC 7468: base64 with padding, 64-character lines) with `\n` line ends,
/// the form rcgen writes for keys, so every file `rna certs` writes looks alike (the `pem`
/// crate's default is `\r\n`).
fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

#[cfg(test)]
mod tests {
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
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca.cert_der).unwrap();
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
}
