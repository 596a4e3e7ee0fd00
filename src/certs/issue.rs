//! Issuing: a CA, the hub's server certificate and the agents' client certificates, made with
//! rcgen, and written to disk (keys at mode 0600) without ever writing through a link.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{
    common_name, first_cert, io_error, load_certs, load_key, parse_certs, parse_key,
    valid_agent_name, CertError,
};

/// One day, the backdating of `not_before` that absorbs clock skew between machines.
const SKEW: Duration = Duration::from_secs(24 * 60 * 60);
/// The CA lives ten years from its creation: replacing it means re-issuing every certificate.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Leaf certificates live 825 days, the longest validity clients commonly still accept.
const LEAF_VALIDITY: Duration = Duration::from_secs(825 * 24 * 60 * 60);
/// 9999-12-31T23:59:59Z: the last instant an X.509 time (GeneralizedTime) can hold.
pub(crate) const LAST_X509_SECOND: u64 = 253_402_300_799;

// File names inside a certificate directory, shared by `init_dir` and `issue_agent_files`.
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const HUB_CERT_FILE: &str = "hub.pem";
const HUB_KEY_FILE: &str = "hub-key.pem";

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
pub(super) fn subject(common_name: &str) -> DistinguishedName {
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

/// Refuses to start writing a set of files when one of them exists.
fn refuse_existing(paths: &[PathBuf]) -> Result<(), CertError> {
    // `create_new` still guards each write; this check only avoids writing half a set.
    match paths.iter().find(|path| path.exists()) {
        Some(path) => Err(CertError::Exists(path.clone())),
        None => Ok(()),
    }
}

/// Writes a file with mode 0600 (for keys and token files), create_new unless force (then a
/// new file replaces the old one by rename, so the mode is 0600 even if the old file was more
/// open). A symbolic link at `path` is refused, never followed.
pub fn write_private(path: &Path, contents: &[u8], force: bool) -> Result<(), CertError> {
    write_file(path, contents, force, 0o600)
}

/// Writes a certificate (public) with mode 0644, create_new unless force.
pub(super) fn write_public(path: &Path, contents: &[u8], force: bool) -> Result<(), CertError> {
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
        let mut file = crate::fsutil::create_new(path, mode).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                CertError::Exists(path.to_path_buf())
            } else {
                CertError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        file.write_all(contents).map_err(io_error(path))?;
        return file.sync_all().map_err(io_error(path));
    }
    // Overwrite by renaming a new file over the old name: rename replaces the name itself,
    // never a file a link at that name points to, and readers see the old or the new file.
    crate::fsutil::replace_file(path, contents, crate::fsutil::FileMode::Exactly(mode)).map_err(
        |e| CertError::Io {
            path: e.path,
            source: e.problem.into(),
        },
    )
}

/// PEM-encodes DER (RFC 7468: base64 with padding, 64-character lines) with `\n` line ends,
/// the form rcgen writes for keys, so every file `rna certs` writes looks alike (the `pem`
/// crate's default is `\r\n`).
pub(super) fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}
