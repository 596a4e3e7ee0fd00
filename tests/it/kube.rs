//! Cluster mode end to end: the hub's admin API and the `rna kube` binary drive a Kubernetes
//! API (an HTTP-level fake in this process, reached by kube-rs through a kubeconfig, exactly
//! as a real cluster) through a real agent over QUIC. Also: scopes and tenants, an agent
//! without cluster mode (409) or offline (503), the agent's allow list, audit lines, kubectl
//! through the hub's SOCKS5 front, and the shipped manifests.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use crate::fake_kube::FakeKube;
use bytes::Bytes;
use rna::admin_client::{ApiClient, ApiResponse};
use rna::agent::kube::{KubeAllow, KubeSettings, KubeSource};
use rna::auth::Scope;
use serde_json::{json, Value};

const TENANT: &str = "acme/prod";
const AGENT: &str = "prod-cluster";

/// Log lines of this test process (audit lines are checked in them).
fn logs() -> &'static Captured {
    process_logs()
}

fn log_text() -> String {
    logs().text()
}

/// A hub, the fake API, and an agent in cluster mode named `prod-cluster`.
struct Cluster {
    world: World,
    fake: FakeKube,
    agent: TestAgent,
    agent_token: String,
    /// read:infra:data + exec:infra:op in the agent's tenant.
    ops: String,
    api: ApiClient,
}

fn kube_settings(fake: &FakeKube, dir: &std::path::Path) -> KubeSettings {
    let path = fake.kubeconfig(dir, "kubeconfig", None);
    let mut settings = KubeSettings::new(KubeSource::Kubeconfig {
        path,
        context: None,
    });
    settings.inventory_interval = Duration::from_secs(3600);
    settings
}

async fn cluster() -> Cluster {
    cluster_with(KubeAllow::default()).await
}

async fn cluster_with(allow: KubeAllow) -> Cluster {
    cluster_tuned(allow, |_| {}).await
}

async fn cluster_tuned(allow: KubeAllow, tune: impl FnOnce(&mut rna::hub::HubConfig)) -> Cluster {
    logs();
    let world = World::start_with(tune).await;
    let fake = FakeKube::start().await;
    let agent_token = world.agent_token(TENANT);
    let mut config = world.agent_config(AGENT, &agent_token);
    let mut settings = kube_settings(&fake, world.dir.path());
    settings.allow = allow;
    config.kube = Some(settings);
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, AGENT, 1).await;
    wait_inventory(&world, TENANT, AGENT).await;
    let ops = world.token(TENANT, &[Scope::ReadInfraData, Scope::ExecInfraOp]);
    let api = client(&world, &ops);
    Cluster {
        world,
        fake,
        agent,
        agent_token,
        ops,
        api,
    }
}

async fn apply(api: &ApiClient, query: &str, yaml: &str) -> ApiResponse {
    let path = format!("/api/v1/agents/{AGENT}/kube/apply{query}");
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

/// Outcomes of an apply answer, as `Kind/name=outcome`.
fn outcomes(r: &ApiResponse) -> Vec<String> {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            format!(
                "{}/{}={}",
                x["kind"].as_str().unwrap(),
                x["name"].as_str().unwrap(),
                x["outcome"].as_str().unwrap()
            )
        })
        .collect()
}

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: app-config
  namespace: shop
  labels:
    app: web
data:
  color: red
  password: s3cr3t-value
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels:
    app: web
spec:
  replicas: 3
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginx:1.27
---
apiVersion: example.com/v1
kind: Widget
metadata:
  name: blue-widget
  namespace: shop
spec:
  size: 3
"#;

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    run_rna_kube(&args, false)
}

async fn cli(world: &World, token: &str, agent: &str, args: &[&str]) -> (i32, String, String) {
    world_kube_cli(world, token, agent, args, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_then_is_unchanged_then_changed_and_conflicts_are_relayed() {
    let c = cluster().await;
    let first = apply(&c.api, "", APP).await;
    assert_eq!(
        outcomes(&first),
        [
            "Namespace/shop=created",
            "ConfigMap/app-config=created",
            "Deployment/web=created",
            "Widget/blue-widget=created"
        ]
    );
    for r in first.json()["results"].as_array().unwrap() {
        assert!(!r["resourceVersion"].as_str().unwrap().is_empty(), "{r}");
    }
    // Server-side apply with field manager rna, over real HTTP.
    let cm = c
        .fake
        .object("", "configmaps", "shop", "app-config")
        .unwrap();
    assert_eq!(cm["data"]["color"], "red");
    assert_eq!(cm["metadata"]["managedFields"][0]["manager"], "rna");
    assert!(c.fake.requests().iter().any(|r| r
        .starts_with("PATCH /api/v1/namespaces/shop/configmaps/app-config?")
        && r.contains("fieldManager=rna")));
    assert!(c
        .fake
        .object("example.com", "widgets", "shop", "blue-widget")
        .is_some());

    // Applied again: nothing changes, resourceVersions stay.
    let again = apply(&c.api, "", APP).await;
    assert_eq!(
        outcomes(&again),
        [
            "Namespace/shop=unchanged",
            "ConfigMap/app-config=unchanged",
            "Deployment/web=unchanged",
            "Widget/blue-widget=unchanged"
        ]
    );
    let rv = |r: &ApiResponse, i: usize| r.json()["results"][i]["resourceVersion"].clone();
    assert_eq!(rv(&first, 1), rv(&again, 1));

    // A changed field.
    let changed = APP.replace("color: red", "color: green");
    let third = apply(&c.api, "", &changed).await;
    assert_eq!(
        outcomes(&third),
        [
            "Namespace/shop=unchanged",
            "ConfigMap/app-config=changed",
            "Deployment/web=unchanged",
            "Widget/blue-widget=unchanged"
        ]
    );
    assert_eq!(
        c.fake
            .object("", "configmaps", "shop", "app-config")
            .unwrap()["data"]["color"],
        "green"
    );

    // Dry run: reported, not stored.
    let dry = apply(
        &c.api,
        "?dryRun=true",
        &APP.replace("color: red", "color: pink"),
    )
    .await;
    assert_eq!(outcomes(&dry)[1], "ConfigMap/app-config=changed");
    assert_eq!(dry.json()["dryRun"], true);
    assert_eq!(
        c.fake
            .object("", "configmaps", "shop", "app-config")
            .unwrap()["data"]["color"],
        "green"
    );

    // Another manager owns the field: 409 with the Kubernetes Status, unless force.
    c.fake.apply_as(
        "kubectl",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "app-config", "namespace": "shop"},
               "data": {"color": "blue"}}),
    );
    let conflict = apply(&c.api, "", &changed).await;
    assert_eq!(
        conflict.status,
        409,
        "{}",
        String::from_utf8_lossy(&conflict.body)
    );
    let body = conflict.json();
    assert_eq!(body["reason"], "Conflict");
    assert_eq!(body["status"]["code"], 409);
    assert_eq!(body["status"]["kind"], "Status");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.starts_with("Apply failed with 1 conflict: conflict with \"kubectl\""),
        "{message}"
    );
    assert!(message.ends_with(".data.color"), "{message}");
    // What was applied before the refusal is reported.
    assert_eq!(body["applied"][0]["kind"], "Namespace");
    assert_eq!(body["failedIndex"], 1);

    let forced = apply(&c.api, "?force=true", &changed).await;
    assert_eq!(outcomes(&forced)[1], "ConfigMap/app-config=changed");
    assert_eq!(
        c.fake
            .object("", "configmaps", "shop", "app-config")
            .unwrap()["data"]["color"],
        "green"
    );

    // A new CRD, then its custom resource in the next request: discovery is read again on
    // the miss, with no restart.
    let gadgets = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {kind: Gadget, plural: gadgets, singular: gadget}
  versions: [{name: v1, served: true, storage: true}]
"#;
    assert_eq!(
        outcomes(&apply(&c.api, "", gadgets).await),
        ["CustomResourceDefinition/gadgets.example.com=created"]
    );
    let gadget = "apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g1, namespace: shop}\nspec: {x: 1}\n";
    assert_eq!(
        outcomes(&apply(&c.api, "", gadget).await),
        ["Gadget/g1=created"]
    );

    // Malformed bodies never reach the agent.
    let bad = apply(&c.api, "", "kind: [oops\n").await;
    assert_eq!(bad.status, 400);
    let no_kind = apply(&c.api, "", "apiVersion: v1\nmetadata: {name: x}\n").await;
    assert_eq!(no_kind.status, 400);
    // A namespaced object in a namespace that does not exist: the API's own 404.
    let missing_ns = apply(
        &c.api,
        "",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: nowhere}\n",
    )
    .await;
    assert_eq!(missing_ns.status, 404);
    assert_eq!(missing_ns.json()["reason"], "NotFound");
    assert_eq!(
        missing_ns.json()["error"],
        "namespaces \"nowhere\" not found"
    );
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_list_delete_through_the_hub() {
    let c = cluster().await;
    outcomes(&apply(&c.api, "", APP).await);
    let extra = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other, namespace: shop, labels: {app: db}}\ndata: {a: b}\n";
    outcomes(&apply(&c.api, "", extra).await);

    let base = format!("/api/v1/agents/{AGENT}/kube");
    let d = get(
        &c.api,
        &format!("{base}/apps/v1/Deployment/web?namespace=shop"),
    )
    .await;
    assert_eq!(d.status, 200);
    let d = d.json();
    assert_eq!(
        (
            d["apiVersion"].as_str(),
            d["kind"].as_str(),
            d["metadata"]["name"].as_str()
        ),
        (Some("apps/v1"), Some("Deployment"), Some("web"))
    );
    // Plural and short names resolve through discovery too.
    let by_plural = get(&c.api, &format!("{base}/apps/v1/deploy/web?namespace=shop")).await;
    assert_eq!(by_plural.json()["metadata"]["uid"], d["metadata"]["uid"]);

    let names = |r: &ApiResponse| -> Vec<String> {
        r.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let all = get(&c.api, &format!("{base}/v1/ConfigMap?namespace=shop")).await;
    assert_eq!(all.json()["kind"], "ConfigMapList");
    assert_eq!(names(&all), ["app-config", "other"]);
    let web = get(
        &c.api,
        &format!("{base}/v1/ConfigMap?namespace=shop&labelSelector=app%3Dweb"),
    )
    .await;
    assert_eq!(names(&web), ["app-config"]);
    let by_field = get(
        &c.api,
        &format!("{base}/v1/ConfigMap?namespace=shop&fieldSelector=metadata.name%3Dother"),
    )
    .await;
    assert_eq!(names(&by_field), ["other"]);
    let page = get(
        &c.api,
        &format!("{base}/v1/ConfigMap?namespace=shop&limit=1"),
    )
    .await;
    assert_eq!(names(&page), ["app-config"]);
    let next = page.json()["metadata"]["continue"]
        .as_str()
        .unwrap()
        .to_string();
    let page2 = get(
        &c.api,
        &format!("{base}/v1/ConfigMap?namespace=shop&limit=1&continue={next}"),
    )
    .await;
    assert_eq!(names(&page2), ["other"]);
    // Cluster-scoped, all namespaces.
    let ns = get(&c.api, &format!("{base}/v1/Namespace")).await;
    assert_eq!(names(&ns), ["default", "kube-system", "shop"]);
    let crs = get(&c.api, &format!("{base}/example.com/v1/Widget")).await;
    assert_eq!(names(&crs), ["blue-widget"]);

    // Kubernetes errors keep their Status.
    let missing = get(&c.api, &format!("{base}/v1/ConfigMap/nope?namespace=shop")).await;
    assert_eq!(missing.status, 404);
    let m = missing.json();
    assert_eq!(m["reason"], "NotFound");
    assert_eq!(m["error"], "configmaps \"nope\" not found");
    assert_eq!(m["status"]["details"]["name"], "nope");
    let bad_selector = get(
        &c.api,
        &format!("{base}/v1/ConfigMap?fieldSelector=spec.x%3D1"),
    )
    .await;
    assert_eq!(bad_selector.status, 400);
    let unknown_kind = get(&c.api, &format!("{base}/v1/Gizmo")).await;
    assert_eq!(unknown_kind.status, 404);
    assert_eq!(unknown_kind.json()["kind"], "bad_request");
    let bad_path = get(&c.api, &format!("{base}/apps/v1")).await;
    assert_eq!(bad_path.status, 400);

    // Delete, then it is gone.
    let del = delete(&c.api, &format!("{base}/v1/ConfigMap/other?namespace=shop")).await;
    assert_eq!(del.status, 200, "{}", String::from_utf8_lossy(&del.body));
    assert_eq!(del.json()["state"], "deleted");
    assert!(c.fake.object("", "configmaps", "shop", "other").is_none());
    let again = delete(&c.api, &format!("{base}/v1/ConfigMap/other?namespace=shop")).await;
    assert_eq!(again.status, 404);
    // Foreground propagation: the API holds the object while its dependents go.
    let fg = delete(
        &c.api,
        &format!("{base}/apps/v1/Deployment/web?namespace=shop&propagationPolicy=Foreground"),
    )
    .await;
    assert_eq!(fg.json()["state"], "deleting");
    let dry = delete(
        &c.api,
        &format!("{base}/v1/ConfigMap/app-config?namespace=shop&dryRun=true"),
    )
    .await;
    assert_eq!(dry.status, 200);
    assert!(c
        .fake
        .object("", "configmaps", "shop", "app-config")
        .is_some());
    let no_name = delete(&c.api, &format!("{base}/v1/ConfigMap?namespace=shop")).await;
    assert_eq!(no_name.status, 400);

    // An answer over the channel's cap: refused with a clear error, not cut off.
    let blob = "y".repeat(1024 * 1024);
    for i in 0..17 {
        c.fake.seed(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("big-{i}"), "namespace": "default"},
            "data": {"blob": blob}}));
    }
    let r = get(&c.api, &format!("{base}/v1/ConfigMap?namespace=default")).await;
    assert_eq!(
        r.status,
        413,
        "{}",
        String::from_utf8_lossy(&r.body[..200.min(r.body.len())])
    );
    assert_eq!(r.json()["reason"], "ResponseTooLarge");
    // Paged, it fits.
    let r = get(
        &c.api,
        &format!("{base}/v1/ConfigMap?namespace=default&limit=4"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 4);

    // The inventory, with its age.
    let inv = get(&c.api, &format!("/api/v1/agents/{AGENT}/inventory")).await;
    assert_eq!(inv.status, 200);
    let inv = inv.json();
    assert_eq!(inv["kubernetes"], true);
    assert_eq!(inv["inventory"]["server_version"], "v1.33.0-fake");
    assert_eq!(inv["inventory"]["node_count"], 2);
    assert!(inv["ageSeconds"].as_f64().unwrap() >= 0.0);
    let kinds: Vec<&str> = inv["inventory"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    for k in [
        "ConfigMap",
        "Deployment",
        "Widget",
        "CustomResourceDefinition",
    ] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    // The new namespace shows up: an applied Namespace triggers a fresh report.
    let tenant: rna::auth::Tenant = TENANT.parse().unwrap();
    within(
        "inventory with namespace shop",
        c.world.hub.registry().wait_until(|r| {
            r.sessions_of(&tenant, AGENT).iter().any(|s| {
                s.inventory()
                    .and_then(|(i, _)| i.namespaces)
                    .is_some_and(|n| n.contains(&"shop".to_string()))
            })
        }),
    )
    .await;
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_applies_gets_lists_deletes_and_waits_with_exact_output() {
    let c = cluster().await;
    let file = c.world.dir.path().join("app.yaml");
    std::fs::write(&file, APP).unwrap();
    let file = file.display().to_string();
    let ops = c.ops.clone();

    let (code, out, err) = cli(&c.world, &ops, AGENT, &["apply", "-f", &file]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "namespace/shop created\nconfigmap/app-config created\ndeployment.apps/web created\nwidget.example.com/blue-widget created\n"
    );
    let (code, out, _) = cli(&c.world, &ops, AGENT, &["apply", "-f", &file, "--dry-run"]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("namespace/shop unchanged (dry run)\n"),
        "{out}"
    );

    // get: json equals the API's answer; yaml is the same object; name and table exact.
    let api_object = get(
        &c.api,
        &format!("/api/v1/agents/{AGENT}/kube/apps/v1/Deployment/web?namespace=shop"),
    )
    .await
    .json();
    let (code, out, err) = cli(
        &c.world,
        &ops,
        AGENT,
        &["get", "deployments/web", "-n", "shop", "-o", "json"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["metadata"]["uid"], api_object["metadata"]["uid"]);
    assert_eq!(got["spec"], api_object["spec"]);
    let (code, out, _) = cli(
        &c.world,
        &ops,
        AGENT,
        &["get", "deployment.apps", "web", "-n", "shop", "-o", "yaml"],
    )
    .await;
    assert_eq!(code, 0);
    let from_yaml: Value = serde_saphyr::from_str(&out).unwrap();
    assert_eq!(from_yaml["metadata"]["uid"], api_object["metadata"]["uid"]);
    assert_eq!(from_yaml["spec"], api_object["spec"]);
    let (_, out, _) = cli(
        &c.world,
        &ops,
        AGENT,
        &["get", "deploy/web", "-n", "shop", "-o", "name"],
    )
    .await;
    assert_eq!(out, "deployment.apps/web\n");
    let created = c
        .fake
        .object("", "configmaps", "shop", "app-config")
        .unwrap()["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, out, _) = cli(
        &c.world,
        &ops,
        AGENT,
        &["get", "cm/app-config", "-n", "shop"],
    )
    .await;
    assert_eq!(
        out,
        format!("NAMESPACE   NAME         CREATED\nshop        app-config   {created}\n")
    );

    // list with a selector.
    let (code, out, _) = cli(
        &c.world,
        &ops,
        AGENT,
        &[
            "list",
            "configmaps",
            "-n",
            "shop",
            "-l",
            "app=web",
            "-o",
            "name",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out, "configmap/app-config\n");
    let (_, out, _) = cli(&c.world, &ops, AGENT, &["list", "namespaces", "-o", "name"]).await;
    assert_eq!(
        out,
        "namespace/default\nnamespace/kube-system\nnamespace/shop\n"
    );
    // `rna kube list … | head -1`: a reader gone before anything is written ends the command
    // quietly with success, in every output format.
    for format in ["name", "table", "json", "yaml"] {
        let args = ["list", "namespaces", "-o", format];
        let (code, _, err) = world_kube_cli(&c.world, &ops, AGENT, &args, true).await;
        assert_eq!((code, err.as_str()), (0, ""), "-o {format}");
    }
    let (_, out, err) = cli(
        &c.world,
        &ops,
        AGENT,
        &["list", "configmaps", "-n", "shop", "-l", "app=none"],
    )
    .await;
    assert_eq!((out.as_str(), err.as_str()), ("", "No resources found.\n"));

    // wait for the rollout the fake controller completes.
    let (code, out, err) = cli(
        &c.world,
        &ops,
        AGENT,
        &[
            "wait",
            "deployment/web",
            "-n",
            "shop",
            "--for",
            "rollout",
            "--timeout",
            "30s",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().last(),
        Some("deployment \"web\" successfully rolled out"),
        "{out}"
    );

    // apply from standard input.
    let token_file = c.world.dir.path().join("stdin-token");
    std::fs::write(&token_file, &ops).unwrap();
    let api_url = format!("http://{}", c.world.api);
    let out = Rna::new(["kube", "--api", &api_url, "--token-file"])
        .arg(&token_file)
        .arg("--agent")
        .arg(AGENT)
        .arg("apply")
        .arg("-f")
        .arg("-")
        .env_remove("RNA_LOG_FORMAT")
        .stdin(&b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: from-stdin, namespace: shop}\n"[..])
        .run_async()
        .await;
    assert_eq!(out.stdout, "configmap/from-stdin created\n");

    let (code, out, _) = cli(&c.world, &ops, AGENT, &["inventory"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("server version: v1.33.0-fake\n"), "{out}");
    assert!(out.contains("nodes:          2\n"), "{out}");
    let (_, out, _) = cli(&c.world, &ops, AGENT, &["inventory", "-o", "json"]).await;
    let inv: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inv["kubernetes"], true);

    // delete.
    let (code, out, _) = cli(
        &c.world,
        &ops,
        AGENT,
        &["delete", "configmap/app-config", "-n", "shop"],
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "configmap/app-config deleted\n"));

    // Exit codes: 1 Kubernetes refused, 2 usage, 3 agent unavailable.
    let (code, out, err) = cli(
        &c.world,
        &ops,
        AGENT,
        &["get", "configmap/app-config", "-n", "shop"],
    )
    .await;
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        "rna kube: configmaps \"app-config\" not found (NotFound, HTTP 404)\n"
    );
    let (code, _, err) = cli(&c.world, &ops, AGENT, &["get", "gizmos/x"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown resource type \"gizmos\""), "{err}");
    let (code, _, _) = cli(&c.world, &ops, AGENT, &["get", "deployments"]).await;
    assert_eq!(code, 2);
    let (code, _, _) = cli(&c.world, &ops, AGENT, &["frobnicate"]).await;
    assert_eq!(code, 2);
    let (code, _, err) = cli(&c.world, &ops, "nobody", &["get", "deployments/web"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("AgentNotFound"), "{err}");
    let reader = c.world.token(TENANT, &[Scope::ReadInfraData]);
    let (code, _, err) = cli(&c.world, &reader, AGENT, &["apply", "-f", &file]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HTTP 403"), "{err}");
    // The hub's API not reachable at all: the agent is unavailable.
    let closed = format!("http://127.0.0.1:{}", closed_port());
    let token_file = c.world.dir.path().join("t");
    std::fs::write(&token_file, &ops).unwrap();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "--api",
            &closed,
            "--token-file",
            token_file.to_str().unwrap(),
            "--agent",
            AGENT,
            "list",
            "pods",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 3, "{err}");
    c.agent.stop().await;
}

/// Reads a wait answer on `AGENT`: every NDJSON line.
async fn wait_lines(api: &ApiClient, body: Value) -> (u16, Vec<Value>) {
    kube_wait_lines(api, AGENT, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_a_rollout_and_times_out_precisely() {
    let c = cluster().await;
    outcomes(&apply(&c.api, "", APP).await);
    let (status, lines) = wait_lines(
        &c.api,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "shop", "name": "web",
               "for": "rollout", "timeout": "30s"}),
    )
    .await;
    assert_eq!(status, 200);
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "done", "{lines:?}");
    assert_eq!(last["met"], true);
    assert_eq!(
        last["message"],
        "deployment \"web\" successfully rolled out"
    );
    let progress: Vec<&str> = lines
        .iter()
        .filter(|l| l["type"] == "progress")
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert!(!progress.is_empty(), "{progress:?}");
    // The outcome is said once, by the final line, never also as progress.
    assert!(
        !progress.contains(&"deployment \"web\" successfully rolled out"),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .any(|m| m.contains("out of 3 new replicas have been updated")
                || m.contains("spec update to be observed")),
        "{progress:?}"
    );

    // A condition.
    let (_, lines) = wait_lines(
        &c.api,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "shop", "name": "web",
               "for": "condition=Available", "timeout": "10s"}),
    )
    .await;
    assert_eq!(
        lines.last().unwrap()["message"],
        "condition Available is True"
    );

    // A rollout that never completes: the timeout error, with what was last seen.
    let stuck = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: stuck\n  namespace: shop\n  annotations: {fake.rna.dev/stall-rollout: \"true\"}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: stuck}}\n  template:\n    metadata: {labels: {app: stuck}}\n    spec: {containers: [{name: c, image: x}]}\n";
    outcomes(&apply(&c.api, "", stuck).await);
    let started = std::time::Instant::now();
    let (status, lines) = wait_lines(
        &c.api,
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "shop", "name": "stuck",
               "for": "rollout", "timeout": "1s"}),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(status, 200);
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "error");
    assert_eq!(last["code"], 504);
    assert_eq!(last["reason"], "Timeout");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.starts_with("timed out after 1s waiting for Deployment shop/stuck: "),
        "{message}"
    );

    // Deletion, seen through the watch.
    let api = c.api.clone();
    let waiter = tokio::spawn(async move {
        wait_lines(
            &api,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "namespace": "shop", "name": "app-config",
                   "for": "delete", "timeout": "20s"}),
        )
        .await
    });
    // Delete only once the agent watches the object, so the deletion is seen by the watch.
    eventually("the agent's watch of app-config", || {
        c.fake.requests().iter().any(|r| {
            r.starts_with("GET /api/v1/namespaces/shop/configmaps?")
                && r.contains("watch=true")
                && r.contains("app-config")
        })
    })
    .await;
    let del = delete(
        &c.api,
        &format!("/api/v1/agents/{AGENT}/kube/v1/ConfigMap/app-config?namespace=shop"),
    )
    .await;
    assert_eq!(del.status, 200);
    let (_, lines) = within("delete wait", waiter).await.unwrap();
    assert_eq!(
        lines.last().unwrap()["message"],
        "ConfigMap shop/app-config is deleted"
    );

    // Errors before any progress are HTTP errors.
    let (status, body) = wait_lines(
        &c.api,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "namespace": "shop", "name": "x",
               "for": "rollout", "timeout": "5s"}),
    )
    .await;
    assert_eq!(status, 400, "{body:?}");
    let (status, _) = wait_lines(
        &c.api,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "for": "sideways"}),
    )
    .await;
    assert_eq!(status, 400);
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_tenants_capability_and_offline_agents() {
    let c = cluster().await;
    let base = format!("/api/v1/agents/{AGENT}");
    // No exec:infra:op: no apply, no delete; reading is fine.
    let reader = client(&c.world, &c.world.token(TENANT, &[Scope::ReadInfraData]));
    let r = apply(&reader, "", APP).await;
    assert_eq!(r.status, 403);
    assert!(c.fake.object("", "namespaces", "", "shop").is_none());
    let r = delete(&reader, &format!("{base}/kube/v1/Namespace/default")).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        get(&reader, &format!("{base}/kube/v1/Namespace/default"))
            .await
            .status,
        200
    );
    // No token at all.
    let anonymous = client(
        &c.world,
        "rna_000000000000_000000000000000000000000000000000000000000000000",
    );
    assert_eq!(
        get(&anonymous, &format!("{base}/inventory")).await.status,
        401
    );

    // Another tenant: exactly like an agent that does not exist.
    let other = client(
        &c.world,
        &c.world
            .token("other/prod", &[Scope::ReadInfraData, Scope::ExecInfraOp]),
    );
    let nobody = get(&c.api, "/api/v1/agents/nobody/inventory").await;
    for r in [
        get(&other, &format!("{base}/inventory")).await,
        get(&other, &format!("{base}/kube/v1/Namespace/default")).await,
        apply(&other, "", APP).await,
        delete(&other, &format!("{base}/kube/v1/Namespace/default")).await,
    ] {
        assert_eq!(r.status, 404);
        assert_eq!(r.json()["reason"], nobody.json()["reason"]);
        assert_eq!(r.json()["reason"], "AgentNotFound");
    }
    assert!(c.fake.object("", "namespaces", "", "shop").is_none());

    // An admin token reaches it from any tenant.
    let admin = client(&c.world, &c.world.token("ops/all", &[Scope::Admin]));
    assert_eq!(
        get(&admin, &format!("{base}/kube/v1/Namespace/default"))
            .await
            .status,
        200
    );

    // An agent without cluster mode: 409, at once.
    let plain = c
        .world
        .connect_agent(TENANT, "plain", &c.agent_token, 1)
        .await;
    let started = std::time::Instant::now();
    let r = get(&c.api, "/api/v1/agents/plain/kube/v1/Namespace").await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["reason"], "NoCapability");
    let inv = get(&c.api, "/api/v1/agents/plain/inventory").await;
    assert_eq!(inv.status, 200);
    assert_eq!(inv.json()["kubernetes"], false);
    assert_eq!(inv.json()["inventory"], Value::Null);
    let (code, _, err) = cli(
        &c.world,
        &c.ops,
        "plain",
        &["list", "namespaces", "--api-version", "v1"],
    )
    .await;
    assert_eq!(code, 3, "{err}");

    // Offline: 503, at once, never a hang.
    plain.stop().await;
    c.world.wait_sessions(TENANT, "plain", 0).await;
    let r = get(&c.api, "/api/v1/agents/plain/kube/v1/Namespace").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["reason"], "AgentOffline");
    assert_eq!(
        get(&c.api, "/api/v1/agents/plain/inventory").await.status,
        503
    );
    let r = apply(&client(&c.world, &c.ops), "", APP).await;
    assert_eq!(r.status, 200);
    c.agent.stop().await;
    c.world.wait_sessions(TENANT, AGENT, 0).await;
    let r = apply(&c.api, "", APP).await;
    assert_eq!(r.status, 503);
    let (code, _, _) = cli(
        &c.world,
        &c.ops,
        AGENT,
        &["get", "ns/default", "--api-version", "v1"],
    )
    .await;
    assert_eq!(code, 3);
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_allow_list_is_checked_before_any_call_and_commands_are_audited() {
    let allow = KubeAllow {
        namespaces: vec!["shop".into(), "default".into()],
        resources: vec!["configmaps".parse().unwrap(), "namespaces".parse().unwrap()],
    };
    let c = cluster_with(allow).await;
    let seen_before = c.fake.requests().len();
    let base = format!("/api/v1/agents/{AGENT}/kube");
    let r = get(
        &c.api,
        &format!("{base}/v1/ConfigMap/x?namespace=kube-system"),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "NotAllowedByAgent");
    assert_eq!(
        r.json()["error"],
        "namespace \"kube-system\" is not in the agent's --kube-namespace list"
    );
    let r = get(&c.api, &format!("{base}/apps/v1/Deployment?namespace=shop")).await;
    assert_eq!(r.status, 403);
    let r = get(&c.api, &format!("{base}/v1/ConfigMap")).await;
    assert_eq!(
        r.status, 403,
        "all namespaces is refused under a namespace list"
    );
    // Refused commands never reached the object endpoints (discovery may be read).
    let after: Vec<String> = c.fake.requests()[seen_before..].to_vec();
    assert!(
        after
            .iter()
            .all(|r| !r.contains("/configmaps") && !r.contains("/deployments")),
        "{after:?}"
    );
    // Namespaces are filtered, allowed ones work.
    let ns = get(&c.api, &format!("{base}/v1/Namespace")).await.json();
    let names: Vec<&str> = ns["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default"]);
    let shop = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: audited, namespace: shop}\ndata: {password: hunter2-secret}\n";
    outcomes(&apply(&c.api, "", shop).await);
    let inv = get(&c.api, &format!("/api/v1/agents/{AGENT}/inventory"))
        .await
        .json();
    let plurals: Vec<&str> = inv["inventory"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["plural"].as_str().unwrap())
        .collect();
    assert_eq!(plurals, ["namespaces", "configmaps"]);

    // A token pasted where a name goes is never written to the audit lines.
    let pasted = get(
        &c.api,
        &format!("{base}/v1/ConfigMap/{}?namespace=shop", c.ops),
    )
    .await;
    assert_ne!(pasted.status, 200);

    // One audit line on the hub and one on the agent per command; no contents, no secrets.
    let token_id = c.ops.split('_').nth(1).unwrap().to_string();
    let text = log_text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("kubernetes command")
                && l.contains("verb=\"apply\"")
                && l.contains("audited")
        })
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in &lines {
        for field in [
            format!("token_id={token_id}"),
            "kind=\"Namespace,ConfigMap\"".to_string(),
            "name=\"shop,audited\"".to_string(),
            "outcome=\"ok\"".to_string(),
            "duration_ms=".to_string(),
        ] {
            assert!(line.contains(&field), "{field} in {line}");
        }
        assert!(line.contains("tenant=acme/prod"), "{line}");
        assert!(
            line.contains(&format!("agent=\"{AGENT}\""))
                || line.contains(&format!("agent={AGENT}")),
            "{line}"
        );
    }
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("kubernetes command") && l.contains("namespace=\"kube-system\""))
        .collect();
    assert_eq!(refused.len(), 2, "{text}");
    assert!(
        refused.iter().all(|l| l.contains("NotAllowedByAgent")),
        "{refused:?}"
    );
    assert!(!text.contains("hunter2-secret"));
    let leaks: Vec<&str> = text.lines().filter(|l| l.contains(&c.ops)).collect();
    assert!(leaks.is_empty(), "{leaks:?}");
    assert!(!text.contains(&c.fake.token));
    c.agent.stop().await;
}

fn have_kubectl() -> bool {
    std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reaches_the_cluster_through_the_hubs_socks5() {
    assert!(
        have_kubectl(),
        "kubectl must be installed (.ci/run installs it)"
    );
    let c = cluster().await;
    outcomes(&apply(&c.api, "", APP).await);
    let tenant: rna::auth::Tenant = TENANT.parse().unwrap();
    let streams_before: u64 = c
        .world
        .hub
        .registry()
        .sessions_of(&tenant, AGENT)
        .iter()
        .map(|s| s.streams_total())
        .sum();
    // client-go sends no bearer token over plain HTTP: the fake lets anonymous reads in, as
    // a cluster whose RBAC grants them would.
    c.fake.allow_anonymous_reads();
    let proxy = format!("socks5://{AGENT}:{}@{}", c.agent_token, c.world.socks);
    let kubeconfig = c
        .fake
        .kubeconfig(c.world.dir.path(), "kubectl-config", Some(&proxy));
    let out = within(
        "kubectl",
        tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "get",
                "configmaps",
                "-n",
                "shop",
                "-o",
                "name",
                "--request-timeout=20s",
            ])
            .env_remove("KUBECONFIG")
            .env("HOME", c.world.dir.path())
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "configmap/app-config\n"
    );
    let streams_after: u64 = c
        .world
        .hub
        .registry()
        .sessions_of(&tenant, AGENT)
        .iter()
        .map(|s| s.streams_total())
        .sum();
    assert!(
        streams_after > streams_before,
        "kubectl went through the agent's tunnel"
    );
    // The API saw kubectl's requests, which came through the tunnel.
    assert!(c
        .fake
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /api/v1/namespaces/shop/configmaps")));
    c.agent.stop().await;
}

#[test]
fn manifests_parse_as_kubernetes_objects() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let read = |name: &str| -> Vec<Value> {
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        serde_saphyr::from_multiple::<Value>(&text)
            .unwrap()
            .into_iter()
            .filter(|d| !d.is_null())
            .collect()
    };
    fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> T {
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"))
    }
    let mut kinds = Vec::new();
    let mut deployments = Vec::new();
    let mut services = Vec::new();
    let mut roles = Vec::new();
    for (file, doc) in read("agent.yaml")
        .into_iter()
        .map(|d| ("agent", d))
        .chain(read("hub.yaml").into_iter().map(|d| ("hub", d)))
    {
        let kind = doc["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "Namespace" => drop(typed::<Namespace>(&doc)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(&doc)),
            "ClusterRole" => roles.push(typed::<ClusterRole>(&doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc)),
            "Deployment" => deployments.push((file, typed::<Deployment>(&doc))),
            "Service" => services.push(typed::<Service>(&doc)),
            "Secret" => drop(typed::<k8s_openapi::api::core::v1::Secret>(&doc)),
            "ConfigMap" => drop(typed::<k8s_openapi::api::core::v1::ConfigMap>(&doc)),
            "PodDisruptionBudget" => drop(
                typed::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(&doc),
            ),
            other => panic!("unexpected kind {other} in {file}.yaml"),
        }
        kinds.push(format!("{file}:{kind}"));
    }
    for want in [
        "agent:Namespace",
        "agent:ServiceAccount",
        "agent:ClusterRole",
        "agent:ClusterRoleBinding",
        "agent:Deployment",
        "hub:Deployment",
        "hub:Service",
    ] {
        assert!(kinds.iter().any(|k| k == want), "{want} missing: {kinds:?}");
    }
    // Least privilege: no wildcard verbs, no escalate/bind/impersonate.
    for role in &roles {
        for rule in role.rules.as_ref().unwrap() {
            for verb in &rule.verbs {
                assert!(
                    !["*", "escalate", "bind", "impersonate"].contains(&verb.as_str()),
                    "{verb}"
                );
            }
            assert!(!rule.resources.as_ref().unwrap().iter().any(|r| r == "*"));
        }
    }
    for (file, d) in &deployments {
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2), "{file}");
        let pod = spec.template.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true), "{file}");
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault",
            "{file}"
        );
        for c in &pod.containers {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{file}");
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{file}");
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop,
                Some(vec!["ALL".to_string()]),
                "{file}"
            );
            assert!(
                c.liveness_probe.is_some() && c.readiness_probe.is_some(),
                "{file}"
            );
        }
    }
    let agent = &deployments.iter().find(|(f, _)| *f == "agent").unwrap().1;
    let container = &agent
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(
        container
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        container
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    let protocols: Vec<String> = services
        .iter()
        .flat_map(|s| s.spec.as_ref().unwrap().ports.clone().unwrap())
        .map(|p| p.protocol.unwrap_or_else(|| "TCP".into()))
        .collect();
    assert!(protocols.contains(&"UDP".to_string()) && protocols.contains(&"TCP".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_bounded_by_their_timeout_and_size_caps() {
    let c = cluster_tuned(KubeAllow::default(), |h| {
        h.kube_timeout = Duration::from_millis(400);
        h.caps.kube_request = 2 * 1024 * 1024;
    })
    .await;
    let base = format!("/api/v1/agents/{AGENT}/kube");
    // A slow API server: the agent gives up at the command's timeout and says so.
    c.fake.set_delay(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let r = get(&c.api, &format!("{base}/v1/Namespace/default")).await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["reason"], "Timeout");
    assert_eq!(r.json()["error"], "the command did not finish within 400ms");
    c.fake.set_delay(Duration::ZERO);
    assert_eq!(
        get(&c.api, &format!("{base}/v1/Namespace/default"))
            .await
            .status,
        200
    );

    // The hub's request cap (--max-kube-request, 2 MiB here): under it applies, over it is
    // refused before it reaches the agent, and the refusal is counted.
    let config_map = |name: &str, size: usize| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: default}}\ndata:\n  blob: {}\n",
            "x".repeat(size)
        )
    };
    let r = apply(&c.api, "", &config_map("fits", 1024 * 1024)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(c.fake.object("", "configmaps", "default", "fits").is_some());
    let r = apply(&c.api, "", &config_map("big", 2 * 1024 * 1024)).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["reason"], "RequestTooLarge");
    assert_eq!(c.world.hub.metrics().cap_refusals("kube_request"), 1);
    assert!(c.fake.object("", "configmaps", "default", "big").is_none());
    // Within the hub's body cap, but over the channel's 4 MiB once aliases are expanded:
    // refused whole, never truncated.
    let blob = "x".repeat(1024 * 1024);
    let aliased = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c0, namespace: default}}\ndata:\n  a: &blob {blob}\n  b: *blob\n  c: *blob\n  d: *blob\n  e: *blob\n"
    );
    assert!(aliased.len() < 2 * 1024 * 1024);
    let r = apply(&c.api, "", &aliased).await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["reason"], "RequestTooLarge");

    assert!(c.fake.object("", "configmaps", "default", "c0").is_none());

    // Every command is counted by verb and outcome, with its duration.
    let metrics = c.world.hub.metrics().render();
    for line in [
        r#"rna_kube_commands_total{verb="get",outcome="failed"} 1"#,
        r#"rna_kube_commands_total{verb="get",outcome="ok"} 1"#,
        r#"rna_kube_commands_total{verb="apply",outcome="ok"} 1"#,
        r#"rna_kube_commands_total{verb="apply",outcome="refused"} 1"#,
        r#"rna_kube_command_seconds_count{verb="get"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rna_dev_with_a_kubeconfig_has_cluster_mode() {
    let fake = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.kubeconfig(dir.path(), "kubeconfig", None);
    let state = dir.path().join("dev");
    let mut dev = Rna::new([
        "dev",
        "--dir",
        state.to_str().unwrap(),
        "--socks",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
    ])
    .arg("--kubeconfig")
    .arg(&kubeconfig)
    .logs_at("info")
    .spawn();
    let mut stdout = dev.stdout();
    let line = first_line_starting(&mut stdout, "rna kube ").await;
    // The printed command works as printed.
    let mut args: Vec<String> = line
        .split_whitespace()
        .skip(2)
        .map(str::to_string)
        .collect();
    args.extend(["-o".to_string(), "name".to_string()]);
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&refs)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "namespace/default\nnamespace/kube-system\n");
    dev.child.kill().await.unwrap();

    // A kubeconfig that cannot be read stops rna dev with the reason.
    let out = Rna::new([
        "dev",
        "--dir",
        state.to_str().unwrap(),
        "--socks",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
    ])
    .arg("--kubeconfig")
    .arg(dir.path().join("missing"))
    .run_async()
    .await;
    assert!(!out.status.success());
    let err = &out.stderr;
    assert!(
        err.contains("kubeconfig") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn cluster_mode_settings_come_from_flags_environment_and_file() {
    let dir = tempfile::tempdir().unwrap();
    rna::certs::init_dir(dir.path(), &["127.0.0.1".to_string()], false).unwrap();
    rna::certs::issue_agent_files(dir.path(), "edge", false).unwrap();
    std::fs::write(dir.path().join("token.txt"), "rna_x\n").unwrap();
    std::fs::write(
        dir.path().join("kubeconfig"),
        "apiVersion: v1\nkind: Config\n",
    )
    .unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "hub = [\"127.0.0.1:4433\"]\nname = \"edge\"\nca = \"ca.pem\"\ncert = \"agent-edge.pem\"\nkey = \"agent-edge-key.pem\"\ntoken_file = \"token.txt\"\nkubeconfig = \"kubeconfig\"\nkube_namespace = [\"shop\"]\nkube_resource = [\"deployments.apps\"]\nkube_inventory_interval = \"90s\"\n",
    )
    .unwrap();
    let check = |args: &[&str], env: &[(&str, &str)]| {
        let mut rna = Rna::new(["agent", "--config"]).arg(&file);
        for a in args {
            rna = rna.arg(a);
        }
        let out = rna
            .arg("--check-config")
            .env_remove("RNA_LOG_FORMAT")
            .envs(env)
            .run();
        (out.status.success(), out.stdout + &out.stderr)
    };
    let (ok, text) = check(&[], &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains("\nkubeconfig = \"") && text.contains("kube_namespace = [\"shop\"]"),
        "{text}"
    );
    assert!(
        text.contains("kube_resource = [\"deployments.apps\"]"),
        "{text}"
    );
    assert!(text.contains("kube_inventory_interval = \"90s\""), "{text}");
    // A flag wins over the file; the environment too.
    let (ok, text) = check(&["--kube-namespace", "payments"], &[]);
    assert!(
        ok && text.contains("\"payments\"") && !text.contains("\"shop\""),
        "{text}"
    );
    let (ok, text) = check(
        &[],
        &[("RNA_KUBE_RESOURCE", "configmaps,widgets.example.com")],
    );
    assert!(
        ok && text.contains("kube_resource = [\"configmaps\", \"widgets.example.com\"]"),
        "{text}"
    );
    // Off explicitly.
    let (ok, text) = check(&["--kubernetes=false"], &[]);
    assert!(
        ok && text.contains("kubernetes = false") && !text.contains("kube_namespace"),
        "{text}"
    );
    // Bad values name their key.
    let (ok, text) = check(&["--kube-resource", "Deployments"], &[]);
    assert!(
        !ok && text.contains("invalid resource \"Deployments\""),
        "{text}"
    );
    let (ok, text) = check(&[], &[("RNA_KUBE_NAMESPACE", "Bad_NS")]);
    assert!(!ok && text.contains("kube_namespace"), "{text}");
    // The kubeconfig is read during the check.
    let (ok, text) = check(&["--kubeconfig", "/nonexistent/kubeconfig"], &[]);
    assert!(
        !ok && text.contains("kubeconfig") && text.contains("/nonexistent/kubeconfig"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_is_reported_periodically_and_again_after_a_reconnect() {
    logs();
    let world = World::start().await;
    let fake = FakeKube::start().await;
    let token = world.agent_token(TENANT);
    let mut config = world.agent_config(AGENT, &token);
    let mut settings = kube_settings(&fake, world.dir.path());
    settings.inventory_interval = Duration::from_millis(300);
    config.kube = Some(settings);
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, AGENT, 1).await;
    wait_inventory(&world, TENANT, AGENT).await;
    let tenant: rna::auth::Tenant = TENANT.parse().unwrap();
    let registry = world.hub.registry();
    let first = registry.sessions_of(&tenant, AGENT)[0].clone();
    let (inventory, at) = first.inventory().unwrap();
    assert_eq!(inventory.node_count, Some(2));
    // Periodically: a later report replaces the cached one.
    within(
        "a periodic report",
        registry.wait_until(|_| first.inventory().is_some_and(|(_, t)| t > at)),
    )
    .await;
    // On reconnect: the new session gets its own report.
    first.close(rna::proto::CloseCode::GoingAway, "test: reconnect");
    within(
        "a report on the new session",
        registry.wait_until(|r| {
            r.sessions_of(&tenant, AGENT)
                .iter()
                .any(|s| s.id != first.id && s.inventory().is_some())
        }),
    )
    .await;
    agent.stop().await;
}

/// A hand-driven agent connection: registered like an agent, but its streams are ours. Keep
/// the answer alive: dropping it ends the control stream and the session.
async fn raw_agent(
    world: &World,
    name: &str,
    capabilities: &[&str],
) -> rna::agent::session::Established {
    let token = world.agent_token(TENANT);
    let mut config = world.agent_config(name, &token);
    config.capabilities = capabilities.iter().map(|c| c.to_string()).collect();
    let endpoint = rna::transport::agent_endpoint(world.quic, &config.tls, &config.limits).unwrap();
    let established = within(
        "raw agent session",
        rna::agent::session::connect(&endpoint, world.quic, "127.0.0.1", &config),
    )
    .await
    .unwrap();
    world.wait_sessions(TENANT, name, 1).await;
    established
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_agent_gets_precise_errors_and_the_hub_keeps_serving() {
    let world = World::start_with(|h| h.kube_timeout = Duration::from_millis(500)).await;
    let ops = world.token(TENANT, &[Scope::ReadInfraData, Scope::ExecInfraOp]);
    let api = client(&world, &ops);
    let session = raw_agent(&world, "rogue", &["kubernetes"]).await;
    let conn = session.connection.clone();

    // An inventory frame larger than its cap: the hub refuses that stream only.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let announced = (rna::proto::kube::MAX_INVENTORY as u32 + 1).to_be_bytes();
    send.write_all(&announced).await.unwrap();
    let err = within("the hub's refusal", recv.read_to_end(64))
        .await
        .unwrap_err();
    assert!(
        matches!(err, rna::transport::session::StreamError::Reset(0x101)),
        "{err:?}"
    );
    // Garbage where an inventory belongs, the same.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
    send.finish().unwrap();
    assert!(within("refusal", recv.read_to_end(64)).await.is_err());
    assert_eq!(
        world
            .hub
            .registry()
            .count(&TENANT.parse().unwrap(), "rogue"),
        1
    );

    // Commands to it: an agent that answers nonsense gives 502, one that never answers 504;
    // neither hangs.
    let path = "/api/v1/agents/rogue/kube/v1/Namespace/default";
    let serve = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                // Read the header and the request, then misbehave.
                let mut buf = vec![0u8; 4096];
                let _ = recv.read(&mut buf).await;
                if n == 0 {
                    send.write_all(&[0, 0, 0, 3, 9, 9, 9]).await.unwrap();
                    let _ = send.finish();
                } else {
                    // Silence, holding the stream open.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                n += 1;
            }
        })
    };
    let r = get(&api, path).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["reason"], "AgentStreamFailed");
    let started = std::time::Instant::now();
    let r = get(&api, path).await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["reason"], "AgentTimeout");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The hub still serves everyone else.
    assert_eq!(
        get(&api, "/api/v1/agents/nobody/inventory").await.status,
        404
    );
    serve.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_malformed_commands_and_keeps_serving() {
    use rna::proto::codec::{encode, encode_limited, read_frame, read_frame_limited};
    use rna::proto::kube::{
        Caller, KubeHeader, KubeReply, KubeRequest, ObjectRef, StreamHeader, MAX_KUBE_REPLY,
        MAX_KUBE_REQUEST,
    };
    use rna::proto::{Control, Welcome};

    // A hand-driven hub: it welcomes the agent, then sends commands of its choosing.
    let world = World::start().await;
    let fake = FakeKube::start().await;
    let hub_cert = world.ca.issue_hub(&["127.0.0.1".to_string()]).unwrap();
    let tls = rna::transport::ServerTls::from_pem(
        &world.ca.cert_pem(),
        &hub_cert.cert_pem,
        &hub_cert.key_pem,
    )
    .unwrap();
    let endpoint = rna::transport::hub_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &tls,
        &rna::transport::Limits::default(),
        &rna::transport::EndpointKey::random().unwrap(),
    )
    .unwrap();
    let port = endpoint.local_addr().unwrap().port();
    let token = world.agent_token(TENANT);
    let mut config = world.agent_config(AGENT, &token);
    config.hubs = vec![rna::agent::HubTarget {
        host: "127.0.0.1".into(),
        port,
    }];
    config.kube = Some(kube_settings(&fake, world.dir.path()));
    let agent = world.spawn_agent(config);

    let conn = within("the agent", endpoint.accept())
        .await
        .unwrap()
        .await
        .unwrap();
    let (mut control, mut control_recv) = conn.accept_bi().await.unwrap();
    let hello = read_frame::<Control, _>(&mut control_recv).await.unwrap();
    match hello {
        Some(Control::Hello(h)) => assert!(h.capabilities.contains(&"kubernetes".to_string())),
        other => panic!("expected Hello, got {other:?}"),
    }
    let welcome = Control::Welcome(Welcome {
        session_id: 1,
        heartbeat_interval_ms: 500,
        heartbeat_timeout_ms: 30_000,
        tenant: TENANT.into(),
    });
    control.write_all(&encode(&welcome).unwrap()).await.unwrap();
    let header = StreamHeader::Kube(KubeHeader {
        timeout_ms: 5_000,
        caller: Caller {
            tenant: TENANT.into(),
            token_id: "000000000000".into(),
            label: None,
        },
    });

    // A request announced larger than the cap: the stream is reset with BadHeader.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode(&header).unwrap()).await.unwrap();
    send.write_all(&(MAX_KUBE_REQUEST as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    let err = within("the agent's refusal", recv.read_to_end(64))
        .await
        .unwrap_err();
    assert!(
        matches!(err, quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)) if code.into_inner() == 0x101),
        "{err:?}"
    );
    // Garbage where the request belongs: the same.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode(&header).unwrap()).await.unwrap();
    send.write_all(&[0, 0, 0, 2, 0xee, 0xee]).await.unwrap();
    send.finish().unwrap();
    assert!(within("refusal", recv.read_to_end(64)).await.is_err());

    // A good command on the same connection still works.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode(&header).unwrap()).await.unwrap();
    let get = KubeRequest::Get(ObjectRef {
        api_version: "v1".into(),
        kind: "Namespace".into(),
        namespace: None,
        name: "kube-system".into(),
    });
    send.write_all(&encode_limited(&get, MAX_KUBE_REQUEST).unwrap())
        .await
        .unwrap();
    send.finish().unwrap();
    let reply = within(
        "the answer",
        read_frame_limited::<KubeReply, _>(&mut recv, MAX_KUBE_REPLY),
    )
    .await
    .unwrap();
    match reply {
        Some(KubeReply::Done(Ok(json))) => {
            let v: Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["metadata"]["name"], "kube-system");
        }
        other => panic!("expected an answer, got {other:?}"),
    }
    conn.close(0u32.into(), b"done");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_maps_every_manifest_object() {
    assert!(
        have_kubectl(),
        "kubectl must be installed (.ci/run installs it)"
    );
    // kubectl's client-side dry run parses each document and maps its kind through the
    // (fake) server's discovery, without persisting anything.
    let fake = FakeKube::start().await;
    fake.allow_anonymous_reads();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.kubeconfig(dir.path(), "kubeconfig", None);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    for (file, want) in [
        (
            "agent.yaml",
            "namespace/rna-system created (dry run)\nserviceaccount/rna-agent created (dry run)\n\
             clusterrole.rbac.authorization.k8s.io/rna-agent created (dry run)\n\
             clusterrolebinding.rbac.authorization.k8s.io/rna-agent created (dry run)\n\
             deployment.apps/rna-agent created (dry run)\n",
        ),
        (
            "hub.yaml",
            "deployment.apps/rna-hub created (dry run)\nservice/rna-hub-quic created (dry run)\n\
             service/rna-hub-replicas created (dry run)\nservice/rna-hub created (dry run)\n",
        ),
    ] {
        let out = within(
            "kubectl apply --dry-run=client",
            tokio::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["apply", "--dry-run=client", "--validate=false", "-f"])
                .arg(root.join(file))
                .env_remove("KUBECONFIG")
                .env("HOME", dir.path())
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{file}");
    }
    // Nothing was written.
    assert!(fake.object("", "namespaces", "", "rna-system").is_none());
}
