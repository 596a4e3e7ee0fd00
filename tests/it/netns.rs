//! The real `rna hub` and `rna agent` binaries in a network namespace of the test's own
//! (`unshare -n`) whose firewall drops UDP to the hub's port, as networks that allow only TCP
//! do: the `auto` agent falls back to TLS over TCP, carries a 64 MiB download byte-exact, and
//! a `kill -9` of either side ends a running download with a reset, never a clean end.
//!
//! The test re-runs itself (this test binary, this one test) under `unshare -n`, so the
//! firewall rule lives and dies with the namespace and never touches the host's tables.

use crate::common::*;

use std::process::Stdio;
use std::time::{Duration, Instant};

use rna::auth::Scope;
use tokio::io::AsyncReadExt;

const TENANT: &str = "acme/locked-down";
const AGENT: &str = "behind-firewall";

/// Set in the copy of this test that runs inside the namespace.
const INSIDE: &str = "RNA_IT_NETNS_INSIDE";

/// This test's name as the test binary knows it (for `--exact`).
const NAME: &str = "netns::udp_blocked_agent_uses_tcp_and_kills_reset_clients";

/// What the issue allows an `auto` agent to reach the hub over TCP when UDP is dropped (its
/// QUIC attempt gives up after 5 s).
const FALLBACK_LIMIT: Duration = Duration::from_secs(10);

#[test]
fn udp_blocked_agent_uses_tcp_and_kills_reset_clients() {
    if std::env::var_os(INSIDE).is_some() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(inside_the_namespace());
        return;
    }
    for (tool, args, package) in [
        ("unshare", &["--version"][..], "util-linux"),
        ("iptables", &["--version"][..], "iptables"),
        ("ip", &["-V"][..], "iproute2"),
        ("curl", &["--version"][..], "curl"),
    ] {
        let ran = std::process::Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            ran.is_ok_and(|s| s.success()),
            "this test needs `{tool}`: install the Debian package {package} (.ci/run does)"
        );
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new("unshare")
        .arg("-n")
        .arg(&exe)
        .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .stdin(Stdio::null())
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the test inside the namespace failed ({}); needs root for `unshare -n` and iptables\n\
         --- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // The copy really ran (a filter that matched nothing would also exit 0).
    assert!(
        stdout.contains("1 passed"),
        "the test did not run inside the namespace:\n{stdout}\n{stderr}"
    );
}

/// Runs `cmd args`, failing the test with its output when it fails.
fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn inside_the_namespace() {
    // Refuse to touch a firewall that is not this namespace's: a fresh one has `lo` only.
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(
        links.lines().count(),
        1,
        "not in a fresh network namespace: {links}"
    );
    run("ip", &["link", "set", "lo", "up"]);

    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let reader = world.token(TENANT, &[Scope::ReadInfraData]);
    let hub_args = hub_process_args(&world);
    let mut hub = Rna::new(&hub_args).logs_at("info").discard_stdout().spawn();
    let serving = hub.wait_line("hub serving").await;
    let quic: std::net::SocketAddr = field(&serving, "quic").parse().unwrap();
    let tcp = field(&serving, "tcp");
    assert_eq!(tcp, quic.to_string(), "TCP is served on the QUIC port");
    let socks: std::net::SocketAddr = field(&serving, "socks").parse().unwrap();
    let api: std::net::SocketAddr = field(&serving, "api").parse().unwrap();

    // What a network that allows only TCP does to QUIC.
    let port = quic.port().to_string();
    run(
        "iptables",
        &["-A", "INPUT", "-p", "udp", "--dport", &port, "-j", "DROP"],
    );

    let mut agent_args = world.agent_process_args(AGENT, &token);
    let at = agent_args
        .iter()
        .position(|a| a == "--hub")
        .expect("--hub in the agent's arguments")
        + 1;
    agent_args[at] = quic.to_string();

    // 1. The default (`auto`) agent is connected over TCP within the limit.
    let started = Instant::now();
    let agent = Rna::new(&agent_args)
        .logs_at("info")
        .discard_stdout()
        .spawn();
    let took = connected_over_tcp(api, &reader, started).await;
    eprintln!("agent connected over tcp after {took:?}");

    // 2. A 64 MiB download through SOCKS with curl is byte-exact.
    let http = http_server().await;
    let size = 64usize << 20;
    let (code, body) = curl(
        socks,
        AGENT,
        &token,
        &[&format!("http://127.0.0.1:{}/bytes/{size}", http.port())],
    )
    .await;
    assert_eq!(code, 0, "curl exit code");
    assert_eq!(body.len(), size);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(size)));

    // 3. kill -9 of the agent during a download: curl sees a reset.
    let mut agent = agent;
    let outcome = killed_mid_download(socks, &token, http, || async {
        agent.child.kill().await.expect("kill -9 the agent");
    })
    .await;
    assert_reset(&outcome, "agent");
    // The hub forgets the dead session before the new agent comes, so the next wait sees
    // the new agent's session, not the old one.
    within("the hub to forget the killed agent", async {
        while !sessions(api, &reader).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // 4. A new agent, then kill -9 of the hub during a download: the same.
    let started = Instant::now();
    let _agent = Rna::new(&agent_args)
        .logs_at("info")
        .discard_stdout()
        .spawn();
    connected_over_tcp(api, &reader, started).await;
    let outcome = killed_mid_download(socks, &token, http, || async {
        hub.child.kill().await.expect("kill -9 the hub");
    })
    .await;
    assert_reset(&outcome, "hub");
}

/// The arguments of a real `rna hub` on 127.0.0.1:0 (QUIC, and TCP on the same port by
/// default), sharing the world's CA and token store, with fast heartbeats.
fn hub_process_args(world: &World) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = world.dir.path();
    let cert = world
        .ca
        .issue_hub(&["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap();
    let write = |file: &str, text: &str| {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.display().to_string()
    };
    let ca = write("netns-ca.pem", &world.ca.cert_pem());
    let cert_file = write("netns-hub.pem", &cert.cert_pem);
    let key = write("netns-hub-key.pem", &cert.key_pem);
    [
        "hub",
        "--listen",
        "127.0.0.1:0",
        "--socks",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--ca",
        &ca,
        "--cert",
        &cert_file,
        "--key",
        &key,
        "--tokens",
        world.tokens.to_str().unwrap(),
        "--heartbeat-interval",
        "500ms",
        "--heartbeat-timeout",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The transport of each session of the agent, as the hub's agents API lists them.
async fn sessions(api: std::net::SocketAddr, reader: &str) -> Vec<String> {
    let (status, body) = http_get_as(api, "/api/v1/agents", Some(reader)).await;
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).expect("agents JSON");
    listed["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["name"] == AGENT)
        .map(|a| a["transport"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Polls the hub's agents API until the agent is listed with transport `tcp`; fails when
/// that takes longer than [`FALLBACK_LIMIT`] after `started`, or when it shows up on QUIC.
async fn connected_over_tcp(api: std::net::SocketAddr, reader: &str, started: Instant) -> Duration {
    loop {
        let transports = sessions(api, reader).await;
        assert!(
            !transports.iter().any(|t| t == "quic"),
            "UDP is dropped, yet the agent is on QUIC: {transports:?}"
        );
        if transports.iter().any(|t| t == "tcp") {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < FALLBACK_LIMIT,
            "the auto agent was not connected over TCP within {FALLBACK_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a curl download ended: its exit code and standard error.
struct Outcome {
    code: i32,
    stderr: String,
    received: usize,
}

/// Starts a 4 GiB download with curl through SOCKS, waits until 1 MiB of it arrived, runs
/// `kill`, and returns how curl ended.
async fn killed_mid_download<F, Fut>(
    socks: std::net::SocketAddr,
    token: &str,
    http: std::net::SocketAddr,
    kill: F,
) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let proxy = format!("socks5h://{AGENT}:{token}@{socks}");
    let mut child = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "--proxy", &proxy])
        .arg(format!(
            "http://127.0.0.1:{}/bytes/{}",
            http.port(),
            4u64 << 30
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn curl");
    let mut stdout = child.stdout.take().expect("curl stdout");
    let mut stderr = child.stderr.take().expect("curl stderr");
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0usize;
    within("the download to get going", async {
        while received < 1 << 20 {
            let n = stdout.read(&mut buf).await.expect("read curl output");
            assert!(n > 0, "curl ended before the kill");
            received += n;
        }
    })
    .await;
    kill().await;
    // Read what is left so curl never blocks on a full pipe, then collect its verdict.
    within("curl to end after the kill", async {
        loop {
            match stdout.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    let status = within("curl to exit", child.wait()).await.expect("curl");
    let mut text = String::new();
    let _ = stderr.read_to_string(&mut text).await;
    Outcome {
        code: status.code().unwrap_or(-1),
        stderr: text,
        received,
    }
}

/// curl failed with a reset (exit 56, "Connection reset by peer"), not a clean end and not a
/// short body it could mistake for complete.
fn assert_reset(outcome: &Outcome, killed: &str) {
    assert!(
        outcome.received < 4 << 30,
        "the whole download arrived despite the {killed} being killed"
    );
    assert_eq!(
        outcome.code, 56,
        "curl after kill -9 of the {killed}: expected exit 56 (receive failure), got {} ({})",
        outcome.code, outcome.stderr
    );
    assert!(
        outcome.stderr.contains("reset"),
        "curl after kill -9 of the {killed} must report a reset: {}",
        outcome.stderr
    );
}
