//! Pages of the agents list: `GET /api/v1/agents?limit=&continue=` and the status page give
//! every session exactly once across pages, in order, within the caller's tenant; limits are
//! bounded and a token the hub did not give out is a 400 that says so.

use std::collections::HashSet;

use rna::auth::Scope;
use serde_json::Value;

use crate::common::*;

const TENANT: &str = "acme/prod";

struct Reply {
    status: u16,
    body: String,
}

/// One GET through the admin API's router, without a socket.
async fn get(world: &World, target: &str, token: &str) -> Reply {
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .method("GET")
        .uri(target)
        .header("host", "hub.example:8080")
        .header("authorization", format!("Bearer {token}"))
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = within("admin API response", world.hub.api_router().oneshot(req))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = within(
        "admin API body",
        axum::body::to_bytes(resp.into_body(), 16 << 20),
    )
    .await
    .unwrap();
    Reply {
        status,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn get_json(world: &World, target: &str, token: &str) -> (u16, Value) {
    let r = get(world, target, token).await;
    let v = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{target}: {e}: {}", r.body));
    (r.status, v)
}

/// (name, session id) of each agent on a page.
fn keys(page: &Value) -> Vec<(String, u64)> {
    page["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["session_id"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agents_list_pages_through_every_session_once() {
    let world = World::start_with(|c| c.caps.sessions_per_agent = 4).await;
    let token = world.agent_token(TENANT);
    let reader = world.token(TENANT, &[Scope::ReadInfraData]);
    // Five names, one with three replicas: seven sessions.
    let mut agents = Vec::new();
    for name in ["e-agent", "a-agent", "d-agent", "b-agent"] {
        agents.push(world.connect_agent(TENANT, name, &token, 1).await);
    }
    for n in 1..=3 {
        agents.push(world.spawn_agent(world.agent_config("c-agent", &token)));
        world.wait_sessions(TENANT, "c-agent", n).await;
    }
    // Another tenant's agent is on no page of this tenant's reader.
    let other = world.agent_token("other/prod");
    agents.push(
        world
            .connect_agent("other/prod", "a-agent", &other, 1)
            .await,
    );

    // Without a limit, a small fleet gets its whole list, as before pages existed.
    let (status, all) = get_json(&world, "/api/v1/agents", &reader).await;
    assert_eq!(status, 200);
    assert!(all.get("continue").is_none(), "{all}");
    assert_eq!(all["total"], 7);
    let everyone = keys(&all);
    assert_eq!(everyone.len(), 7);
    let mut sorted = everyone.clone();
    sorted.sort();
    assert_eq!(
        everyone, sorted,
        "the list is in (tenant, name, session) order"
    );

    // Pages of 3: 3 + 3 + 1, each continuing where the last ended.
    let mut seen = Vec::new();
    let mut target = "/api/v1/agents?limit=3".to_string();
    let mut sizes = Vec::new();
    loop {
        let (status, page) = get_json(&world, &target, &reader).await;
        assert_eq!(status, 200, "{target}: {page}");
        assert_eq!(page["total"], 7);
        sizes.push(keys(&page).len());
        seen.extend(keys(&page));
        match page.get("continue").and_then(Value::as_str) {
            Some(next) => target = format!("/api/v1/agents?limit=3&continue={next}"),
            None => break,
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen, everyone);

    // A session that leaves between two pages shifts nothing: the next page starts after
    // the last session shown, not at an offset.
    let (_, first) = get_json(&world, "/api/v1/agents?limit=2", &reader).await;
    assert_eq!(keys(&first), everyone[..2]);
    let next = first["continue"].as_str().unwrap().to_string();
    agents.remove(1).stop().await; // a-agent, on the first page
    world.wait_sessions(TENANT, "a-agent", 0).await;
    let (_, second) = get_json(
        &world,
        &format!("/api/v1/agents?limit=2&continue={next}"),
        &reader,
    )
    .await;
    assert_eq!(keys(&second), everyone[2..4]);

    // The status page pages the same way, with a link to the next page.
    let page = get(&world, "/?limit=2", &reader).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("6 connections (this page: 2)"),
        "{}",
        page.body
    );
    let href = page
        .body
        .split("id=\"next\" href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a next-page link")
        .replace("&amp;", "&");
    assert!(href.starts_with("/?limit=2&continue="), "{href}");
    let mut rows = HashSet::new();
    let mut target = href;
    loop {
        let page = get(&world, &target, &reader).await;
        assert_eq!(page.status, 200, "{target}");
        for row in page.body.split("<tr data-session=\"").skip(1) {
            rows.insert(row.split('"').next().unwrap().to_string());
        }
        match page.body.split("id=\"next\" href=\"").nth(1) {
            Some(rest) => target = rest.split('"').next().unwrap().replace("&amp;", "&"),
            None => break,
        }
    }
    // Every session after the first page, once.
    assert_eq!(rows.len(), 4, "{rows:?}");

    for agent in agents {
        agent.stop().await;
    }
    world.stop().await;
}

#[tokio::test]
async fn bad_limits_and_continue_tokens_are_refused_with_the_reason() {
    let world = World::start().await;
    let reader = world.token(TENANT, &[Scope::ReadInfraData]);
    for (query, says) in [
        ("limit=0", "expected a whole number from 1 to 5000"),
        ("limit=5001", "expected a whole number from 1 to 5000"),
        ("limit=many", "expected a whole number from 1 to 5000"),
        (
            "continue=not-a-token",
            "continue token is not one this hub gave out",
        ),
        // Hex of "acme/prod\nno spaces allowed\n1".
        (
            "continue=61636d652f70726f640a6e6f207370616365732061\
             6c6c6f7765640a31",
            "agent name",
        ),
    ] {
        let (status, body) = get_json(&world, &format!("/api/v1/agents?{query}"), &reader).await;
        assert_eq!(status, 400, "{query}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{query}: {error}");
        // The status page says the same, as a page.
        let page = get(&world, &format!("/?{query}"), &reader).await;
        assert_eq!(page.status, 400, "{query}");
        assert!(page.body.contains(says), "{query}: {}", page.body);
    }
    // Without a token, the refusal is about the token, not the query.
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .uri("/api/v1/agents?limit=0")
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = world.hub.api_router().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    world.stop().await;
}

/// `rna agents` follows the pages: with a page size of 2 it lists all five connections of
/// its tenant, once each; a token without the scope is refused with exit code 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rna_agents_lists_every_page() {
    let world = World::start_with(|c| c.caps.sessions_per_agent = 4).await;
    let token = world.agent_token(TENANT);
    let mut agents = Vec::new();
    for name in ["b-agent", "a-agent", "c-agent", "e-agent", "d-agent"] {
        agents.push(world.connect_agent(TENANT, name, &token, 1).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let reader = dir.path().join("reader.txt");
    std::fs::write(&reader, world.token(TENANT, &[Scope::ReadInfraData])).unwrap();
    let api = format!("http://{}", world.api);
    let run = |file: &std::path::Path, output: &str| {
        Rna::new(["agents", "--api", &api, "--page-size", "2", "-o", output])
            .arg("--token-file")
            .arg(file)
            .run_async()
    };
    let ran = run(&reader, "json").await;
    assert_eq!(ran.code(), 0, "{}", ran.stderr);
    let listed: Value = serde_json::from_str(&ran.stdout).unwrap();
    let names: Vec<&str> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["a-agent", "b-agent", "c-agent", "d-agent", "e-agent"]
    );
    let table = run(&reader, "table").await;
    assert_eq!(table.code(), 0, "{}", table.stderr);
    assert_eq!(table.stdout.lines().count(), 6, "{}", table.stdout);
    assert!(table.stdout.starts_with("NAME"), "{}", table.stdout);

    let proxy_only = dir.path().join("proxy.txt");
    std::fs::write(&proxy_only, world.token(TENANT, &[Scope::Proxy])).unwrap();
    let refused = run(&proxy_only, "json").await;
    assert_eq!(refused.code(), 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("HTTP 403"), "{}", refused.stderr);
    for agent in agents {
        agent.stop().await;
    }
    world.stop().await;
}
