//! Reaching the hub from networks that block UDP or allow only an HTTP proxy, end to end on
//! loopback without privileges: the hub serves QUIC on its own port and TLS/TCP on port X,
//! where a [`UdpGate`] holds the UDP side of X; the agent dials X, so its QUIC meets the gate
//! (dropped, or forwarded to the hub) and its TCP meets the hub. Covers `--transport auto`
//! falling back to TCP and moving back to QUIC make-before-break, `quic` and `tcp` never
//! switching, a real tinyproxy carrying the session, and the message when nothing works.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::fake_kube::FakeKube;
use rna::agent::kube::{KubeSettings, KubeSource};
use rna::agent::{AgentConfig, HubTarget, SessionError, TransportMode};
use rna::auth::Scope;
use rna::hub::{AgentInfo, TcpListen};
use rna::proto::CloseCode;
use rna::transport::proxy::ProxySettings;

const TENANT: &str = "acme/prod";
const PROXY_USER: &str = "egress";
const PROXY_PASSWORD: &str = "pr0xy-pa55";
/// The hub's sessions opened and closed, by event, reason and transport.
const SESSIONS: &str = "rna_agent_sessions_total";
/// The agent's sessions up now, by transport.
const CONNECTIONS: &str = "rna_agent_hub_connections";
/// The agent's connection attempts after the first.
const RECONNECTS: &str = "rna_agent_reconnects_total";

/// A hub whose agents' port X carries UDP through a gate and TCP straight to the hub.
struct Gated {
    world: World,
    gate: UdpGate,
}

impl Gated {
    /// The gate closed (UDP dropped); the hub's TCP side on X unless `tcp` is false (then
    /// nothing listens for TCP on X).
    async fn start(tcp: bool) -> Gated {
        Gated::start_with(tcp, |_| {}).await
    }

    /// [`Gated::start`], with the hub's configuration changed by `configure` as well.
    async fn start_with(tcp: bool, configure: impl FnOnce(&mut rna::hub::HubConfig)) -> Gated {
        let mut gate = UdpGate::bind().await;
        let x = gate.addr;
        let world = World::start_with(|c| {
            c.tcp_listen = if tcp {
                TcpListen::At(x)
            } else {
                TcpListen::Off
            };
            configure(c);
        })
        .await;
        assert_ne!(
            world.quic.port(),
            x.port(),
            "QUIC must not be on the gate's port"
        );
        gate.relay_to(world.quic).await;
        Gated { world, gate }
    }

    /// The address agents dial: the gate's port, on which the hub also listens over TCP.
    fn hub_addr(&self) -> SocketAddr {
        self.gate.addr
    }

    /// An agent configuration that dials X with `mode`, a 1 s QUIC fallback and a 2 s probe.
    fn agent_config(&self, name: &str, token: &str, mode: TransportMode) -> AgentConfig {
        let mut config = self.world.agent_config(name, token);
        config.hubs = vec![HubTarget {
            host: "127.0.0.1".into(),
            port: self.hub_addr().port(),
        }];
        config.transport = mode;
        config.quic_fallback_after = Duration::from_secs(1);
        config.quic_probe_interval = Duration::from_secs(2);
        config
    }

    /// The hub's sessions of `name`.
    fn sessions(&self, name: &str) -> Vec<AgentInfo> {
        let tenant = TENANT.parse().unwrap();
        self.world
            .hub
            .registry()
            .sessions_of(&tenant, name)
            .iter()
            .map(|s| s.info())
            .collect()
    }

    /// The transports of the hub's sessions of `name`, sorted.
    fn transports(&self, name: &str) -> Vec<&'static str> {
        let mut t: Vec<&'static str> = self.sessions(name).iter().map(|i| i.transport).collect();
        t.sort();
        t
    }
}

/// The sum of the samples of `name` whose labels include every `key="value"` of `labels`
/// (0 when there is none, as a family without samples is not rendered): reads an OpenMetrics
/// exposition as Prometheus would select it. Names come from the constants below, each of
/// which some test also sees non-zero, so a misspelt name cannot pass a "never" check.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, body) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| body.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap_or_else(|_| panic!("value {v}")))
        .sum()
}

/// The agent's own metric.
fn agent_metric(agent: &TestAgent, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&agent.handle.metrics().render(), name, labels)
}

/// Asserts the agent holds one session, over `transport` (`quic` or `tcp`), and none over
/// the other.
fn assert_connected_over(agent: &TestAgent, transport: &str) {
    for kind in ["quic", "tcp"] {
        let want = if kind == transport { 1.0 } else { 0.0 };
        let got = agent_metric(agent, CONNECTIONS, &[("transport", kind)]);
        assert_eq!(got, want, "sessions over {kind}");
    }
}

/// Sessions the hub opened over TLS/TCP so far.
fn tcp_sessions_opened(world: &World) -> f64 {
    hub_metric(
        world,
        SESSIONS,
        &[("event", "opened"), ("transport", "tcp")],
    )
}

/// The hub's metric.
fn hub_metric(world: &World, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&world.hub.metrics().render(), name, labels)
}

/// Waits until the agent serves the session the hub registered (the hub lists a session as
/// soon as it sends Welcome; the agent counts it a moment later).
async fn serving(agent: &TestAgent) {
    within(
        "the agent to serve its session",
        agent.handle.wait_until(|s| s.connected >= 1),
    )
    .await;
}

/// A plain GET through the agent's tunnel answers the test server's greeting.
async fn fetch_works(world: &World, agent: &str, token: &str, http: SocketAddr) {
    let body = within(
        "a fetch through the tunnel",
        socks_fetch(world.socks, agent, token, Dest::Ip(http)),
    )
    .await
    .unwrap_or_else(|code| panic!("SOCKS CONNECT refused with {code:#04x}"));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("hello from the private network"), "{text}");
}

/// Cluster mode against the fake Kubernetes API.
fn kube_settings(fake: &FakeKube, dir: &std::path::Path) -> KubeSettings {
    let path = fake.kubeconfig(dir, "kubeconfig", None);
    let mut settings = KubeSettings::new(KubeSource::Kubeconfig {
        path,
        context: None,
    });
    settings.inventory_interval = Duration::from_secs(3600);
    settings
}

/// UDP to the hub's port dropped: an `auto` agent with the default 5 s fallback is on TCP
/// within 10 s, and everything runs over it: a 64 MiB curl download, a Kubernetes read, and
/// revocation closing the TCP session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_udp_dropped_an_auto_agent_works_over_tcp() {
    let gated = Gated::start(true).await;
    let world = &gated.world;
    let fake = FakeKube::start().await;
    let token = world.agent_token(TENANT);
    let mut config = gated.agent_config("blocked", &token, TransportMode::Auto);
    // The default fallback: the figure the issue sets is checked once, here.
    config.quic_fallback_after = AgentConfig::new(
        config.hubs.clone(),
        "x".into(),
        config.tls.clone(),
        config.token.clone(),
    )
    .quic_fallback_after;
    assert_eq!(config.quic_fallback_after, Duration::from_secs(5));
    config.kube = Some(kube_settings(&fake, world.dir.path()));
    let started = Instant::now();
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, "blocked", 1).await;
    let took = started.elapsed();
    serving(&agent).await;
    eprintln!("connected over TCP {took:?} after start");
    assert!(took < Duration::from_secs(10), "connected after {took:?}");
    assert!(
        took >= Duration::from_secs(5),
        "connected after {took:?}: before the fallback deadline, so not through the fallback"
    );
    assert!(gated.gate.received() > 0, "the agent never tried QUIC");
    assert_eq!(gated.gate.forwarded(), 0);

    // The agents API, and both sides' metrics, name the transport.
    let reader = world.token(TENANT, &[Scope::ReadInfraData]);
    let api = client(world, &reader);
    let listed = get(&api, "/api/v1/agents").await;
    assert_eq!(listed.status, 200);
    let listed = listed.json();
    let entry = listed["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "blocked"))
        .unwrap_or_else(|| panic!("agent not listed: {listed}"))
        .clone();
    assert_eq!(entry["transport"], "tcp", "{entry}");
    assert_connected_over(&agent, "tcp");
    assert_eq!(tcp_sessions_opened(world), 1.0);

    // 64 MiB through SOCKS with curl, byte-exact.
    let http = http_server().await;
    let size = 64 * 1024 * 1024;
    let out = world.dir.path().join("download.bin");
    let url = format!("http://localhost:{}/bytes/{size}", http.port());
    let started = Instant::now();
    let (code, _) = curl(
        world.socks,
        "blocked",
        &token,
        &["-o", out.to_str().unwrap(), &url],
    )
    .await;
    eprintln!("64 MiB over TLS/TCP in {:?}", started.elapsed());
    assert_eq!(code, 0);
    let got = read(&out);
    assert_eq!(got.len(), size);
    assert_eq!(sha256_hex(&got), sha256_hex(&pattern(size)));

    // A Kubernetes read through the TCP session.
    wait_inventory(world, TENANT, "blocked").await;
    let namespaces = get(&api, "/api/v1/agents/blocked/kube/v1/Namespace").await;
    assert_eq!(
        namespaces.status,
        200,
        "{}",
        String::from_utf8_lossy(&namespaces.body)
    );
    let names: Vec<String> = namespaces.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["default", "kube-system"]);
    assert_eq!(gated.transports("blocked"), ["tcp"]);

    // Revoking the agent's token closes the TCP session, and the agent is refused after.
    world.revoke(&token);
    world.wait_sessions(TENANT, "blocked", 0).await;
    within(
        "the revoked token to be refused",
        agent.handle.wait_until(|s| {
            matches!(&s.last_error, Some(SessionError::Rejected { code, .. })
                if *code == CloseCode::TokenRevoked)
        }),
    )
    .await;
    assert!(
        hub_metric(
            world,
            SESSIONS,
            &[("event", "closed"), ("transport", "tcp")]
        ) >= 1.0
    );
    eventually("the agent to count no TCP session", || {
        agent_metric(&agent, CONNECTIONS, &[("transport", "tcp")]) == 0.0
    })
    .await;
    assert_eq!(gated.gate.forwarded(), 0, "UDP reached the hub");
    agent.stop().await;
    gated.world.stop().await;
}

/// On TCP, UDP opens again: the agent moves to QUIC within the probe interval while a
/// download started on TCP keeps running on the old session (which takes no new streams)
/// and finishes byte-exact; then only the QUIC session is left and new requests use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_udp_opens_the_agent_moves_to_quic_without_breaking_a_transfer() {
    let gated = Gated::start(true).await;
    let world = &gated.world;
    let token = world.agent_token(TENANT);
    let config = gated.agent_config("mover", &token, TransportMode::Auto);
    let probe_interval = config.quic_probe_interval;
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, "mover", 1).await;
    assert_eq!(gated.transports("mover"), ["tcp"]);

    // A download rate-limited to ~1 MB/s, long enough to span the move.
    let http = http_server().await;
    let size = 12 * 1024 * 1024;
    let out = world.dir.path().join("slow.bin");
    let url = format!("http://127.0.0.1:{}/bytes/{size}", http.port());
    let download = {
        let (socks, token, out) = (world.socks, token.clone(), out.clone());
        tokio::spawn(async move {
            curl(
                socks,
                "mover",
                &token,
                &["--limit-rate", "1M", "-o", out.to_str().unwrap(), &url],
            )
            .await
        })
    };
    eventually("the download to run on the TCP session", || {
        gated
            .sessions("mover")
            .iter()
            .any(|s| s.transport == "tcp" && s.open_streams == 1 && s.bytes_in > 0)
    })
    .await;

    gated.gate.open();
    let opened = Instant::now();
    eventually("a QUIC session of the agent", || {
        gated.transports("mover").contains(&"quic")
    })
    .await;
    let moved = opened.elapsed();
    eprintln!("on QUIC {moved:?} after UDP opened (probe interval {probe_interval:?})");
    // One probe interval, one failed probe's 1 s wait at most, and slack for a loaded host.
    assert!(
        moved < probe_interval + Duration::from_secs(1) + Duration::from_secs(6),
        "moved after {moved:?}"
    );
    assert!(
        !download.is_finished(),
        "the download ended before the move: the test proves nothing; make it longer"
    );

    // Make-before-break: the TCP session still carries the download, and takes nothing new.
    let tenant = TENANT.parse().unwrap();
    let tcp_session = world
        .hub
        .registry()
        .sessions_of(&tenant, "mover")
        .into_iter()
        .find(|s| s.info().transport == "tcp")
        .expect("the TCP session closed before its transfer finished");
    assert_eq!(tcp_session.open_streams(), 1);
    eventually("the TCP session to take no new streams", || {
        !tcp_session.takes_new_streams()
    })
    .await;
    let tcp_streams = tcp_session.streams_total();

    // New requests go over QUIC: through the gate, onto the QUIC session.
    let before = gated.gate.forwarded();
    fetch_works(world, "mover", &token, http).await;
    assert!(
        gated.gate.forwarded() > before,
        "the request did not cross UDP"
    );
    assert_eq!(tcp_session.streams_total(), tcp_streams);
    assert_eq!(
        tcp_session.open_streams(),
        1,
        "the download left the TCP session early"
    );

    // The download finishes byte-exact; then the TCP session closes and QUIC is all left.
    let (code, _) = within("the download", download).await.unwrap();
    assert_eq!(code, 0);
    let got = read(&out);
    assert_eq!(got.len(), size);
    assert_eq!(sha256_hex(&got), sha256_hex(&pattern(size)));
    world.wait_sessions(TENANT, "mover", 1).await;
    assert_eq!(gated.transports("mover"), ["quic"]);
    assert_eq!(
        hub_metric(
            world,
            SESSIONS,
            &[
                ("event", "closed"),
                ("reason", "agent_closed"),
                ("transport", "tcp")
            ]
        ),
        1.0
    );
    eventually("the agent to count one QUIC session and no TCP one", || {
        agent_metric(&agent, CONNECTIONS, &[("transport", "quic")]) == 1.0
            && agent_metric(&agent, CONNECTIONS, &[("transport", "tcp")]) == 0.0
    })
    .await;
    assert_eq!(agent.handle.status().connected, 1);
    agent.stop().await;
    gated.world.stop().await;
}

/// A real HTTP proxy (tinyproxy with Basic auth) named by the environment carries the
/// session: `auto` goes straight to TCP without a single UDP datagram, and SOCKS traffic
/// works through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_proxy_carries_the_session() {
    let gated = Gated::start(true).await;
    gated.gate.open();
    let world = &gated.world;
    let x = gated.hub_addr();
    let tinyproxy = Tinyproxy::start(PROXY_USER, PROXY_PASSWORD, x.port()).await;
    let token = world.agent_token(TENANT);
    let mut config = gated.agent_config("proxied", &token, TransportMode::Auto);
    let url = tinyproxy.url_text(PROXY_PASSWORD);
    config.proxy =
        ProxySettings::resolve(None, |name| (name == "HTTPS_PROXY").then(|| url.clone())).unwrap();
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, "proxied", 1).await;
    serving(&agent).await;
    assert_eq!(gated.transports("proxied"), ["tcp"]);
    let log = tinyproxy.log();
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{}", x.port())),
        "tinyproxy's log does not show the CONNECT:\n{log}"
    );
    assert!(
        !log.contains(PROXY_PASSWORD),
        "the password reached the log"
    );

    let http = http_server().await;
    fetch_works(world, "proxied", &token, http).await;
    assert_eq!(
        gated.gate.received(),
        0,
        "the agent sent UDP despite the proxy"
    );
    assert_eq!(
        agent_metric(&agent, CONNECTIONS, &[("transport", "tcp")]),
        1.0
    );
    agent.stop().await;
    gated.world.stop().await;
}

/// A wrong proxy password: the agent says the proxy refused the credentials (without the
/// password) and keeps retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_proxy_password_is_named_and_retried() {
    let logs = process_logs();
    let gated = Gated::start(true).await;
    let world = &gated.world;
    let x = gated.hub_addr();
    let tinyproxy = Tinyproxy::start(PROXY_USER, PROXY_PASSWORD, x.port()).await;
    let token = world.agent_token(TENANT);
    let mut config = gated.agent_config("wrongpass", &token, TransportMode::Auto);
    let flag = tinyproxy.url_text("not-the-password");
    config.proxy = ProxySettings::resolve(Some(&flag), |_| None).unwrap();
    let agent = world.spawn_agent(config);
    let status = within(
        "the proxy's refusal",
        agent
            .handle
            .wait_until(|s| matches!(s.last_error, Some(SessionError::Proxy(_)))),
    )
    .await;
    let text = status.last_error.unwrap().to_string();
    assert!(
        text.starts_with(&format!(
            "proxy 127.0.0.1:{} refused the credentials (40",
            tinyproxy.port
        )),
        "{text}"
    );
    assert!(text.contains("401") || text.contains("407"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
    // It retries (each attempt after the first counts as a reconnect).
    eventually("two more attempts", || {
        agent_metric(&agent, RECONNECTS, &[]) >= 2.0
    })
    .await;
    assert!(
        tinyproxy.log().matches("CONNECT 127.0.0.1:").count() >= 2,
        "{}",
        tinyproxy.log()
    );
    assert_eq!(gated.sessions("wrongpass").len(), 0);
    assert_eq!(
        gated.gate.received(),
        0,
        "the agent sent UDP despite the proxy"
    );
    // The agent's log line says the same, and neither password is in the log.
    let refusal = format!("proxy 127.0.0.1:{} refused the credentials", tinyproxy.port);
    let text = logs.text();
    assert!(text.contains(&refusal), "no log line {refusal:?}");
    assert!(!text.contains("not-the-password") && !text.contains(PROXY_PASSWORD));
    agent.stop().await;
    gated.world.stop().await;
}

/// What else can go wrong on the way through a proxy reaches the agent's error told apart
/// from an unreachable hub: a proxy that is not there, and one that refuses the hub's port
/// (tinyproxy answers 403 for a port it does not allow).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_failures_reach_the_agent_told_apart_from_the_hub() {
    let gated = Gated::start(true).await;
    let world = &gated.world;
    let x = gated.hub_addr();
    let token = world.agent_token(TENANT);

    let closed = closed_port();
    let mut config = gated.agent_config("noproxy", &token, TransportMode::Auto);
    let gone = format!("http://127.0.0.1:{closed}");
    config.proxy = ProxySettings::resolve(Some(&gone), |_| None).unwrap();
    let agent = world.spawn_agent(config);
    let status = within(
        "the unreachable proxy",
        agent
            .handle
            .wait_until(|s| matches!(s.last_error, Some(SessionError::Proxy(_)))),
    )
    .await;
    let text = status.last_error.unwrap().to_string();
    assert!(
        text.starts_with(&format!("proxy 127.0.0.1:{closed} unreachable")),
        "{text}"
    );
    agent.stop().await;

    // A proxy that allows CONNECT to another port only.
    let other = x.port().wrapping_add(1).max(1);
    let tinyproxy = Tinyproxy::start(PROXY_USER, PROXY_PASSWORD, other).await;
    let mut config = gated.agent_config("forbidden", &token, TransportMode::Tcp);
    let url = tinyproxy.url_text(PROXY_PASSWORD);
    config.proxy = ProxySettings::resolve(Some(&url), |_| None).unwrap();
    let agent = world.spawn_agent(config);
    let status = within(
        "the proxy's 403",
        agent
            .handle
            .wait_until(|s| matches!(s.last_error, Some(SessionError::Proxy(_)))),
    )
    .await;
    let text = status.last_error.unwrap().to_string();
    assert!(
        text.starts_with(&format!(
            "proxy 127.0.0.1:{} refused CONNECT 127.0.0.1:{}: 403",
            tinyproxy.port,
            x.port()
        )),
        "{text}"
    );
    assert!(!text.contains(PROXY_PASSWORD), "{text}");
    assert_eq!(world.hub.registry().len(), 0);
    assert_eq!(gated.gate.received(), 0);
    agent.stop().await;
    gated.world.stop().await;
}

/// `NO_PROXY` naming the hub: the agent goes direct (QUIC through the open gate), and the
/// proxy never hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_proxy_naming_the_hub_bypasses_the_proxy() {
    let gated = Gated::start(true).await;
    gated.gate.open();
    let world = &gated.world;
    let tinyproxy = Tinyproxy::start(PROXY_USER, PROXY_PASSWORD, gated.hub_addr().port()).await;
    let token = world.agent_token(TENANT);
    let mut config = gated.agent_config("direct", &token, TransportMode::Auto);
    let url = tinyproxy.url_text(PROXY_PASSWORD);
    config.proxy = ProxySettings::resolve(None, |name| match name {
        "https_proxy" => Some(url.clone()),
        "NO_PROXY" => Some("example.com, 127.0.0.0/8".into()),
        _ => None,
    })
    .unwrap();
    assert!(config.proxy.proxy.is_some());
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, "direct", 1).await;
    assert_eq!(gated.transports("direct"), ["quic"]);
    assert!(gated.gate.forwarded() > 0);
    let http = http_server().await;
    fetch_works(world, "direct", &token, http).await;
    let log = tinyproxy.log();
    assert!(
        !log.contains("CONNECT 127.0.0.1:"),
        "the proxy was used:\n{log}"
    );
    agent.stop().await;
    gated.world.stop().await;
}

/// `--transport quic` never falls back: with UDP dropped it keeps failing with the QUIC
/// timeout, attempt after attempt, well past the fallback deadline, and no TCP session is
/// ever made although the hub listens for TCP on that port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transport_quic_never_falls_back_to_tcp() {
    let gated = Gated::start(true).await;
    let world = &gated.world;
    let token = world.agent_token(TENANT);
    let mut config = gated.agent_config("quiconly", &token, TransportMode::Quic);
    config.limits.handshake_timeout = Duration::from_secs(2);
    let fallback = config.quic_fallback_after;
    let started = Instant::now();
    let agent = world.spawn_agent(config);
    // Three attempts of 2 s each: several times the 1 s fallback deadline.
    // (A session, should one come up, ends the wait early and fails the checks below.)
    eventually("three QUIC attempts", || {
        agent_metric(&agent, RECONNECTS, &[]) >= 2.0 || agent.handle.status().sessions_total > 0
    })
    .await;
    let status = agent.handle.status();
    assert_eq!(
        status.sessions_total, 0,
        "a --transport quic agent connected"
    );
    assert!(
        matches!(status.last_error, Some(SessionError::Timeout { addr, .. }) if addr == gated.hub_addr()),
        "{:?}",
        status.last_error
    );
    assert!(started.elapsed() > fallback * 3, "{:?}", started.elapsed());
    assert_eq!(gated.sessions("quiconly").len(), 0);
    assert_eq!(tcp_sessions_opened(world), 0.0);
    assert!(gated.gate.received() > 0);
    agent.stop().await;
    gated.world.stop().await;
}

/// An `auto` agent whose QUIC attempt the hub answered but finished late (a hub catching up
/// with a reconnect storm) waits for it instead of falling back to TCP at its 1 s deadline:
/// the hub asks every address for a Retry, the gate lets that first datagram through and
/// holds the hub's next ones back for 1.5 s, and the agent's first attempt still ends on QUIC.
/// Seen failing with the fallback deadline applied to every attempt, where the agent moved to
/// TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answered_quic_handshake_that_finishes_late_is_not_left_for_tcp() {
    let gated = Gated::start_with(true, |c| c.caps.retry_threshold = 0).await;
    gated
        .gate
        .stall_after_answer
        .store(1_500, std::sync::atomic::Ordering::Relaxed);
    gated.gate.open();
    let world = &gated.world;
    let token = world.agent_token(TENANT);
    let config = gated.agent_config("late", &token, TransportMode::Auto);
    assert_eq!(config.quic_fallback_after, Duration::from_secs(1));
    let started = Instant::now();
    let agent = world.spawn_agent(config);
    eventually("a session", || agent.handle.status().sessions_total > 0).await;
    let took = started.elapsed();
    assert!(
        took > Duration::from_millis(1_500),
        "the stall did not hold the handshake back ({took:?})"
    );
    assert_connected_over(&agent, "quic");
    assert_eq!(
        agent_metric(&agent, RECONNECTS, &[]),
        0.0,
        "the first attempt failed"
    );
    assert_eq!(tcp_sessions_opened(world), 0.0);
    agent.stop().await;
    gated.world.stop().await;
}

/// `--transport tcp` never sends UDP: with the gate open (QUIC would work), the agent
/// connects over TCP, a transfer works, and the gate saw no datagram.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transport_tcp_never_uses_udp() {
    let gated = Gated::start(true).await;
    gated.gate.open();
    let world = &gated.world;
    let token = world.agent_token(TENANT);
    let mut config = gated.agent_config("tcponly", &token, TransportMode::Tcp);
    // Probing would be the only reason to send UDP; make it frequent.
    config.quic_probe_interval = Duration::from_millis(200);
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, "tcponly", 1).await;
    assert_eq!(gated.transports("tcponly"), ["tcp"]);
    let http = http_server().await;
    let size = 4 * 1024 * 1024;
    let mut s = socks_connect(world.socks, "tcponly", &token, Dest::Ip(http))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    within("the transfer", s.read_to_end(&mut answer))
        .await
        .unwrap();
    let body = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| &answer[i + 4..])
        .unwrap();
    assert_eq!(sha256_hex(body), sha256_hex(&pattern(size)));
    fetch_works(world, "tcponly", &token, http).await;
    // A "never" needs a window: watched for ten probe intervals after the session came up,
    // failing at the first datagram.
    let window = Instant::now();
    eventually("ten probe intervals to pass without UDP", || {
        assert_eq!(gated.gate.received(), 0, "--transport tcp sent UDP");
        window.elapsed() > Duration::from_secs(2)
    })
    .await;
    assert_eq!(gated.transports("tcponly"), ["tcp"]);
    agent.stop().await;
    gated.world.stop().await;
}

/// Neither transport reaches the hub: the message names both attempts and what each met.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_nothing_works_the_message_names_both_attempts() {
    let gated = Gated::start(false).await;
    let world = &gated.world;
    let x = gated.hub_addr();
    let token = world.agent_token(TENANT);
    let config = gated.agent_config("stranded", &token, TransportMode::Auto);
    let agent = world.spawn_agent(config);
    let status = within(
        "the agent to give up on both transports",
        agent
            .handle
            .wait_until(|s| matches!(s.last_error, Some(SessionError::Unreachable { .. }))),
    )
    .await;
    let e = status.last_error.unwrap();
    match &e {
        SessionError::Unreachable { addr, quic, tcp } => {
            assert_eq!(*addr, x);
            assert_eq!(quic, "no answer in 1 s");
            assert_eq!(tcp, "connection refused");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        format!(
            "cannot reach the hub: QUIC to {x} (UDP): no answer in 1 s; TCP to {x}: connection refused"
        )
    );
    assert!(gated.gate.received() > 0);
    assert_eq!(status.sessions_total, 0);
    agent.stop().await;
    gated.world.stop().await;
}

/// The transport flags are on the command line, and bad values are refused with a clear
/// message and the usage exit code, before anything starts.
#[test]
fn the_cli_offers_the_transport_flags_and_refuses_bad_values() {
    let help = Rna::new(["agent", "--help"]).run();
    assert_eq!(help.code(), 0, "{}", help.stderr);
    for flag in [
        "--transport",
        "--quic-fallback-after",
        "--quic-probe-interval",
        "--proxy",
    ] {
        assert!(help.stdout.contains(flag), "agent --help lacks {flag}");
    }
    let help = Rna::new(["hub", "--help"]).run();
    assert_eq!(help.code(), 0, "{}", help.stderr);
    assert!(
        help.stdout.contains("--tcp-listen"),
        "hub --help lacks --tcp-listen"
    );

    let dir = tempfile::tempdir().unwrap();
    rna::certs::init_dir(dir.path(), &["127.0.0.1".to_string()], false).unwrap();
    rna::certs::issue_agent_files(dir.path(), "edge", false).unwrap();
    let token = dir.path().join("token.txt");
    std::fs::write(&token, "rna_secret_token_value\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "hub = [\"127.0.0.1:4433\"]\nname = \"edge\"\nca = \"ca.pem\"\ncert = \"agent-edge.pem\"\n\
         key = \"agent-edge-key.pem\"\ntoken_file = \"token.txt\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let check = |extra: &[&str]| {
        let mut rna = Rna::new(["agent", "--config", file, "--check-config"]);
        for a in extra {
            rna = rna.arg(a);
        }
        // A proxy of the calling environment must not decide these results.
        for var in [
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
            "no_proxy",
            "NO_PROXY",
        ] {
            rna = rna.env_remove(var);
        }
        rna.run()
    };

    let ok = check(&[
        "--transport",
        "tcp",
        "--quic-fallback-after",
        "3s",
        "--proxy",
        "http://me:hunter2@127.0.0.1:3128",
    ]);
    assert_eq!(ok.code(), 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("transport = \"tcp\""), "{}", ok.stdout);
    assert!(
        ok.stdout.contains("http://MASKED@127.0.0.1:3128"),
        "{}",
        ok.stdout
    );
    assert!(!ok.stdout.contains("hunter2") && !ok.stderr.contains("hunter2"));

    let bad = check(&["--transport", "x"]);
    assert_eq!(bad.code(), 2, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("'x'") && bad.stderr.contains("--transport"),
        "{}",
        bad.stderr
    );
    assert!(
        bad.stderr.contains("auto") && bad.stderr.contains("quic") && bad.stderr.contains("tcp"),
        "the choices are not named: {}",
        bad.stderr
    );

    let bad = check(&["--proxy", "ftp://x"]);
    assert_eq!(bad.code(), 2, "{}", bad.stderr);
    let first = bad.stderr.lines().next().unwrap_or_default();
    assert!(first.contains("proxy"), "{}", bad.stderr);
    assert!(
        first.contains("scheme ftp:// is not supported; use an http:// proxy"),
        "{}",
        bad.stderr
    );

    // The same value from the environment is refused the same way.
    let mut env =
        Rna::new(["agent", "--config", file, "--check-config"]).env("RNA_TRANSPORT", "udp");
    env = env.env_remove("HTTPS_PROXY").env_remove("https_proxy");
    let bad = env.run();
    assert_eq!(bad.code(), 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("'udp'"), "{}", bad.stderr);

    let bad = check(&["--quic-fallback-after", "soon"]);
    assert_eq!(bad.code(), 2, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("--quic-fallback-after"),
        "{}",
        bad.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_that_drops_tcp_handshakes_reads_as_busy_not_as_a_certificate_refusal() {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    // A hub at its handshake cap (or shutting down) drops new TCP connections before TLS
    // says anything. Here the reset comes once the agent's ClientHello arrived, so it meets
    // the TLS handshake (a reset at once may end the TCP connect itself).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dropper = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let mut hello = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut hello).await;
            let _ = tcp.set_zero_linger();
            drop(tcp);
        }
    });
    let mut config = world.agent_config_over("edge", &token, TransportMode::Tcp);
    config.hubs = vec![HubTarget {
        host: "127.0.0.1".into(),
        port: addr.port(),
    }];
    let agent = world.spawn_agent(config);
    let status = within(
        "the dropped handshake to be reported",
        agent.handle.wait_until(|s| s.last_error.is_some()),
    )
    .await;
    let err = status.last_error.unwrap();
    assert_eq!(err, SessionError::Busy(addr), "{err}");
    assert!(
        !err.to_string().contains("certificate"),
        "a dropped connection is no certificate refusal: {err}"
    );
    dropper.abort();
    agent.stop().await;
    world.stop().await;
}
