//! The hub's admin API (axum): health, readiness, Prometheus metrics (token with
//! `read:metrics`), the agents list, and the agents status page (`GET /`, rendered in
//! [`super::status`]).
//! Errors become HTTP statuses here, at the edge, and nowhere else.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde::Serialize;

use super::registry::AgentInfo;
use super::{status, Shared};
use crate::auth::{AuthError, Grant, Scope};
use crate::listen::{request_deadline, Deadline};

/// Largest form body of the status page's sign-in.
const LOGIN_FORM_LIMIT: usize = 4096;

/// The admin API router with its request deadlines; tests call it without binding a socket.
/// Quick answers (status page, health, metrics, agents list) must be ready within
/// `--api-request-timeout`; Kubernetes commands only have to receive their body within it,
/// since they run under their own deadlines (`--kube-timeout`, the wait's timeout).
pub(crate) fn app(shared: Arc<Shared>) -> Router {
    let timeout = shared.config.api_limits.request_timeout;
    let max_body = shared.config.caps.kube_request.max(LOGIN_FORM_LIMIT);
    let deadline = |bound_answer| {
        middleware::from_fn_with_state(
            Deadline {
                timeout,
                max_body,
                bound_answer,
            },
            request_deadline,
        )
    };
    let quick = Router::new()
        .route(
            "/",
            get(status::page)
                .post(status::login_form)
                .layer(DefaultBodyLimit::max(LOGIN_FORM_LIMIT)),
        )
        .route("/sign-out", post(status::sign_out))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/agents", get(agents))
        .layer(deadline(true));
    let commands = super::kube_api::routes(shared.config.caps.kube_request).layer(deadline(false));
    quick.merge(commands).with_state(shared)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

/// `GET /metrics`: its series name every tenant (`rna_agents_connected{tenant=...}`), so only
/// a token with `read:metrics` (or `admin`) reads them.
async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(resp) = bearer(&shared, &headers, Scope::ReadMetrics) {
        return *resp;
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct AgentList {
    agents: Vec<AgentInfo>,
}

async fn agents(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let grant = match bearer(&shared, &headers, Scope::ReadInfraData) {
        Ok(g) => g,
        Err(resp) => return *resp,
    };
    Json(AgentList {
        agents: visible_agents(&shared, &grant),
    })
    .into_response()
}

/// The agent connections `grant` may see: its tenant's, or every tenant's for `Admin`. The
/// agents list and the status page both go through here.
pub(crate) fn visible_agents(shared: &Shared, grant: &Grant) -> Vec<AgentInfo> {
    let tenant = if grant.is_admin() {
        None
    } else {
        Some(&grant.tenant)
    };
    shared.registry.infos(tenant)
}

/// Verifies a presented token against the current store and requires `scope`.
pub(crate) fn authorize(shared: &Shared, token: &str, scope: Scope) -> Result<Grant, AuthError> {
    shared
        .tokens
        .current()
        .authorize(token, scope, SystemTime::now())
}

#[derive(Serialize)]
struct ApiError {
    error: String,
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut resp = (
        status,
        Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"rna\""),
        );
    }
    resp
}

/// Checks `Authorization: Bearer <token>` for `scope`: 401 without a valid token, 403 when
/// the token lacks the scope.
pub(crate) fn bearer(
    shared: &Shared,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<Grant, Box<Response>> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Box::new(error(StatusCode::UNAUTHORIZED, "missing bearer token")))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            Box::new(error(
                StatusCode::UNAUTHORIZED,
                "authorization is not a bearer token",
            ))
        })?
        .trim();
    authorize(shared, token, scope).map_err(|e| {
        Box::new(match e {
            AuthError::MissingScope(_) => error(StatusCode::FORBIDDEN, e.to_string()),
            other => error(StatusCode::UNAUTHORIZED, other.to_string()),
        })
    })
}
