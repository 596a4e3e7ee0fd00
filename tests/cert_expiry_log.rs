//! The agent reads its own certificate's expiry once at start and warns about it then (and on
//! a daily timer), not again on every connection to every hub address.

// Its own binary, not a module of tests/it: it installs the process-wide log subscriber and
// counts the warnings captured, which other tests in the same process would add to.
#[path = "it/common/mod.rs"]
mod common;

use std::time::{Duration, SystemTime};

use common::*;
use rna::transport::ClientTls;

const TENANT: &str = "acme/prod";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expiring_agent_certificate_is_warned_about_once_not_per_connection() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let cert = world
        .ca
        .issue_agent_with_validity("soon", now - day, now + 10 * day)
        .unwrap();
    let tls = ClientTls::from_pem(&world.ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
    let mut config = world.agent_config_with_tls("soon", &token, tls);
    // Three connections to the same hub: one per listed target.
    let target = config.hubs[0].clone();
    config.hubs = vec![target.clone(), target.clone(), target];
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, "soon", 3).await;
    within(
        "three sessions up on the agent's side",
        agent.handle.wait_until(|s| s.connected == 3),
    )
    .await;
    let warnings = |text: &str| {
        text.lines()
            .filter(|l| {
                l.contains("WARN") && l.contains("this agent's certificate (--cert) expires in")
            })
            .count()
    };
    eventually("the expiry warning", || warnings(&captured.text()) >= 1).await;
    let text = captured.text();
    assert_eq!(warnings(&text), 1, "{text}");
    agent.stop().await;
    world.stop().await;
}
