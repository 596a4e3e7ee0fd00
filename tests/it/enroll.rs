//! Enrollment pieces over real TLS on loopback: the agent's pinned first contact accepts only
//! the hub whose CA matches the join token's pin and sends nothing before that; a certificate
//! signed from an agent's CSR passes the hub's client-certificate check and carries its tenant.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rna::certs::{parse_certs, parse_key, Ca, IssuedCert};
use rna::enroll::{
    agent_identity, ca_pin, make_csr, Admission, PinnedHubVerifier, Signer, ENROLL_ALPN,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::common::within;

const HUB_NAME: &str = "hub.example.com";
const SECRET: &[u8] = b"rna_join_0123456789ab.the-secret-part";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What one TLS server saw of its one connection.
struct Seen {
    /// The handshake's outcome on the server side.
    handshake: Result<(), String>,
    /// Every decrypted byte the client sent.
    received: Vec<u8>,
    /// The client's certificate, if it presented one.
    client_cert: Option<Vec<u8>>,
}

/// Serves one TLS connection with `config` on 127.0.0.1:0 and reports what it saw.
async fn serve_once(config: rustls::ServerConfig) -> (SocketAddr, JoinHandle<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Err(e) => Seen {
                handshake: Err(e.to_string()),
                received: Vec::new(),
                client_cert: None,
            },
            Ok(mut tls) => {
                let client_cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|c| c.to_vec());
                let mut received = Vec::new();
                // The client may end the connection abruptly after a failure; what arrived
                // before that is what counts.
                let _ = tls.read_to_end(&mut received).await;
                let _ = tls.shutdown().await;
                Seen {
                    handshake: Ok(()),
                    received,
                    client_cert,
                }
            }
        }
    });
    (addr, task)
}

/// A hub server configuration presenting `hub` followed by `extra` certificates.
fn hub_config(hub: &IssuedCert, extra: &[Vec<u8>]) -> rustls::ServerConfig {
    let mut chain = parse_certs(&hub.cert_pem).unwrap();
    chain.extend(extra.iter().map(|der| CertificateDer::from(der.clone())));
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, parse_key(&hub.key_pem).unwrap())
        .unwrap();
    config.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    config
}

/// Connects as an enrolling agent with the pin of `pinned` and, only if the hub is accepted,
/// sends the join secret. Returns the handshake error, if any, and the CA that matched.
async fn enroll_contact(
    addr: SocketAddr,
    pinned: &Ca,
    name: &str,
) -> (Result<(), String>, Option<Vec<u8>>) {
    let pin = ca_pin(&pinned.cert_der()).unwrap();
    let (config, verifier) = PinnedHubVerifier::client_config(pin, ENROLL_ALPN).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let outcome = match connector.connect(server_name, tcp).await {
        Ok(mut tls) => {
            tls.write_all(SECRET).await.unwrap();
            tls.shutdown().await.unwrap();
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    (outcome, verifier.matched_ca().map(|c| c.to_vec()))
}

#[tokio::test]
async fn the_pinned_hub_is_accepted_and_receives_the_secret() {
    let ca = Ca::generate("hub CA").unwrap();
    let hub = ca.issue_hub(&[HUB_NAME.to_owned()]).unwrap();
    let (addr, server) = serve_once(hub_config(&hub, &[ca.cert_der()])).await;
    let (outcome, matched) = within("pinned contact", enroll_contact(addr, &ca, HUB_NAME)).await;
    outcome.unwrap();
    assert_eq!(
        matched,
        Some(ca.cert_der()),
        "the matched CA is kept for the agent"
    );
    let seen = within("hub side", server).await.unwrap();
    seen.handshake.unwrap();
    assert_eq!(seen.received, SECRET);
}

#[tokio::test]
async fn a_hub_of_another_ca_is_refused_before_the_secret_is_sent() {
    let ca = Ca::generate("hub CA").unwrap();
    // Another hub answering at the same address, with its own CA and the same name.
    let rogue_ca = Ca::generate("hub CA").unwrap();
    let rogue = rogue_ca.issue_hub(&[HUB_NAME.to_owned()]).unwrap();
    let (addr, server) = serve_once(hub_config(&rogue, &[rogue_ca.cert_der()])).await;
    let (outcome, matched) = within("refused contact", enroll_contact(addr, &ca, HUB_NAME)).await;
    let err = outcome.unwrap_err();
    assert!(
        err.contains("does not match the join token's CA pin"),
        "{err}"
    );
    assert_eq!(matched, None);
    let seen = within("rogue hub side", server).await.unwrap();
    assert!(
        seen.handshake.is_err(),
        "the rogue hub's handshake must fail"
    );
    assert!(
        seen.received.is_empty(),
        "the rogue hub received {:?}",
        seen.received
    );

    // The rogue hub presenting the real CA certificate too does not help: its own certificate
    // does not chain to it.
    let (addr, server) =
        serve_once(hub_config(&rogue, &[rogue_ca.cert_der(), ca.cert_der()])).await;
    let (outcome, _) = within("refused contact", enroll_contact(addr, &ca, HUB_NAME)).await;
    assert!(outcome.is_err());
    let seen = within("rogue hub side", server).await.unwrap();
    assert!(seen.received.is_empty());
}

#[tokio::test]
async fn a_hub_without_its_ca_or_with_another_name_is_refused() {
    let ca = Ca::generate("hub CA").unwrap();
    let hub = ca.issue_hub(&[HUB_NAME.to_owned()]).unwrap();
    let (addr, server) = serve_once(hub_config(&hub, &[])).await;
    let (outcome, _) = within("no CA", enroll_contact(addr, &ca, HUB_NAME)).await;
    let err = outcome.unwrap_err();
    assert!(err.contains("sent no CA certificate"), "{err}");
    assert!(within("hub side", server)
        .await
        .unwrap()
        .received
        .is_empty());

    let (addr, server) = serve_once(hub_config(&hub, &[ca.cert_der()])).await;
    let (outcome, _) = within("wrong name", enroll_contact(addr, &ca, "other.example.com")).await;
    let err = outcome.unwrap_err();
    assert!(err.to_lowercase().contains("not valid for name"), "{err}");
    assert!(within("hub side", server)
        .await
        .unwrap()
        .received
        .is_empty());
}

/// A hub server configuration that requires a client certificate chained to `ca`.
fn client_auth_config(ca: &Ca, hub: &IssuedCert) -> rustls::ServerConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.cert_der())).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certs(&hub.cert_pem).unwrap(),
            parse_key(&hub.key_pem).unwrap(),
        )
        .unwrap()
}

/// Connects with the agent certificate `cert_der` and key `key_pem`, trusting `ca`.
async fn connect_as_agent(
    addr: SocketAddr,
    ca: &Ca,
    cert_der: &[u8],
    key_pem: &str,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.cert_der())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(cert_der.to_vec())],
            parse_key(key_pem).unwrap(),
        )
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from(HUB_NAME).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3 servers check the client certificate after the client's handshake is done: a
    // refusal shows on the first read.
    tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
    tls.shutdown().await.map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn admission(tenant: &str, agent: &str) -> Admission {
    Admission {
        token_id: "0123456789ab".into(),
        tenant: tenant.parse().unwrap(),
        agent: agent.into(),
    }
}

#[tokio::test]
async fn a_certificate_signed_from_a_csr_passes_client_auth_and_carries_its_tenant() {
    let ca = Ca::generate("hub CA").unwrap();
    let hub = ca.issue_hub(&[HUB_NAME.to_owned()]).unwrap();
    let signer = Signer::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
    let csr = make_csr("edge").unwrap();
    let lifetime = Duration::from_secs(30 * 24 * 60 * 60);
    let now = SystemTime::now();
    let signed = signer
        .sign(&csr.csr_der, &admission("acme/prod", "edge"), lifetime, now)
        .unwrap();
    assert_eq!(
        signed.not_after,
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + lifetime.as_secs()
    );

    let (addr, server) = serve_once(client_auth_config(&ca, &hub)).await;
    within(
        "agent handshake",
        connect_as_agent(addr, &ca, &signed.cert_der, csr.key_pem.expose()),
    )
    .await
    .unwrap();
    let seen = within("hub side", server).await.unwrap();
    seen.handshake.unwrap();
    assert_eq!(seen.received, b"hello");
    // The hub reads the tenant from the certificate it was shown.
    let identity = agent_identity(&seen.client_cert.unwrap()).unwrap();
    assert_eq!(identity.tenant.as_str(), "acme/prod");
    assert_eq!(identity.agent, "edge");
    assert_eq!(identity.serial, signed.serial);
}

#[tokio::test]
async fn expired_or_foreign_agent_certificates_fail_client_auth() {
    let ca = Ca::generate("hub CA").unwrap();
    let hub = ca.issue_hub(&[HUB_NAME.to_owned()]).unwrap();
    let signer = Signer::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
    let csr = make_csr("edge").unwrap();
    // Issued 100 s ago for 10 s: expired now.
    let expired = signer
        .sign(
            &csr.csr_der,
            &admission("acme/prod", "edge"),
            Duration::from_secs(10),
            SystemTime::now() - Duration::from_secs(100),
        )
        .unwrap();
    let (addr, server) = serve_once(client_auth_config(&ca, &hub)).await;
    let outcome = within(
        "expired agent",
        connect_as_agent(addr, &ca, &expired.cert_der, csr.key_pem.expose()),
    )
    .await;
    assert!(outcome.is_err());
    let seen = within("hub side", server).await.unwrap();
    let err = seen.handshake.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");

    // Signed by another CA of the same name: its signature does not verify.
    let other = Ca::generate("hub CA").unwrap();
    let foreign = Signer::from_pem(&other.cert_pem(), &other.key_pem())
        .unwrap()
        .sign(
            &csr.csr_der,
            &admission("acme/prod", "edge"),
            Duration::from_secs(3_600),
            SystemTime::now(),
        )
        .unwrap();
    let (addr, server) = serve_once(client_auth_config(&ca, &hub)).await;
    let outcome = within(
        "foreign agent",
        connect_as_agent(addr, &ca, &foreign.cert_der, csr.key_pem.expose()),
    )
    .await;
    assert!(outcome.is_err());
    let seen = within("hub side", server).await.unwrap();
    let err = seen.handshake.unwrap_err();
    assert!(err.to_lowercase().contains("signature"), "{err}");
    assert!(seen.received.is_empty());
}
