//! Faults on the path: a lossy, reordering UDP link between agent and hub, a SOCKS client
//! that stops reading, destinations that never answer or black-hole, and an agent whose UDP
//! address changes mid-transfer. After each, every resource is back to its baseline.
//! The stalled client and the dead destinations run on both transports; the lossy link and
//! the address change stay on QUIC, whose datagrams and connection migration they exercise.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::*;
use rna::agent::TransportMode;
use rna::transport::control::Heartbeat;
use rna::transport::Congestion;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TENANT: &str = "acme/prod";
const AGENT: &str = "edge";

/// SHA-256 of the first `len` pattern bytes, computed in chunks.
fn pattern_sha256(len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut offset = 0;
    let mut chunk = Vec::with_capacity(1 << 20);
    while offset < len {
        let end = (offset + (1 << 20)).min(len);
        chunk.clear();
        chunk.extend((offset..end).map(pattern_byte));
        hasher.update(&chunk);
        offset = end;
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads an HTTP response head; returns the bytes of body already read.
async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection ended inside the response head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..at]).to_string();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            return buf[at + 4..].to_vec();
        }
    }
}

/// A destination that answers any request with an endless HTTP body. The watch says whether
/// a write of it is held back right now (the socket's send buffer is full because nobody
/// downstream reads): the event that flow control has reached it.
async fn endless_server() -> (SocketAddr, tokio::sync::watch::Receiver<bool>) {
    let (held_back, watch) = tokio::sync::watch::channel(false);
    let held_back = std::sync::Arc::new(held_back);
    let addr = tcp_server(move |mut s: TcpStream| {
        let held_back = held_back.clone();
        async move {
            let mut head = [0u8; 1024];
            if s.read(&mut head).await.is_err() {
                return;
            }
            let header = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n";
            if s.write_all(header).await.is_err() {
                return;
            }
            let chunk = pattern(64 * 1024);
            loop {
                match s.try_write(&chunk) {
                    // Let the runtime's other tasks run between writes that succeed.
                    Ok(_) => tokio::task::yield_now().await,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        held_back.send_replace(true);
                        if s.writable().await.is_err() {
                            return;
                        }
                        held_back.send_replace(false);
                    }
                    Err(_) => return,
                }
            }
        }
    })
    .await;
    (addr, watch)
}

/// Downloads `len` bytes through the tunnel; returns the SHA-256 of what arrived.
async fn download(socks: SocketAddr, token: &str, http: SocketAddr, len: u64) -> (u64, String) {
    let mut s = socks_connect(socks, AGENT, token, Dest::Ip(http))
        .await
        .unwrap();
    s.write_all(format!("GET /bytes/{len} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut hasher = Sha256::new();
    let first = read_head(&mut s).await;
    let mut got = first.len() as u64;
    hasher.update(&first);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        got += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (got, hex)
}

/// Uploads `len` pattern bytes; returns the SHA-256 the destination computed.
async fn upload(socks: SocketAddr, token: &str, http: SocketAddr, len: u64) -> String {
    let mut s = socks_connect(socks, AGENT, token, Dest::Ip(http))
        .await
        .unwrap();
    s.write_all(
        format!("POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = s.split();
    let send = async {
        let mut offset = 0u64;
        let mut chunk = Vec::with_capacity(256 * 1024);
        while offset < len {
            let end = (offset + 256 * 1024).min(len);
            chunk.clear();
            chunk.extend((offset..end).map(pattern_byte));
            wr.write_all(&chunk).await.unwrap();
            offset = end;
        }
    };
    let mut answer = Vec::new();
    let receive = rd.read_to_end(&mut answer);
    let ((), read) = tokio::join!(send, receive);
    read.unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    text.rsplit("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Moves `len` bytes each way at once over a link that loses `loss` of all datagrams and
/// holds back 10 % of them by up to 25 ms (reordering), and checks both SHA-256s, that the
/// session was never re-established, and that nothing leaked.
async fn transfer_over_lossy_link(loss: f64, len: u64, seed: u64, congestion: Congestion) {
    let _serial = SERIAL.lock().await;
    let world = World::start_with(|c| {
        c.limits.congestion = congestion;
        // Loss delays heartbeats behind retransmissions; keep the timeout generous.
        c.heartbeat = Heartbeat {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(15),
        };
    })
    .await;
    let token = world.agent_token(TENANT);
    let link = LossyLink::start(
        world.quic,
        Faults {
            loss,
            delay: 0.10,
            max_delay_ms: 25,
            seed,
        },
    )
    .await;
    let mut config = world.agent_config(AGENT, &token);
    config.hubs[0].port = link.addr.port();
    config.limits.congestion = congestion;
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, AGENT, 1).await;
    world.wait_answering(TENANT, AGENT, 1).await;
    let http = http_server().await;
    let want = pattern_sha256(len);
    let baseline = world.footprint(&[&agent]);

    let started = Instant::now();
    let deadline = Duration::from_secs(if len > 64 << 20 { 3600 } else { 300 });
    let (down, up) = tokio::time::timeout(deadline, async {
        tokio::join!(
            download(world.socks, &token, http, len),
            upload(world.socks, &token, http, len)
        )
    })
    .await
    .expect("transfer finished in time");
    let took = started.elapsed();
    let mib = len as f64 / f64::from(1 << 20);
    println!(
        "{congestion:?}, loss {:.0}% seed {seed}: {mib:.0} MiB each way in {took:.1?} \
         ({:.1} MiB/s per direction); link dropped {} and forwarded {} datagrams",
        loss * 100.0,
        mib / took.as_secs_f64(),
        link.dropped.load(Ordering::Relaxed),
        link.forwarded.load(Ordering::Relaxed),
    );
    assert_eq!(down.0, len, "download length");
    assert_eq!(down.1, want, "download SHA-256");
    assert_eq!(up, want, "upload SHA-256");
    let dropped = link.dropped.load(Ordering::Relaxed) as f64;
    let total = dropped + link.forwarded.load(Ordering::Relaxed) as f64;
    assert!(
        (dropped / total - loss).abs() < loss * 0.25 + 0.005,
        "the link dropped {dropped} of {total}"
    );
    let status = agent.handle.status();
    assert_eq!(
        status.sessions_total, 1,
        "the session must survive the loss"
    );
    world.assert_no_leaks(&baseline, &[&agent]).await;
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_percent_loss_with_reordering_is_sha_exact() {
    transfer_over_lossy_link(0.05, 8 << 20, 5, Congestion::Cubic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_percent_loss_with_reordering_is_sha_exact() {
    transfer_over_lossy_link(0.20, 2 << 20, 20, Congestion::Cubic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_percent_loss_with_bbr_is_sha_exact() {
    transfer_over_lossy_link(0.20, 8 << 20, 21, Congestion::Bbr).await;
}

// The sizes the hardening plan names: 256 MiB each way. Minutes each (the 20 % CUBIC one
// most of an hour, since CUBIC halves its window on every loss); run with
// `cargo test --release --test faults -- --ignored --test-threads 1`.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "256 MiB each way: minutes; run explicitly"]
async fn five_percent_loss_256_mib_each_way() {
    transfer_over_lossy_link(0.05, 256 << 20, 5, Congestion::Cubic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "256 MiB each way at 20% loss with CUBIC: most of an hour; run explicitly"]
async fn twenty_percent_loss_256_mib_each_way() {
    transfer_over_lossy_link(0.20, 256 << 20, 20, Congestion::Cubic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "256 MiB each way: minutes; run explicitly"]
async fn five_percent_loss_256_mib_each_way_bbr() {
    transfer_over_lossy_link(0.05, 256 << 20, 5, Congestion::Bbr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "256 MiB each way: minutes; run explicitly"]
async fn twenty_percent_loss_256_mib_each_way_bbr() {
    transfer_over_lossy_link(0.20, 256 << 20, 20, Congestion::Bbr).await;
}

on_both_transports!(a_client_that_stops_reading_slows_neither_other_streams_nor_heartbeats);
async fn a_client_that_stops_reading_slows_neither_other_streams_nor_heartbeats(
    transport: TransportMode,
) {
    let _serial = SERIAL.lock().await;
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let agent = world
        .connect_agent_over(TENANT, AGENT, &token, 1, transport)
        .await;
    let http = http_server().await;
    let (endless, mut held_back) = endless_server().await;
    let baseline = world.footprint(&[&agent]);

    // The stalled client asks for a lot and never reads past the head.
    let mut stalled = socks_connect(world.socks, AGENT, &token, Dest::Ip(endless))
        .await
        .unwrap();
    stalled
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let _ = read_head(&mut stalled).await;
    // Flow control reaches back from the stalled client through hub, stream and agent to the
    // destination, whose writes are then held back.
    within(
        "the stalled stream to hold back its destination",
        held_back.wait_for(|held| *held),
    )
    .await
    .unwrap();

    // Meanwhile a second client moves 64 MiB over the same agent connection, and the
    // control stream keeps beating: pongs keep coming back.
    let pongs = || -> u64 {
        let text = world.hub.metrics().render();
        text.lines()
            .find_map(|l| l.strip_prefix("rna_heartbeat_rtt_seconds_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let pongs_before = pongs();
    let len = 64 << 20;
    let transfer = tokio::spawn({
        let socks = world.socks;
        let token = token.clone();
        async move {
            let started = Instant::now();
            let got = download(socks, &token, http, len).await;
            (got, started.elapsed())
        }
    });
    let mut worst_silence = 0f64;
    while !transfer.is_finished() {
        for info in world.hub.registry().infos(None) {
            worst_silence = worst_silence.max(info.last_heartbeat_seconds_ago);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ((got, sha), took) = within("the concurrent transfer", transfer).await.unwrap();
    let answered = pongs() - pongs_before;
    // The stalled stream never drained: its destination is still held back, and what the hub
    // received of it is what its window and buffers hold (the count includes both response
    // heads too, so it errs high).
    assert!(*held_back.borrow(), "the stalled stream drained");
    let from_agent: u64 = world
        .hub
        .registry()
        .infos(None)
        .iter()
        .map(|i| i.bytes_in)
        .sum();
    let stalled_bytes = from_agent - len;
    println!(
        "64 MiB beside a stalled stream in {took:.1?}; stalled stream holds {stalled_bytes} \
         bytes; longest control-stream silence {worst_silence:.2}s; {answered} pings answered"
    );
    assert_eq!(got, len);
    assert_eq!(sha, pattern_sha256(len));
    let interval = fast_heartbeat().interval.as_secs_f64();
    assert!(
        worst_silence < interval * 4.0,
        "heartbeats stalled for {worst_silence}s (interval {interval}s)"
    );
    // Pings went out and were answered during the transfer, not just data seen.
    let expected = (took.as_secs_f64() / interval) as u64;
    assert!(
        answered + 2 >= expected / 2,
        "{answered} pings answered in {took:?} (interval {interval}s)"
    );
    // The stalled stream holds no more than flow control allows (stream window plus the
    // TCP buffers on both ends), and the session never dropped.
    assert!(
        stalled_bytes < 4 * 1024 * 1024 + 16 * 1024 * 1024,
        "{stalled_bytes}"
    );
    assert_eq!(agent.handle.status().sessions_total, 1);

    drop(stalled);
    world.assert_no_leaks(&baseline, &[&agent]).await;
    agent.stop().await;
    world.stop().await;
}

on_both_transports!(never_answering_and_black_hole_destinations_time_out_and_free_everything);
async fn never_answering_and_black_hole_destinations_time_out_and_free_everything(
    transport: TransportMode,
) {
    let _serial = SERIAL.lock().await;
    let world = World::start_with(|c| {
        c.caps.stream_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let token = world.agent_token(TENANT);
    let mut config = world.agent_config_over(AGENT, &token, transport);
    config.dial_timeout = Duration::from_secs(1);
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, AGENT, 1).await;
    world.assert_transport(TENANT, AGENT, transport);
    world.wait_answering(TENANT, AGENT, 1).await;
    let (silent, _fillers, _listener) = never_answering();

    // A black hole: accepts, reads everything, never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let (hole_tx, mut hole_rx) = tokio::sync::mpsc::unbounded_channel();
    let hole_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = hole.accept().await {
            let tx = hole_tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let end = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break "eof",
                        Ok(_) => continue,
                        Err(_) => break "reset",
                    }
                };
                let _ = tx.send(end);
            });
        }
    });
    let baseline = world.footprint(&[&agent]);

    // Never answers: the agent's dial timeout fires and the client gets 0x06.
    for _ in 0..3 {
        let started = Instant::now();
        let reply = socks_connect(world.socks, AGENT, &token, Dest::Ip(silent))
            .await
            .err();
        assert_eq!(reply, Some(0x06), "TTL expired / timeout");
        assert!(started.elapsed() < Duration::from_secs(8));
    }
    world.assert_no_leaks(&baseline, &[&agent]).await;

    // Black hole: connected, the request vanishes; the idle timeout resets both sides.
    let mut s = socks_connect(world.socks, AGENT, &token, Dest::Ip(hole_addr))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let outcome = within("the idle timeout", s.read(&mut buf)).await;
    match outcome {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes (0 = clean EOF)"),
    }
    assert_eq!(
        within("the destination to be reset", hole_rx.recv()).await,
        Some("reset"),
        "the destination must see a reset too"
    );
    assert_eq!(world.hub.metrics().cap_refusals("stream_idle_timeout"), 1);
    drop(s);
    world.assert_no_leaks(&baseline, &[&agent]).await;
    hole_task.abort();
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_address_change_mid_transfer_keeps_the_session() {
    let _serial = SERIAL.lock().await;
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let agent = world.connect_agent(TENANT, AGENT, &token, 1).await;
    let http = http_server().await;
    let before = world.hub.registry().infos(None);
    assert_eq!(before.len(), 1);
    let baseline = world.footprint(&[&agent]);

    let len: u64 = 48 << 20;
    let mut s = socks_connect(world.socks, AGENT, &token, Dest::Ip(http))
        .await
        .unwrap();
    s.write_all(format!("GET /bytes/{len} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut hasher = Sha256::new();
    let first = read_head(&mut s).await;
    let mut got = first.len() as u64;
    hasher.update(&first);
    let mut buf = vec![0u8; 256 * 1024];
    let mut rebound = None;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        got += n as u64;
        if rebound.is_none() && got > len / 4 {
            // Mid-transfer: the agent's UDP socket moves to a new port.
            rebound = Some(agent.handle.rebind().unwrap());
        }
    }
    let sha: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, len);
    assert_eq!(sha, pattern_sha256(len));
    let new_local = rebound.expect("rebound mid-transfer");
    assert_eq!(new_local.len(), 1);

    // Same session (no new handshake), now seen from the new port.
    let moved = eventually_some("the hub to see the new address", async || {
        let after = world.hub.registry().infos(None);
        (after.len() == 1 && after[0].remote_address.port() == new_local[0].port()).then_some(after)
    })
    .await;
    assert_eq!(moved[0].session_id, before[0].session_id);
    assert_ne!(moved[0].remote_address, before[0].remote_address);
    assert_eq!(agent.handle.status().sessions_total, 1);
    println!(
        "migrated {} -> {} within session {}",
        before[0].remote_address, moved[0].remote_address, moved[0].session_id
    );
    drop(s);
    // The old socket is gone: one fd closed, one opened.
    world.assert_no_leaks(&baseline, &[&agent]).await;
    agent.stop().await;
    world.stop().await;
}
