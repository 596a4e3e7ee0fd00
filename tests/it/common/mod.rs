//! Test support: a PKI made per test, a hub and agents in-process on port 0, destination
//! servers, and a raw SOCKS5 client that exposes reply codes.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use rna::agent::{Agent, AgentConfig, AgentHandle, HubTarget, Policy, TransportMode};
use rna::auth::{Scope, Secret, TokenStore};
use rna::certs::Ca;
use rna::hub::{Hub, HubConfig, HubHandle};
use rna::transport::control::Heartbeat;
use rna::transport::session::Session;
use rna::transport::{ClientTls, ServerTls};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound on any wait in a test; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(20);

/// Waits for `fut` at most [`WAIT`], failing the test with `what` otherwise.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A running hub with its PKI and token store.
pub struct World {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub tokens: PathBuf,
    pub hub: HubHandle,
    pub quic: SocketAddr,
    pub socks: SocketAddr,
    pub api: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), rna::hub::HubError>>>,
}

/// Polls `cond` every 10 ms until it holds, failing after 20 s. For state that has no change
/// notification (counters, gauges, /proc); never a fixed sleep.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    assert!(settles(cond).await, "timed out waiting for {what}");
}

/// Polls `cond` every 10 ms until it holds (true) or 20 s have passed (false), for callers
/// that explain a failure with more than a name.
pub async fn settles(mut cond: impl FnMut() -> bool) -> bool {
    let poll = async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while !cond() {
            tick.tick().await;
        }
    };
    tokio::time::timeout(WAIT, poll).await.is_ok()
}

/// Polls the async `probe` every 20 ms until it returns a value, failing after 20 s; for
/// conditions checked by I/O (an HTTP answer, a SOCKS fetch, a refusal that ends). Never a
/// fixed sleep.
pub async fn eventually_some<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    within(what, async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            tick.tick().await;
        }
    })
    .await
}

/// [`eventually_some`] for a yes-or-no condition.
pub async fn eventually_async(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    eventually_some(what, async || cond().await.then_some(())).await
}

/// Heartbeats fast enough that a dead agent is noticed within seconds, yet tolerant
/// enough that a heavily loaded 2-core machine (UDP drops, quinn backing off) keeps live agents.
pub fn fast_heartbeat() -> Heartbeat {
    Heartbeat {
        interval: Duration::from_millis(500),
        timeout: Duration::from_secs(8),
    }
}

impl World {
    /// Starts a hub on 127.0.0.1:0 with an empty token store.
    pub async fn start() -> World {
        Self::start_with(|_| {}).await
    }

    /// Starts a hub after `tune` adjusts its configuration.
    pub async fn start_with(tune: impl FnOnce(&mut HubConfig)) -> World {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("rna test CA").unwrap();
        let hub_cert = ca
            .issue_hub(&["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
        let tokens = dir.path().join("tokens.toml");
        TokenStore::default().save(&tokens).unwrap();
        let tls =
            ServerTls::from_pem(&ca.cert_pem(), &hub_cert.cert_pem, &hub_cert.key_pem).unwrap();
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut config = HubConfig::new(local, local, tls, tokens.clone());
        config.api = Some(local);
        config.heartbeat = fast_heartbeat();
        config.grace = Duration::from_secs(5);
        config.token_poll = Duration::from_millis(100);
        tune(&mut config);
        let hub = Hub::bind(config).await.unwrap();
        let (quic, socks) = (hub.quic_addr(), hub.socks_addr());
        let api = hub.api_addr().unwrap();
        let handle = hub.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(hub.run(shutdown.clone()));
        World {
            dir,
            ca,
            tokens,
            hub: handle,
            quic,
            socks,
            api,
            shutdown,
            task: Some(task),
        }
    }

    /// Creates a token in the store, makes the hub reload, and returns the token text.
    pub fn token(&self, tenant: &str, scopes: &[Scope]) -> String {
        self.token_with_ttl(tenant, scopes, None)
    }

    /// Like [`token`](Self::token) with an expiry.
    pub fn token_with_ttl(&self, tenant: &str, scopes: &[Scope], ttl: Option<Duration>) -> String {
        let mut store = TokenStore::load(&self.tokens).unwrap();
        let (secret, _) = store
            .create(
                tenant.parse().unwrap(),
                scopes.to_vec(),
                ttl,
                Some("test".into()),
                SystemTime::now(),
            )
            .unwrap();
        store.save(&self.tokens).unwrap();
        self.hub.reload_tokens().unwrap();
        secret.expose().to_string()
    }

    /// Revokes a token by its text and reloads the hub.
    pub fn revoke(&self, token: &str) {
        let id = token.split('_').nth(1).unwrap().to_string();
        let mut store = TokenStore::load(&self.tokens).unwrap();
        store.revoke(&id).unwrap();
        store.save(&self.tokens).unwrap();
        self.hub.reload_tokens().unwrap();
    }

    /// A token for agent registration and SOCKS use in `tenant`.
    pub fn agent_token(&self, tenant: &str) -> String {
        self.token(tenant, &[Scope::ConnectAgentHub, Scope::Proxy])
    }

    /// An agent configuration with a certificate for `name`, allowed to dial loopback.
    pub fn agent_config(&self, name: &str, token: &str) -> AgentConfig {
        let cert = self.ca.issue_agent(name).unwrap();
        let tls = ClientTls::from_pem(&self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
        self.agent_config_with_tls(name, token, tls)
    }

    /// An agent configuration with the given TLS material.
    pub fn agent_config_with_tls(&self, name: &str, token: &str, tls: ClientTls) -> AgentConfig {
        let target = HubTarget {
            host: "127.0.0.1".into(),
            port: self.quic.port(),
        };
        let mut config =
            AgentConfig::new(vec![target], name.into(), tls, Secret::new(token.into()));
        config.policy = Policy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
        config.backoff.min = Duration::from_millis(50);
        config.backoff.max = Duration::from_millis(500);
        config.backoff.refused = Duration::from_millis(200);
        config.dial_timeout = Duration::from_secs(3);
        config
    }

    /// Starts an agent in-process.
    pub fn spawn_agent(&self, config: AgentConfig) -> TestAgent {
        let agent = Agent::new(config).unwrap();
        let handle = agent.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        TestAgent {
            handle,
            shutdown,
            task: Some(task),
        }
    }

    /// Starts an agent and waits until the hub has registered `count` sessions of it and the
    /// agent serves each ([`wait_answering`](Self::wait_answering)).
    pub async fn connect_agent(
        &self,
        tenant: &str,
        name: &str,
        token: &str,
        count: usize,
    ) -> TestAgent {
        let agent = self.spawn_agent(self.agent_config(name, token));
        self.wait_sessions(tenant, name, count).await;
        self.wait_answering(tenant, name, count).await;
        agent
    }

    /// Waits until the hub has exactly `count` sessions of (tenant, name).
    pub async fn wait_sessions(&self, tenant: &str, name: &str, count: usize) {
        let tenant: rna::auth::Tenant = tenant.parse().unwrap();
        within(
            &format!("{count} sessions of {name}"),
            self.hub
                .registry()
                .wait_until(|r| r.count(&tenant, name) == count),
        )
        .await;
    }

    /// [`agent_config`](Self::agent_config) on one transport: `Quic` or `Tcp` (the hub serves
    /// both on its one port), so a test body can run over either.
    pub fn agent_config_over(
        &self,
        name: &str,
        token: &str,
        transport: TransportMode,
    ) -> AgentConfig {
        let mut config = self.agent_config(name, token);
        config.transport = transport;
        config
    }

    /// [`connect_agent`](Self::connect_agent) over `transport`; fails the test unless the
    /// hub registered the sessions on that transport.
    pub async fn connect_agent_over(
        &self,
        tenant: &str,
        name: &str,
        token: &str,
        count: usize,
        transport: TransportMode,
    ) -> TestAgent {
        let agent = self.spawn_agent(self.agent_config_over(name, token, transport));
        self.wait_sessions(tenant, name, count).await;
        self.assert_transport(tenant, name, transport);
        self.wait_answering(tenant, name, count).await;
        agent
    }

    /// Waits until (tenant, name) has `count` sessions and the agent answered a heartbeat on
    /// each. The hub registers a session before the agent has read Welcome and started
    /// serving it; an answered heartbeat means the agent's session task runs, so a
    /// [`footprint`](Self::footprint) taken after this counts the session's tasks on both
    /// sides.
    pub async fn wait_answering(&self, tenant: &str, name: &str, count: usize) {
        let tenant: rna::auth::Tenant = tenant.parse().unwrap();
        eventually("the agent to answer a heartbeat on every session", || {
            let sessions = self.hub.registry().sessions_of(&tenant, name);
            sessions.len() == count && sessions.iter().all(|s| s.info().rtt_ms > 0.0)
        })
        .await;
    }

    /// Fails the test unless (tenant, name) has sessions and the hub says every one is
    /// carried by `transport`: a run meant for TCP cannot pass over QUIC, nor the reverse.
    pub fn assert_transport(&self, tenant: &str, name: &str, transport: TransportMode) {
        let tenant: rna::auth::Tenant = tenant.parse().unwrap();
        let sessions = self.hub.registry().sessions_of(&tenant, name);
        assert!(!sessions.is_empty(), "no session of {name}");
        for session in sessions {
            let info = session.info();
            assert_eq!(
                info.transport,
                transport.as_str(),
                "session {} of {name} runs over {}, not {transport}",
                info.session_id,
                info.transport
            );
        }
    }

    /// A session to the hub with an agent certificate for `name` over `transport` (`Quic` or
    /// `Tcp`), past TLS and (on TCP) the multiplexer's setup, that has sent nothing: what a
    /// stalled or hostile client holding a leaked certificate gives the hub.
    pub async fn raw_session(&self, name: &str, transport: TransportMode) -> RawSession {
        let cert = self.ca.issue_agent(name).unwrap();
        let tls = ClientTls::from_pem(&self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
        let limits = rna::transport::Limits::default();
        match transport {
            TransportMode::Quic => {
                let endpoint = rna::transport::agent_endpoint(self.quic, &tls, &limits).unwrap();
                let connection = within(
                    "a raw QUIC session",
                    endpoint.connect(self.quic, "localhost").unwrap(),
                )
                .await
                .unwrap();
                RawSession {
                    session: connection.into(),
                    _endpoint: Some(endpoint),
                }
            }
            TransportMode::Tcp => {
                let session = within(
                    "a raw TCP session",
                    rna::transport::tcp::connect(self.quic, "localhost", &tls, &limits),
                )
                .await
                .unwrap();
                RawSession {
                    session: session.into(),
                    _endpoint: None,
                }
            }
            TransportMode::Auto => panic!("a raw session needs a definite transport"),
        }
    }

    /// Writes the files a real `rna agent` process needs and returns its arguments.
    pub fn agent_process_args(&self, name: &str, token: &str) -> Vec<String> {
        let dir = self.dir.path();
        let cert = self.ca.issue_agent(name).unwrap();
        let write = |file: &str, text: &str| {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join(file);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            path.display().to_string()
        };
        let ca = write("ca.pem", &self.ca.cert_pem());
        write(&format!("agent-{name}.pem"), &cert.cert_pem);
        write(&format!("agent-{name}-key.pem"), &cert.key_pem);
        let token_path = write(&format!("token-{name}.txt"), token);
        let dir = dir.display().to_string();
        let hub = format!("127.0.0.1:{}", self.quic.port());
        agent_process_args(
            &hub,
            name,
            &ca,
            &dir,
            &token_path,
            &["--allow", "127.0.0.0/8"],
        )
    }

    /// Starts the hub's shutdown (as SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the hub task to end after [`begin_shutdown`](Self::begin_shutdown).
    pub async fn wait_stopped(&mut self) {
        if let Some(task) = self.task.take() {
            within("hub shutdown", task).await.unwrap().unwrap();
        }
    }

    /// Stops the hub and waits for it.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        self.wait_stopped().await;
    }
}

/// A hub session opened by [`World::raw_session`]; on QUIC it keeps its endpoint alive.
pub struct RawSession {
    pub session: Session,
    _endpoint: Option<quinn::Endpoint>,
}

impl RawSession {
    /// Sends Hello as agent `name` with `token` and `capabilities` on a new control stream
    /// and reads the hub's Welcome: the control stream of a session the test drives by hand.
    pub async fn hello(
        &self,
        name: &str,
        token: &str,
        capabilities: Vec<String>,
    ) -> (
        rna::transport::session::SendStream,
        rna::transport::control::ControlReader,
        rna::proto::Welcome,
    ) {
        use futures_util::StreamExt as _;
        use rna::proto::codec::{encode, MAX_FRAME};
        use rna::proto::{Control, Hello, PROTOCOL_VERSION};
        let (mut send, recv) = self.session.open_bi().await.unwrap();
        let hello = Control::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            name: name.into(),
            version: "test".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            capabilities,
            token: Secret::new(token.into()),
        });
        send.write_all(&encode(&hello).unwrap()).await.unwrap();
        let mut reader = rna::transport::control::control_reader(recv, MAX_FRAME);
        match within("Welcome", reader.next()).await {
            Some(Ok(Control::Welcome(w))) => (send, reader, w),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }
}

/// Runs the test body `NAME(transport: TransportMode)` once per transport: emits
/// `mod NAME { quic, tcp }`, two `#[tokio::test]`s with the runtime arguments given
/// (`flavor = "multi_thread", worker_threads = 4` when none are). One body, so both transports
/// are held to the same behaviour; run one side with `cargo test --test it ::tcp`.
// The test binaries that include this module but no transport test leave it unused.
#[allow(unused_macros)]
macro_rules! on_both_transports {
    ($body:ident) => {
        on_both_transports!($body, flavor = "multi_thread", worker_threads = 4);
    };
    ($body:ident, $($runtime:tt)+) => {
        mod $body {
            use rna::agent::TransportMode;

            #[tokio::test($($runtime)+)]
            async fn quic() {
                super::$body(TransportMode::Quic).await
            }

            #[tokio::test($($runtime)+)]
            async fn tcp() {
                super::$body(TransportMode::Tcp).await
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_transports;

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An in-process agent.
pub struct TestAgent {
    pub handle: AgentHandle,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<Result<(), rna::agent::AgentError>>>,
}

impl TestAgent {
    /// Stops the agent and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            within("agent shutdown", task).await.unwrap().unwrap();
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The byte at offset `i` of the deterministic test payload.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8 ^ (i as u8)
}

/// The deterministic payload of `len` bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64).map(pattern_byte).collect()
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A small HTTP/1.1 server: `GET /bytes/N` answers N pattern bytes; `POST /sha256` answers the
/// hex SHA-256 of the body. One request per connection.
pub async fn http_server() -> SocketAddr {
    tcp_server(serve_http).await
}

/// A TCP server on 127.0.0.1 that runs `handle` on its own task for every connection.
pub async fn tcp_server<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream));
        }
    });
    addr
}

async fn serve_http(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut lines = head.lines();
    let request = lines.next().unwrap_or_default().to_string();
    let mut content_length = 0usize;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let parts: Vec<&str> = request.split_whitespace().collect();
    let (method, path) = (
        parts.first().copied().unwrap_or(""),
        parts.get(1).copied().unwrap_or(""),
    );
    if method == "GET" {
        if let Some(n) = path.strip_prefix("/bytes/") {
            let n: u64 = n.parse().unwrap_or(0);
            let header = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
            );
            if stream.write_all(header.as_bytes()).await.is_err() {
                return;
            }
            let mut offset = 0u64;
            let mut chunk = Vec::with_capacity(64 * 1024);
            while offset < n {
                chunk.clear();
                let end = (offset + 64 * 1024).min(n);
                chunk.extend((offset..end).map(pattern_byte));
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
                offset = end;
            }
            let _ = stream.shutdown().await;
            return;
        }
        let body = "hello from the private network\n";
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    }
    if method == "POST" || method == "PUT" {
        let mut hasher = Sha256::new();
        let mut left = content_length;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = left.min(buf.len());
            match stream.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    left -= n;
                }
            }
        }
        let digest: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{digest}",
            digest.len()
        );
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

/// A TCP server that reads until EOF, then answers `N <sha256>` of what it read and closes.
pub async fn half_close_server() -> SocketAddr {
    tcp_server(|mut stream: TcpStream| async move {
        let mut data = Vec::new();
        if stream.read_to_end(&mut data).await.is_err() {
            return;
        }
        // Answer after the client's FIN: only possible if half-close was kept.
        let answer = format!("{} {}\n", data.len(), sha256_hex(&data));
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.write_all(&pattern(1 << 20)).await;
        let _ = stream.shutdown().await;
    })
    .await
}

/// A TCP server that sends some bytes, then resets the connection (zero linger).
pub async fn reset_server() -> SocketAddr {
    tcp_server(|mut stream: TcpStream| async move {
        let mut buf = [0u8; 16];
        let _ = stream.read(&mut buf).await;
        let _ = stream.write_all(b"partial").await;
        let _ = stream.set_zero_linger();
        drop(stream);
    })
    .await
}

/// A port on 127.0.0.1 where nothing listens.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Destination forms for [`socks_connect`].
pub enum Dest<'a> {
    Ip(SocketAddr),
    Name(&'a str, u16),
}

/// A raw SOCKS5 client (RFC 1928/1929): returns the connected stream or the reply code. An
/// authentication refusal is reported as `Err(0xff)`.
pub async fn socks_connect(
    socks: SocketAddr,
    user: &str,
    password: &str,
    dest: Dest<'_>,
) -> Result<TcpStream, u8> {
    socks_command(socks, user, password, 0x01, dest).await
}

/// Like [`socks_connect`] with any command byte (0x02 BIND, 0x03 UDP ASSOCIATE).
pub async fn socks_command(
    socks: SocketAddr,
    user: &str,
    password: &str,
    command: u8,
    dest: Dest<'_>,
) -> Result<TcpStream, u8> {
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 2], "server must choose user/password");
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(password.len() as u8);
    auth.extend_from_slice(password.as_bytes());
    s.write_all(&auth).await.unwrap();
    let mut status = [0u8; 2];
    s.read_exact(&mut status).await.unwrap();
    if status[1] != 0 {
        return Err(0xff);
    }
    let mut req = vec![5, command, 0];
    match dest {
        Dest::Ip(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Dest::Ip(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Dest::Name(name, port) => {
            req.push(3);
            req.push(name.len() as u8);
            req.extend_from_slice(name.as_bytes());
            req.extend_from_slice(&port.to_be_bytes());
        }
    }
    s.write_all(&req).await.unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], 5);
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).await.unwrap();
            l[0] as usize
        }
        other => panic!("bad reply address type {other}"),
    };
    let mut rest = vec![0u8; addr_len + 2];
    s.read_exact(&mut rest).await.unwrap();
    if head[1] != 0 {
        return Err(head[1]);
    }
    Ok(s)
}

/// Whether `curl` is installed.
pub fn have_curl() -> bool {
    std::process::Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs curl through the hub's SOCKS5 front; returns (exit code, stdout).
pub async fn curl(socks: SocketAddr, user: &str, token: &str, args: &[&str]) -> (i32, Vec<u8>) {
    assert!(have_curl(), "curl must be installed (.ci/run installs it)");
    let proxy = format!("socks5h://{user}:{token}@{socks}");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "--proxy", &proxy])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    if !out.status.success() {
        eprintln!("curl stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.code().unwrap_or(-1), out.stdout)
}

/// Reads a file fully.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Tasks alive on the current tokio runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// What a test leaves behind: taken after setup, compared after each fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footprint {
    pub streams_open: i64,
    pub streams_pending: i64,
    pub session_streams: usize,
    pub sessions: usize,
    pub pending_dials: usize,
    pub fds: usize,
    pub tasks: usize,
}

impl World {
    /// The footprint now; `agents` are the in-process agents whose dials count.
    pub fn footprint(&self, agents: &[&TestAgent]) -> Footprint {
        let m = self.hub.metrics();
        Footprint {
            streams_open: m.streams_open().get(),
            streams_pending: m.streams_pending().get(),
            session_streams: self
                .hub
                .registry()
                .sessions()
                .iter()
                .map(|s| s.open_streams())
                .sum(),
            sessions: self.hub.registry().len(),
            pending_dials: agents.iter().map(|a| a.handle.pending_dials()).sum(),
            fds: open_fds(),
            tasks: alive_tasks(),
        }
    }

    /// Polls until the footprint is back to `baseline` (streams, dials and sessions equal;
    /// file descriptors and tasks no more than at baseline); fails the test otherwise.
    pub async fn assert_no_leaks(&self, baseline: &Footprint, agents: &[&TestAgent]) {
        let mut now = self.footprint(agents);
        let back = settles(|| {
            now = self.footprint(agents);
            now.streams_open == baseline.streams_open
                && now.streams_pending == baseline.streams_pending
                && now.session_streams == baseline.session_streams
                && now.sessions == baseline.sessions
                && now.pending_dials == baseline.pending_dials
                && now.fds <= baseline.fds
                && now.tasks <= baseline.tasks
        })
        .await;
        assert!(back, "resources leaked: baseline {baseline:?}, now {now:?}");
    }
}

/// Serializes the tests of one binary that measure process-wide resources (file descriptors).
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A small deterministic generator (xorshift64*), so faults replay exactly from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// What a [`LossyLink`] does to datagrams, in each direction independently.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is held back (and so overtaken by later ones).
    pub delay: f64,
    /// Longest hold, in milliseconds.
    pub max_delay_ms: u64,
    pub seed: u64,
}

/// A UDP relay between agents and the hub that drops, delays and reorders datagrams.
pub struct LossyLink {
    /// Where agents send to.
    pub addr: SocketAddr,
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// While set, every hub → agent datagram is dropped (counted in `dropped`).
    pub cut_down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LossyLink {
    /// Starts a relay to `hub` (one agent at a time: replies go to the last agent address).
    pub async fn start(hub: SocketAddr, faults: Faults) -> LossyLink {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        use tokio::net::UdpSocket;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(hub).await.unwrap();
        let addr = front.local_addr().unwrap();
        let dropped = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let cut_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, f, cut) = (dropped.clone(), forwarded.clone(), cut_down.clone());
        let task = tokio::spawn(async move {
            let mut up_rng = Rng::new(faults.seed);
            let mut down_rng = Rng::new(faults.seed ^ 0x9e37_79b9_7f4a_7c15);
            let mut agent: Option<SocketAddr> = None;
            let mut up = vec![0u8; 65536];
            let mut down = vec![0u8; 65536];
            // Sends now or after a random hold; held datagrams are overtaken by later ones.
            let forward =
                |rng: &mut Rng, data: Vec<u8>, sock: Arc<UdpSocket>, to: Option<SocketAddr>| {
                    if rng.chance(faults.loss) {
                        d.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    f.fetch_add(1, Ordering::Relaxed);
                    let hold = rng
                        .chance(faults.delay)
                        .then(|| 1 + rng.below(faults.max_delay_ms));
                    if hold.is_none() {
                        // Not held: sent at once, in order with the other unheld datagrams.
                        let sent = match to {
                            Some(to) => sock.try_send_to(&data, to).map(|_| ()),
                            None => sock.try_send(&data).map(|_| ()),
                        };
                        if !matches!(&sent, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                            return;
                        }
                    }
                    tokio::spawn(async move {
                        if let Some(ms) = hold {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let _ = match to {
                            Some(to) => sock.send_to(&data, to).await,
                            None => sock.send(&data).await,
                        };
                    });
                };
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { return };
                        agent = Some(from);
                        forward(&mut up_rng, up[..n].to_vec(), back.clone(), None);
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { continue };
                        if cut.load(Ordering::SeqCst) {
                            d.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if let Some(to) = agent {
                            forward(&mut down_rng, down[..n].to_vec(), front.clone(), Some(to));
                        }
                    }
                }
            }
        });
        LossyLink {
            addr,
            dropped,
            forwarded,
            cut_down,
            task,
        }
    }
}

/// A listener whose accept queue is full: further SYNs are dropped, so a connect never
/// completes (a destination that never answers).
pub fn never_answering() -> (SocketAddr, Vec<std::net::TcpStream>, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    // Fill the queue: connects complete until it is full, then hang.
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    (addr, fillers, socket)
}

/// The binary under test.
pub const RNA: &str = env!("CARGO_BIN_EXE_rna");

/// One run of the binary under test, started the same way by every test: no `RNA_*` variable
/// (nor `KUBERNETES_SERVICE_HOST`) of the calling environment reaches it, so a developer's
/// shell never changes a result; logs are text; stdin is empty unless given.
pub struct Rna {
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, Option<String>)>,
    stdin: Option<Vec<u8>>,
    stdout: Stdout,
}

/// Where a run's standard output goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stdout {
    Piped,
    Discarded,
    Closed,
}

/// How a finished `rna` ended and what it printed.
#[derive(Debug)]
pub struct Ran {
    /// The exit status.
    pub status: std::process::ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Ran {
    /// The exit code; -1 when a signal ended the process.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

impl Rna {
    /// `rna ARGS` with text logs.
    pub fn new<I, S>(args: I) -> Rna
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Rna {
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            env: vec![("RNA_LOG_FORMAT".into(), Some("text".into()))],
            stdin: None,
            stdout: Stdout::Piped,
        }
    }

    /// One more argument.
    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Rna {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Sets an environment variable (a later setting of the same key wins).
    pub fn env(mut self, key: &str, value: &str) -> Rna {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Sets every `(key, value)` pair.
    pub fn envs(self, pairs: &[(&str, &str)]) -> Rna {
        pairs.iter().fold(self, |rna, (k, v)| rna.env(k, v))
    }

    /// Leaves `key` unset, undoing a default such as `RNA_LOG_FORMAT=text`.
    pub fn env_remove(mut self, key: &str) -> Rna {
        self.env.push((key.into(), None));
        self
    }

    /// Logs at `level` (`RNA_LOG_LEVEL`, an `EnvFilter` directive).
    pub fn logs_at(self, level: &str) -> Rna {
        self.env("RNA_LOG_LEVEL", level)
    }

    /// Feeds `bytes` on standard input, then closes it.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Rna {
        self.stdin = Some(bytes.into());
        self
    }

    /// Standard output is a pipe whose reader is already gone (`rna … | head`).
    pub fn closed_stdout(mut self) -> Rna {
        self.stdout = Stdout::Closed;
        self
    }

    /// Standard output goes nowhere (a long-running process whose output nobody reads keeps
    /// no pipe open in the test).
    pub fn discard_stdout(mut self) -> Rna {
        self.stdout = Stdout::Discarded;
        self
    }

    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(RNA);
        cmd.args(&self.args);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("RNA_") || key == "KUBERNETES_SERVICE_HOST" {
                cmd.env_remove(key.as_ref());
            }
        }
        for (key, value) in &self.env {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        let stdin = if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        cmd.stdin(stdin).stderr(Stdio::piped());
        match self.stdout {
            Stdout::Piped => cmd.stdout(Stdio::piped()),
            Stdout::Discarded => cmd.stdout(Stdio::null()),
            Stdout::Closed => {
                let (reader, writer) = std::io::pipe().expect("pipe");
                drop(reader);
                cmd.stdout(writer)
            }
        };
        cmd
    }

    /// Runs to completion on this thread (for `#[test]` functions and `spawn_blocking`).
    pub fn run(self) -> Ran {
        let mut child = self.command().spawn().expect("spawn rna");
        if let Some(bytes) = &self.stdin {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            // A process that exits without reading its input is not this helper's failure.
            let _ = stdin.write_all(bytes);
        }
        let out = child.wait_with_output().expect("run rna");
        Ran {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs to completion off the runtime, bounded by [`WAIT`].
    pub async fn run_async(self) -> Ran {
        let what = format!("rna {:?} to exit", self.args);
        within(&what, tokio::task::spawn_blocking(move || self.run()))
            .await
            .expect("rna runner task")
    }

    /// Starts it: killed when dropped, every standard error line sent to [`RnaProcess::log`]
    /// (and echoed to the test output), standard output piped for the caller to take.
    pub fn spawn(self) -> RnaProcess {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::from(self.command());
        let mut child = cmd.kill_on_drop(true).spawn().expect("spawn rna");
        if let Some(bytes) = self.stdin {
            let mut stdin = child.stdin.take().expect("stdin");
            tokio::spawn(async move {
                let _ = stdin.write_all(&bytes).await;
            });
        }
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        let stderr = child.stderr.take().expect("stderr");
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{line}");
                let _ = tx.send(line);
            }
        });
        RnaProcess { child, log }
    }
}

/// A running `rna` started by [`Rna::spawn`].
pub struct RnaProcess {
    /// The process; killed when dropped.
    pub child: tokio::process::Child,
    /// Its standard error, line by line.
    pub log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl RnaProcess {
    /// Waits for a log line containing `needle`.
    pub async fn wait_line(&mut self, needle: &str) -> String {
        wait_line(&mut self.log, needle).await
    }

    /// Sends `sig` (as `kill` spells it, e.g. `-TERM`).
    pub fn signal(&self, sig: &str) {
        signal(&self.child, sig)
    }

    /// Waits (bounded) for the process to exit.
    pub async fn exit(&mut self) -> std::process::ExitStatus {
        within("rna to exit", self.child.wait())
            .await
            .expect("wait for rna")
    }

    /// Its standard output, once.
    pub fn stdout(&mut self) -> tokio::process::ChildStdout {
        self.child.stdout.take().expect("stdout taken once")
    }
}

/// `rna ARGS` with text logs at info; see [`Rna::spawn`]. The child and its log lines.
pub fn spawn_logged(
    args: &[String],
) -> (
    tokio::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let p = Rna::new(args).logs_at("info").discard_stdout().spawn();
    (p.child, p.log)
}

/// Waits for a log line containing `needle`.
pub async fn wait_line(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> String {
    within(needle, async {
        while let Some(line) = rx.recv().await {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("process ended before logging {needle:?}");
    })
    .await
}

/// The value of `key=` in a text log line.
pub fn field(line: &str, key: &str) -> String {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 1;
    line[start..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Sends `sig` (as `kill` spells it, e.g. `-TERM`) to a running child.
pub fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// GET over plain HTTP/1.1 with `Connection: close`: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_as(addr, path, None).await
}

/// [`http_get`] with `Authorization: Bearer TOKEN` when a token is given.
pub async fn http_get_as(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    (status, body.to_string())
}

/// Reads and discards until the stream ends: `Ok(bytes)` on a clean EOF, the error (a reset)
/// otherwise.
pub async fn drain(s: &mut TcpStream) -> std::io::Result<u64> {
    tokio::io::copy(s, &mut tokio::io::sink()).await
}

/// Reads `out` line by line until one starts with `prefix`, and returns it. The caller keeps
/// `out`, so the pipe stays open for whatever the process writes later.
pub async fn first_line_starting<R>(out: &mut R, prefix: &str) -> String
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(out).lines();
    within(prefix, async {
        while let Some(line) = lines.next_line().await.expect("read output") {
            if line.starts_with(prefix) {
                return line;
            }
        }
        panic!("output ended without a line starting with {prefix:?}");
    })
    .await
}

/// Opens a download of 10 GB from `http` through agent `agent` and reads its first MiB: a
/// transfer in the middle of its life, for tests that kill one side.
pub async fn download_in_progress(
    socks: SocketAddr,
    agent: &str,
    token: &str,
    http: SocketAddr,
) -> TcpStream {
    let mut s = socks_connect(socks, agent, token, Dest::Ip(http))
        .await
        .expect("socks connect");
    s.write_all(b"GET /bytes/10000000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send request");
    let mut buf = vec![0u8; 1 << 20];
    s.read_exact(&mut buf).await.expect("first MiB");
    s
}

/// Test log output kept in memory (a `tracing_subscriber` writer), to search log lines.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `rna kube ARGS` (see [`Rna`]): the exit code (-1 when killed by a signal), stdout and
/// stderr. With `closed_stdout`, stdout is a pipe whose reader is already gone
/// (`rna kube … | head`).
pub fn run_rna_kube(args: &[String], closed_stdout: bool) -> (i32, String, String) {
    let mut rna = Rna::new(["kube"]);
    for a in args {
        rna = rna.arg(a);
    }
    if closed_stdout {
        rna = rna.closed_stdout();
    }
    let ran = rna.env_remove("RNA_LOG_FORMAT").run();
    (ran.code(), ran.stdout, ran.stderr)
}

/// `rna kube --api <the world's API> --token-file <token> --agent AGENT ARGS`, off the
/// runtime and bounded in time; see [`run_rna_kube`].
pub async fn world_kube_cli(
    world: &World,
    token: &str,
    agent: &str,
    args: &[&str],
    closed_stdout: bool,
) -> (i32, String, String) {
    let token_file = world
        .dir
        .path()
        .join(format!("cli-token-{}", &token[4..16]));
    std::fs::write(&token_file, format!("{token}\n")).expect("write token file");
    let mut all: Vec<String> = vec![
        "--api".into(),
        format!("http://{}", world.api),
        "--token-file".into(),
        token_file.display().to_string(),
        "--agent".into(),
        agent.into(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    within(
        "rna kube",
        tokio::task::spawn_blocking(move || run_rna_kube(&all, closed_stdout)),
    )
    .await
    .expect("rna kube task")
}

/// The log lines of this test process at info (audit lines included), captured once for the
/// whole process: one subscriber per process, so every test that reads logs shares this one
/// and looks only for lines of its own (its tokens, names and addresses).
pub fn process_logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        captured
    })
}

/// A port free on 127.0.0.1 for UDP and for TCP at once, for a hub process that must keep
/// its `--listen` port across a restart (the hub serves QUIC and its TLS/TCP side on one
/// port number). Both sockets are released before it returns.
pub fn free_udp_and_tcp_port() -> u16 {
    for _ in 0..64 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP in 64 tries");
}

/// Arguments of an `rna hub` process whose CA, certificate and key are in `certs` under the
/// names `rna certs init` gives them, with its token store at `store`, QUIC on `listen`, and
/// SOCKS and the admin API on free ports; `extra` arguments follow.
pub fn hub_process_args(certs: &str, store: &str, listen: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "hub".into(),
        "--listen".into(),
        listen.into(),
        "--socks".into(),
        "127.0.0.1:0".into(),
        "--api".into(),
        "127.0.0.1:0".into(),
        "--ca".into(),
        format!("{certs}/ca.pem"),
        "--cert".into(),
        format!("{certs}/hub.pem"),
        "--key".into(),
        format!("{certs}/hub-key.pem"),
        "--tokens".into(),
        store.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A hub process with its state folder, on a free port, and an agent process of it whose
/// session has become stable: what tests that kill the hub and start it again begin with.
pub struct RestartableHub {
    /// The hub process (`--state-dir DIR/state`).
    pub hub: tokio::process::Child,
    /// The hub's log.
    pub hub_log: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Arguments that start the same hub again, on the same port with the same state.
    pub hub_args: Vec<String>,
    /// The hub's QUIC address (`--listen`).
    pub listen: std::net::SocketAddr,
    /// The agent `edge` of tenant `acme/prod`, logging at debug, its session stable.
    pub agent: RnaProcess,
}

/// Starts a [`RestartableHub`] from files made in `dir` by the real `rna certs` and
/// `rna token create`. The port is chosen free, not fixed, and kept: the restarted hub must
/// be where the agent's packets go. A short stable-session threshold, whose passing the agent
/// logs at debug: the session has earned an immediate reconnect when the hub dies.
pub async fn restartable_hub_and_agent(dir: &Path) -> RestartableHub {
    restartable_hub_and_agent_with(dir, &[], |_| {}).await
}

/// [`restartable_hub_and_agent`], with `agent_extra` arguments for the agent, and `prepare`
/// called with the certificate folder once the certificates are made, before either starts.
pub async fn restartable_hub_and_agent_with(
    dir: &Path,
    agent_extra: &[&str],
    prepare: impl FnOnce(&Path),
) -> RestartableHub {
    let d = |f: &str| dir.join(f).display().to_string();
    let run = |args: Vec<String>| async move {
        let ran = Rna::new(&args)
            .env_remove("RNA_LOG_FORMAT")
            .run_async()
            .await;
        assert_eq!(ran.code(), 0, "rna {args:?}: {}", ran.stderr);
        ran.stdout
    };
    let (certs, store) = (d("certs"), d("tokens.toml"));
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    run(words(&[
        "certs",
        "init",
        "--dir",
        &certs,
        "--hub-name",
        "127.0.0.1",
    ]))
    .await;
    run(words(&["certs", "agent", "--dir", &certs, "edge"])).await;
    let token = run(words(&[
        "token",
        "create",
        "--store",
        &store,
        "--tenant",
        "acme/prod",
        "--scope",
        "connect:agentHub",
    ]))
    .await;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(d("token.txt"), token.trim()).unwrap();
        std::fs::set_permissions(d("token.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    prepare(Path::new(&certs));
    let listen = format!("127.0.0.1:{}", free_udp_and_tcp_port());
    let hub_args = hub_process_args(&certs, &store, &listen, &["--state-dir", &d("state")]);
    let (hub, mut hub_log) = spawn_logged(&hub_args);
    wait_line(&mut hub_log, "hub serving").await;
    let agent_args = agent_process_args(
        &listen,
        "edge",
        &format!("{certs}/ca.pem"),
        &certs,
        &d("token.txt"),
        &[&["--stable-session", "200ms"], agent_extra].concat(),
    );
    let mut agent = Rna::new(&agent_args)
        .logs_at("info,rna::agent=debug")
        .spawn();
    agent.wait_line("connected to hub").await;
    agent.wait_line("session stable").await;
    RestartableHub {
        hub,
        hub_log,
        hub_args,
        listen: listen.parse().expect("a socket address"),
        agent,
    }
}

/// Arguments of an `rna agent` process named `name` that dials `hub` and trusts the CA in the
/// file `ca`, whose certificate and key are in `certs` under the names `rna certs agent` gives
/// them, with its token in `token_file` and its metrics on a free port; `extra` arguments
/// follow.
pub fn agent_process_args(
    hub: &str,
    name: &str,
    ca: &str,
    certs: &str,
    token_file: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--hub".into(),
        hub.into(),
        "--name".into(),
        name.into(),
        "--ca".into(),
        ca.into(),
        "--cert".into(),
        format!("{certs}/agent-{name}.pem"),
        "--key".into(),
        format!("{certs}/agent-{name}-key.pem"),
        "--token-file".into(),
        token_file.into(),
        "--metrics".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// An admin API client for `token` on the world's hub.
pub fn client(world: &World, token: &str) -> rna::admin_client::ApiClient {
    rna::admin_client::ApiClient::new(
        &format!("http://{}", world.api),
        rna::auth::Secret::new(token.into()),
    )
    .unwrap()
}

/// GET `path` on the admin API, bounded in time.
pub async fn get(api: &rna::admin_client::ApiClient, path: &str) -> rna::admin_client::ApiResponse {
    within(path, api.request(http::Method::GET, path, None))
        .await
        .unwrap()
}

/// DELETE `path` on the admin API, bounded in time.
pub async fn delete(
    api: &rna::admin_client::ApiClient,
    path: &str,
) -> rna::admin_client::ApiResponse {
    within(path, api.request(http::Method::DELETE, path, None))
        .await
        .unwrap()
}

/// A Kubernetes wait on `agent` through the API: the status and every NDJSON line (or the
/// error body as the only line).
pub async fn kube_wait_lines(
    api: &rna::admin_client::ApiClient,
    agent: &str,
    body: serde_json::Value,
) -> (u16, Vec<serde_json::Value>) {
    let mut lines = Vec::new();
    let r = within(
        "wait",
        api.stream_lines(
            http::Method::POST,
            &format!("/api/v1/agents/{agent}/kube/wait"),
            Some(("application/json", bytes::Bytes::from(body.to_string()))),
            |l| lines.push(serde_json::from_str::<serde_json::Value>(l).unwrap()),
        ),
    )
    .await
    .unwrap();
    if r.status != 200 {
        return (r.status, vec![r.json()]);
    }
    (r.status, lines)
}

/// Waits until an agent `agent` of `tenant` has reported its inventory to the hub.
pub async fn wait_inventory(world: &World, tenant: &str, agent: &str) {
    let tenant: rna::auth::Tenant = tenant.parse().unwrap();
    within(
        "the agent's inventory",
        world.hub.registry().wait_until(|r| {
            r.sessions_of(&tenant, agent)
                .iter()
                .any(|s| s.inventory().is_some())
        }),
    )
    .await;
}

/// One small HTTP/1.1 exchange (`GET /`, the server closes) through `agent`'s tunnel: the
/// whole answer, or the SOCKS reply code that refused the CONNECT.
pub async fn socks_fetch(
    socks: SocketAddr,
    agent: &str,
    token: &str,
    dest: Dest<'_>,
) -> Result<Vec<u8>, u8> {
    let mut s = socks_connect(socks, agent, token, dest).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.unwrap();
    Ok(body)
}

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8), so one
/// test can be many clients.
pub async fn tcp_connect_from(
    from: std::net::IpAddr,
    to: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// A UDP relay in front of a hub's QUIC port that either drops every datagram (UDP blocked on
/// the way, as a firewall does) or forwards them both ways, switchable while it runs, and
/// counts what it saw. Bound first, so a test can give the hub's TCP listener the same port
/// number: an agent dialing that port then meets the gate over UDP and the hub over TCP.
pub struct UdpGate {
    /// Where agents send their UDP to.
    pub addr: SocketAddr,
    /// Datagrams that came from agents (dropped or not).
    pub received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Datagrams sent on, either way.
    pub forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Milliseconds for which the hub's datagrams after its first are held back, then
    /// delivered (0: never): an attempt the hub answered (its first datagram, a Retry or its
    /// first flight, reaches the agent), then finished late.
    pub stall_after_answer: std::sync::Arc<std::sync::atomic::AtomicU64>,
    front: Option<tokio::net::UdpSocket>,
    task: Option<JoinHandle<()>>,
}

impl Drop for UdpGate {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl UdpGate {
    /// Binds the gate on 127.0.0.1 on a port whose TCP side is free too (so a hub can listen
    /// there over TCP); closed (dropping) until [`open`](Self::open).
    pub async fn bind() -> UdpGate {
        for _ in 0..32 {
            let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = front.local_addr().unwrap();
            // The TCP port of that number is free right now; the hub binds it next.
            if std::net::TcpListener::bind(addr).is_err() {
                continue;
            }
            return UdpGate {
                addr,
                received: Default::default(),
                forwarded: Default::default(),
                open: Default::default(),
                stall_after_answer: Default::default(),
                front: Some(front),
                task: None,
            };
        }
        panic!("no loopback port free for both UDP and TCP");
    }

    /// Starts relaying to the hub's QUIC address `hub` (replies go to the agent address that
    /// sent last: one agent at a time).
    pub async fn relay_to(&mut self, hub: SocketAddr) {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let front = Arc::new(self.front.take().expect("relay_to once"));
        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(hub).await.unwrap();
        let (received, forwarded, open, stall) = (
            self.received.clone(),
            self.forwarded.clone(),
            self.open.clone(),
            self.stall_after_answer.clone(),
        );
        self.task = Some(tokio::spawn(async move {
            let mut agent: Option<SocketAddr> = None;
            // Until when the hub's datagrams are dropped, once its first reached the agent.
            let mut stalled_until: Option<std::time::Instant> = None;
            let mut up = vec![0u8; 65536];
            let mut down = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { continue };
                        received.fetch_add(1, Ordering::Relaxed);
                        if open.load(Ordering::Relaxed) {
                            agent = Some(from);
                            forwarded.fetch_add(1, Ordering::Relaxed);
                            let _ = back.send(&up[..n]).await;
                        }
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { continue };
                        if let (Some(until), Some(to)) = (stalled_until, agent) {
                            let now = std::time::Instant::now();
                            if now < until {
                                // Held back, not lost: delivered when the stall ends.
                                forwarded.fetch_add(1, Ordering::Relaxed);
                                let (front, data) = (front.clone(), down[..n].to_vec());
                                tokio::spawn(async move {
                                    tokio::time::sleep(until - now).await;
                                    let _ = front.send_to(&data, to).await;
                                });
                                continue;
                            }
                        }
                        if let (true, Some(to)) = (open.load(Ordering::Relaxed), agent) {
                            forwarded.fetch_add(1, Ordering::Relaxed);
                            let _ = front.send_to(&down[..n], to).await;
                            let ms = stall.load(Ordering::Relaxed);
                            if stalled_until.is_none() && ms > 0 {
                                stalled_until = Some(std::time::Instant::now() + Duration::from_millis(ms));
                            }
                        }
                    }
                }
            }
        }));
    }

    /// Lets datagrams through from now on.
    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops every datagram from now on.
    pub fn close(&self) {
        self.open.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Datagrams received from agents so far.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Datagrams forwarded so far, both ways.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A tinyproxy process (Debian's package) with Basic auth, on a free loopback port with its
/// configuration and log in a temporary folder; killed when dropped.
pub struct Tinyproxy {
    child: std::process::Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    user: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tinyproxy {
    /// Starts tinyproxy asking for `user` and `password`, allowing CONNECT to `connect_port`
    /// only, and waits until it accepts connections.
    pub async fn start(user: &str, password: &str, connect_port: u16) -> Tinyproxy {
        let binary = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!(
                    "tinyproxy is not installed; this test needs it: apt-get install -y tinyproxy"
                )
            });
        let dir = tempfile::tempdir().unwrap();
        // A free port: bind port 0, read it, release it for tinyproxy.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("tinyproxy.log");
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 20\nLogLevel Info\n\
                 LogFile \"{log}\"\nPidFile \"{pid}\"\nAllow 127.0.0.1\n\
                 BasicAuth {user} {password}\nConnectPort {connect_port}\n",
                log = log.display(),
                pid = dir.path().join("tinyproxy.pid").display(),
            ),
        )
        .unwrap();
        let child = std::process::Command::new(binary)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let mut proxy = Tinyproxy {
            child,
            port,
            user: user.to_string(),
            log,
            _dir: dir,
        };
        // Ready when it accepts connections.
        let started = std::time::Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("tinyproxy exited with {status}: {}", proxy.log());
            }
            assert!(
                started.elapsed() < WAIT,
                "tinyproxy did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy
    }

    /// `http://USER:PASSWORD@127.0.0.1:PORT` with the given password.
    pub fn url_text(&self, password: &str) -> String {
        format!("http://{}:{password}@127.0.0.1:{}", self.user, self.port)
    }

    /// [`url_text`](Self::url_text), parsed.
    pub fn url(&self, password: &str) -> rna::transport::proxy::ProxyUrl {
        rna::transport::proxy::ProxyUrl::parse(&self.url_text(password)).unwrap()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
