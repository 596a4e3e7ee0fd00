//! Signals on the real binary: SIGTERM drains in-flight transfers within `--grace` and exits 0
//! in time; SIGHUP reloads tokens (hub) and policy (agent) without dropping a transfer. Both
//! run with the agent on QUIC and on TLS over TCP (`--transport`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use rna::agent::TransportMode;
use rna::auth::{Scope, TokenStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::sync::{mpsc, Semaphore};

const TENANT: &str = "acme/prod";
const HALF: usize = 1 << 20;

/// A destination that sends [`HALF`] bytes of the test pattern, waits for a permit from
/// the returned semaphore, then sends the second half and closes.
async fn gated_server() -> (SocketAddr, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let addr = tcp_server(move |mut s: TcpStream| {
        let gate = g.clone();
        async move {
            let data = pattern(2 * HALF);
            if s.write_all(&data[..HALF]).await.is_err() {
                return;
            }
            // One permit lets one connection through, for good.
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
            if s.write_all(&data[HALF..]).await.is_ok() {
                let _ = s.shutdown().await;
            }
        }
    })
    .await;
    (addr, gate)
}

/// A CA, hub and agent certificates, a token store with an agent token and a proxy token.
struct Pki {
    dir: tempfile::TempDir,
    agent_token: String,
    proxy_token: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        rna::certs::init_dir(p, &["127.0.0.1".to_string()], false).expect("certs");
        rna::certs::issue_agent_files(p, "edge", false).expect("agent cert");
        let mut store = TokenStore::default();
        let now = SystemTime::now();
        let tenant = || TENANT.parse().expect("tenant");
        let (agent, _) = store
            .create(tenant(), vec![Scope::ConnectAgentHub], None, None, now)
            .expect("token");
        let (proxy, _) = store
            .create(tenant(), vec![Scope::Proxy], None, None, now)
            .expect("token");
        store.save(&p.join("tokens.toml")).expect("save");
        write_private(&p.join("token.txt"), agent.expose());
        Pki {
            dir,
            agent_token: agent.expose().to_string(),
            proxy_token: proxy.expose().to_string(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Starts the hub process: returns it, its log, and its SOCKS and API addresses.
    async fn hub(
        &self,
        extra: &[&str],
    ) -> (
        Child,
        mpsc::UnboundedReceiver<String>,
        SocketAddr,
        SocketAddr,
        String,
    ) {
        let certs = self.dir.path().display().to_string();
        let args = hub_process_args(&certs, &self.path("tokens.toml"), "127.0.0.1:0", extra);
        let (child, mut log) = spawn_logged(&args);
        let serving = wait_line(&mut log, "hub serving").await;
        let socks = field(&serving, "socks").parse().expect("socks addr");
        let api = field(&serving, "api").parse().expect("api addr");
        (child, log, socks, api, field(&serving, "quic"))
    }

    /// Starts an agent process on `transport` with a config file holding its policy; fails
    /// the test unless its session runs on that transport.
    async fn agent(
        &self,
        quic: &str,
        transport: TransportMode,
    ) -> (Child, mpsc::UnboundedReceiver<String>) {
        self.write_policy("deny = []");
        let args = agent_process_args(
            quic,
            "edge",
            &self.path("ca.pem"),
            &self.dir.path().display().to_string(),
            &self.path("token.txt"),
            &[
                "--config",
                &self.path("agent.toml"),
                "--transport",
                transport.as_str(),
            ],
        );
        let (child, mut log) = spawn_logged(&args);
        let connected = wait_line(&mut log, "connected to hub").await;
        assert_eq!(
            field(&connected, "transport"),
            transport.as_str(),
            "{connected}"
        );
        (child, log)
    }

    fn write_policy(&self, deny: &str) {
        std::fs::write(
            self.dir.path().join("agent.toml"),
            format!("allow = [\"127.0.0.0/8\"]\n{deny}\n"),
        )
        .expect("write agent.toml");
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Reads to the end; Ok(bytes) on a clean EOF.
async fn read_rest(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map(|_| out)
}

on_both_transports!(sigterm_drains_transfers_within_the_grace_and_exits_zero);
async fn sigterm_drains_transfers_within_the_grace_and_exits_zero(transport: TransportMode) {
    let pki = Pki::new();
    let grace = Duration::from_secs(4);
    let (mut hub, mut hub_log, socks, api, quic) = pki.hub(&["--grace", "4s"]).await;
    let (_agent, mut agent_log) = pki.agent(&quic, transport).await;
    let (dest, gate) = gated_server().await;

    // Two transfers, each with its first half read: one will be let through, one never.
    let mut finishing = socks_connect(socks, "edge", &pki.proxy_token, Dest::Ip(dest))
        .await
        .expect("tunnel");
    let mut stuck = socks_connect(socks, "edge", &pki.proxy_token, Dest::Ip(dest))
        .await
        .expect("tunnel");
    let mut first = vec![0u8; HALF];
    finishing.read_exact(&mut first).await.expect("first half");
    stuck.read_exact(&mut first).await.expect("first half");
    assert_eq!(http_get(api, "/readyz").await.0, 200);

    let signalled = Instant::now();
    signal(&hub, "-TERM");
    wait_line(&mut hub_log, "hub shutting down").await;
    assert_eq!(
        http_get(api, "/readyz").await.0,
        503,
        "draining hub is not ready"
    );
    assert!(
        TcpStream::connect(socks).await.is_err(),
        "no new SOCKS connections while draining"
    );

    // The transfer let through within the grace completes, byte for byte, with a clean EOF.
    gate.add_permits(1);
    let rest = within("the drained transfer", read_rest(&mut finishing))
        .await
        .expect("clean end of the drained transfer");
    assert_eq!(rest, pattern(2 * HALF)[HALF..]);

    // The stuck one is cut at the end of the grace: a reset, never a clean EOF.
    let cut = within("the stuck transfer to be cut", read_rest(&mut stuck)).await;
    assert!(
        cut.is_err(),
        "a transfer cut by the grace must not look complete"
    );
    let status = within("hub exit", hub.wait()).await.expect("wait");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= grace,
        "the stuck stream had the whole grace: {took:?}"
    );
    assert!(
        took < grace + Duration::from_secs(2),
        "exit within grace + 2 s, took {took:?}"
    );
    // The agent heard "going away" and goes looking for a hub again at once.
    wait_line(&mut agent_log, "going away").await;
}

on_both_transports!(sighup_reloads_tokens_and_policy_without_dropping_a_transfer);
async fn sighup_reloads_tokens_and_policy_without_dropping_a_transfer(transport: TransportMode) {
    let pki = Pki::new();
    // Only SIGHUP may reload the store in this test: the file poll is an hour away.
    let (mut hub, mut hub_log, socks, api, quic) = pki.hub(&["--token-poll", "1h"]).await;
    let (agent, mut agent_log) = pki.agent(&quic, transport).await;
    let (dest, gate) = gated_server().await;

    let mut transfer = socks_connect(socks, "edge", &pki.proxy_token, Dest::Ip(dest))
        .await
        .expect("tunnel");
    let mut first = vec![0u8; HALF];
    transfer.read_exact(&mut first).await.expect("first half");

    // A token added to the store works after SIGHUP.
    let store_path = pki.dir.path().join("tokens.toml");
    let mut store = TokenStore::load(&store_path).expect("load");
    let (added, _) = store
        .create(
            TENANT.parse().expect("tenant"),
            vec![Scope::Proxy],
            None,
            Some("added".into()),
            SystemTime::now(),
        )
        .expect("create");
    store.save(&store_path).expect("save");
    let added = added.expose().to_string();
    signal(&hub, "-HUP");
    wait_line(&mut hub_log, "token store reloaded").await;
    let mut fresh = socks_connect(socks, "edge", &added, Dest::Ip(dest))
        .await
        .expect("the added token works after SIGHUP");

    // The agent re-reads its deny rules on SIGHUP: new dials to loopback are refused.
    pki.write_policy("deny = [\"127.0.0.0/8\"]");
    signal(&agent, "-HUP");
    wait_line(&mut agent_log, "policy reloaded").await;
    assert_eq!(
        socks_connect(socks, "edge", &pki.proxy_token, Dest::Ip(dest))
            .await
            .err(),
        Some(0x02),
        "denied after the agent's reload"
    );

    // Both transfers that were open keep flowing to the end.
    gate.add_permits(2);
    let rest = within("the transfer across both reloads", read_rest(&mut transfer))
        .await
        .expect("clean end");
    assert_eq!(rest, pattern(2 * HALF)[HALF..]);
    let whole = within("the transfer of the new token", read_rest(&mut fresh))
        .await
        .expect("clean end");
    assert_eq!(whole, pattern(2 * HALF));
    assert_eq!(http_get(api, "/readyz").await.0, 200);
    drop((transfer, fresh));
    signal(&hub, "-TERM");
    assert_eq!(
        within("hub exit", hub.wait()).await.expect("wait").code(),
        Some(0)
    );
    drop(pki.agent_token);
}
