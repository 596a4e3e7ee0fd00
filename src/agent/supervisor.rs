//! One agent's connections to one hub name: resolve it, keep a connection per address it
//! resolves to, and reconnect each with backoff, saying in one line why an attempt failed and
//! what to do about it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use super::{admin, kube, session, AgentConfig, AgentStatus, Dialer, Endpoints, HubTarget};
use super::{Retry, SessionError};
use crate::auth::{Secret, StoreError};
use crate::proto::CloseCode;
use crate::transport;

/// Delay of that immediate reconnect.
const IMMEDIATE_RECONNECT: Duration = Duration::from_millis(10);

/// What every connection of the agent to a hub shares; cloned into each hub name's task and
/// each address's connect loop.
#[derive(Clone)]
pub(super) struct Supervisor {
    /// The agent's configuration (with the cluster capability when cluster mode is on).
    pub(super) config: Arc<AgentConfig>,
    /// Runs Kubernetes commands, when cluster mode is on.
    pub(super) kube: Option<Arc<kube::KubeExecutor>>,
    /// Dials the destinations of tunnel streams, shared by every session.
    pub(super) dialer: Arc<Dialer>,
    /// What the agent's handle reports (sessions up, last error).
    pub(super) status: Arc<tokio::sync::watch::Sender<AgentStatus>>,
    /// The agent's metrics.
    pub(super) metrics: Arc<admin::AgentMetrics>,
    /// The QUIC endpoint of each hub address, so the handle can rebind them.
    pub(super) endpoints: Endpoints,
    /// Ends the waits between connection attempts (a token reload).
    pub(super) wake: Arc<tokio::sync::Notify>,
}

impl Supervisor {
    /// Keeps one connection per address the hub name resolves to.
    pub(super) async fn follow(self, target: HubTarget, cancel: CancellationToken) {
        let mut connectors: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        let tasks = TaskTracker::new();
        let mut retry = self.backoff();
        loop {
            let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
            let delay = match tokio::time::timeout(Duration::from_secs(10), lookup).await {
                Ok(Ok(addrs)) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    connectors.retain(|addr, token| {
                        let keep = addrs.contains(addr);
                        if !keep {
                            info!(%addr, "hub address no longer resolves; closing its session");
                            token.cancel();
                        }
                        keep
                    });
                    for addr in addrs {
                        if connectors.contains_key(&addr) {
                            continue;
                        }
                        let token = cancel.child_token();
                        connectors.insert(addr, token.clone());
                        let me = self.clone();
                        let name = self
                            .config
                            .server_name
                            .clone()
                            .unwrap_or_else(|| target.host.clone());
                        tasks.spawn(
                            me.connect_loop(addr, name, token)
                                .instrument(tracing::info_span!("conn", %addr)),
                        );
                    }
                    retry = self.backoff();
                    self.config.resolve_interval
                }
                Ok(Err(e)) => {
                    warn!("cannot resolve hub {target}: {e}");
                    retry.next_delay()
                }
                Err(_) => {
                    warn!("resolving hub {target} timed out");
                    retry.next_delay()
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        tasks.close();
        tasks.wait().await;
    }

    /// Pacing after connection failures and lost sessions.
    fn backoff(&self) -> Retry {
        Retry::new(self.config.backoff.min, self.config.backoff.max)
    }

    /// Pacing after refusals an operator must fix (token, certificate).
    fn refused_backoff(&self) -> Retry {
        Retry::new(self.config.backoff.refused, self.config.backoff.refused_max)
    }

    /// The token for the next attempt: the token file as it is now, when there is one.
    fn current_token(&self) -> Result<Secret, StoreError> {
        match &self.config.token_file {
            Some(path) => crate::auth::load_secret_file(path),
            None => Ok(self.config.token.clone()),
        }
    }

    /// Connects to one hub address, serves the session, and reconnects with jittered
    /// backoff until cancelled.
    async fn connect_loop(self, addr: SocketAddr, server_name: String, cancel: CancellationToken) {
        let endpoint = match transport::agent_endpoint(addr, &self.config.tls, &self.config.limits)
        {
            Ok(e) => e,
            Err(e) => {
                error!("cannot create a QUIC endpoint: {e}");
                return;
            }
        };
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, endpoint.clone());
        let mut retry = self.backoff();
        let mut refused = self.refused_backoff();
        let mut first = true;
        loop {
            if !first {
                self.metrics.reconnect();
            }
            first = false;
            let token = match self.current_token() {
                Ok(token) => token,
                Err(e) => {
                    let delay = refused.next_delay();
                    error!(retry_in = ?delay,
                        "cannot read the token file: {e}; the agent reads it again before each attempt");
                    if self.pause(delay, &cancel).await {
                        break;
                    }
                    continue;
                }
            };
            let attempt = tokio::select! {
                _ = cancel.cancelled() => break,
                r = session::connect_with_token(&endpoint, addr, &server_name, &self.config, &token) => r,
            };
            let delay = match attempt {
                Ok(established) => {
                    retry = self.backoff();
                    refused = self.refused_backoff();
                    info!(session = established.welcome.session_id, tenant = %established.welcome.tenant,
                        "connected to hub");
                    self.check_hub_certificate(&established.connection);
                    self.metrics.hub_connection(true);
                    self.status.send_modify(|s| {
                        s.connected += 1;
                        s.sessions_total += 1;
                        s.last_error = None;
                    });
                    let up_since = std::time::Instant::now();
                    let run = session::run(
                        established,
                        self.dialer.clone(),
                        self.kube.clone(),
                        &self.config.name,
                        &cancel,
                    );
                    tokio::pin!(run);
                    // The moment the session turns stable is logged, so an operator (and a
                    // test) can tell when a drop stops costing a backoff.
                    let end = tokio::select! {
                        end = &mut run => end,
                        () = tokio::time::sleep(self.config.stable_session) => {
                            debug!("session stable; a drop now reconnects at once");
                            run.await
                        }
                    };
                    self.metrics.hub_connection(false);
                    self.status
                        .send_modify(|s| s.connected = s.connected.saturating_sub(1));
                    if cancel.is_cancelled() {
                        break;
                    }
                    if end.going_away {
                        info!("hub is going away: {}; reconnecting", end.reason);
                        // Replicas restart together: spread the reconnects a little.
                        Duration::from_millis(50)
                    } else if up_since.elapsed() >= self.config.stable_session {
                        // A session that had been up is worth one immediate retry: a hub that
                        // restarted (its stateless reset ends our session) answers at once.
                        // Failures after that back off as usual.
                        warn!("session ended: {}; reconnecting now", end.reason);
                        IMMEDIATE_RECONNECT
                    } else {
                        warn!("session ended: {}; reconnecting", end.reason);
                        retry.next_delay()
                    }
                }
                Err(e) => {
                    let delay = match &e {
                        SessionError::Rejected { code, .. } if code.is_permanent() => {
                            refused.next_delay()
                        }
                        SessionError::Tls(_) => refused.next_delay(),
                        _ => retry.next_delay(),
                    };
                    match (&e, refusal_hint(&e, &self.config)) {
                        // Routine during a hub restart: the hub refuses while it drains.
                        (SessionError::Busy(_), _) => info!(retry_in = ?delay, "{e}; retrying"),
                        (SessionError::Rejected { .. } | SessionError::Tls(_), hint) => {
                            match hint {
                                Some(hint) => error!(retry_in = ?delay, "{e}; {hint}"),
                                None => error!(retry_in = ?delay, "{e}"),
                            }
                        }
                        _ => warn!(retry_in = ?delay, "{e}"),
                    }
                    self.status.send_modify(|s| s.last_error = Some(e.clone()));
                    delay
                }
            };
            if self.pause(delay, &cancel).await {
                break;
            }
        }
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
        endpoint.close(crate::proto::CloseCode::Normal.into(), b"agent stopping");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
}

impl Supervisor {
    /// Records the expiry of the hub's certificate on this connection as a metric, and warns
    /// from 30 days before it. The agent's own certificate and CA are checked by
    /// [`watch_own_certificates`], not per connection.
    fn check_hub_certificate(&self, connection: &quinn::Connection) {
        let hub = transport::tls::peer_certificate(connection)
            .and_then(|cert| crate::certs::not_after(&cert).ok());
        if let Some(not_after) = hub {
            self.metrics.certificate_expiry("hub", not_after);
            let warning = crate::certs::expiry_warning(
                "the hub's certificate",
                not_after,
                std::time::SystemTime::now(),
            );
            if let Some(warning) = warning {
                warn!("{warning}");
            }
        }
    }

    /// Waits `delay`, or less when a token reload wakes the agent; true when cancelled.
    async fn pause(&self, delay: Duration, cancel: &CancellationToken) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
            _ = self.wake.notified() => false,
        }
    }
}

/// How often a running agent looks at its own certificate and CA again: their expiry is read
/// once at start, and a warning must still appear for an agent that runs for months.
pub(super) const OWN_CERTIFICATE_CHECK: Duration = Duration::from_secs(24 * 60 * 60);

/// Records the expiry of the agent's own certificate and CA (`expiries`, read once from its
/// TLS material at start) as metrics and warns from 30 days before either lapses: now, and
/// again every `every` until `cancel` fires. Cancel-safe.
pub(super) async fn watch_own_certificates(
    expiries: Vec<(&'static str, std::time::SystemTime)>,
    metrics: Arc<admin::AgentMetrics>,
    every: Duration,
    cancel: CancellationToken,
) {
    for &(role, not_after) in &expiries {
        metrics.certificate_expiry(role, not_after);
    }
    loop {
        crate::certs::warn_expiring(&expiries, "this agent's");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// What an operator should do about a refusal, for its log line.
fn refusal_hint(e: &SessionError, config: &AgentConfig) -> Option<String> {
    let SessionError::Rejected { code, .. } = e else {
        return None;
    };
    let file = config
        .token_file
        .as_ref()
        .map_or_else(|| "the token file".to_string(), |p| p.display().to_string());
    let create = format!(
        "create one with: rna token create --tenant <organization/environment> \
         --scope connect:agentHub --label {} and write it to {file} (read again before \
         every attempt; no restart needed)",
        config.name
    );
    let hint = match code {
        CloseCode::BadToken => format!("the hub does not know this token; {create}"),
        CloseCode::TokenRevoked => format!("this token was revoked; {create}"),
        CloseCode::TokenExpired => format!("this token has expired; {create}"),
        CloseCode::MissingScope => format!("this token may not register agents; {create}"),
        CloseCode::CertificateMismatch => format!(
            "the certificate names another agent: issue one for this name with \
             rna certs agent --dir <the hub's CA folder> {}, or run with the --name the \
             certificate names",
            config.name
        ),
        CloseCode::VersionMismatch => {
            "run the same rna release as the hub (its protocol version differs)".to_string()
        }
        _ => return None,
    };
    Some(hint)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn each_refusal_says_what_to_do() {
        let ca = crate::certs::Ca::generate("hint CA").unwrap();
        let cert = ca.issue_agent("edge").unwrap();
        let tls =
            crate::transport::ClientTls::from_pem(&ca.cert_pem(), &cert.cert_pem, &cert.key_pem)
                .unwrap();
        let target: HubTarget = "127.0.0.1:4433".parse().unwrap();
        let mut config =
            AgentConfig::new(vec![target], "edge".into(), tls, Secret::new("t".into()));
        config.token_file = Some(PathBuf::from("/etc/rna/token"));
        let rejected = |code| SessionError::Rejected {
            code,
            reason: "why".into(),
        };
        for code in [
            CloseCode::BadToken,
            CloseCode::TokenRevoked,
            CloseCode::TokenExpired,
            CloseCode::MissingScope,
        ] {
            let hint = refusal_hint(&rejected(code), &config).unwrap();
            assert!(
                hint.contains("create one with: rna token create --tenant")
                    && hint.contains("--scope connect:agentHub --label edge")
                    && hint.contains("/etc/rna/token"),
                "{code}: {hint}"
            );
        }
        let hint = refusal_hint(&rejected(CloseCode::CertificateMismatch), &config).unwrap();
        assert!(hint.contains("rna certs agent --dir"), "{hint}");
        assert!(refusal_hint(&rejected(CloseCode::HeartbeatTimeout), &config).is_none());
    }
}
