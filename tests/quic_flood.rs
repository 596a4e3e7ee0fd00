//! A flood of QUIC Initials from many sources that never answer (what spoofed sources look
//! like): a new agent still connects within seconds, an established agent keeps its session,
//! SOCKS keeps answering, and the hub sends those sources no more bytes than it gets from them.

mod common;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Distinct Initials captured from a real QUIC client (each its own connection ID and
/// ClientHello); the flood replays them from many sources.
const INITIALS: usize = 1500;
/// Sources of the flood: 127.0.0.2 … 127.0.0.201, one UDP socket each.
const SOURCES: u8 = 200;
/// Initials per second the flood sends: about a hundred times the 26 per second that used
/// to hold every handshake slot.
const RATE: u64 = 2500;

/// Starts `n` QUIC connections towards a plain UDP socket and keeps the first datagram of
/// each: a real, padded Initial carrying a ClientHello, never followed by anything.
async fn capture_initials(world: &World, n: usize) -> Vec<Vec<u8>> {
    let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = sink.local_addr().unwrap();
    let cert = world.ca.issue_agent("flooder").unwrap();
    let tls =
        rna::transport::ClientTls::from_pem(&world.ca.cert_pem(), &cert.cert_pem, &cert.key_pem)
            .unwrap();
    let endpoint =
        rna::transport::agent_endpoint(to, &tls, &rna::transport::Limits::default()).unwrap();
    let mut seen = HashSet::new();
    let mut initials = Vec::with_capacity(n);
    let mut connecting = Vec::with_capacity(n);
    let mut buf = vec![0u8; 65_536];
    while initials.len() < n {
        connecting.push(endpoint.connect(to, "localhost").unwrap());
        loop {
            let (len, _) = within("a client Initial", sink.recv_from(&mut buf))
                .await
                .unwrap();
            let d = &buf[..len];
            // RFC 9000 §17.2.2: long header with type Initial (header protection hides only
            // the low four bits), padded to at least 1200 bytes (§14.1).
            if len < 1200 || d[0] & 0xf0 != 0xc0 {
                continue;
            }
            let dcid_len = d[5] as usize;
            // A retransmission repeats its connection ID; only new ones count.
            if seen.insert(d[6..6 + dcid_len].to_vec()) {
                initials.push(d.to_vec());
                break;
            }
        }
    }
    drop(connecting);
    endpoint.close(0u32.into(), b"");
    initials
}

/// Replays Initials towards the hub from many sources, counting bytes both ways; nothing
/// the hub sends is ever answered, as with a spoofed source address.
struct Flood {
    sent_bytes: Arc<AtomicU64>,
    sent_packets: Arc<AtomicU64>,
    received_bytes: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    started: Instant,
}

impl Flood {
    async fn start(hub: SocketAddr, initials: Vec<Vec<u8>>) -> Flood {
        let mut sockets = Vec::new();
        for i in 0..SOURCES {
            let source = Ipv4Addr::new(127, 0, 0, 2 + i);
            sockets.push(Arc::new(UdpSocket::bind((source, 0)).await.unwrap()));
        }
        let flood = Flood {
            sent_bytes: Arc::default(),
            sent_packets: Arc::default(),
            received_bytes: Arc::default(),
            stop: CancellationToken::new(),
            tasks: JoinSet::new(),
            started: Instant::now(),
        };
        let mut flood = flood;
        for socket in &sockets {
            let (socket, stop, received) = (
                socket.clone(),
                flood.stop.clone(),
                flood.received_bytes.clone(),
            );
            flood.tasks.spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        r = socket.recv_from(&mut buf) => if let Ok((n, _)) = r {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        },
                    }
                }
            });
        }
        let (stop, sent_bytes, sent_packets) = (
            flood.stop.clone(),
            flood.sent_bytes.clone(),
            flood.sent_packets.clone(),
        );
        flood.tasks.spawn(async move {
            // 100 ticks per second; a late tick catches up, so the rate holds on average.
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let per_tick = RATE / 100;
            let mut i = 0usize;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        for _ in 0..per_tick {
                            let initial = &initials[i % initials.len()];
                            let socket = &sockets[i % sockets.len()];
                            i += 1;
                            if socket.send_to(initial, hub).await.is_ok() {
                                sent_bytes.fetch_add(initial.len() as u64, Ordering::Relaxed);
                                sent_packets.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        });
        flood
    }

    fn packets(&self) -> u64 {
        self.sent_packets.load(Ordering::Relaxed)
    }

    /// Stops the flood: (packets sent, bytes sent, bytes received, seconds).
    async fn stop(mut self) -> (u64, u64, u64, f64) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        (
            self.sent_packets.load(Ordering::Relaxed),
            self.sent_bytes.load(Ordering::Relaxed),
            self.received_bytes.load(Ordering::Relaxed),
            seconds,
        )
    }
}

/// One small HTTP exchange through `agent`'s tunnel.
async fn fetch(socks: SocketAddr, agent: &str, token: &str, http: SocketAddr) -> Vec<u8> {
    let mut s = socks_connect(socks, agent, token, Dest::Ip(http))
        .await
        .expect("SOCKS connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_initial_flood_from_many_sources_locks_no_agent_out() {
    let world = World::start().await;
    let acme = world.agent_token("acme/prod");
    let established = world.connect_agent("acme/prod", "edge", &acme, 1).await;
    let http = http_server().await;
    let session_before: Vec<u64> = world
        .hub
        .registry()
        .sessions()
        .iter()
        .map(|s| s.id)
        .collect();

    let initials = capture_initials(&world, INITIALS).await;
    let flood = Flood::start(world.quic, initials).await;
    // A second of flood first: enough to fill every handshake slot many times over if Initials
    // from unvalidated sources were all accepted.
    within("a second of flood", async {
        while flood.packets() < RATE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A new agent of another tenant starts during the flood.
    let globex = world.agent_token("globex/prod");
    let started = Instant::now();
    let fresh = world.spawn_agent(world.agent_config("fresh", &globex));
    world.wait_sessions("globex/prod", "fresh", 1).await;
    let took = started.elapsed();

    // SOCKS answers for both tenants while the flood goes on.
    let hello = b"hello from the private network\n";
    assert!(
        within("SOCKS via edge", fetch(world.socks, "edge", &acme, http))
            .await
            .ends_with(hello)
    );
    assert!(within(
        "SOCKS via fresh",
        fetch(world.socks, "fresh", &globex, http)
    )
    .await
    .ends_with(hello));
    let in_flood = flood.packets();
    let (packets, sent, received, seconds) = flood.stop().await;

    let rate = packets as f64 / seconds;
    let amplification = received as f64 / sent as f64;
    eprintln!(
        "flood: {packets} Initials ({sent} bytes) from {SOURCES} sources in {seconds:.1} s \
         ({rate:.0}/s); hub answered {received} bytes (factor {amplification:.3}); new agent \
         connected after {:.2} s, {in_flood} Initials into the flood",
        took.as_secs_f64()
    );
    assert!(
        rate >= RATE as f64 / 3.0,
        "the flood must really run: {rate:.0}/s"
    );
    assert!(received > 0, "the hub must have seen the flood");
    let retries = world.hub.metrics().quic_retries();
    eprintln!("retries: {retries}");
    assert!(
        retries >= packets / 2,
        "most of the flood must have been answered with a Retry: {retries} of {packets}"
    );
    assert!(
        took < Duration::from_secs(6),
        "a new agent took {took:?} to connect during the flood"
    );
    assert!(
        amplification <= 1.0,
        "the hub sent unvalidated sources {received} bytes for {sent}"
    );
    // The established agent kept its one session throughout.
    let session_after: Vec<u64> = world
        .hub
        .registry()
        .sessions()
        .iter()
        .filter(|s| s.name == "edge")
        .map(|s| s.id)
        .collect();
    assert!(
        session_before.iter().eq(session_after.iter()),
        "{session_before:?} {session_after:?}"
    );
    assert_eq!(established.handle.status().sessions_total, 1);
    fresh.stop().await;
    established.stop().await;
    world.stop().await;
}
