//! Cluster mode: the agent runs the hub's Kubernetes commands with kube-rs, as its own
//! ServiceAccount (in cluster) or kubeconfig identity (on a VM), never with more.
//!
//! Agent path: session → command stream → allow list → discovery → Kubernetes API.

pub mod allow;
pub mod discovery;
pub mod guard;
pub mod wait;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PropagationPolicy,
    WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use quinn::{RecvStream, SendStream};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::auth::mask_tokens;
use crate::proto::codec::{encode_limited, read_frame_limited};
use crate::proto::kube::{
    FailureKind, Inventory, KubeFailure, KubeHeader, KubeReply, KubeRequest, ObjectRef,
    ResourceInfo, WaitFor, MAX_KUBE_REPLY, MAX_KUBE_REQUEST, TOO_MANY_WAITS,
};
use crate::proto::StreamCode;

use allow::Target;
pub use allow::{KubeAllow, ResourceRule};
use discovery::{DiscoveryCache, DiscoveryError, Resolved};
use guard::SecretGuard;
pub use guard::SecretRef;
use wait::Eval;

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "rna";

/// Commands one agent runs at once; more wait (within their timeout) so a burst from the
/// hubs cannot flood the API server with the agent's identity.
pub const MAX_CONCURRENT_COMMANDS: usize = 32;

/// Waits one agent runs at once: fewer than [`MAX_CONCURRENT_COMMANDS`], so long waits can
/// never hold every slot and block applies, gets and deletes. One more wait is refused at
/// once with 429 `TooManyWaits` rather than queued for up to an hour.
pub const MAX_CONCURRENT_WAITS: usize = MAX_CONCURRENT_COMMANDS - 8;

/// Where the agent's Kubernetes identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeSource {
    /// The pod's ServiceAccount (`KUBERNETES_SERVICE_HOST` and the mounted token).
    InCluster,
    /// A kubeconfig file, with an optional context.
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The context to use instead of the current one.
        context: Option<String>,
    },
}

/// Cluster mode settings.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// The identity the agent acts as.
    pub source: KubeSource,
    /// The agent-side allow list.
    pub allow: KubeAllow,
    /// How often the inventory is collected and reported again.
    pub inventory_interval: Duration,
    /// Whether a failure to load the identity stops the agent (asked for explicitly) or only
    /// disables cluster mode (detected in-cluster environment).
    pub required: bool,
    /// The Secrets the agent runs with, which no command may read or change.
    pub protected_secrets: Vec<SecretRef>,
}

impl KubeSettings {
    /// Settings for `source` with no allow list, a 5-minute inventory refresh and the shipped
    /// manifest's Secrets protected.
    pub fn new(source: KubeSource) -> Self {
        KubeSettings {
            source,
            allow: KubeAllow::default(),
            inventory_interval: Duration::from_secs(300),
            required: true,
            protected_secrets: guard::default_protected(),
        }
    }
}

/// Whether this process runs in a Kubernetes pod with a ServiceAccount token mounted.
pub fn in_cluster_detected() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The in-cluster configuration is missing or broken.
    #[error("in-cluster Kubernetes configuration: {0}")]
    InCluster(String),
    /// The client could not be built.
    #[error("Kubernetes client: {0}")]
    Client(String),
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn failure(kind: FailureKind, code: u16, reason: &str, message: impl Into<String>) -> KubeFailure {
    KubeFailure {
        kind,
        code,
        reason: reason.into(),
        message: message.into(),
        details: None,
    }
}

fn bad_request(message: impl Into<String>) -> KubeFailure {
    failure(FailureKind::BadRequest, 400, "BadRequest", message)
}

fn not_allowed(message: impl Into<String>) -> KubeFailure {
    failure(FailureKind::NotAllowed, 403, "NotAllowedByAgent", message)
}

/// The refusal of a command on a protected Secret: 403 `Forbidden` with a whole Kubernetes
/// Status, as the API server itself would refuse it, so clients that read Statuses show it.
fn forbidden_secret(namespace: &str, name: &str, message: String) -> KubeFailure {
    let status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Forbidden",
        "details": {"name": name, "kind": "secrets", "namespace": namespace},
        "code": 403,
    });
    KubeFailure {
        kind: FailureKind::NotAllowed,
        code: 403,
        reason: "Forbidden".into(),
        message,
        details: Some(status.to_string()),
    }
}

/// Maps a kube-rs error to what the caller sees: a Kubernetes Status keeps its own code and
/// reason; a transport failure is a 502.
pub fn from_kube(e: kube::Error) -> KubeFailure {
    match e {
        kube::Error::Api(status) => KubeFailure {
            kind: FailureKind::Api,
            code: if status.code == 0 { 500 } else { status.code },
            reason: if status.reason.is_empty() {
                "Unknown".into()
            } else {
                status.reason.clone()
            },
            message: status.message.clone(),
            details: serde_json::to_value(&*status).ok().map(|mut v| {
                // kube's Status drops the type fields; callers expect a whole Status.
                v["kind"] = Value::String("Status".into());
                v["apiVersion"] = Value::String("v1".into());
                v.to_string()
            }),
        },
        other => failure(
            FailureKind::Unavailable,
            502,
            "KubernetesUnreachable",
            format!("the agent could not talk to the Kubernetes API: {other}"),
        ),
    }
}

fn from_discovery(e: DiscoveryError) -> KubeFailure {
    match e {
        DiscoveryError::Api(e) => from_kube(e),
        // The caller named something the server does not serve: not found, and a usage
        // error for the CLI.
        other => failure(FailureKind::BadRequest, 404, "NotFound", other.to_string()),
    }
}

/// Runs Kubernetes commands as the agent's identity, within its allow list.
pub struct KubeExecutor {
    client: Client,
    default_namespace: String,
    allow: KubeAllow,
    discovery: DiscoveryCache,
    inventory_interval: Duration,
    /// The last inventory and when it was collected; shared by the sessions of all hubs.
    inventory: tokio::sync::Mutex<Option<(Instant, Inventory)>>,
    /// Bumped when the inventory should be collected again before its interval (a CRD or
    /// namespace was applied or deleted).
    changed: tokio::sync::watch::Sender<u64>,
    /// Bounds the commands running at once ([`MAX_CONCURRENT_COMMANDS`]).
    permits: tokio::sync::Semaphore,
    /// Bounds the waits running at once ([`MAX_CONCURRENT_WAITS`]).
    wait_permits: tokio::sync::Semaphore,
    /// The agent's own Secrets and ServiceAccount tokens, never read or changed.
    guard: SecretGuard,
}

impl std::fmt::Debug for KubeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeExecutor")
            .field("default_namespace", &self.default_namespace)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl KubeExecutor {
    /// Loads the identity and builds the client. Nothing is sent to the API server yet.
    pub async fn connect(settings: &KubeSettings) -> Result<KubeExecutor, KubeError> {
        let config = match &settings.source {
            KubeSource::InCluster => {
                kube::Config::incluster().map_err(|e| KubeError::InCluster(e.to_string()))?
            }
            KubeSource::Kubeconfig { path, context } => {
                let err = |message: String| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    message,
                };
                let file = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
                let options = KubeConfigOptions {
                    context: context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| err(e.to_string()))?
            }
        };
        let default_namespace = config.default_namespace.clone();
        let client = Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))?;
        // In a pod the identity's default namespace is the pod's own (the ServiceAccount's
        // namespace file), where the manifest keeps the agent's Secrets.
        let guard = SecretGuard::new(&settings.protected_secrets, &default_namespace);
        Ok(KubeExecutor {
            guard,
            client,
            default_namespace,
            allow: settings.allow.clone(),
            discovery: DiscoveryCache::default(),
            inventory_interval: settings.inventory_interval,
            inventory: tokio::sync::Mutex::new(None),
            changed: tokio::sync::watch::Sender::new(0),
            permits: tokio::sync::Semaphore::new(MAX_CONCURRENT_COMMANDS),
            wait_permits: tokio::sync::Semaphore::new(MAX_CONCURRENT_WAITS),
        })
    }

    /// How often the inventory is reported.
    pub fn inventory_interval(&self) -> Duration {
        self.inventory_interval
    }

    /// Fires when the inventory should be reported again before the interval.
    pub fn inventory_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    async fn resolve(&self, api_version: &str, kind: &str) -> Result<Resolved, KubeFailure> {
        self.discovery
            .resolve(&self.client, api_version, kind)
            .await
            .map_err(from_discovery)
    }

    /// The namespace a namespaced command acts in: the given one or the identity's default.
    fn namespace_for(&self, resolved: &Resolved, given: Option<&str>) -> Option<String> {
        resolved.namespaced.then(|| {
            given
                .filter(|n| !n.is_empty())
                .unwrap_or(&self.default_namespace)
                .to_string()
        })
    }

    fn check(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<(), KubeFailure> {
        self.allow
            .check(Target {
                group: &resolved.resource.group,
                plural: &resolved.resource.plural,
                namespaced: resolved.namespaced,
                namespace,
                name,
            })
            .map_err(not_allowed)
    }

    fn api(&self, resolved: &Resolved, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) if resolved.namespaced => {
                Api::namespaced_with(self.client.clone(), ns, &resolved.resource)
            }
            _ => Api::all_with(self.client.clone(), &resolved.resource),
        }
    }

    /// Runs one command; progress events (wait) go to `progress`.
    pub async fn execute(
        &self,
        request: KubeRequest,
        progress: &mpsc::Sender<String>,
    ) -> Result<String, KubeFailure> {
        match request {
            KubeRequest::Apply {
                objects,
                namespace,
                dry_run,
                force,
            } => {
                self.apply(&objects, namespace.as_deref(), dry_run, force)
                    .await
            }
            KubeRequest::Get(target) => self.get(&target).await,
            KubeRequest::List {
                target,
                label_selector,
                field_selector,
                limit,
                continue_token,
            } => {
                let params = ListParams {
                    label_selector,
                    field_selector,
                    limit,
                    continue_token,
                    ..Default::default()
                };
                self.list(&target, &params).await
            }
            KubeRequest::Delete {
                target,
                propagation,
                dry_run,
            } => self.delete(&target, propagation.as_deref(), dry_run).await,
            KubeRequest::Wait {
                target,
                condition,
                timeout_ms,
            } => {
                self.wait(
                    &target,
                    &condition,
                    Duration::from_millis(timeout_ms),
                    progress,
                )
                .await
            }
        }
    }

    async fn apply(
        &self,
        objects: &str,
        namespace: Option<&str>,
        dry_run: bool,
        force: bool,
    ) -> Result<String, KubeFailure> {
        let docs: Vec<Value> = serde_json::from_str(objects)
            .map_err(|e| bad_request(format!("objects are not a JSON array: {e}")))?;
        let mut results: Vec<Value> = Vec::new();
        let mut touched_discovery = false;
        for (index, doc) in docs.into_iter().enumerate() {
            match self.apply_one(doc, namespace, dry_run, force).await {
                Ok((result, kind)) => {
                    if kind == "CustomResourceDefinition" || kind == "Namespace" {
                        touched_discovery = true;
                    }
                    results.push(result);
                }
                Err(mut f) => {
                    // Say what was applied before the failure and which document failed.
                    f.details = Some(
                        json!({
                            "applied": results,
                            "failedIndex": index,
                            "status": f.details.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()),
                        })
                        .to_string(),
                    );
                    if touched_discovery && !dry_run {
                        self.discovery.clear();
                        self.changed.send_modify(|n| *n += 1);
                    }
                    return Err(f);
                }
            }
        }
        if touched_discovery && !dry_run {
            // A new CRD changes discovery; a new namespace changes the inventory.
            self.discovery.clear();
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(json!({ "dryRun": dry_run, "results": results }).to_string())
    }

    async fn apply_one(
        &self,
        mut doc: Value,
        namespace: Option<&str>,
        dry_run: bool,
        force: bool,
    ) -> Result<(Value, String), KubeFailure> {
        let field = |doc: &Value, f: &str| doc.get(f).and_then(Value::as_str).map(str::to_string);
        let api_version =
            field(&doc, "apiVersion").ok_or_else(|| bad_request("a document has no apiVersion"))?;
        let kind = field(&doc, "kind").ok_or_else(|| bad_request("a document has no kind"))?;
        let name = doc
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .ok_or_else(|| bad_request(format!("a {kind} document has no metadata.name")))?;
        let resolved = self.resolve(&api_version, &kind).await?;
        let given_ns = doc
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let ns = self.namespace_for(&resolved, given_ns.as_deref().or(namespace));
        if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
            // Server-side apply refuses managedFields in the request.
            meta.remove("managedFields");
            match &ns {
                Some(ns) => {
                    meta.insert("namespace".into(), Value::String(ns.clone()));
                }
                None => {
                    meta.remove("namespace");
                }
            }
        }
        self.check(&resolved, ns.as_deref(), Some(&name))?;
        let secret = guard::is_secrets(&resolved.resource.group, &resolved.resource.plural);
        let ns_text = ns.as_deref().unwrap_or("");
        if secret {
            // Names the agent's own Secret, or would mint a ServiceAccount token.
            if let Some(why) = self.guard.refuses_object(&doc) {
                return Err(forbidden_secret(ns_text, &name, why));
            }
        }
        let object: DynamicObject =
            serde_json::from_value(doc).map_err(|e| bad_request(format!("{kind} {name}: {e}")))?;
        let api = self.api(&resolved, ns.as_deref());
        let before = match api.get_opt(&name).await {
            Ok(b) => Some(b),
            // The shipped role may create and patch Secrets but not read them: server-side
            // apply needs no read, only the created/changed outcome is then unknown.
            Err(kube::Error::Api(status)) if secret && status.code == 403 => None,
            Err(e) => return Err(from_kube(e)),
        };
        if let Some(Some(existing)) = before.as_ref().filter(|_| secret) {
            let value = serde_json::to_value(existing).unwrap_or(Value::Null);
            if let Some(why) = self.guard.refuses_object(&value) {
                return Err(forbidden_secret(ns_text, &name, why));
            }
        }
        let mut params = PatchParams::apply(FIELD_MANAGER);
        params.force = force;
        params.dry_run = dry_run;
        let after = api
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(from_kube)?;
        // Compared without status and bookkeeping: a controller updating status between the
        // read and the apply must not make an unchanged apply look changed.
        let outcome = match &before {
            None => "applied",
            Some(None) => "created",
            Some(Some(b)) if comparable(b) == comparable(&after) => "unchanged",
            Some(Some(_)) => "changed",
        };
        let result = json!({
            "apiVersion": resolved.resource.api_version,
            "kind": resolved.resource.kind,
            "namespace": ns,
            "name": name,
            "resourceVersion": after.metadata.resource_version,
            "outcome": outcome,
        });
        Ok((result, resolved.resource.kind.clone()))
    }

    async fn get(&self, target: &ObjectRef) -> Result<String, KubeFailure> {
        if target.name.is_empty() {
            return Err(bad_request("get needs an object name"));
        }
        let resolved = self.resolve(&target.api_version, &target.kind).await?;
        let ns = self.namespace_for(&resolved, target.namespace.as_deref());
        self.check(&resolved, ns.as_deref(), Some(&target.name))?;
        let secret = guard::is_secrets(&resolved.resource.group, &resolved.resource.plural);
        let ns_text = ns.as_deref().unwrap_or("");
        if secret {
            if let Some(why) = self.guard.refuses_name(ns_text, &target.name) {
                return Err(forbidden_secret(ns_text, &target.name, why));
            }
        }
        let object = self
            .api(&resolved, ns.as_deref())
            .get(&target.name)
            .await
            .map_err(from_kube)?;
        let value = typed(object, &resolved);
        if secret {
            // A ServiceAccount token is known only once read: refuse before it leaves.
            if let Some(why) = self.guard.refuses_object(&value) {
                return Err(forbidden_secret(ns_text, &target.name, why));
            }
        }
        Ok(value.to_string())
    }

    async fn list(&self, target: &ObjectRef, params: &ListParams) -> Result<String, KubeFailure> {
        let resolved = self.resolve(&target.api_version, &target.kind).await?;
        // A list without a namespace spans all namespaces.
        let ns = target
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty() && resolved.namespaced);
        self.check(&resolved, ns, None)?;
        let list = self
            .api(&resolved, ns)
            .list(params)
            .await
            .map_err(from_kube)?;
        let is_namespaces =
            resolved.resource.group.is_empty() && resolved.resource.plural == "namespaces";
        let secret = guard::is_secrets(&resolved.resource.group, &resolved.resource.plural);
        let items: Vec<Value> = list
            .items
            .into_iter()
            .filter(|o| {
                !is_namespaces
                    || o.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| self.allow.allows_namespace(n))
            })
            .map(|o| typed(o, &resolved))
            // The agent's own Secrets and ServiceAccount tokens are left out of any list.
            .filter(|o| !secret || self.guard.refuses_object(o).is_none())
            .collect();
        Ok(json!({
            "apiVersion": resolved.resource.api_version,
            "kind": format!("{}List", resolved.resource.kind),
            "metadata": {
                "resourceVersion": list.metadata.resource_version,
                "continue": list.metadata.continue_,
            },
            "items": items,
        })
        .to_string())
    }

    async fn delete(
        &self,
        target: &ObjectRef,
        propagation: Option<&str>,
        dry_run: bool,
    ) -> Result<String, KubeFailure> {
        if target.name.is_empty() {
            return Err(bad_request("delete needs an object name"));
        }
        let propagation_policy = match propagation {
            None => None,
            Some(p) if p.eq_ignore_ascii_case("foreground") => Some(PropagationPolicy::Foreground),
            Some(p) if p.eq_ignore_ascii_case("background") => Some(PropagationPolicy::Background),
            Some(p) if p.eq_ignore_ascii_case("orphan") => Some(PropagationPolicy::Orphan),
            Some(p) => {
                return Err(bad_request(format!(
                    "propagation policy {p:?}: expected Foreground, Background or Orphan"
                )))
            }
        };
        let resolved = self.resolve(&target.api_version, &target.kind).await?;
        let ns = self.namespace_for(&resolved, target.namespace.as_deref());
        self.check(&resolved, ns.as_deref(), Some(&target.name))?;
        if guard::is_secrets(&resolved.resource.group, &resolved.resource.plural) {
            let ns_text = ns.as_deref().unwrap_or("");
            if let Some(why) = self.guard.refuses_name(ns_text, &target.name) {
                return Err(forbidden_secret(ns_text, &target.name, why));
            }
            // A ServiceAccount token is told by its type; when the role cannot read Secrets
            // the type is unknown and only the name list applies.
            let existing = self
                .api(&resolved, ns.as_deref())
                .get_opt(&target.name)
                .await;
            if let Ok(Some(o)) = existing {
                let value = serde_json::to_value(&o).unwrap_or(Value::Null);
                if let Some(why) = self.guard.refuses_object(&value) {
                    return Err(forbidden_secret(ns_text, &target.name, why));
                }
            }
        }
        let params = DeleteParams {
            dry_run,
            propagation_policy,
            ..Default::default()
        };
        let answer = self
            .api(&resolved, ns.as_deref())
            .delete(&target.name, &params)
            .await
            .map_err(from_kube)?;
        // The server answers with the object while finalizers still hold it, else a Status.
        let state = match answer.left() {
            Some(obj) if obj.metadata.deletion_timestamp.is_some() => "deleting",
            _ => "deleted",
        };
        let kind = resolved.resource.kind.as_str();
        if !dry_run && (kind == "CustomResourceDefinition" || kind == "Namespace") {
            self.discovery.clear();
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(json!({
            "apiVersion": resolved.resource.api_version,
            "kind": kind,
            "namespace": ns,
            "name": target.name,
            "state": state,
            "dryRun": dry_run,
        })
        .to_string())
    }

    /// Waits until the object meets `condition`, sending a progress event each time what is
    /// missing changes. Watches the object (re-reading it when the watch ends or expires) so
    /// a change is seen at once, with no polling interval.
    async fn wait(
        &self,
        target: &ObjectRef,
        condition: &WaitFor,
        timeout: Duration,
        progress: &mpsc::Sender<String>,
    ) -> Result<String, KubeFailure> {
        if target.name.is_empty() {
            return Err(bad_request("wait needs an object name"));
        }
        let resolved = self.resolve(&target.api_version, &target.kind).await?;
        if *condition == WaitFor::Rollout
            && !matches!(
                resolved.resource.kind.as_str(),
                "Deployment" | "StatefulSet" | "DaemonSet"
            )
        {
            return Err(bad_request(format!(
                "rollout status is only known for Deployment, StatefulSet and DaemonSet, not {}",
                resolved.resource.kind
            )));
        }
        let ns = self.namespace_for(&resolved, target.namespace.as_deref());
        self.check(&resolved, ns.as_deref(), Some(&target.name))?;
        let secret = guard::is_secrets(&resolved.resource.group, &resolved.resource.plural);
        let ns_text = ns.clone().unwrap_or_default();
        if secret {
            if let Some(why) = self.guard.refuses_name(&ns_text, &target.name) {
                return Err(forbidden_secret(&ns_text, &target.name, why));
            }
        }
        let api = self.api(&resolved, ns.as_deref());
        let kind = resolved.resource.kind.clone();
        let describe = match &ns {
            Some(ns) => format!("{kind} {ns}/{}", target.name),
            None => format!("{kind} {}", target.name),
        };
        let mut last = String::new();
        let work = async {
            // Judges one state of the object (None: it does not exist), reports what is
            // missing when that changed, and gives the answer once there is one.
            let mut settle = |obj: Option<&DynamicObject>| -> Option<Result<String, KubeFailure>> {
                if let Some(o) = obj.filter(|_| secret) {
                    let value = serde_json::to_value(o).unwrap_or(Value::Null);
                    if let Some(why) = self.guard.refuses_object(&value) {
                        return Some(Err(forbidden_secret(&ns_text, &target.name, why)));
                    }
                }
                let eval = match (obj, condition) {
                    (None, WaitFor::Deleted) => Eval::Met(format!("{describe} is deleted")),
                    (None, _) => Eval::Pending(format!("{describe} does not exist yet")),
                    (Some(o), c) => match serde_json::to_value(o) {
                        Ok(v) => wait::evaluate(&kind, &v, c),
                        Err(e) => Eval::Failed(format!("{describe}: {e}")),
                    },
                };
                if eval.message() != last {
                    last = eval.message().to_string();
                    // The final state is said once, by the answer, not also as progress.
                    if matches!(eval, Eval::Pending(_)) {
                        let event =
                            json!({"type": "progress", "object": describe, "message": last});
                        // A full channel only drops a progress line, never the final answer.
                        let _ = progress.try_send(event.to_string());
                    }
                }
                match eval {
                    Eval::Met(m) => Some(Ok(m)),
                    Eval::Failed(m) => {
                        Some(Err(failure(FailureKind::Api, 422, "RolloutFailed", m)))
                    }
                    Eval::Pending(_) => None,
                }
            };
            loop {
                let current = api.get_opt(&target.name).await.map_err(from_kube)?;
                if let Some(answer) = settle(current.as_ref()) {
                    return answer;
                }
                let version = current
                    .as_ref()
                    .and_then(|o| o.metadata.resource_version.clone())
                    .unwrap_or_else(|| "0".into());
                let params = WatchParams::default()
                    .fields(&format!("metadata.name={}", target.name))
                    .timeout(290);
                let mut events = match api.watch(&params, &version).await {
                    Ok(s) => s.boxed(),
                    Err(e) => {
                        warn!("watch of {describe} failed, reading again: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(event) = events.next().await {
                    let obj = match event {
                        Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) => Some(o),
                        Ok(WatchEvent::Deleted(_)) => None,
                        Ok(WatchEvent::Bookmark(_)) => continue,
                        // 410 Gone and friends: read the object again and watch anew, after
                        // a pause so a failing watch cannot spin.
                        Ok(WatchEvent::Error(_)) | Err(_) => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            break;
                        }
                    };
                    if let Some(answer) = settle(obj.as_ref()) {
                        return answer;
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(message)) => Ok(
                json!({"type": "done", "met": true, "object": describe, "message": message})
                    .to_string(),
            ),
            Ok(Err(f)) => Err(f),
            Err(_) => Err(failure(
                FailureKind::Timeout,
                504,
                "Timeout",
                format!(
                    "timed out after {} waiting for {describe}: {}",
                    humanize(timeout),
                    if last.is_empty() {
                        "no answer yet"
                    } else {
                        last.as_str()
                    }
                ),
            )),
        }
    }

    /// The inventory, collected at most once per ten seconds however many hubs ask.
    pub async fn inventory(&self) -> Inventory {
        let mut cached = self.inventory.lock().await;
        if let Some((at, inv)) = cached.as_ref() {
            if at.elapsed() < Duration::from_secs(10) {
                return inv.clone();
            }
        }
        let inv = self.collect_inventory().await;
        *cached = Some((Instant::now(), inv.clone()));
        inv
    }

    /// Forces the next [`inventory`](Self::inventory) to collect anew.
    pub async fn invalidate_inventory(&self) {
        *self.inventory.lock().await = None;
    }

    async fn collect_inventory(&self) -> Inventory {
        let mut inv = Inventory {
            collected_unix: now_unix(),
            ..Default::default()
        };
        match self.client.apiserver_version().await {
            Ok(v) => {
                inv.server_version = Some(v.git_version);
                inv.platform = Some(v.platform);
            }
            Err(e) => inv.errors.push(format!("server version: {e}")),
        }
        // Node count is informative only: RBAC decides whether it can be read.
        let nodes = kube::api::ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "Node".into(),
            plural: "nodes".into(),
        };
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &nodes);
        match api.list_metadata(&ListParams::default()).await {
            Ok(list) => inv.node_count = Some(list.items.len() as u64),
            Err(e) => inv.errors.push(format!("nodes: {}", from_kube(e).message)),
        }
        let namespaces = kube::api::ApiResource {
            kind: "Namespace".into(),
            plural: "namespaces".into(),
            ..nodes
        };
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &namespaces);
        match api.list_metadata(&ListParams::default()).await {
            Ok(list) => {
                let mut names: Vec<String> = list
                    .items
                    .into_iter()
                    .filter_map(|o| o.metadata.name)
                    .filter(|n| self.allow.allows_namespace(n))
                    .collect();
                names.sort();
                inv.namespaces = Some(names);
            }
            Err(e) => {
                inv.errors
                    .push(format!("namespaces: {}", from_kube(e).message));
                if !self.allow.namespaces.is_empty() {
                    inv.namespaces = Some(self.allow.namespaces.clone());
                }
            }
        }
        match self.resources().await {
            Ok(resources) => inv.resources = resources,
            Err(e) => inv.errors.push(format!("discovery: {e}")),
        }
        inv
    }

    /// Every resource of every group's preferred version that the allow list permits.
    async fn resources(&self) -> Result<Vec<ResourceInfo>, kube::Error> {
        let mut versions = Vec::new();
        let core = self.client.list_core_api_versions().await?;
        for v in core.versions {
            versions.push((String::new(), v));
        }
        let groups = self.client.list_api_groups().await?;
        for g in groups.groups {
            let version = g
                .preferred_version
                .map(|p| p.version)
                .or_else(|| g.versions.first().map(|v| v.version.clone()));
            if let Some(version) = version {
                versions.push((g.name, version));
            }
        }
        let mut out = Vec::new();
        for (group, version) in versions {
            let listed = if group.is_empty() {
                self.client.list_core_api_resources(&version).await
            } else {
                self.client
                    .list_api_group_resources(&format!("{group}/{version}"))
                    .await
            };
            let list = match listed {
                Ok(l) => l,
                // An aggregated API that is down must not hide every other resource.
                Err(e) => {
                    warn!(group = %group, version = %version, "discovery failed: {e}");
                    continue;
                }
            };
            for r in list.resources {
                if r.name.contains('/') || !self.allow.allows_resource(&group, &r.name) {
                    continue;
                }
                out.push(ResourceInfo {
                    group: group.clone(),
                    version: version.clone(),
                    kind: r.kind,
                    plural: r.name,
                    singular: r.singular_name,
                    namespaced: r.namespaced,
                    verbs: r.verbs,
                    short_names: r.short_names.unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }
}

/// The object as JSON with apiVersion and kind filled in (lists omit them per item).
fn typed(mut object: DynamicObject, resolved: &Resolved) -> Value {
    object.types = Some(kube::core::TypeMeta {
        api_version: resolved.resource.api_version.clone(),
        kind: resolved.resource.kind.clone(),
    });
    serde_json::to_value(&object).unwrap_or(Value::Null)
}

/// An object without status and the fields every write changes, to tell whether an apply
/// changed it.
fn comparable(object: &DynamicObject) -> Value {
    let mut v = serde_json::to_value(object).unwrap_or(Value::Null);
    if let Some(map) = v.as_object_mut() {
        map.remove("status");
    }
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in ["resourceVersion", "managedFields", "generation"] {
            meta.remove(f);
        }
    }
    v
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else if s > 0 && d.subsec_millis() == 0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// What a command was about, for the audit line: kind, namespace, name, and whether it
/// touches Secrets.
fn audit_target(request: &KubeRequest) -> (String, String, String, bool) {
    match request.target() {
        Some(t) => (
            t.kind.clone(),
            t.namespace.clone().unwrap_or_default(),
            t.name.clone(),
            t.is_secret(),
        ),
        None => {
            // apply: the kinds and names of its objects (never their contents)
            let mut kinds = Vec::new();
            let mut names = Vec::new();
            let mut secret = false;
            if let KubeRequest::Apply { objects, .. } = request {
                if let Ok(Value::Array(docs)) = serde_json::from_str::<Value>(objects) {
                    secret = docs.iter().any(|d| {
                        let text = |f: &str| d.get(f).and_then(Value::as_str).unwrap_or("");
                        crate::proto::kube::is_secret_kind(text("apiVersion"), text("kind"))
                    });
                    for d in docs.iter().take(20) {
                        kinds.push(
                            d.get("kind")
                                .and_then(Value::as_str)
                                .unwrap_or("?")
                                .to_string(),
                        );
                        names.push(
                            d.get("metadata")
                                .and_then(|m| m.get("name"))
                                .and_then(Value::as_str)
                                .unwrap_or("?")
                                .to_string(),
                        );
                    }
                }
            }
            (kinds.join(","), String::new(), names.join(","), secret)
        }
    }
}

/// Serves one command stream: reads the capped request, runs it within the header's timeout,
/// streams progress and the answer, and leaves one audit line.
pub async fn serve_command(
    mut send: SendStream,
    mut recv: RecvStream,
    header: KubeHeader,
    executor: Option<Arc<KubeExecutor>>,
    agent: &str,
) {
    let _ = send.set_priority(1);
    let started = Instant::now();
    let timeout = Duration::from_millis(header.timeout_ms.clamp(100, 24 * 3600 * 1000));
    let read = tokio::time::timeout(
        Duration::from_secs(30).min(timeout),
        read_frame_limited::<KubeRequest, _>(&mut recv, MAX_KUBE_REQUEST),
    )
    .await;
    let refused = match read {
        Ok(Ok(Some(r))) => Ok(r),
        Ok(Ok(None)) => Err("stream ended before the command".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no command in time".to_string()),
    };
    let request = match refused {
        Ok(r) => r,
        Err(why) => {
            info!("kubernetes command stream refused: {why}");
            let _ = send.reset(StreamCode::BadHeader.into());
            let _ = recv.stop(StreamCode::BadHeader.into());
            return;
        }
    };
    let verb = request.verb();
    let (kind, namespace, name, secret) = audit_target(&request);
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let outcome = match &executor {
        None => Err(failure(
            FailureKind::NoCapability,
            409,
            "NoCapability",
            format!("agent {agent} has no Kubernetes access (cluster mode is off)"),
        )),
        Some(executor) => {
            // A wait takes its own slot first, or is refused at once: the slots left over
            // stay free for commands that change or read the cluster.
            let wait_slot = match request {
                KubeRequest::Wait { .. } => Some(executor.wait_permits.try_acquire()),
                _ => None,
            };
            let run = tokio::time::timeout(timeout, async {
                if let Some(Err(_)) = &wait_slot {
                    return Err(failure(
                        FailureKind::NotAllowed,
                        429,
                        TOO_MANY_WAITS,
                        format!(
                            "agent {agent} already runs {MAX_CONCURRENT_WAITS} waits; retry when \
                             one ends"
                        ),
                    ));
                }
                // Waiting for a permit counts against the command's own timeout.
                let _permit = executor.permits.acquire().await;
                executor.execute(request, &tx).await
            });
            tokio::pin!(run);
            // The hub stops the stream when its caller went away: a wait that reports no
            // progress must still end then, not hold its slot until its timeout.
            let stopped = send.stopped();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => break Err(failure(FailureKind::Unavailable, 499,
                        "Cancelled", "the hub closed the command stream")),
                    done = &mut run => break match done {
                        Ok(r) => r,
                        Err(_) => Err(failure(FailureKind::Timeout, 504, "Timeout",
                            format!("the command did not finish within {}", humanize(timeout)))),
                    },
                    Some(event) = rx.recv() => {
                        if write_reply(&mut send, &KubeReply::Progress(event)).await.is_err() {
                            // The hub is gone: stop working for nobody.
                            break Err(failure(FailureKind::Unavailable, 499, "Cancelled", "the hub closed the command stream"));
                        }
                    }
                }
            }
        }
    };
    while let Ok(event) = rx.try_recv() {
        let _ = write_reply(&mut send, &KubeReply::Progress(event)).await;
    }
    let (label, reason) = match &outcome {
        Ok(_) => ("ok", String::new()),
        Err(f) => (f.kind.as_str(), f.reason.clone()),
    };
    let reply = KubeReply::Done(outcome);
    if let Err(e) = write_reply(&mut send, &reply).await {
        // Too large: tell the caller instead of going silent.
        let too_large = KubeReply::Done(Err(failure(
            FailureKind::TooLarge,
            413,
            "ResponseTooLarge",
            format!("the answer is larger than the channel's limit ({e}); use limit to page"),
        )));
        let _ = write_reply(&mut send, &too_large).await;
    }
    let _ = send.finish();
    // Names, kinds and reasons come from the caller: token-shaped text is masked.
    let (kind_m, namespace_m, name_m) = (
        mask_tokens(&kind),
        mask_tokens(&namespace),
        mask_tokens(&name),
    );
    let reason = mask_tokens(&reason);
    info!(target: "rna::audit", tenant = %header.caller.tenant, token_id = %header.caller.token_id,
        token_label = header.caller.label.as_deref().unwrap_or(""), agent, verb,
        kind = kind_m.as_ref(), namespace = namespace_m.as_ref(), name = name_m.as_ref(), secret,
        outcome = label, reason = reason.as_ref(),
        duration_ms = started.elapsed().as_millis() as u64, "kubernetes command");
}

async fn write_reply(send: &mut SendStream, reply: &KubeReply) -> Result<(), String> {
    let frame = encode_limited(reply, MAX_KUBE_REPLY).map_err(|e| e.to_string())?;
    send.write_all(&frame).await.map_err(|e| e.to_string())
}
