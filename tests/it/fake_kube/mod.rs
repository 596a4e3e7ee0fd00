//! A Kubernetes API server at the HTTP level, in the test process, that kube-rs and kubectl
//! talk to exactly as to a real cluster: discovery (`/version`, `/api`, `/api/v1`, `/apis`,
//! group versions, CRD-backed kinds appearing when their CRD is applied), namespaced and
//! cluster-scoped resources, GET/LIST with label and field selectors and paging,
//! server-side apply PATCH (`application/apply-patch+yaml`, `fieldManager`, field ownership,
//! conflicts answered 409 unless `force`, `dryRun`), DELETE (propagation policy), WATCH
//! (chunked JSON lines from a resourceVersion), resourceVersion and generation, Kubernetes
//! Status errors, bearer-token authentication, and a small controller that rolls out
//! Deployments step by step.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// A resource type the fake serves.
#[derive(Debug, Clone)]
struct ResDef {
    group: String,
    version: String,
    kind: String,
    plural: String,
    namespaced: bool,
    short: Vec<String>,
}

impl ResDef {
    fn new(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        short: &[&str],
    ) -> Self {
        ResDef {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            short: short.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn group_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    fn discovery(&self) -> Value {
        json!({
            "name": self.plural,
            "singularName": self.kind.to_lowercase(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": self.short,
        })
    }
}

fn builtin() -> Vec<ResDef> {
    vec![
        ResDef::new("", "v1", "Namespace", "namespaces", false, &["ns"]),
        ResDef::new("", "v1", "Node", "nodes", false, &["no"]),
        ResDef::new("", "v1", "ConfigMap", "configmaps", true, &["cm"]),
        ResDef::new("", "v1", "Secret", "secrets", true, &[]),
        ResDef::new("", "v1", "Pod", "pods", true, &["po"]),
        ResDef::new("", "v1", "Service", "services", true, &["svc"]),
        ResDef::new("", "v1", "ServiceAccount", "serviceaccounts", true, &["sa"]),
        ResDef::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
            &[],
        ),
        ResDef::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
            &[],
        ),
        ResDef::new("apps", "v1", "Deployment", "deployments", true, &["deploy"]),
        ResDef::new("apps", "v1", "StatefulSet", "statefulsets", true, &["sts"]),
        ResDef::new("apps", "v1", "DaemonSet", "daemonsets", true, &["ds"]),
        ResDef::new(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            &["crd", "crds"],
        ),
    ]
}

/// (resource key `group/plural`, namespace or "", name)
type Key = (String, String, String);

#[derive(Debug, Clone)]
struct Stored {
    value: Value,
    /// Field path (`.data.key`) → field manager owning it.
    owners: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: &'static str,
    key: Key,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Stored>,
    events: Vec<Event>,
    requests: Vec<String>,
}

struct Shared {
    token: String,
    store: Mutex<Store>,
    changed: tokio::sync::watch::Sender<u64>,
    /// Delay between rollout steps of the fake controller.
    step: Duration,
    /// Serve GET requests without credentials (as a cluster whose RBAC lets
    /// `system:anonymous` read): client-go sends no bearer token over plain HTTP.
    anonymous_reads: std::sync::atomic::AtomicBool,
    /// Resources (plurals) the caller may not get, list or watch, as a role without those
    /// verbs: reads are answered 403 as RBAC answers them.
    forbidden_reads: Mutex<BTreeSet<String>>,
    /// Added before answering object requests (discovery stays fast): a slow API server.
    delay: Mutex<Duration>,
    /// Bumped by [`FakeKube::compact`]: running watches end with 410 Gone, and watches from
    /// an older resourceVersion are refused the same way, as after an etcd compaction.
    compactions: tokio::sync::watch::Sender<u64>,
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Store> {
    s.store.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fake API server.
pub struct FakeKube {
    pub addr: SocketAddr,
    pub token: String,
    shared: Arc<Shared>,
}

const STALL: &str = "fake.rna.dev/stall-rollout";

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    rna::auth::format_rfc3339(secs)
}

impl FakeKube {
    /// Starts the server on 127.0.0.1:0 with namespaces `default` and `kube-system`, two
    /// nodes and the CRD `widgets.example.com` (kind Widget, namespaced).
    pub async fn start() -> FakeKube {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            token: "fake-sa-token-0123456789".into(),
            store: Mutex::new(Store::default()),
            changed: tokio::sync::watch::Sender::new(0),
            step: Duration::from_millis(40),
            anonymous_reads: std::sync::atomic::AtomicBool::new(false),
            forbidden_reads: Mutex::new(BTreeSet::new()),
            delay: Mutex::new(Duration::ZERO),
            compactions: tokio::sync::watch::Sender::new(0),
        });
        let fake = FakeKube {
            addr,
            token: shared.token.clone(),
            shared: shared.clone(),
        };
        for ns in ["default", "kube-system"] {
            fake.seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        }
        for node in ["node-1", "node-2"] {
            fake.seed(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}));
        }
        fake.seed(crd("example.com", "Widget", "widgets", &["wd"]));
        let app = axum::Router::new().fallback(handle).with_state(shared);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (optionally through a proxy) and returns its path.
    pub fn kubeconfig(&self, dir: &Path, name: &str, proxy: Option<&str>) -> std::path::PathBuf {
        let proxy = proxy
            .map(|p| format!("    proxy-url: {p}\n"))
            .unwrap_or_default();
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n{proxy}contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: {}\n",
            self.url(),
            self.token
        );
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Stores an object as if created long ago by the manager `seed`.
    pub fn seed(&self, object: Value) {
        let defs = defs(&lock(&self.shared));
        let api_version = object["apiVersion"].as_str().unwrap().to_string();
        let kind = object["kind"].as_str().unwrap().to_string();
        let def = defs
            .iter()
            .find(|d| d.group_version() == api_version && d.kind == kind)
            .expect("known kind")
            .clone();
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let mut store = lock(&self.shared);
        apply_locked(
            &self.shared,
            &mut store,
            &def,
            &ns,
            &name,
            object,
            "seed",
            true,
            false,
        )
        .unwrap();
    }

    /// Server-side applies `object` as `manager` (e.g. another tool owning fields).
    pub fn apply_as(&self, manager: &str, object: Value) {
        let defs = defs(&lock(&self.shared));
        let def = defs
            .iter()
            .find(|d| {
                d.group_version() == object["apiVersion"].as_str().unwrap()
                    && d.kind == object["kind"].as_str().unwrap()
            })
            .unwrap()
            .clone();
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let mut store = lock(&self.shared);
        let outcome = apply_locked(
            &self.shared,
            &mut store,
            &def,
            &ns,
            &name,
            object,
            manager,
            true,
            false,
        );
        drop(store);
        if let Ok((_, _, Some(r))) = outcome {
            spawn_rollout(self.shared.clone(), r);
        }
    }

    /// The stored object, if any.
    pub fn object(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        lock(&self.shared)
            .objects
            .get(&(
                format!("{group}/{plural}"),
                ns.to_string(),
                name.to_string(),
            ))
            .map(|s| s.value.clone())
    }

    /// Every request seen so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared).requests.clone()
    }

    /// Refuses get, list and watch of `plural` with 403, as RBAC without those verbs does;
    /// create, patch and delete still work.
    pub fn forbid_reads(&self, plural: &str) {
        self.shared
            .forbidden_reads
            .lock()
            .unwrap()
            .insert(plural.to_string());
    }

    /// Lets GET requests without credentials through (see `anonymous_reads`).
    pub fn allow_anonymous_reads(&self) {
        self.shared
            .anonymous_reads
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes object requests (not discovery) answer after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }

    /// The current resourceVersion counter.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared).rv
    }

    /// Compacts the history as etcd does: every running watch ends with an ERROR event of
    /// 410 Gone, and a watch from a version up to now is answered the same way, so clients
    /// must list again.
    pub fn compact(&self) {
        let rv = lock(&self.shared).rv;
        self.shared.compactions.send_replace(rv);
    }
}

fn crd(group: &str, kind: &str, plural: &str, short: &[&str]) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "shortNames": short},
            "versions": [{"name": "v1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    })
}

/// Built-in resources plus one per served version of every stored CRD.
fn defs(store: &Store) -> Vec<ResDef> {
    let mut out = builtin();
    for ((res, _, _), obj) in &store.objects {
        if res != "apiextensions.k8s.io/customresourcedefinitions" {
            continue;
        }
        let v = &obj.value;
        let spec = &v["spec"];
        let short: Vec<&str> = spec["names"]["shortNames"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for version in spec["versions"].as_array().into_iter().flatten() {
            if version["served"] == Value::Bool(false) {
                continue;
            }
            out.push(ResDef::new(
                spec["group"].as_str().unwrap_or(""),
                version["name"].as_str().unwrap_or("v1"),
                spec["names"]["kind"].as_str().unwrap_or(""),
                spec["names"]["plural"].as_str().unwrap_or(""),
                spec["scope"].as_str() != Some("Cluster"),
                &short,
            ));
        }
    }
    out
}

fn status(code: u16, reason: &str, message: String, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    (
        StatusCode::from_u16(code).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found(def: &ResDef, name: &str) -> Response {
    let resource = if def.group.is_empty() {
        def.plural.clone()
    } else {
        format!("{}.{}", def.plural, def.group)
    };
    status(
        404,
        "NotFound",
        format!("{resource} \"{name}\" not found"),
        Some(json!({"name": name, "group": def.group, "kind": def.plural})),
    )
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn query_map(query: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode(k), decode(v));
    }
    out
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let headers = req.headers().clone();
    lock(&shared).requests.push(format!(
        "{method} {path}{}",
        query.as_ref().map(|q| format!("?{q}")).unwrap_or_default()
    ));
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {}", shared.token).as_str());
    let anonymous_ok = method == Method::GET
        && headers.get(header::AUTHORIZATION).is_none()
        && shared
            .anonymous_reads
            .load(std::sync::atomic::Ordering::SeqCst);
    if !authorized && !anonymous_ok {
        return status(401, "Unauthorized", "Unauthorized".into(), None);
    }
    let body = match axum::body::to_bytes(req.into_body(), 8 << 20).await {
        Ok(b) => b,
        Err(_) => return status(413, "RequestEntityTooLarge", "too large".into(), None),
    };
    let q = query_map(query.as_deref());
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if method == Method::GET && segments.len() >= 3 {
        let forbidden = shared.forbidden_reads.lock().unwrap().clone();
        if let Some(plural) = segments[2..].iter().find(|s| forbidden.contains(**s)) {
            return status(
                403,
                "Forbidden",
                format!(
                    "{plural} is forbidden: User \"system:serviceaccount:rna-system:rna-agent\" \
                     cannot get resource \"{plural}\""
                ),
                Some(json!({"kind": plural})),
            );
        }
    }
    let defs = defs(&lock(&shared));
    match segments.as_slice() {
        ["version"] => json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "0",
                    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
        ),
        ["api"] => json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared_addr(&headers)}]}),
        ),
        ["apis"] => {
            let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for d in defs.iter().filter(|d| !d.group.is_empty()) {
                groups
                    .entry(d.group.clone())
                    .or_default()
                    .insert(d.version.clone());
            }
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, versions)| {
                    let vs: Vec<Value> = versions
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": vs, "preferredVersion": vs[0]})
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            )
        }
        ["api", version] => resource_list(&defs, "", version),
        ["apis", group, version] => resource_list(&defs, group, version),
        ["api", version, rest @ ..] => {
            resource(
                &shared, &defs, "", version, rest, &method, &q, &headers, body,
            )
            .await
        }
        ["apis", group, version, rest @ ..] => {
            resource(
                &shared, &defs, group, version, rest, &method, &q, &headers, body,
            )
            .await
        }
        _ => status(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
            None,
        ),
    }
}

fn shared_addr(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string()
}

fn resource_list(defs: &[ResDef], group: &str, version: &str) -> Response {
    let resources: Vec<Value> = defs
        .iter()
        .filter(|d| d.group == group && d.version == version)
        .map(ResDef::discovery)
        .collect();
    if resources.is_empty() {
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        return status(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({gv})"),
            None,
        );
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

#[allow(clippy::too_many_arguments)]
async fn resource(
    shared: &Arc<Shared>,
    defs: &[ResDef],
    group: &str,
    version: &str,
    rest: &[&str],
    method: &Method,
    q: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let (ns, plural, name) = match rest {
        [plural] => ("", *plural, None),
        [plural, name] => ("", *plural, Some(*name)),
        ["namespaces", ns, plural] => (*ns, *plural, None),
        ["namespaces", ns, plural, name] => (*ns, *plural, Some(*name)),
        _ => {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
                None,
            )
        }
    };
    let Some(def) = defs
        .iter()
        .find(|d| d.group == group && d.version == version && d.plural == plural)
        .cloned()
    else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            None,
        );
    };
    if !def.namespaced && !ns.is_empty() {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            None,
        );
    }
    let delay = *shared.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let watching = matches!(q.get("watch").map(String::as_str), Some("true") | Some("1"));
    match (method.clone(), name) {
        (Method::GET, None) if watching => watch(shared.clone(), def, ns.to_string(), q.clone()),
        (Method::GET, None) => list(shared, &def, ns, q),
        (Method::GET, Some(name)) => {
            let store = lock(shared);
            match store
                .objects
                .get(&(def.key(), ns.to_string(), name.to_string()))
            {
                Some(o) => json_response(StatusCode::OK, &o.value),
                None => not_found(&def, name),
            }
        }
        (Method::PATCH, Some(name)) => patch(shared, &def, ns, name, q, headers, &body),
        (Method::POST, None) => create(shared, &def, ns, &body),
        (Method::PUT, Some(name)) => replace(shared, &def, ns, name, &body),
        (Method::DELETE, Some(name)) => delete(shared, &def, ns, name, q, &body),
        _ => status(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported by this fake"),
            None,
        ),
    }
}

/// One label selector term.
fn label_matches(selector: &str, labels: &Map<String, Value>) -> Result<bool, String> {
    // Split on commas outside parentheses.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let get = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
    for term in terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let ok = if let Some((k, v)) = term.split_once("!=") {
            get(k) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k) == Some(v.trim())
        } else if let Some((k, set)) = term.split_once(" notin ") {
            let set = parse_set(set)?;
            get(k).is_none_or(|v| !set.contains(&v.to_string()))
        } else if let Some((k, set)) = term.split_once(" in ") {
            let set = parse_set(set)?;
            get(k).is_some_and(|v| set.contains(&v.to_string()))
        } else if let Some(k) = term.strip_prefix('!') {
            get(k).is_none()
        } else {
            get(term).is_some()
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("bad set {s:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
}

fn field_matches(selector: &str, obj: &Value) -> Result<bool, String> {
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let (field, want, negate) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (f, v, false)
        } else {
            return Err(format!("invalid field selector {term:?}"));
        };
        let have = match field {
            "metadata.name" => obj["metadata"]["name"].as_str(),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str(),
            other => return Err(format!("field label not supported: {other}")),
        };
        if (have == Some(want)) == negate {
            return Ok(false);
        }
    }
    Ok(true)
}

fn selected(
    def: &ResDef,
    ns: &str,
    q: &BTreeMap<String, String>,
    key: &Key,
    obj: &Value,
) -> Result<bool, String> {
    if key.0 != def.key() || (!ns.is_empty() && key.1 != ns) {
        return Ok(false);
    }
    if let Some(sel) = q.get("labelSelector") {
        let empty = Map::new();
        let labels = obj["metadata"]["labels"].as_object().unwrap_or(&empty);
        if !label_matches(sel, labels)? {
            return Ok(false);
        }
    }
    if let Some(sel) = q.get("fieldSelector") {
        if !field_matches(sel, obj)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn list(shared: &Arc<Shared>, def: &ResDef, ns: &str, q: &BTreeMap<String, String>) -> Response {
    let store = lock(shared);
    let mut items = Vec::new();
    for (key, obj) in &store.objects {
        match selected(def, ns, q, key, &obj.value) {
            Ok(true) => items.push(obj.value.clone()),
            Ok(false) => {}
            Err(e) => return status(400, "BadRequest", e, None),
        }
    }
    let start: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<Value> = items.iter().skip(start).take(limit).cloned().collect();
    let next = (start + page.len() < items.len()).then(|| (start + page.len()).to_string());
    let mut meta = json!({"resourceVersion": store.rv.to_string()});
    if let Some(c) = next {
        meta["continue"] = Value::String(c);
    }
    json_response(
        StatusCode::OK,
        &json!({"kind": format!("{}List", def.kind), "apiVersion": def.group_version(),
                "metadata": meta, "items": page}),
    )
}

fn watch(shared: Arc<Shared>, def: ResDef, ns: String, q: BTreeMap<String, String>) -> Response {
    let since: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changes = shared.changed.subscribe();
    let mut compactions = shared.compactions.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "metadata": {}, "status": "Failure", "message": "too old resource version",
            "reason": "Expired", "code": 410}})
        .to_string()
            + "\n";
        let compacted = *compactions.borrow_and_update();
        if since != 0 && since <= compacted {
            let _ = tx.send(Ok(Bytes::from(gone))).await;
            return;
        }
        let mut seen = since;
        if since == 0 {
            // From "now": synthetic ADDED for what exists.
            let initial: Vec<String> = {
                let store = lock(&shared);
                seen = store.rv;
                store
                    .objects
                    .iter()
                    .filter(|(key, obj)| selected(&def, &ns, &q, key, &obj.value).unwrap_or(false))
                    .map(|(_, obj)| {
                        json!({"type": "ADDED", "object": obj.value}).to_string() + "\n"
                    })
                    .collect()
            };
            for line in initial {
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
            }
        }
        loop {
            let lines: Vec<String> = {
                let store = lock(&shared);
                let mut out = Vec::new();
                for e in store.events.iter().filter(|e| e.rv > seen) {
                    if selected(&def, &ns, &q, &e.key, &e.object).unwrap_or(false) {
                        out.push(json!({"type": e.kind, "object": e.object}).to_string() + "\n");
                    }
                }
                seen = store.rv;
                out
            };
            for line in lines {
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                r = changes.changed() => if r.is_err() { return },
                _ = compactions.changed() => {
                    let _ = tx.send(Ok(Bytes::from(gone))).await;
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

const SEP: char = '\u{1f}';

/// Leaf paths of an applied object (maps recurse; lists and scalars are leaves), excluding
/// the identifying fields.
fn leaves(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                // Keys may hold dots (annotations): paths use a separator no key holds.
                let p = format!("{prefix}{SEP}{k}");
                let shown = p.replace(SEP, ".");
                if matches!(
                    shown.as_str(),
                    ".apiVersion" | ".kind" | ".metadata.name" | ".metadata.namespace" | ".status"
                ) || shown.starts_with(".metadata.managedFields")
                {
                    continue;
                }
                leaves(child, &p, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split(SEP).filter(|p| !p.is_empty()) {
        cur = cur.get(part)?;
    }
    Some(cur)
}

fn set_path(v: &mut Value, path: &str, value: Value) {
    let parts: Vec<&str> = path.split(SEP).filter(|p| !p.is_empty()).collect();
    let mut cur = v;
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let map = cur.as_object_mut().unwrap();
        if i + 1 == parts.len() {
            map.insert(part.to_string(), value);
            return;
        }
        cur = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

fn remove_path(v: &mut Value, path: &str) {
    let parts: Vec<&str> = path.split(SEP).filter(|p| !p.is_empty()).collect();
    let mut cur = v;
    for (i, part) in parts.iter().enumerate() {
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        if i + 1 == parts.len() {
            map.remove(*part);
            return;
        }
        match map.get_mut(*part) {
            Some(next) => cur = next,
            None => return,
        }
    }
}

/// A rollout the controller should drive: (key, generation).
type Rollout = (Key, i64);

#[allow(clippy::too_many_arguments, clippy::result_large_err)]
fn apply_locked(
    shared: &Shared,
    store: &mut Store,
    def: &ResDef,
    ns: &str,
    name: &str,
    patch: Value,
    manager: &str,
    force: bool,
    dry_run: bool,
) -> Result<(Value, bool, Option<Rollout>), Response> {
    if patch["apiVersion"].as_str() != Some(def.group_version().as_str())
        || patch["kind"].as_str() != Some(def.kind.as_str())
    {
        return Err(status(
            400,
            "BadRequest",
            format!(
                "the API version in the data ({}) does not match the expected API version ({})",
                patch["apiVersion"],
                def.group_version()
            ),
            None,
        ));
    }
    if patch["metadata"]["name"].as_str() != Some(name) {
        return Err(status(
            400,
            "BadRequest",
            "the name of the object does not match the name on the URL".into(),
            None,
        ));
    }
    if def.namespaced {
        if let Some(pns) = patch["metadata"]["namespace"].as_str() {
            if pns != ns {
                return Err(status(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request".into(), None));
            }
        }
        if !store
            .objects
            .contains_key(&("/namespaces".to_string(), String::new(), ns.to_string()))
        {
            return Err(status(
                404,
                "NotFound",
                format!("namespaces \"{ns}\" not found"),
                Some(json!({"name": ns, "kind": "namespaces"})),
            ));
        }
    }
    let key: Key = (def.key(), ns.to_string(), name.to_string());
    let existing = store.objects.get(&key).cloned();
    let mut applied = BTreeMap::new();
    leaves(&patch, "", &mut applied);
    let mut owners = existing
        .as_ref()
        .map(|e| e.owners.clone())
        .unwrap_or_default();
    let mut value = existing
        .as_ref()
        .map(|e| e.value.clone())
        .unwrap_or_else(|| {
            json!({"apiVersion": def.group_version(), "kind": def.kind,
                                  "metadata": {"name": name}})
        });
    // Conflicts: a field another manager owns, with a different value.
    let conflicts: Vec<(String, String)> = applied
        .iter()
        .filter_map(|(path, v)| {
            let owner = owners.get(path)?;
            (owner != manager && get_path(&value, path) != Some(v))
                .then(|| (path.clone(), owner.clone()))
        })
        .collect();
    if !conflicts.is_empty() && !force {
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(p, m)| json!({"type": "FieldManagerConflict", "message": format!("conflict with \"{m}\" using {}", def.group_version()), "field": p.replace(SEP, ".")}))
            .collect();
        let list: Vec<String> = conflicts
            .iter()
            .map(|(p, m)| {
                format!(
                    "conflict with \"{m}\" using {}: {}",
                    def.group_version(),
                    p.replace(SEP, ".")
                )
            })
            .collect();
        return Err(status(
            409,
            "Conflict",
            format!(
                "Apply failed with {} conflict{}: {}",
                conflicts.len(),
                if conflicts.len() == 1 { "" } else { "s" },
                list.join("\n")
            ),
            Some(json!({"name": name, "group": def.group, "kind": def.plural, "causes": causes})),
        ));
    }
    let before = value.clone();
    // Fields this manager applied before and no longer applies are removed.
    let dropped: Vec<String> = owners
        .iter()
        .filter(|(p, m)| m.as_str() == manager && !applied.contains_key(*p))
        .map(|(p, _)| p.clone())
        .collect();
    for p in dropped {
        remove_path(&mut value, &p);
        owners.remove(&p);
    }
    for (path, v) in &applied {
        set_path(&mut value, path, v.clone());
        owners.insert(path.clone(), manager.to_string());
    }
    if def.namespaced {
        value["metadata"]["namespace"] = Value::String(ns.to_string());
    }
    let unchanged = existing
        .as_ref()
        .is_some_and(|e| e.value == value && e.owners == owners);
    if unchanged || dry_run {
        let shown = if unchanged { before } else { value };
        return Ok((shown, false, None));
    }
    store.rv += 1;
    let rv = store.rv;
    let created = existing.is_none();
    let generation = if created {
        1
    } else {
        let old = existing.as_ref().unwrap();
        let g = old.value["metadata"]["generation"].as_i64().unwrap_or(1);
        if old.value.get("spec") != value.get("spec") {
            g + 1
        } else {
            g
        }
    };
    if created {
        store.uid += 1;
        value["metadata"]["uid"] =
            Value::String(format!("00000000-0000-0000-0000-{:012}", store.uid));
        value["metadata"]["creationTimestamp"] = Value::String(now_rfc3339());
    }
    value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    value["metadata"]["generation"] = json!(generation);
    let managers: BTreeSet<&String> = owners.values().collect();
    value["metadata"]["managedFields"] = Value::Array(
        managers
            .into_iter()
            .map(|m| json!({"manager": m, "operation": "Apply", "apiVersion": def.group_version(), "fieldsType": "FieldsV1"}))
            .collect(),
    );
    store.objects.insert(
        key.clone(),
        Stored {
            value: value.clone(),
            owners,
        },
    );
    store.events.push(Event {
        rv,
        kind: if created { "ADDED" } else { "MODIFIED" },
        key: key.clone(),
        object: value.clone(),
    });
    shared.changed.send_modify(|n| *n += 1);
    let old_generation = existing
        .as_ref()
        .and_then(|e| e.value["metadata"]["generation"].as_i64());
    let rollout = (def.kind == "Deployment" && old_generation != Some(generation))
        .then_some((key, generation));
    Ok((value, created, rollout))
}

fn patch(
    shared: &Arc<Shared>,
    def: &ResDef,
    ns: &str,
    name: &str,
    q: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != "application/apply-patch+yaml" {
        return status(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/apply-patch+yaml (got {content_type:?})"), None);
    }
    let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()) else {
        return status(422, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".into(), None);
    };
    let text = String::from_utf8_lossy(body);
    let patch: Value = match serde_json::from_str(&text)
        .or_else(|_| serde_saphyr::from_str::<Value>(&text).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => return status(400, "BadRequest", format!("error decoding YAML: {e}"), None),
    };
    if patch.pointer("/metadata/managedFields").is_some() {
        return status(
            400,
            "BadRequest",
            "metadata.managedFields must be nil".into(),
            None,
        );
    }
    let force = q.get("force").map(String::as_str) == Some("true");
    let dry_run = q.get("dryRun").map(String::as_str) == Some("All");
    let mut store = lock(shared);
    let outcome = apply_locked(
        shared, &mut store, def, ns, name, patch, manager, force, dry_run,
    );
    drop(store);
    match outcome {
        Ok((value, created, rollout)) => {
            if let Some(r) = rollout {
                spawn_rollout(shared.clone(), r);
            }
            json_response(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &value,
            )
        }
        Err(resp) => resp,
    }
}

fn delete(
    shared: &Arc<Shared>,
    def: &ResDef,
    ns: &str,
    name: &str,
    q: &BTreeMap<String, String>,
    body: &[u8],
) -> Response {
    let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let dry_run = q.get("dryRun").map(String::as_str) == Some("All")
        || options["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == "All"));
    let propagation = options["propagationPolicy"]
        .as_str()
        .or(q.get("propagationPolicy").map(String::as_str))
        .unwrap_or("Background")
        .to_string();
    let key: Key = (def.key(), ns.to_string(), name.to_string());
    let mut store = lock(shared);
    let Some(existing) = store.objects.get(&key).cloned() else {
        return not_found(def, name);
    };
    if dry_run {
        return json_response(StatusCode::OK, &existing.value);
    }
    store.rv += 1;
    let rv = store.rv;
    let mut value = existing.value.clone();
    value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    if propagation == "Foreground" {
        // Held by the foregroundDeletion finalizer until dependents are gone (at once here).
        value["metadata"]["deletionTimestamp"] = Value::String(now_rfc3339());
        value["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
        store.objects.insert(
            key.clone(),
            Stored {
                value: value.clone(),
                owners: existing.owners.clone(),
            },
        );
        store.events.push(Event {
            rv,
            kind: "MODIFIED",
            key: key.clone(),
            object: value.clone(),
        });
        shared.changed.send_modify(|n| *n += 1);
        let later = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut store = lock(&later);
            if let Some(obj) = store.objects.remove(&key) {
                store.rv += 1;
                let rv = store.rv;
                store.events.push(Event {
                    rv,
                    kind: "DELETED",
                    key,
                    object: obj.value,
                });
                later.changed.send_modify(|n| *n += 1);
            }
        });
        return json_response(StatusCode::OK, &value);
    }
    store.objects.remove(&key);
    store.events.push(Event {
        rv,
        kind: "DELETED",
        key,
        object: value.clone(),
    });
    if def.key() == "/namespaces" {
        let inside: Vec<Key> = store
            .objects
            .keys()
            .filter(|k| k.1 == name)
            .cloned()
            .collect();
        for k in inside {
            if let Some(o) = store.objects.remove(&k) {
                store.rv += 1;
                let rv = store.rv;
                store.events.push(Event {
                    rv,
                    kind: "DELETED",
                    key: k,
                    object: o.value,
                });
            }
        }
    }
    shared.changed.send_modify(|n| *n += 1);
    json_response(
        StatusCode::OK,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": def.group, "kind": def.plural, "uid": value["metadata"]["uid"]}}),
    )
}

/// The controller: brings a Deployment's status to its generation one replica at a time,
/// unless it carries the stall annotation (then it observes the generation and stops).
fn spawn_rollout(shared: Arc<Shared>, (key, generation): Rollout) {
    tokio::spawn(async move {
        let mut step = 0i64;
        loop {
            tokio::time::sleep(shared.step).await;
            let mut store = lock(&shared);
            let Some(obj) = store.objects.get(&key).cloned() else {
                return;
            };
            if obj.value["metadata"]["generation"].as_i64() != Some(generation) {
                return; // a newer rollout took over
            }
            let replicas = obj.value["spec"]["replicas"].as_i64().unwrap_or(1);
            let stalled = obj.value["metadata"]["annotations"][STALL].as_str() == Some("true");
            let done = if stalled { 0 } else { (step + 1).min(replicas) };
            let mut value = obj.value.clone();
            value["status"] = json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "updatedReplicas": done,
                "readyReplicas": done,
                "availableReplicas": done,
                "conditions": [
                    {"type": "Available", "status": if done == replicas { "True" } else { "False" }},
                    {"type": "Progressing", "status": "True",
                     "reason": if done == replicas { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }},
                ],
            });
            store.rv += 1;
            let rv = store.rv;
            value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            store.objects.insert(
                key.clone(),
                Stored {
                    value: value.clone(),
                    owners: obj.owners.clone(),
                },
            );
            store.events.push(Event {
                rv,
                kind: "MODIFIED",
                key: key.clone(),
                object: value,
            });
            shared.changed.send_modify(|n| *n += 1);
            drop(store);
            step += 1;
            if stalled || done == replicas {
                return;
            }
        }
    });
}

/// The object of a create or update body, checked against the URL's name and namespace.
// The error is the finished answer, as in the other handlers of this fake.
#[allow(clippy::result_large_err)]
fn object_body(def: &ResDef, ns: &str, name: Option<&str>, body: &[u8]) -> Result<Value, Response> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| status(400, "BadRequest", format!("error decoding JSON: {e}"), None))?;
    if value["apiVersion"].as_str() != Some(def.group_version().as_str())
        || value["kind"].as_str() != Some(def.kind.as_str())
    {
        return Err(status(
            400,
            "BadRequest",
            "apiVersion or kind does not match the URL".into(),
            None,
        ));
    }
    let Some(object_name) = value["metadata"]["name"].as_str() else {
        return Err(status(
            422,
            "Invalid",
            "metadata.name: Required value".into(),
            None,
        ));
    };
    if name.is_some_and(|n| n != object_name) {
        return Err(status(
            400,
            "BadRequest",
            "the name of the object does not match the name on the URL".into(),
            None,
        ));
    }
    if let Some(pns) = value["metadata"]["namespace"].as_str() {
        if pns != ns {
            return Err(status(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request".into(), None));
        }
    }
    Ok(value)
}

/// Stores `value` under `key` as a new version (ADDED or MODIFIED) and wakes the watches.
fn store_version(
    shared: &Shared,
    store: &mut Store,
    key: Key,
    mut value: Value,
    ns: &str,
    created: bool,
) -> Value {
    store.rv += 1;
    let rv = store.rv;
    if !ns.is_empty() {
        value["metadata"]["namespace"] = Value::String(ns.to_string());
    }
    value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    let owners = store
        .objects
        .get(&key)
        .map(|o| o.owners.clone())
        .unwrap_or_default();
    store.objects.insert(
        key.clone(),
        Stored {
            value: value.clone(),
            owners,
        },
    );
    store.events.push(Event {
        rv,
        kind: if created { "ADDED" } else { "MODIFIED" },
        key,
        object: value.clone(),
    });
    shared.changed.send_modify(|n| *n += 1);
    value
}

/// POST: creates the object; 409 AlreadyExists when the name is taken.
fn create(shared: &Arc<Shared>, def: &ResDef, ns: &str, body: &[u8]) -> Response {
    let mut value = match object_body(def, ns, None, body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let key: Key = (def.key(), ns.to_string(), name.clone());
    let mut store = lock(shared);
    if store.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", def.plural),
            Some(json!({"name": name, "group": def.group, "kind": def.plural})),
        );
    }
    if value["metadata"]
        .get("resourceVersion")
        .is_some_and(|v| !v.is_null())
    {
        return status(
            400,
            "BadRequest",
            "resourceVersion should not be set on objects to be created".into(),
            None,
        );
    }
    store.uid += 1;
    value["metadata"]["uid"] = Value::String(format!("00000000-0000-0000-0000-{:012}", store.uid));
    value["metadata"]["creationTimestamp"] = Value::String(now_rfc3339());
    let value = store_version(shared, &mut store, key, value, ns, true);
    json_response(StatusCode::CREATED, &value)
}

/// PUT: replaces the object. A resourceVersion in the body is a precondition: another one
/// than the stored object's is answered 409 Conflict, as the API server does.
fn replace(shared: &Arc<Shared>, def: &ResDef, ns: &str, name: &str, body: &[u8]) -> Response {
    let mut value = match object_body(def, ns, Some(name), body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let key: Key = (def.key(), ns.to_string(), name.to_string());
    let mut store = lock(shared);
    let Some(existing) = store.objects.get(&key).map(|o| o.value.clone()) else {
        return not_found(def, name);
    };
    if let Some(expected) = value["metadata"]["resourceVersion"].as_str() {
        if Some(expected) != existing["metadata"]["resourceVersion"].as_str() {
            return status(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", def.plural),
                Some(json!({"name": name, "group": def.group, "kind": def.plural})),
            );
        }
    }
    for field in ["uid", "creationTimestamp"] {
        value["metadata"][field] = existing["metadata"][field].clone();
    }
    let value = store_version(shared, &mut store, key, value, ns, false);
    json_response(StatusCode::OK, &value)
}
