//! The real binary: an agent process killed mid-transfer and restarted, and `rna dev` used
//! exactly as its printed line says.

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const TENANT: &str = "acme/prod";
const RNA: &str = env!("CARGO_BIN_EXE_rna");

fn spawn_rna(args: &[String]) -> Child {
    Command::new(RNA)
        .args(args)
        .env("RNA_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_agent_resets_clients_and_a_restarted_one_serves_again() {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let args = world.agent_process_args("vm-agent", &token);
    let mut agent = spawn_rna(&args);
    world.wait_sessions(TENANT, "vm-agent", 1).await;
    let http = http_server().await;

    // Start a long download and read part of it.
    let mut s = socks_connect(world.socks, "vm-agent", &token, Dest::Ip(http))
        .await
        .unwrap();
    s.write_all(b"GET /bytes/10000000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    s.read_exact(&mut buf).await.unwrap();

    // kill -9: no close frame, no FIN. The client must see a reset, never a clean EOF.
    agent.kill().await.unwrap();
    let outcome = within("the client to see the failure", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
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
    let _agent = spawn_rna(&args);
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
        let mut dev = spawn_rna(&args);
        let stdout = dev.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = within("the ready line", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.starts_with("curl ") {
                    return line;
                }
            }
            panic!("rna dev exited without printing a curl line");
        })
        .await;
        // `curl --proxy socks5h://local:<token>@127.0.0.1:<port> http://example.internal/`
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[1], "--proxy");
        let proxy = words[2];
        assert!(proxy.starts_with("socks5h://local:rna_"), "{line}");
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
