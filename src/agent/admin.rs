//! The agent's local health and metrics endpoint: `/healthz` (the process runs), `/readyz`
//! (connected to at least one hub) and `/metrics` (prometheus-client, `rna_agent_` names and `rna_build_info`).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Router};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::AgentHandle;
use crate::listen::{request_deadline, serve_http, Acceptor, ConnectionCap, Deadline, HttpLimits};
use crate::metrics::{count_by, counted_by, Labels};
use crate::proto::DialFailure;

/// The agent's metrics.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    hub_connections: Family<Labels, Gauge>,
    reconnects: Counter,
    dials: Family<Labels, Counter>,
    cap_refusals: Family<Labels, Counter>,
    /// `rna_certificate_expiry_timestamp_seconds{role}`: the agent's certificate, the CA,
    /// and the hub certificate last shown.
    certificate_expiry: crate::certs::ExpiryMetric,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = crate::metrics::registry_with_build_info("agent");
        let m = AgentMetrics {
            hub_connections: Family::default(),
            reconnects: Counter::default(),
            dials: Family::default(),
            cap_refusals: Family::default(),
            certificate_expiry: Default::default(),
            registry,
        };
        let mut m = m;
        let r = &mut m.registry;
        r.register(
            "agent_hub_connections",
            "Hub sessions established now, by transport (quic, tcp)",
            m.hub_connections.clone(),
        );
        r.register(
            "agent_reconnects",
            "Connection attempts after a failure or a lost session",
            m.reconnects.clone(),
        );
        r.register(
            "agent_dials",
            "Destination dials, by outcome",
            m.dials.clone(),
        );
        r.register(
            "agent_cap_refusals",
            "Work refused because a resource cap was reached, by cap",
            m.cap_refusals.clone(),
        );
        m.certificate_expiry = crate::certs::ExpiryMetric::register(&mut m.registry);
        m
    }

    /// Records when a certificate the agent uses or was shown expires.
    pub fn certificate_expiry(&self, role: &str, not_after: std::time::SystemTime) {
        self.certificate_expiry.set(role, not_after);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        crate::metrics::render(&self.registry)
    }

    /// A hub session over `transport` started (`true`) or ended (`false`).
    pub fn hub_connection(&self, transport: &'static str, up: bool) {
        let gauge = self
            .hub_connections
            .get_or_create(&vec![("transport", transport.to_string())]);
        if up {
            gauge.inc();
        } else {
            gauge.dec();
        }
    }

    /// A reconnect attempt.
    pub fn reconnect(&self) {
        self.reconnects.inc();
    }

    /// Reconnect attempts so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.get()
    }

    /// Something was refused because the cap `cap` was reached.
    pub fn cap_refused(&self, cap: &'static str) {
        count_by(&self.cap_refusals, "cap", cap);
    }

    /// Refusals so far by one cap.
    pub fn cap_refusals(&self, cap: &'static str) -> u64 {
        counted_by(&self.cap_refusals, "cap", cap)
    }

    /// A dial finished: `None` for success.
    pub fn dial(&self, failure: Option<DialFailure>) {
        let outcome = match failure {
            None => "connected",
            Some(DialFailure::NotAllowed) => "not_allowed",
            Some(DialFailure::NetworkUnreachable) => "network_unreachable",
            Some(DialFailure::HostUnreachable) => "host_unreachable",
            Some(DialFailure::Refused) => "refused",
            Some(DialFailure::TimedOut) => "timed_out",
            Some(DialFailure::General) => "failed",
        };
        count_by(&self.dials, "outcome", outcome);
    }
}

/// Serves [`app`] on `listener` until `stop` fires, with the same header and request deadlines
/// and connection caps as the hub's admin API (their defaults); refusals are counted in
/// `rna_agent_cap_refusals_total{cap="metrics_connections"|"metrics_connections_per_ip"}`.
/// Accept errors (out of descriptors) back off instead of spinning.
pub async fn serve(listener: TcpListener, handle: AgentHandle, stop: CancellationToken) {
    let limits = HttpLimits::default();
    let deadline = Deadline {
        timeout: limits.request_timeout,
        // Every route is a GET; a body is never needed.
        max_body: 1024,
        bound_answer: true,
    };
    let app = app(handle.clone()).layer(middleware::from_fn_with_state(deadline, request_deadline));
    let metrics = handle.metrics().clone();
    serve_http(
        Acceptor::new(listener, "agent metrics"),
        app,
        &limits,
        stop,
        move |cap| {
            metrics.cap_refused(match cap {
                ConnectionCap::Total => "metrics_connections",
                ConnectionCap::PerIp => "metrics_connections_per_ip",
            })
        },
    )
    .await;
}

/// The endpoint's router; tests call it without binding a socket.
pub fn app(handle: AgentHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(handle)
}

async fn readyz(State(handle): State<AgentHandle>) -> Response {
    if handle.status().connected > 0 {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to any hub\n",
        )
            .into_response()
    }
}

async fn metrics(State(handle): State<AgentHandle>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        handle.metrics().render(),
    )
        .into_response()
}
