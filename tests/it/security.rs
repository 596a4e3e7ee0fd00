//! Security properties end to end: tenants never see each other's agents (in answers or in
//! timing), and the agent's policy refuses every spelling of a forbidden address, including
//! names that resolve to one. (Token revocation closing a live session is proven in
//! `handshake.rs`; no secret in trace-level logs in `secrets.rs`.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use rna::agent::Policy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ACME: &str = "acme/prod";
const GLOBEX: &str = "globex/prod";

async fn fetch(socks: SocketAddr, agent: &str, token: &str, dest: Dest<'_>) -> Result<Vec<u8>, u8> {
    socks_fetch(socks, agent, token, dest).await
}

/// The raw bytes of the hub's answer to a CONNECT for `agent`, and how long it took.
async fn raw_answer(
    socks: SocketAddr,
    agent: &str,
    token: &str,
    dest: SocketAddr,
) -> (Vec<u8>, Duration) {
    let mut s = TcpStream::connect(socks).await.unwrap();
    let mut hello = vec![5, 1, 2, 1, agent.len() as u8];
    hello.extend_from_slice(agent.as_bytes());
    hello.push(token.len() as u8);
    hello.extend_from_slice(token.as_bytes());
    s.write_all(&hello).await.unwrap();
    let mut auth = [0u8; 4];
    s.read_exact(&mut auth).await.unwrap();
    assert_eq!(auth, [5, 2, 1, 0], "authenticated");
    let SocketAddr::V4(v4) = dest else {
        panic!("IPv4 destination expected")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    let started = Instant::now();
    s.write_all(&req).await.unwrap();
    let mut answer = Vec::new();
    let _ = within("the answer", s.read_to_end(&mut answer)).await;
    (answer, started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_agent_name_in_two_tenants_stays_separate_and_invisible() {
    let world = World::start().await;
    let acme_http = http_server().await;
    let globex_http = http_server().await;
    let acme_token = world.agent_token(ACME);
    let globex_token = world.agent_token(GLOBEX);

    // Both tenants run an agent called "edge"; each may reach only its own server, so the
    // answers show which agent served a request.
    let mut acme_config = world.agent_config("edge", &acme_token);
    acme_config.policy = Policy::new(vec![format!("{acme_http}").parse().unwrap()], vec![]);
    let mut globex_config = world.agent_config("edge", &globex_token);
    globex_config.policy = Policy::new(vec![format!("{globex_http}").parse().unwrap()], vec![]);
    let acme = world.spawn_agent(acme_config);
    let globex = world.spawn_agent(globex_config);
    world.wait_sessions(ACME, "edge", 1).await;
    world.wait_sessions(GLOBEX, "edge", 1).await;
    // Only globex has "globex-only".
    let only = world.spawn_agent(world.agent_config("globex-only", &globex_token));
    world.wait_sessions(GLOBEX, "globex-only", 1).await;

    assert!(fetch(world.socks, "edge", &acme_token, Dest::Ip(acme_http))
        .await
        .is_ok());
    assert_eq!(
        fetch(world.socks, "edge", &acme_token, Dest::Ip(globex_http))
            .await
            .err(),
        Some(0x02),
        "acme's edge refuses globex's server: the request reached acme's agent"
    );
    assert!(
        fetch(world.socks, "edge", &globex_token, Dest::Ip(globex_http))
            .await
            .is_ok()
    );
    assert_eq!(
        fetch(world.socks, "edge", &globex_token, Dest::Ip(acme_http))
            .await
            .err(),
        Some(0x02)
    );

    // An agent of another tenant answers exactly like one that exists nowhere: same bytes,
    // and no timing difference beyond noise.
    let mut other = Vec::new();
    let mut missing = Vec::new();
    let mut answers = std::collections::HashSet::new();
    for _ in 0..25 {
        let (a, t) = raw_answer(world.socks, "globex-only", &acme_token, acme_http).await;
        answers.insert(a);
        other.push(t);
        let (a, t) = raw_answer(world.socks, "nowhere", &acme_token, acme_http).await;
        answers.insert(a);
        missing.push(t);
    }
    assert_eq!(answers.len(), 1, "answers differ: {answers:?}");
    let answer = answers.into_iter().next().unwrap();
    assert_eq!(&answer[..4], &[5, 0x04, 0, 1], "host unreachable");
    let (other, missing) = (median(other), median(missing));
    println!("median answer: other tenant's agent {other:?}, missing agent {missing:?}");
    let gap = other.abs_diff(missing);
    assert!(
        gap < Duration::from_millis(3) || gap < other.max(missing) / 2,
        "timing reveals the other tenant's agent: {other:?} vs {missing:?}"
    );

    only.stop().await;
    acme.stop().await;
    globex.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_spelling_of_a_forbidden_address_is_refused() {
    let world = World::start().await;
    let token = world.agent_token(ACME);
    let http = http_server().await;
    // The default policy: no allow list, so everything is allowed except the default-denied
    // ranges (cloud metadata, loopback, unspecified).
    let mut config = world.agent_config("edge", &token);
    config.policy = Policy::default();
    let agent = world.spawn_agent(config);
    world.wait_sessions(ACME, "edge", 1).await;
    let port = http.port();

    let cases: Vec<(String, Dest)> = vec![
        (
            "169.254.169.254".into(),
            Dest::Ip("169.254.169.254:80".parse().unwrap()),
        ),
        (
            "[::ffff:169.254.169.254]".into(),
            Dest::Ip("[::ffff:169.254.169.254]:80".parse().unwrap()),
        ),
        (
            "0.0.0.0".into(),
            Dest::Ip(SocketAddr::from(([0, 0, 0, 0], port))),
        ),
        ("[::]".into(), Dest::Ip(SocketAddr::from(([0u16; 8], port)))),
        ("127.0.0.1".into(), Dest::Ip(http)),
        (
            "[::1]".into(),
            Dest::Ip(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port))),
        ),
        ("name 127.1".into(), Dest::Name("127.1", port)),
        ("name 0".into(), Dest::Name("0", port)),
        ("decimal 2130706433".into(), Dest::Name("2130706433", port)),
        ("octal 0177.0.0.1".into(), Dest::Name("0177.0.0.1", port)),
        ("hex 0x7f.0.0.1".into(), Dest::Name("0x7f.0.0.1", port)),
        ("decimal metadata".into(), Dest::Name("2852039166", 80)),
        (
            "octal metadata".into(),
            Dest::Name("0251.0376.0251.0376", 80),
        ),
        ("hex metadata".into(), Dest::Name("0xa9fea9fe", 80)),
        (
            "name 169.254.169.254".into(),
            Dest::Name("169.254.169.254", 80),
        ),
        (
            "localhost resolves to loopback".into(),
            Dest::Name("localhost", port),
        ),
    ];
    for (what, dest) in cases {
        let reply = socks_connect(world.socks, "edge", &token, dest).await.err();
        assert_eq!(reply, Some(0x02), "{what} must be refused as not allowed");
    }
    let refused = agent.handle.metrics().render();
    assert!(refused.contains("outcome=\"not_allowed\""), "{refused}");

    // With the server's own address allowed, legacy spellings reach it: they are read as
    // the address they denote and judged as that address, not as a name.
    agent.handle.set_policy(Policy::new(
        vec![format!("{http}").parse().unwrap()],
        vec![],
    ));
    for name in ["127.1", "2130706433", "0177.0.0.1", "0x7f.1"] {
        let body = fetch(world.socks, "edge", &token, Dest::Name(name, port)).await;
        assert!(body.is_ok(), "{name}: {body:?}");
    }
    // Another port of the same address is still refused.
    assert_eq!(
        fetch(
            world.socks,
            "edge",
            &token,
            Dest::Name("127.1", closed_port())
        )
        .await
        .err(),
        Some(0x02)
    );
    agent.stop().await;
    world.stop().await;
}

/// Cloud metadata addresses beyond 169.254.169.254, link-local, and the IPv6 forms that carry
/// a forbidden IPv4 address are refused by the default policy before any connection attempt:
/// a listener on the loopback address they carry sees no connection, and the refusal comes
/// as "not allowed" (0x02), not as the timeout or unreachable a dial would end in. A broad
/// allow rule (a pod range holding Alibaba's metadata address) does not open them either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_and_embedded_ipv4_forms_are_refused_before_any_connect() {
    let world = World::start().await;
    let token = world.agent_token(ACME);
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = connections.clone();
    let listener = tcp_server(move |_s| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async {}
    })
    .await;
    let port = listener.port();
    let mut config = world.agent_config("edge", &token);
    config.policy = Policy::default();
    let agent = world.spawn_agent(config);
    world.wait_sessions(ACME, "edge", 1).await;

    let v6 = |text: &str, port: u16| Dest::Ip(SocketAddr::new(text.parse().unwrap(), port));
    let cases: Vec<(&str, Dest)> = vec![
        (
            "Alibaba Cloud metadata",
            Dest::Ip("100.100.100.200:80".parse().unwrap()),
        ),
        (
            "Azure WireServer",
            Dest::Ip("168.63.129.16:80".parse().unwrap()),
        ),
        ("GCP IPv6 metadata", v6("fd20:ce::254", 80)),
        ("NAT64 metadata", v6("64:ff9b::a9fe:a9fe", 80)),
        ("IPv4-compatible metadata", v6("::a9fe:a9fe", 80)),
        ("IPv6 link-local", v6("fe80::1", port)),
        (
            "IPv4 link-local",
            Dest::Ip(SocketAddr::from(([169, 254, 1, 1], port))),
        ),
        ("IPv4-compatible loopback", v6("::7f00:1", port)),
        ("NAT64 loopback", v6("64:ff9b::7f00:1", port)),
        ("IPv4-mapped loopback", v6("::ffff:127.0.0.1", port)),
    ];
    for (what, dest) in cases {
        let started = Instant::now();
        let reply = within(what, socks_connect(world.socks, "edge", &token, dest))
            .await
            .err();
        assert_eq!(reply, Some(0x02), "{what} must be refused as not allowed");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: refused after {:?}, as if dialed",
            started.elapsed()
        );
    }

    // A broad allow list, as an operator writes for a pod network, opens its ranges but not
    // the metadata or loopback addresses inside them or carried by IPv6 forms.
    agent.handle.set_policy(Policy::new(
        vec![
            "100.64.0.0/10".parse().unwrap(),
            "0.0.0.0/0".parse().unwrap(),
            "::/0".parse().unwrap(),
        ],
        vec![],
    ));
    for (what, dest) in [
        (
            "Alibaba Cloud metadata",
            Dest::Ip("100.100.100.200:80".parse().unwrap()),
        ),
        ("NAT64 loopback", v6("64:ff9b::7f00:1", port)),
        ("IPv4-compatible loopback", v6("::7f00:1", port)),
        ("IPv6 link-local", v6("fe80::1", port)),
    ] {
        let reply = within(what, socks_connect(world.socks, "edge", &token, dest))
            .await
            .err();
        assert_eq!(
            reply,
            Some(0x02),
            "{what} must stay refused under a broad allow list"
        );
    }
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a refused destination was connected to"
    );

    // Only a rule naming the exact address opens it: the listener is reached through the
    // NAT64-free forms once its address is allowed.
    agent.handle.set_policy(Policy::new(
        vec![format!("127.0.0.1:{port}").parse().unwrap()],
        vec![],
    ));
    assert!(
        socks_connect(world.socks, "edge", &token, v6("::ffff:127.0.0.1", port))
            .await
            .is_ok()
    );
    eventually("the allowed connection to arrive", || {
        connections.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    agent.stop().await;
    world.stop().await;
}

/// An `admin` token reaches any tenant's agent by naming the tenant in the SOCKS user name,
/// `agent@organization/environment`; without it, its own tenant. Any other token naming
/// another tenant gets exactly the answer of an agent that does not exist, and naming its
/// own tenant changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_tokens_name_a_tenant_in_the_socks_user() {
    let world = World::start().await;
    let http = http_server().await;
    let globex_token = world.agent_token(GLOBEX);
    let _globex = world.connect_agent(GLOBEX, "edge", &globex_token, 1).await;
    let acme_proxy = world.token(ACME, &[rna::auth::Scope::Proxy]);
    let admin = world.token(ACME, &[rna::auth::Scope::Admin]);

    assert!(
        fetch(world.socks, "edge@globex/prod", &admin, Dest::Ip(http))
            .await
            .is_ok(),
        "admin reaches another tenant's agent by naming the tenant"
    );
    assert!(
        fetch(
            world.socks,
            "edge@globex/prod",
            &globex_token,
            Dest::Ip(http)
        )
        .await
        .is_ok(),
        "naming one's own tenant is allowed"
    );
    // curl takes the user percent-encoded, as the README shows.
    let url = format!("http://127.0.0.1:{}/", http.port());
    let (code, body) = curl(world.socks, "edge%40globex%2Fprod", &admin, &[&url]).await;
    assert_eq!(
        code, 0,
        "curl with a percent-encoded tenant in the user name"
    );
    assert!(body.ends_with(b"hello from the private network\n"));
    // Without a tenant, the admin token's own tenant (acme) has no agent "edge".
    assert_eq!(
        fetch(world.socks, "edge", &admin, Dest::Ip(http))
            .await
            .err(),
        Some(0x04)
    );
    // A token of acme naming globex: answered like a missing agent, byte for byte.
    let (foreign, _) = raw_answer(world.socks, "edge@globex/prod", &acme_proxy, http).await;
    let (missing, _) = raw_answer(world.socks, "nowhere", &acme_proxy, http).await;
    assert_eq!(foreign, missing);
    assert_eq!(&foreign[..4], &[5, 0x04, 0, 1], "host unreachable");
    // A malformed tenant is refused at authentication.
    assert_eq!(
        socks_connect(world.socks, "edge@globex", &admin, Dest::Ip(http))
            .await
            .err(),
        Some(0xff)
    );
    world.stop().await;
}
