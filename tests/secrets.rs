//! No secret in any log line: a whole session (registration, SOCKS authentication, a refused
//! password, a transfer) is logged at trace level and searched for the token and key bytes.

// Its own binary, not a module of tests/it: it installs the process-wide log subscriber and
// judges every line captured, which other tests in the same process would add to.
#[path = "it/common/mod.rs"]
mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_appears_in_trace_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let world = World::start().await;
    let token = world.agent_token("acme/prod");
    let cert = world.ca.issue_agent("edge").unwrap();
    let tls =
        rna::transport::ClientTls::from_pem(&world.ca.cert_pem(), &cert.cert_pem, &cert.key_pem)
            .unwrap();
    let config = world.agent_config_with_tls("edge", &token, tls);
    let _agent = world.spawn_agent(config);
    world.wait_sessions("acme/prod", "edge", 1).await;
    let http = http_server().await;

    let mut s = socks_connect(world.socks, "edge", &token, Dest::Ip(http))
        .await
        .unwrap();
    s.write_all(b"GET /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.unwrap();
    drop(s);
    let wrong = "rna_0123456789ab_ffffffffffffffffffffffffffffffffffffffffffffffff";
    assert_eq!(
        socks_connect(world.socks, "edge", wrong, Dest::Ip(http))
            .await
            .err(),
        Some(0xff)
    );
    let ca_key = world.ca.key_pem();
    world.stop().await;

    let logs = captured.text();
    assert!(logs.contains("agent connected"), "trace capture must work");
    assert!(logs.lines().count() > 50, "expected trace-level lines");
    let secret_part = token.rsplit('_').next().unwrap();
    assert!(!logs.contains(secret_part), "token secret found in logs");
    assert!(
        !logs.contains("ffffffffffffffffffffffffffffffffffffffffffffffff"),
        "refused password found in logs"
    );
    for pem in [cert.key_pem.as_str(), ca_key.as_str()] {
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
        {
            assert!(!logs.contains(line), "private key material found in logs");
        }
    }
}
