//! The admin API's Kubernetes endpoints: an agent's inventory, and apply, get, list, delete
//! and wait through its command channel. Scopes: `read:infra:data` to read and wait,
//! `exec:infra:op` to apply and delete, each checked by the [`Authorized`] extractor. Handlers
//! return [`ApiError`], which becomes the HTTP status at the edge: a Kubernetes Status keeps
//! its code, an unknown agent is 404 (also for another tenant's), an agent without cluster
//! mode 409, an offline agent 503.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::api::{tenant_for, ApiError, Authorized, ExecInfraOp, ReadInfraData};
use super::kube_channel::{call, pick, timeout_for, KubeCallError};
use super::Shared;
use crate::auth::{mask_tokens, Grant, Masked, Scope, Tenant};
use crate::proto::kube::{Caller, KubeRequest, ObjectRef, WaitFor, TOO_MANY_WAITS};
use input::truthy;
pub use input::{parse_documents, parse_object_path, split_documents};

mod input;

/// The Kubernetes routes, merged into the admin API router.
pub(crate) fn routes(max_request: usize) -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/v1/agents/{agent}/inventory", get(inventory))
        .route(
            "/api/v1/agents/{agent}/kube/apply",
            post(apply).layer(DefaultBodyLimit::max(max_request)),
        )
        .route("/api/v1/agents/{agent}/kube/wait", post(wait))
        .route(
            "/api/v1/agents/{agent}/kube/{*path}",
            get(read).delete(delete),
        )
}

fn caller(grant: &Grant) -> Caller {
    Caller {
        tenant: grant.tenant.to_string(),
        token_id: grant.token_id.clone(),
        label: grant.label.clone(),
    }
}

/// Removes what a Secret holds from an answer for a caller without `exec:infra:op`: `data`,
/// `stringData` and the `kubectl.kubernetes.io/last-applied-configuration` annotation (a
/// client-side apply copies the whole Secret there) of every core Secret in it, the object
/// itself or a list's items. Returns the answer and whether it held a Secret.
pub fn redact_secrets(answer: String) -> (String, bool) {
    // Cheap test first: the agent writes `"kind":"Secret"` for every Secret it returns.
    if !answer.contains("\"Secret\"") {
        return (answer, false);
    }
    let Ok(mut value) = serde_json::from_str::<Value>(&answer) else {
        return (answer, false);
    };
    let mut seen = false;
    let mut strip = |o: &mut Value| {
        let text = |f: &str| o.get(f).and_then(Value::as_str).unwrap_or("").to_string();
        if !crate::proto::kube::is_secret_kind(&text("apiVersion"), &text("kind")) {
            return;
        }
        seen = true;
        if let Some(map) = o.as_object_mut() {
            map.remove("data");
            map.remove("stringData");
        }
        if let Some(annotations) = o
            .pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    };
    strip(&mut value);
    if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
        items.iter_mut().for_each(&mut strip);
    }
    if seen {
        (value.to_string(), true)
    } else {
        (answer, false)
    }
}

/// What one audit line says about a command: which objects, and whether Secrets are among
/// them.
struct Audited {
    verb: &'static str,
    kind: String,
    namespace: String,
    name: String,
    secret: bool,
}

impl Audited {
    /// A command about one object or kind: its target.
    fn of(request: &KubeRequest) -> Audited {
        let t = request.target();
        Audited {
            verb: request.verb(),
            kind: t.map_or("", |t| t.kind.as_str()).to_string(),
            namespace: t
                .and_then(|t| t.namespace.as_deref())
                .unwrap_or("")
                .to_string(),
            name: t.map_or("", |t| t.name.as_str()).to_string(),
            secret: t.is_some_and(ObjectRef::is_secret),
        }
    }
}

/// One caller's command to one agent: what sending it and its audit line need. Every
/// handler's command goes through [`Call::send`] and is audited by [`Call::audit`].
struct Call {
    shared: Arc<Shared>,
    grant: Grant,
    tenant: Tenant,
    agent: String,
    started: Instant,
}

impl Call {
    /// A command of `grant`'s caller to `agent` of `tenant`, timed from now: handlers start
    /// it before they read the request, so the audit's duration covers parsing too.
    fn start(shared: Arc<Shared>, grant: Grant, tenant: Tenant, agent: String) -> Self {
        Call {
            shared,
            grant,
            tenant,
            agent,
            started: Instant::now(),
        }
    }

    /// Sends `request` to a live session of the agent and waits for its answer; a wait's
    /// progress events go to `progress`.
    async fn send(
        &self,
        request: &KubeRequest,
        progress: Option<mpsc::Sender<String>>,
    ) -> Result<String, KubeCallError> {
        let session = pick(&self.shared, &self.tenant, &self.agent)?;
        let budget = timeout_for(&self.shared, request);
        call(&session, caller(&self.grant), request, budget, progress).await
    }

    /// Sends `request`, writes its audit line, and turns the agent's answer into the response.
    async fn answer(&self, request: &KubeRequest, mut what: Audited) -> Result<Response, ApiError> {
        let mut result = self.send(request, None).await;
        if !self.grant.has(Scope::ExecInfraOp) {
            // Reading a Secret's contents is as strong as writing: a read-only caller sees
            // its metadata only, whatever the agent's role allows.
            result = result.map(|answer| {
                let (answer, held) = redact_secrets(answer);
                what.secret |= held;
                answer
            });
        }
        self.audit(&what, result.as_ref().map(|_| ()));
        let answer = result?;
        Ok(([(header::CONTENT_TYPE, "application/json")], answer).into_response())
    }

    /// One audit line per command: who, which agent, what, outcome, duration. Never contents.
    fn audit(&self, what: &Audited, outcome: Result<(), &KubeCallError>) {
        let (label, code, reason) = match outcome {
            Ok(()) => ("ok", 200, String::new()),
            Err(e) => ("failed", e.http_status(), e.reason()),
        };
        let class = match code {
            200..=299 => "ok",
            400..=499 => "refused",
            _ => "failed",
        };
        let (grant, verb, secret) = (&self.grant, what.verb, what.secret);
        let elapsed = self.started.elapsed();
        self.shared
            .metrics
            .kube_command(verb, class, elapsed.as_secs_f64());
        // Every text here came from the caller (path, query, body): token-shaped text is
        // masked.
        let (agent, kind, namespace, name) = (
            mask_tokens(&self.agent),
            mask_tokens(&what.kind),
            mask_tokens(&what.namespace),
            mask_tokens(&what.name),
        );
        let reason = mask_tokens(&reason);
        info!(target: "rna::audit", tenant = %self.tenant, caller_tenant = %grant.tenant,
            token_id = %grant.token_id, token_label = grant.label.as_deref().unwrap_or(""),
            agent = agent.as_ref(), verb, kind = kind.as_ref(), namespace = namespace.as_ref(),
            name = name.as_ref(), secret, outcome = label, status = code,
            reason = reason.as_ref(), duration_ms = elapsed.as_millis() as u64,
            "kubernetes command");
    }
}

/// Largest slice of a stored inventory written before yielding to other tasks.
const BODY_SLICE: usize = 64 * 1024;

/// How long an inventory read waits for its tenant's turn before 429.
const HEAVY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

async fn inventory(
    State(shared): State<Arc<Shared>>,
    Path(agent): Path<String>,
    Authorized { tenant, .. }: Authorized<ReadInfraData>,
) -> Result<Response, ApiError> {
    let sessions: Vec<_> = shared
        .registry
        .sessions_of(&tenant, &agent)
        .into_iter()
        .filter(|s| s.connection.close_reason().is_none())
        .collect();
    if sessions.is_empty() {
        let e = match super::kube_channel::pick(&shared, &tenant, &agent) {
            Err(e) => e,
            Ok(_) => KubeCallError::NoAgent(agent.clone()),
        };
        return Err(e.into());
    }
    let kubernetes = sessions
        .iter()
        .any(|s| s.has_capability(crate::proto::kube::CAPABILITY));
    // One tenant's parallel readers of large inventories take turns among themselves.
    let Some(turn) = shared.heavy.turn(&tenant, HEAVY_WAIT).await else {
        shared.metrics.cap_refused("heavy_requests_per_tenant");
        return Err(ApiError::Busy(format!(
            "too many inventory reads of tenant {} at once; try again",
            tenant.as_str()
        )));
    };
    // The freshest report among the agent's sessions (replicas report the same cluster).
    let best = sessions
        .iter()
        .filter_map(|s| s.inventory_json().map(|(json, at)| (s.id, json, at)))
        .max_by_key(|(_, _, at)| *at);
    let first = &sessions[0];
    let (session_id, inv, reported, age) = match best {
        Some((id, json, at)) => {
            let unix = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let age = SystemTime::now()
                .duration_since(at)
                .map_or(0.0, |d| d.as_secs_f64());
            (Some(id), json, json!(unix), json!(age))
        }
        None => (None, Bytes::from_static(b"null"), Value::Null, Value::Null),
    };
    let head = json!({
        "agent": agent,
        "tenant": tenant.as_str(),
        "sessions": sessions.len(),
        "version": first.version,
        "os": first.os,
        "arch": first.arch,
        "capabilities": first.capabilities,
        "kubernetes": kubernetes,
        "sessionId": session_id,
        "reportedAtUnix": reported,
        "ageSeconds": age,
    });
    // The inventory's JSON was made once when it arrived: spliced in, never re-serialized
    // or copied. The object's closing brace is dropped and put back after it.
    let mut head = serde_json::to_vec(&head)
        .map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    head.pop();
    head.extend_from_slice(b",\"inventory\":");
    let chunks = VecDeque::from([Bytes::from(head), inv, Bytes::from_static(b"}")]);
    // Sent in slices (views of the shared bytes, no copies) paced to the tenant's byte
    // budget, with a yield between them, so writing megabytes to fast readers never holds
    // a worker thread from other tenants' streams. The turn is held until the body has
    // been sent (or the caller went away).
    let body = futures_util::stream::unfold((chunks, turn), |(mut chunks, turn)| async move {
        let mut next = chunks.pop_front()?;
        if next.len() > BODY_SLICE {
            chunks.push_front(next.split_off(BODY_SLICE));
        }
        turn.pace(next.len()).await;
        tokio::task::yield_now().await;
        Some((Ok::<_, std::convert::Infallible>(next), (chunks, turn)))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ApplyQuery {
    dry_run: Option<String>,
    force: Option<String>,
    namespace: Option<String>,
}

async fn apply(
    State(shared): State<Arc<Shared>>,
    Path(agent): Path<String>,
    Query(q): Query<ApplyQuery>,
    Authorized { grant, tenant, .. }: Authorized<ExecInfraOp>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let cmd = Call::start(shared, grant, tenant, agent);
    let dry_run = truthy(&q.dry_run).map_err(|e| bad(format!("dryRun: {e}")))?;
    let force = truthy(&q.force).map_err(|e| bad(format!("force: {e}")))?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            cmd.shared.metrics.cap_refused("kube_request");
            let max = cmd.shared.config.caps.kube_request;
            info!(agent = %Masked(&cmd.agent), max, "Kubernetes apply refused: body over the request cap");
            ApiError::Kube(KubeCallError::TooLarge { len: max + 1, max })
        } else {
            ApiError::Status(e.status(), e.body_text())
        }
    })?;
    let text = std::str::from_utf8(&body).map_err(|_| bad("the body is not UTF-8 text"))?;
    let docs = parse_documents(text).map_err(bad)?;
    let (kind, name, secret) = crate::proto::kube::apply_summary(&docs, usize::MAX);
    let namespace = given(q.namespace);
    let what = Audited {
        verb: "apply",
        kind,
        namespace: namespace.clone().unwrap_or_default(),
        name,
        secret,
    };
    let request = KubeRequest::Apply {
        objects: Value::Array(docs).to_string(),
        namespace,
        dry_run,
        force,
    };
    cmd.answer(&request, what).await
}

/// A 400 with `message`: the request names something the route cannot use.
fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// A query or body value as the command takes it: an empty one (`?namespace=`) counts as not
/// given, as kubectl treats an empty flag.
fn given(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// The object an `…/kube/objects/{path}` route names in `namespace`, and whether the path
/// names one object (a get or delete) rather than all of a kind (a list).
fn object_at(path: &str, namespace: Option<String>) -> Result<(ObjectRef, bool), ApiError> {
    let (api_version, kind, name) = parse_object_path(path).map_err(bad)?;
    let named = name.is_some();
    let target = ObjectRef {
        api_version,
        kind,
        namespace: given(namespace),
        name: name.unwrap_or_default(),
    };
    Ok((target, named))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ReadQuery {
    namespace: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    limit: Option<u32>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

async fn read(
    State(shared): State<Arc<Shared>>,
    Path((agent, path)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
    Authorized { grant, tenant, .. }: Authorized<ReadInfraData>,
) -> Result<Response, ApiError> {
    let cmd = Call::start(shared, grant, tenant, agent);
    let (target, named) = object_at(&path, q.namespace)?;
    let request = if named {
        KubeRequest::Get(target)
    } else {
        KubeRequest::List {
            target,
            label_selector: given(q.label_selector),
            field_selector: given(q.field_selector),
            limit: q.limit,
            continue_token: given(q.continue_token),
        }
    };
    cmd.answer(&request, Audited::of(&request)).await
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DeleteQuery {
    namespace: Option<String>,
    propagation_policy: Option<String>,
    dry_run: Option<String>,
}

async fn delete(
    State(shared): State<Arc<Shared>>,
    Path((agent, path)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
    Authorized { grant, tenant, .. }: Authorized<ExecInfraOp>,
) -> Result<Response, ApiError> {
    let cmd = Call::start(shared, grant, tenant, agent);
    let (target, named) = object_at(&path, q.namespace)?;
    if !named {
        return Err(bad("delete needs an object name"));
    }
    let dry_run = truthy(&q.dry_run).map_err(|e| bad(format!("dryRun: {e}")))?;
    let request = KubeRequest::Delete {
        target,
        propagation: given(q.propagation_policy),
        dry_run,
    };
    cmd.answer(&request, Audited::of(&request)).await
}

/// The body of `POST …/kube/wait`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WaitBody {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: String,
    /// `rollout`, `delete`, or `condition=Type[=Status]`.
    #[serde(rename = "for")]
    for_: String,
    /// `30s`, `5m`, … (default 5m, at most 1h).
    timeout: Option<String>,
    tenant: Option<String>,
}

/// The longest wait the API accepts.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

async fn wait(
    State(shared): State<Arc<Shared>>,
    Path(agent): Path<String>,
    auth: Authorized<ReadInfraData>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let grant = auth.grant;
    let w: WaitBody = serde_json::from_slice(&body).map_err(|e| bad(format!("wait body: {e}")))?;
    // An admin may name the tenant in the body as well as in `?tenant=`.
    let tenant = match w.tenant.as_deref() {
        Some(asked) => tenant_for(&shared, &grant, &agent, Some(asked))?,
        None => auth.tenant,
    };
    let condition: WaitFor = w.for_.parse().map_err(bad)?;
    let timeout = match w.timeout.as_deref().map(crate::duration::parse_duration) {
        None => std::time::Duration::from_secs(300),
        Some(t) => t.map_err(|e| bad(format!("timeout: {e}")))?,
    };
    if timeout > MAX_WAIT {
        return Err(bad("timeout: at most 1h"));
    }
    if w.name.is_empty() {
        return Err(bad("wait needs an object name"));
    }
    let request = KubeRequest::Wait {
        target: ObjectRef {
            api_version: w.api_version,
            kind: w.kind,
            namespace: given(w.namespace),
            name: w.name,
        },
        condition,
        timeout_ms: timeout.as_millis() as u64,
    };
    // Taken before the agent is asked, held until the wait ends (the task below owns it).
    let max = shared.config.caps.kube_waits_per_token;
    let Some(slot) = shared.kube_waits.try_take(&grant.token_id, max) else {
        shared.metrics.cap_refused("kube_waits_per_token");
        info!(agent = %Masked(&agent), token_id = %grant.token_id, max,
            "Kubernetes wait refused: the token runs its allowance of waits");
        let message = format!(
            "token {} already runs {max} Kubernetes waits (max_kube_waits_per_token); retry \
             when one ends",
            grant.token_id
        );
        return Err(ApiError::Allowance {
            message,
            reason: TOO_MANY_WAITS,
        });
    };
    let what = Audited::of(&request);
    let cmd = Call {
        shared,
        grant,
        tenant,
        agent,
        started,
    };
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        let _slot = slot;
        let result = cmd.send(&request, Some(tx)).await;
        if matches!(&result, Err(KubeCallError::Failed(f)) if f.reason == TOO_MANY_WAITS) {
            // The agent keeps command slots free of waits: its refusal is a cap too.
            cmd.shared.metrics.cap_refused("kube_agent_waits");
        }
        cmd.audit(&what, result.as_ref().map(|_| ()));
        let _ = done_tx.send(result);
    });
    // Answer with an HTTP error when the command fails before any progress (bad kind,
    // forbidden, allow list); once progress flows, the outcome is the last NDJSON line.
    // The sender is dropped when the command ends, so this returns at the first progress
    // event or at the end.
    let first = match rx.recv().await {
        Some(event) => event,
        None => {
            return match done_rx.await {
                Ok(Ok(answer)) => Ok(ndjson(Body::from(format!("{answer}\n")))),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(ApiError::Status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "wait task ended".into(),
                )),
            }
        }
    };
    let state = (Some(first), rx, Some(done_rx));
    let stream = futures_util::stream::unfold(state, |(pending, mut rx, done)| async move {
        if let Some(line) = pending {
            return Some((
                Ok::<_, std::io::Error>(Bytes::from(line + "\n")),
                (None, rx, done),
            ));
        }
        if let Some(event) = rx.recv().await {
            return Some((Ok(Bytes::from(event + "\n")), (None, rx, done)));
        }
        let done = done?;
        let line = match done.await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => json!({
                "type": "error",
                "code": e.http_status(),
                "reason": e.reason(),
                "message": match &e { KubeCallError::Failed(f) => f.message.clone(), other => other.to_string() },
            })
            .to_string(),
            Err(_) => json!({"type": "error", "code": 500, "reason": "Internal", "message": "wait task ended"}).to_string(),
        };
        Some((Ok(Bytes::from(line + "\n")), (None, rx, None)))
    });
    Ok(ndjson(Body::from_stream(stream)))
}

fn ndjson(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_routes_name_one_object_or_a_kind_and_empty_values_are_not_given() {
        let (one, named) = object_at("apps/v1/Deployment/web", Some("prod".into())).unwrap();
        assert!(named);
        assert_eq!(
            (
                one.api_version.as_str(),
                one.kind.as_str(),
                one.name.as_str()
            ),
            ("apps/v1", "Deployment", "web")
        );
        assert_eq!(one.namespace.as_deref(), Some("prod"));
        let (all, named) = object_at("v1/ConfigMap", Some(String::new())).unwrap();
        assert!(!named);
        assert_eq!((all.kind.as_str(), all.name.as_str()), ("ConfigMap", ""));
        assert_eq!(all.namespace, None, "an empty namespace is not given");
        assert!(matches!(
            object_at("Deployment", None),
            Err(ApiError::BadRequest(m)) if m.contains("expected {apiVersion}/{kind}")
        ));
        assert_eq!(given(Some(String::new())), None);
        assert_eq!(given(Some("x".into())).as_deref(), Some("x"));
        assert_eq!(given(None), None);
    }
}
