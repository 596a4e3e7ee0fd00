//! The real binary: an agent process killed mid-transfer and restarted, and `rna dev` used
//! exactly as its printed line says.

use crate::common::*;

use tokio::process::Command;

const TENANT: &str = "acme/prod";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_agent_resets_clients_and_a_restarted_one_serves_again() {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let args = world.agent_process_args("vm-agent", &token);
    let mut agent = spawn_logged(&args).0;
    world.wait_sessions(TENANT, "vm-agent", 1).await;
    let http = http_server().await;
    let baseline = world.footprint(&[]);

    // Start a long download and read part of it.
    let mut s = download_in_progress(world.socks, "vm-agent", &token, http).await;

    // kill -9: no close frame, no FIN. The client must see a reset, never a clean EOF.
    agent.kill().await.unwrap();
    let outcome = within("the client to see the failure", drain(&mut s)).await;
    let err = outcome.expect_err("a dead agent must not look like a complete transfer");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    // The registry forgot the agent (within the heartbeat timeout).
    world.wait_sessions(TENANT, "vm-agent", 0).await;
    assert_eq!(
        socks_connect(world.socks, "vm-agent", &token, Dest::Ip(http))
            .await
            .err(),
        Some(0x04)
    );

    // Restart the agent process: it reconnects and serves new requests.
    let _agent = spawn_logged(&args).0;
    world.wait_sessions(TENANT, "vm-agent", 1).await;
    let (code, body) = curl(
        world.socks,
        "vm-agent",
        &token,
        &[&format!("http://127.0.0.1:{}/bytes/4096", http.port())],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(body, pattern(4096));
    // The dead session left nothing behind in the hub.
    drop(s);
    world.assert_no_leaks(&baseline, &[]).await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rna_dev_prints_a_working_line_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args: Vec<String> = [
        "dev",
        "--dir",
        state.to_str().unwrap(),
        "--socks",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let http = http_server().await;

    for run in 0..2 {
        let mut dev = Rna::new(&args).logs_at("info").spawn().child;
        let mut stdout = dev.stdout.take().unwrap();
        let line = first_line_starting(&mut stdout, "curl ").await;
        // `curl --proxy socks5h://local:<token>@127.0.0.1:<port> http://example.internal/`
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[1], "--proxy");
        let proxy = words[2];
        assert!(proxy.starts_with("socks5h://local:rna_"), "{line}");
        // The printed line works as it is: it fetches the hub's own /healthz through the agent.
        let printed = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--proxy", proxy, words[3]])
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&printed.stdout), "ok\n", "{line}");
        let url = format!("http://127.0.0.1:{}/bytes/2000", http.port());
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--proxy", proxy, &url])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, pattern(2000));

        signal(&dev, "-TERM");
        let status = within("rna dev to exit", dev.wait()).await.unwrap();
        assert_eq!(status.code(), Some(0), "run {run}");
        // The second run reuses the state folder and its token.
        assert!(state.join("token.txt").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_cover_for_a_killed_agent() {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let args = world.agent_process_args("replicated", &token);
    let mut first = spawn_logged(&args).0;
    let _second = spawn_logged(&args).0;
    world.wait_sessions(TENANT, "replicated", 2).await;
    let http = http_server().await;
    let url = format!("http://127.0.0.1:{}/bytes/1000", http.port());

    // kill -9 one replica and use the name at once: no request may fail.
    first.kill().await.unwrap();
    for _ in 0..10 {
        let (code, body) = curl(world.socks, "replicated", &token, &[&url]).await;
        assert_eq!(code, 0);
        assert_eq!(body, pattern(1000));
    }
    world.wait_sessions(TENANT, "replicated", 1).await;
    world.stop().await;
}

/// Runs `rna` to completion and returns (exit code, stdout).
async fn run_rna(args: &[&str]) -> (i32, String) {
    let ran = Rna::new(args)
        .env_remove("RNA_LOG_FORMAT")
        .run_async()
        .await;
    if !ran.status.success() {
        eprintln!("rna {args:?}: {}", ran.stderr);
    }
    (ran.code(), ran.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deployment_walkthrough_works_with_the_real_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |f: &str| tmp.path().join(f).display().to_string();
    let certs = d("certs");
    let store = d("tokens.toml");

    let (code, _) = run_rna(&[
        "certs",
        "init",
        "--dir",
        &certs,
        "--hub-name",
        "localhost",
        "--hub-name",
        "127.0.0.1",
    ])
    .await;
    assert_eq!(code, 0);
    let (code, _) = run_rna(&["certs", "agent", "--dir", &certs, "edge"]).await;
    assert_eq!(code, 0);
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca-key.pem", "hub-key.pem", "agent-edge-key.pem"] {
            let mode = std::fs::metadata(tmp.path().join("certs").join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }
    // A second init must not overwrite the CA.
    let (code, _) = run_rna(&["certs", "init", "--dir", &certs, "--hub-name", "localhost"]).await;
    assert_ne!(code, 0);

    let create = |scopes: &'static [&'static str], label: &'static str| {
        let store = store.clone();
        async move {
            let mut args = vec![
                "token",
                "create",
                "--store",
                &store,
                "--tenant",
                "acme/prod",
                "--label",
                label,
            ];
            for s in scopes {
                args.extend(["--scope", s]);
            }
            let (code, out) = run_rna(&args).await;
            assert_eq!(code, 0);
            out.trim().to_string()
        }
    };
    let agent_token = create(&["connect:agentHub"], "edge").await;
    let proxy_token = create(&["proxy"], "ci").await;
    let (code, listing) = run_rna(&["token", "list", "--store", &store]).await;
    assert_eq!(code, 0);
    assert!(
        listing.contains("acme/prod") && listing.contains("ci"),
        "{listing}"
    );
    assert!(!listing.contains(&agent_token) && !listing.contains(&proxy_token[4..]));
    assert!(!std::fs::read_to_string(&store)
        .unwrap()
        .contains(&proxy_token[17..]));
    std::fs::write(d("token.txt"), format!("{agent_token}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d("token.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    let hub_args = hub_process_args(&certs, &store, "127.0.0.1:0", &["--worker-threads", "3"]);
    let (hub, mut hub_log) = spawn_logged(&hub_args);
    let serving = wait_line(&mut hub_log, "hub serving").await;
    // The runtime reports the workers it really has.
    assert_eq!(field(&serving, "worker_threads"), "3", "{serving}");
    let quic = field(&serving, "quic");
    let socks: std::net::SocketAddr = field(&serving, "socks").parse().unwrap();

    let agent_args = agent_process_args(
        &quic,
        "edge",
        &format!("{certs}/ca.pem"),
        &certs,
        &d("token.txt"),
        &["--allow", "127.0.0.0/8"],
    );
    let (agent, mut agent_log) = spawn_logged(&agent_args);
    let starting = wait_line(&mut agent_log, "agent starting").await;
    let default = rna::runtime::default_worker_threads().to_string();
    assert_eq!(field(&starting, "worker_threads"), default, "{starting}");
    wait_line(&mut agent_log, "connected to hub").await;

    let http = http_server().await;
    let url = format!("http://localhost:{}/bytes/100000", http.port());
    let (code, body) = curl(socks, "edge", &proxy_token, &[&url]).await;
    assert_eq!(code, 0);
    assert_eq!(body, pattern(100_000));

    // Revoke with the CLI: the hub follows its store file, new SOCKS connections fail.
    let id = proxy_token.split('_').nth(1).unwrap();
    let (code, _) = run_rna(&["token", "revoke", "--store", &store, id]).await;
    assert_eq!(code, 0);
    wait_line(&mut hub_log, "token store reloaded").await;
    let (code, _) = curl(socks, "edge", &proxy_token, &[&url]).await;
    assert_eq!(code, 97);

    signal(&agent, "-TERM");
    signal(&hub, "-TERM");
    let (mut agent, mut hub) = (agent, hub);
    assert_eq!(
        within("agent exit", agent.wait()).await.unwrap().code(),
        Some(0)
    );
    assert_eq!(
        within("hub exit", hub.wait()).await.unwrap().code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_hub_resets_clients_and_agents_come_back_to_a_restarted_one() {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let dir = world.dir.path();
    let hub_cert = world
        .ca
        .issue_hub(&["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap();
    let write = |file: &str, text: &str| {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca = write("hub-ca.pem", &world.ca.cert_pem());
    let cert = write("hub.pem", &hub_cert.cert_pem);
    let key = write("hub-key.pem", &hub_cert.key_pem);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let hub_args = |quic: &str, socks: &str| -> Vec<String> {
        [
            "hub",
            "--listen",
            quic,
            "--socks",
            socks,
            "--api",
            "127.0.0.1:0",
            "--ca",
            &ca,
            "--cert",
            &cert,
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
    };
    let (mut hub, mut hub_log) = spawn_logged(&hub_args("127.0.0.1:0", "127.0.0.1:0"));
    let serving = wait_line(&mut hub_log, "hub serving").await;
    let quic = field(&serving, "quic");
    let socks: std::net::SocketAddr = field(&serving, "socks").parse().unwrap();

    // An in-process agent, so its reconnects and leftovers can be watched.
    let mut config = world.agent_config("edge", &token);
    config.hubs = vec![quic.parse().unwrap()];
    let agent = world.spawn_agent(config);
    within(
        "the agent to connect",
        agent.handle.wait_until(|s| s.connected == 1),
    )
    .await;
    let http = http_server().await;
    let baseline = world.footprint(&[&agent]);

    // A long download, partly read, then kill -9 of the hub.
    let mut s = download_in_progress(socks, "edge", &token, http).await;
    hub.kill().await.unwrap();
    let outcome = within("the client to see the failure", drain(&mut s)).await;
    let err = outcome.expect_err("a dead hub must not look like a complete transfer");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    // The agent notices (heartbeat timeout), then retries with backoff until a hub is back.
    within(
        "the agent to notice",
        agent.handle.wait_until(|s| s.connected == 0),
    )
    .await;
    let (_hub, mut hub_log) = spawn_logged(&hub_args(&quic, &socks.to_string()));
    wait_line(&mut hub_log, "hub serving").await;
    let status = within(
        "the agent to reconnect",
        agent.handle.wait_until(|s| s.connected == 1),
    )
    .await;
    assert_eq!(status.sessions_total, 2);
    assert!(agent
        .handle
        .metrics()
        .render()
        .contains("rna_agent_reconnects_total"));
    let (code, body) = curl(
        socks,
        "edge",
        &token,
        &[&format!("http://127.0.0.1:{}/bytes/4096", http.port())],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(body, pattern(4096));
    drop(s);
    // Nothing of the dead session is left in the agent.
    world.assert_no_leaks(&baseline, &[&agent]).await;
    agent.stop().await;
    world.stop().await;
}

/// A hub killed with SIGKILL and started again with the same `--state-dir` keeps its endpoint
/// key, so the agent's next packet draws a stateless reset it trusts: the agent reconnects
/// within about one keep-alive interval instead of waiting out its idle timeout (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_restarted_with_its_state_dir_is_rejoined_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let RestartableHub {
        mut hub,
        hub_args,
        agent,
        ..
    } = restartable_hub_and_agent(tmp.path()).await;
    let key = std::fs::read(tmp.path().join("state/endpoint.key")).unwrap();
    assert_eq!(key.len(), 32);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("state/endpoint.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let mut agent_log = agent.log;

    hub.kill().await.unwrap();
    let (_hub, mut hub_log) = spawn_logged(&hub_args);
    wait_line(&mut hub_log, "hub serving").await;
    assert_eq!(
        std::fs::read(tmp.path().join("state/endpoint.key")).unwrap(),
        key,
        "the key must be reused, not replaced"
    );
    // Far below the 30 s idle timeout the agent would otherwise wait out.
    let rejoined = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        wait_line(&mut agent_log, "reset by peer").await;
        wait_line(&mut agent_log, "connected to hub").await
    })
    .await;
    assert!(
        rejoined.is_ok(),
        "the agent did not learn of the restart from a stateless reset"
    );
}

/// `rna dev --socks-no-auth` prints a line without credentials next to the usual one, both
/// work as printed, and the hub's "no state folder" advice (meaningless when hub and agent
/// live and die together) is not logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rna_dev_without_auth_prints_both_working_lines_and_no_state_folder_advice() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut dev = Rna::new([
        "dev",
        "--dir",
        state.to_str().unwrap(),
        "--socks",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--socks-no-auth",
    ])
    .logs_at("info")
    .spawn();
    let mut log_lines = std::mem::replace(&mut dev.log, tokio::sync::mpsc::unbounded_channel().1);
    let log = tokio::spawn(async move {
        let mut all = String::new();
        while let Some(line) = log_lines.recv().await {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // One reader for both lines: a second one would miss what the first had buffered.
    let mut stdout = tokio::io::BufReader::new(dev.stdout()).lines();
    let curls = within("two curl lines", async {
        let mut curls = Vec::new();
        while curls.len() < 2 {
            match stdout.next_line().await.unwrap() {
                Some(line) if line.starts_with("curl ") => curls.push(line),
                Some(_) => {}
                None => panic!("output ended after {curls:?}"),
            }
        }
        curls
    })
    .await;
    let (with_token, without) = (&curls[0], &curls[1]);
    assert!(with_token.contains("socks5h://local:rna_"), "{with_token}");
    let words: Vec<&str> = without.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{without}");
    assert_eq!(words[1], "--proxy");
    assert!(
        words[2].starts_with("socks5h://127.0.0.1:") && !words[2].contains('@'),
        "{without}"
    );
    for line in [with_token, without] {
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--proxy", words[2], words[3]])
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{line}");
    }
    dev.signal("-TERM");
    let status = dev.exit().await;
    assert_eq!(status.code(), Some(0));
    let log = within("rna dev's log", log).await.unwrap();
    assert!(log.contains("hub serving"), "{log}");
    assert!(!log.contains("no state folder"), "{log}");
}

/// The agent's default metrics address taken (by this test, or by whatever else holds it on
/// this machine: the test works either way) does not stop the agent: it warns and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_whose_default_metrics_port_is_taken_still_starts() {
    let default = rna::config::DEFAULT_AGENT_METRICS;
    assert_ne!(default.port(), 9090, "Prometheus' own port");
    assert!(
        !(9100..=9999).contains(&default.port()),
        "the exporter range"
    );
    let _held = std::net::TcpListener::bind(default);
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let mut args = world.agent_process_args("busy-metrics", &token);
    let at = args.iter().position(|a| a == "--metrics").unwrap();
    args.drain(at..at + 2);
    let (_agent, mut log) = spawn_logged(&args);
    let line = wait_line(&mut log, "health and metrics endpoint not served").await;
    assert!(line.contains(&default.to_string()), "{line}");
    wait_line(&mut log, "connected to hub").await;
    world.wait_sessions(TENANT, "busy-metrics", 1).await;
    // An address asked for explicitly must be free: the agent refuses to start without it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut args = world.agent_process_args("busy-metrics", &token);
    let at = args.iter().position(|a| a == "--metrics").unwrap();
    args[at + 1] = taken.local_addr().unwrap().to_string();
    let (mut strict, mut log) = spawn_logged(&args);
    wait_line(&mut log, "binding the agent's metrics endpoint").await;
    let status = within("the agent to exit", strict.wait()).await.unwrap();
    assert_eq!(status.code(), Some(1));
    world.stop().await;
}

/// A certificate folder, a token store with one agent token, and the token file: what an
/// operator makes with `rna certs` and `rna token` before starting hub and agent.
struct Install {
    tmp: tempfile::TempDir,
}

impl Install {
    async fn new(agent: &str) -> Install {
        let install = Install {
            tmp: tempfile::tempdir().unwrap(),
        };
        let certs = install.path("certs");
        let init = ["certs", "init", "--dir", &certs, "--hub-name", "127.0.0.1"];
        assert_eq!(run_rna(&init).await.0, 0);
        assert_eq!(
            run_rna(&["certs", "agent", "--dir", &certs, agent]).await.0,
            0
        );
        let store = install.path("tokens.toml");
        let (code, token) = run_rna(&[
            "token",
            "create",
            "--store",
            &store,
            "--tenant",
            TENANT,
            "--scope",
            "connect:agentHub",
        ])
        .await;
        assert_eq!(code, 0);
        let file = install.path("token.txt");
        std::fs::write(&file, token.trim()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        install
    }

    fn path(&self, file: &str) -> String {
        self.tmp.path().join(file).display().to_string()
    }

    /// `rna agent` arguments: `ca` and `cert_dir` pick the CA the agent trusts and the folder
    /// its certificate comes from; `extra` follows.
    fn agent_args(
        &self,
        hub: &str,
        name: &str,
        ca: &str,
        cert_dir: &str,
        extra: &[&str],
    ) -> Vec<String> {
        agent_process_args(hub, name, ca, cert_dir, &self.path("token.txt"), extra)
    }
}

/// Every line received so far.
fn lines_so_far(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Vec<String> {
    let mut lines = Vec::new();
    while let Ok(line) = rx.try_recv() {
        lines.push(line);
    }
    lines
}

/// A certificate from another CA, an agent that trusts another CA, and a wrong hub name:
/// each side's log says which side refused which certificate and how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_refusals_say_which_side_refused_which_certificate_and_the_fix() {
    let install = Install::new("edge").await;
    let certs = install.path("certs");
    let other = install.path("other");
    let init = ["certs", "init", "--dir", &other, "--hub-name", "127.0.0.1"];
    assert_eq!(run_rna(&init).await.0, 0);
    assert_eq!(
        run_rna(&["certs", "agent", "--dir", &other, "edge"])
            .await
            .0,
        0
    );
    let hub_args = hub_process_args(&certs, &install.path("tokens.toml"), "127.0.0.1:0", &[]);
    let (_hub, mut hub_log) = spawn_logged(&hub_args);
    let quic = field(&wait_line(&mut hub_log, "hub serving").await, "quic");
    let ca = format!("{certs}/ca.pem");
    let other_ca = format!("{other}/ca.pem");

    // The agent's certificate comes from another installation's CA while it trusts the
    // hub's: the agent checks its own certificate against its --ca before it dials, so it
    // never reaches the hub and says which file is wrong.
    let (mut agent, mut agent_log) =
        spawn_logged(&install.agent_args(&quic, "edge", &ca, &other, &[]));
    let line = wait_line(&mut agent_log, "not a certificate of the CA").await;
    assert!(line.contains("agent-edge.pem"), "{line}");
    let status = within("the agent to exit", agent.wait()).await.unwrap();
    assert_eq!(status.code(), Some(2), "{line}");

    // (agent arguments, agent's line, hub's line)
    let cases: Vec<(Vec<String>, Vec<&str>, Vec<&str>)> = vec![
        (
            // The agent trusts another CA than the one that signed the hub's certificate (its
            // own certificate comes from that other CA too, so it passes its own check).
            install.agent_args(&quic, "edge", &other_ca, &other, &[]),
            vec![
                "this agent refused the certificate of the hub at",
                "not signed by the CA in this agent's --ca",
            ],
            vec!["refused this hub's certificate: it is not signed by the CA in the agent's --ca"],
        ),
        (
            // The agent dials a name the hub's certificate does not carry.
            install.agent_args(
                &quic,
                "edge",
                &ca,
                &certs,
                &["--server-name", "hub.wrong.example"],
            ),
            vec![
                "not valid for the name \"hub.wrong.example\"",
                "set --server-name to a name the hub certificate carries",
            ],
            vec![
                "refused this hub's certificate",
                "set the agent's --server-name",
            ],
        ),
    ];
    for (args, agent_says, hub_says) in cases {
        let (mut agent, mut agent_log) = spawn_logged(&args);
        let line = wait_line(&mut agent_log, agent_says[0]).await;
        assert!(line.contains("ERROR"), "{line}");
        for part in &agent_says {
            assert!(line.contains(part), "agent: {part:?} in {line}");
        }
        let line = wait_line(&mut hub_log, hub_says[0]).await;
        assert!(line.contains("WARN"), "{line}");
        for part in &hub_says {
            assert!(line.contains(part), "hub: {part:?} in {line}");
        }
        agent.kill().await.unwrap();
    }
}

/// A planned hub restart (SIGTERM, start again): agents log it at INFO, both hubs log no
/// warning, the going-away reason reads `hub shutting down` on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_hub_restart_logs_no_warnings_or_errors() {
    let install = Install::new("edge").await;
    let certs = install.path("certs");
    let port = free_udp_and_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let hub_args = hub_process_args(
        &certs,
        &install.path("tokens.toml"),
        &listen,
        &["--grace", "1s"],
    );
    let (mut hub, mut hub_log) = spawn_logged(&hub_args);
    let socks: std::net::SocketAddr = field(&wait_line(&mut hub_log, "hub serving").await, "socks")
        .parse()
        .unwrap();
    let agent_args = install.agent_args(
        &listen,
        "edge",
        &format!("{certs}/ca.pem"),
        &certs,
        &["--allow", "127.0.0.0/8"],
    );
    let (mut agent, mut agent_log) = spawn_logged(&agent_args);
    wait_line(&mut agent_log, "connected to hub").await;
    wait_line(&mut hub_log, "agent connected").await;
    // The session carries a request end to end before the restart begins.
    let (_, proxy_token) = run_rna(&[
        "token",
        "create",
        "--store",
        &install.path("tokens.toml"),
        "--tenant",
        TENANT,
        "--scope",
        "proxy",
    ])
    .await;
    let http = http_server().await;
    // The hub sees the new token once it reloads its store; retry until it has.
    let url = format!("http://127.0.0.1:{}/bytes/16", http.port());
    let fetched = eventually_some("a request through the agent", async || {
        let (code, body) = curl(socks, "edge", proxy_token.trim(), &[&url]).await;
        (code == 0).then_some(body)
    })
    .await;
    assert_eq!(fetched, pattern(16));

    signal(&hub, "-TERM");
    let agent_line = wait_line(&mut agent_log, "going_away").await;
    within("the hub to exit", hub.wait()).await.unwrap();
    let mut hub_lines = lines_so_far(&mut hub_log);
    let (mut hub2, mut hub2_log) = spawn_logged(&hub_args);
    wait_line(&mut hub2_log, "hub serving").await;
    wait_line(&mut agent_log, "connected to hub").await;
    wait_line(&mut hub2_log, "agent connected").await;
    signal(&agent, "-TERM");
    within("the agent to exit", agent.wait()).await.unwrap();
    signal(&hub2, "-TERM");
    within("the second hub to exit", hub2.wait()).await.unwrap();
    hub_lines.extend(lines_so_far(&mut hub2_log));
    let mut agent_lines = vec![agent_line.clone()];
    agent_lines.extend(lines_so_far(&mut agent_log));

    assert!(agent_line.contains("INFO"), "{agent_line}");
    assert!(agent_line.contains("hub shutting down"), "{agent_line}");
    for line in &agent_lines {
        assert!(
            !line.contains("ERROR") && !line.contains("WARN"),
            "a planned restart is routine for the agent: {line}"
        );
        assert!(!line.contains("hub_shutdown"), "{line}");
    }
    for line in &hub_lines {
        assert!(
            !line.contains("ERROR") && !line.contains("WARN"),
            "a planned restart is routine for the hub: {line}"
        );
    }
    let closed = hub_lines
        .iter()
        .find(|l| l.contains("agent disconnected"))
        .expect("the hub logs the session's end");
    assert!(closed.contains("hub shutting down"), "{closed}");
}

/// The same error is never printed twice in one message: a port in use names itself once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_is_reported_once() {
    let install = Install::new("edge").await;
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let listen = busy.local_addr().unwrap().to_string();
    let args = hub_process_args(
        &install.path("certs"),
        &install.path("tokens.toml"),
        &listen,
        &[],
    );
    let out = Rna::new(&args)
        .env_remove("RNA_LOG_FORMAT")
        .run_async()
        .await;
    assert!(!out.status.success());
    let stderr = &out.stderr;
    let cause = std::io::Error::from(std::io::ErrorKind::AddrInUse).to_string();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("rna: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    assert!(line.contains(&listen), "{line}");
    assert_eq!(line.matches("in use").count(), 1, "{line} ({cause})");
}

/// `rna certs` says when each certificate expires; hub and agent whose certificates expire in
/// 10 days warn about their own and the peer's; both export the expiry as a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_near_expiry_are_announced_and_exported() {
    let install = Install::new("edge").await;
    let certs = install.path("certs");
    // `rna certs agent` output names the expiry (825 days from one day ago).
    let (code, out) = run_rna(&["certs", "agent", "--dir", &certs, "other"]).await;
    assert_eq!(code, 0);
    let line = out
        .lines()
        .find(|l| l.contains("agent-other.pem"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("(expires 20") && line.contains("in 823 days"),
        "{line}"
    );

    // Certificates from the same CA that end in 10 days.
    let ca = rna::certs::Ca::from_pem(
        &std::fs::read_to_string(format!("{certs}/ca.pem")).unwrap(),
        &std::fs::read_to_string(format!("{certs}/ca-key.pem")).unwrap(),
    )
    .unwrap();
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let ends = now + 10 * day;
    let hub = ca
        .issue_hub_with_validity(&["127.0.0.1".to_string()], now - day, ends)
        .unwrap();
    let agent = ca
        .issue_agent_with_validity("edge", now - day, ends)
        .unwrap();
    let short = install.path("short");
    std::fs::create_dir_all(&short).unwrap();
    for (file, text) in [
        ("ca.pem", ca.cert_pem()),
        ("hub.pem", hub.cert_pem),
        ("hub-key.pem", hub.key_pem),
        ("agent-edge.pem", agent.cert_pem),
        ("agent-edge-key.pem", agent.key_pem),
    ] {
        std::fs::write(format!("{short}/{file}"), text).unwrap();
    }
    // The hub's /metrics answer only a `read:metrics` token.
    let store = install.path("tokens.toml");
    let (code, out) = run_rna(&[
        "token",
        "create",
        "--store",
        &store,
        "--tenant",
        "ops/monitoring",
        "--scope",
        "read:metrics",
    ])
    .await;
    assert_eq!(code, 0);
    let metrics_token = out.trim().to_string();
    let hub_args = hub_process_args(&short, &store, "127.0.0.1:0", &[]);
    let (_hub, mut hub_log) = spawn_logged(&hub_args);
    let serving = wait_line(&mut hub_log, "hub serving").await;
    let own = wait_line(&mut hub_log, "this hub's certificate (--cert) expires in").await;
    assert!(
        own.contains("WARN") && own.contains("docs/operations.md"),
        "{own}"
    );
    let quic = field(&serving, "quic");
    let api: std::net::SocketAddr = field(&serving, "api").parse().unwrap();

    let args = install.agent_args(&quic, "edge", &format!("{short}/ca.pem"), &short, &[]);
    let (_agent, mut agent_log) = spawn_logged(&args);
    let metrics_line = wait_line(&mut agent_log, "agent health and metrics endpoint").await;
    let agent_metrics: std::net::SocketAddr = field(&metrics_line, "metrics").parse().unwrap();
    // The agent reads its own certificate once at start, before it connects; the hub's
    // certificate it sees on the connection.
    let own = wait_line(
        &mut agent_log,
        "this agent's certificate (--cert) expires in",
    )
    .await;
    wait_line(&mut agent_log, "connected to hub").await;
    let lines = [
        own,
        wait_line(&mut agent_log, "the hub's certificate expires in").await,
        wait_line(&mut hub_log, "the certificate of agent edge expires in").await,
    ];
    for line in &lines {
        assert!(line.contains("WARN"), "{line}");
        assert!(
            line.contains("expires in 9 days") || line.contains("expires in 10 days"),
            "{line}"
        );
    }

    let expected = ends
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (addr, role) in [
        (api, "hub"),
        (agent_metrics, "agent"),
        (agent_metrics, "hub"),
    ] {
        let token = (role == "hub" && addr == api).then_some(metrics_token.as_str());
        let (status, body) = http_get_as(addr, "/metrics", token).await;
        assert_eq!(status, 200);
        let name = format!("rna_certificate_expiry_timestamp_seconds{{role=\"{role}\"}} ");
        let value: u64 = body
            .lines()
            .find_map(|l| l.strip_prefix(&name))
            .unwrap_or_else(|| panic!("{name} in {body}"))
            .trim()
            .parse()
            .unwrap();
        // X.509 times have whole seconds.
        assert!(
            value.abs_diff(expected) <= 1,
            "{role}: {value} vs {expected}"
        );
    }
}

/// A broken token store is reported once per reload: once when the save is noticed, once for
/// a SIGHUP, never again by the signal handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_token_store_is_reported_once_per_reload() {
    let install = Install::new("edge").await;
    let store = install.path("tokens.toml");
    let args = hub_process_args(&install.path("certs"), &store, "127.0.0.1:0", &[]);
    let (mut hub, mut hub_log) = spawn_logged(&args);
    wait_line(&mut hub_log, "hub serving").await;
    std::fs::write(&store, "garbage [\n").unwrap();
    let first = wait_line(&mut hub_log, "keeping the previous tokens").await;
    assert!(first.contains("tokens.toml: line 1"), "{first}");
    signal(&hub, "-HUP");
    wait_line(&mut hub_log, "SIGHUP: reloading").await;
    let second = wait_line(&mut hub_log, "tokens.toml: line 1").await;
    assert!(second.contains("keeping the previous tokens"), "{second}");
    signal(&hub, "-TERM");
    within("the hub to exit", hub.wait()).await.unwrap();
    let rest = lines_so_far(&mut hub_log);
    let repeats: Vec<&String> = rest.iter().filter(|l| l.contains("line 1")).collect();
    assert!(repeats.is_empty(), "reported again: {repeats:?}");
}
