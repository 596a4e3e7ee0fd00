//! The admin API's deadlines and connection caps, and every accept loop under descriptor
//! exhaustion: slow or idle clients are cut off, the excess is refused and counted, the
//! hub's descriptors stay bounded, and everyone else (and everyone after the attacker) is
//! served.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request head that never ends: the slowloris client's first bytes.
const PARTIAL_HEAD: &[u8] = b"GET / HTTP/1.1\r\nHost: hub\r\nX-Slow: ";

/// Connects to `to` from the loopback address `from` (any of 127.0.0.0/8).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    within("connect", tcp_connect_from(from, to))
        .await
        .expect("connect")
}

/// Opens `n` connections from `from` that each send a partial request head and then wait.
async fn slowloris(n: usize, from: IpAddr, api: SocketAddr) -> Vec<(TcpStream, Instant)> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect_from(from, api).await;
        // A refused connection may already be closed by the hub: that is fine.
        let _ = s.write_all(PARTIAL_HEAD).await;
        conns.push((s, Instant::now()));
    }
    conns
}

/// Reads until the hub closes `s` (EOF or reset); returns what was read.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Descriptors of this process that are not one of the `clients` sockets the test holds:
/// the hub's own (it runs in this process) plus the test's fixed baseline.
fn hub_side_fds(baseline: usize, clients: usize) -> usize {
    open_fds().saturating_sub(baseline + clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_over_the_total_cap_keeps_fds_bounded_and_is_cut_at_the_header_deadline() {
    const CAP: usize = 40;
    const SLOW: usize = 300;
    let header_timeout = Duration::from_secs(3);
    let world = World::start_with(|c| {
        c.api_limits.max_connections = CAP;
        c.api_limits.max_connections_per_ip = 10_000;
        c.api_limits.header_timeout = header_timeout;
    })
    .await;
    let metrics = world.hub.metrics().clone();
    let baseline = open_fds();
    let mut slow = slowloris(SLOW, [127, 0, 0, 1].into(), world.api).await;

    // Everything past the cap is refused at accept and counted; the hub holds at most CAP
    // client sockets, not one per attacker connection.
    eventually("refusals over the cap counted", || {
        metrics.cap_refusals("api_connections") as usize >= SLOW - CAP
    })
    .await;
    let held = hub_side_fds(baseline, SLOW);
    assert!(
        held <= CAP + 8,
        "the hub holds {held} descriptors for {SLOW} slow clients (cap {CAP})"
    );
    assert_eq!(metrics.cap_refusals("api_connections_per_ip"), 0);

    // Every slow client is closed: the refused ones at once with a 503, the admitted ones
    // when the header deadline passes, not before.
    let mut refused = 0;
    within("every slow client closed", async {
        for (s, opened) in &mut slow {
            let got = until_closed(s).await;
            if got.starts_with(b"HTTP/1.1 503") {
                refused += 1;
            } else {
                let lived = opened.elapsed();
                assert!(
                    lived >= header_timeout - Duration::from_millis(200),
                    "an admitted slow client was closed after {lived:?}, before the deadline"
                );
            }
        }
    })
    .await;
    assert!(refused >= SLOW - CAP, "{refused} refused with 503");

    // The attacker is gone: a fresh client is served.
    drop(slow);
    let (status, body) = within("healthz after the attack", http_get(world.api, "/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap_leaves_other_clients_served_during_the_attack() {
    const PER_IP: usize = 20;
    const SLOW: usize = 100;
    let world = World::start_with(|c| {
        c.api_limits.max_connections_per_ip = PER_IP;
        c.api_limits.header_timeout = Duration::from_secs(60);
    })
    .await;
    let metrics = world.hub.metrics().clone();
    let attacker: IpAddr = [127, 0, 0, 1].into();
    let baseline = open_fds();
    let slow = slowloris(SLOW, attacker, world.api).await;
    eventually("per-IP refusals counted", || {
        metrics.cap_refusals("api_connections_per_ip") as usize >= SLOW - PER_IP
    })
    .await;
    let held = hub_side_fds(baseline, SLOW);
    assert!(held <= PER_IP + 8, "the hub holds {held} descriptors");

    // Another client address is served at once, while the attacker still holds its share.
    let mut s = connect_from([127, 0, 0, 2].into(), world.api).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let reply = within("healthz from another address", until_closed(&mut s)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nok\n"), "{reply}");

    // The attacker's address gets a precise 503 while over its cap.
    let mut extra = connect_from(attacker, world.api).await;
    let reply = within("503 over the per-IP cap", until_closed(&mut extra)).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 503 Service Unavailable\r\n"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(metrics.cap_refusals("api_connections"), 0);

    // Once the attacker goes, its address is served again.
    drop(slow);
    // The hub frees the attacker's places as it notices the closes.
    eventually_async("healthz from the attacker's address", async || {
        let mut s = connect_from(attacker, world.api).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        until_closed(&mut s).await.starts_with(b"HTTP/1.1 200")
    })
    .await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_and_slow_bodies_are_cut_off() {
    let deadline = Duration::from_secs(2);
    let world = World::start_with(|c| {
        c.api_limits.header_timeout = deadline;
        c.api_limits.request_timeout = deadline;
    })
    .await;

    // A kept-alive connection that sends nothing after its answer is closed at the header
    // deadline.
    let mut s = TcpStream::connect(world.api).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within("keep-alive answer", async {
        let mut buf = [0u8; 512];
        while !answer.ends_with(b"\r\n\r\nok\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer");
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let answered = Instant::now();
    let rest = within("idle keep-alive connection closed", until_closed(&mut s)).await;
    let idle = answered.elapsed();
    assert!(
        idle >= deadline - Duration::from_millis(200),
        "closed after {idle:?} idle"
    );
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&rest)
    );

    // A body that never arrives whole is answered 408 at the request deadline.
    let mut s = TcpStream::connect(world.api).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: hub\r\nContent-Type: application/x-www-form-urlencoded\r\n\
          Content-Length: 100\r\n\r\ntoken=",
    )
    .await
    .unwrap();
    let sent = Instant::now();
    let reply = within("late body answered", until_closed(&mut s)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{reply}"
    );
    assert!(sent.elapsed() >= deadline - Duration::from_millis(200));

    // Everyone else is served meanwhile and after.
    let (status, _) = http_get(world.api, "/healthz").await;
    assert_eq!(status, 200);
    world.stop().await;
}

/// CPU time (user + system) of process `pid`, in clock ticks (`/proc/PID/stat` fields 14
/// and 15, proc(5)).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3, so field N is at index N - 3.
    fields[14 - 3].parse::<u64>().expect("utime") + fields[15 - 3].parse::<u64>().expect("stime")
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether `/healthz` answers 200 within 2 s; a refused or reset connection is a no.
async fn healthz_answers(api: SocketAddr) -> bool {
    let ask = async {
        let mut s = TcpStream::connect(api).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.ok()?;
        Some(reply.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ask).await,
        Ok(Some(true))
    )
}

/// Whether a SOCKS5 greeting offering user/password gets the RFC 1928 method answer.
async fn socks_answers(socks: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(socks).await else {
        return false;
    };
    if s.write_all(&[5, 1, 2]).await.is_err() {
        return false;
    }
    let mut reply = [0u8; 2];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut reply)).await,
        Ok(Ok(_))
    ) && reply == [5, 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_backs_off_with_bounded_logs_and_service_resumes() {
    // A real `rna hub` under a low RLIMIT_NOFILE, set by util-linux's prlimit.
    const NOFILE: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().display().to_string();
    rna::certs::init_dir(dir.path(), &["127.0.0.1".to_string()], false).expect("certs");
    let store = dir.path().join("tokens.toml");
    rna::auth::TokenStore::default().save(&store).unwrap();
    let args = hub_process_args(
        &certs,
        &store.display().to_string(),
        "127.0.0.1:0",
        // Held connections must stay held for the whole test.
        &[
            "--socks-greeting-timeout",
            "300s",
            "--api-header-timeout",
            "300s",
        ],
    );
    let mut child = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg("--")
        .arg(RNA)
        .args(&args)
        .env("RNA_LOG_LEVEL", "info")
        .env("RNA_LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("prlimit (util-linux) runs rna hub");
    let pid = child.id().expect("pid");
    let accept_errors = Arc::new(AtomicUsize::new(0));
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    {
        let stderr = child.stderr.take().unwrap();
        let accept_errors = accept_errors.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if line.contains("accept failed") {
                    // Counted, not echoed: before the fix there were millions.
                    accept_errors.fetch_add(1, Ordering::SeqCst);
                } else {
                    eprintln!("{line}");
                }
                let _ = tx.send(line);
            }
        });
    }
    let serving = wait_line(&mut lines, "hub serving").await;
    let socks: SocketAddr = field(&serving, "socks").parse().unwrap();
    let api: SocketAddr = field(&serving, "api").parse().unwrap();

    // Fill every free descriptor of the hub with SOCKS clients that never greet; the rest
    // wait in the kernel's queues of both listeners, so every accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..NOFILE + 40 {
        held.push(TcpStream::connect(socks).await.unwrap());
    }
    for _ in 0..10 {
        held.push(TcpStream::connect(api).await.unwrap());
    }
    eventually("the hub is out of descriptors", || fds_of(pid) >= NOFILE).await;
    eventually("accept errors logged", || {
        accept_errors.load(Ordering::SeqCst) > 0
    })
    .await;

    // CPU and log lines over a fixed window while every accept fails: the window is the
    // measurement itself, not a wait for something to happen.
    let window = Duration::from_secs(4);
    let (cpu0, lines0, t0) = (
        cpu_ticks(pid),
        accept_errors.load(Ordering::SeqCst),
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let (cpu1, lines1, elapsed) = (
        cpu_ticks(pid),
        accept_errors.load(Ordering::SeqCst),
        t0.elapsed(),
    );
    let cpu_share = (cpu1 - cpu0) as f64 / clock_ticks_per_second() as f64 / elapsed.as_secs_f64();
    let logged = lines1 - lines0;
    eprintln!(
        "out of descriptors: hub CPU {:.1} % of a core, {logged} accept-error lines in {elapsed:?}",
        cpu_share * 100.0
    );
    assert!(
        cpu_share < 0.15,
        "the hub burns {:.1} % of a core",
        cpu_share * 100.0
    );
    // At most one line a second per listener (SOCKS and admin API), plus rounding.
    let bound = 2 * (elapsed.as_secs() as usize + 2);
    assert!(
        logged <= bound,
        "{logged} accept-error lines in {elapsed:?}"
    );

    // The attacker goes: the hub answers health checks and SOCKS greetings again.
    drop(held);
    eventually_async("admin API and SOCKS served again", async || {
        healthz_answers(api).await && socks_answers(socks).await
    })
    .await;
    wait_line(&mut lines, "accepting connections again").await;
    signal(&child, "-TERM");
    let status = within("hub exits", child.wait()).await.unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_endpoint_has_the_same_caps() {
    let world = World::start().await;
    let token = world.agent_token("acme/prod");
    let agent = world.connect_agent("acme/prod", "edge", &token, 1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(rna::agent::admin::serve(
        listener,
        agent.handle.clone(),
        stop.clone(),
    ));
    let per_ip = rna::listen::HttpLimits::default().max_connections_per_ip;
    let attacker: IpAddr = [127, 0, 0, 1].into();
    let _slow = slowloris(per_ip, attacker, addr).await;
    let mut extra = connect_from(attacker, addr).await;
    let reply = within("503 over the per-IP cap", until_closed(&mut extra)).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(
        agent
            .handle
            .metrics()
            .cap_refusals("metrics_connections_per_ip"),
        1
    );
    let mut other = connect_from([127, 0, 0, 3].into(), addr).await;
    other
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let reply = within("readyz from another address", until_closed(&mut other)).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    stop.cancel();
    within("metrics endpoint stops", served).await.unwrap();
    agent.stop().await;
    world.stop().await;
}
