//! rustls configurations: the hub requires a client certificate chained to its CA, the agent
//! verifies the hub against the CA it was given. TLS 1.3 only, ALPN `rna/1`, ring provider.

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;

use crate::certs::{self, CertError};
use crate::proto::ALPN;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading a certificate or key failed.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// rustls refused the material.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    /// quinn refused the rustls configuration.
    #[error("QUIC TLS: {0}")]
    Quic(String),
    /// The hub name is not a valid DNS name or IP address.
    #[error("invalid hub server name {0:?}")]
    ServerName(String),
    /// The private key is not the key of the certificate.
    #[error("the key does not match the certificate")]
    KeyMismatch,
    /// The certificate does not chain to the CA (or is expired, or not for this use).
    #[error("the certificate is not valid under the CA: {0}")]
    NotIssuedByCa(String),
}

/// Installs ring as the process-wide rustls provider (idempotent).
pub fn install_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    Ok(roots)
}

/// rustls's refusal of a key and certificate, the mismatch told in rna's words.
fn key_error(e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch,
        other => TlsError::Rustls(other),
    }
}

/// A certificate chain, its key, and the CA the peer must chain to.
#[derive(Clone)]
struct Material {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca_certs", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("key", &"MASKED")
            .finish()
    }
}

impl Material {
    fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Material {
            ca: certs::load_certs(ca)?,
            chain: certs::load_certs(cert)?,
            key: Arc::new(certs::load_key(key)?),
        })
    }

    /// `(role, notAfter)` of our own certificate and of the first CA certificate.
    fn expiries(&self, role: &'static str) -> Vec<(&'static str, std::time::SystemTime)> {
        let mut out = Vec::new();
        if let Some(t) = self.chain.first().and_then(|c| certs::not_after(c).ok()) {
            out.push((role, t));
        }
        if let Some(t) = self.ca.first().and_then(|c| certs::not_after(c).ok()) {
            out.push(("ca", t));
        }
        out
    }

    fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        Ok(Material {
            ca: certs::parse_certs(ca)?,
            chain: certs::parse_certs(cert)?,
            key: Arc::new(certs::parse_key(key)?),
        })
    }

    /// Checks what the handshake would otherwise find out late: the key belongs to the
    /// certificate, and the certificate chains to the CA for its use (`client`: an agent's
    /// client certificate; otherwise the hub's server certificate) and is valid now.
    fn check(&self, client: bool) -> Result<(), TlsError> {
        let provider = provider();
        rustls::sign::CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), &provider)
            .map_err(key_error)?;
        let (end_entity, intermediates) = self
            .chain
            .split_first()
            .ok_or_else(|| TlsError::NotIssuedByCa("no certificate".into()))?;
        let roots = roots(&self.ca)?;
        let now = rustls::pki_types::UnixTime::now();
        let verified = if client {
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ())
        } else {
            rustls::server::ParsedCertificate::try_from(end_entity).and_then(|parsed| {
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &roots,
                    intermediates,
                    now,
                    provider.signature_verification_algorithms.all,
                )
            })
        };
        verified.map_err(|e| TlsError::NotIssuedByCa(e.to_string()))
    }
}

/// The hub's TLS material: its certificate chain, key, and the CA agents must chain to.
#[derive(Clone, Debug)]
pub struct ServerTls(Material, Option<Vec<Vec<u8>>>);

impl ServerTls {
    /// From PEM files: the CA, the hub's certificate chain and its key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Material::load(ca, cert, key).map(|m| ServerTls(m, None))
    }

    /// From PEM text.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        Material::from_pem(ca, cert, key).map(|m| ServerTls(m, None))
    }

    /// The same material, with QUIC offering `enroll_alpns` (enrollment, renewal) next to
    /// the agent protocol: a
    /// fresh agent has no client certificate yet, so one is then asked for but not required
    /// by TLS (a certificate sent is still checked against the CA, and the hub refuses an
    /// agent session without one right after the handshake), and the CA certificate follows
    /// the hub's in the chain, for the agent to check against its join token's pin.
    pub fn with_enrollment(self, enroll_alpns: &[&[u8]]) -> ServerTls {
        ServerTls(
            self.0,
            Some(enroll_alpns.iter().map(|a| a.to_vec()).collect()),
        )
    }

    /// Whether QUIC offers enrollment ([`ServerTls::with_enrollment`]).
    pub fn offers_enrollment(&self) -> bool {
        self.1.is_some()
    }

    /// Checks that the key is the certificate's and that the certificate is a server
    /// certificate the CA issued, valid now (the CA is the one agents are verified against;
    /// `rna certs` issues hub and agent certificates from one CA).
    pub fn check(&self) -> Result<(), TlsError> {
        self.0.check(false)
    }

    /// When the hub's certificate (`"hub"`) and the CA (`"ca"`) expire.
    pub fn expiries(&self) -> Vec<(&'static str, std::time::SystemTime)> {
        self.0.expiries("hub")
    }

    pub(crate) fn quic_config(&self) -> Result<QuicServerConfig, TlsError> {
        let config = match &self.1 {
            None => self.rustls_config(ALPN)?,
            Some(enroll) => {
                let mut alpns: Vec<&[u8]> = vec![ALPN];
                alpns.extend(enroll.iter().map(Vec::as_slice));
                self.enrollment_config(&alpns)?
            }
        };
        QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))
    }

    /// The server configuration of a hub that enrolls agents: every protocol of `alpns`, a
    /// client certificate checked when sent but not required, the CA sent after the hub's
    /// certificate.
    fn enrollment_config(&self, alpns: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&self.0.ca)?),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut chain = self.0.chain.clone();
        chain.extend(self.0.ca.first().cloned());
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, self.0.key.clone_key())?;
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        config.max_early_data_size = 0;
        self.resumption(&mut config);
        Ok(config)
    }

    /// The rustls server configuration of the TLS/TCP listener: `tcp_alpn`, and on a hub
    /// that enrolls agents the enrollment protocols too (as [`ServerTls::with_enrollment`]
    /// describes for QUIC).
    pub fn tcp_config(&self, tcp_alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        match &self.1 {
            None => self.rustls_config(tcp_alpn),
            Some(enroll) => {
                let mut alpns: Vec<&[u8]> = vec![tcp_alpn];
                alpns.extend(enroll.iter().map(Vec::as_slice));
                self.enrollment_config(&alpns)
            }
        }
    }

    /// The rustls server configuration both transports use: TLS 1.3 only, a client
    /// certificate chained to the CA required, `alpn` the only protocol offered, no 0-RTT.
    pub fn rustls_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&self.0.ca)?),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.0.chain.clone(), self.0.key.clone_key())?;
        config.alpn_protocols = vec![alpn.to_vec()];
        // 0-RTT data could be replayed; the protocol does not need it.
        config.max_early_data_size = 0;
        self.resumption(&mut config);
        Ok(config)
    }

    /// Session tickets a restarted hub can still read ([`super::tickets`]), two after every
    /// handshake (one to spare for an attempt that fails after taking one; a client uses a
    /// ticket once), and no session cache: the tickets are the whole state.
    fn resumption(&self, config: &mut rustls::ServerConfig) {
        config.ticketer = Arc::new(super::tickets::TicketKeys::new(
            self.0.key.secret_der(),
            &self.0.chain,
            &self.0.ca,
        ));
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 2;
    }
}

/// The agent's TLS material: the CA to verify the hub with, and its client certificate; and
/// the rustls configuration built from it once, so that every connection of the agent, over
/// either transport, shares one certificate verifier and one store of the tickets hubs gave
/// it (rustls resumes a session only under the verifier it was made with). New material
/// starts with no tickets.
#[derive(Clone, Debug)]
pub struct ClientTls(Material, rustls::ClientConfig);

/// Hub names an agent keeps tickets for (rustls keeps up to 8 tickets per name).
const TICKET_STORE_NAMES: usize = 32;

impl ClientTls {
    fn new(material: Material) -> Result<Self, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(&material.ca)?)
            .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
            .map_err(key_error)?;
        config.resumption = Self::tickets();
        Ok(ClientTls(material, config))
    }

    fn tickets() -> rustls::client::Resumption {
        rustls::client::Resumption::store(Arc::new(rustls::client::ClientSessionMemoryCache::new(
            TICKET_STORE_NAMES,
        )))
    }

    /// From PEM files: the CA, the agent's certificate chain and its key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        ClientTls::new(Material::load(ca, cert, key)?)
    }

    /// From PEM text.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        ClientTls::new(Material::from_pem(ca, cert, key)?)
    }

    /// The same material with a ticket store of its own: for each agent of a process that
    /// runs several, which must not take each other's tickets.
    pub fn with_own_tickets(&self) -> Self {
        let mut config = self.1.clone();
        config.resumption = Self::tickets();
        ClientTls(self.0.clone(), config)
    }

    /// Checks that the key is the certificate's and that the certificate is a client
    /// certificate the CA issued, valid now: what the hub will require of it.
    pub fn check(&self) -> Result<(), TlsError> {
        self.0.check(true)
    }

    /// When the agent's certificate (`"agent"`) and the CA (`"ca"`) expire.
    pub fn expiries(&self) -> Vec<(&'static str, std::time::SystemTime)> {
        self.0.expiries("agent")
    }

    /// The agent's own certificate (the first of its chain).
    pub fn certificate(&self) -> Option<&CertificateDer<'static>> {
        self.0.chain.first()
    }

    pub(crate) fn quic_config(&self) -> Result<QuicClientConfig, TlsError> {
        QuicClientConfig::try_from(self.rustls_config(ALPN))
            .map_err(|e| TlsError::Quic(e.to_string()))
    }

    /// The rustls client configuration both transports use: TLS 1.3 only, the hub verified
    /// against the CA, the agent's certificate presented, `alpn` the only protocol offered,
    /// the agent's tickets.
    pub fn rustls_config(&self, alpn: &[u8]) -> rustls::ClientConfig {
        let mut config = self.1.clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }
}

/// The end-entity certificate the peer of `connection` presented: the agent's client
/// certificate on the hub, the hub's certificate on the agent. quinn hands the chain over as
/// `Box<dyn Any>`; this is the one place that knows its type. `None` before the handshake is
/// done or when the peer sent none.
pub fn peer_certificate(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

/// What the TLS handshake of a QUIC connection agreed, once known. quinn hands it over as
/// `Box<dyn Any>`; this is the one place that knows its type.
fn handshake_data(
    connection: &quinn::Connection,
) -> Option<Box<quinn::crypto::rustls::HandshakeData>> {
    connection.handshake_data()?.downcast().ok()
}

/// The ALPN protocol a QUIC connection negotiated, once its handshake is done.
pub fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    handshake_data(connection)?.protocol
}

/// Whether a QUIC connection's TLS session was resumed from a ticket (`false` while unknown).
pub fn resumed(connection: &quinn::Connection) -> bool {
    handshake_data(connection).is_some_and(|d| d.resumed)
}

/// Checks that `name` can be used as the TLS server name of a hub.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}

/// What was wrong with a certificate in a failed handshake, as far as the error tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertProblem {
    /// Not signed by the CA the verifying side trusts (another installation's CA).
    WrongCa,
    /// Not valid for the name the agent dialed (the hub's certificate only).
    WrongName,
    /// Expired or not yet valid.
    Expired,
    /// No certificate was presented.
    Missing,
    /// Anything else the TLS layer refused.
    Other,
}

/// A TLS handshake failure: which side refused, why, and the TLS layer's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFailure {
    /// True when this side refused the peer's certificate; false when the peer refused ours.
    pub refused_here: bool,
    /// The problem with the certificate.
    pub problem: CertProblem,
    /// The TLS error or alert, for the end of the log line.
    pub detail: String,
}

/// TLS alerts (RFC 8446 §6.2) a verifier sends for certificate problems.
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;

/// Reads a failed QUIC handshake as a TLS certificate failure, or `None` when it was not one.
/// quinn reports a failure this side detected as `TransportError` (with rustls' message) and
/// one the peer detected as `ConnectionClosed` carrying the TLS alert (QUIC error code
/// `0x100 + alert`, RFC 9001 §4.8); both print alike, which is why this tells them apart.
pub fn tls_failure(e: &quinn::ConnectionError) -> Option<TlsFailure> {
    let (refused_here, code, reason) = match e {
        quinn::ConnectionError::TransportError(t) => (true, u64::from(t.code), t.reason.clone()),
        quinn::ConnectionError::ConnectionClosed(c) => (
            false,
            u64::from(c.error_code),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        _ => return None,
    };
    if !(0x100..=0x1ff).contains(&code) {
        return None;
    }
    Some(classify(refused_here, (code & 0xff) as u8, &reason))
}

/// Reads a failed TLS-over-TCP handshake as a certificate failure: an alert received means
/// the peer refused; any other rustls error is this side's refusal.
pub fn rustls_failure(e: &rustls::Error) -> TlsFailure {
    match e {
        rustls::Error::AlertReceived(alert) => classify(false, u8::from(*alert), ""),
        other => classify(true, 0, &other.to_string()),
    }
}

/// Which certificate problem a TLS failure was: from rustls' words when there are any, else
/// from the alert code.
fn classify(refused_here: bool, alert: u8, reason: &str) -> TlsFailure {
    // rustls' messages: `Debug` names for most certificate errors, sentences for some.
    let said = |words: &[&str]| words.iter().any(|w| reason.contains(w));
    let problem = if said(&["BadSignature", "UnknownIssuer"]) {
        CertProblem::WrongCa
    } else if said(&["NotValidForName", "not valid for name"]) {
        CertProblem::WrongName
    } else if said(&[
        "Expired",
        "certificate expired",
        "NotValidYet",
        "not valid yet",
    ]) {
        CertProblem::Expired
    } else if said(&["NoCertificatesPresented", "sent no certificates"]) {
        CertProblem::Missing
    } else {
        match alert {
            ALERT_UNKNOWN_CA | ALERT_DECRYPT_ERROR => CertProblem::WrongCa,
            ALERT_BAD_CERTIFICATE => CertProblem::WrongName,
            ALERT_CERTIFICATE_EXPIRED => CertProblem::Expired,
            ALERT_CERTIFICATE_REQUIRED => CertProblem::Missing,
            _ => CertProblem::Other,
        }
    };
    let detail = if reason.is_empty() {
        format!("TLS alert {alert}")
    } else {
        format!("TLS: {reason}")
    };
    TlsFailure {
        refused_here,
        problem,
        detail,
    }
}

/// The hub's log line for a failed agent handshake: which side refused which certificate,
/// and what to do.
pub fn explain_for_hub(failure: &TlsFailure, remote: std::net::SocketAddr) -> String {
    let detail = &failure.detail;
    if failure.refused_here {
        match failure.problem {
            CertProblem::WrongCa | CertProblem::WrongName => format!(
                "refused the certificate of an agent at {remote}: it is not signed by this \
                 hub's CA ({detail}); issue the agent's certificate with rna certs agent --dir \
                 <this hub's CA folder> <agent name>"
            ),
            CertProblem::Expired => format!(
                "refused the certificate of an agent at {remote}: it has expired or is not yet \
                 valid ({detail}); make a new one with rna certs agent --dir <this hub's CA \
                 folder> <agent name> --force, or check both clocks"
            ),
            CertProblem::Missing => {
                format!("refused an agent at {remote}: it presented no certificate ({detail})")
            }
            CertProblem::Other => {
                format!("refused the TLS handshake of an agent at {remote} ({detail})")
            }
        }
    } else {
        match failure.problem {
            CertProblem::WrongName => format!(
                "the agent at {remote} refused this hub's certificate ({detail}): usually the \
                 name the agent dials is not in the certificate; set the agent's --server-name \
                 to a name the certificate carries, or remake it with rna certs init --hub-name \
                 <that name>"
            ),
            CertProblem::WrongCa => format!(
                "the agent at {remote} refused this hub's certificate: it is not signed by the \
                 CA in the agent's --ca ({detail}); give the agent this hub's ca.pem"
            ),
            CertProblem::Expired => format!(
                "the agent at {remote} refused this hub's certificate: it has expired or is not \
                 yet valid ({detail}); renew it (docs/operations.md, Certificates) or check both \
                 clocks"
            ),
            CertProblem::Missing | CertProblem::Other => {
                format!("the agent at {remote} refused the TLS handshake ({detail})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(alert: u8, reason: &str) -> quinn::ConnectionError {
        quinn::ConnectionError::TransportError(quinn_proto::TransportError {
            code: quinn::TransportErrorCode::crypto(alert),
            frame: None,
            reason: reason.into(),
        })
    }

    fn remote(alert: u8) -> quinn::ConnectionError {
        quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(alert),
            frame_type: None,
            reason: bytes::Bytes::new(),
        })
    }

    /// (error, refused here, problem): rustls' words for local failures, the alert alone for
    /// the peer's.
    #[test]
    fn handshake_failures_say_which_side_and_what() {
        let table = [
            (
                local(51, "invalid peer certificate: BadSignature"),
                true,
                CertProblem::WrongCa,
            ),
            (
                local(48, "invalid peer certificate: UnknownIssuer"),
                true,
                CertProblem::WrongCa,
            ),
            (
                local(
                    42,
                    "invalid peer certificate: certificate not valid for name \"x\"; …",
                ),
                true,
                CertProblem::WrongName,
            ),
            (
                local(45, "invalid peer certificate: certificate expired: …"),
                true,
                CertProblem::Expired,
            ),
            (
                local(116, "peer sent no certificates"),
                true,
                CertProblem::Missing,
            ),
            (remote(51), false, CertProblem::WrongCa),
            (remote(48), false, CertProblem::WrongCa),
            (remote(42), false, CertProblem::WrongName),
            (remote(45), false, CertProblem::Expired),
            (remote(116), false, CertProblem::Missing),
            (remote(80), false, CertProblem::Other),
        ];
        for (error, here, problem) in table {
            let failure = tls_failure(&error).expect("a TLS failure");
            assert_eq!(
                (failure.refused_here, failure.problem),
                (here, problem),
                "{error}"
            );
        }
        assert!(tls_failure(&quinn::ConnectionError::TimedOut).is_none());
        let refused = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
            frame_type: None,
            reason: bytes::Bytes::new(),
        });
        assert!(tls_failure(&refused).is_none());
    }
}
