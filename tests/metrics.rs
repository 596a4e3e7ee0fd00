//! After a scripted session the hub's and the agent's /metrics expositions hold exactly the
//! expected values (parsed from the text served over HTTP).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::*;
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
        let app = rna::agent::admin::app(agent.handle.clone());
        let _keep = agent;
        let _ = axum::serve(agent_admin, app).await;
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

    let hub = parse(&get_ok(world.api, "/metrics").await);
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
            &[("event", "opened"), ("reason", "ok")]
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
    assert_eq!(get(&agent, "rna_agent_hub_connections", &[]), 1.0);
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
