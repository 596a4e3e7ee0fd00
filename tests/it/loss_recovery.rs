//! QUIC loss recovery with rna's transport settings: a lost packet that nothing follows (the
//! `Open` header of a new tunnel stream, the last packet of a small request) is resent after
//! the sender's probe timeout, which waits the peer's `max_ack_delay` on top of the round
//! trip. rna asks for 2 ms instead of QUIC's default 25 ms (docs/decisions.md); this is what
//! keeps H1's small requests quick under loss (docs/performance.md). And a close made while
//! the congestion window is full (ACKs lost, data pending) still reaches the peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rna::certs::Ca;
use rna::transport::{self as transport, ClientTls, EndpointKey, Limits, ServerTls};
use tokio::net::UdpSocket;

/// Generous: the machine running the tests is shared and loaded.
const BOUND: Duration = Duration::from_secs(60);

/// The message the hub sends on each new stream: bigger than any ACK or PING packet, so the
/// relay can tell the packet carrying it from the others.
const MESSAGE: usize = 1000;

/// A UDP relay between the agent and the hub that drops the next hub → agent datagram
/// larger than [`MESSAGE`] bytes when armed, and every agent → hub datagram while `cut_up`.
struct Relay {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    cut_up: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(hub: SocketAddr) -> Relay {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(hub).await.unwrap();
    let addr = front.local_addr().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let cut_up = Arc::new(AtomicBool::new(false));
    let (a, d, c) = (armed.clone(), dropped.clone(), cut_up.clone());
    let task = tokio::spawn(async move {
        let mut agent = None;
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut up) => {
                    let Ok((n, from)) = r else { return };
                    agent = Some(from);
                    if !c.load(Ordering::SeqCst) {
                        let _ = back.send(&up[..n]).await;
                    }
                }
                r = back.recv(&mut down) => {
                    let Ok(n) = r else { continue };
                    if n > MESSAGE && a.swap(false, Ordering::SeqCst) {
                        d.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    if let Some(to) = agent {
                        let _ = front.send_to(&down[..n], to).await;
                    }
                }
            }
        }
    });
    Relay {
        addr,
        armed,
        dropped,
        cut_up,
        task,
    }
}

/// A hub endpoint and an agent connected to it through a [`Relay`]: the relay, the hub's
/// endpoint, the agent's connection and the hub's.
async fn relayed_pair() -> (Relay, quinn::Endpoint, quinn::Connection, quinn::Connection) {
    transport::tls::install_provider();
    let ca = Ca::generate("rna test CA").unwrap();
    let hub_cert = ca.issue_hub(&["localhost".to_string()]).unwrap();
    let agent_cert = ca.issue_agent("edge-1").unwrap();
    let hub_tls =
        ServerTls::from_pem(&ca.cert_pem(), &hub_cert.cert_pem, &hub_cert.key_pem).unwrap();
    let agent_tls =
        ClientTls::from_pem(&ca.cert_pem(), &agent_cert.cert_pem, &agent_cert.key_pem).unwrap();
    let limits = Limits::default();

    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let hub =
        transport::hub_endpoint(any, &hub_tls, &limits, &EndpointKey::random().unwrap()).unwrap();
    let link = relay(hub.local_addr().unwrap()).await;
    let accepted = tokio::spawn({
        let hub = hub.clone();
        async move { hub.accept().await.expect("an incoming connection").await }
    });
    let agent = transport::agent_endpoint(link.addr, &agent_tls, &limits).unwrap();
    let to_hub = tokio::time::timeout(BOUND, agent.connect(link.addr, "localhost").unwrap())
        .await
        .expect("handshake in time")
        .expect("handshake");
    let to_agent = accepted.await.unwrap().expect("hub side of the handshake");
    (link, hub, to_hub, to_agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lone_packet_is_resent_within_a_few_milliseconds() {
    let (link, hub, to_hub, to_agent) = relayed_pair().await;

    // The agent reads each stream's message and reports when it had all of it.
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((_send, mut recv)) = to_hub.accept_bi().await {
            let mut buf = vec![0u8; MESSAGE];
            if recv.read_exact(&mut buf).await.is_ok() {
                let _ = got_tx.send(Instant::now());
            }
        }
    });
    let one = |lose: bool| {
        let to_agent = to_agent.clone();
        let armed = link.armed.clone();
        async move {
            let (mut send, _recv) = to_agent.open_bi().await.unwrap();
            armed.store(lose, Ordering::SeqCst);
            let sent = Instant::now();
            send.write_all(&[7u8; MESSAGE]).await.unwrap();
            sent
        }
    };

    // Round-trip samples first, so the probe timeout rests on a settled RTT estimate.
    for _ in 0..30 {
        let sent = one(false).await;
        let got = tokio::time::timeout(BOUND, got_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(got >= sent);
    }
    // Then streams whose one data packet is lost: only the probe timeout resends it.
    let mut took = Vec::new();
    for trial in 1..=7u64 {
        let sent = one(true).await;
        let got = tokio::time::timeout(BOUND, got_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            link.dropped.load(Ordering::SeqCst),
            trial,
            "the packet was dropped"
        );
        took.push(got - sent);
    }
    took.sort();
    let median = took[took.len() / 2];
    eprintln!("lost packet delivered after {took:?}");
    // With QUIC's default max_ack_delay the probe timeout alone is 25 ms + RTT + 4 × RTT
    // variance, so no trial could take less than 25 ms; with rna's 2 ms it is a few ms.
    assert!(
        median < Duration::from_millis(20),
        "a lost packet took {median:?} (median of {took:?}) to be resent and delivered"
    );
    to_agent.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(5), hub.wait_idle()).await;
}

/// quinn-proto 0.11.19 held a CONNECTION_CLOSE back for good when the congestion window was
/// full and stream data was still pending: a closed connection takes no more ACKs, so the
/// window never drained, and the peer learned of the close only from a stateless reset or its
/// idle timeout, never the code (a revocation, a refused renewal). vendor/quinn-proto carries
/// upstream's fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_made_while_the_congestion_window_is_full_reaches_the_peer() {
    let (link, hub, to_hub, to_agent) = relayed_pair().await;
    // The agent reads whatever comes and counts it.
    let received = Arc::new(AtomicU64::new(0));
    let (got_some_tx, mut got_some) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn({
        let (to_hub, received) = (to_hub.clone(), received.clone());
        async move {
            let Ok((_send, mut recv)) = to_hub.accept_bi().await else {
                return;
            };
            let mut buf = vec![0u8; 65536];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                if received.fetch_add(n as u64, Ordering::SeqCst) == 0 {
                    let _ = got_some_tx.send(());
                }
            }
        }
    });
    // No ACK reaches the hub from now on: it sends one window of a bulk write and holds the
    // rest pending.
    link.cut_up.store(true, Ordering::SeqCst);
    let writer = tokio::spawn({
        let to_agent = to_agent.clone();
        async move {
            let (mut send, _recv) = to_agent.open_bi().await.unwrap();
            let _ = send.write_all(&vec![7u8; 4 << 20]).await;
        }
    });
    tokio::time::timeout(BOUND, got_some.recv())
        .await
        .expect("the first window in time");
    let cwnd = to_agent.stats().path.cwnd;
    let first_window = received.load(Ordering::SeqCst);
    eprintln!("hub window {cwnd} B, agent received {first_window} B before the close");

    to_agent.close(0x13u32.into(), b"re-authentication refused");
    let end = tokio::time::timeout(Duration::from_secs(5), to_hub.closed())
        .await
        .expect("the agent learns of the close within 5 s, not at its idle timeout");
    assert!(
        matches!(&end, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(0x13)
                && c.reason.as_ref() == b"re-authentication refused"),
        "{end:?}"
    );
    writer.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), hub.wait_idle()).await;
}
