//! Certificate signing requests: the agent makes its key and a CSR for its name; the hub checks
//! the CSR against what the join token allows and signs a short-lived client certificate with
//! the tenant bound inside it; either side reads tenant and agent back from a certificate.
//!
//! The tenant travels as a URI subject alternative name, `rna://tenant/<org>/<env>/agent/<name>`
//! (SPIFFE's way of naming a workload): it is signed by the CA with the rest of the
//! certificate, webpki ignores URI names when it checks a client certificate, and no other
//! tool reads it as something else, as it might a subject OU.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    SignatureAlgorithm, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use x509_parser::prelude::FromDer;

use super::{Admission, EnrollError, RefusalCode};
use crate::auth::hex;
use crate::identity::{valid_agent_name, Secret, Tenant};

/// Agent certificates live 30 days unless the hub is told otherwise.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// The longest agent certificate lifetime the hub signs: 825 days, as `rna certs`' leaves.
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(825 * 24 * 60 * 60);
/// The largest CSR the hub reads (a P-256 CSR is about 250 bytes; RSA-4096 under 2 KiB).
pub const MAX_CSR: usize = 4 * 1024;
/// How far `not_before` is set back to absorb clock skew: five minutes, or a tenth of the
/// lifetime when that is shorter, so a certificate of seconds (in tests) is not mostly past.
const MAX_BACKDATE: Duration = Duration::from_secs(5 * 60);
/// The start of the URI that binds tenant and agent into a certificate.
const URI_PREFIX: &str = "rna://tenant/";
/// Bytes of a certificate serial: 128 random bits with the top bit clear (positive, RFC 5280
/// 4.1.2.2 allows up to 20 bytes).
const SERIAL_BYTES: usize = 16;

fn bad_request(message: impl Into<String>) -> EnrollError {
    EnrollError::refused(RefusalCode::BadRequest, message)
}

fn cannot(what: &'static str) -> impl Fn(rcgen::Error) -> EnrollError {
    move |e| EnrollError::CannotCreate {
        what,
        message: e.to_string(),
    }
}

/// The URI subject alternative name that binds `tenant` and `agent` into a certificate.
pub fn identity_uri(tenant: &Tenant, agent: &str) -> String {
    format!("{URI_PREFIX}{tenant}/agent/{agent}")
}

/// A CSR and the private key it was made for; the key stays on the agent (write it to the
/// state folder at mode 0600). `Debug` masks the key.
pub struct AgentCsr {
    /// The DER CSR, the only part sent to the hub.
    pub csr_der: Vec<u8>,
    /// The PKCS#8 private key, `-----BEGIN PRIVATE KEY-----`.
    pub key_pem: Secret,
}

impl fmt::Debug for AgentCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCsr")
            .field("csr_der", &format_args!("{} bytes", self.csr_der.len()))
            .field("key_pem", &"MASKED")
            .finish()
    }
}

/// Makes a fresh ECDSA P-256 key and a CSR whose subject common name is `agent`.
pub fn make_csr(agent: &str) -> Result<AgentCsr, EnrollError> {
    if !valid_agent_name(agent) {
        return Err(EnrollError::CannotCreate {
            what: "certificate signing request",
            message: format!(
                "invalid agent name {agent:?}: use 1 to 63 letters, digits, '-' or '_'"
            ),
        });
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cannot("agent key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_only(agent);
    let csr = params
        .serialize_request(&key)
        .map_err(cannot("certificate signing request"))?;
    Ok(AgentCsr {
        csr_der: csr.der().to_vec(),
        key_pem: Secret::new(key.serialize_pem()),
    })
}

fn common_name_only(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// The agent name a CSR asks for (its one subject common name), read without trusting it: the
/// hub redeems the join token for this name, then [`Signer::sign`] checks the signature.
pub fn requested_agent(csr_der: &[u8]) -> Result<String, EnrollError> {
    if csr_der.len() > MAX_CSR {
        return Err(bad_request(format!(
            "CSR of {} bytes exceeds the {MAX_CSR}-byte limit",
            csr_der.len()
        )));
    }
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
            .map_err(|e| bad_request(format!("CSR cannot be parsed: {e}")))?;
    if !rest.is_empty() {
        return Err(bad_request("CSR has trailing bytes"));
    }
    let subject = &csr.certification_request_info.subject;
    let mut names = subject.iter_common_name();
    let name = match (names.next(), names.next()) {
        (Some(name), None) => name
            .as_str()
            .map_err(|_| bad_request("CSR common name is not text"))?,
        (None, _) => return Err(bad_request("CSR has no subject common name")),
        (Some(_), Some(_)) => return Err(bad_request("CSR has more than one common name")),
    };
    if !valid_agent_name(name) {
        return Err(bad_request(format!(
            "CSR asks for invalid agent name {name:?}: use 1 to 63 letters, digits, '-' or '_'"
        )));
    }
    Ok(name.to_owned())
}

/// The algorithm of the CSR's own key, read from its SubjectPublicKeyInfo; `None` for a key
/// the hub does not sign.
fn key_algorithm_of(csr_der: &[u8]) -> Option<&'static SignatureAlgorithm> {
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der).ok()?;
    let spki = &csr.certification_request_info.subject_pki.algorithm;
    let curve = match &spki.parameters {
        Some(p) => Some(p.as_oid().ok()?.to_id_string()),
        None => None,
    };
    key_algorithm(&spki.algorithm.to_id_string(), curve.as_deref())
}

/// The signing algorithm for a key type (RFC 5480 §2.1.1 and §2.1.1.1, RFC 8410 §3): the key
/// algorithm's OID and, for EC keys, the named curve.
fn key_algorithm(oid: &str, curve: Option<&str>) -> Option<&'static SignatureAlgorithm> {
    match (oid, curve) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => Some(&PKCS_ECDSA_P256_SHA256),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => Some(&PKCS_ECDSA_P384_SHA384),
        ("1.3.101.112", None) => Some(&PKCS_ED25519),
        _ => None,
    }
}

/// A certificate the hub signed for an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCert {
    /// The DER certificate.
    pub cert_der: Vec<u8>,
    /// Lowercase hex of the serial number (32 digits).
    pub serial: String,
    /// The tenant bound into it.
    pub tenant: Tenant,
    /// The agent name it certifies.
    pub agent: String,
    /// Start of validity, unix seconds.
    pub not_before: u64,
    /// End of validity, unix seconds.
    pub not_after: u64,
}

/// Signs agent certificates with the hub's CA.
pub struct Signer {
    /// The CA's name and key as rcgen signs with them.
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer(MASKED)")
    }
}

impl Signer {
    /// A signer from the CA's PEM certificate and PEM PKCS#8 key (the hub's `ca.pem` and
    /// `ca-key.pem`, or [`crate::certs::Ca::cert_pem`] and [`crate::certs::Ca::key_pem`]).
    pub fn from_pem(ca_cert_pem: &str, ca_key_pem: &str) -> Result<Signer, EnrollError> {
        let ca = crate::certs::Ca::from_pem(ca_cert_pem, ca_key_pem).map_err(|e| {
            EnrollError::CannotCreate {
                what: "certificate signer",
                message: crate::fsutil::error_chain(&e),
            }
        })?;
        let key = KeyPair::from_pem(&ca.key_pem()).map_err(cannot("certificate signer"))?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca.cert_der()), key)
            .map_err(cannot("certificate signer"))?;
        Ok(Signer { issuer })
    }

    /// Signs the CSR as a client certificate for the admitted agent and tenant, valid from
    /// `now` (set back a little for clock skew) until `now + lifetime`, with a random serial.
    ///
    /// Only the CSR's public key is used: its requested extensions, names and CA flags are
    /// ignored and the hub writes its own. Refused (`BadRequest`) when the CSR is over
    /// [`MAX_CSR`], malformed, badly signed or for an unsupported key; `NameNotAllowed` when
    /// it names another agent than the admission.
    pub fn sign(
        &self,
        csr_der: &[u8],
        admission: &Admission,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<SignedCert, EnrollError> {
        if lifetime < Duration::from_secs(1) || lifetime > MAX_CERT_LIFETIME {
            return Err(EnrollError::CannotCreate {
                what: "agent certificate",
                message: "lifetime must be between 1 second and 825 days".into(),
            });
        }
        let requested = requested_agent(csr_der)?;
        if requested != admission.agent {
            return Err(EnrollError::refused(
                RefusalCode::NameNotAllowed,
                format!(
                    "CSR asks for agent {requested:?}, but the join token admitted {:?}",
                    admission.agent
                ),
            ));
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| match e {
                    rcgen::Error::InvalidCertificationRequestSignature => {
                        bad_request("CSR signature does not verify")
                    }
                    e => bad_request(format!("CSR refused: {e}")),
                })?;
        // rcgen names the key after the CSR's signature algorithm, which the requester
        // chooses; the key's own SubjectPublicKeyInfo must say the same, or the certificate
        // would describe a key of another curve.
        let alg = csr.public_key.algorithm();
        if key_algorithm_of(csr_der) != Some(alg) {
            return Err(bad_request(
                "CSR key must be ECDSA P-256, ECDSA P-384 or Ed25519, signed with its own algorithm",
            ));
        }
        let backdate = MAX_BACKDATE.min(lifetime / 10);
        let clock = || EnrollError::CannotCreate {
            what: "agent certificate",
            message: "the system clock is out of range".into(),
        };
        let not_before = now.checked_sub(backdate).ok_or_else(clock)?;
        let not_after = now.checked_add(lifetime).ok_or_else(clock)?;
        let (not_before_secs, not_after_secs) = (
            crate::auth::unix_now(not_before),
            crate::auth::unix_now(not_after),
        );
        // X.509 times stop at the end of year 9999.
        if not_after_secs > crate::certs::LAST_X509_SECOND {
            return Err(clock());
        }
        let mut serial = [0u8; SERIAL_BYTES];
        SystemRandom::new()
            .fill(&mut serial)
            .map_err(|_| EnrollError::CannotCreate {
                what: "agent certificate",
                message: "the system random number generator failed".into(),
            })?;
        serial[0] &= 0x7f;
        // A leading zero byte would be dropped by DER; keep the serial 16 bytes long.
        serial[0] |= 0x01;
        let uri = identity_uri(&admission.tenant, &admission.agent);
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_only(&admission.agent);
        params.subject_alt_names = vec![SanType::URI(
            uri.try_into().map_err(cannot("agent certificate"))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let signing = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = signing
            .signed_by(&self.issuer)
            .map_err(cannot("agent certificate"))?;
        Ok(SignedCert {
            cert_der: cert.der().to_vec(),
            serial: hex(&serial),
            tenant: admission.tenant.clone(),
            agent: admission.agent.clone(),
            not_before: not_before_secs,
            not_after: not_after_secs,
        })
    }
}

/// Tenant, agent, serial and validity read back from an agent certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The tenant bound into the certificate.
    pub tenant: Tenant,
    /// The agent name (the common name, equal to the URI's).
    pub agent: String,
    /// Lowercase hex of the serial number.
    pub serial: String,
    /// Start of validity, unix seconds.
    pub not_before: u64,
    /// End of validity, unix seconds.
    pub not_after: u64,
}

/// Reads the tenant and agent bound into a certificate: exactly one `rna://tenant/…` URI,
/// whose agent name equals the subject common name. Refused (`TenantMismatch` for a
/// certificate with no or an ambiguous tenant, `BadRequest` when it cannot be parsed).
pub fn agent_identity(cert_der: &[u8]) -> Result<AgentIdentity, EnrollError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| bad_request(format!("certificate cannot be parsed: {e}")))?;
    if !rest.is_empty() {
        return Err(bad_request("certificate has trailing bytes"));
    }
    let no_tenant = |why: &str| {
        EnrollError::refused(
            RefusalCode::TenantMismatch,
            format!("certificate {why}; it was not issued by enrollment"),
        )
    };
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| bad_request(format!("certificate names cannot be parsed: {e}")))?;
    let mut uris = sans
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with(URI_PREFIX) => {
                Some(*uri)
            }
            _ => None,
        });
    let uri = match (uris.next(), uris.next()) {
        (Some(uri), None) => uri,
        (None, _) => return Err(no_tenant("carries no rna tenant URI")),
        (Some(_), Some(_)) => return Err(no_tenant("carries more than one rna tenant URI")),
    };
    let parsed = uri
        .strip_prefix(URI_PREFIX)
        .and_then(|rest| rest.rsplit_once("/agent/"))
        .and_then(|(tenant, agent)| Some((tenant.parse::<Tenant>().ok()?, agent)))
        .filter(|(_, agent)| valid_agent_name(agent));
    let Some((tenant, agent)) = parsed else {
        return Err(no_tenant(&format!("tenant URI {uri:?} is malformed")));
    };
    let mut names = cert.subject().iter_common_name();
    let common_name = match (names.next(), names.next()) {
        (Some(name), None) => name.as_str().ok(),
        _ => None,
    };
    if common_name != Some(agent) {
        return Err(no_tenant(&format!(
            "names agent {agent:?} in its tenant URI but {common_name:?} as its common name"
        )));
    }
    let validity = cert.validity();
    Ok(AgentIdentity {
        tenant,
        agent: agent.to_owned(),
        serial: hex(cert.raw_serial()),
        not_before: u64::try_from(validity.not_before.timestamp()).unwrap_or(0),
        not_after: u64::try_from(validity.not_after.timestamp()).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::Ca;

    #[test]
    fn the_key_type_comes_from_the_key_not_the_signature() {
        let ec = "1.2.840.10045.2.1";
        for (oid, curve, want) in [
            (
                ec,
                Some("1.2.840.10045.3.1.7"),
                Some(&PKCS_ECDSA_P256_SHA256),
            ),
            (ec, Some("1.3.132.0.34"), Some(&PKCS_ECDSA_P384_SHA384)),
            ("1.3.101.112", None, Some(&PKCS_ED25519)),
            // P-521, an EC key without a named curve, RSA, Ed448: not signed.
            (ec, Some("1.3.132.0.35"), None),
            (ec, None, None),
            ("1.2.840.113549.1.1.1", None, None),
            ("1.3.101.113", None, None),
            // Parameters on an Ed25519 key are malformed (RFC 8410 §3).
            ("1.3.101.112", Some("1.2.840.10045.3.1.7"), None),
        ] {
            assert_eq!(key_algorithm(oid, curve), want, "{oid} {curve:?}");
        }
        // Real CSRs: each key type is read back from the key itself.
        for alg in [
            &PKCS_ECDSA_P256_SHA256,
            &PKCS_ECDSA_P384_SHA384,
            &PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, "edge");
            let csr = params.serialize_request(&key).unwrap();
            assert_eq!(key_algorithm_of(csr.der()), Some(alg));
        }
        assert_eq!(key_algorithm_of(b"not a csr"), None);
    }

    fn admission(tenant: &str, agent: &str) -> Admission {
        Admission {
            token_id: "0123456789ab".into(),
            tenant: tenant.parse().unwrap(),
            agent: agent.into(),
        }
    }

    fn signer() -> Signer {
        let ca = Ca::generate("rna test CA").unwrap();
        Signer::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap()
    }

    #[test]
    fn issued_certificate_carries_tenant_name_serial_and_lifetime() {
        let signer = signer();
        let csr = make_csr("edge").unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let lifetime = Duration::from_secs(7 * 24 * 60 * 60);
        let signed = signer
            .sign(&csr.csr_der, &admission("acme/prod", "edge"), lifetime, now)
            .unwrap();
        assert_eq!(signed.not_after, 1_800_000_000 + 7 * 24 * 60 * 60);
        assert_eq!(signed.not_before, 1_800_000_000 - 300);
        let id = agent_identity(&signed.cert_der).unwrap();
        assert_eq!(id.tenant.as_str(), "acme/prod");
        assert_eq!(id.agent, "edge");
        assert_eq!(id.serial, signed.serial);
        assert_eq!(id.serial.len(), 32);
        assert_eq!(
            (id.not_before, id.not_after),
            (signed.not_before, signed.not_after)
        );
        // The certificate holds the CSR's key, not a key the hub made.
        let key = KeyPair::from_pem(csr.key_pem.expose()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&signed.cert_der).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
        // Two certificates never share a serial.
        let again = signer
            .sign(&csr.csr_der, &admission("acme/prod", "edge"), lifetime, now)
            .unwrap();
        assert_ne!(again.serial, signed.serial);
        // A short lifetime is set back by a tenth of it, not five minutes.
        let short = signer
            .sign(
                &csr.csr_der,
                &admission("acme/prod", "edge"),
                Duration::from_secs(10),
                now,
            )
            .unwrap();
        assert_eq!(short.not_after - short.not_before, 11);
    }

    #[test]
    fn csr_refusals() {
        let signer = signer();
        let now = SystemTime::now();
        let edge = make_csr("edge").unwrap();
        let mut bad_signature = edge.csr_der.clone();
        let last = bad_signature.len() - 1;
        bad_signature[last] ^= 0x01;
        let mut csr_with_extras = CertificateParams::default();
        csr_with_extras.distinguished_name = common_name_only("edge");
        csr_with_extras.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let extra_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let ca_asking = csr_with_extras.serialize_request(&extra_key).unwrap();
        let mut no_name = CertificateParams::default();
        no_name.distinguished_name = DistinguishedName::new();
        let no_name = no_name.serialize_request(&extra_key).unwrap();
        let mut dotted = CertificateParams::default();
        dotted.distinguished_name = common_name_only("edge.example");
        let dotted = dotted.serialize_request(&extra_key).unwrap();
        let other = make_csr("other").unwrap();
        let cases: Vec<(Vec<u8>, RefusalCode, &str)> = vec![
            (
                other.csr_der.clone(),
                RefusalCode::NameNotAllowed,
                "CSR asks for agent \"other\"",
            ),
            (
                bad_signature,
                RefusalCode::BadRequest,
                "CSR signature does not verify",
            ),
            (
                vec![0x30, 0x03, 0x02, 0x01, 0x00],
                RefusalCode::BadRequest,
                "CSR cannot be parsed",
            ),
            (Vec::new(), RefusalCode::BadRequest, "CSR cannot be parsed"),
            (
                vec![0u8; MAX_CSR + 1],
                RefusalCode::BadRequest,
                "exceeds the 4096-byte limit",
            ),
            (
                [edge.csr_der.clone(), vec![0]].concat(),
                RefusalCode::BadRequest,
                "trailing bytes",
            ),
            (
                no_name.der().to_vec(),
                RefusalCode::BadRequest,
                "no subject common name",
            ),
            (
                dotted.der().to_vec(),
                RefusalCode::BadRequest,
                "invalid agent name",
            ),
        ];
        for (csr, code, why) in cases {
            let err = signer
                .sign(
                    &csr,
                    &admission("acme/prod", "edge"),
                    DEFAULT_CERT_LIFETIME,
                    now,
                )
                .unwrap_err();
            assert_eq!(err.code(), Some(code), "{why}: {err}");
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        // A CSR asking to be a CA still gets a leaf: only its key is used.
        let signed = signer
            .sign(
                ca_asking.der(),
                &admission("acme/prod", "edge"),
                DEFAULT_CERT_LIFETIME,
                now,
            )
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&signed.cert_der).unwrap();
        assert!(!cert.is_ca());
        for lifetime in [Duration::ZERO, MAX_CERT_LIFETIME + Duration::from_secs(1)] {
            let err = signer
                .sign(
                    &edge.csr_der,
                    &admission("acme/prod", "edge"),
                    lifetime,
                    now,
                )
                .unwrap_err();
            assert!(
                err.to_string().contains("lifetime must be between"),
                "{err}"
            );
        }
        assert!(make_csr("a b").is_err());
    }

    #[test]
    fn certificates_without_a_tenant_are_refused() {
        let ca = Ca::generate("rna test CA").unwrap();
        // A certificate made by `rna certs issue` carries no tenant.
        let manual = ca.issue_agent("edge").unwrap();
        let der = crate::certs::parse_certs(&manual.cert_pem)
            .unwrap()
            .remove(0);
        let err = agent_identity(&der).unwrap_err();
        assert_eq!(err.code(), Some(RefusalCode::TenantMismatch));
        assert!(err.to_string().contains("no rna tenant URI"), "{err}");
        assert_eq!(
            agent_identity(b"junk").unwrap_err().code(),
            Some(RefusalCode::BadRequest)
        );
        assert_eq!(
            identity_uri(&"acme/prod".parse().unwrap(), "edge"),
            "rna://tenant/acme/prod/agent/edge"
        );
    }
}
