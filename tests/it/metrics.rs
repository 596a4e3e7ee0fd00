//! After a scripted session the hub's and the agent's /metrics expositions hold exactly the
//! expected values (parsed from the text served over HTTP); the hub's are only for a token
//! with `read:metrics`, since they name every tenant.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::common::*;
use rna::auth::Scope;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One sample: metric name and its labels, sorted.
type Key = (String, BTreeMap<String, String>);

/// Parses OpenMetrics text into samples. Panics on a line it does not understand, so a
/// malformed exposition fails the test.
fn parse(text: &str) -> BTreeMap<Key, f64> {
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").expect("label pair");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        samples.insert((name, labels), value);
    }
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    samples
}

fn get(samples: &BTreeMap<Key, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .get(&(name.to_string(), labels.clone()))
        .copied()
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

/// GET that must answer 200; returns the body.
async fn get_ok(addr: SocketAddr, path: &str) -> String {
    let (status, body) = http_get(addr, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// GET with `Authorization: Bearer <token>` when given: the status code and the body.
async fn get_with(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    within("response", s.read_to_end(&mut out)).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    (status, body.to_string())
}

/// An echo server: returns every byte it reads.
async fn echo_server() -> SocketAddr {
    tcp_server(|mut s: tokio::net::TcpStream| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

#[tokio::test]
async fn counters_match_a_scripted_session() {
    let world = World::start().await;
    let token = world.agent_token("acme/prod");
    let agent = world.connect_agent("acme/prod", "edge", &token, 1).await;
    let agent_admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_metrics = agent_admin.local_addr().unwrap();
    tokio::spawn(async move {
        let handle = agent.handle.clone();
        let _keep = agent;
        rna::agent::admin::serve(agent_admin, handle, Default::default()).await;
    });

    // An agent with a token of the wrong scope is refused in the handshake.
    let proxy_only = world.token("acme/prod", &[Scope::Proxy]);
    let refused = world.spawn_agent(world.agent_config("intruder", &proxy_only));
    let metrics = world.hub.metrics();
    eventually("handshake refusal counted", || {
        metrics.handshake_failures("missing_scope") >= 1
    })
    .await;
    refused.stop().await;

    // Three echoed transfers of known sizes.
    let echo = echo_server().await;
    let sizes = [1_000usize, 65_536, 300_000];
    for &n in &sizes {
        let mut s = socks_connect(world.socks, "edge", &token, Dest::Ip(echo))
            .await
            .expect("tunnel");
        let data = pattern(n);
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
    }
    // One refused destination, one unknown agent, one wrong password.
    let refused_port = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    assert_eq!(
        socks_connect(world.socks, "edge", &token, Dest::Ip(refused_port))
            .await
            .err(),
        Some(0x05)
    );
    assert_eq!(
        socks_connect(world.socks, "nobody", &token, Dest::Ip(echo))
            .await
            .err(),
        Some(0x04)
    );
    assert_eq!(
        socks_connect(world.socks, "edge", "wrong-token", Dest::Ip(echo))
            .await
            .err(),
        Some(0xff)
    );
    world.hub.reload_tokens().expect("reload");

    // Relay counters settle once every stream has finished on both sides.
    let total: usize = sizes.iter().sum();
    eventually("streams closed", || metrics.streams_open().get() == 0).await;

    let scraper = world.token("ops/monitoring", &[Scope::ReadMetrics]);
    let (status, text) = get_with(world.api, "/metrics", Some(&scraper)).await;
    assert_eq!(status, 200, "{text}");
    let hub = parse(&text);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        get(
            &hub,
            "rna_build_info",
            &[("version", version), ("role", "hub")]
        ),
        1.0
    );
    assert_eq!(
        get(&hub, "rna_agents_connected", &[("tenant", "acme/prod")]),
        1.0
    );
    assert_eq!(
        get(
            &hub,
            "rna_agent_sessions_total",
            &[("event", "opened"), ("reason", "ok"), ("transport", "quic")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &hub,
            "rna_handshake_failures_total",
            &[("reason", "missing_scope")]
        ),
        1.0
    );
    assert_eq!(
        get(&hub, "rna_socks_requests_total", &[("reply", "succeeded")]),
        3.0
    );
    assert_eq!(
        get(
            &hub,
            "rna_socks_requests_total",
            &[("reply", "connection_refused")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &hub,
            "rna_socks_requests_total",
            &[("reply", "host_unreachable")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &hub,
            "rna_socks_refused_total",
            &[("reason", "auth_refused")]
        ),
        1.0
    );
    assert_eq!(get(&hub, "rna_streams_open", &[]), 0.0);
    assert_eq!(get(&hub, "rna_streams_pending", &[]), 0.0);
    // Four answers from the agent: three connects and one refusal.
    assert_eq!(get(&hub, "rna_dial_seconds_count", &[]), 4.0);
    assert_eq!(
        get(&hub, "rna_relay_bytes_total", &[("direction", "to_agent")]),
        total as f64
    );
    assert_eq!(
        get(
            &hub,
            "rna_relay_bytes_total",
            &[("direction", "from_agent")]
        ),
        total as f64
    );
    assert!(get(&hub, "rna_heartbeat_rtt_seconds_count", &[]) >= 0.0);
    assert!(get(&hub, "rna_token_reloads_total", &[("result", "ok")]) >= 1.0);
    // No label carries a destination.
    let echo_port = echo.port().to_string();
    for (name, labels) in hub.keys() {
        for value in labels.values() {
            assert!(
                !value.contains(&echo_port),
                "{name} has a destination label"
            );
        }
    }

    let agent = parse(&get_ok(agent_metrics, "/metrics").await);
    assert_eq!(
        get(
            &agent,
            "rna_build_info",
            &[("version", version), ("role", "agent")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &agent,
            "rna_agent_hub_connections",
            &[("transport", "quic")]
        ),
        1.0
    );
    assert_eq!(get(&agent, "rna_agent_reconnects_total", &[]), 0.0);
    assert_eq!(
        get(&agent, "rna_agent_dials_total", &[("outcome", "connected")]),
        3.0
    );
    assert_eq!(
        get(&agent, "rna_agent_dials_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(get_ok(agent_metrics, "/readyz").await, "ready\n");
    world.stop().await;
}

#[tokio::test]
async fn hub_metrics_name_tenants_only_to_a_metrics_token() {
    let world = World::start().await;
    let token = world.agent_token("acme/prod");
    let _agent = world.connect_agent("acme/prod", "edge", &token, 1).await;
    let proxy = world.token("acme/prod", &[Scope::Proxy]);
    let read = world.token("acme/prod", &[Scope::ReadInfraData]);

    // Without a token, or with a token of other scopes (even of that very tenant), the
    // answer is 401 or 403 and names no tenant.
    for (token, want) in [
        (None, 401),
        (Some("rna_000000000000_0000"), 401),
        (Some(proxy.as_str()), 403),
        (Some(read.as_str()), 403),
    ] {
        let (status, body) = get_with(world.api, "/metrics", token).await;
        assert_eq!(status, want, "{token:?}: {body}");
        assert!(
            !body.contains("acme") && !body.contains("rna_agents_connected"),
            "{body}"
        );
    }

    // A `read:metrics` token of any tenant, and an admin token, read every series.
    for scopes in [&[Scope::ReadMetrics][..], &[Scope::Admin][..]] {
        let scraper = world.token("ops/monitoring", scopes);
        let (status, body) = get_with(world.api, "/metrics", Some(&scraper)).await;
        assert_eq!(status, 200, "{scopes:?}: {body}");
        let samples = parse(&body);
        assert_eq!(
            get(&samples, "rna_agents_connected", &[("tenant", "acme/prod")]),
            1.0
        );
    }

    // Health and readiness stay open to anyone.
    assert_eq!(get_ok(world.api, "/healthz").await, "ok\n");
    assert_eq!(get_ok(world.api, "/readyz").await, "ready\n");
    world.stop().await;
}
