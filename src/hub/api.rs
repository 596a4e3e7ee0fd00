//! The hub's admin API (axum): health, readiness, Prometheus metrics (token with
//! `read:metrics`), the agents list, and the agents status page (`GET /`, rendered in
//! [`super::status`]). Who may call what is the [`Authorized`] extractor; what went wrong is
//! an [`ApiError`], which becomes an HTTP status here, at the edge, and nowhere else.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::credential::CredentialError;
use super::kube_channel::KubeCallError;
use super::page::{continue_after, PageQuery, PageRequest};
use super::registry::{AgentInfo, AgentPage};
use super::{status, Shared};
use crate::auth::{AuthError, Grant, Scope, Tenant};
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
        .route("/api/v1/agents/{agent}/revoke", post(super::enroll::revoke))
        .route(
            "/api/v1/agents/{agent}/rotate-token",
            post(super::rotation::rotate_token),
        )
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
async fn metrics(State(shared): State<Arc<Shared>>, _: Authorized<ReadMetrics>) -> Response {
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
    /// Sessions visible to the caller on all pages.
    total: usize,
    /// Present when more sessions follow: `?continue=` it for the next page.
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// `GET /api/v1/agents[?limit=N][&continue=TOKEN]`: one page of the caller's agents
/// ([`super::page`]); 400 for a limit out of range or a token this hub did not give out.
async fn agents(
    State(shared): State<Arc<Shared>>,
    auth: Authorized<ReadInfraData>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<AgentList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let page = visible_page(&shared, &auth.grant, &query.request()?);
    Ok(Json(AgentList {
        next: page
            .more
            .then(|| page.agents.last().map(continue_after))
            .flatten(),
        total: page.total,
        agents: page.agents,
    }))
}

/// One page of the agent connections `grant` may see: its tenant's, or every tenant's for
/// `Admin`. The agents list and the status page both go through here.
pub(crate) fn visible_page(shared: &Shared, grant: &Grant, request: &PageRequest) -> AgentPage {
    let tenant = (!grant.is_admin()).then_some(&grant.tenant);
    shared
        .registry
        .page(tenant, request.after.as_ref(), request.limit)
}

/// Verifies a presented token (opaque, or a JWT from a trusted issuer) and requires `scope`.
pub(crate) async fn authorize(
    shared: &Shared,
    token: &str,
    scope: Scope,
) -> Result<Grant, CredentialError> {
    super::credential::authorize(shared, token, scope)
        .await
        .map(|caller| caller.grant)
}

/// Everything an admin API request can fail with, and the one place each becomes a status
/// and a JSON body (`{"error": …}`, plus `reason` and `code` where a client branches on them).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// 401 with `WWW-Authenticate: Bearer`: no token, not a bearer token, or a token that did
    /// not verify (unknown, revoked, expired, malformed).
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a valid token without the scope the route needs.
    #[error("{0}")]
    Forbidden(String),
    /// 400: a query, path or body the route cannot use.
    #[error("{0}")]
    BadRequest(String),
    /// Any other status with a plain message (a body the HTTP layer refused).
    #[error("{1}")]
    Status(StatusCode, String),
    /// A Kubernetes command that failed: its status, reason, and the Kubernetes Status (and
    /// partial apply results) when there are any.
    #[error(transparent)]
    Kube(#[from] KubeCallError),
    /// 429 with `Retry-After: 1`: the tenant's turns for heavy reads are taken.
    #[error("{0}")]
    Busy(String),
    /// 429 with a `reason` a client branches on: a per-token allowance is used up.
    #[error("{message}")]
    Allowance {
        /// What ran out and how to go on.
        message: String,
        /// The machine-readable reason (`TooManyWaits`).
        reason: &'static str,
    },
}

impl From<CredentialError> for ApiError {
    fn from(e: CredentialError) -> Self {
        if e.is_missing_scope() {
            ApiError::Forbidden(e.to_string())
        } else {
            ApiError::Unauthorized(e.to_string())
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingScope(_) => ApiError::Forbidden(e.to_string()),
            other => ApiError::Unauthorized(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let plain = |status: StatusCode, message: String| {
            (status, Json(json!({ "error": message }))).into_response()
        };
        match self {
            ApiError::Unauthorized(m) => {
                let mut resp = plain(StatusCode::UNAUTHORIZED, m);
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"rna\""),
                );
                resp
            }
            ApiError::Forbidden(m) => plain(StatusCode::FORBIDDEN, m),
            ApiError::BadRequest(m) => plain(StatusCode::BAD_REQUEST, m),
            ApiError::Status(status, m) => plain(status, m),
            ApiError::Busy(m) => {
                let mut resp = plain(StatusCode::TOO_MANY_REQUESTS, m);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                resp
            }
            ApiError::Allowance { message, reason } => (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"error": message, "reason": reason, "code": 429})),
            )
                .into_response(),
            ApiError::Kube(e) => kube_error(&e),
        }
    }
}

/// The JSON error body of a failed command: message, reason, code, and the Kubernetes Status
/// (and partial apply results) when there are any.
fn kube_error(e: &KubeCallError) -> Response {
    let code = e.http_status();
    let mut body = json!({
        "error": e.to_string(),
        "reason": e.reason(),
        "code": code,
    });
    if let KubeCallError::Failed(f) = e {
        body["error"] = Value::String(f.message.clone());
        body["kind"] = Value::String(f.kind.as_str().into());
        if let Some(details) = f
            .details
            .as_deref()
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
        {
            match details {
                Value::Object(map) if map.contains_key("applied") => {
                    for (k, v) in map {
                        body[k] = v;
                    }
                }
                status => body["status"] = status,
            }
        }
    }
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

/// The one parser of `Authorization: Bearer <token>` (RFC 6750 section 2.1): `None` without
/// the header, an error when it is not a bearer token.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| Some(t.trim()))
        .ok_or_else(|| ApiError::Unauthorized("authorization is not a bearer token".into()))
}

/// The scope a route needs, as a type, so each handler names it in its signature.
pub(crate) trait RequiredScope {
    /// The scope a token must carry (or `admin`).
    const SCOPE: Scope;
}

/// Routes that read: agents list, inventory, Kubernetes get, list and wait.
pub(crate) struct ReadInfraData;
impl RequiredScope for ReadInfraData {
    const SCOPE: Scope = Scope::ReadInfraData;
}

/// Routes that change the cluster: Kubernetes apply and delete.
pub(crate) struct ExecInfraOp;
impl RequiredScope for ExecInfraOp {
    const SCOPE: Scope = Scope::ExecInfraOp;
}

/// Certificate revocation, which only an `admin` token may do.
pub(crate) struct AdminOnly;
impl RequiredScope for AdminOnly {
    const SCOPE: Scope = Scope::Admin;
}

/// `/metrics`, whose series name every tenant.
pub(crate) struct ReadMetrics;
impl RequiredScope for ReadMetrics {
    const SCOPE: Scope = Scope::ReadMetrics;
}

/// A caller whose bearer token verified and carries scope `S`, and the tenant it acts in.
/// Rejects with 401 (no, malformed, unknown, revoked or expired token), 403 (scope missing)
/// or 400 (an admin's `?tenant=` that is not a tenant, or an agent name several tenants
/// use). Another tenant's agent is not refused here: the caller's own tenant simply has no
/// agent of that name, so the command answers 404 like for one that does not exist.
pub(crate) struct Authorized<S> {
    /// What the token may do, for audit lines and per-token caps.
    pub(crate) grant: Grant,
    /// The tenant whose agents the request reaches: the token's own, or for an `admin`
    /// token the `?tenant=` query or the only tenant with an agent of the path's name.
    pub(crate) tenant: Tenant,
    scope: PhantomData<S>,
}

/// The `?tenant=` an admin token may add to any agent route.
#[derive(Deserialize, Default)]
struct TenantQuery {
    tenant: Option<String>,
}

impl<S: RequiredScope> FromRequestParts<Arc<Shared>> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
        let grant = authorize(shared, token, S::SCOPE).await?;
        let agent = Path::<HashMap<String, String>>::from_request_parts(parts, shared)
            .await
            .ok()
            .and_then(|Path(mut params)| params.remove("agent"));
        let asked = Query::<TenantQuery>::try_from_uri(&parts.uri)
            .ok()
            .and_then(|Query(q)| q.tenant);
        let tenant = match agent {
            Some(agent) => tenant_for(shared, &grant, &agent, asked.as_deref())?,
            None => grant.tenant.clone(),
        };
        Ok(Authorized {
            grant,
            tenant,
            scope: PhantomData,
        })
    }
}

/// The tenant whose agent the caller addresses: its own, or for an admin token `asked` or
/// the only tenant that has an agent of this name.
pub(crate) fn tenant_for(
    shared: &Shared,
    grant: &Grant,
    agent: &str,
    asked: Option<&str>,
) -> Result<Tenant, ApiError> {
    if !grant.is_admin() {
        return Ok(grant.tenant.clone());
    }
    if let Some(t) = asked {
        return t
            .parse()
            .map_err(|e| ApiError::BadRequest(format!("tenant: {e}")));
    }
    let tenants = shared.registry.tenants_of(agent);
    match tenants.len() {
        0 => Ok(grant.tenant.clone()),
        1 => Ok(tenants[0].clone()),
        _ => Err(ApiError::BadRequest(format!(
            "agent {agent:?} exists in several tenants ({}): add ?tenant=",
            tenants
                .iter()
                .map(Tenant::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
