//! The agent's side of enrollment: make a key and a CSR here, check the hub against the join
//! token's CA pin before anything secret is sent, send the join token and the CSR, and keep
//! what the hub issued (certificate, CA, connect token) in the agent's state folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::info;

use super::{HubTarget, TransportMode};
use crate::enroll::wire::{self, ENROLL_PROTOCOL};
use crate::enroll::{
    agent_identity, make_csr, EnrollReply, EnrollRequest, JoinToken, PinnedHubVerifier,
    RenewRequest, ENROLL_ALPN, RENEW_ALPN,
};
use crate::fsutil::{replace_file, FileMode};
use crate::proto::codec;
use crate::transport::proxy::{ProxySettings, ProxyUrl};
use crate::transport::session::Session;
use crate::transport::{tcp, ClientTls};

/// How a QUIC exchange's error starts when TLS refused (a hub of another CA).
const TLS_FAILURE: &str = "TLS: ";

/// Time for the whole exchange with one hub address: QUIC and TLS, request and reply.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);

/// Why enrollment failed; the message is one line an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    /// The join token does not parse.
    #[error("{0}")]
    Join(crate::enroll::EnrollError),
    /// The hub refused the join token or the CSR; `code` is its refusal code.
    #[error("the hub refused enrollment ({code}): {message}")]
    Refused {
        /// The hub's refusal code.
        code: crate::enroll::RefusalCode,
        /// The hub's message.
        message: String,
    },
    /// No hub could be reached or checked: DNS, QUIC, or a hub whose CA is not the pinned one.
    #[error("enrollment with {hub} failed: {message}")]
    Hub {
        /// The address dialled.
        hub: String,
        /// What went wrong.
        message: String,
    },
    /// The state folder could not be written.
    #[error("{}: {message}", path.display())]
    State {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The files of an agent's state folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentState {
    /// The folder.
    dir: PathBuf,
}

impl AgentState {
    /// The state folder `dir`.
    pub fn new(dir: &Path) -> AgentState {
        AgentState {
            dir: dir.to_path_buf(),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hub CA, `ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The agent certificate, `agent.pem`.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("agent.pem")
    }

    /// The agent key, `agent-key.pem` (0600; made here, never sent).
    pub fn key(&self) -> PathBuf {
        self.dir.join("agent-key.pem")
    }

    /// The connect token, `token.txt` (0600).
    pub fn token(&self) -> PathBuf {
        self.dir.join("token.txt")
    }

    /// Whether an enrollment has left its files here.
    pub fn is_enrolled(&self) -> bool {
        [self.ca(), self.cert(), self.key(), self.token()]
            .iter()
            .all(|p| p.exists())
    }

    /// What the stored certificate says of renewal at `now`: `Some(false)` while it is in the
    /// first two thirds of its lifetime, `Some(true)` after (or once expired), `None` when it
    /// cannot be read or carries no enrolled identity.
    pub fn renewal_due(&self, now: SystemTime) -> Option<bool> {
        let chain = crate::certs::load_certs(&self.cert()).ok()?;
        crate::enroll::renewal_due(chain.first()?, now)
    }

    /// Whether the stored certificate is still within its validity at `now`.
    pub fn still_valid(&self, now: SystemTime) -> bool {
        crate::certs::load_certs(&self.cert())
            .ok()
            .and_then(|chain| chain.first().cloned())
            .and_then(|cert| crate::certs::not_after(&cert).ok())
            .is_some_and(|not_after| now < not_after)
    }

    fn write(&self, path: PathBuf, bytes: &[u8], mode: u32) -> Result<(), EnrollmentError> {
        replace_file(&path, bytes, FileMode::Exactly(mode)).map_err(|e| EnrollmentError::State {
            path,
            message: e.problem.to_string(),
        })
    }
}

/// Enrolls agent `name` with the first hub address that answers, and writes key, certificate,
/// CA and connect token into `state` (created 0700 if missing). Returns the certificate's
/// serial.
pub async fn enroll(
    hubs: &[HubTarget],
    server_name: Option<&str>,
    name: &str,
    join: &str,
    state: &AgentState,
    reach: &Reach,
) -> Result<String, EnrollmentError> {
    let join = JoinToken::parse(join).map_err(EnrollmentError::Join)?;
    let csr = make_csr(name).map_err(EnrollmentError::Join)?;
    let (config, frame) =
        enroll_request(&join, &csr.csr_der, state).map_err(|message| EnrollmentError::State {
            path: state.cert(),
            message,
        })?;
    let (issued, what) = first_answer(hubs, server_name, reach, config, &frame).await?;
    issued.check_ca(join.pin()).map_err(EnrollmentError::Join)?;
    let cert = issued.chain.first().ok_or_else(|| EnrollmentError::Hub {
        hub: what.clone(),
        message: "the reply holds no certificate".into(),
    })?;
    let identity = agent_identity(&cert.0).map_err(EnrollmentError::Join)?;
    if identity.agent != name {
        return Err(EnrollmentError::Hub {
            hub: what,
            message: format!("the certificate names agent {:?}", identity.agent),
        });
    }
    crate::fsutil::create_private_dir(&state.dir).map_err(|e| EnrollmentError::State {
        path: state.dir.clone(),
        message: e.to_string(),
    })?;
    let chain: String = issued
        .chain
        .iter()
        .map(|c| pem("CERTIFICATE", &c.0))
        .collect();
    state.write(state.key(), csr.key_pem.expose().as_bytes(), 0o600)?;
    state.write(state.cert(), chain.as_bytes(), 0o644)?;
    state.write(
        state.ca(),
        pem("CERTIFICATE", &issued.ca.0).as_bytes(),
        0o644,
    )?;
    let token = format!("{}\n", issued.connect_token.expose());
    state.write(state.token(), token.as_bytes(), 0o600)?;
    info!(agent = %name, tenant = %identity.tenant, serial = %issued.serial,
        hub = %what, state = %state.dir.display(), "enrolled");
    Ok(issued.serial)
}

/// Sends `frame` over `config` to each address of `hubs` in turn until one answers: its
/// certificate reply with the `host:port` it came from, or its refusal as the error. When
/// none answers, the error of the last address tried.
async fn first_answer(
    hubs: &[HubTarget],
    server_name: Option<&str>,
    reach: &Reach,
    config: rustls::ClientConfig,
    frame: &[u8],
) -> Result<(crate::enroll::Issued, String), EnrollmentError> {
    let mut last = None;
    for hub in hubs {
        let what = format!("{}:{}", hub.host, hub.port);
        let addrs = match tokio::net::lookup_host((hub.host.as_str(), hub.port)).await {
            Ok(addrs) => addrs.collect::<Vec<_>>(),
            Err(e) => {
                last = Some(EnrollmentError::Hub {
                    hub: what,
                    message: format!("cannot resolve: {e}"),
                });
                continue;
            }
        };
        let tls_name = server_name.unwrap_or(&hub.host);
        for addr in addrs {
            let exchange = exchange_at(reach, &hub.host, addr, tls_name, config.clone(), frame);
            let outcome = match tokio::time::timeout(ENROLL_TIMEOUT, exchange).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {ENROLL_TIMEOUT:?}")),
            };
            match outcome {
                Ok(EnrollReply::Issued(issued)) => return Ok((issued, what)),
                Ok(EnrollReply::Refused { code, message }) => {
                    return Err(EnrollmentError::Refused { code, message })
                }
                Err(message) => {
                    last = Some(EnrollmentError::Hub {
                        hub: format!("{what} ({addr})"),
                        message,
                    })
                }
            }
        }
    }
    Err(last.unwrap_or(EnrollmentError::Hub {
        hub: "(none)".into(),
        message: "no hub address given (--hub)".into(),
    }))
}

/// The TLS configuration and request frame of an enrollment. The pinned verifier fails the
/// handshake on a hub of another CA, so the request, which holds the join secret, is only
/// written after it.
fn enroll_request(
    join: &JoinToken,
    csr_der: &[u8],
    state: &AgentState,
) -> Result<(rustls::ClientConfig, Vec<u8>), String> {
    // An agent enrolling again presents its current certificate while it is valid, so the
    // hub holds it to its tenant.
    let current = state
        .still_valid(SystemTime::now())
        .then(|| {
            let chain = crate::certs::load_certs(&state.cert()).ok()?;
            let key = crate::certs::load_key(&state.key()).ok()?;
            Some((chain, key))
        })
        .flatten();
    let (config, _verifier) = match current {
        Some((chain, key)) => {
            PinnedHubVerifier::client_config_presenting(join.pin(), ENROLL_ALPN, chain, key)
        }
        None => PinnedHubVerifier::client_config(join.pin(), ENROLL_ALPN),
    }
    .map_err(|e| e.to_string())?;
    let request = EnrollRequest {
        protocol: ENROLL_PROTOCOL,
        join_token: join.text(),
        csr_der: csr_der.to_vec(),
    };
    let frame = wire::encode_request(&request).map_err(|e| e.to_string())?;
    Ok((config, frame.to_vec()))
}

/// How the enrollment and renewal exchanges reach a hub: the transport and proxy the
/// agent's sessions use (`--transport`, `--proxy`, `--quic-fallback-after`).
#[derive(Debug, Clone)]
pub struct Reach {
    /// QUIC, TLS over TCP, or QUIC with a fallback to TCP.
    pub transport: TransportMode,
    /// The HTTP proxy for TCP, and the hubs reached without it.
    pub proxy: ProxySettings,
    /// With `auto`: how long QUIC may take before TCP is tried.
    pub quic_fallback_after: Duration,
}

impl Default for Reach {
    fn default() -> Self {
        Reach {
            transport: TransportMode::Auto,
            proxy: ProxySettings::default(),
            quic_fallback_after: Duration::from_secs(5),
        }
    }
}

impl Reach {
    /// The way the agent configured by `config` reaches its hubs.
    pub fn of(config: &super::AgentConfig) -> Reach {
        Reach {
            transport: config.transport,
            proxy: config.proxy.clone(),
            quic_fallback_after: config.quic_fallback_after,
        }
    }
}

/// One exchange with the hub address `addr` (of the name `host`) the way `reach` says: QUIC;
/// TLS over TCP (through the proxy when one is in effect); or, with `auto`, QUIC first and
/// TCP when QUIC fails or gets no answer in time, as the agent's sessions fall back.
async fn exchange_at(
    reach: &Reach,
    host: &str,
    addr: SocketAddr,
    server_name: &str,
    config: rustls::ClientConfig,
    frame: &[u8],
) -> Result<EnrollReply, String> {
    let proxy = match reach.transport {
        TransportMode::Quic => None,
        _ => reach.proxy.for_hub(host, addr.port()).cloned(),
    };
    let quic_first = match reach.transport {
        TransportMode::Quic => true,
        TransportMode::Auto => proxy.is_none(),
        TransportMode::Tcp => false,
    };
    if quic_first {
        if reach.transport == TransportMode::Quic {
            return quic_exchange(addr, server_name, config, frame).await;
        }
        let quic = quic_exchange(addr, server_name, config.clone(), frame);
        let why = match tokio::time::timeout(reach.quic_fallback_after, quic).await {
            Ok(Ok(reply)) => return Ok(reply),
            // The hub answered and TLS refused: TCP would meet the same hub (as sessions do,
            // only an unanswered or unsendable QUIC falls back).
            Ok(Err(e)) if e.starts_with(TLS_FAILURE) => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer in {:?}", reach.quic_fallback_after),
        };
        info!("QUIC to {addr} (UDP): {why}; trying TLS over TCP");
    }
    tcp_exchange(addr, host, server_name, config, frame, proxy.as_ref()).await
}

/// One request frame and one reply over TLS/TCP (QMux), straight to `addr` or through
/// `proxy` (`CONNECT host:port`), then the session is closed.
async fn tcp_exchange(
    addr: SocketAddr,
    host: &str,
    server_name: &str,
    config: rustls::ClientConfig,
    frame: &[u8],
    proxy: Option<&ProxyUrl>,
) -> Result<EnrollReply, String> {
    let limits = crate::transport::Limits::default();
    let tcp = match proxy {
        None => tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("TCP to {addr}: {e}"))?,
        Some(proxy) => crate::transport::proxy::connect(proxy, host, addr.port(), ENROLL_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?,
    };
    let session = tcp::connect_over_with(tcp, addr, server_name, config, &limits)
        .await
        .map_err(|e| format!("TLS over TCP: {e}"))?;
    let session = Session::from(session);
    let result = async {
        let (mut send, mut recv) = session.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(frame).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let body = codec::read_body_limited(&mut recv, codec::MAX_FRAME)
            .await
            .map_err(|e| format!("reading the reply: {e}"))?
            .ok_or_else(|| match session.close_reason() {
                Some(reason) => format!("the hub closed the connection: {reason}"),
                None => "the hub sent no reply".to_string(),
            })?;
        wire::decode_reply(&body).map_err(|e| e.to_string())
    }
    .await;
    session.close(wire::ENROLL_DONE, "done");
    session.flush_close(Duration::from_secs(1)).await;
    result
}

/// One request frame and one reply over QUIC with the TLS client configuration `config`
/// (its ALPN names the exchange), then the connection is closed.
async fn quic_exchange(
    addr: SocketAddr,
    server_name: &str,
    config: rustls::ClientConfig,
    frame: &[u8],
) -> Result<EnrollReply, String> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(config).map_err(|e| e.to_string())?;
    let local: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(local).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let result = async {
        let connection = endpoint
            .connect(addr, server_name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| match crate::transport::tls::tls_failure(&e) {
                Some(_) => format!("{TLS_FAILURE}{e}"),
                None => e.to_string(),
            })?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(frame).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let body = codec::read_body_limited(&mut recv, codec::MAX_FRAME)
            .await
            .map_err(|e| format!("reading the reply: {e}"))?
            .ok_or_else(|| match connection.close_reason() {
                Some(reason) => format!("the hub closed the connection: {reason}"),
                None => "the hub sent no reply".into(),
            })?;
        connection.close(quinn::VarInt::from_u32(wire::ENROLL_DONE), b"done");
        wire::decode_reply(&body).map_err(|e| e.to_string())
    }
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

/// PEM text of one DER object.
fn pem(tag: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(tag, der.to_vec()))
}

/// A certificate renewed over the renewal exchange and written to the state folder.
#[derive(Debug, Clone)]
pub struct Renewed {
    /// The TLS material to make new sessions with: the same CA, the new certificate and key.
    pub tls: ClientTls,
    /// Lowercase hex of the new certificate's serial.
    pub serial: String,
    /// End of the new certificate's validity.
    pub not_after: SystemTime,
}

/// Renews the enrolled certificate of agent `name` with the first hub address that answers:
/// a new key made here (the old one is not reused, so a key lives no longer than its
/// certificate), a CSR sent over `rna-renew/1` authenticated by the current certificate in
/// `tls`, the hub verified against the agent's CA as for a session. The new key (0600) and
/// certificate replace the old ones in `state`; the connect token is kept.
pub async fn renew(
    hubs: &[HubTarget],
    server_name: Option<&str>,
    name: &str,
    tls: &ClientTls,
    state: &AgentState,
    reach: &Reach,
) -> Result<Renewed, EnrollmentError> {
    let csr = make_csr(name).map_err(EnrollmentError::Join)?;
    let request = RenewRequest {
        protocol: ENROLL_PROTOCOL,
        csr_der: csr.csr_der.clone(),
    };
    let frame = wire::encode_renewal(&request).map_err(EnrollmentError::Join)?;
    let config = tls.rustls_config(RENEW_ALPN);
    let (issued, what) = first_answer(hubs, server_name, reach, config, &frame).await?;
    keep_renewed(&issued, name, &csr, tls, state, &what)
}

/// Checks a renewal reply (the same CA, agent and tenant as the current certificate) and
/// writes the new key and certificate to `state`.
fn keep_renewed(
    issued: &crate::enroll::Issued,
    name: &str,
    csr: &crate::enroll::AgentCsr,
    tls: &ClientTls,
    state: &AgentState,
    hub: &str,
) -> Result<Renewed, EnrollmentError> {
    let bad = |message: String| EnrollmentError::Hub {
        hub: hub.to_owned(),
        message,
    };
    let cert = issued
        .chain
        .first()
        .ok_or_else(|| bad("the renewal reply holds no certificate".into()))?;
    let identity = agent_identity(&cert.0).map_err(EnrollmentError::Join)?;
    let current = tls
        .certificate()
        .and_then(|c| agent_identity(c.as_ref()).ok())
        .ok_or_else(|| bad("the current certificate carries no enrolled identity".into()))?;
    if identity.agent != name || identity.tenant != current.tenant {
        return Err(bad(format!(
            "the renewed certificate names agent {:?} of {}, not {name:?} of {}",
            identity.agent, identity.tenant, current.tenant
        )));
    }
    let ca_pem = pem("CERTIFICATE", &issued.ca.0);
    let chain: String = issued
        .chain
        .iter()
        .map(|c| pem("CERTIFICATE", &c.0))
        .collect();
    let renewed = ClientTls::from_pem(&ca_pem, &chain, csr.key_pem.expose())
        .map_err(|e| bad(format!("the renewed certificate cannot be used: {e}")))?;
    // The reply cannot swap the CA the agent trusts: it must be the one in the state folder.
    let same_ca = crate::certs::load_certs(&state.ca())
        .ok()
        .and_then(|certs| certs.first().map(|c| c.as_ref() == issued.ca.0.as_slice()))
        .unwrap_or(false);
    if renewed.check().is_err() || !same_ca {
        return Err(bad(
            "the renewed certificate is not one of this agent's CA, valid now".into(),
        ));
    }
    // The key first: a certificate is useless without it, and both files are replaced whole.
    state.write(state.key(), csr.key_pem.expose().as_bytes(), 0o600)?;
    state.write(state.cert(), chain.as_bytes(), 0o644)?;
    Ok(Renewed {
        tls: renewed,
        serial: issued.serial.clone(),
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(identity.not_after),
    })
}
