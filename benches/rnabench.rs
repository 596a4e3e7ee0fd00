//! rnabench: the benchmark driver behind `benches/run.sh`.
//!
//! `rnabench suite` starts every side itself on 127.0.0.1 (a file server, the rna hub and
//! agent, sshd with `ssh -R` reverse dynamic SOCKS, Rusnel when given), runs the tests A B A B
//! for several rounds and prints one JSON line per (test, system, round) and a table of median
//! ratios. `rna` runs the agent with its default transport (QUIC here), `rna-tcp` with
//! `--transport tcp` (TLS over TCP), and `rna-base` (with `--rna-base`) another rna binary, so a
//! change is measured against the build before it in one run. The other subcommands are the separate processes the suite needs: `serve` (the
//! destination), `hold` (a client holding many streams open) and `agents` (many idle,
//! authenticated agent sessions against one hub).
//!
//! Every child is ended by its PID and every wait is bounded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Time `hold` has to open all its streams.
const HOLD_DEADLINE: Duration = Duration::from_secs(150);

/// Body bytes the file server sends from (one buffer, reused for every response).
const DATA_CHUNK: usize = 1024 * 1024;

#[derive(Parser, Debug)]
#[command(name = "rnabench", about = "rna benchmark driver")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// HTTP/1.1 destination: `GET /bytes/N` answers N bytes, `PUT` drains its body.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Opens COUNT streams through VIA to TARGET, checks each with a small GET, prints one
    /// JSON line and holds them until stdin closes.
    Hold {
        #[arg(long)]
        via: String,
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Opens COUNT authenticated agent sessions to one hub, prints one JSON line and keeps
    /// them alive (heartbeats answered) until stdin closes.
    Agents {
        #[arg(long)]
        hub: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        name: String,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        token_file: PathBuf,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// `auto` (what `rna agent` uses by default), `quic` or `tcp`.
        #[arg(long, default_value = "auto")]
        transport: String,
        /// The agents' `max_streams` (tunnel streams the hub may open at once); the default
        /// is `rna agent`'s.
        #[arg(long)]
        max_streams: Option<u32>,
        /// Index of this process's first agent in the fleet: agent i binds its sockets to a
        /// loopback address of its own (`--bind-address`, 127.0.0.0/8 is all local on Linux),
        /// so the hub sees a fleet of many hosts, as real agents are, instead of one host
        /// whose agents all share its per-source handshake cap. Without it every agent comes
        /// from 127.0.0.1.
        #[arg(long)]
        first_source: Option<u32>,
    },
    /// Runs the whole comparison.
    Suite(SuiteArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct SuiteArgs {
    /// The rna binary (release build).
    #[arg(long)]
    rna: PathBuf,
    /// Scratch folder (certificates, configs); put it on tmpfs.
    #[arg(long)]
    work: PathBuf,
    /// Systems to compare: rna, rna-tcp, rna-base, rna-base-tcp, rna-early, rna-early-tcp
    /// (the hub with `--socks-early-reply 60s`), ssh, direct, rusnel, shadowsocks.
    #[arg(long, value_delimiter = ',', default_value = "rna,rna-tcp,ssh,direct")]
    systems: Vec<String>,
    /// Tests: B1 (with B4), B2, B3, L1, L1-curl, L2, H1, C1, M1, R1; opt-in: M1-real, M2,
    /// S1 (S1 runs on M2's fleet, so it implies M2).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "B1,B2,B3,L1,L1-curl,L2,H1,C1,M1,R1"
    )]
    tests: Vec<String>,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Bytes of the B1 download and the B2 upload.
    #[arg(long, default_value_t = 1 << 30)]
    bulk: u64,
    /// Total bytes of B3, split over --streams.
    #[arg(long, default_value_t = 1 << 30)]
    parallel_bulk: u64,
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Sequential requests of L1 and of L1-curl.
    #[arg(long, default_value_t = 300)]
    l1_count: usize,
    /// curl, the client of L1-curl and H1.
    #[arg(long, default_value = "curl")]
    curl: PathBuf,
    /// Sequential 1 KiB requests of H1, made while a bulk download runs.
    #[arg(long, default_value_t = 300)]
    h1_count: usize,
    /// Packet loss H1 puts on the hub–agent leg (iptables, both directions); 0 runs H1 without
    /// loss and without iptables.
    #[arg(long, default_value_t = 0.01)]
    h1_loss: f64,
    /// One-way delay, in milliseconds, added to the hub–agent leg of rna and ssh -R by a
    /// relay in this process (UDP and TCP), for every test of the run: `--leg-delay 5` runs
    /// L1 and L1-curl as across a 10 ms round trip between hub and agent. 0: no relay.
    #[arg(long, default_value_t = 0.0)]
    leg_delay: f64,
    /// Workers and seconds of L2.
    #[arg(long, default_value_t = 32)]
    l2_workers: usize,
    #[arg(long, default_value_t = 3.0)]
    l2_secs: f64,
    /// Open-stream counts of C1.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    c1_counts: Vec<usize>,
    /// Idle agent sessions of M1.
    #[arg(long, default_value_t = 1000)]
    m1_agents: usize,
    /// Agents of M1-real: this many real `rna agent` processes against one hub, then the
    /// generator with as many, so the generator is checked against what users run.
    #[arg(long, default_value_t = 200)]
    m1_real_agents: usize,
    /// Idle agents of M2 and S1 (opt-in tests: minutes each).
    #[arg(long, default_value_t = 10_000)]
    m2_agents: usize,
    /// Agents per generator process in M1, M2 and S1 (each agent holds one UDP socket, and a
    /// process may hold 20,000 files here).
    #[arg(long, default_value_t = 2_500)]
    agents_per_process: usize,
    /// Generator agents of M1, M2 and S1 all from 127.0.0.1 (one host) instead of one
    /// loopback address each (a fleet of hosts, the default).
    #[arg(long)]
    one_source: bool,
    /// Generator processes of M1, M2 and S1 run at this `nice` level (0: as the hub). A real
    /// hub has its machine's CPUs to itself while its agents run elsewhere; here both share
    /// 2 cores, and with a positive level the scheduler serves the hub first.
    #[arg(long, default_value_t = 0)]
    fleet_nice: u8,
    /// The system M2 and S1 run on: `rna`, or `rna-base` (with `--rna-base`) to compare a
    /// change against the build before it, one invocation each.
    #[arg(long, default_value = "rna")]
    m2_system: String,
    /// How long M2 measures the hub's idle CPU, in seconds.
    #[arg(long, default_value_t = 30.0)]
    m2_idle_secs: f64,
    /// Hub restarts of R1.
    #[arg(long, default_value_t = 10)]
    r1_trials: usize,
    /// The Rusnel binary (system `rusnel`).
    #[arg(long)]
    rusnel: Option<PathBuf>,
    /// Folder holding shadowsocks-rust's `sslocal` and `ssserver` (system `shadowsocks`).
    #[arg(long)]
    shadowsocks: Option<PathBuf>,
    /// Another rna binary (system `rna-base`), run with the same settings as `rna`.
    #[arg(long)]
    rna_base: Option<PathBuf>,
    /// JSON lines are appended here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Cmd::Suite(_) => 2,
        _ => 2,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Serve { listen } => rt.block_on(serve(listen)),
        Cmd::Hold {
            via,
            target,
            count,
            concurrency,
        } => rt.block_on(hold(Via::parse(&via)?, target, count, concurrency)),
        Cmd::Agents {
            hub,
            count,
            name,
            ca,
            cert,
            key,
            token_file,
            concurrency,
            transport,
            max_streams,
            first_source,
        } => rt.block_on(agents(
            hub,
            count,
            name,
            &ca,
            &cert,
            &key,
            &token_file,
            concurrency,
            &transport,
            max_streams,
            first_source,
        )),
        Cmd::Suite(args) => rt.block_on(suite(args)),
    }
}

// ---------------------------------------------------------------------------------------------
// Destination server

fn data() -> Arc<Vec<u8>> {
    let mut v = vec![0u8; DATA_CHUNK];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    Arc::new(v)
}

async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let data = data();
    loop {
        let (s, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off briefly, keep serving.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let data = data.clone();
        tokio::spawn(async move {
            let _ = serve_conn(s, data).await;
        });
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn serve_conn(mut s: TcpStream, data: Arc<Vec<u8>>) -> Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut filled = 0usize;
    loop {
        let head_end = loop {
            if let Some(p) = find(&buf[..filled], b"\r\n\r\n") {
                break p + 4;
            }
            if filled > 16 * 1024 {
                bail!("request head too long");
            }
            let n = s.read(&mut buf[filled..]).await?;
            if n == 0 {
                return Ok(());
            }
            filled += n;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut first = head.split_whitespace();
        let method = first.next().unwrap_or("");
        let path = first.next().unwrap_or("");
        match method {
            "GET" => {
                buf.copy_within(head_end..filled, 0);
                filled -= head_end;
                let n: u64 = path
                    .strip_prefix("/bytes/")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| anyhow!("bad path {path}"))?;
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
                );
                let mut left = n;
                if left <= (DATA_CHUNK - header.len()) as u64 {
                    // Small answers go out in one write, as a real server does.
                    let mut one = Vec::with_capacity(header.len() + left as usize);
                    one.extend_from_slice(header.as_bytes());
                    one.extend_from_slice(&data[..left as usize]);
                    s.write_all(&one).await?;
                    left = 0;
                } else {
                    s.write_all(header.as_bytes()).await?;
                }
                while left > 0 {
                    let k = left.min(DATA_CHUNK as u64) as usize;
                    s.write_all(&data[..k]).await?;
                    left -= k as u64;
                }
            }
            "PUT" | "POST" => {
                let len: u64 = header_value(&head, "content-length")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow!("no content-length"))?;
                let have = ((filled - head_end) as u64).min(len);
                let rest_start = head_end + have as usize;
                buf.copy_within(rest_start..filled, 0);
                filled -= rest_start;
                let mut left = len - have;
                while left > 0 {
                    // Body bytes are counted and dropped; `buf[..filled]` keeps what followed.
                    let room = ((buf.len() - filled) as u64).min(left) as usize;
                    let n = s.read(&mut buf[filled..filled + room]).await?;
                    if n == 0 {
                        bail!("upload ended early");
                    }
                    left -= n as u64;
                }
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await?;
            }
            _ => bail!("unsupported method {method}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client side: direct or through SOCKS5

#[derive(Debug, Clone)]
enum Via {
    Direct,
    Socks {
        proxy: SocketAddr,
        auth: Option<(String, String)>,
    },
}

impl Via {
    fn parse(s: &str) -> Result<Via> {
        if s == "direct" {
            return Ok(Via::Direct);
        }
        let rest = s
            .strip_prefix("socks5://")
            .ok_or_else(|| anyhow!("--via: expected direct or socks5://[user:pass@]host:port"))?;
        let (auth, host) = match rest.rsplit_once('@') {
            Some((cred, host)) => {
                let (u, p) = cred
                    .split_once(':')
                    .ok_or_else(|| anyhow!("--via: credentials must be user:pass"))?;
                (Some((u.to_string(), p.to_string())), host)
            }
            None => (None, rest),
        };
        Ok(Via::Socks {
            proxy: host.parse().context("--via address")?,
            auth,
        })
    }

    fn to_arg(&self) -> String {
        match self {
            Via::Direct => "direct".into(),
            Via::Socks {
                proxy,
                auth: Some((u, p)),
            } => format!("socks5://{u}:{p}@{proxy}"),
            Via::Socks { proxy, auth: None } => format!("socks5://{proxy}"),
        }
    }
}

/// A TCP stream to `target`, directly or through the SOCKS5 proxy.
async fn open(via: &Via, target: SocketAddr) -> Result<TcpStream> {
    match via {
        Via::Direct => {
            let s = TcpStream::connect(target).await?;
            s.set_nodelay(true)?;
            Ok(s)
        }
        Via::Socks { proxy, auth } => {
            let mut s = TcpStream::connect(proxy).await?;
            s.set_nodelay(true)?;
            let method = if auth.is_some() { 2u8 } else { 0u8 };
            s.write_all(&[5, 1, method]).await?;
            let mut r = [0u8; 2];
            s.read_exact(&mut r).await?;
            if r != [5, method] {
                bail!("SOCKS method refused: {r:?}");
            }
            if let Some((u, p)) = auth {
                let mut m = vec![1u8, u.len() as u8];
                m.extend_from_slice(u.as_bytes());
                m.push(p.len() as u8);
                m.extend_from_slice(p.as_bytes());
                s.write_all(&m).await?;
                s.read_exact(&mut r).await?;
                if r[1] != 0 {
                    bail!("SOCKS authentication refused");
                }
            }
            let SocketAddr::V4(t) = target else {
                bail!("IPv4 targets only");
            };
            let mut req = vec![5u8, 1, 0, 1];
            req.extend_from_slice(&t.ip().octets());
            req.extend_from_slice(&t.port().to_be_bytes());
            s.write_all(&req).await?;
            let mut head = [0u8; 4];
            s.read_exact(&mut head).await?;
            if head[1] != 0 {
                bail!("SOCKS CONNECT failed with reply {}", head[1]);
            }
            let skip = match head[3] {
                1 => 4 + 2,
                4 => 16 + 2,
                3 => {
                    let mut l = [0u8; 1];
                    s.read_exact(&mut l).await?;
                    l[0] as usize + 2
                }
                t => bail!("SOCKS reply with address type {t}"),
            };
            let mut rest = vec![0u8; skip];
            s.read_exact(&mut rest).await?;
            Ok(s)
        }
    }
}

/// Reads one response; returns (body bytes, time of the first response byte).
async fn read_response(s: &mut TcpStream, buf: &mut [u8]) -> Result<(u64, Instant)> {
    let mut filled = 0;
    let mut first = None;
    let head_end = loop {
        if let Some(p) = find(&buf[..filled], b"\r\n\r\n") {
            break p + 4;
        }
        if filled >= 16 * 1024 {
            bail!("response head too long");
        }
        let n = s.read(&mut buf[filled..]).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        first.get_or_insert_with(Instant::now);
        filled += n;
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected response: {}", head.lines().next().unwrap_or(""));
    }
    let len: u64 = header_value(head, "content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no content-length"))?;
    let mut got = (filled - head_end) as u64;
    while got < len {
        let n = s.read(buf).await?;
        if n == 0 {
            bail!("body ended after {got} of {len} bytes");
        }
        got += n as u64;
    }
    if got != len {
        bail!("body of {got} bytes, expected {len}");
    }
    Ok((got, first.unwrap_or_else(Instant::now)))
}

async fn get(via: &Via, target: SocketAddr, size: u64, buf: &mut [u8]) -> Result<u64> {
    let mut s = open(via, target).await?;
    s.write_all(format!("GET /bytes/{size} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())
        .await?;
    Ok(read_response(&mut s, buf).await?.0)
}

async fn put(via: &Via, target: SocketAddr, size: u64) -> Result<u64> {
    let mut s = open(via, target).await?;
    let payload = data();
    s.write_all(
        format!("PUT /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut left = size;
    while left > 0 {
        let k = left.min(DATA_CHUNK as u64) as usize;
        s.write_all(&payload[..k]).await?;
        left -= k as u64;
    }
    let mut buf = vec![0u8; 64 * 1024];
    read_response(&mut s, &mut buf).await?;
    Ok(size)
}

async fn hold(via: Via, target: SocketAddr, count: usize, concurrency: usize) -> Result<()> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    // A peer that stalls must not stall the suite: whatever is not open by then failed.
    let deadline = tokio::time::Instant::now() + HOLD_DEADLINE;
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, sem.clone().acquire_owned()).await
        else {
            break;
        };
        let via = via.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let attempt = async {
                let mut s = open(&via, target).await?;
                s.write_all(b"GET /bytes/16 HTTP/1.1\r\nHost: bench\r\n\r\n")
                    .await?;
                let mut buf = [0u8; 1024];
                read_response(&mut s, &mut buf).await?;
                Ok::<_, anyhow::Error>(s)
            };
            match tokio::time::timeout(Duration::from_secs(30), attempt).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        }));
    }
    let mut held = Vec::with_capacity(count);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let attempted = tasks.len();
    for mut t in tasks {
        match tokio::time::timeout_at(deadline, &mut t).await {
            Ok(Ok(Ok(s))) => held.push(s),
            Ok(Ok(Err(e))) => *errors.entry(e).or_default() += 1,
            Ok(Err(e)) => *errors.entry(e.to_string()).or_default() += 1,
            Err(_) => {
                t.abort();
                *errors.entry("not open by the deadline".into()).or_default() += 1;
            }
        }
    }
    if attempted < count {
        *errors
            .entry("never attempted (deadline)".into())
            .or_default() += count - attempted;
    }
    println!(
        "{}",
        json!({"ok": held.len(), "failed": count - held.len(), "errors": errors,
               "secs": started.elapsed().as_secs_f64()})
    );
    std::io::stdout().flush()?;
    // Hold until the suite closes our stdin.
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    drop(held);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Many idle agents (M1 load generator)

/// Runs `count` real agents in this process: each is `rna::agent::Agent`, the code `rna agent`
/// runs (its own QUIC endpoint and UDP socket, Hello, MTU discovery, keep-alive, heartbeats,
/// reconnects with the agent's own backoff), built from the same flags. Only the process is
/// shared, so the hub sees exactly what `count` agent processes would show it. Agents start
/// `concurrency` at a time (a fleet that grew, not a storm); after that the process prints one
/// JSON status line per second (`connected`, `sessions_total`, the last errors by kind) until
/// stdin closes, and restarts nothing itself: a lost hub is the agents' own business.
#[allow(clippy::too_many_arguments)]
async fn agents(
    hub: SocketAddr,
    count: usize,
    name: String,
    ca: &Path,
    cert: &Path,
    key: &Path,
    token_file: &Path,
    concurrency: usize,
    transport: &str,
    max_streams: Option<u32>,
    first_source: Option<u32>,
) -> Result<()> {
    use rna::agent::{Agent, AgentConfig, AgentHandle, HubTarget, TransportMode};
    use rna::transport::ClientTls;
    use tokio_util::sync::CancellationToken;

    rna::transport::tls::install_provider();
    // RNA_BENCH_AGENT_LOG=PREFIX: the agents' log lines (RUST_LOG's filter, `rna=info` by
    // default) go to PREFIX.PID, one file per generator process, to see why sessions ended.
    if let Ok(prefix) = std::env::var("RNA_BENCH_AGENT_LOG") {
        let file = std::fs::File::create(format!("{prefix}.{}", std::process::id()))?;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("rna=info"));
        tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(file))
            .with_env_filter(filter)
            .with_ansi(false)
            .init();
    }
    let mode: TransportMode = transport.parse().map_err(|e: String| anyhow!(e))?;
    let tls = ClientTls::load(ca, cert, key)?;
    let token = rna::auth::Secret::new(std::fs::read_to_string(token_file)?.trim().to_string());
    let target = HubTarget {
        host: hub.ip().to_string(),
        port: hub.port(),
    };
    let cancel = CancellationToken::new();
    let runs = tokio_util::task::TaskTracker::new();
    let mut handles: Vec<AgentHandle> = Vec::with_capacity(count);
    let connected =
        |handles: &[AgentHandle]| -> usize { handles.iter().map(|h| h.status().connected).sum() };
    let started = Instant::now();
    for i in 0..count {
        // As `rna agent --hub --name --ca --cert --key --token-file` builds it.
        let mut config = AgentConfig::new(
            vec![target.clone()],
            name.clone(),
            tls.clone(),
            token.clone(),
        );
        config.token_file = Some(token_file.to_path_buf());
        config.transport = mode;
        if let Some(n) = max_streams {
            config.limits.tunnel_streams = n;
        }
        if let Some(first) = first_source {
            let index = u32::try_from(i)?
                .checked_add(first)
                .ok_or_else(|| anyhow!("--first-source {first}: too many agents"))?;
            config.bind_address = Some(loopback_source(index)?);
        }
        let agent = Agent::new(config)?;
        handles.push(agent.handle());
        runs.spawn(agent.run(cancel.clone()));
        // Ramp: at most `concurrency` agents still connecting (bounded: a hub that refuses
        // everyone must not stall the ramp forever).
        let ramp = Instant::now();
        while handles.len() - connected(&handles).min(handles.len()) >= concurrency.max(1)
            && ramp.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let report = |handles: &[AgentHandle]| {
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        let mut up = 0usize;
        let mut total = 0u64;
        for h in handles {
            let s = h.status();
            up += s.connected;
            total += s.sessions_total;
            if s.connected == 0 {
                if let Some(e) = s.last_error {
                    *errors.entry(error_kind(&e).into()).or_default() += 1;
                }
            }
        }
        json!({"connected": up, "count": handles.len(), "sessions_total": total,
               "last_errors": errors, "secs": started.elapsed().as_secs_f64()})
    };
    // Status lines until stdin closes.
    let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = done_tx.send(());
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut done => break,
            _ = tick.tick() => {
                println!("{}", report(&handles));
                std::io::stdout().flush()?;
            }
        }
    }
    cancel.cancel();
    runs.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), runs.wait()).await;
    Ok(())
}

/// Agent `index`'s own loopback address: 127.a.b.c with a from 1 and b, c in 1..=254 (no
/// address ending in 0 or 255, none in 127.0.x.x where the hub and the other systems are).
fn loopback_source(index: u32) -> Result<std::net::IpAddr> {
    let (c, rest) = (index % 254 + 1, index / 254);
    let (b, a) = (rest % 254 + 1, rest / 254 + 1);
    let a = u8::try_from(a).map_err(|_| anyhow!("agent {index}: out of 127.0.0.0/8"))?;
    Ok(std::net::Ipv4Addr::new(127, a, b as u8, c as u8).into())
}

/// A short label for an agent's last error, for the status lines.
fn error_kind(e: &rna::agent::SessionError) -> &'static str {
    use rna::agent::SessionError as E;
    match e {
        E::Busy(_) => "busy",
        E::Timeout { .. } => "timeout",
        E::NoWelcome { .. } => "no_welcome",
        E::Rejected { .. } => "rejected",
        E::Tls(_) => "tls",
        E::Connect(_) => "connect",
        E::TcpConnect { .. } | E::Unreachable { .. } => "unreachable",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------------------------
// Processes: started by the suite, ended by PID

struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let stdin = child.stdin.take();
        Ok(Proc {
            name: name.to_string(),
            child,
            stdin,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads stdout lines until one satisfies `pick`, within `limit`.
    fn wait_line<T: Send + 'static>(
        &mut self,
        limit: Duration,
        pick: impl Fn(&str) -> Option<T> + Send + 'static,
    ) -> Result<T> {
        let out = self
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{}: stdout not captured", self.name))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                if let Some(v) = pick(&line) {
                    let _ = tx.send(v);
                    break;
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines.map_while(Result::ok) {}
        });
        rx.recv_timeout(limit)
            .map_err(|_| anyhow!("{}: no expected output within {limit:?}", self.name))
    }

    /// Closes stdin (the polite stop for `hold` and `agents`), waits up to `grace`, then
    /// SIGKILLs.
    fn stop(mut self, grace: Duration) {
        self.stdin.take();
        self.end(grace);
    }

    /// SIGTERM by PID, up to `grace` to exit, then SIGKILL.
    fn terminate(mut self, grace: Duration) {
        signal(self.pid(), "TERM");
        self.end(grace);
    }

    fn end(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------------------------
// /proc accounting

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (ppid, utime + stime ticks) of a process.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    Some((
        f.get(1)?.parse().ok()?,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

/// `roots` and all their descendants.
fn tree(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some((ppid, _)) = stat(pid) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
    }
    let mut seen: HashSet<u32> = HashSet::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(p) = stack.pop() {
        if seen.insert(p) {
            stack.extend(children.get(&p).into_iter().flatten());
        }
    }
    seen.into_iter().collect()
}

/// CPU seconds used so far by `roots` and their descendants.
fn cpu_secs(roots: &[u32], tck: f64) -> f64 {
    tree(roots)
        .iter()
        .filter_map(|p| stat(*p))
        .map(|(_, t)| t as f64 / tck)
        .sum()
}

/// UDP datagrams dropped for want of receive buffer (`Udp: RcvbufErrors`) in the network
/// namespace of process `pid`.
fn udp_rcvbuf_errors(pid: u32) -> Option<u64> {
    udp_counter(pid, "RcvbufErrors")
}

/// A counter of the `Udp:` lines of `/proc/PID/net/snmp` (`SndbufErrors`: sends refused for
/// want of send buffer, which quinn drops when they are stateless answers: Retry, refusal,
/// stateless reset).
fn udp_counter(pid: u32, name: &str) -> Option<u64> {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Resident bytes of `roots` and their descendants (smaps_rollup `Rss`).
fn rss_bytes(roots: &[u32]) -> u64 {
    tree(roots)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines().find(|l| l.starts_with("Rss:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .sum::<u64>()
        * 1024
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The suite

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// `--leg-delay` as a duration, when set.
fn leg_delay(args: &SuiteArgs) -> Option<Duration> {
    (args.leg_delay > 0.0).then(|| Duration::from_secs_f64(args.leg_delay / 1000.0))
}

/// Starts a relay on a free 127.0.0.1 port (UDP and TCP alike) that forwards to
/// `upstream` on 127.0.0.1 with `delay` added each way, and returns its port. Delays are
/// constant, so order is kept; nothing is dropped. The relay lives as long as the process.
async fn delay_relay(upstream: u16, delay: Duration) -> Result<u16> {
    let port = free_udp_tcp_port()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    let front = Arc::new(tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).await?);
    let hub = SocketAddr::from((Ipv4Addr::LOCALHOST, upstream));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(hub).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(delayed_copy(cr, sw, delay), delayed_copy(sr, cw, delay));
            });
        }
    });
    tokio::spawn(async move {
        // One upstream socket per agent address, so the hub tells agents apart.
        let mut upstreams: HashMap<SocketAddr, tokio::sync::mpsc::Sender<Delayed>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            let due = Instant::now() + delay;
            let tx = match upstreams.entry(from) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(new) => {
                    let Some(tx) = relay_upstream(front.clone(), from, hub, delay).await else {
                        continue;
                    };
                    new.insert(tx)
                }
            };
            let _ = tx.try_send((due, buf[..n].to_vec()));
        }
    });
    Ok(port)
}

/// The delay relay's socket towards `hub` for the agent at `from`: returns where packets
/// for the hub go; what the hub answers goes back to `from` through `front`, delayed.
async fn relay_upstream(
    front: Arc<tokio::net::UdpSocket>,
    from: SocketAddr,
    hub: SocketAddr,
    delay: Duration,
) -> Option<tokio::sync::mpsc::Sender<Delayed>> {
    let up = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .ok()?;
    up.connect(hub).await.ok()?;
    let up = Arc::new(up);
    let (tx, rx) = tokio::sync::mpsc::channel::<Delayed>(4096);
    let send = up.clone();
    tokio::spawn(deliver_when_due(rx, async move |packet| {
        // A lost datagram is the transport's business, as on a network.
        let _ = send.send(&packet).await;
        true
    }));
    tokio::spawn(async move {
        let (back_tx, back_rx) = tokio::sync::mpsc::channel::<Delayed>(4096);
        let sender = tokio::spawn(deliver_when_due(back_rx, async move |packet| {
            let _ = front.send_to(&packet, from).await;
            true
        }));
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = up.recv(&mut buf).await {
            if back_tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
        sender.abort();
    });
    Some(tx)
}

/// A packet or chunk in the delay relay, and when it is due.
type Delayed = (Instant, Vec<u8>);

/// Hands each queued piece to `deliver` when it is due, in order, until the queue closes or
/// `deliver` answers false.
async fn deliver_when_due(
    mut queue: tokio::sync::mpsc::Receiver<Delayed>,
    mut deliver: impl AsyncFnMut(Vec<u8>) -> bool,
) {
    while let Some((due, data)) = queue.recv().await {
        tokio::time::sleep_until(due.into()).await;
        if !deliver(data).await {
            return;
        }
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read; a FIN is passed on last.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Delayed>(1024);
    // Not `deliver_when_due`: the writer is borrowed for the shutdown that follows, which a
    // spawned task's future cannot hold across the closure's await.
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

/// A port free for both UDP and TCP: rna's hub serves QUIC and TLS over TCP on one port.
fn free_udp_tcp_port() -> Result<u16> {
    for _ in 0..100 {
        let port = free_udp_port()?;
        if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP in 100 tries")
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One system under test, running.
struct System {
    name: String,
    via: Via,
    /// The hub side (what listens for SOCKS) and the agent side; CPU and memory are summed
    /// over both process trees.
    hub: Vec<Proc>,
    agent: Vec<Proc>,
    /// rna only: the admin API and a token that may read it.
    api: Option<(SocketAddr, String)>,
    /// The hub–agent leg as (protocol, port) on 127.0.0.1: where H1 puts its loss.
    leg: Option<(&'static str, u16)>,
}

/// rna only: path MTU, lost packets and transport of the `bench` agent's session, from the
/// admin API.
async fn path_stats(api: SocketAddr, token: &str) -> Result<Value> {
    let mut s = TcpStream::connect(api).await?;
    let request = format!(
        "GET /api/v1/agents HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let start = find(&raw, b"\r\n\r\n").ok_or_else(|| anyhow!("no body"))? + 4;
    let body: Value = serde_json::from_slice(&raw[start..])?;
    let agent = body["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == "bench"))
        .ok_or_else(|| anyhow!("agent bench not listed"))?;
    Ok(
        json!({"path_mtu": agent["path_mtu"], "lost_packets": agent["lost_packets"],
               "transport": agent["transport"]}),
    )
}

impl System {
    /// `kill -9` of this rna system's hub, then the same hub started again at once, as a
    /// supervisor would; the moment the new one was started.
    fn kill_and_restart_hub(&mut self, rna: &Rna) -> Result<Instant> {
        let mut old = self.hub.pop().ok_or_else(|| anyhow!("no hub process"))?;
        signal(old.pid(), "KILL");
        old.end(Duration::from_secs(5));
        let t0 = Instant::now();
        self.hub.push(Proc::spawn("rna hub", &mut rna.hub_cmd())?);
        Ok(t0)
    }

    fn hub_pids(&self) -> Vec<u32> {
        self.hub.iter().map(Proc::pid).collect()
    }
    fn pids(&self) -> Vec<u32> {
        self.hub.iter().chain(&self.agent).map(Proc::pid).collect()
    }
    fn is_tunnel(&self) -> bool {
        !matches!(self.via, Via::Direct)
    }
    fn stop(self) {
        // Agent side first (for ssh the client ends the session child of sshd), then the hub
        // side and whatever it forked.
        for p in self.agent {
            p.terminate(Duration::from_secs(3));
        }
        let hub_tree: Vec<u32> = tree(&self.hub.iter().map(Proc::pid).collect::<Vec<_>>());
        for p in self.hub {
            p.terminate(Duration::from_secs(3));
        }
        for pid in hub_tree {
            if std::fs::metadata(format!("/proc/{pid}")).is_ok() {
                signal(pid, "KILL");
            }
        }
    }
}

struct Rna {
    bin: PathBuf,
    dir: PathBuf,
    /// The hub's listen port: UDP for QUIC and TCP for TLS over TCP (`--tcp-listen same`).
    quic: u16,
    socks: u16,
    api: u16,
    /// The agent's `--transport`, when not its default.
    transport: Option<&'static str>,
    /// The hub's `--max-sessions-per-agent` and `--max-sessions-per-token`: M1's and M2's
    /// sessions all carry the agent name `idle` and one token.
    max_sessions: usize,
    /// The hub's `--socks-early-reply`, when not its default (off).
    early_reply: Option<&'static str>,
    /// The port agents dial: the hub's, or a delay relay's in front of it (`--leg-delay`).
    agent_port: u16,
}

impl Rna {
    fn hub_cmd(&self) -> Command {
        let d = &self.dir;
        let mut c = Command::new(&self.bin);
        c.arg("hub")
            .args(["--listen", &format!("127.0.0.1:{}", self.quic)])
            .args(["--socks", &format!("127.0.0.1:{}", self.socks)])
            .args(["--api", &format!("127.0.0.1:{}", self.api)])
            .arg("--ca")
            .arg(d.join("ca.pem"))
            .arg("--cert")
            .arg(d.join("hub.pem"))
            .arg("--key")
            .arg(d.join("hub-key.pem"))
            .arg("--tokens")
            .arg(d.join("tokens.toml"))
            .arg("--state-dir")
            .arg(d.join("hub-state"))
            .args(["--max-sessions-per-agent", &self.max_sessions.to_string()])
            // ... and one token (the default, 1,024, would stop M2 there).
            .args(["--max-sessions-per-token", &self.max_sessions.to_string()])
            // M1 opens its sessions 32 at a time from one address, where real agents come
            // from many; the default per-source cap (16) would refuse half of its TCP ones.
            .args(["--max-handshakes-per-source", "64"])
            .args(["--log-level", "warn", "--log-format", "text"])
            .stdout(Stdio::null());
        if let Some(window) = self.early_reply {
            c.args(["--socks-early-reply", window]);
        }
        c
    }

    /// The hub address, name, certificates and token of agent `name`, as both `rna agent`
    /// and `rnabench agents` take them.
    fn agent_identity(&self, name: &str) -> Vec<std::ffi::OsString> {
        let d = &self.dir;
        let hub = format!("127.0.0.1:{}", self.agent_port);
        vec![
            "--hub".into(),
            hub.into(),
            "--name".into(),
            name.into(),
            "--ca".into(),
            d.join("ca.pem").into(),
            "--cert".into(),
            d.join(format!("agent-{name}.pem")).into(),
            "--key".into(),
            d.join(format!("agent-{name}-key.pem")).into(),
            "--token-file".into(),
            d.join("token.txt").into(),
        ]
    }

    fn agent_cmd(&self, target: SocketAddr) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("agent")
            .args(self.agent_identity("bench"))
            .args(["--allow", &format!("{}/32", target.ip())])
            // No metrics endpoint: its default port may be taken by another agent.
            .args(["--metrics", "off"])
            .args(["--log-level", "warn", "--log-format", "text"])
            .stdout(Stdio::null());
        if let Some(t) = self.transport {
            c.args(["--transport", t]);
        }
        c
    }
}

async fn wait_ready(via: &Via, target: SocketAddr, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(1), get(via, target, 1, &mut buf));
        if let Ok(Ok(_)) = attempt.await {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("no successful request through {via:?} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts system `name`: `rna` (the agent's default transport), `rna-tcp` (TLS over TCP),
/// `rna-base` or `rna-base-tcp` (the `--rna-base` binary, default transport or TLS over TCP),
/// `rna-early` or `rna-early-tcp` (the hub with `--socks-early-reply 60s`).
async fn start_rna(args: &SuiteArgs, name: &str, target: SocketAddr) -> Result<(System, Rna)> {
    let dir = args.work.join(name);
    std::fs::create_dir_all(&dir)?;
    let early_reply = name.starts_with("rna-early").then_some("60s");
    let (bin, transport) = match name {
        "rna" | "rna-early" => (args.rna.clone(), None),
        "rna-tcp" | "rna-early-tcp" => (args.rna.clone(), Some("tcp")),
        "rna-base" | "rna-base-tcp" => {
            let bin = args
                .rna_base
                .clone()
                .ok_or_else(|| anyhow!("system {name} needs --rna-base PATH"))?;
            (
                std::fs::canonicalize(&bin)
                    .with_context(|| format!("--rna-base {}", bin.display()))?,
                name.strip_suffix("-tcp").map(|_| "tcp"),
            )
        }
        other => bail!("unknown rna system {other}"),
    };
    let bin = &bin;
    run_ok(
        Command::new(bin)
            .args([
                "certs",
                "init",
                "--force",
                "--hub-name",
                "127.0.0.1",
                "--dir",
            ])
            .arg(&dir),
    )?;
    for name in ["bench", "idle"] {
        run_ok(
            Command::new(bin)
                .args(["certs", "agent", "--force", name, "--dir"])
                .arg(&dir),
        )?;
    }
    let _ = std::fs::remove_file(dir.join("tokens.toml"));
    let token = run_ok(
        Command::new(bin)
            .args(["token", "create", "--tenant", "bench/loopback"])
            .args(["--scope", "connect:agentHub", "--scope", "proxy"])
            .args(["--scope", "read:infra:data", "--scope", "read:metrics"])
            .arg("--store")
            .arg(dir.join("tokens.toml")),
    )?;
    let token = token.trim().to_string();
    std::fs::write(dir.join("token.txt"), &token)?;
    let quic = free_udp_tcp_port()?;
    let agent_port = match leg_delay(args) {
        Some(delay) => delay_relay(quic, delay).await?,
        None => quic,
    };
    let rna = Rna {
        bin: bin.clone(),
        dir,
        quic,
        socks: free_tcp_port()?,
        api: free_tcp_port()?,
        transport,
        max_sessions: args.m1_agents.max(args.m2_agents).max(args.m1_real_agents) + 16,
        early_reply,
        agent_port,
    };
    let hub = Proc::spawn("rna hub", &mut rna.hub_cmd())?;
    let agent = Proc::spawn("rna agent", &mut rna.agent_cmd(target))?;
    let via = Via::Socks {
        proxy: SocketAddr::from((Ipv4Addr::LOCALHOST, rna.socks)),
        auth: Some(("bench".into(), token.clone())),
    };
    let sys = System {
        name: name.into(),
        via,
        hub: vec![hub],
        agent: vec![agent],
        api: Some((
            SocketAddr::from((Ipv4Addr::LOCALHOST, rna.api)),
            token.clone(),
        )),
        leg: Some((
            if transport == Some("tcp") {
                "tcp"
            } else {
                "udp"
            },
            rna.quic,
        )),
    };
    wait_ready(&sys.via, target, Duration::from_secs(30)).await?;
    Ok((sys, rna))
}

async fn start_ssh(args: &SuiteArgs, target: SocketAddr) -> Result<System> {
    let dir = args.work.join("ssh");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all("/run/sshd")?;
    for f in ["host_key", "host_key.pub", "client_key", "client_key.pub"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    for f in ["host_key", "client_key"] {
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(f)),
        )?;
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
    let port = free_tcp_port()?;
    let socks = free_tcp_port()?;
    // The ssh client (the agent's side) dials sshd through the delay relay, if any.
    let client_port = match leg_delay(args) {
        Some(delay) => delay_relay(port, delay).await?,
        None => port,
    };
    let d = dir.display();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\nPidFile none\nUsePAM no\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nStrictModes no\nAllowTcpForwarding yes\n\
             GatewayPorts no\nCiphers aes128-gcm@openssh.com\nCompression no\n\
             MaxStartups 1000\nClientAliveInterval 0\nLogLevel ERROR\n"
        ),
    )?;
    std::fs::write(
        dir.join("ssh_config"),
        format!(
            "Host bench\n  HostName 127.0.0.1\n  Port {client_port}\n  User root\n  IdentityFile {d}/client_key\n\
             IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  \
             Ciphers aes128-gcm@openssh.com\n  Compression no\n  LogLevel ERROR\n  \
             ExitOnForwardFailure yes\n  ServerAliveInterval 0\n"
        ),
    )?;
    let sshd = Proc::spawn(
        "sshd",
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdout(Stdio::null()),
    )?;
    wait_tcp_listening(port, Duration::from_secs(10)).context("sshd")?;
    // `-R port` without a destination: reverse dynamic SOCKS on the sshd side, with the ssh
    // client (the "agent") dialing destinations. A terminal (`-tt`) makes both ends treat the
    // session as interactive, which turns on TCP_NODELAY for the transport; with `-N` small
    // messages wait for delayed ACKs (tens of milliseconds) and ssh would look far slower
    // than it can be.
    let client = Proc::spawn(
        "ssh -R",
        Command::new("ssh")
            .arg("-F")
            .arg(dir.join("ssh_config"))
            .args([
                "-tt",
                "-R",
                &format!("127.0.0.1:{socks}"),
                "bench",
                "sleep 86400",
            ])
            .stdout(Stdio::null()),
    )?;
    socks_system("ssh", socks, sshd, client, target, ("tcp", port)).await
}

/// A peer reached as a plain SOCKS5 proxy on 127.0.0.1:`socks`, once it answers.
async fn socks_system(
    name: &str,
    socks: u16,
    hub: Proc,
    agent: Proc,
    target: SocketAddr,
    leg: (&'static str, u16),
) -> Result<System> {
    let sys = System {
        name: name.into(),
        via: Via::Socks {
            proxy: SocketAddr::from((Ipv4Addr::LOCALHOST, socks)),
            auth: None,
        },
        hub: vec![hub],
        agent: vec![agent],
        api: None,
        leg: Some(leg),
    };
    wait_ready(&sys.via, target, Duration::from_secs(30)).await?;
    Ok(sys)
}

async fn start_rusnel(args: &SuiteArgs, bin: &Path, target: SocketAddr) -> Result<System> {
    let dir = args.work.join("rusnel");
    std::fs::create_dir_all(&dir)?;
    let port = free_udp_port()?;
    let socks = free_tcp_port()?;
    let server = Proc::spawn(
        "rusnel server",
        Command::new(bin)
            .current_dir(&dir)
            .args(["server", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--allow-reverse", "--allow-socks", "--insecure"])
            // Per-connection INFO lines would cost it CPU the others do not spend.
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    )?;
    wait_udp_bound(port, Duration::from_secs(10))?;
    let client = Proc::spawn(
        "rusnel client",
        Command::new(bin)
            .current_dir(&dir)
            .args(["client", "--insecure", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .arg(format!("R:127.0.0.1:{socks}:socks"))
            .stdout(Stdio::null()),
    )?;
    socks_system("rusnel", socks, server, client, target, ("udp", port)).await
}

/// shadowsocks-rust: `sslocal` is the SOCKS side (where rna's hub is), `ssserver` dials the
/// destinations (where rna's agent is). It is a forward proxy, not a reverse tunnel, so the
/// server side listens instead of dialing out; for throughput and latency on one machine that
/// changes nothing. Both ends with aes-128-gcm (as ssh) and `TCP_NODELAY` (as rna).
async fn start_shadowsocks(args: &SuiteArgs, bins: &Path, target: SocketAddr) -> Result<System> {
    let dir = args.work.join("shadowsocks");
    std::fs::create_dir_all(&dir)?;
    let port = free_tcp_port()?;
    let socks = free_tcp_port()?;
    let password = "rnabench-shadowsocks";
    let common = ["-m", "aes-128-gcm", "-k", password, "--tcp-no-delay"];
    let server = Proc::spawn(
        "ssserver",
        Command::new(bins.join("ssserver"))
            .current_dir(&dir)
            .args(["-s", &format!("127.0.0.1:{port}")])
            .args(common)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    )?;
    wait_tcp_listening(port, Duration::from_secs(10))?;
    let local = Proc::spawn(
        "sslocal",
        Command::new(bins.join("sslocal"))
            .current_dir(&dir)
            .args(["-b", &format!("127.0.0.1:{socks}")])
            .args(["-s", &format!("127.0.0.1:{port}")])
            .args(common)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    )?;
    socks_system("shadowsocks", socks, local, server, target, ("tcp", port)).await
}

/// Waits until something listens on TCP 127.0.0.1:`port`.
fn wait_tcp_listening(port: u16, limit: Duration) -> Result<()> {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > limit {
            bail!("nothing listened on TCP {port} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits until a UDP socket is bound to `port` (from `/proc/net/udp`, where the local
/// address is `HEXIP:HEXPORT` in the second column).
fn wait_udp_bound(port: u16, limit: Duration) -> Result<()> {
    let started = Instant::now();
    let wanted = format!(":{port:04X}");
    loop {
        let bound = ["/proc/net/udp", "/proc/net/udp6"].iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| {
                t.lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().nth(1))
                    .any(|local| local.ends_with(&wanted))
            })
        });
        if bound {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("nothing bound UDP {port} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The shadowsocks binaries folder, or why the system cannot run.
fn shadowsocks_bins(args: &SuiteArgs) -> Result<PathBuf> {
    let dir = args
        .shadowsocks
        .clone()
        .ok_or_else(|| anyhow!("system shadowsocks needs --shadowsocks DIR"))?;
    std::fs::canonicalize(&dir).with_context(|| format!("--shadowsocks {}", dir.display()))
}

/// Replaces a running system with freshly started processes (the old ones end first).
async fn fresh(
    args: &SuiteArgs,
    target: SocketAddr,
    sys: &mut System,
    rnas: &mut HashMap<String, Rna>,
) -> Result<()> {
    if !sys.is_tunnel() {
        return Ok(());
    }
    let stopped = System {
        name: sys.name.clone(),
        via: Via::Direct,
        hub: vec![],
        agent: vec![],
        api: None,
        leg: None,
    };
    std::mem::replace(sys, stopped).stop();
    *sys = start_system(args, &sys.name, target, rnas).await?;
    Ok(())
}

/// Starts system `name` (its processes, until a request through it succeeds); starting an
/// rna system also records its details in `rnas`.
async fn start_system(
    args: &SuiteArgs,
    name: &str,
    target: SocketAddr,
    rnas: &mut HashMap<String, Rna>,
) -> Result<System> {
    Ok(match name {
        "rna" | "rna-tcp" | "rna-base" | "rna-base-tcp" | "rna-early" | "rna-early-tcp" => {
            let (s, r) = start_rna(args, name, target).await?;
            rnas.insert(name.to_string(), r);
            s
        }
        "ssh" => start_ssh(args, target).await?,
        "direct" => System {
            name: "direct".into(),
            via: Via::Direct,
            hub: vec![],
            agent: vec![],
            api: None,
            leg: None,
        },
        "rusnel" => {
            let bin = args
                .rusnel
                .clone()
                .ok_or_else(|| anyhow!("system rusnel needs --rusnel PATH"))?;
            let bin = std::fs::canonicalize(&bin)
                .with_context(|| format!("--rusnel {}", bin.display()))?;
            start_rusnel(args, &bin, target).await?
        }
        "shadowsocks" => start_shadowsocks(args, &shadowsocks_bins(args)?, target).await?,
        other => bail!("unknown system {other}"),
    })
}

/// Prints and records one result line.
struct Recorder {
    out: Option<std::fs::File>,
    rows: Vec<Value>,
}

impl Recorder {
    fn emit(&mut self, test: &str, system: &str, round: usize, mut v: Value) {
        if let Some(o) = v.as_object_mut() {
            o.insert("test".into(), json!(test));
            o.insert("system".into(), json!(system));
            o.insert("round".into(), json!(round));
            o.insert("load".into(), json!(loadavg()));
        }
        let line = v.to_string();
        println!("{line}");
        if let Some(f) = &mut self.out {
            let _ = writeln!(f, "{line}");
        }
        self.rows.push(v);
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(v, 0.5)
}

async fn bounded<T>(
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| anyhow!("{what}: no result within {limit:?}"))?
}

async fn suite(mut args: SuiteArgs) -> Result<()> {
    // `--systems` given twice (run.sh's list and one after `--`) appends; a system listed
    // twice would share its work folder and token with itself, so each runs once.
    let mut seen = HashSet::new();
    args.systems.retain(|s| seen.insert(s.clone()));
    let tck = clk_tck();
    std::fs::create_dir_all(&args.work)?;
    let exe = std::env::current_exe()?;
    let mut rec = Recorder {
        out: match &args.out {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => None,
        },
        rows: Vec::new(),
    };
    eprintln!("# load average at start: {}", loadavg());
    let mut server = Proc::spawn(
        "file server",
        Command::new(&exe).arg("serve").stdout(Stdio::piped()),
    )?;
    let target: SocketAddr = server.wait_line(Duration::from_secs(10), |l| {
        l.strip_prefix("listening ").and_then(|a| a.parse().ok())
    })?;

    let mut systems: Vec<System> = Vec::new();
    let mut rnas: HashMap<String, Rna> = HashMap::new();
    for name in &args.systems {
        systems.push(start_system(&args, name, target, &mut rnas).await?);
    }
    let result = run_tests(&args, &exe, target, &mut systems, &mut rnas, &mut rec, tck).await;
    for s in systems {
        s.stop();
    }
    server.terminate(Duration::from_secs(2));
    result?;
    eprintln!("# load average at end: {}", loadavg());
    summary(&rec.rows, &args);
    Ok(())
}

/// The value of a step, or an `error` line for (test, system, round) and on to the next
/// system: one peer that breaks must not end the run.
macro_rules! or_note {
    ($rec:expr, $test:expr, $sys:expr, $round:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                $rec.emit($test, &$sys.name, $round, json!({ "error": format!("{e:#}") }));
                continue;
            }
        }
    };
}

/// Growth of resident memory from `before` to `after` bytes, in KiB for each of `n` things
/// (NaN when none were opened).
fn kib_each(before: u64, after: u64, n: u64) -> f64 {
    if n == 0 {
        return f64::NAN;
    }
    (after as f64 - before as f64) / n as f64 / 1024.0
}

/// The systems in the order of this round: as listed in odd rounds, reversed in even ones, so
/// no system always runs first (after a restart) or right after the same neighbour.
fn in_turn(systems: &[System], round: usize) -> Vec<&System> {
    let mut order: Vec<&System> = systems.iter().collect();
    if round.is_multiple_of(2) {
        order.reverse();
    }
    order
}

async fn run_tests(
    args: &SuiteArgs,
    exe: &Path,
    target: SocketAddr,
    systems: &mut [System],
    rnas: &mut HashMap<String, Rna>,
    rec: &mut Recorder,
    tck: f64,
) -> Result<()> {
    let has = |t: &str| args.tests.iter().any(|x| x.eq_ignore_ascii_case(t));
    let mut buf = vec![0u8; 1024 * 1024];
    let step = Duration::from_secs(300);
    for round in 1..=args.rounds {
        if round > 1 {
            // Every round starts from fresh processes: the previous round's C1 left 10,000
            // streams' worth of state behind (sshd, for one, stays slower for the rest of its
            // life after holding that many channels), and M1/R1 restarted the hub.
            for sys in systems.iter_mut() {
                fresh(args, target, sys, rnas).await?;
            }
        }
        for sys in in_turn(systems, round) {
            if !has("B1") {
                break;
            }
            let pids = sys.pids();
            let cpu0 = cpu_secs(&pids, tck);
            let t0 = Instant::now();
            let n = or_note!(
                rec,
                "B1",
                sys,
                round,
                bounded("B1", step, get(&sys.via, target, args.bulk, &mut buf)).await
            );
            let secs = t0.elapsed().as_secs_f64();
            let cpu = cpu_secs(&pids, tck) - cpu0;
            let mut line =
                json!({"value": n as f64 / secs / 1e6, "unit": "MB/s", "bytes": n, "secs": secs});
            if let Some((api, token)) = &sys.api {
                if let (Ok(stats), Some(o)) = (path_stats(*api, token).await, line.as_object_mut())
                {
                    o.insert("path".into(), stats);
                }
            }
            rec.emit("B1", &sys.name, round, line);
            if sys.is_tunnel() {
                rec.emit(
                    "B4",
                    &sys.name,
                    round,
                    json!({"value": cpu / (n as f64 / 1e9), "unit": "CPU-s/GB", "cpu_s": cpu}),
                );
            }
        }
        for sys in in_turn(systems, round) {
            if !has("B2") {
                break;
            }
            let t0 = Instant::now();
            let n = or_note!(
                rec,
                "B2",
                sys,
                round,
                bounded("B2", step, put(&sys.via, target, args.bulk)).await
            );
            let secs = t0.elapsed().as_secs_f64();
            rec.emit(
                "B2",
                &sys.name,
                round,
                json!({"value": n as f64 / secs / 1e6, "unit": "MB/s", "bytes": n, "secs": secs}),
            );
        }
        for sys in in_turn(systems, round) {
            if !has("B3") {
                break;
            }
            let each = args.parallel_bulk / args.streams as u64;
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..args.streams {
                let via = sys.via.clone();
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 256 * 1024];
                    let s = Instant::now();
                    let n = get(&via, target, each, &mut buf).await?;
                    Ok::<_, anyhow::Error>(n as f64 / s.elapsed().as_secs_f64() / 1e6)
                }));
            }
            let mut rates = Vec::new();
            let mut failed = None;
            for t in tasks {
                match bounded("B3", step, async { t.await? }).await {
                    Ok(r) => rates.push(r),
                    Err(e) => failed = Some(e),
                }
            }
            or_note!(rec, "B3", sys, round, failed.map_or(Ok(()), Err));
            let secs = t0.elapsed().as_secs_f64();
            let sum: f64 = rates.iter().sum();
            let sq: f64 = rates.iter().map(|x| x * x).sum();
            let jain = sum * sum / (rates.len() as f64 * sq);
            rec.emit("B3", &sys.name, round, json!({"value": (each * args.streams as u64) as f64 / secs / 1e6, "unit": "MB/s", "jain": jain, "stream_mbps": rates}));
        }
        for sys in in_turn(systems, round) {
            if !has("L1") {
                break;
            }
            let mut connect = Vec::with_capacity(args.l1_count);
            let mut first = Vec::with_capacity(args.l1_count);
            let mut small = vec![0u8; 16 * 1024];
            let measured = bounded("L1", step, async {
                for _ in 0..args.l1_count {
                    let t0 = Instant::now();
                    let mut s = open(&sys.via, target).await?;
                    let tc = t0.elapsed();
                    s.write_all(b"GET /bytes/1024 HTTP/1.1\r\nHost: bench\r\n\r\n")
                        .await?;
                    let (_, fb) = read_response(&mut s, &mut small).await?;
                    connect.push(tc.as_secs_f64() * 1e6);
                    first.push((fb - t0).as_secs_f64() * 1e6);
                }
                Ok(())
            })
            .await;
            or_note!(rec, "L1", sys, round, measured);
            connect.sort_by(|a, b| a.total_cmp(b));
            first.sort_by(|a, b| a.total_cmp(b));
            rec.emit("L1", &sys.name, round, json!({"value": percentile(&first, 0.5), "unit": "us first byte p50",
                "first_byte_p99_us": percentile(&first, 0.99), "connect_p50_us": percentile(&connect, 0.5),
                "connect_p99_us": percentile(&connect, 0.99), "requests": first.len()}));
        }
        for sys in in_turn(systems, round) {
            if !has("L1-curl") {
                break;
            }
            // The client users run: one curl process per request, its own clock
            // (`time_starttransfer`: from the start of the transfer to the first response byte,
            // the process start excluded).
            let mut first = Vec::with_capacity(args.l1_count);
            let measured = bounded("L1-curl", step, async {
                for _ in 0..args.l1_count {
                    first.push(curl_first_byte(&args.curl, &sys.via, target, 1024).await?);
                }
                Ok(())
            })
            .await;
            or_note!(rec, "L1-curl", sys, round, measured);
            first.sort_by(|a, b| a.total_cmp(b));
            rec.emit(
                "L1-curl",
                &sys.name,
                round,
                json!({"value": percentile(&first, 0.5), "unit": "us first byte p50 (curl)",
                "first_byte_p99_us": percentile(&first, 0.99), "requests": first.len()}),
            );
        }
        for sys in in_turn(systems, round) {
            if !has("H1") {
                break;
            }
            let Some(leg) = sys.leg else {
                continue;
            };
            let loss = if args.h1_loss > 0.0 {
                Some(or_note!(
                    rec,
                    "H1",
                    sys,
                    round,
                    Loss::apply(leg, args.h1_loss)
                ))
            } else {
                None
            };
            let measured = bounded("H1", step, head_of_line(args, sys, target)).await;
            let stats = match &sys.api {
                Some((api, token)) => path_stats(*api, token).await.ok(),
                None => None,
            };
            drop(loss);
            let mut line = or_note!(rec, "H1", sys, round, measured);
            if let (Some(stats), Some(o)) = (stats, line.as_object_mut()) {
                o.insert("path".into(), stats);
            }
            if let Some(o) = line.as_object_mut() {
                o.insert("loss".into(), json!(args.h1_loss));
                o.insert("leg".into(), json!(format!("{}/{}", leg.0, leg.1)));
            }
            rec.emit("H1", &sys.name, round, line);
        }
        for sys in in_turn(systems, round) {
            if !has("L2") {
                break;
            }
            let deadline = Instant::now() + Duration::from_secs_f64(args.l2_secs);
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..args.l2_workers {
                let via = sys.via.clone();
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let (mut ok, mut failed) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        match tokio::time::timeout(
                            Duration::from_secs(5),
                            get(&via, target, 1024, &mut buf),
                        )
                        .await
                        {
                            Ok(Ok(_)) => ok += 1,
                            _ => failed += 1,
                        }
                    }
                    (ok, failed)
                }));
            }
            let (mut ok, mut failed) = (0u64, 0u64);
            for t in tasks {
                let (o, f) = bounded("L2", step, async { Ok(t.await?) })
                    .await
                    .unwrap_or((0, 1));
                ok += o;
                failed += f;
            }
            let secs = t0.elapsed().as_secs_f64();
            rec.emit(
                "L2",
                &sys.name,
                round,
                json!({"value": ok as f64 / secs, "unit": "conn/s", "ok": ok, "failed": failed}),
            );
        }
        for &count in &args.c1_counts {
            for sys in systems.iter_mut() {
                if !has("C1") || !sys.is_tunnel() {
                    continue;
                }
                // Fresh processes: allocators keep freed memory, so a second measurement in
                // the same processes would find the streams' memory already resident.
                let restarted = fresh(args, target, sys, rnas).await;
                or_note!(rec, &format!("C1-{count}"), sys, round, restarted);
                let sys = &*sys;
                let pids = sys.pids();
                let before = rss_bytes(&pids);
                let mut holder = Proc::spawn(
                    "hold",
                    Command::new(exe)
                        .args([
                            "hold",
                            "--via",
                            &sys.via.to_arg(),
                            "--target",
                            &target.to_string(),
                        ])
                        .args(["--count", &count.to_string()])
                        .stdout(Stdio::piped()),
                )?;
                let report: Value = or_note!(
                    rec,
                    &format!("C1-{count}"),
                    sys,
                    round,
                    holder.wait_line(Duration::from_secs(240), |l| serde_json::from_str(l).ok())
                );
                let after = rss_bytes(&pids);
                let ok = report["ok"].as_u64().unwrap_or(0);
                let per = kib_each(before, after, ok);
                holder.stop(Duration::from_secs(10));
                rec.emit(&format!("C1-{count}"), &sys.name, round, json!({"value": per, "unit": "KiB/stream (hub+agent RSS)",
                    "ok": ok, "failed": report["failed"], "errors": report["errors"], "open_secs": report["secs"],
                    "rss_before": before, "rss_after": after}));
                // Let both sides forget the streams before the next system runs.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    for sys in systems.iter_mut() {
        if !has("M1") || !rnas.contains_key(&sys.name) {
            continue;
        }
        // A fresh hub, for the same reason as in C1.
        fresh(args, target, sys, rnas).await?;
        let sys = &*sys;
        let rna = rnas
            .get(&sys.name)
            .ok_or_else(|| anyhow!("{} not running", sys.name))?;
        let pids = sys.hub_pids();
        let before = rss_bytes(&pids);
        let fleet = Fleet::start(exe, rna, args.m1_agents, args)?;
        let connect_secs = fleet.wait_connected(args.m1_agents, Duration::from_secs(240))?;
        // Let heartbeats and buffers settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = rss_bytes(&pids);
        let ok = fleet.connected() as u64;
        let per = kib_each(before, after, ok);
        let errors = fleet.last_errors();
        fleet.stop();
        rec.emit(
            "M1",
            &sys.name,
            1,
            json!({"value": per, "unit": "KiB/idle agent (hub RSS)", "ok": ok,
            "failed": args.m1_agents as u64 - ok.min(args.m1_agents as u64), "errors": errors,
            "connect_secs": connect_secs, "rss_before": before, "rss_after": after}),
        );
    }
    if has("M1-real") {
        m1_real(args, exe, target, systems, rnas, rec).await?;
    }
    if has("M2") || has("S1") {
        m2_s1(args, exe, target, systems, rnas, rec, tck, has("S1")).await?;
    }
    if let (true, Some(rna)) = (has("R1"), rnas.get("rna")) {
        let idx = systems
            .iter()
            .position(|s| s.name == "rna")
            .ok_or_else(|| anyhow!("rna not running"))?;
        let via = systems[idx].via.clone();
        let mut times = Vec::new();
        for trial in 1..=args.r1_trials {
            wait_ready(&via, target, Duration::from_secs(60)).await?;
            // Let the agent's session settle and go quiet, as a real hub restart finds it.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let t0 = systems[idx].kill_and_restart_hub(rna)?;
            let took = wait_ready(&via, target, Duration::from_secs(90)).await?;
            let secs = (t0.elapsed().as_secs_f64()).max(took.as_secs_f64());
            times.push(secs);
            rec.emit(
                "R1",
                "rna",
                trial,
                json!({"value": secs, "unit": "s to first SOCKS success"}),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Fleets of idle agents (M1, M1-real, M2, S1)

/// `rnabench agents` processes holding `count` real agents against one hub, with the last
/// status line of each.
struct Fleet {
    procs: Vec<Proc>,
    status: Arc<std::sync::Mutex<Vec<Value>>>,
    count: usize,
}

impl Fleet {
    /// Starts `count` agents named `idle` in processes of at most `--agents-per-process` each,
    /// from one loopback address each unless `--one-source`, at `--fleet-nice`.
    fn start(exe: &Path, rna: &Rna, count: usize, args: &SuiteArgs) -> Result<Fleet> {
        let (one_source, nice) = (args.one_source, args.fleet_nice);
        let per_process = args.agents_per_process.max(1);
        let n = count.div_ceil(per_process).max(1);
        let status = Arc::new(std::sync::Mutex::new(vec![Value::Null; n]));
        let mut procs = Vec::new();
        for i in 0..n {
            let here = per_process.min(count - i * per_process);
            let mut cmd = if nice == 0 {
                Command::new(exe)
            } else {
                let mut c = Command::new("nice");
                c.args(["-n", &nice.to_string()]).arg(exe);
                c
            };
            cmd.arg("agents")
                .args(rna.agent_identity("idle"))
                .args(["--count", &here.to_string()])
                .args(["--transport", rna.transport.unwrap_or("auto")])
                .stdout(Stdio::piped());
            if !one_source {
                cmd.args(["--first-source", &(i * per_process).to_string()]);
            }
            let mut p = Proc::spawn("agents", &mut cmd)?;
            let out = p
                .child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("agents: stdout not captured"))?;
            let status = status.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if let Ok(mut s) = status.lock() {
                            s[i] = v;
                        }
                    }
                }
            });
            procs.push(p);
        }
        Ok(Fleet {
            procs,
            status,
            count,
        })
    }

    fn sum(&self, key: &str) -> u64 {
        self.status
            .lock()
            .map(|s| s.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0)
    }

    /// Agents that report a live session (an agent learns that its hub died only when its
    /// next packet draws a reset, so right after a hub's death this still counts them).
    fn connected(&self) -> usize {
        self.sum("connected") as usize
    }

    /// The last errors of agents not connected, by kind, summed over the processes.
    fn last_errors(&self) -> Value {
        let mut all: BTreeMap<String, u64> = BTreeMap::new();
        if let Ok(s) = self.status.lock() {
            for v in s.iter() {
                if let Some(m) = v["last_errors"].as_object() {
                    for (k, n) in m {
                        *all.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
                    }
                }
            }
        }
        json!(all)
    }

    /// Waits until `n` agents are connected; seconds it took.
    fn wait_connected(&self, n: usize, limit: Duration) -> Result<f64> {
        let t0 = Instant::now();
        while self.connected() < n {
            if t0.elapsed() > limit {
                bail!(
                    "{} of {n} agents connected after {limit:?} (of {}); last errors {}",
                    self.connected(),
                    self.count,
                    self.last_errors()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(t0.elapsed().as_secs_f64())
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    fn stop(self) {
        for p in self.procs {
            p.stop(Duration::from_secs(15));
        }
    }
}

/// One admin API GET with a bearer token: status, body, seconds to the last byte.
async fn api_get(api: SocketAddr, token: &str, path: &str) -> Result<(u16, Vec<u8>, f64)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(api).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .map_err(|_| anyhow!("GET {path}: no answer in 30 s"))??;
    let secs = t0.elapsed().as_secs_f64();
    let head_end = find(&raw, b"\r\n\r\n").ok_or_else(|| anyhow!("GET {path}: no body"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: no status in {head:?}"))?;
    let mut body = raw[head_end + 4..].to_vec();
    if header_value(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = dechunk(&body);
    }
    Ok((status, body, secs))
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(raw, b"\r\n") {
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || raw.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 4 + size).min(raw.len())..];
    }
    out
}

/// Agent connections the hub counts now (`rna_agents_connected`, summed over tenants).
async fn hub_connected(api: SocketAddr, token: &str) -> Result<u64> {
    let (status, body, _) = api_get(api, token, "/metrics").await?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with("rna_agents_connected{"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64)
}

/// A hub counter from `/metrics`, summed over its labels.
async fn hub_counter(api: SocketAddr, token: &str, name: &str) -> Result<u64> {
    let (_, body, _) = api_get(api, token, "/metrics").await?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64)
}

/// M1-real: the hub's memory per agent with `n` real `rna agent` processes, then with the
/// generator holding `n`, each against a fresh hub.
async fn m1_real(
    args: &SuiteArgs,
    exe: &Path,
    target: SocketAddr,
    systems: &mut [System],
    rnas: &mut HashMap<String, Rna>,
    rec: &mut Recorder,
) -> Result<()> {
    let n = args.m1_real_agents;
    let Some(idx) = systems.iter().position(|s| s.name == "rna") else {
        return Ok(());
    };
    let mut figures = Vec::new();
    for how in ["rna agent processes", "generator"] {
        fresh(args, target, &mut systems[idx], rnas).await?;
        let sys = &systems[idx];
        let rna = rnas.get("rna").ok_or_else(|| anyhow!("rna not running"))?;
        let (api, token) = sys.api.clone().ok_or_else(|| anyhow!("rna has no API"))?;
        let pids = sys.hub_pids();
        let before = rss_bytes(&pids);
        let mut agents: Vec<Proc> = Vec::new();
        let mut fleet = None;
        if how == "generator" {
            fleet = Some(Fleet::start(exe, rna, n, args)?);
        } else {
            for _ in 0..n {
                let mut c = Command::new(&rna.bin);
                c.arg("agent")
                    .args(rna.agent_identity("idle"))
                    .args(["--metrics", "off"])
                    .args(["--log-level", "warn", "--log-format", "text"])
                    .stdout(Stdio::null());
                agents.push(Proc::spawn("rna agent", &mut c)?);
            }
        }
        let t0 = Instant::now();
        while hub_connected(api, &token).await? < n as u64 + 1 {
            if t0.elapsed() > Duration::from_secs(300) {
                bail!("M1-real ({how}): not all {n} agents connected in 300 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = rss_bytes(&pids);
        let per = kib_each(before, after, n as u64);
        figures.push(per);
        rec.emit(
            if how == "generator" {
                "M1-gen"
            } else {
                "M1-real"
            },
            "rna",
            1,
            json!({"value": per, "unit": "KiB/idle agent (hub RSS)", "agents": n, "how": how,
                   "connect_secs": t0.elapsed().as_secs_f64(), "rss_before": before, "rss_after": after}),
        );
        for p in agents {
            p.terminate(Duration::from_secs(5));
        }
        if let Some(f) = fleet {
            f.stop();
        }
    }
    if let [real, gen] = figures[..] {
        rec.emit(
            "M1-gen/real",
            "rna",
            1,
            json!({"value": gen / real, "unit": "ratio"}),
        );
    }
    Ok(())
}

/// M2 (10,000 idle agents: the hub's memory per agent, idle CPU, API, status page and metrics
/// latency) and, with `storm`, S1 on the same fleet: `kill -9` of the hub, a restart, and the
/// time until every agent is back, the hub's peak memory meanwhile and the handshakes it
/// turned away or asked to retry.
#[allow(clippy::too_many_arguments)]
async fn m2_s1(
    args: &SuiteArgs,
    exe: &Path,
    target: SocketAddr,
    systems: &mut [System],
    rnas: &mut HashMap<String, Rna>,
    rec: &mut Recorder,
    tck: f64,
    storm: bool,
) -> Result<()> {
    let n = args.m2_agents;
    let Some(idx) = systems.iter().position(|s| s.name == args.m2_system) else {
        return Ok(());
    };
    fresh(args, target, &mut systems[idx], rnas).await?;
    let rna = rnas
        .get(&args.m2_system)
        .ok_or_else(|| anyhow!("{} not running", args.m2_system))?;
    let (api, token) = systems[idx]
        .api
        .clone()
        .ok_or_else(|| anyhow!("rna has no API"))?;
    let pids = systems[idx].hub_pids();
    let before = rss_bytes(&pids);
    eprintln!("# M2: starting {n} agents, load average {}", loadavg());
    let fleet = Fleet::start(exe, rna, n, args)?;
    let connect_secs = fleet.wait_connected(n, Duration::from_secs(900))?;
    // The hub's count (its own `bench` agent included) may lag the agents' or miss one that
    // is reconnecting at that moment; 0.1 % short is measured and said, not an error.
    let t0 = Instant::now();
    let enough = (n - n / 1000) as u64 + 1;
    while hub_connected(api, &token).await? < enough {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("M2: the hub counts fewer than {enough} of {n} agents after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let n_hub = hub_connected(api, &token).await?.saturating_sub(1);
    eprintln!(
        "# M2: the hub counts {n_hub} agents after {connect_secs:.1} s; settling 10 s, then \
         {:.0} s of idle CPU",
        args.m2_idle_secs
    );
    // Heartbeats, MTU discovery and keep-alives settle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = rss_bytes(&pids);
    let load = loadavg();
    // The liveness traffic behind the idle CPU: agent pings in (each answered with a pong)
    // and the hub's own pings (only to silent agents).
    let pings_in0 = hub_counter(api, &token, "rna_heartbeats_received_total").await?;
    let pings_out0 = hub_counter(api, &token, "rna_heartbeats_sent_total").await?;
    let cpu0 = cpu_secs(&pids, tck);
    let gen0 = cpu_secs(&fleet.pids(), tck);
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.m2_idle_secs)).await;
    let wall = w0.elapsed().as_secs_f64();
    let idle_cpu = (cpu_secs(&pids, tck) - cpu0) / wall * 100.0;
    let gen_cpu = (cpu_secs(&fleet.pids(), tck) - gen0) / wall * 100.0;
    let pings_in = (hub_counter(api, &token, "rna_heartbeats_received_total").await?)
        .saturating_sub(pings_in0) as f64
        / wall;
    let pings_out = (hub_counter(api, &token, "rna_heartbeats_sent_total").await?)
        .saturating_sub(pings_out0) as f64
        / wall;
    let mut lat = BTreeMap::new();
    for (label, path) in [
        ("api_agents_ms", "/api/v1/agents"),
        ("api_agents_page_ms", "/api/v1/agents?limit=500"),
        ("status_page_ms", "/"),
        ("metrics_ms", "/metrics"),
    ] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..5 {
            let (status, body, secs) = api_get(api, &token, path).await?;
            if status != 200 {
                bail!("M2: GET {path} answered {status}");
            }
            bytes = body.len();
            times.push(secs * 1000.0);
        }
        lat.insert(label, json!({"median": median(&mut times), "bytes": bytes}));
    }
    let per = kib_each(before, after, n_hub);
    rec.emit(
        "M2",
        &args.m2_system,
        1,
        json!({"value": per, "unit": "KiB/idle agent (hub RSS)", "agents": n, "hub_counted": n_hub,
               "connect_secs": connect_secs, "rss_before": before, "rss_after": after,
               "idle_cpu_pct": idle_cpu, "generator_cpu_pct": gen_cpu, "fleet_nice": args.fleet_nice, "load": load,
               "pings_in_per_sec": pings_in, "hub_pings_per_sec": pings_out,
               "latency": lat}),
    );
    if !storm {
        fleet.stop();
        return Ok(());
    }
    // S1: kill -9 and restart at once, as a supervisor would.
    let gen0 = cpu_secs(&fleet.pids(), tck);
    let sessions0 = fleet.sum("sessions_total");
    let t0 = systems[idx].kill_and_restart_hub(rna)?;
    let pids = systems[idx].hub_pids();
    eprintln!("# S1: hub killed and restarted");
    let mut peak = 0u64;
    let mut back = 0u64;
    let mut back_secs = None;
    // The storm second by second: [s, agents the hub counts, agents connected by their own
    // count, UDP datagrams dropped in the suite's namespace for want of socket buffer, the
    // hub's CPU seconds, the agents' last errors by kind, sessions the agents established
    // since the kill (fewer than the hub counts' complement: some still hold a session to the
    // killed hub, not yet told by a stateless reset), UDP sends refused for want of send
    // buffer in the namespace].
    let mut curve = Vec::new();
    let mut next_point = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(120) {
        peak = peak.max(rss_bytes(&pids));
        back = hub_connected(api, &token).await.unwrap_or(0);
        if back > n_hub {
            back_secs = Some(t0.elapsed().as_secs_f64());
            break;
        }
        if t0.elapsed() >= next_point {
            curve.push(json!([
                (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                back.saturating_sub(1),
                fleet.connected(),
                pids.first().and_then(|p| udp_rcvbuf_errors(*p)),
                (cpu_secs(&pids, tck) * 100.0).round() / 100.0,
                fleet.last_errors(),
                fleet.sum("sessions_total").saturating_sub(sessions0),
                pids.first().and_then(|p| udp_counter(*p, "SndbufErrors"))
            ]));
            next_point += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retries = hub_counter(api, &token, "rna_quic_retries_total")
        .await
        .unwrap_or(0);
    let refusals = hub_counter(api, &token, "rna_cap_refusals_total")
        .await
        .unwrap_or(0);
    let failures = hub_counter(api, &token, "rna_handshake_failures_total")
        .await
        .unwrap_or(0);
    // Sessions that resumed their TLS session from a ticket (absent on a build without it).
    let resumed = hub_counter(api, &token, "rna_tls_resumptions_total")
        .await
        .ok();
    let settled = rss_bytes(&pids);
    // Whose CPU the storm took: the new hub's (all of it since its start) and the generators'
    // (the 10,000 agents' own handshakes, which share this machine's cores with the hub).
    let storm_secs = t0.elapsed().as_secs_f64();
    let hub_cpu = cpu_secs(&pids, tck) / storm_secs * 100.0;
    let gen_cpu = (cpu_secs(&fleet.pids(), tck) - gen0) / storm_secs * 100.0;
    rec.emit(
        "S1",
        &args.m2_system,
        1,
        json!({"value": back_secs, "unit": "s until every agent is back", "agents": n,
               "back": back.saturating_sub(1), "peak_rss": peak, "rss_after": settled,
               "quic_retries": retries, "refused": refusals, "handshake_failures": failures,
               "tls_resumed": resumed, "hub_cpu_pct": hub_cpu, "generator_cpu_pct": gen_cpu, "fleet_nice": args.fleet_nice, "curve": curve,
               "generator_last_errors": fleet.last_errors(), "load": loadavg()}),
    );
    fleet.stop();
    Ok(())
}

/// One GET of `size` bytes with curl through `via`: curl's `time_starttransfer` in µs (from
/// the start of the transfer, SOCKS handshake included, to the first response byte).
async fn curl_first_byte(curl: &Path, via: &Via, target: SocketAddr, size: u64) -> Result<f64> {
    let mut c = tokio::process::Command::new(curl);
    c.args(["-sS", "-o", "/dev/null", "--max-time", "30"])
        .args(["-w", "%{http_code} %{time_starttransfer}"]);
    // Only the proxy given here: none from the environment.
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        c.env_remove(v);
    }
    match via {
        Via::Direct => {
            c.args(["--noproxy", "*"]);
        }
        Via::Socks { proxy, auth } => {
            c.arg("--proxy").arg(format!("socks5h://{proxy}"));
            if let Some((u, p)) = auth {
                c.arg("--proxy-user").arg(format!("{u}:{p}"));
            }
        }
    }
    c.arg(format!("http://{target}/bytes/{size}"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = c
        .output()
        .await
        .with_context(|| format!("running {curl:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let (Some("200"), Some(t)) = (fields.next(), fields.next()) else {
        bail!(
            "curl: {} {}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    };
    let secs: f64 = t.parse().with_context(|| format!("curl time {t:?}"))?;
    Ok(secs * 1e6)
}

/// Packet loss on one hub–agent leg of 127.0.0.1, both directions, by iptables' `statistic`
/// match; the rules go when this is dropped (and `run.sh` removes any left by a killed run:
/// they carry the comment `rnabench-h1`).
struct Loss {
    rules: Vec<Vec<String>>,
}

impl Loss {
    fn apply((proto, port): (&str, u16), probability: f64) -> Result<Loss> {
        let mut loss = Loss { rules: Vec::new() };
        for side in ["--dport", "--sport"] {
            let rule: Vec<String> = [
                "INPUT",
                "-i",
                "lo",
                "-p",
                proto,
                side,
                &port.to_string(),
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability.to_string(),
                "-m",
                "comment",
                "--comment",
                "rnabench-h1",
                "-j",
                "DROP",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            run_ok(Command::new("iptables").args(["-w", "-I"]).args(&rule))
                .context("H1 needs iptables (Debian package iptables) and root")?;
            loss.rules.push(rule);
        }
        Ok(loss)
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        for rule in &self.rules {
            if let Err(e) = run_ok(Command::new("iptables").args(["-w", "-D"]).args(rule)) {
                eprintln!("rnabench: removing loss rule: {e:#}");
            }
        }
    }
}

/// H1: sequential 1 KiB requests with curl while one bulk download runs through the same
/// system; one JSON value with the first-byte p50/p99 and the bulk rate meanwhile.
async fn head_of_line(args: &SuiteArgs, sys: &System, target: SocketAddr) -> Result<Value> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let bulk = {
        let (via, stop, moved) = (sys.via.clone(), stop.clone(), moved.clone());
        tokio::spawn(async move {
            let mut s = open(&via, target).await?;
            s.write_all(b"GET /bytes/1099511627776 HTTP/1.1\r\nHost: bench\r\n\r\n")
                .await?;
            let mut buf = vec![0u8; 256 * 1024];
            while !stop.load(Ordering::Relaxed) {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    bail!("bulk download ended early");
                }
                moved.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    // Measure only once the bulk transfer is under way.
    let started = Instant::now();
    while moved.load(Ordering::Relaxed) < 8 << 20 {
        if bulk.is_finished() || started.elapsed() > Duration::from_secs(30) {
            bulk.abort();
            bail!("the bulk download did not get going");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (t0, bytes0) = (Instant::now(), moved.load(Ordering::Relaxed));
    let mut first = Vec::with_capacity(args.h1_count);
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..args.h1_count {
        match curl_first_byte(&args.curl, &sys.via, target, 1024).await {
            Ok(us) => first.push(us),
            Err(e) => *failed.entry(format!("{e:#}")).or_default() += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let bulk_mbps = (moved.load(Ordering::Relaxed) - bytes0) as f64 / secs / 1e6;
    let bulk_alive = !bulk.is_finished();
    stop.store(true, Ordering::Relaxed);
    bulk.abort();
    if first.is_empty() {
        bail!("H1: no request succeeded: {failed:?}");
    }
    first.sort_by(|a, b| a.total_cmp(b));
    Ok(
        json!({"value": percentile(&first, 0.5), "unit": "us first byte p50 (curl, bulk running)",
        "first_byte_p99_us": percentile(&first, 0.99), "first_byte_max_us": first.last(),
        "requests": first.len(), "failed": failed.values().sum::<usize>(), "errors": failed,
        "bulk_mbps": bulk_mbps, "bulk_alive": bulk_alive}),
    )
}

/// Which systems are compared against rna, and the targets of the issue.
fn summary(rows: &[Value], args: &SuiteArgs) {
    let mut by: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut units: BTreeMap<String, String> = BTreeMap::new();
    let mut extra: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for r in rows {
        let (Some(t), Some(s), Some(v)) = (
            r["test"].as_str(),
            r["system"].as_str(),
            r["value"].as_f64(),
        ) else {
            continue;
        };
        by.entry((t.into(), s.into())).or_default().push(v);
        units.insert(t.into(), r["unit"].as_str().unwrap_or("").into());
        if let Some(j) = r["jain"].as_f64() {
            extra
                .entry(("B3 Jain".into(), s.into()))
                .or_default()
                .push(j);
        }
        if let Some(j) = r["first_byte_p99_us"].as_f64() {
            extra
                .entry((format!("{t} p99"), s.into()))
                .or_default()
                .push(j);
        }
        if let Some(f) = r["failed"].as_u64() {
            extra
                .entry((format!("{t} failed"), s.into()))
                .or_default()
                .push(f as f64);
        }
    }
    let systems: Vec<&str> = args.systems.iter().map(String::as_str).collect();
    let mut tests: Vec<String> = units.keys().cloned().collect();
    tests.sort_by_key(|t| {
        ["B1", "B2", "B3", "B4", "L1", "L2", "H1", "C1", "M1", "R1"]
            .iter()
            .position(|p| t.starts_with(p))
            .unwrap_or(99)
    });
    let med = |m: &BTreeMap<(String, String), Vec<f64>>, t: &str, s: &str| {
        m.get(&(t.to_string(), s.to_string()))
            .map(|v| median(&mut v.clone()))
    };
    let fmt = |v: Option<f64>| {
        v.map_or("–".to_string(), |v| {
            if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.3}")
            }
        })
    };
    let peers: Vec<&str> = systems.iter().copied().filter(|s| *s != "rna").collect();
    let mut header = String::from("| test | unit |");
    let mut rule = String::from("| --- | --- |");
    for s in &systems {
        header += &format!(" {s} |");
        rule += " ---: |";
    }
    for p in &peers {
        header += &format!(" rna/{p} |");
        rule += " ---: |";
    }
    println!(
        "\nMedians over {} round(s); load average now {}\n",
        args.rounds,
        loadavg()
    );
    println!("{header}\n{rule}");
    let mut lines: Vec<(String, String, BTreeMap<String, Option<f64>>)> = Vec::new();
    for t in &tests {
        let vals = systems
            .iter()
            .map(|s| (s.to_string(), med(&by, t, s)))
            .collect();
        lines.push((t.clone(), units[t].clone(), vals));
        for (label, unit) in [
            ("B3 Jain", "Jain index"),
            ("L1 p99", "us first byte p99"),
            ("L1-curl p99", "us first byte p99 (curl)"),
            ("H1 p99", "us first byte p99 (curl, bulk running)"),
        ] {
            if t == label.split(' ').next().unwrap_or("") {
                let vals = systems
                    .iter()
                    .map(|s| (s.to_string(), med(&extra, label, s)))
                    .collect();
                lines.push((label.into(), unit.into(), vals));
            }
        }
        if t.starts_with("C1") || t == "M1" || t == "H1" {
            let label = format!("{t} failed");
            let vals = systems
                .iter()
                .map(|s| (s.to_string(), med(&extra, &label, s)))
                .collect();
            lines.push((label, "failures".into(), vals));
        }
    }
    for (t, unit, vals) in &lines {
        let mut row = format!("| {t} | {unit} |");
        for s in &systems {
            row += &format!(" {} |", fmt(vals[*s]));
        }
        for p in &peers {
            let ratio = match (vals["rna"], vals[*p]) {
                (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                _ => None,
            };
            row += &format!(" {} |", fmt(ratio));
        }
        println!("{row}");
    }
    let get = |t: &str, s: &str| med(&by, t, s);
    let mut targets = Vec::new();
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    };
    let check = |name: &str, v: Option<f64>, ok: &dyn Fn(f64) -> bool, goal: &str| match v {
        Some(v) => format!(
            "{name}: {v:.3} (target {goal}): {}",
            if ok(v) { "met" } else { "MISSED" }
        ),
        None => format!("{name}: not measured (target {goal})"),
    };
    targets.push(check(
        "B1 rna/ssh",
        ratio(get("B1", "rna"), get("B1", "ssh")),
        &|v| v >= 1.0,
        ">= 1.0",
    ));
    let p99 = |t: &str, s: &str| med(&extra, &format!("{t} p99"), s);
    if systems.contains(&"rna-tcp") {
        targets.push(check(
            "B1 rna-tcp/ssh",
            ratio(get("B1", "rna-tcp"), get("B1", "ssh")),
            &|v| v >= 1.0,
            ">= 1.0",
        ));
        targets.push(check(
            "B1 rna-tcp/rna",
            ratio(get("B1", "rna-tcp"), get("B1", "rna")),
            &|v| v >= 0.9,
            ">= 0.9",
        ));
        targets.push(check(
            "H1 p99 rna/rna-tcp",
            ratio(p99("H1", "rna"), p99("H1", "rna-tcp")),
            &|v| v <= 0.2,
            "<= 0.2",
        ));
    }
    targets.push(check(
        "H1 p99 rna/ssh",
        ratio(p99("H1", "rna"), p99("H1", "ssh")),
        &|v| v <= 0.2,
        "<= 0.2",
    ));
    for sys in ["rna", "rna-tcp"] {
        if !systems.contains(&sys) {
            continue;
        }
        targets.push(check(
            &format!("L1-curl p50 {sys}/ssh"),
            ratio(get("L1-curl", sys), get("L1-curl", "ssh")),
            &|v| v <= 0.8,
            "<= 0.8",
        ));
        targets.push(check(
            &format!("L1-curl p99 {sys}/ssh"),
            ratio(p99("L1-curl", sys), p99("L1-curl", "ssh")),
            &|v| v <= 1.0,
            "<= 1.0",
        ));
    }
    if systems.contains(&"rusnel") {
        targets.push(check(
            "B1 rna/rusnel",
            ratio(get("B1", "rna"), get("B1", "rusnel")),
            &|v| v >= 2.0,
            ">= 2.0",
        ));
    }
    targets.push(check(
        "B4 rna/ssh",
        ratio(get("B4", "rna"), get("B4", "ssh")),
        &|v| v <= 1.0,
        "<= 1.0",
    ));
    targets.push(check(
        "L1 p50 rna/ssh",
        ratio(get("L1", "rna"), get("L1", "ssh")),
        &|v| v <= 0.8,
        "<= 0.8",
    ));
    let big = args.c1_counts.iter().max().copied().unwrap_or(0);
    let c1 = format!("C1-{big}");
    targets.push(check(
        &format!("{c1} KiB/stream"),
        get(&c1, "rna"),
        &|v| v <= 32.0,
        "<= 32",
    ));
    for sys in ["rna", "rna-tcp"] {
        if systems.contains(&sys) {
            targets.push(check(
                &format!("{c1} failures {sys}"),
                med(&extra, &format!("{c1} failed"), sys),
                &|v| v == 0.0,
                "= 0",
            ));
        }
    }
    for sys in ["rna", "rna-tcp"] {
        if systems.contains(&sys) {
            targets.push(check(
                &format!("M1 KiB/idle agent {sys}"),
                get("M1", sys),
                &|v| v <= 32.0,
                "<= 32",
            ));
        }
    }
    targets.push(check("R1 p50 s", get("R1", "rna"), &|v| v <= 0.5, "<= 0.5"));
    println!("\nTargets:");
    for t in targets {
        println!("- {t}");
    }
}
