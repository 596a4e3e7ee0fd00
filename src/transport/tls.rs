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

/// The hub's TLS material: its certificate chain, key, and the CA agents must chain to.
#[derive(Clone)]
pub struct ServerTls {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("ca_certs", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("key", &"MASKED")
            .finish()
    }
}

impl ServerTls {
    /// From already-parsed material.
    pub fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        ServerTls {
            ca,
            chain,
            key: Arc::new(key),
        }
    }

    /// From PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self::new(
            certs::load_certs(ca)?,
            certs::load_certs(cert)?,
            certs::load_key(key)?,
        ))
    }

    /// From PEM text.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        Ok(Self::new(
            certs::parse_certs(ca)?,
            certs::parse_certs(cert)?,
            certs::parse_key(key)?,
        ))
    }

    pub(crate) fn quic_config(&self) -> Result<QuicServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&self.ca)?),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        // 0-RTT data could be replayed; the protocol does not need it.
        config.max_early_data_size = 0;
        QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))
    }
}

/// The agent's TLS material: the CA to verify the hub with, and its client certificate.
#[derive(Clone)]
pub struct ClientTls {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_certs", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("key", &"MASKED")
            .finish()
    }
}

impl ClientTls {
    /// From already-parsed material.
    pub fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        ClientTls {
            ca,
            chain,
            key: Arc::new(key),
        }
    }

    /// From PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self::new(
            certs::load_certs(ca)?,
            certs::load_certs(cert)?,
            certs::load_key(key)?,
        ))
    }

    /// From PEM text.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        Ok(Self::new(
            certs::parse_certs(ca)?,
            certs::parse_certs(cert)?,
            certs::parse_key(key)?,
        ))
    }

    pub(crate) fn quic_config(&self) -> Result<QuicClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(&self.ca)?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        QuicClientConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))
    }
}

/// Checks that `name` can be used as the TLS server name of a hub.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}
