//! A rogue agent and a greedy tenant against a real `rna hub` process on one worker thread:
//! the hub's peak memory under an inventory and session flood stays within a stated bound,
//! and another tenant's SOCKS first-byte time under inventory load stays within 2× of idle.
//! Both measure the process itself (`/proc/PID/status`, `curl -w`), so they run one at a
//! time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use rna::agent::session::{connect, Established};
use rna::agent::HubTarget;
use rna::auth::Scope;
use rna::proto::codec::encode_limited;
use rna::proto::kube::{AgentStream, Inventory, ResourceInfo, MAX_INVENTORY};
use rna::transport::session::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Peak resident memory of the hub under the flood below, in MiB (measured about 45–70 MiB
/// with the bounds in place; 40 sessions of 48 MiB each, well over 1 GiB, without them).
const PEAK_BOUND_MIB: u64 = 160;

/// A hub process sharing the world's CA and token store.
struct HubProcess {
    child: tokio::process::Child,
    quic: SocketAddr,
    socks: SocketAddr,
    api: SocketAddr,
}

impl HubProcess {
    async fn start(world: &World) -> HubProcess {
        let dir = world.dir.path();
        let hub = world
            .ca
            .issue_hub(&["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
        std::fs::write(dir.join("ca.pem"), world.ca.cert_pem()).unwrap();
        std::fs::write(dir.join("hub.pem"), &hub.cert_pem).unwrap();
        std::fs::write(dir.join("hub-key.pem"), &hub.key_pem).unwrap();
        let args = hub_process_args(
            &dir.display().to_string(),
            &world.tokens.display().to_string(),
            "127.0.0.1:0",
            // The issue's setting: the hub's only worker thread.
            &["--worker-threads", "1", "--log-level", "warn,rna::hub=info"],
        );
        let (child, mut log) = spawn_logged(&args);
        let serving = wait_line(&mut log, "hub serving").await;
        // Keep draining the log so the process never blocks on a full pipe.
        tokio::spawn(async move { while log.recv().await.is_some() {} });
        HubProcess {
            child,
            quic: field(&serving, "quic").parse().unwrap(),
            socks: field(&serving, "socks").parse().unwrap(),
            api: field(&serving, "api").parse().unwrap(),
        }
    }

    /// A line of `/proc/PID/status` in KiB (`VmHWM`: peak resident, `VmRSS`: now).
    fn status_kib(&self, key: &str) -> u64 {
        let pid = self.child.id().expect("hub running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {status}"))
    }
}

/// Registers one session of `name` by hand against the hub process.
async fn session(
    world: &World,
    hub: SocketAddr,
    name: &str,
    token: &str,
    capabilities: &[&str],
) -> Result<Established, rna::agent::SessionError> {
    let mut config = world.agent_config(name, token);
    config.capabilities = capabilities.iter().map(|c| c.to_string()).collect();
    let endpoint = rna::transport::agent_endpoint(hub, &config.tls, &config.limits).unwrap();
    within("a session", connect(&endpoint, hub, "127.0.0.1", &config)).await
}

/// Sends one inventory report; true if the hub took it.
async fn report(conn: &Session, inventory: &Inventory) -> bool {
    let frame = encode_limited(&AgentStream::Inventory(inventory.clone()), MAX_INVENTORY).unwrap();
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return false;
    };
    let _ = send.write_all(&frame).await;
    let _ = send.finish();
    matches!(
        tokio::time::timeout(Duration::from_secs(60), recv.read_to_end(64)).await,
        Ok(Ok(_))
    )
}

/// The issue's rogue report: a 2 MiB frame of empty namespace names.
fn empty_strings_inventory() -> Inventory {
    Inventory {
        namespaces: Some(vec![String::new(); MAX_INVENTORY - 16]),
        ..Inventory::default()
    }
}

/// A large report within every bound, just under the 2 MiB frame cap: 4,000 resources and
/// 7,500 long namespace names (its JSON is about 2.9 MB).
fn large_inventory() -> Inventory {
    let resource = |i: usize| ResourceInfo {
        group: format!("group-{i}.example.com"),
        version: "v1alpha1".into(),
        kind: format!("Kind{i}"),
        plural: format!("kinds{i}"),
        singular: format!("kind{i}"),
        namespaced: true,
        verbs: [
            "get", "list", "watch", "create", "update", "patch", "delete",
        ]
        .map(String::from)
        .to_vec(),
        short_names: vec![format!("k{i}")],
    };
    let inv = Inventory {
        server_version: Some("v1.33.0".into()),
        platform: Some("linux/amd64".into()),
        node_count: Some(500),
        namespaces: Some((0..7_500).map(|i| format!("{i:0>200}")).collect()),
        resources: (0..4_000).map(resource).collect(),
        errors: vec![],
        collected_unix: 1,
    };
    let size = encode_limited(&AgentStream::Inventory(inv.clone()), MAX_INVENTORY)
        .unwrap()
        .len();
    assert!(size > MAX_INVENTORY * 3 / 4, "{size} bytes");
    inv
}

fn mib(kib: u64) -> u64 {
    kib / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_and_session_flood_leaves_hub_memory_bounded() {
    let _serial = SERIAL.lock().await;
    let world = World::start().await;
    let token = world.agent_token("acme/prod");
    let other = world.agent_token("globex/prod");
    let mut hub = HubProcess::start(&world).await;
    let baseline = hub.status_kib("VmRSS");

    // One certificate and one token, 40 sessions asked for, each sending the rogue report.
    let rogue = empty_strings_inventory();
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..40 {
        match session(&world, hub.quic, "rogue", &token, &["kubernetes"]).await {
            Ok(s) => held.push(s),
            Err(e) => {
                refused += 1;
                eprintln!("refused: {e}");
            }
        }
    }
    let sent = futures_util::future::join_all(
        held.iter()
            .map(|s| report(&s.connection, &rogue))
            .collect::<Vec<_>>(),
    )
    .await;
    let taken = sent.iter().filter(|t| **t).count();
    // Then the largest report the bounds let through, on every session at once.
    let large = large_inventory();
    let sent = futures_util::future::join_all(
        held.iter()
            .map(|s| report(&s.connection, &large))
            .collect::<Vec<_>>(),
    )
    .await;
    let large_taken = sent.iter().filter(|t| **t).count();
    let peak = hub.status_kib("VmHWM");
    eprintln!(
        "hub memory: baseline {} MiB, peak {} MiB, now {} MiB; {} sessions held, {refused} refused; \
         {taken} empty-strings reports taken, {large_taken} large ones",
        mib(baseline),
        mib(peak),
        mib(hub.status_kib("VmRSS")),
        held.len()
    );
    // The hub still serves another tenant's agent.
    let fine = session(&world, hub.quic, "edge", &other, &[]).await;
    assert!(fine.is_ok(), "{:?}", fine.err());
    assert!(
        mib(peak) <= PEAK_BOUND_MIB,
        "peak {} MiB over the {PEAK_BOUND_MIB} MiB bound",
        mib(peak)
    );
    assert!(held.len() <= 16 && refused >= 24, "{} held", held.len());
    assert_eq!(taken, 0, "the empty-strings report must be refused");
    assert!(
        large_taken >= 1,
        "a large report within the bounds is taken"
    );
    drop(held);
    let _ = hub.child.kill().await;
}

/// `curl -w %{time_starttransfer}` through the hub for at least `samples` requests and at
/// least `during`, in ms, sorted.
async fn first_byte_ms(
    socks: SocketAddr,
    token: &str,
    http: SocketAddr,
    samples: usize,
    during: Duration,
) -> Vec<f64> {
    let mut times = Vec::new();
    let url = format!("http://{http}/bytes/16");
    let started = Instant::now();
    while times.len() < samples || started.elapsed() < during {
        let (code, out) = curl(
            socks,
            "edge",
            token,
            &["-o", "/dev/null", "-w", "%{time_starttransfer}", &url],
        )
        .await;
        assert_eq!(code, 0);
        let secs: f64 = String::from_utf8_lossy(&out).trim().parse().unwrap();
        times.push(secs * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    times
}

fn median(sorted: &[f64]) -> f64 {
    sorted[sorted.len() / 2]
}

/// One `GET` of an inventory over plain HTTP/1.1; returns the body size.
async fn get_inventory(api: SocketAddr, token: &str) -> usize {
    let Ok(mut s) = tokio::net::TcpStream::connect(api).await else {
        return 0;
    };
    let req = format!(
        "GET /api/v1/agents/big/inventory HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body).await;
    body.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_inventory_load_does_not_slow_socks() {
    let _serial = SERIAL.lock().await;
    let world = World::start().await;
    let big_token = world.agent_token("acme/prod");
    let reader = world.token("acme/prod", &[Scope::ReadInfraData]);
    let edge_token = world.agent_token("globex/prod");
    let hub = HubProcess::start(&world).await;
    let http = http_server().await;

    // Tenant acme: an agent with a large inventory. Tenant globex: a real agent.
    let big = session(&world, hub.quic, "big", &big_token, &["kubernetes"])
        .await
        .unwrap();
    let large = large_inventory();
    assert!(report(&big.connection, &large).await);
    let mut config = world.agent_config("edge", &edge_token);
    config.hubs = vec![HubTarget {
        host: "127.0.0.1".into(),
        port: hub.quic.port(),
    }];
    let agent = world.spawn_agent(config);
    within(
        "the agent's session",
        agent.handle.wait_until(|s| s.sessions_total >= 1),
    )
    .await;
    let alone = Instant::now();
    let one = get_inventory(hub.api, &reader).await;
    let alone = alone.elapsed();
    assert!(one > 2_000_000, "inventory answer of {one} bytes");

    let idle = first_byte_ms(hub.socks, &edge_token, http, 21, Duration::ZERO).await;

    // Four parallel readers of the inventory, and the agent resending its report as fast
    // as the hub lets it, while another tenant's requests are timed.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, reads, reader) = (stop.clone(), reads.clone(), reader.clone());
        let api = hub.api;
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if get_inventory(api, &reader).await > 2_000_000 {
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let reporting = {
        let (conn, large) = (big.connection.clone(), large.clone());
        tokio::spawn(async move {
            loop {
                report(&conn, &large).await;
            }
        })
    };
    let started = Instant::now();
    let loaded = first_byte_ms(hub.socks, &edge_token, http, 21, Duration::from_secs(3)).await;
    let window = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    reporting.abort();
    for task in load {
        let _ = task.await;
    }
    let reads = reads.load(Ordering::Relaxed);
    eprintln!(
        "SOCKS first byte: idle median {:.2} ms (max {:.2}), under load median {:.2} ms \
         (max {:.2}, {} samples in {:.1} s); {reads} inventory reads of {one} bytes meanwhile \
         (one alone took {alone:?})",
        median(&idle),
        idle[idle.len() - 1],
        median(&loaded),
        loaded[loaded.len() - 1],
        loaded.len(),
        window.as_secs_f64()
    );
    assert!(reads >= 20, "the load must be real: {reads} reads");
    assert!(
        median(&loaded) <= 2.0 * median(&idle),
        "loaded median {:.2} ms over twice idle {:.2} ms",
        median(&loaded),
        median(&idle)
    );
    agent.stop().await;
    drop(big);
    let mut hub = hub;
    let _ = hub.child.kill().await;
}
