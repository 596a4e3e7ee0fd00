//! The hub's admin API (axum): health, readiness, Prometheus metrics, the agents list, and
//! the agents status page (`GET /`, rendered in [`super::status`]).
//! Errors become HTTP statuses here, at the edge, and nowhere else.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::registry::AgentInfo;
use super::{status, Shared};
use crate::auth::{AuthError, Grant, Scope};

/// The admin API router; tests call it without binding a socket.
pub(crate) fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/",
            get(status::page)
                .post(status::login_form)
                .layer(DefaultBodyLimit::max(4096)),
        )
        .route("/sign-out", get(status::sign_out))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/agents", get(agents))
        .merge(super::kube_api::routes(shared.config.caps.kube_request))
        .with_state(shared)
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

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
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
