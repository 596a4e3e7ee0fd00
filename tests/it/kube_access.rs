//! Who may reach what through the Kubernetes channel, end to end (hub, agent over QUIC, the
//! fake API server, the real `rna kube` binary): Secret contents only for `exec:infra:op`, the
//! agent's own Secrets and ServiceAccount tokens never, audit lines that mark Secret access;
//! waits bounded per token at the hub and per agent, so reads cannot block applies; and the
//! CLI's apply errors and wait output.

use std::time::Duration;

use crate::common::*;
use crate::fake_kube::FakeKube;
use bytes::Bytes;
use rna::admin_client::{ApiClient, ApiResponse};
use rna::agent::kube::{KubeSettings, KubeSource, MAX_CONCURRENT_WAITS};
use rna::auth::Scope;
use serde_json::{json, Value};

const TENANT: &str = "acme/prod";
const AGENT: &str = "prod-cluster";

/// Log lines of this test process (audit lines of hub and agent are checked in them).
fn logs() -> &'static Captured {
    process_logs()
}

/// A hub, the fake API, and an agent in cluster mode whose own namespace (its kubeconfig
/// context's, as a pod's would be its ServiceAccount's) is `own_namespace`.
struct Cluster {
    world: World,
    fake: FakeKube,
    agent: TestAgent,
    /// read:infra:data only.
    reader: String,
    /// read:infra:data + exec:infra:op.
    ops: String,
    /// admin, of another tenant.
    admin: String,
}

async fn cluster(own_namespace: &str, tune: impl FnOnce(&mut rna::hub::HubConfig)) -> Cluster {
    logs();
    let world = World::start_with(tune).await;
    let fake = FakeKube::start().await;
    let agent_token = world.agent_token(TENANT);
    let mut config = world.agent_config(AGENT, &agent_token);
    let path = fake.kubeconfig(world.dir.path(), "kubeconfig", None);
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("namespace: default", &format!("namespace: {own_namespace}"));
    std::fs::write(&path, text).unwrap();
    let mut settings = KubeSettings::new(KubeSource::Kubeconfig {
        path,
        context: None,
    });
    settings.inventory_interval = Duration::from_secs(3600);
    config.kube = Some(settings);
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, AGENT, 1).await;
    wait_inventory(&world, TENANT, AGENT).await;
    let reader = world.token(TENANT, &[Scope::ReadInfraData]);
    let ops = world.token(TENANT, &[Scope::ReadInfraData, Scope::ExecInfraOp]);
    let admin = world.token("ops/all", &[Scope::Admin]);
    Cluster {
        world,
        fake,
        agent,
        reader,
        ops,
        admin,
    }
}

async fn apply(api: &ApiClient, yaml: &str) -> ApiResponse {
    let path = format!("/api/v1/agents/{AGENT}/kube/apply");
    within(
        "apply",
        api.request(
            http::Method::POST,
            &path,
            Some(("application/yaml", Bytes::from(yaml.to_string()))),
        ),
    )
    .await
    .unwrap()
}

/// A wait on `AGENT` through the API: status and its NDJSON lines (or the error body).
async fn wait(api: &ApiClient, body: Value) -> (u16, Vec<Value>) {
    kube_wait_lines(api, AGENT, body).await
}

/// `rna kube --api … --token-file … --agent prod-cluster ARGS`: exit code, stdout, stderr.
async fn cli(world: &World, token: &str, args: &[&str]) -> (i32, String, String) {
    world_kube_cli(world, token, AGENT, args, false).await
}

const DB_PASSWORD: &str = "czNjcjN0"; // base64 of "s3cr3t"
const AGENT_TOKEN_DATA: &str = "cm5hX2FnZW50X3Rva2Vu"; // base64 of "rna_agent_token"

/// Seeds the Secrets of the test: an application Secret with a client-side-apply annotation,
/// the agent's own Secrets (in its namespace, `rna-system`), a Secret of the same name
/// elsewhere, and a ServiceAccount token.
fn seed_secrets(fake: &FakeKube) {
    fake.seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    fake.seed(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "db-password", "namespace": "shop", "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration":
                format!("{{\"data\":{{\"password\":\"{DB_PASSWORD}\"}}}}"),
            "team": "payments"}},
        "data": {"password": DB_PASSWORD}}),
    );
    fake.seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "rna-system"}}));
    fake.seed(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "rna-agent-token", "namespace": "rna-system"},
        "data": {"token": AGENT_TOKEN_DATA}}),
    );
    fake.seed(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "rna-agent-tls", "namespace": "rna-system"},
        "data": {"tls.key": "a2V5"}}),
    );
    // A Secret of the same name in another namespace is not the agent's.
    fake.seed(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "rna-agent-token", "namespace": "shop"},
        "data": {"token": "b3RoZXI="}}),
    );
    fake.seed(json!({"apiVersion": "v1", "kind": "Secret",
        "type": "kubernetes.io/service-account-token",
        "metadata": {"name": "builder-token", "namespace": "shop",
            "annotations": {"kubernetes.io/service-account.name": "builder"}},
        "data": {"token": "c2EtdG9rZW4="}}));
}

fn assert_forbidden_secret(r: &ApiResponse, what: &str) {
    assert_eq!(
        r.status,
        403,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    let body = r.json();
    assert_eq!(body["reason"], "Forbidden", "{what}: {body}");
    assert_eq!(body["status"]["kind"], "Status", "{what}: {body}");
    assert_eq!(body["status"]["code"], 403, "{what}: {body}");
    assert!(
        !r.body.windows(8).any(|w| w == b"cm5hX2Fn"),
        "{what}: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_contents_need_exec_and_the_agents_own_secrets_are_refused_to_every_scope() {
    let c = cluster("rna-system", |_| {}).await;
    seed_secrets(&c.fake);
    let base = format!("/api/v1/agents/{AGENT}/kube");
    let db = format!("{base}/v1/Secret/db-password?namespace=shop");
    let own = format!("{base}/v1/Secret/rna-agent-token?namespace=rna-system");
    let sa_token = format!("{base}/v1/Secret/builder-token?namespace=shop");

    // Read-only: metadata only, for get and list; the annotation that copies the data too.
    let reader = client(&c.world, &c.reader);
    let r = get(&reader, &db).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let object = r.json();
    assert_eq!(object["metadata"]["name"], "db-password");
    assert_eq!(object["metadata"]["annotations"]["team"], "payments");
    assert!(object.get("data").is_none(), "{object}");
    assert!(object.get("stringData").is_none(), "{object}");
    assert!(
        !r.body.windows(8).any(|w| w == DB_PASSWORD.as_bytes()),
        "{object}"
    );
    let r = get(&reader, &format!("{base}/v1/secrets?namespace=shop")).await;
    assert_eq!(r.status, 200);
    let list = r.json();
    let mut names = Vec::new();
    for item in list["items"].as_array().unwrap() {
        assert!(item.get("data").is_none(), "{item}");
        names.push(item["metadata"]["name"].as_str().unwrap().to_string());
    }
    // A ServiceAccount token is never listed, whatever the scope; a Secret that only shares
    // a name with the agent's is.
    assert_eq!(names, ["db-password", "rna-agent-token"]);
    assert!(!r.body.windows(8).any(|w| w == DB_PASSWORD.as_bytes()));
    // Other kinds are untouched for a reader.
    let r = get(&reader, &format!("{base}/v1/Namespace/shop")).await;
    assert_eq!(r.status, 200);

    // The agent's own Secret and a ServiceAccount token: refused to every scope, for every
    // verb, with a Kubernetes Status.
    let ops = client(&c.world, &c.ops);
    let admin = client(&c.world, &c.admin);
    for (who, api) in [("reader", &reader), ("ops", &ops), ("admin", &admin)] {
        assert_forbidden_secret(&get(api, &own).await, &format!("{who} get own"));
        let tls = format!("{base}/v1/Secret/rna-agent-tls?namespace=rna-system");
        assert_forbidden_secret(&get(api, &tls).await, &format!("{who} get own key"));
        assert_forbidden_secret(&get(api, &sa_token).await, &format!("{who} get sa token"));
        let r = get(api, &format!("{base}/v1/secrets?namespace=rna-system")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["items"], json!([]), "{who}: own Secret listed");
        let (status, body) = wait(
            api,
            json!({"apiVersion": "v1", "kind": "Secret", "namespace": "rna-system",
                   "name": "rna-agent-token", "for": "condition=Ready", "timeout": "5s"}),
        )
        .await;
        assert_eq!(status, 403, "{who} wait own: {body:?}");
        assert_eq!(body[0]["reason"], "Forbidden");
    }
    let r = get(&reader, &format!("{base}/v1/secrets")).await;
    assert_eq!(r.status, 200);
    let listed: Vec<String> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["metadata"]["namespace"].as_str().unwrap(),
                i["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(listed, ["shop/db-password", "shop/rna-agent-token"]);
    for (who, api) in [("ops", &ops), ("admin", &admin)] {
        assert_forbidden_secret(&delete(api, &own).await, &format!("{who} delete own"));
        let r = apply(
            api,
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: rna-agent-token\n  namespace: rna-system\nstringData:\n  token: attacker\n",
        )
        .await;
        assert_forbidden_secret(&r, &format!("{who} apply own"));
        // Minting a ServiceAccount token through the agent is refused too.
        let r = apply(
            api,
            "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/service-account-token\nmetadata:\n  name: mint\n  namespace: shop\n  annotations:\n    kubernetes.io/service-account.name: rna-agent\n",
        )
        .await;
        assert_forbidden_secret(&r, &format!("{who} apply sa token"));
        assert_forbidden_secret(&delete(api, &sa_token).await, &format!("{who} delete sa"));
    }
    let stored = c
        .fake
        .object("", "secrets", "rna-system", "rna-agent-token")
        .expect("the agent's Secret is still there");
    assert_eq!(stored["data"]["token"], AGENT_TOKEN_DATA);
    assert!(c.fake.object("", "secrets", "shop", "mint").is_none());
    assert!(c
        .fake
        .object("", "secrets", "shop", "builder-token")
        .is_some());

    // exec:infra:op (and admin) read other Secrets whole, and may apply them; a Secret of
    // the same name in another namespace is not the agent's.
    for (who, api) in [("ops", &ops), ("admin", &admin)] {
        let r = get(api, &db).await;
        assert_eq!(r.status, 200, "{who}");
        assert_eq!(r.json()["data"]["password"], DB_PASSWORD, "{who}");
        let r = get(
            api,
            &format!("{base}/v1/Secret/rna-agent-token?namespace=shop"),
        )
        .await;
        assert_eq!(r.status, 200, "{who}");
        assert_eq!(r.json()["data"]["token"], "b3RoZXI=", "{who}");
    }
    let r = apply(
        &ops,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: api-key\n  namespace: shop\nstringData:\n  key: k\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["results"][0]["outcome"], "created");

    // The same through the CLI, per scope.
    let (code, out, err) = cli(
        &c.world,
        &c.reader,
        &["get", "secret/db-password", "-n", "shop", "-o", "json"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["metadata"]["name"], "db-password");
    assert!(shown.get("data").is_none(), "{out}");
    for token in [&c.ops, &c.admin] {
        let (code, out, err) = cli(
            &c.world,
            token,
            &["get", "secret/db-password", "-n", "shop", "-o", "json"],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(DB_PASSWORD), "{out}");
    }
    for token in [&c.reader, &c.ops, &c.admin] {
        let (code, out, err) = cli(
            &c.world,
            token,
            &[
                "get",
                "secret/rna-agent-token",
                "-n",
                "rna-system",
                "-o",
                "json",
            ],
        )
        .await;
        assert_eq!(code, 1, "{out}{err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("Forbidden")
                && err.contains(
                    "secret rna-system/rna-agent-token holds this agent's own credentials"
                ),
            "{err}"
        );
        let (code, out, err) = cli(&c.world, token, &["list", "secrets", "-n", "rna-system"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(!out.contains("rna-agent-token"), "{out}");
    }
    for token in [&c.ops, &c.admin] {
        let (code, _, err) = cli(
            &c.world,
            token,
            &["delete", "secret/rna-agent-token", "-n", "rna-system"],
        )
        .await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("Forbidden"), "{err}");
    }
    assert!(c
        .fake
        .object("", "secrets", "rna-system", "rna-agent-token")
        .is_some());

    // Audit lines of hub (with status) and agent (without) mark Secret access, and only it.
    let text = logs().text();
    let line = |needle: &[&str]| {
        text.lines()
            .filter(|l| l.contains("kubernetes command"))
            .find(|l| needle.iter().all(|n| l.contains(n)))
            .map(str::to_string)
    };
    let hub_line = line(&["name=\"db-password\"", "status=200", "verb=\"get\""])
        .expect("hub audit line of the Secret read");
    assert!(hub_line.contains("secret=true"), "{hub_line}");
    let agent_line = text
        .lines()
        .filter(|l| l.contains("kubernetes command") && !l.contains("status="))
        .find(|l| l.contains("name=\"db-password\"") && l.contains("verb=\"get\""))
        .expect("agent audit line of the Secret read");
    assert!(agent_line.contains("secret=true"), "{agent_line}");
    let refused = line(&["name=\"rna-agent-token\"", "status=403"]).expect("refusal audited");
    assert!(refused.contains("secret=true") && refused.contains("reason=\"Forbidden\""));
    let other = line(&["name=\"shop\"", "kind=\"Namespace\"", "status=200"]).unwrap();
    assert!(other.contains("secret=false"), "{other}");
    c.agent.stop().await;
}

/// Starts a wait on the stalled Deployment and returns once the hub streams its first
/// progress line (the wait holds its slots from then on); the task runs until aborted.
async fn start_wait(api: &ApiClient, name: &str) -> tokio::task::JoinHandle<()> {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let api = api.clone();
    let body = json!({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "shop",
        "name": name, "for": "rollout", "timeout": "10m"});
    let task = tokio::spawn(async move {
        let mut first = Some(first_tx);
        let _ = api
            .stream_lines(
                http::Method::POST,
                &format!("/api/v1/agents/{AGENT}/kube/wait"),
                Some(("application/json", Bytes::from(body.to_string()))),
                |_| {
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                },
            )
            .await;
    });
    within("the wait's first progress line", first_rx)
        .await
        .expect("the wait streams progress");
    task
}

const STUCK: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: stuck\n  namespace: shop\n  annotations: {fake.rna.dev/stall-rollout: \"true\"}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: stuck}}\n  template:\n    metadata: {labels: {app: stuck}}\n    spec: {containers: [{name: c, image: x}]}\n";

const CONFIG: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: shop\ndata:\n  a: \"1\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_fills_only_its_own_wait_allowance_and_applies_still_run() {
    let c = cluster("default", |h| h.caps.kube_waits_per_token = 3).await;
    let ops = client(&c.world, &c.ops);
    let r = apply(
        &ops,
        &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n{STUCK}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let reader = client(&c.world, &c.reader);
    let mut waits = Vec::new();
    for _ in 0..3 {
        waits.push(start_wait(&reader, "stuck").await);
    }
    // One more from the same token: 429 at once, counted under its own cap.
    let started = std::time::Instant::now();
    let (status, body) = wait(
        &reader,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "shop",
               "name": "stuck", "for": "rollout", "timeout": "10m"}),
    )
    .await;
    assert_eq!(status, 429, "{body:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(body[0]["reason"], "TooManyWaits");
    let message = body[0]["error"].as_str().unwrap();
    assert!(
        message.contains("already runs 3 Kubernetes waits (max_kube_waits_per_token)"),
        "{message}"
    );
    assert_eq!(
        c.world.hub.metrics().cap_refusals("kube_waits_per_token"),
        1
    );

    // Another token still waits; an exec token still applies and reads.
    let other = client(&c.world, &c.world.token(TENANT, &[Scope::ReadInfraData]));
    waits.push(start_wait(&other, "stuck").await);
    let r = apply(&ops, CONFIG).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["results"][0]["outcome"], "created");

    // A wait that ends frees its slot: the token may wait again.
    waits.remove(0).abort();
    eventually_async("a freed wait slot", async || {
        let (status, _) = wait(
            &reader,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "namespace": "shop",
                   "name": "app", "for": "condition=Never", "timeout": "1s"}),
        )
        .await;
        status != 429
    })
    .await;
    for w in waits {
        w.abort();
    }
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_never_take_the_agents_last_command_slots() {
    let c = cluster("default", |h| h.caps.kube_waits_per_token = 1000).await;
    let ops = client(&c.world, &c.ops);
    let r = apply(
        &ops,
        &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n{STUCK}"),
    )
    .await;
    assert_eq!(r.status, 200);
    let reader = client(&c.world, &c.reader);
    let mut waits = Vec::new();
    for _ in 0..MAX_CONCURRENT_WAITS {
        waits.push(start_wait(&reader, "stuck").await);
    }
    let (status, body) = wait(
        &reader,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "shop",
               "name": "stuck", "for": "rollout", "timeout": "10m"}),
    )
    .await;
    assert_eq!(status, 429, "{body:?}");
    assert_eq!(body[0]["reason"], "TooManyWaits");
    assert!(
        body[0]["error"]
            .as_str()
            .unwrap()
            .contains(&format!("already runs {MAX_CONCURRENT_WAITS} waits")),
        "{body:?}"
    );
    assert_eq!(c.world.hub.metrics().cap_refusals("kube_agent_waits"), 1);
    let started = std::time::Instant::now();
    let r = apply(&ops, CONFIG).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = get(
        &ops,
        &format!("/api/v1/agents/{AGENT}/kube/v1/ConfigMap/app?namespace=shop"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() < Duration::from_secs(20));
    // A caller that goes away frees the agent's slot although its wait reports nothing more.
    waits.remove(0).abort();
    eventually_async("a freed agent wait slot", async || {
        let (status, _) = wait(
            &reader,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "namespace": "shop",
                   "name": "app", "for": "condition=Never", "timeout": "1s"}),
        )
        .await;
        status != 429
    })
    .await;
    for w in waits {
        w.abort();
    }
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_names_the_bad_file_and_line_and_prints_the_end_of_a_wait_once() {
    let c = cluster("default", |_| {}).await;
    let dir = c.world.dir.path();
    let good = dir.join("good.yaml");
    std::fs::write(&good, CONFIG.replace("shop", "default")).unwrap();
    // Line 5 holds the error: a mapping value where none may be.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: broken\n  labels: a: b\n",
    )
    .unwrap();
    let (good, bad) = (good.display().to_string(), bad.display().to_string());
    let (code, out, err) = cli(&c.world, &c.ops, &["apply", "-f", &good, "-f", &bad]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    // The first line says where, exactly; the parser's snippet below it names the file too.
    assert_eq!(
        err.lines().next(),
        Some(
            format!(
                "rna kube: {bad}: invalid YAML: error: line 5 column 12: mapping values are not \
                 allowed in this context"
            )
            .as_str()
        ),
        "{err}"
    );
    assert!(err.contains(&format!("--> {bad}:5:12")), "{err}");
    assert!(!err.contains("<input>"), "{err}");
    // Nothing was sent: the good file's object was not applied either.
    assert!(c.fake.object("", "configmaps", "default", "app").is_none());

    // A document without kind names its file and its place in that file.
    let nokind = dir.join("nokind.yaml");
    std::fs::write(
        &nokind,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\n",
    )
    .unwrap();
    let nokind = nokind.display().to_string();
    let (code, _, err) = cli(&c.world, &c.ops, &["apply", "-f", &good, "-f", &nokind]).await;
    assert_eq!(code, 2);
    assert_eq!(err, format!("rna kube: {nokind}: document 2: no kind\n"));

    // Several good files are applied together, in order.
    let (code, out, err) = cli(&c.world, &c.ops, &["apply", "-f", &good]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "configmap/app created\n");

    // wait prints what is missing while it is missing, and the outcome once.
    let deploy = dir.join("web.yaml");
    std::fs::write(
        &deploy,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: default\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: x}]}\n",
    )
    .unwrap();
    let (code, _, err) = cli(
        &c.world,
        &c.ops,
        &["apply", "-f", &deploy.display().to_string()],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(
        &c.world,
        &c.ops,
        &[
            "wait",
            "deployment/web",
            "--for",
            "rollout",
            "--timeout",
            "30s",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let done = "deployment \"web\" successfully rolled out";
    assert_eq!(out.lines().last(), Some(done), "{out}");
    assert_eq!(out.lines().filter(|l| *l == done).count(), 1, "{out}");
    // The API's own stream says it once too: as the answer, not also as progress.
    let (_, lines) = wait(
        &client(&c.world, &c.ops),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "default",
               "name": "web", "for": "rollout", "timeout": "30s"}),
    )
    .await;
    let said: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["message"].as_str())
        .filter(|m| *m == done)
        .collect();
    assert_eq!(said, [done], "{lines:?}");
    assert_eq!(lines.last().unwrap()["type"], "done");
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_role_that_cannot_read_secrets_apply_still_writes_them() {
    let c = cluster("rna-system", |_| {}).await;
    c.fake.forbid_reads("secrets");
    let ops = client(&c.world, &c.ops);
    let secret = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: api-key\n  namespace: shop\nstringData:\n  key: k1\n";
    // Server-side apply needs no read: the Secret is written, its outcome unknown.
    let r = apply(&ops, secret).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["results"][1]["outcome"], "applied", "{}", r.json());
    let stored = c.fake.object("", "secrets", "shop", "api-key").unwrap();
    assert_eq!(stored["metadata"]["name"], "api-key");
    let r = apply(&ops, &secret.replace("k1", "k2")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["results"][1]["outcome"], "applied");
    // Reading is RBAC's refusal, relayed with its own Status.
    let r = get(
        &ops,
        &format!("/api/v1/agents/{AGENT}/kube/v1/Secret/api-key?namespace=shop"),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["kind"], "api");
    assert_eq!(r.json()["status"]["reason"], "Forbidden");
    // The agent's own Secrets are refused before any call, so never written either.
    let r = apply(
        &ops,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: rna-agent-tls\n  namespace: rna-system\nstringData:\n  a: b\n",
    )
    .await;
    assert_forbidden_secret(&r, "apply own key without read access");
    assert!(c
        .fake
        .object("", "secrets", "rna-system", "rna-agent-tls")
        .is_none());
    c.agent.stop().await;
}

#[test]
fn the_shipped_role_cannot_read_secrets_and_the_agent_protects_the_secrets_it_mounts() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
    use rna::agent::kube::guard::DEFAULT_PROTECTED_SECRETS;

    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/agent.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect();
    let of = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap().clone();
    let role: ClusterRole = serde_json::from_value(of("ClusterRole")).unwrap();
    let mut secret_verbs = Vec::new();
    for rule in role.rules.unwrap() {
        let core = rule
            .api_groups
            .unwrap_or_default()
            .iter()
            .any(|g| g.is_empty());
        if core
            && rule
                .resources
                .unwrap_or_default()
                .iter()
                .any(|r| r == "secrets")
        {
            secret_verbs.extend(rule.verbs);
        }
    }
    secret_verbs.sort();
    // Server-side apply needs create and patch; nothing reads.
    assert_eq!(secret_verbs, ["create", "delete", "patch"]);

    // The pod enrolls with a join token from a Secret the agent protects by default, in its
    // own namespace, and keeps what enrollment gives it in an in-memory emptyDir: no Secret
    // is mounted, nothing is written to the node's disk.
    let deployment: Deployment = serde_json::from_value(of("Deployment")).unwrap();
    assert_eq!(deployment.metadata.namespace.as_deref(), Some("rna-system"));
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let volumes = pod.volumes.unwrap();
    assert!(volumes.iter().all(|v| v.secret.is_none()), "{volumes:?}");
    let container = &pod.containers[0];
    let join = container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "RNA_JOIN")
        .expect("RNA_JOIN from a Secret");
    let secret = join
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .unwrap();
    assert!(
        DEFAULT_PROTECTED_SECRETS.contains(&secret.name.as_str()),
        "{}",
        secret.name
    );
    let args = container.args.as_ref().unwrap();
    let state = args
        .iter()
        .find_map(|a| a.strip_prefix("--state-dir="))
        .expect("--state-dir");
    for manual in ["--cert", "--key", "--ca", "--token-file", "--join"] {
        assert!(
            !args.iter().any(|a| a.starts_with(manual)),
            "{manual} in {args:?}"
        );
    }
    let mount = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == state)
        .expect("the state folder is mounted");
    let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
    let empty = volume.empty_dir.as_ref().expect("an emptyDir");
    assert_eq!(empty.medium.as_deref(), Some("Memory"));

    // The commented per-namespace widening is a valid Role and RoleBinding for the agent.
    let start = text
        .find("  #   apiVersion: rbac.authorization.k8s.io/v1")
        .unwrap();
    let example: String = text[start..]
        .lines()
        .take_while(|l| l.starts_with("  #   "))
        .map(|l| format!("{}\n", &l[6..]))
        .collect();
    let parts: Vec<Value> = serde_saphyr::from_multiple::<Value>(&example).unwrap();
    assert_eq!(parts.len(), 2, "{example}");
    let role: Role = serde_json::from_value(parts[0].clone()).unwrap();
    let rule = &role.rules.unwrap()[0];
    assert_eq!(
        rule.resources.as_deref(),
        Some(&["secrets".to_string()][..])
    );
    assert!(rule.verbs.contains(&"get".to_string()));
    let binding: RoleBinding = serde_json::from_value(parts[1].clone()).unwrap();
    assert_eq!(binding.metadata.namespace, role.metadata.namespace);
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("rna-agent", Some("rna-system"))
    );
}

/// `rna ROLE --config FILE ARGS --check-config` with `env` only: success and all output.
fn check_config(
    role: &str,
    file: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String) {
    let mut rna = Rna::new([role, "--config"]).arg(file);
    for a in args {
        rna = rna.arg(a);
    }
    let out = rna
        .arg("--check-config")
        .env_remove("RNA_LOG_FORMAT")
        .envs(env)
        .run();
    (out.status.success(), out.stdout + &out.stderr)
}

/// The printed configuration without whitespace, so its pretty layout does not matter.
fn compact(text: &str) -> String {
    text.split_whitespace().collect()
}

#[test]
fn protected_secrets_and_the_wait_cap_come_from_flags_environment_and_file() {
    let dir = tempfile::tempdir().unwrap();
    rna::certs::init_dir(dir.path(), &["127.0.0.1".to_string()], false).unwrap();
    rna::certs::issue_agent_files(dir.path(), "edge", false).unwrap();
    std::fs::write(dir.path().join("token.txt"), "rna_x\n").unwrap();
    std::fs::write(dir.path().join("tokens.toml"), "").unwrap();
    std::fs::write(
        dir.path().join("kubeconfig"),
        "apiVersion: v1\nkind: Config\n",
    )
    .unwrap();
    let agent = dir.path().join("agent.toml");
    let base = "hub = [\"127.0.0.1:4433\"]\nname = \"edge\"\nca = \"ca.pem\"\ncert = \"agent-edge.pem\"\nkey = \"agent-edge-key.pem\"\ntoken_file = \"token.txt\"\nkubeconfig = \"kubeconfig\"\n";
    std::fs::write(&agent, base).unwrap();
    let (ok, text) = check_config("agent", &agent, &[], &[]);
    assert!(ok, "{text}");
    assert!(
        compact(&text).contains("kube_protected_secret=[\"rna-agent-tls\",\"rna-agent-token\"]"),
        "{text}"
    );
    std::fs::write(
        &agent,
        format!("{base}kube_protected_secret = [\"vault/agent-key\", \"hub-token\"]\n"),
    )
    .unwrap();
    let (ok, text) = check_config("agent", &agent, &[], &[]);
    assert!(ok, "{text}");
    assert!(
        compact(&text).contains("kube_protected_secret=[\"vault/agent-key\",\"hub-token\"]"),
        "{text}"
    );
    // The environment and a flag win over the file.
    let (ok, text) = check_config(
        "agent",
        &agent,
        &[],
        &[("RNA_KUBE_PROTECTED_SECRET", "a,b")],
    );
    assert!(
        ok && compact(&text).contains("kube_protected_secret=[\"a\",\"b\"]"),
        "{text}"
    );
    let (ok, text) = check_config("agent", &agent, &["--kube-protected-secret", "x/y"], &[]);
    assert!(
        ok && compact(&text).contains("kube_protected_secret=[\"x/y\"]"),
        "{text}"
    );
    // A bad entry names its key and place.
    std::fs::write(
        &agent,
        format!("{base}kube_protected_secret = [\"ok\", \"Bad/Name\"]\n"),
    )
    .unwrap();
    let (ok, text) = check_config("agent", &agent, &[], &[]);
    assert!(
        !ok && text.contains("kube_protected_secret[1]")
            && text.contains("invalid Secret \"Bad/Name\""),
        "{text}"
    );

    let hub = dir.path().join("hub.toml");
    let base =
        "ca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub-key.pem\"\ntokens = \"tokens.toml\"\n";
    std::fs::write(&hub, base).unwrap();
    let (ok, text) = check_config("hub", &hub, &[], &[]);
    assert!(
        ok && compact(&text).contains("max_kube_waits_per_token=8"),
        "{text}"
    );
    std::fs::write(&hub, format!("{base}max_kube_waits_per_token = 3\n")).unwrap();
    let (ok, text) = check_config("hub", &hub, &[], &[]);
    assert!(
        ok && compact(&text).contains("max_kube_waits_per_token=3"),
        "{text}"
    );
    let (ok, text) = check_config("hub", &hub, &[], &[("RNA_MAX_KUBE_WAITS_PER_TOKEN", "5")]);
    assert!(
        ok && compact(&text).contains("max_kube_waits_per_token=5"),
        "{text}"
    );
    let (ok, text) = check_config("hub", &hub, &["--max-kube-waits-per-token", "0"], &[]);
    assert!(
        !ok && text.contains("max_kube_waits_per_token") && text.contains("must be at least 1"),
        "{text}"
    );
}
