//! Agent registration: every refusal has its own close code and metric, and refused agents do
//! not disturb the agents that are allowed in.

use std::time::{Duration, SystemTime};

use crate::common::*;
use rna::agent::SessionError;
use rna::auth::{Scope, TokenStore};
use rna::certs::Ca;
use rna::proto::CloseCode;
use rna::transport::ClientTls;

const TENANT: &str = "acme/prod";

/// Starts an agent and waits for its first refusal.
async fn refusal(world: &World, config: rna::agent::AgentConfig) -> SessionError {
    let agent = world.spawn_agent(config);
    let status = within(
        "a refusal",
        agent.handle.wait_until(|s| s.last_error.is_some()),
    )
    .await;
    assert_eq!(
        status.sessions_total, 0,
        "a refused agent must never get a session"
    );
    agent.stop().await;
    status.last_error.unwrap()
}

fn rejected_code(err: &SessionError) -> CloseCode {
    match err {
        SessionError::Rejected { code, .. } => *code,
        other => panic!("expected a typed rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_agents_get_precise_codes_and_good_agents_still_connect() {
    let world = World::start().await;
    let good = world.agent_token(TENANT);
    let _ok = world.connect_agent(TENANT, "good-agent", &good, 1).await;

    // A certificate from another CA: TLS refuses it before any message.
    let other_ca = Ca::generate("someone else's CA").unwrap();
    let foreign = other_ca.issue_agent("intruder").unwrap();
    let tls =
        ClientTls::from_pem(&world.ca.cert_pem(), &foreign.cert_pem, &foreign.key_pem).unwrap();
    let err = refusal(&world, world.agent_config_with_tls("intruder", &good, tls)).await;
    assert!(matches!(err, SessionError::Tls(_)), "{err:?}");
    assert!(world.hub.metrics().handshake_failures("tls") >= 1);

    // An expired certificate from the right CA.
    let now = SystemTime::now();
    let expired = world
        .ca
        .issue_agent_with_validity(
            "stale",
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    let tls =
        ClientTls::from_pem(&world.ca.cert_pem(), &expired.cert_pem, &expired.key_pem).unwrap();
    let err = refusal(&world, world.agent_config_with_tls("stale", &good, tls)).await;
    assert!(matches!(err, SessionError::Tls(_)), "{err:?}");

    // A certificate that names a different agent.
    let other_name = world.ca.issue_agent("someone-else").unwrap();
    let tls = ClientTls::from_pem(
        &world.ca.cert_pem(),
        &other_name.cert_pem,
        &other_name.key_pem,
    )
    .unwrap();
    let err = refusal(&world, world.agent_config_with_tls("impostor", &good, tls)).await;
    assert_eq!(rejected_code(&err), CloseCode::CertificateMismatch, "{err}");
    assert_eq!(
        world
            .hub
            .metrics()
            .handshake_failures("certificate_mismatch"),
        1
    );

    // A token without connect:agentHub.
    let proxy_only = world.token(TENANT, &[Scope::Proxy]);
    let err = refusal(&world, world.agent_config("no-scope", &proxy_only)).await;
    assert_eq!(rejected_code(&err), CloseCode::MissingScope, "{err}");
    assert!(err.to_string().contains("connect:agentHub"), "{err}");

    // An expired token: created an hour ago with a one-minute lifetime.
    let expired_token = {
        let mut store = TokenStore::load(&world.tokens).unwrap();
        let (secret, _) = store
            .create(
                TENANT.parse().unwrap(),
                vec![Scope::ConnectAgentHub],
                Some(Duration::from_secs(60)),
                None,
                SystemTime::now() - Duration::from_secs(3600),
            )
            .unwrap();
        store.save(&world.tokens).unwrap();
        world.hub.reload_tokens().unwrap();
        secret.expose().to_string()
    };
    let err = refusal(&world, world.agent_config("expired", &expired_token)).await;
    assert_eq!(rejected_code(&err), CloseCode::TokenExpired, "{err}");

    // A revoked token.
    let revoked = world.agent_token(TENANT);
    world.revoke(&revoked);
    let err = refusal(&world, world.agent_config("revoked", &revoked)).await;
    assert_eq!(rejected_code(&err), CloseCode::TokenRevoked, "{err}");

    // A token that is not one.
    let err = refusal(&world, world.agent_config("garbage", "rna_not_a_token")).await;
    assert_eq!(rejected_code(&err), CloseCode::BadToken, "{err}");

    let m = world.hub.metrics();
    for (label, code) in [
        ("missing_scope", CloseCode::MissingScope),
        ("token_expired", CloseCode::TokenExpired),
        ("token_revoked", CloseCode::TokenRevoked),
        ("bad_token", CloseCode::BadToken),
    ] {
        assert!(m.handshake_failures(label) >= 1, "{label} ({code})");
    }
    // Only the good agent is registered, and it still works.
    assert_eq!(world.hub.registry().len(), 1);
    let http = http_server().await;
    let s = socks_connect(world.socks, "good-agent", &good, Dest::Ip(http)).await;
    assert!(s.is_ok());
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_a_token_closes_its_session_and_refuses_socks() {
    let world = World::start().await;
    let agent_token = world.agent_token(TENANT);
    let proxy_token = world.token(TENANT, &[Scope::Proxy]);
    let agent = world.connect_agent(TENANT, "edge", &agent_token, 1).await;
    let http = http_server().await;
    assert!(
        socks_connect(world.socks, "edge", &proxy_token, Dest::Ip(http))
            .await
            .is_ok()
    );

    // Revoke the proxy token: new SOCKS connections fail at once.
    world.revoke(&proxy_token);
    assert_eq!(
        socks_connect(world.socks, "edge", &proxy_token, Dest::Ip(http))
            .await
            .err(),
        Some(0xff)
    );

    // Revoke the agent's token: its session is closed and it cannot come back.
    world.revoke(&agent_token);
    world.wait_sessions(TENANT, "edge", 0).await;
    assert_refused_and_counted(&world, &agent, CloseCode::TokenRevoked, "token_revoked").await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_store_changes_are_picked_up_without_a_signal() {
    let world = World::start().await;
    let agent_token = world.agent_token(TENANT);
    let _agent = world.connect_agent(TENANT, "edge", &agent_token, 1).await;
    let http = http_server().await;

    // Another process (`rna token create`) writes the store; the hub follows the file.
    let mut reloads = world.hub.token_reloads();
    reloads.borrow_and_update();
    let mut store = TokenStore::load(&world.tokens).unwrap();
    let (secret, _) = store
        .create(
            TENANT.parse().unwrap(),
            vec![Scope::Proxy],
            None,
            None,
            SystemTime::now(),
        )
        .unwrap();
    store.save(&world.tokens).unwrap();
    let token = secret.expose().to_string();
    within("the hub to notice the new store", reloads.changed())
        .await
        .unwrap();
    assert!(socks_connect(world.socks, "edge", &token, Dest::Ip(http))
        .await
        .is_ok());
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_that_expires_closes_its_session_without_a_store_change() {
    let world = World::start().await;
    let token = world.token_with_ttl(
        TENANT,
        &[Scope::ConnectAgentHub],
        Some(Duration::from_secs(2)),
    );
    let agent = world.connect_agent(TENANT, "short-lived", &token, 1).await;
    world.wait_sessions(TENANT, "short-lived", 0).await;
    assert_refused_and_counted(&world, &agent, CloseCode::TokenExpired, "token_expired").await;
    world.stop().await;
}

/// The agent was refused with `code` and stays down; the hub counted one session closed for
/// `reason`.
async fn assert_refused_and_counted(
    world: &World,
    agent: &TestAgent,
    code: CloseCode,
    reason: &str,
) {
    let status = within(
        "the agent to be refused",
        agent.handle.wait_until(
            |s| matches!(&s.last_error, Some(SessionError::Rejected { code: c, .. }) if *c == code),
        ),
    )
    .await;
    assert_eq!(status.connected, 0);
    let metrics = world.hub.metrics().render();
    let line = format!(
        r#"rna_agent_sessions_total{{event="closed",reason="{reason}",transport="quic"}} 1"#
    );
    assert!(metrics.contains(&line), "{line} in {metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tls_phase_has_its_own_short_deadline() {
    let world = World::start_with(|c| {
        c.caps.tls_timeout = Duration::from_secs(1);
        c.caps.hello_timeout = Duration::from_secs(30);
    })
    .await;

    // A client whose first Initial reaches the hub and nothing after: a relay forwards that
    // one datagram and drops everything else, both ways.
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let hub = world.quic;
    let (forwarded_tx, forwarded) = tokio::sync::oneshot::channel();
    let relay_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        let (n, _) = relay.recv_from(&mut buf).await.unwrap();
        relay.send_to(&buf[..n], hub).await.unwrap();
        let _ = forwarded_tx.send(std::time::Instant::now());
        loop {
            if relay.recv_from(&mut buf).await.is_err() {
                break;
            }
        }
    });
    let cert = world.ca.issue_agent("mute").unwrap();
    let tls = ClientTls::from_pem(&world.ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
    let endpoint =
        rna::transport::agent_endpoint(relay_addr, &tls, &rna::transport::Limits::default())
            .unwrap();
    let _connecting = endpoint.connect(relay_addr, "localhost").unwrap();
    let sent = within("the Initial to be forwarded", forwarded)
        .await
        .unwrap();

    let metrics = world.hub.metrics().clone();
    eventually("the TLS deadline", || {
        metrics.handshake_failures("tls_timeout") == 1
    })
    .await;
    let took = sent.elapsed();
    eprintln!("a handshake stuck in TLS was given up after {took:?}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    // Far below the 30 s allowed for Hello, and below the old 10 s budget for both.
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(metrics.handshake_failures("timeout"), 0);

    // The slot is free: an agent registers.
    let token = world.agent_token(TENANT);
    let agent = world.connect_agent(TENANT, "after", &token, 1).await;
    relay_task.abort();
    agent.stop().await;
    world.stop().await;
}

/// Writes `token` to a file the way an operator does (mode 0600) and returns its path.
fn write_token_file(world: &World, file: &str, token: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = world.dir.path().join(file);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The id (`rna_<id>_…`) of a token.
fn token_id(token: &str) -> String {
    token.split('_').nth(1).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_token_is_used_without_restarting_the_agent() {
    let world = World::start().await;
    let old = world.agent_token(TENANT);
    let file = write_token_file(&world, "token.txt", &old);
    let mut config = world.agent_config("rotating", &old);
    config.token_file = Some(file.clone());
    // The pacing an operator gets, not the tests' faster one.
    config.backoff = rna::agent::Backoff::default();
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, "rotating", 1).await;

    // Rotate in the order of docs/operations.md: revoke the old token (the hub closes the
    // session and refuses the agent's quick retry), then write the new one into the file.
    world.revoke(&old);
    within(
        "the old token to be refused",
        agent.handle.wait_until(|s| {
            matches!(&s.last_error, Some(SessionError::Rejected { code, .. })
                if *code == CloseCode::TokenRevoked)
        }),
    )
    .await;
    let new = world.agent_token(TENANT);
    let written = std::time::Instant::now();
    write_token_file(&world, "token.txt", &new);
    world.wait_sessions(TENANT, "rotating", 1).await;
    let took = written.elapsed();
    let tenant = TENANT.parse().unwrap();
    let sessions = world.hub.registry().sessions_of(&tenant, "rotating");
    assert_eq!(sessions[0].token_id, token_id(&new));
    // The first retry after a refusal comes within 1 s (the second within 2 s).
    assert!(took < Duration::from_secs(6), "reconnected after {took:?}");
    eprintln!("reconnected with the new token {took:?} after it was written");
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_added_to_the_store_is_accepted_within_seconds_without_polling() {
    // Polling so slow that only the store watch can explain a reload.
    let world = World::start_with(|c| c.token_poll = Duration::from_secs(3600)).await;
    // `rna token create` prints a token; the agent starts before the hub has seen it.
    let mut store = TokenStore::load(&world.tokens).unwrap();
    let (secret, _) = store
        .create(
            TENANT.parse().unwrap(),
            vec![Scope::ConnectAgentHub],
            None,
            None,
            SystemTime::now(),
        )
        .unwrap();
    let token = secret.expose().to_string();
    let mut config = world.agent_config("fresh", &token);
    config.backoff = rna::agent::Backoff::default();
    let agent = world.spawn_agent(config);
    let status = within(
        "the unknown token to be refused",
        agent.handle.wait_until(|s| s.last_error.is_some()),
    )
    .await;
    assert!(
        matches!(&status.last_error, Some(SessionError::Rejected { code, .. })
            if *code == CloseCode::BadToken),
        "{status:?}"
    );

    // Now the store file gets the token, as `rna token create` saves it.
    let mut reloads = world.hub.token_reloads();
    reloads.borrow_and_update();
    let saved = std::time::Instant::now();
    store.save(&world.tokens).unwrap();
    within("the hub to see the store change", reloads.changed())
        .await
        .unwrap();
    let seen = saved.elapsed();
    world.wait_sessions(TENANT, "fresh", 1).await;
    let accepted = saved.elapsed();
    assert!(seen < Duration::from_secs(2), "store seen after {seen:?}");
    assert!(
        accepted < Duration::from_secs(4),
        "accepted after {accepted:?}"
    );
    eprintln!("store change seen after {seen:?}, agent accepted after {accepted:?}");
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_hub_listening_is_reported_as_quic_over_udp_with_what_to_check() {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    // A UDP port where nothing answers: bound, never read.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut config = world.agent_config("lonely", &token);
    config.hubs = vec![format!("127.0.0.1:{port}").parse().unwrap()];
    // QUIC only: `auto` would go on to TCP (its message is in tests/it/fallback.rs).
    config.transport = rna::agent::TransportMode::Quic;
    config.limits.handshake_timeout = Duration::from_millis(500);
    let err = refusal(&world, config).await;
    let text = err.to_string();
    assert!(matches!(err, SessionError::Timeout { .. }), "{err:?}");
    for part in [
        format!("no answer from the hub at 127.0.0.1:{port} within 500ms"),
        "QUIC, which is UDP".to_string(),
        format!("listening on UDP port {port}"),
        "firewalls".to_string(),
    ] {
        assert!(text.contains(&part), "{part:?} in {text}");
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_hub_is_reported_with_the_wait_the_agent_really_allowed() {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut config = world.agent_config("patient", &token);
    config.hubs = vec![format!("127.0.0.1:{port}").parse().unwrap()];
    // QUIC only: `auto` would try TCP after its fallback time (tests/it/fallback.rs).
    config.transport = rna::agent::TransportMode::Quic;
    // The QUIC idle timeout is the shorter bound here, so quinn gives up first (TimedOut)
    // and the message must name that wait, not the longer handshake timeout nor zero.
    config.limits.handshake_timeout = Duration::from_secs(20);
    config.limits.idle_timeout = Duration::from_millis(700);
    let err = refusal(&world, config).await;
    assert_eq!(
        err,
        SessionError::Timeout {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            after: Duration::from_millis(700),
        }
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "no answer from the hub at 127.0.0.1:{port} within 700ms"
        )),
        "{text}"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_reload_retries_at_once_instead_of_waiting_out_the_backoff() {
    let world = World::start().await;
    let file = write_token_file(&world, "token.txt", "rna_000000000000_unknown");
    let mut config = world.agent_config("patient", "rna_000000000000_unknown");
    config.token_file = Some(file);
    // A refusal backoff far longer than the test may take.
    config.backoff.refused = Duration::from_secs(60);
    config.backoff.refused_max = Duration::from_secs(60);
    let agent = world.spawn_agent(config);
    within(
        "the unknown token to be refused",
        agent.handle.wait_until(|s| s.last_error.is_some()),
    )
    .await;
    let token = world.agent_token(TENANT);
    write_token_file(&world, "token.txt", &token);
    // What SIGHUP does in `rna agent`.
    let reloaded = std::time::Instant::now();
    agent.handle.reload_token().unwrap();
    world.wait_sessions(TENANT, "patient", 1).await;
    assert!(
        reloaded.elapsed() < Duration::from_secs(10),
        "{:?}",
        reloaded.elapsed()
    );
    agent.stop().await;
    world.stop().await;
}
