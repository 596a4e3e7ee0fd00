//! End-to-end: curl and raw SOCKS5 clients through an in-process hub and agent on loopback.
//! Each behaviour test body runs twice, with the agent on QUIC and on TLS over TCP
//! ([`on_both_transports!`]).

use std::time::Duration;

use crate::common::*;
use rna::agent::TransportMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TENANT: &str = "acme/prod";

on_both_transports!(curl_downloads_and_uploads_64_mib_exactly);
async fn curl_downloads_and_uploads_64_mib_exactly(transport: TransportMode) {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let _agent = world
        .connect_agent_over(TENANT, "prod-cluster", &token, 1, transport)
        .await;
    let http = http_server().await;
    let size = 64 * 1024 * 1024;

    // Download: the name is resolved by the agent (socks5h), never by the hub.
    let out = world.dir.path().join("download.bin");
    let url = format!("http://localhost:{}/bytes/{size}", http.port());
    let (code, _) = curl(
        world.socks,
        "prod-cluster",
        &token,
        &["-o", out.to_str().unwrap(), &url],
    )
    .await;
    assert_eq!(code, 0);
    let got = read(&out);
    assert_eq!(got.len(), size);
    assert_eq!(sha256_hex(&got), sha256_hex(&pattern(size)));

    // Upload: the server answers the SHA-256 of what it received.
    let body = world.dir.path().join("upload.bin");
    std::fs::write(&body, pattern(size)).unwrap();
    let url = format!("http://127.0.0.1:{}/sha256", http.port());
    let data = format!("@{}", body.display());
    let (code, answer) = curl(
        world.socks,
        "prod-cluster",
        &token,
        &["-H", "Expect:", "--data-binary", &data, &url],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        String::from_utf8(answer).unwrap(),
        sha256_hex(&pattern(size))
    );

    let agents = world.hub.registry().infos(None);
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].transport, transport.as_str());
    assert!(agents[0].bytes_in >= size as u64, "{agents:?}");
    assert!(agents[0].bytes_out >= size as u64, "{agents:?}");
    world.stop().await;
}

on_both_transports!(hundred_concurrent_curl_transfers_through_one_agent_are_exact);
async fn hundred_concurrent_curl_transfers_through_one_agent_are_exact(transport: TransportMode) {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let _agent = world
        .connect_agent_over(TENANT, "prod-cluster", &token, 1, transport)
        .await;
    let http = http_server().await;
    let size = 512 * 1024;
    let expected = sha256_hex(&pattern(size));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let out = world.dir.path().join(format!("par-{i}.bin"));
        let url = format!("http://127.0.0.1:{}/bytes/{size}", http.port());
        let socks = world.socks;
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let (code, _) = curl(
                socks,
                "prod-cluster",
                &token,
                &["-o", out.to_str().unwrap(), &url],
            )
            .await;
            (code, read(&out))
        }));
    }
    for task in tasks {
        let (code, body) = within("a concurrent transfer", task).await.unwrap();
        assert_eq!(code, 0);
        assert_eq!(sha256_hex(&body), expected);
    }
    world.stop().await;
}

on_both_transports!(half_close_keeps_the_other_direction_and_resets_propagate);
async fn half_close_keeps_the_other_direction_and_resets_propagate(transport: TransportMode) {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let _agent = world
        .connect_agent_over(TENANT, "prod-cluster", &token, 1, transport)
        .await;

    // Half-close: send, shut our write side, and still receive the whole answer.
    let server = half_close_server().await;
    let mut s = socks_connect(world.socks, "prod-cluster", &token, Dest::Ip(server))
        .await
        .unwrap();
    let payload = pattern(3 * 1024 * 1024 + 17);
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    within("half-closed answer", s.read_to_end(&mut answer))
        .await
        .unwrap();
    let expected_head = format!("{} {}\n", payload.len(), sha256_hex(&payload));
    assert!(answer.starts_with(expected_head.as_bytes()));
    assert_eq!(&answer[expected_head.len()..], &pattern(1 << 20)[..]);

    // A destination that resets: the client must see a reset, never a clean EOF.
    let server = reset_server().await;
    let mut s = socks_connect(world.socks, "prod-cluster", &token, Dest::Ip(server))
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = Vec::new();
    let result = within("reset", s.read_to_end(&mut buf)).await;
    let err = result.expect_err("a reset destination must not look like a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    world.stop().await;
}

on_both_transports!(socks_replies_are_precise);
async fn socks_replies_are_precise(transport: TransportMode) {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let other_token = world.agent_token("other/prod");
    let _agent = world
        .connect_agent_over(TENANT, "prod-cluster", &token, 1, transport)
        .await;
    let _other = world
        .connect_agent_over("other/prod", "other-cluster", &other_token, 1, transport)
        .await;
    let http = http_server().await;

    // Wrong password: curl reports a proxy handshake failure (exit 97).
    assert!(have_curl(), "curl must be installed (.ci/run installs it)");
    let url = format!("http://127.0.0.1:{}/", http.port());
    let wrong = "rna_000000000000_000000000000000000000000000000000000000000000000";
    let (code, _) = curl(world.socks, "prod-cluster", wrong, &[&url]).await;
    assert_eq!(code, 97);
    assert_eq!(
        socks_connect(world.socks, "prod-cluster", "not-a-token", Dest::Ip(http))
            .await
            .err(),
        Some(0xff)
    );
    // Unknown agent, and an agent of another tenant: the same 0x04.
    assert_eq!(
        socks_connect(world.socks, "nobody", &token, Dest::Ip(http))
            .await
            .err(),
        Some(0x04)
    );
    assert_eq!(
        socks_connect(world.socks, "other-cluster", &token, Dest::Ip(http))
            .await
            .err(),
        Some(0x04)
    );
    // Policy: cloud metadata is denied by default even when named.
    assert_eq!(
        socks_connect(
            world.socks,
            "prod-cluster",
            &token,
            Dest::Ip("169.254.169.254:80".parse().unwrap())
        )
        .await
        .err(),
        Some(0x02)
    );
    // Refused port.
    let closed = closed_port();
    assert_eq!(
        socks_connect(
            world.socks,
            "prod-cluster",
            &token,
            Dest::Name("127.0.0.1", closed)
        )
        .await
        .err(),
        Some(0x05)
    );
    // Outside the allow list (the test agent allows only 127.0.0.0/8).
    assert_eq!(
        socks_connect(
            world.socks,
            "prod-cluster",
            &token,
            Dest::Ip("192.0.2.1:80".parse().unwrap())
        )
        .await
        .err(),
        Some(0x02)
    );
    // BIND and UDP ASSOCIATE are not supported.
    assert_eq!(
        socks_command(world.socks, "prod-cluster", &token, 0x02, Dest::Ip(http))
            .await
            .err(),
        Some(0x07)
    );
    assert_eq!(
        socks_command(world.socks, "prod-cluster", &token, 0x03, Dest::Ip(http))
            .await
            .err(),
        Some(0x07)
    );
    // Name that does not resolve inside the agent's network.
    assert_eq!(
        socks_connect(
            world.socks,
            "prod-cluster",
            &token,
            Dest::Name("no-such-host.invalid", 80)
        )
        .await
        .err(),
        Some(0x04)
    );
    // And the hub still serves a valid request.
    let mut s = socks_connect(world.socks, "prod-cluster", &token, Dest::Ip(http))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("hello from the private network"));

    let m = world.hub.metrics();
    assert_eq!(m.socks_replies("host_unreachable"), 3);
    assert_eq!(m.socks_replies("not_allowed"), 2);
    assert_eq!(m.socks_replies("connection_refused"), 1);
    assert_eq!(m.socks_replies("command_not_supported"), 2);
    assert_eq!(m.socks_replies("succeeded"), 1);
    world.stop().await;
}

on_both_transports!(two_agents_with_one_name_share_streams_and_survive_one_loss);
async fn two_agents_with_one_name_share_streams_and_survive_one_loss(transport: TransportMode) {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let first = world.spawn_agent(world.agent_config_over("replicated", &token, transport));
    let _second = world.spawn_agent(world.agent_config_over("replicated", &token, transport));
    world.wait_sessions(TENANT, "replicated", 2).await;
    world.assert_transport(TENANT, "replicated", transport);
    let http = http_server().await;

    for _ in 0..10 {
        let (code, body) = curl(
            world.socks,
            "replicated",
            &token,
            &[&format!("http://127.0.0.1:{}/bytes/1000", http.port())],
        )
        .await;
        assert_eq!(code, 0);
        assert_eq!(body, pattern(1000));
    }
    let infos = world.hub.registry().infos(None);
    assert_eq!(infos.len(), 2);
    for info in &infos {
        assert_eq!(
            info.streams_total, 5,
            "streams must spread evenly: {infos:?}"
        );
    }

    first.stop().await;
    world.wait_sessions(TENANT, "replicated", 1).await;
    for _ in 0..5 {
        let (code, body) = curl(
            world.socks,
            "replicated",
            &token,
            &[&format!("http://127.0.0.1:{}/bytes/1000", http.port())],
        )
        .await;
        assert_eq!(code, 0);
        assert_eq!(body, pattern(1000));
    }
    world.stop().await;
}

on_both_transports!(agents_list_is_tenant_scoped);
async fn agents_list_is_tenant_scoped(transport: TransportMode) {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let other = world.agent_token("other/prod");
    let _a = world
        .connect_agent_over(TENANT, "prod-cluster", &token, 1, transport)
        .await;
    let _b = world
        .connect_agent_over("other/prod", "prod-cluster", &other, 1, transport)
        .await;
    let reader = world.token(TENANT, &[rna::auth::Scope::ReadInfraData]);
    let admin = world.token("ops/all", &[rna::auth::Scope::Admin]);

    let get = |bearer: Option<String>| {
        let url = format!("http://{}/api/v1/agents", world.api);
        async move {
            let mut cmd = tokio::process::Command::new("curl");
            cmd.args(["-s", "-w", "\n%{http_code}", &url]);
            if let Some(b) = bearer {
                cmd.args(["-H", &format!("Authorization: Bearer {b}")]);
            }
            let out = cmd.output().await.unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            let (body, code) = text.rsplit_once('\n').unwrap();
            (code.to_string(), body.to_string())
        }
    };
    let (code, body) = get(Some(reader)).await;
    assert_eq!(code, "200");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let agents = v["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{body}");
    assert_eq!(agents[0]["tenant"], TENANT);
    assert_eq!(agents[0]["name"], "prod-cluster");
    // The agents API names the transport the session really runs on.
    assert_eq!(agents[0]["transport"], transport.as_str(), "{body}");
    assert!(agents[0]["remote_address"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));

    let (code, body) = get(Some(admin)).await;
    assert_eq!(code, "200");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["agents"].as_array().unwrap().len(), 2);

    // The agent's own token lacks read:infra:data; no token at all is 401.
    assert_eq!(get(Some(token)).await.0, "403");
    assert_eq!(get(None).await.0, "401");
    assert_eq!(get(Some("rna_bad".into())).await.0, "401");

    // Metrics name every tenant, so they need a token with read:metrics.
    for (path, want) in [("/healthz", "200"), ("/readyz", "200"), ("/metrics", "401")] {
        let out = tokio::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}{path}", world.api),
            ])
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{path}");
    }
    let _ = Duration::ZERO;
    world.stop().await;
}

on_both_transports!(shutdown_drains_in_flight_streams_and_sends_agents_away);
async fn shutdown_drains_in_flight_streams_and_sends_agents_away(transport: TransportMode) {
    let mut world = World::start_with(|c| c.grace = Duration::from_secs(60)).await;
    let token = world.agent_token(TENANT);
    let agent = world
        .connect_agent_over(TENANT, "prod-cluster", &token, 1, transport)
        .await;
    let http = http_server().await;
    let size: usize = 32 * 1024 * 1024;

    let mut s = socks_connect(world.socks, "prod-cluster", &token, Dest::Ip(http))
        .await
        .unwrap();
    s.write_all(format!("GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    s.read_exact(&mut head).await.unwrap();

    world.begin_shutdown();
    // Draining: not ready, and no new SOCKS connections.
    let readyz = format!("http://{}/readyz", world.api);
    let code = eventually_some("readyz to turn 503", async || {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &readyz])
            .output()
            .await
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        (code != "200").then_some(code)
    })
    .await;
    assert_eq!(code, "503");
    assert!(tokio::net::TcpStream::connect(world.socks).await.is_err());

    // The in-flight transfer completes within the grace period.
    let mut rest = Vec::new();
    within("the in-flight transfer", s.read_to_end(&mut rest))
        .await
        .unwrap();
    // Like curl after a `Connection: close` response, the client closes its side too.
    drop(s);
    let mut all = head;
    all.extend_from_slice(&rest);
    let body_start = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(sha256_hex(&all[body_start..]), sha256_hex(&pattern(size)));

    world.wait_stopped().await;
    // The agent was told the hub is going away (and tries to reconnect at once).
    let status = within(
        "the agent to lose its session",
        agent.handle.wait_until(|s| s.connected == 0),
    )
    .await;
    assert_eq!(status.sessions_total, 1);
}

/// A curl download through the hub, writing to `out`, that runs until killed.
fn curl_download(
    socks: std::net::SocketAddr,
    token: &str,
    http: std::net::SocketAddr,
    out: &std::path::Path,
) -> tokio::process::Child {
    assert!(have_curl(), "curl must be installed (.ci/run installs it)");
    tokio::process::Command::new("curl")
        .args(["-sS", "--limit-rate", "4M", "-o"])
        .arg(out)
        .arg("--proxy")
        .arg(format!("socks5h://prod-cluster:{token}@{socks}"))
        .arg(format!(
            "http://127.0.0.1:{}/bytes/10000000000",
            http.port()
        ))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn curl")
}

fn size_of(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

on_both_transports!(revoking_a_proxy_token_cuts_its_transfers_within_two_seconds);
/// Revoking a `proxy` token resets the SOCKS connections it opened within 2 s, as it closes
/// agent sessions: a curl download in progress is cut, while another token's download
/// continues.
async fn revoking_a_proxy_token_cuts_its_transfers_within_two_seconds(transport: TransportMode) {
    let world = World::start().await;
    let agent_token = world.agent_token(TENANT);
    let _agent = world
        .connect_agent_over(TENANT, "prod-cluster", &agent_token, 1, transport)
        .await;
    let http = http_server().await;
    let revoked = world.token(TENANT, &[rna::auth::Scope::Proxy]);
    let kept = world.token(TENANT, &[rna::auth::Scope::Proxy]);
    let (cut_out, kept_out) = (
        world.dir.path().join("cut.bin"),
        world.dir.path().join("kept.bin"),
    );
    let mut cut = curl_download(world.socks, &revoked, http, &cut_out);
    let mut other = curl_download(world.socks, &kept, http, &kept_out);
    eventually("both downloads to be under way", || {
        size_of(&cut_out) > 1 << 20 && size_of(&kept_out) > 1 << 20
    })
    .await;

    let revoked_at = std::time::Instant::now();
    world.revoke(&revoked);
    let status = within("the revoked token's download to end", cut.wait())
        .await
        .unwrap();
    let took = revoked_at.elapsed();
    println!("download of the revoked token cut {took:?} after revocation");
    assert!(took < Duration::from_secs(2), "cut only after {took:?}");
    assert!(!status.success(), "the transfer must fail, not end cleanly");

    // The other token's download goes on.
    let at_cut = size_of(&kept_out);
    eventually("the other download to go on", || {
        size_of(&kept_out) > at_cut + (1 << 20)
    })
    .await;
    assert!(
        other.try_wait().unwrap().is_none(),
        "the other download must still run"
    );
    other.kill().await.unwrap();
    world.stop().await;
}

on_both_transports!(an_expired_proxy_token_cuts_its_transfers);
/// An expiring `proxy` token's connections are reset once it expires, without any change
/// to the store file (the hub's poll notices).
async fn an_expired_proxy_token_cuts_its_transfers(transport: TransportMode) {
    let world = World::start().await;
    let agent_token = world.agent_token(TENANT);
    let _agent = world
        .connect_agent_over(TENANT, "prod-cluster", &agent_token, 1, transport)
        .await;
    let http = http_server().await;
    let ttl = Duration::from_secs(3);
    let expiring = world.token_with_ttl(TENANT, &[rna::auth::Scope::Proxy], Some(ttl));
    let made = std::time::Instant::now();
    let mut s = download_in_progress(world.socks, "prod-cluster", &expiring, http).await;
    let ended = within("the expired token's transfer to be reset", drain(&mut s)).await;
    let took = made.elapsed();
    println!("transfer of a token with a {ttl:?} lifetime reset after {took:?}");
    assert!(ended.is_err(), "reset expected, got a clean end: {ended:?}");
    // Expiry is kept in whole seconds; the hub polls every 100 ms in tests.
    assert!(
        took < ttl + Duration::from_secs(3),
        "reset only after {took:?}"
    );
    world.stop().await;
}
