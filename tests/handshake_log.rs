//! Failed agent handshakes are logged at a bounded rate: a burst of lines, then one summary
//! per window that accounts for every failure it did not log on its own.

// Its own binary, not a module of tests/it: it installs the process-wide log subscriber and
// judges every line captured, which other tests in the same process would add to.
#[path = "it/common/mod.rs"]
mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_handshakes_are_logged_at_a_bounded_rate() {
    const FAILURES: usize = 100;
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let world = World::start().await;
    // A certificate from another CA: each attempt fails in TLS, after the hub did the work.
    let other_ca = rna::certs::Ca::generate("someone else's CA").unwrap();
    let foreign = other_ca.issue_agent("intruder").unwrap();
    let tls = rna::transport::ClientTls::from_pem(
        &world.ca.cert_pem(),
        &foreign.cert_pem,
        &foreign.key_pem,
    )
    .unwrap();
    let endpoint =
        rna::transport::agent_endpoint(world.quic, &tls, &rna::transport::Limits::default())
            .unwrap();
    let started = std::time::Instant::now();
    // A few at a time, under the per-source cap, so every one reaches TLS.
    for _ in 0..FAILURES / 4 {
        let attempts: Vec<_> = (0..4)
            .map(|_| endpoint.connect(world.quic, "localhost").unwrap())
            .collect();
        for attempt in attempts {
            // TLS 1.3: the client may finish before the hub has judged its certificate; then
            // the hub's close follows.
            if let Ok(conn) = within("a refused handshake", attempt).await {
                within("the hub's close", conn.closed()).await;
            }
        }
    }
    let metrics = world.hub.metrics().clone();
    eventually("every failure counted", || {
        metrics.handshake_failures("tls") == FAILURES as u64
    })
    .await;

    let failing_took = started.elapsed();

    let refused_lines = |text: &str| {
        text.lines()
            .filter(|l| l.contains("WARN") && l.contains("agent refused"))
            .count()
    };
    let summaries = |text: &str| -> Vec<usize> {
        text.lines()
            .filter(|l| l.contains("more agent handshakes failed"))
            .map(|l| field(l, "suppressed").parse().unwrap())
            .collect()
    };
    // The summary comes at the end of the window, even with no further failure, and with
    // the lines logged one by one it accounts for every failure.
    eventually("the summary of the failures not logged", || {
        let text = captured.text();
        refused_lines(&text) + summaries(&text).iter().sum::<usize>() == FAILURES
    })
    .await;
    let text = captured.text();
    let logged = refused_lines(&text);
    let summed = summaries(&text);
    eprintln!(
        "{FAILURES} failures in {failing_took:?}: {logged} lines one by one, summaries {summed:?}"
    );
    // Ten lines per 10 s window, for the windows the failures spanned.
    let windows = failing_took.as_secs() as usize / 10 + 2;
    assert!(
        logged <= 10 * windows,
        "{logged} lines for {FAILURES} failures"
    );
    assert!(!summed.is_empty());
    let summary = text
        .lines()
        .find(|l| l.contains("more agent handshakes failed"))
        .unwrap();
    assert!(
        summary.contains("WARN") && summary.contains("tls="),
        "{summary}"
    );

    // A good agent still registers, and says so.
    let token = world.agent_token("acme/prod");
    let agent = world.connect_agent("acme/prod", "edge", &token, 1).await;
    eventually("the connected line", || {
        captured.text().contains("agent connected")
    })
    .await;
    agent.stop().await;
    world.stop().await;
}
