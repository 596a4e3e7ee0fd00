//! Cluster mode: the agent runs the hub's Kubernetes commands with kube-rs, as its own
//! ServiceAccount (in cluster) or kubeconfig identity (on a VM), never with more.
//!
//! Agent path: session → command stream ([`serve`]) → allow list → discovery → Kubernetes
//! API. Each operation has its file: [`apply`], [`read`] (get and list), [`delete`],
//! [`wait`]; [`inventory`] is what the agent reports unasked. This file holds the settings,
//! the errors, and the executor every operation runs on.

pub mod allow;
pub mod apply;
mod delete;
pub mod discovery;
pub mod guard;
mod inventory;
mod read;
mod serve;
pub mod wait;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::proto::kube::{FailureKind, Inventory, KubeFailure, KubeRequest};

use allow::Target;
pub use allow::{KubeAllow, ResourceRule};
pub use apply::FIELD_MANAGER;
use discovery::{DiscoveryCache, DiscoveryError, Resolved};
use guard::SecretGuard;
pub use guard::SecretRef;
pub use serve::serve_command;

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

    /// The one Secret guard check: every operation calls it on its target before acting,
    /// and again on the object once read (a ServiceAccount token is told by its type). A
    /// target that is not a core Secret passes; one of the agent's own Secrets, or a
    /// ServiceAccount token, is refused with 403 `Forbidden` as the API server would.
    fn guard_secret(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
        object: Option<&Value>,
    ) -> Result<(), KubeFailure> {
        if !guard::is_secrets(&resolved.resource.group, &resolved.resource.plural) {
            return Ok(());
        }
        let namespace = namespace.unwrap_or("");
        let why = self
            .guard
            .refuses_name(namespace, name)
            .or_else(|| object.and_then(|o| self.guard.refuses_object(o)));
        match why {
            Some(why) => Err(forbidden_secret(namespace, name, why)),
            None => Ok(()),
        }
    }

    /// A CRD or namespace was applied or deleted: discovery is read anew and the inventory
    /// reported again before its interval.
    fn discovery_changed(&self) {
        self.discovery.clear();
        self.changed.send_modify(|n| *n += 1);
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
}

/// The object as JSON with apiVersion and kind filled in (lists omit them per item).
fn typed(mut object: DynamicObject, resolved: &Resolved) -> Value {
    object.types = Some(kube::core::TypeMeta {
        api_version: resolved.resource.api_version.clone(),
        kind: resolved.resource.kind.clone(),
    });
    serde_json::to_value(&object).unwrap_or(Value::Null)
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
