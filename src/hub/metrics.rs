//! The hub's Prometheus metrics (prometheus-client, `rna_` prefix). Labels are bounded: reasons
//! and reply codes are fixed sets, tenants are few; never a per-destination label.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::metrics::{count_by, counted_by, Labels};

/// Every metric the hub exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    agents_connected: Family<Labels, Gauge>,
    sessions: Family<Labels, Counter>,
    handshake_failures: Family<Labels, Counter>,
    socks_requests: Family<Labels, Counter>,
    socks_early_replies: Family<Labels, Counter>,
    socks_refused: Family<Labels, Counter>,
    cap_refusals: Family<Labels, Counter>,
    quic_retries: Counter,
    handshakes_queued: Counter,
    tls_resumptions: Counter,
    recall_resets: Counter,
    kube_commands: Family<Labels, Counter>,
    kube_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    streams_open: Gauge,
    streams_pending: Gauge,
    dial_seconds: Histogram,
    heartbeat_rtt_seconds: Histogram,
    /// Pings received from agents (each agent's liveness probe).
    heartbeats_received: Counter,
    /// Pings the hub sent itself (only to agents silent for an interval and a half).
    heartbeats_sent: Counter,
    relay_bytes: Family<Labels, Counter>,
    /// Cached children of `relay_bytes`, so the per-chunk path takes no lock.
    bytes_to_agent: Counter,
    bytes_from_agent: Counter,
    token_reloads: Family<Labels, Counter>,
    /// `rna_oidc_tokens_total{issuer,result}`: JWTs checked, by trusted issuer (or
    /// `untrusted`/`unknown`, never a claimed `iss`) and outcome.
    oidc_tokens: Family<Labels, Counter>,
    /// `rna_certificate_expiry_timestamp_seconds{role}` of the hub's certificate and CA.
    certificate_expiry: crate::certs::ExpiryMetric,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = crate::metrics::registry_with_build_info("hub");
        let m = Metrics {
            agents_connected: Family::default(),
            sessions: Family::default(),
            handshake_failures: Family::default(),
            socks_requests: Family::default(),
            socks_early_replies: Family::default(),
            socks_refused: Family::default(),
            cap_refusals: Family::default(),
            quic_retries: Counter::default(),
            handshakes_queued: Counter::default(),
            tls_resumptions: Counter::default(),
            recall_resets: Counter::default(),
            kube_commands: Family::default(),
            // 1 ms … ~65 s.
            kube_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
            streams_open: Gauge::default(),
            streams_pending: Gauge::default(),
            // 0.5 ms … ~16 s.
            dial_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            // 0.1 ms … ~3 s.
            heartbeat_rtt_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            heartbeats_received: Counter::default(),
            heartbeats_sent: Counter::default(),
            relay_bytes: Family::default(),
            bytes_to_agent: Counter::default(),
            bytes_from_agent: Counter::default(),
            token_reloads: Family::default(),
            oidc_tokens: Family::default(),
            certificate_expiry: Default::default(),
            registry,
        };
        let mut m = m;
        m.bytes_to_agent = m
            .relay_bytes
            .get_or_create(&vec![("direction", "to_agent".into())])
            .clone();
        m.bytes_from_agent = m
            .relay_bytes
            .get_or_create(&vec![("direction", "from_agent".into())])
            .clone();
        let r = &mut m.registry;
        r.register(
            "agents_connected",
            "Agent connections established now, by tenant",
            m.agents_connected.clone(),
        );
        r.register(
            "agent_sessions",
            "Agent sessions opened and closed, by event, reason and transport",
            m.sessions.clone(),
        );
        r.register(
            "handshake_failures",
            "Agent connections refused during the handshake, by reason",
            m.handshake_failures.clone(),
        );
        r.register(
            "socks_requests",
            "SOCKS5 requests answered, by reply",
            m.socks_requests.clone(),
        );
        r.register(
            "socks_early_replies",
            "SOCKS5 requests answered before the agent's answer (--socks-early-reply), by what \
             the agent answered then: opened or failed (the client was reset)",
            m.socks_early_replies.clone(),
        );
        r.register(
            "socks_refused",
            "SOCKS5 connections refused before authentication, by reason",
            m.socks_refused.clone(),
        );
        r.register(
            "cap_refusals",
            "Work refused or cut off because a resource cap was reached, by cap",
            m.cap_refusals.clone(),
        );
        r.register(
            "quic_retries",
            "Agent connection attempts from unvalidated addresses answered with a QUIC Retry",
            m.quic_retries.clone(),
        );
        r.register(
            "handshakes_queued",
            "Agent connection attempts that waited for a handshake slot (all were taken)",
            m.handshakes_queued.clone(),
        );
        r.register(
            "tls_resumptions",
            "Agent sessions whose TLS session was resumed from a ticket (no certificates \
             exchanged or verified in the handshake)",
            m.tls_resumptions.clone(),
        );
        r.register(
            "recall_resets",
            "Stateless resets a restarted hub sent to the QUIC sessions of its previous run",
            m.recall_resets.clone(),
        );
        r.register(
            "kube_commands",
            "Kubernetes commands through the admin API, by verb and outcome",
            m.kube_commands.clone(),
        );
        r.register_with_unit(
            "kube_command",
            "Time of Kubernetes commands through the admin API, by verb",
            prometheus_client::registry::Unit::Seconds,
            m.kube_seconds.clone(),
        );
        r.register(
            "streams_open",
            "Tunnel streams open now",
            m.streams_open.clone(),
        );
        r.register(
            "streams_pending",
            "Tunnel streams waiting for the agent's answer to Open",
            m.streams_pending.clone(),
        );
        r.register_with_unit(
            "dial",
            "Time from Open to the agent's answer (its DNS resolution and TCP connect)",
            prometheus_client::registry::Unit::Seconds,
            m.dial_seconds.clone(),
        );
        r.register_with_unit(
            "heartbeat_rtt",
            "Round trip of control-stream heartbeats",
            prometheus_client::registry::Unit::Seconds,
            m.heartbeat_rtt_seconds.clone(),
        );
        r.register(
            "heartbeats_received",
            "Control-stream pings received from agents (their liveness probes)",
            m.heartbeats_received.clone(),
        );
        r.register(
            "heartbeats_sent",
            "Control-stream pings the hub sent to agents silent for an interval and a half",
            m.heartbeats_sent.clone(),
        );
        r.register_with_unit(
            "relay",
            "Bytes relayed through tunnel streams, by direction",
            prometheus_client::registry::Unit::Bytes,
            m.relay_bytes.clone(),
        );
        r.register(
            "token_reloads",
            "Token store reloads, by result",
            m.token_reloads.clone(),
        );
        r.register(
            "oidc_tokens",
            "JWTs from OIDC issuers checked, by trusted issuer and result",
            m.oidc_tokens.clone(),
        );
        m.certificate_expiry = crate::certs::ExpiryMetric::register(&mut m.registry);
        m
    }

    /// The exposition text served at `/metrics`.
    pub fn render(&self) -> String {
        crate::metrics::render(&self.registry)
    }

    fn agent_labels(tenant: &str, agent: Option<&str>) -> Labels {
        let mut labels = vec![("tenant", tenant.to_string())];
        if let Some(agent) = agent {
            labels.push(("agent", agent.to_string()));
        }
        labels
    }

    /// An agent session was established; `agent` only when per-agent labels are enabled.
    pub fn session_opened(&self, tenant: &str, agent: Option<&str>, transport: &'static str) {
        self.agents_connected
            .get_or_create(&Self::agent_labels(tenant, agent))
            .inc();
        self.sessions
            .get_or_create(&vec![
                ("event", "opened".into()),
                ("reason", "ok".into()),
                ("transport", transport.into()),
            ])
            .inc();
    }

    /// An agent session ended.
    pub fn session_closed(
        &self,
        tenant: &str,
        agent: Option<&str>,
        reason: &'static str,
        transport: &'static str,
    ) {
        self.agents_connected
            .get_or_create(&Self::agent_labels(tenant, agent))
            .dec();
        self.sessions
            .get_or_create(&vec![
                ("event", "closed".into()),
                ("reason", reason.into()),
                ("transport", transport.into()),
            ])
            .inc();
    }

    /// An agent connection was refused during the handshake.
    pub fn handshake_failed(&self, reason: &'static str) {
        count_by(&self.handshake_failures, "reason", reason);
    }

    /// Refusals so far for one handshake failure reason.
    pub fn handshake_failures(&self, reason: &'static str) -> u64 {
        counted_by(&self.handshake_failures, "reason", reason)
    }

    /// A SOCKS5 request was answered with `reply`.
    pub fn socks_reply(&self, reply: &'static str) {
        count_by(&self.socks_requests, "reply", reply);
    }

    /// Requests answered so far with one reply.
    pub fn socks_replies(&self, reply: &'static str) -> u64 {
        counted_by(&self.socks_requests, "reply", reply)
    }

    /// A SOCKS5 request answered early got the agent's answer `outcome` (`opened`, `failed`).
    pub fn socks_early_reply(&self, outcome: &'static str) {
        count_by(&self.socks_early_replies, "outcome", outcome);
    }

    /// Early-answered requests so far whose agent answer was `outcome`.
    pub fn socks_early_replies(&self, outcome: &'static str) -> u64 {
        counted_by(&self.socks_early_replies, "outcome", outcome)
    }

    /// A SOCKS5 connection was dropped before authentication (cap, timeout, bad greeting).
    pub fn socks_refused(&self, reason: &'static str) {
        count_by(&self.socks_refused, "reason", reason);
    }

    /// Refusals so far for one reason.
    pub fn socks_refusals(&self, reason: &'static str) -> u64 {
        counted_by(&self.socks_refused, "reason", reason)
    }

    /// Something was refused (or a stream cut off) because the cap `cap` was reached.
    pub fn cap_refused(&self, cap: &'static str) {
        count_by(&self.cap_refusals, "cap", cap);
    }

    /// A connection attempt was answered with a QUIC Retry.
    pub fn quic_retry(&self) {
        self.quic_retries.inc();
    }

    /// Retries sent so far.
    pub fn quic_retries(&self) -> u64 {
        self.quic_retries.get()
    }

    /// A connection attempt joined the queue of those waiting for a handshake slot.
    pub fn handshake_queued(&self) {
        self.handshakes_queued.inc();
    }

    /// An agent session opened on a TLS session resumed from a ticket.
    pub fn tls_resumed(&self) {
        self.tls_resumptions.inc();
    }

    /// A restarted hub sent a stateless reset to a session of its previous run.
    pub fn recall_reset(&self) {
        self.recall_resets.inc();
    }

    /// Resets sent to sessions of the previous run so far.
    pub fn recall_resets(&self) -> u64 {
        self.recall_resets.get()
    }

    /// Attempts that waited for a handshake slot so far.
    pub fn handshakes_queued(&self) -> u64 {
        self.handshakes_queued.get()
    }

    /// A Kubernetes command ended; `outcome` is `ok` or the HTTP status class it failed with.
    pub fn kube_command(&self, verb: &str, outcome: &'static str, seconds: f64) {
        self.kube_commands
            .get_or_create(&vec![
                ("verb", verb.to_string()),
                ("outcome", outcome.into()),
            ])
            .inc();
        self.kube_seconds
            .get_or_create(&vec![("verb", verb.to_string())])
            .observe(seconds);
    }

    /// Refusals so far by one cap.
    pub fn cap_refusals(&self, cap: &'static str) -> u64 {
        counted_by(&self.cap_refusals, "cap", cap)
    }

    /// The open-streams gauge.
    pub fn streams_open(&self) -> &Gauge {
        &self.streams_open
    }

    /// The pending-streams gauge (Open sent, no answer yet).
    pub fn streams_pending(&self) -> &Gauge {
        &self.streams_pending
    }

    /// Records how long an agent took to answer Open.
    pub fn dial_took(&self, seconds: f64) {
        self.dial_seconds.observe(seconds);
    }

    /// Records a heartbeat round trip.
    pub fn heartbeat_rtt(&self, seconds: f64) {
        self.heartbeat_rtt_seconds.observe(seconds);
    }

    /// Counts a ping received from an agent.
    pub fn heartbeat_received(&self) {
        self.heartbeats_received.inc();
    }

    /// Counts a ping the hub sent to a silent agent.
    pub fn heartbeat_sent(&self) {
        self.heartbeats_sent.inc();
    }

    /// Counts relayed bytes; `to_agent` is the client → agent direction.
    pub fn relayed(&self, to_agent: bool, n: usize) {
        let counter = if to_agent {
            &self.bytes_to_agent
        } else {
            &self.bytes_from_agent
        };
        counter.inc_by(n as u64);
    }

    /// Records when a certificate the hub uses expires.
    pub fn certificate_expiry(&self, role: &str, not_after: std::time::SystemTime) {
        self.certificate_expiry.set(role, not_after);
    }

    /// Records a token store reload.
    pub fn token_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        count_by(&self.token_reloads, "result", result);
    }

    /// A JWT was checked: `issuer` is a trusted issuer's URL (or `untrusted`, `unknown`),
    /// `result` one of a fixed set (`accepted`, `expired`, `wrong_audience`, …).
    pub fn oidc_token(&self, issuer: &str, result: &'static str) {
        self.oidc_tokens
            .get_or_create(&vec![
                ("issuer", issuer.to_string()),
                ("result", result.into()),
            ])
            .inc();
    }

    /// JWTs checked so far with this issuer and result.
    pub fn oidc_tokens(&self, issuer: &str, result: &'static str) -> u64 {
        self.oidc_tokens
            .get(&vec![
                ("issuer", issuer.to_string()),
                ("result", result.into()),
            ])
            .map_or(0, |c| c.get())
    }
}
