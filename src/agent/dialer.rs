//! Dials the destinations the hub asks for: resolves names inside the private network, checks
//! every resolved address against the policy, connects with a timeout, and turns failures
//! into the precise codes the hub maps to SOCKS5 replies.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use std::sync::{Arc, RwLock};

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::admin::AgentMetrics;
use super::policy::{ends_in_number, legacy_ipv4, Policy};
use crate::proto::{DialFailure, Host, Open};

/// Why a dial failed, as told to the hub.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DialError {
    /// The failure code (maps to a SOCKS5 reply).
    pub code: DialFailure,
    /// A readable detail (no secrets).
    pub message: String,
}

impl DialError {
    fn new(code: DialFailure, message: impl Into<String>) -> Self {
        DialError {
            code,
            message: message.into(),
        }
    }
}

/// Resolves, checks policy and connects.
#[derive(Debug)]
pub struct Dialer {
    /// Replaced as a whole on SIGHUP; each dial uses one consistent snapshot.
    policy: RwLock<Arc<Policy>>,
    timeout: Duration,
    metrics: Option<Arc<AgentMetrics>>,
    /// One permit per dial in progress.
    pending: Arc<tokio::sync::Semaphore>,
    max_pending: usize,
}

/// Dials in progress at once unless configured otherwise.
const DEFAULT_MAX_PENDING: usize = 256;

impl Dialer {
    /// A dialer with a policy and an overall timeout (resolution plus connection).
    pub fn new(policy: Policy, timeout: Duration) -> Self {
        Dialer {
            policy: RwLock::new(Arc::new(policy)),
            timeout,
            metrics: None,
            pending: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_PENDING)),
            max_pending: DEFAULT_MAX_PENDING,
        }
    }

    /// Allows at most `max` dials in progress at once (at least one).
    pub fn with_max_pending(mut self, max: usize) -> Self {
        let max = max.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self.pending = Arc::new(tokio::sync::Semaphore::new(max));
        self.max_pending = max;
        self
    }

    /// Dials in progress now.
    pub fn pending(&self) -> usize {
        self.max_pending - self.pending.available_permits()
    }

    /// Counts a refusal by a resource cap in the agent's metrics.
    pub(crate) fn cap_refused(&self, cap: &'static str) {
        if let Some(m) = &self.metrics {
            m.cap_refused(cap);
        }
    }

    /// Counts every dial's outcome in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the policy for dials that start from now on.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// Connects to the destination of `open`, counting the outcome.
    pub async fn dial(&self, open: &Open) -> Result<TcpStream, DialError> {
        let Ok(_permit) = self.pending.try_acquire() else {
            self.cap_refused("pending_dials");
            return Err(DialError::new(
                DialFailure::General,
                format!("{} dials already in progress (the cap)", self.max_pending),
            ));
        };
        let result = self.dial_uncounted(open).await;
        if let Some(m) = &self.metrics {
            m.dial(result.as_ref().err().map(|e| e.code));
        }
        result
    }

    /// Every resolved address is checked against the policy before any connection attempt,
    /// so a name cannot smuggle a forbidden address.
    async fn dial_uncounted(&self, open: &Open) -> Result<TcpStream, DialError> {
        let policy = self.policy();
        let deadline = Instant::now() + self.timeout;
        let (name, candidates) = match &open.host {
            Host::Ip(ip) => (None, vec![SocketAddr::new(*ip, open.port)]),
            // Legacy IPv4 spellings ("127.1", "2130706433", "0177.0.0.1") are addresses, read
            // here rather than by the resolver, and judged like any literal address.
            Host::Domain(name) if legacy_ipv4(name).is_some() => {
                let ip = legacy_ipv4(name).map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V4);
                (None, vec![SocketAddr::new(ip, open.port)])
            }
            Host::Domain(name) if ends_in_number(name) => {
                return Err(DialError::new(
                    DialFailure::HostUnreachable,
                    format!("{name} is neither a host name nor an IPv4 address"),
                ))
            }
            Host::Domain(name) => {
                let lookup = tokio::net::lookup_host((name.as_str(), open.port));
                let addrs = match tokio::time::timeout_at(deadline, lookup).await {
                    Err(_) => {
                        return Err(DialError::new(
                            DialFailure::TimedOut,
                            format!("resolving {name} timed out"),
                        ))
                    }
                    Ok(Err(e)) => {
                        return Err(DialError::new(
                            DialFailure::HostUnreachable,
                            format!("{name} does not resolve: {e}"),
                        ))
                    }
                    Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
                };
                if addrs.is_empty() {
                    return Err(DialError::new(
                        DialFailure::HostUnreachable,
                        format!("{name} has no addresses"),
                    ));
                }
                (Some(name.as_str()), addrs)
            }
        };

        let mut allowed = Vec::with_capacity(candidates.len());
        let mut denial = None;
        for addr in candidates {
            match policy.check(name, addr) {
                Ok(()) => allowed.push(addr),
                Err(why) => {
                    denial.get_or_insert_with(|| format!("{addr}: {why}"));
                }
            }
        }
        if allowed.is_empty() {
            let why = denial.unwrap_or_else(|| "no address".into());
            return Err(DialError::new(
                DialFailure::NotAllowed,
                format!("policy refuses {}:{} ({why})", open.host, open.port),
            ));
        }

        let mut last = None;
        for addr in allowed {
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last = Some(classify(addr, &e)),
                Err(_) => {
                    return Err(DialError::new(
                        DialFailure::TimedOut,
                        format!("connecting to {addr} timed out after {:?}", self.timeout),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| DialError::new(DialFailure::General, "no address to dial")))
    }
}

/// Maps a connect error to the failure the SOCKS client should see.
fn classify(addr: SocketAddr, e: &io::Error) -> DialError {
    let code = match e.kind() {
        io::ErrorKind::ConnectionRefused => DialFailure::Refused,
        io::ErrorKind::NetworkUnreachable => DialFailure::NetworkUnreachable,
        io::ErrorKind::HostUnreachable => DialFailure::HostUnreachable,
        io::ErrorKind::TimedOut => DialFailure::TimedOut,
        io::ErrorKind::AddrNotAvailable => DialFailure::HostUnreachable,
        _ => DialFailure::General,
    };
    DialError::new(code, format!("connecting to {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::policy::Rule;

    fn open(host: &str, port: u16) -> Open {
        let host = match host.parse() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Domain(host.to_string()),
        };
        Open { host, port }
    }

    #[tokio::test]
    async fn failures_have_precise_codes() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let loopback: Rule = "127.0.0.0/8".parse().unwrap();
        let open_dialer = Dialer::new(Policy::new(vec![loopback], vec![]), Duration::from_secs(5));
        let strict = Dialer::new(Policy::default(), Duration::from_secs(5));
        let cases = [
            (
                &open_dialer,
                open("127.0.0.1", closed),
                DialFailure::Refused,
            ),
            (&strict, open("127.0.0.1", closed), DialFailure::NotAllowed),
            (&strict, open("localhost", closed), DialFailure::NotAllowed),
            (
                &strict,
                open("169.254.169.254", 80),
                DialFailure::NotAllowed,
            ),
            (
                &strict,
                open("::ffff:169.254.169.254", 80),
                DialFailure::NotAllowed,
            ),
            (&strict, open("0.0.0.0", 80), DialFailure::NotAllowed),
            (&strict, open("127.1", closed), DialFailure::NotAllowed),
            (&strict, open("2130706433", closed), DialFailure::NotAllowed),
            (&strict, open("0177.0.0.1", closed), DialFailure::NotAllowed),
            (&strict, open("0x7f.1", closed), DialFailure::NotAllowed),
            (
                &strict,
                open("0251.0376.0251.0376", 80),
                DialFailure::NotAllowed,
            ),
            (&strict, open("2852039166", 80), DialFailure::NotAllowed),
            (&strict, open("1.2.3.4.5", 80), DialFailure::HostUnreachable),
            // Read as 127.0.0.1 by the agent itself: refused by the destination, not the resolver.
            (&open_dialer, open("127.1", closed), DialFailure::Refused),
            (
                &open_dialer,
                open("2130706433", closed),
                DialFailure::Refused,
            ),
            (
                &open_dialer,
                open("0177.0.0.1", closed),
                DialFailure::Refused,
            ),
            (
                &strict,
                open("no-such-host.invalid", 80),
                DialFailure::HostUnreachable,
            ),
        ];
        for (dialer, open, want) in cases {
            let err = dialer.dial(&open).await.unwrap_err();
            assert_eq!(err.code, want, "{open:?}: {err}");
        }
    }

    /// The refusal the hub hears names why no rule matched, here the port.
    #[tokio::test]
    async fn refusals_name_the_port_no_rule_covers() {
        let dialer = Dialer::new(
            Policy::new(vec!["127.0.0.1:8000".parse().unwrap()], vec![]),
            Duration::from_secs(5),
        );
        let err = dialer.dial(&open("127.0.0.1", 8001)).await.unwrap_err();
        assert_eq!(err.code, DialFailure::NotAllowed);
        assert_eq!(
            err.message,
            "policy refuses 127.0.0.1:8001 (127.0.0.1:8001: 127.0.0.1 is a loopback address and \
             no allow rule covers port 8001 of it (rule 127.0.0.1/32:8000 allows only port 8000))"
        );
    }

    #[test]
    fn pending_dial_caps_are_clamped() {
        let d = Dialer::new(Policy::default(), Duration::from_secs(1)).with_max_pending(usize::MAX);
        assert_eq!(d.pending(), 0);
        let d = Dialer::new(Policy::default(), Duration::from_secs(1)).with_max_pending(0);
        assert_eq!(d.max_pending, 1);
    }

    #[tokio::test]
    async fn allowed_destinations_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dialer = Dialer::new(
            Policy::new(vec!["127.0.0.1".parse().unwrap()], vec![]),
            Duration::from_secs(5),
        );
        let stream = dialer.dial(&open("127.0.0.1", port)).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap().port(), port);
    }
}
