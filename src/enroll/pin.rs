//! The hub CA pin: the SHA-256 of the CA's SubjectPublicKeyInfo, and the TLS verifier an agent
//! uses on first contact, which accepts the hub only if its chain ends at the pinned CA. The
//! agent has no CA file yet, so the hub sends its CA in its chain and the pin decides whether
//! to trust it; only then does the agent send the join token's secret.

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{CaPin, EnrollError, RefusalCode};

/// The pin of a DER CA certificate: the SHA-256 of its SubjectPublicKeyInfo, exactly as
/// `openssl x509 -pubkey | openssl pkey -pubin -outform der | sha256sum` prints it.
pub fn ca_pin(cert_der: &[u8]) -> Result<CaPin, EnrollError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| {
        EnrollError::refused(
            RefusalCode::BadRequest,
            format!("CA certificate cannot be parsed: {e}"),
        )
    })?;
    Ok(CaPin::of_spki(cert.tbs_certificate.subject_pki.raw))
}

/// Why the pinned verifier refused a hub; carried inside rustls' error so the agent's log line
/// says it.
#[derive(thiserror::Error)]
enum PinRefusal {
    /// The hub sent only its own certificate, so there is no CA to compare with the pin.
    #[error("the hub sent no CA certificate in its chain, so it cannot be checked against the join token's CA pin")]
    NoCa,
    /// None of the certificates the hub sent has the pinned key.
    #[error("the hub's CA does not match the join token's CA pin {0}: this is not the hub the token was made for")]
    Mismatch(CaPin),
}

/// A rustls server verifier for the agent's first contact with a hub: the hub must send its
/// CA certificate in its chain, that CA's SPKI hash must equal the join token's pin, and the
/// hub certificate must chain to that CA, be valid now and name the hub (webpki does these
/// last checks with the CA as the only trust anchor). The CA that matched is kept for the
/// agent to store.
pub struct PinnedHubVerifier {
    /// The hub CA's SPKI hash from the join token.
    pin: CaPin,
    /// The signature algorithms webpki may use (ring, like the rest of rna).
    provider: Arc<CryptoProvider>,
    /// The CA certificate that matched the pin in the last accepted handshake.
    matched: Mutex<Option<CertificateDer<'static>>>,
}

/// rustls prints the error it carries with `Debug`: make that the readable sentence.
impl fmt::Debug for PinRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for PinnedHubVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedHubVerifier")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl PinnedHubVerifier {
    /// A verifier for hubs whose CA has this pin.
    pub fn new(pin: CaPin) -> PinnedHubVerifier {
        PinnedHubVerifier {
            pin,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            matched: Mutex::new(None),
        }
    }

    /// The CA certificate that matched the pin, once a handshake has been accepted.
    pub fn matched_ca(&self) -> Option<CertificateDer<'static>> {
        // A poisoned lock only means another handshake panicked; the value is still whole.
        self.matched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A TLS 1.3 client configuration that presents no certificate and checks the hub with a
    /// [`PinnedHubVerifier`] for `pin`, offering `alpn`. Returns the verifier too, to read the
    /// matched CA after the handshake.
    pub fn client_config(
        pin: CaPin,
        alpn: &[u8],
    ) -> Result<(rustls::ClientConfig, Arc<PinnedHubVerifier>), EnrollError> {
        let verifier = Arc::new(PinnedHubVerifier::new(pin));
        let mut config = rustls::ClientConfig::builder_with_provider(verifier.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| EnrollError::CannotCreate {
                what: "TLS client configuration",
                message: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok((config, verifier))
    }

    /// [`PinnedHubVerifier::client_config`] that also presents the agent's current
    /// certificate: an agent enrolling again shows the hub which tenant it belongs to, and a
    /// join token of another tenant is refused (`tenant_mismatch`).
    pub fn client_config_presenting(
        pin: CaPin,
        alpn: &[u8],
        chain: Vec<CertificateDer<'static>>,
        key: rustls_pki_types::PrivateKeyDer<'static>,
    ) -> Result<(rustls::ClientConfig, Arc<PinnedHubVerifier>), EnrollError> {
        let cannot = |e: rustls::Error| EnrollError::CannotCreate {
            what: "TLS client configuration",
            message: e.to_string(),
        };
        let verifier = Arc::new(PinnedHubVerifier::new(pin));
        let mut config = rustls::ClientConfig::builder_with_provider(verifier.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cannot)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_auth_cert(chain, key)
            .map_err(cannot)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok((config, verifier))
    }

    fn refuse(why: PinRefusal) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(why))))
    }
}

impl ServerCertVerifier for PinnedHubVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if intermediates.is_empty() {
            return Err(Self::refuse(PinRefusal::NoCa));
        }
        // The CA is normally the last certificate sent; any position is accepted, since the
        // pin, not the order, is what makes it trusted.
        let position = intermediates
            .iter()
            .position(|cert| ca_pin(cert).is_ok_and(|pin| pin == self.pin))
            .ok_or_else(|| Self::refuse(PinRefusal::Mismatch(self.pin)))?;
        let anchor = intermediates[position].clone().into_owned();
        let mut roots = RootCertStore::empty();
        roots
            .add(anchor.clone())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != position)
            .map(|(_, cert)| cert.clone())
            .collect();
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            webpki.verify_server_cert(end_entity, &rest, server_name, ocsp_response, now)?;
        *self.matched.lock().unwrap_or_else(|e| e.into_inner()) = Some(anchor);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::Ca;

    #[test]
    fn pin_is_the_spki_hash_of_the_ca_key() {
        let ca = Ca::generate("rna test CA").unwrap();
        let pin = ca_pin(&ca.cert_der()).unwrap();
        let der = ca.cert_der();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let spki = cert.tbs_certificate.subject_pki.raw;
        assert_eq!(pin, CaPin::of_spki(spki));
        let other = Ca::generate("rna test CA").unwrap();
        assert_ne!(ca_pin(&other.cert_der()).unwrap(), pin);
        let err = ca_pin(b"not a certificate").unwrap_err();
        assert_eq!(err.code(), Some(RefusalCode::BadRequest));
    }
}
