//! The admin API's authorization matrix, table-driven against the router itself (no socket:
//! `tower::ServiceExt::oneshot`): every endpoint × every scope × a token of the agent's own
//! tenant or of another tenant, and missing, malformed, unknown, expired and revoked tokens.
//! The agent runs in cluster mode against the fake Kubernetes API, so an allowed request is
//! answered for real; Secret contents reach only tokens with `exec:infra:op`.

use std::time::Duration;

use crate::common::*;
use crate::fake_kube::FakeKube;
use axum::body::Body;
use rna::agent::kube::{KubeSettings, KubeSource};
use rna::auth::Scope;
use serde_json::{json, Value};
use tower::ServiceExt;

const OWN: &str = "acme/prod";
const OTHER: &str = "globex/dev";
const AGENT: &str = "edge";

/// One endpoint of the admin API: how to call it, the scope it needs, and what an allowed
/// caller gets.
struct Endpoint<'a> {
    method: &'a str,
    path: &'a str,
    body: Option<&'a str>,
    scope: Scope,
    /// Whether it addresses one agent (so another tenant's token gets 404, not the answer).
    agent: bool,
    /// The status page answers HTML, the API JSON.
    html: bool,
}

const APPLY: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fresh\n  namespace: shop\ndata:\n  a: \"2\"\n";
const WAIT: &str = r#"{"apiVersion":"v1","kind":"ConfigMap","namespace":"shop","name":"gone","for":"delete","timeout":"20s"}"#;

fn endpoints() -> Vec<Endpoint<'static>> {
    let api = |method, path, body, scope, agent| Endpoint {
        method,
        path,
        body,
        scope,
        agent,
        html: false,
    };
    vec![
        api("GET", "/metrics", None, Scope::ReadMetrics, false),
        api("GET", "/api/v1/agents", None, Scope::ReadInfraData, false),
        api(
            "GET",
            "/api/v1/agents/edge/inventory",
            None,
            Scope::ReadInfraData,
            true,
        ),
        api(
            "GET",
            "/api/v1/agents/edge/kube/v1/ConfigMap/app?namespace=shop",
            None,
            Scope::ReadInfraData,
            true,
        ),
        api(
            "GET",
            "/api/v1/agents/edge/kube/v1/ConfigMap?namespace=shop",
            None,
            Scope::ReadInfraData,
            true,
        ),
        api(
            "GET",
            "/api/v1/agents/edge/kube/v1/Secret/s?namespace=shop",
            None,
            Scope::ReadInfraData,
            true,
        ),
        api(
            "POST",
            "/api/v1/agents/edge/kube/apply?dryRun=true",
            Some(APPLY),
            Scope::ExecInfraOp,
            true,
        ),
        api(
            "DELETE",
            "/api/v1/agents/edge/kube/v1/ConfigMap/app?namespace=shop&dryRun=true",
            None,
            Scope::ExecInfraOp,
            true,
        ),
        api(
            "POST",
            "/api/v1/agents/edge/kube/wait",
            Some(WAIT),
            Scope::ReadInfraData,
            true,
        ),
        Endpoint {
            method: "GET",
            path: "/",
            body: None,
            scope: Scope::ReadInfraData,
            agent: false,
            html: true,
        },
    ]
}

/// Who calls: a token with one scope in a tenant, or a credential that never verifies.
#[derive(Clone, Debug)]
enum Caller {
    Token { scope: Scope, tenant: &'static str },
    Missing,
    NotBearer,
    Unknown,
    Expired,
    Revoked,
}

/// The answer a row expects.
#[derive(Debug, PartialEq)]
enum Want {
    /// 401 with this reason in the body.
    Unauthorized(&'static str),
    /// 403: the token lacks the route's scope.
    Forbidden,
    /// 404, exactly like an agent that does not exist.
    NoAgent,
    /// The route's real answer.
    Allowed,
}

async fn call(world: &World, e: &Endpoint<'_>, authorization: Option<&str>) -> (u16, String, bool) {
    let mut req = axum::http::Request::builder()
        .method(e.method)
        .uri(e.path)
        .header("host", "hub.example:8080");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    if e.body == Some(APPLY) {
        req = req.header("content-type", "application/yaml");
    }
    let req = req
        .body(
            e.body
                .map_or_else(Body::empty, |b| Body::from(b.to_string())),
        )
        .unwrap();
    let resp = within(
        &format!("{} {}", e.method, e.path),
        world.hub.api_router().oneshot(req),
    )
    .await
    .unwrap();
    let status = resp.status().as_u16();
    let challenge = resp.headers().contains_key("www-authenticate");
    let body = within("the body", axum::body::to_bytes(resp.into_body(), 16 << 20))
        .await
        .unwrap();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        challenge,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_scope_tenant_and_token_state() {
    let world = World::start().await;
    let fake = FakeKube::start().await;
    fake.seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    fake.seed(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "app", "namespace": "shop"}, "data": {"a": "1"}}));
    fake.seed(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "s", "namespace": "shop"}, "data": {"password": "aHVudGVyMg=="}}));
    let agent_token = world.agent_token(OWN);
    let mut config = world.agent_config(AGENT, &agent_token);
    let mut settings = KubeSettings::new(KubeSource::Kubeconfig {
        path: fake.kubeconfig(world.dir.path(), "kubeconfig", None),
        context: None,
    });
    settings.inventory_interval = Duration::from_secs(3600);
    config.kube = Some(settings);
    let agent = world.spawn_agent(config);
    world.wait_sessions(OWN, AGENT, 1).await;

    let scopes = [
        Scope::ConnectAgentHub,
        Scope::Proxy,
        Scope::ReadInfraData,
        Scope::ExecInfraOp,
        Scope::ReadMetrics,
        Scope::Admin,
    ];
    let mut callers: Vec<(Caller, Option<String>)> = Vec::new();
    for tenant in [OWN, OTHER] {
        for scope in scopes {
            let token = world.token(tenant, &[scope]);
            callers.push((
                Caller::Token { scope, tenant },
                Some(format!("Bearer {token}")),
            ));
        }
    }
    let unknown = "rna_000000000000_000000000000000000000000000000000000000000000000";
    let revoked = world.token(OWN, &[Scope::Admin]);
    world.revoke(&revoked);
    let expired = world.token_with_ttl(OWN, &[Scope::Admin], Some(Duration::from_secs(1)));
    // Expiry is checked against the clock; wait (bounded) until it has passed.
    let probe = &endpoints()[1];
    let bearer_expired = format!("Bearer {expired}");
    eventually_async("the token to expire", async || {
        call(&world, probe, Some(&bearer_expired)).await.0 == 401
    })
    .await;
    callers.extend([
        (Caller::Missing, None),
        (Caller::NotBearer, Some(format!("Basic {unknown}"))),
        (Caller::Unknown, Some(format!("Bearer {unknown}"))),
        (Caller::Expired, Some(bearer_expired.clone())),
        (Caller::Revoked, Some(format!("Bearer {revoked}"))),
    ]);

    let mut rows = 0;
    for e in endpoints() {
        for (caller, authorization) in &callers {
            let want = match caller {
                Caller::Missing if e.html => Want::Unauthorized(""),
                Caller::Missing => Want::Unauthorized("missing bearer token"),
                Caller::NotBearer => Want::Unauthorized("authorization is not a bearer token"),
                Caller::Unknown => Want::Unauthorized("token is not known"),
                Caller::Expired => Want::Unauthorized("token has expired"),
                Caller::Revoked => Want::Unauthorized("token was revoked"),
                Caller::Token { scope, .. } if *scope != e.scope && *scope != Scope::Admin => {
                    Want::Forbidden
                }
                // An admin token reaches the agent's tenant from any tenant.
                Caller::Token { tenant, scope } if *tenant == OTHER && e.agent => {
                    if *scope == Scope::Admin {
                        Want::Allowed
                    } else {
                        Want::NoAgent
                    }
                }
                Caller::Token { .. } => Want::Allowed,
            };
            let (status, body, challenge) = call(&world, &e, authorization.as_deref()).await;
            let row = format!("{} {} as {caller:?}: {status} {body}", e.method, e.path);
            match want {
                Want::Unauthorized(reason) => {
                    assert_eq!(status, 401, "{row}");
                    assert!(body.contains(reason), "{row}");
                    if e.html {
                        assert!(body.contains("<form"), "{row}");
                    } else {
                        assert!(challenge, "401 names the Bearer scheme: {row}");
                        let v: Value = serde_json::from_str(&body).expect(&row);
                        assert_eq!(v["error"], reason, "{row}");
                    }
                }
                Want::Forbidden => {
                    assert_eq!(status, 403, "{row}");
                    if e.html {
                        assert!(body.contains("lacks the"), "{row}");
                    } else {
                        let v: Value = serde_json::from_str(&body).expect(&row);
                        let wanted = format!("token lacks scope {}", e.scope);
                        assert_eq!(v["error"], wanted.as_str(), "{row}");
                    }
                }
                Want::NoAgent => {
                    assert_eq!(status, 404, "{row}");
                    let v: Value = serde_json::from_str(&body).expect(&row);
                    assert_eq!(v["reason"], "AgentNotFound", "{row}");
                    assert_eq!(v["error"], "no agent named \"edge\"", "{row}");
                }
                Want::Allowed => {
                    assert_eq!(status, 200, "{row}");
                    check_allowed(&e, caller, &body, &row);
                }
            }
            rows += 1;
        }
    }
    assert_eq!(rows, 10 * 17);
    eprintln!("authorization matrix: {rows} rows");

    // Another tenant's agent answers exactly like one that does not exist.
    let other = world.token(OTHER, &[Scope::ReadInfraData]);
    let ghost = Endpoint {
        method: "GET",
        path: "/api/v1/agents/ghost/kube/v1/ConfigMap/app?namespace=shop",
        body: None,
        scope: Scope::ReadInfraData,
        agent: true,
        html: false,
    };
    let (status, body, _) = call(&world, &ghost, Some(&format!("Bearer {other}"))).await;
    let (edge_status, edge_body, _) =
        call(&world, &endpoints()[3], Some(&format!("Bearer {other}"))).await;
    assert_eq!(
        (status, body.replace("ghost", "edge")),
        (edge_status, edge_body)
    );

    // An admin token picks the tenant with `?tenant=` on every agent route, the wait
    // included (its body may name it too); the agent exists only in its own tenant.
    let admin = format!("Bearer {}", world.token(OTHER, &[Scope::Admin]));
    let wait_in_other = WAIT.replace("\"for\"", "\"tenant\":\"globex/dev\",\"for\"");
    let cases: [(&str, &str, Option<&str>, u16); 6] = [
        (
            "GET",
            "/api/v1/agents/edge/kube/v1/ConfigMap/app?namespace=shop&tenant=acme/prod",
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/agents/edge/kube/v1/ConfigMap/app?namespace=shop&tenant=globex/dev",
            None,
            404,
        ),
        (
            "GET",
            "/api/v1/agents/edge/inventory?tenant=globex/dev",
            None,
            404,
        ),
        (
            "GET",
            "/api/v1/agents/edge/inventory?tenant=nonsense",
            None,
            400,
        ),
        (
            "POST",
            "/api/v1/agents/edge/kube/wait?tenant=globex/dev",
            Some(WAIT),
            404,
        ),
        (
            "POST",
            "/api/v1/agents/edge/kube/wait",
            Some(wait_in_other.as_str()),
            404,
        ),
    ];
    for (method, path, body, want) in cases {
        let e = Endpoint {
            method,
            path,
            body,
            scope: Scope::Admin,
            agent: true,
            html: false,
        };
        let (status, body, _) = call(&world, &e, Some(&admin)).await;
        assert_eq!(status, want, "admin {method} {path}: {body}");
        if want == 404 {
            assert!(body.contains("AgentNotFound"), "{path}: {body}");
        }
        if want == 400 {
            assert!(body.contains("\"tenant: "), "{path}: {body}");
        }
    }
    agent.stop().await;
    world.stop().await;
}

/// What an allowed caller sees: its tenant's agents only, Secret data only with
/// `exec:infra:op`, and the real answer of each command.
fn check_allowed(e: &Endpoint<'_>, caller: &Caller, body: &str, row: &str) {
    let Caller::Token { scope, tenant } = caller else {
        panic!("only tokens are allowed: {row}");
    };
    let admin = *scope == Scope::Admin;
    match e.path {
        "/metrics" => assert!(body.contains("rna_agents_connected"), "{row}"),
        "/" => {
            let sees = body.contains("data-agent=\"edge\"");
            assert_eq!(sees, admin || *tenant == OWN, "{row}");
        }
        "/api/v1/agents" => {
            let v: Value = serde_json::from_str(body).expect(row);
            let names: Vec<&str> = v["agents"]
                .as_array()
                .expect(row)
                .iter()
                .filter_map(|a| a["name"].as_str())
                .collect();
            let want: &[&str] = if admin || *tenant == OWN {
                &["edge"]
            } else {
                &[]
            };
            assert_eq!(names, want, "{row}");
        }
        p if p.contains("/inventory") => {
            let v: Value = serde_json::from_str(body).expect(row);
            assert_eq!(v["tenant"], OWN, "{row}");
            assert_eq!(v["kubernetes"], true, "{row}");
        }
        p if p.contains("/Secret/") => {
            let v: Value = serde_json::from_str(body).expect(row);
            assert_eq!(v["metadata"]["name"], "s", "{row}");
            // Reading a Secret's contents is as strong as writing.
            let can_write = admin || *scope == Scope::ExecInfraOp;
            assert_eq!(v.get("data").is_some(), can_write, "{row}");
        }
        p if p.contains("/kube/wait") => {
            let last = body.lines().last().expect(row);
            let v: Value = serde_json::from_str(last).expect(row);
            assert_ne!(v["type"], "error", "{row}");
        }
        _ => {
            let v: Value = serde_json::from_str(body).expect(row);
            assert!(v.is_object(), "{row}");
        }
    }
}
