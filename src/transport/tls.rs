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
            .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch,
            other => TlsError::Rustls(other),
        })?;
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
pub struct ServerTls(Material);

impl ServerTls {
    /// From PEM files: the CA, the hub's certificate chain and its key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Material::load(ca, cert, key).map(ServerTls)
    }

    /// From PEM text.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        Material::from_pem(ca, cert, key).map(ServerTls)
    }

    /// Checks that the key is the certificate's and that the certificate is a server
    /// certificate the CA issued, valid now (the CA is the one agents are verified against;
    /// `rna certs` issues hub and agent certificates from one CA).
    pub fn check(&self) -> Result<(), TlsError> {
        self.0.check(false)
    }

    pub(crate) fn quic_config(&self) -> Result<QuicServerConfig, TlsError> {
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
        config.alpn_protocols = vec![ALPN.to_vec()];
        // 0-RTT data could be replayed; the protocol does not need it.
        config.max_early_data_size = 0;
        QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))
    }
}

/// The agent's TLS material: the CA to verify the hub with, and its client certificate.
#[derive(Clone, Debug)]
pub struct ClientTls(Material);

impl ClientTls {
    /// From PEM files: the CA, the agent's certificate chain and its key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Material::load(ca, cert, key).map(ClientTls)
    }

    /// From PEM text.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        Material::from_pem(ca, cert, key).map(ClientTls)
    }

    /// Checks that the key is the certificate's and that the certificate is a client
    /// certificate the CA issued, valid now: what the hub will require of it.
    pub fn check(&self) -> Result<(), TlsError> {
        self.0.check(true)
    }

    pub(crate) fn quic_config(&self) -> Result<QuicClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(&self.0.ca)?)
            .with_client_auth_cert(self.0.chain.clone(), self.0.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        QuicClientConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))
    }
}

/// Checks that `name` can be used as the TLS server name of a hub.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}
