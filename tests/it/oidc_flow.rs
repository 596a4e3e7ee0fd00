//! OIDC identities through the hub, against the real issuer of tests/oidc (npm's
//! `oidc-provider`, keys through discovery): a JWT is accepted wherever a token is (the
//! agent's Hello, the admin API, the status page) with the same scopes and tenants; a JWT
//! session is closed when its token expires; a rotated issuer key is picked up without a
//! hub restart.

use std::time::Duration;

use crate::common::*;
use crate::fake_kube::FakeKube;
use crate::oidc::{part, start_issuer, TestIssuer, AUDIENCE};
use rna::agent::kube::{KubeSettings, KubeSource};
use rna::agent::{AgentConfig, SessionError, TransportMode};
use rna::auth::Scope;
use rna::oidc::{ClientCredentials, TokenEndpoint};
use rna::proto::CloseCode;
use rna::transport::proxy::{NoProxy, ProxySettings};

/// A hub trusting `issuer`, with unknown key ids allowed to trigger a key fetch every second
/// (the default is 10 s; a test need not wait that long).
async fn world_trusting(issuer: &TestIssuer) -> World {
    let config = issuer.config();
    World::start_with(move |c| {
        c.oidc_issuers = vec![config];
        c.oidc_tuning.min_refresh_interval = Duration::from_secs(1);
    })
    .await
}

/// The `error` of a JSON refusal.
fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwts_are_accepted_with_the_same_scopes_and_tenants_as_tokens() {
    let issuer = start_issuer(120).await;
    let other = start_issuer(120).await;
    let world = world_trusting(&issuer).await;

    // An agent presenting a JWT with connect:agentHub registers in the tenant its claim names.
    let agent_jwt = issuer
        .token(&issuer.client("edge", "connect:agentHub"))
        .await;
    assert_eq!(part(&agent_jwt, 1)["rna_tenant"], "acme/prod");
    let agent = world
        .connect_agent("acme/prod", "edge", &agent_jwt, 1)
        .await;
    // Its session is known by issuer and subject, never by the token text.
    let session = world
        .hub
        .registry()
        .sessions()
        .into_iter()
        .find(|s| s.name == "edge")
        .expect("edge's session");
    assert_eq!(session.token_id, format!("oidc:{}#edge", issuer.url));
    // Valid until exp plus the issuer's leeway (5 s in these tests).
    assert_eq!(
        session.credential_expiry(),
        part(&agent_jwt, 1)["exp"].as_i64().unwrap() + 5
    );

    // SOCKS through it works (with an opaque proxy token of the same tenant: a JWT does not
    // fit in an RFC 1929 password).
    let http = http_server().await;
    let proxy = world.token("acme/prod", &[Scope::Proxy]);
    if have_curl() {
        let (code, body) = curl(
            world.socks,
            "edge",
            &proxy,
            &[&format!("http://{http}/bytes/1000")],
        )
        .await;
        assert_eq!(code, 0);
        assert_eq!(body.len(), 1000);
    }
    assert!(socks_connect(world.socks, "edge", &proxy, Dest::Ip(http))
        .await
        .is_ok());

    // The admin API accepts a JWT with read:infra:data and shows its tenant's agents.
    let reader = issuer
        .token(&issuer.client("edge", "read:infra:data"))
        .await;
    let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&reader)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"edge\""), "{body}");
    // So does the client `rna agents` and `rna kube` use.
    let answer = get(&client(&world, &reader), "/api/v1/agents").await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.json()["agents"][0]["name"] == "edge",
        "{:?}",
        answer.json()
    );
    // So does the status page.
    let (status, body) = http_get_as(world.api, "/", Some(&reader)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("edge"), "{body}");

    // A JWT of another tenant sees nothing of acme/prod.
    let globex = issuer
        .token(&issuer.client("globex", "read:infra:data"))
        .await;
    assert_eq!(part(&globex, 1)["rna_tenant"], "globex/prod");
    let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&globex)).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("edge"), "{body}");
    let (status, body) =
        http_get_as(world.api, "/api/v1/agents/edge/inventory", Some(&globex)).await;
    assert_eq!(status, 404, "{body}");

    // Refused, each with its own status and message.
    let no_scope = issuer
        .token(&issuer.client("edge", "connect:agentHub"))
        .await;
    let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&no_scope)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_of(&body), "JWT lacks scope read:infra:data");

    let mut wrong_aud = issuer.client("edge", "read:infra:data");
    wrong_aud.resource = Some("https://other.example".into());
    let wrong_aud = issuer.token(&wrong_aud).await;
    let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&wrong_aud)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        error_of(&body),
        format!("JWT audience is not accepted by issuer {}", issuer.url)
    );

    let foreign = other.token(&other.client("edge", "read:infra:data")).await;
    let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&foreign)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        error_of(&body),
        format!("JWT issuer {:?} is not trusted", other.url)
    );

    // An agent whose JWT lacks connect:agentHub is refused missing_scope; the first agent
    // keeps serving.
    let reader_agent = world.spawn_agent(world.agent_config("reader", &reader));
    within(
        "the agent without connect:agentHub to be refused",
        reader_agent.handle.wait_until(|s| {
            matches!(&s.last_error,
                Some(SessionError::Rejected { code, .. }) if *code == CloseCode::MissingScope)
        }),
    )
    .await;
    assert!(socks_connect(world.socks, "edge", &proxy, Dest::Ip(http))
        .await
        .is_ok());

    // Counted by trusted issuer and result; a foreign token's claimed issuer is no label.
    let m = world.hub.metrics();
    assert!(m.oidc_tokens(&issuer.url, "accepted") >= 4);
    assert_eq!(m.oidc_tokens(&issuer.url, "wrong_audience"), 1);
    assert_eq!(m.oidc_tokens("untrusted", "untrusted_issuer"), 1);
    assert_eq!(m.oidc_tokens(&other.url, "untrusted_issuer"), 0);
    assert!(m.oidc_tokens(&issuer.url, "missing_scope") >= 2);
    let rendered = m.render();
    assert!(
        rendered.contains(&format!(
            r#"rna_oidc_tokens_total{{issuer="{}",result="wrong_audience"}} 1"#,
            issuer.url
        )),
        "{rendered}"
    );

    // None of these JWTs would fit in an RFC 1929 password (255 bytes).
    let lengths = [agent_jwt.len(), reader.len(), globex.len()];
    eprintln!("JWT lengths from the test issuer (ES256): {lengths:?}");
    assert!(lengths.iter().all(|&n| n > 255), "{lengths:?}");

    reader_agent.stop().await;
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jwt_session_is_closed_when_its_token_expires() {
    // Tokens live 4 s; with the issuer's leeway (5 s) they verify for 9 s, and the session is
    // closed once that has passed, told token_expired; a reconnect with the same token would
    // be refused in the handshake, so exactly one session is closed.
    let issuer = start_issuer(4).await;
    let world = world_trusting(&issuer).await;
    let jwt = issuer
        .token(&issuer.client("edge", "connect:agentHub"))
        .await;
    let agent = world.connect_agent("acme/prod", "short", &jwt, 1).await;
    // Still there after a few token polls: the store knowing nothing of a JWT is no reason
    // to close its session.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        world
            .hub
            .registry()
            .count(&"acme/prod".parse().unwrap(), "short"),
        1
    );
    world.wait_sessions("acme/prod", "short", 0).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(now > part(&jwt, 1)["exp"].as_i64().unwrap() + 5);
    within(
        "the agent to be told its JWT expired",
        agent.handle.wait_until(|s| {
            matches!(&s.last_error,
                Some(SessionError::Rejected { code, .. }) if *code == CloseCode::TokenExpired)
        }),
    )
    .await;
    let metrics = world.hub.metrics().render();
    let line =
        r#"rna_agent_sessions_total{event="closed",reason="token_expired",transport="quic"} 1"#;
    assert!(metrics.contains(line), "{line} in {metrics}");
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_issuer_key_is_accepted_without_a_hub_restart() {
    let issuer = start_issuer(120).await;
    let world = world_trusting(&issuer).await;
    let client = issuer.client("edge", "read:infra:data");
    let before = issuer.token(&client).await;
    let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&before)).await;
    assert_eq!(status, 200, "{body}");

    let kid = issuer.rotate().await;
    let after = issuer.token(&client).await;
    assert_eq!(part(&after, 0)["kid"].as_str(), Some(kid.as_str()));
    // The new kid makes the hub fetch the issuer's keys again (at most once a second here):
    // accepted within a bound, without a restart.
    eventually_async(
        "a token signed with the rotated key to be accepted",
        async || {
            http_get_as(world.api, "/api/v1/agents", Some(&after))
                .await
                .0
                == 200
        },
    )
    .await;
    // Tokens signed with the old key, still published, keep working.
    let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&before)).await;
    assert_eq!(status, 200, "{body}");
    world.stop().await;
}

/// A session registered by hand with `token` (Hello on the control stream, Welcome read),
/// which keeps itself heard with a Ping every 300 ms and sends each token that arrives on
/// the returned channel as `Reauthenticate`. Returns the session, its id and the sender.
async fn hand_session(
    world: &World,
    name: &str,
    token: &str,
) -> (
    rna::transport::session::Session,
    u64,
    tokio::sync::mpsc::UnboundedSender<String>,
) {
    use futures_util::StreamExt as _;
    use rna::identity::Secret;
    use rna::proto::codec::encode;
    use rna::proto::Control;

    let raw = world
        .raw_session(name, rna::agent::TransportMode::Quic)
        .await;
    let session = raw.session.clone();
    let (mut send, mut reader, welcome) = raw.hello(name, token, vec![]).await;
    let id = welcome.session_id;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let _raw = raw;
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        let mut seq = 0;
        loop {
            let frame = tokio::select! {
                _ = tick.tick() => { seq += 1; Control::Ping { seq } }
                token = rx.recv() => match token {
                    Some(t) => Control::Reauthenticate { token: Secret::new(t) },
                    None => return,
                },
                // The hub's pings: read and dropped, so its writes never stall.
                frame = reader.next() => match frame {
                    Some(Ok(_)) => continue,
                    _ => return,
                },
            };
            if send.write_all(&encode(&frame).unwrap()).await.is_err() {
                return;
            }
        }
    });
    (session, id, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_outlives_its_jwt_when_the_agent_reauthenticates() {
    // Tokens live 4 s and verify for 9 s (leeway 5 s).
    let issuer = start_issuer(4).await;
    let world = world_trusting(&issuer).await;
    let edge = issuer.client("edge", "connect:agentHub");
    let first = issuer.token(&edge).await;
    let first_until = part(&first, 1)["exp"].as_i64().unwrap() + 5;
    let (session, id, renew) = hand_session(&world, "renewing", &first).await;
    let registered = || {
        world
            .hub
            .registry()
            .sessions()
            .into_iter()
            .find(|s| s.name == "renewing")
    };
    assert_eq!(registered().map(|s| s.id), Some(id));

    // Renewed twice before each token's end, each with a fresh JWT of the same client.
    let mut until = first_until;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let next = issuer.token(&edge).await;
        let next_until = part(&next, 1)["exp"].as_i64().unwrap() + 5;
        renew.send(next).unwrap();
        eventually("the hub to take the renewed token", || {
            registered().is_some_and(|s| s.credential_expiry() == next_until)
        })
        .await;
        until = next_until;
    }
    // Past the first token's end, the same session (same id) is still registered.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    eventually("the first token's end to pass", || now() > first_until + 1).await;
    assert_eq!(registered().map(|s| s.id), Some(id), "no reconnect");
    assert!(session.close_reason().is_none());

    // A renewal naming another client (another tenant too) closes the session bad_token.
    let globex = issuer
        .token(&issuer.client("globex", "connect:agentHub"))
        .await;
    renew.send(globex).unwrap();
    let end = within("the session to be closed", session.closed()).await;
    assert!(
        matches!(&end, rna::transport::session::SessionEnd::ClosedByPeer { code, reason }
            if *code == u64::from(CloseCode::BadToken.code()) && reason.contains("another identity")),
        "{end:?}"
    );
    assert!(now() <= until, "closed for the identity, not for expiry");
    world.wait_sessions("acme/prod", "renewing", 0).await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_renewal_closes_the_session_with_its_code() {
    let issuer = start_issuer(120).await;
    let world = world_trusting(&issuer).await;
    let first = issuer
        .token(&issuer.client("edge", "connect:agentHub"))
        .await;
    let (session, _, renew) = hand_session(&world, "renewing", &first).await;
    // A fresh token of the same client without connect:agentHub: missing_scope.
    let reader = issuer
        .token(&issuer.client("edge", "read:infra:data"))
        .await;
    renew.send(reader).unwrap();
    let end = within("the session to be closed", session.closed()).await;
    assert!(
        matches!(&end, rna::transport::session::SessionEnd::ClosedByPeer { code, .. }
            if *code == u64::from(CloseCode::MissingScope.code())),
        "{end:?}"
    );
    assert!(
        world
            .hub
            .metrics()
            .oidc_tokens(&issuer.url, "missing_scope")
            >= 1
    );
    world.stop().await;
}

/// An agent configuration for `name` that holds client credentials of `client` at `issuer`
/// (discovery of the token endpoint, the secret read from a file, the audience the hub
/// accepts sent as `audience` and `resource`, as `--oidc-audience` does) instead of a token.
fn oidc_agent(
    world: &World,
    issuer: &TestIssuer,
    name: &str,
    client: &str,
    secret: &str,
) -> AgentConfig {
    let mut config = world.agent_config(name, "");
    let secret_file = world.dir.path().join(format!("{name}-oidc-secret"));
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let mut creds = ClientCredentials::new(
        TokenEndpoint::Issuer(issuer.url.clone()),
        client,
        ClientCredentials::read_secret(&secret_file).unwrap(),
    );
    creds.ca = Some(issuer.ca.clone());
    creds.audience = Some(AUDIENCE.into());
    creds.resource = Some(AUDIENCE.into());
    config.oidc = Some(creds);
    config
}

/// The hub's session of agent `name` in acme/prod.
fn session_of(world: &World, name: &str) -> Option<std::sync::Arc<rna::hub::AgentSession>> {
    world
        .hub
        .registry()
        .sessions_of(&"acme/prod".parse().unwrap(), name)
        .into_iter()
        .next()
}

/// Seconds since the epoch.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_with_client_credentials_serves_socks_and_kubernetes() {
    let issuer = start_issuer(120).await;
    let world = world_trusting(&issuer).await;
    let fake = FakeKube::start().await;
    let mut config = oidc_agent(&world, &issuer, "edge", "edge", "edge-secret");
    let mut kube = KubeSettings::new(KubeSource::Kubeconfig {
        path: fake.kubeconfig(world.dir.path(), "kubeconfig", None),
        context: None,
    });
    kube.inventory_interval = Duration::from_secs(3600);
    config.kube = Some(kube);
    let agent = world.spawn_agent(config);
    world.wait_sessions("acme/prod", "edge", 1).await;
    wait_inventory(&world, "acme/prod", "edge").await;
    // Registered with a JWT of the issuer, in the tenant its claim names.
    let session = session_of(&world, "edge").expect("edge's session");
    assert_eq!(session.token_id, format!("oidc:{}#edge", issuer.url));

    // SOCKS through it, with curl.
    let http = http_server().await;
    let proxy = world.token("acme/prod", &[Scope::Proxy]);
    let (code, body) = curl(
        world.socks,
        "edge",
        &proxy,
        &[&format!("http://{http}/bytes/100000")],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(body, pattern(100_000));

    // A Kubernetes command through it, asked for with a JWT of read:infra:data.
    let reader = issuer
        .token(&issuer.client("edge", "read:infra:data"))
        .await;
    let answer = get(
        &client(&world, &reader),
        "/api/v1/agents/edge/kube/v1/Namespace/default",
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.json());
    assert_eq!(answer.json()["metadata"]["name"], "default");
    assert_eq!(agent.handle.status().sessions_total, 1);
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_renews_its_jwt_during_one_long_transfer_without_reconnecting() {
    // Tokens live 4 s (9 s with the hub's leeway): the agent renews about every 3.2 s.
    let issuer = start_issuer(4).await;
    let world = world_trusting(&issuer).await;
    let agent = world.spawn_agent(oidc_agent(&world, &issuer, "edge", "edge", "edge-secret"));
    world.wait_sessions("acme/prod", "edge", 1).await;
    world.wait_answering("acme/prod", "edge", 1).await;
    let session = session_of(&world, "edge").expect("edge's session");
    let id = session.id;
    let first_until = session.credential_expiry();

    // Every validity the hub records for the session while the transfer runs.
    let watching = tokio_util::sync::CancellationToken::new();
    let seen = {
        let (watching, session) = (watching.clone(), session.clone());
        tokio::spawn(async move {
            let mut seen = vec![session.credential_expiry()];
            while !watching.is_cancelled() {
                let now = session.credential_expiry();
                if seen.last() != Some(&now) {
                    seen.push(now);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    };
    // 64 MiB at 4 MB/s: about 17 s, several token lifetimes.
    const SIZE: usize = 64 << 20;
    let http = http_server().await;
    let proxy = world.token("acme/prod", &[Scope::Proxy]);
    let started = std::time::Instant::now();
    let (code, body) = curl(
        world.socks,
        "edge",
        &proxy,
        &["--limit-rate", "4M", &format!("http://{http}/bytes/{SIZE}")],
    )
    .await;
    let took = started.elapsed();
    watching.cancel();
    let seen = seen.await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(body.len(), SIZE);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(SIZE)), "byte-exact");
    eprintln!(
        "64 MiB in {took:?}; the session's validity moved {} times: {seen:?}",
        seen.len() - 1
    );
    assert!(seen.len() >= 4, "at least three renewals: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // The transfer outlived the first token and its leeway on one session: no reconnect.
    assert!(
        unix_now() > first_until,
        "the transfer ended before the first token did"
    );
    let now = session_of(&world, "edge").expect("edge's session");
    assert_eq!(now.id, id, "same session");
    assert_eq!(agent.handle.status().sessions_total, 1, "no reconnect");
    assert!(now.credential_expiry() > unix_now());
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_client_secret_is_one_readable_error_per_attempt_with_backoff() {
    let logs = process_logs();
    let issuer = start_issuer(120).await;
    let world = world_trusting(&issuer).await;
    let secret = "wr0ng-secret-never-logged";
    let agent = world.spawn_agent(oidc_agent(&world, &issuer, "edge", "edge", secret));
    let lines = || {
        logs.text()
            .lines()
            .filter(|l| l.contains(&issuer.url) && l.contains("no OIDC token"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // Attempts at 0 s, 1 s and 3 s: three lines, each pause twice the one before.
    eventually("three refused token requests", || lines().len() >= 3).await;
    let lines = lines();
    for (line, pause) in lines.iter().zip(["1s", "2s", "4s"]) {
        assert!(
            line.contains("ERROR")
                && line.contains("refused the request: invalid_client")
                && line.contains("client_id=edge")
                && line.contains(&format!("retry_in={pause}")),
            "{line}"
        );
    }
    assert!(!logs.text().contains(secret), "the secret is in the logs");
    // No session was attempted without a token, so the hub refused nothing.
    assert_eq!(agent.handle.status().sessions_total, 0);
    assert_eq!(agent.handle.status().last_error, None);
    assert!(session_of(&world, "edge").is_none());
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_issuer_leaves_sessions_until_their_token_ends_and_cached_keys_verify() {
    let logs = process_logs();
    // Tokens live 10 s, 15 s with the leeway.
    let mut issuer = start_issuer(10).await;
    let world = world_trusting(&issuer).await;
    let agent = world.spawn_agent(oidc_agent(&world, &issuer, "edge", "edge", "edge-secret"));
    world.wait_sessions("acme/prod", "edge", 1).await;
    world.wait_answering("acme/prod", "edge", 1).await;
    let until = session_of(&world, "edge").unwrap().credential_expiry();
    // A token the hub has not seen yet, obtained before the outage.
    let reader = issuer
        .token(&issuer.client("edge", "read:infra:data"))
        .await;
    issuer.stop().await;

    // The session keeps serving, and the unseen token verifies with the cached keys.
    let http = http_server().await;
    let proxy = world.token("acme/prod", &[Scope::Proxy]);
    assert!(socks_connect(world.socks, "edge", &proxy, Dest::Ip(http))
        .await
        .is_ok());
    let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&reader)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"edge\""), "{body}");

    // Renewals fail; the session is closed only once its token no longer verifies.
    tokio::time::timeout(
        Duration::from_secs(60),
        world
            .hub
            .registry()
            .wait_until(|r| r.count(&"acme/prod".parse().unwrap(), "edge") == 0),
    )
    .await
    .expect("the session to end with its token");
    assert!(unix_now() >= until, "closed before its token ended");
    // Counted once the close has gone out, just after the registry forgot the session.
    let line =
        r#"rna_agent_sessions_total{event="closed",reason="token_expired",transport="quic"} 1"#;
    eventually("the session to be counted closed token_expired", || {
        world.hub.metrics().render().contains(line)
    })
    .await;
    // The agent said its renewals failed, and that its token ended.
    let text = logs.text();
    let mine = |needle: &str| {
        text.lines()
            .any(|l| l.contains(needle) && l.contains(&issuer.url))
    };
    assert!(mine("no OIDC token"), "{text}");
    assert!(mine("the OIDC token has expired"), "{text}");
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_requests_go_through_the_agents_proxy_unless_no_proxy_names_the_issuer() {
    let issuer = start_issuer(120).await;
    let password = "pr0xy-pass";
    let tinyproxy = Tinyproxy::start("edge", password, issuer.port()).await;
    let world = world_trusting(&issuer).await;
    // QUIC to the hub (UDP, never proxied): only the token requests can use the proxy.
    let mut config = oidc_agent(&world, &issuer, "edge", "edge", "edge-secret");
    config.transport = TransportMode::Quic;
    config.proxy = ProxySettings {
        proxy: Some(tinyproxy.url(password)),
        no_proxy: NoProxy::default(),
    };
    let agent = world.spawn_agent(config);
    world.wait_sessions("acme/prod", "edge", 1).await;
    let connect = format!("CONNECT 127.0.0.1:{}", issuer.port());
    let log = tinyproxy.log();
    assert!(log.contains(&connect), "{log}");

    // A proxy that does not exist, with the issuer in NO_PROXY: tokens come directly.
    let mut direct = oidc_agent(&world, &issuer, "direct", "edge", "edge-secret");
    direct.transport = TransportMode::Quic;
    direct.proxy = ProxySettings {
        proxy: Some(
            rna::transport::proxy::ProxyUrl::parse(&format!("http://127.0.0.1:{}", closed_port()))
                .unwrap(),
        ),
        no_proxy: NoProxy::parse("127.0.0.1"),
    };
    let direct = world.spawn_agent(direct);
    world.wait_sessions("acme/prod", "direct", 1).await;
    direct.stop().await;
    agent.stop().await;
    world.stop().await;
}
