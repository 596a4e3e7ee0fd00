//! The session abstraction behaves the same on QUIC and on TLS/TCP: every test body below runs
//! once per transport, over real sockets on loopback with certificates made here.

use std::net::SocketAddr;
use std::time::Duration;

use rna::certs::Ca;
use rna::transport::session::{Session, SessionEnd, StreamError, TransportKind};
use rna::transport::tcp::{self, TcpServer};
use rna::transport::{self as transport, ClientTls, EndpointKey, Limits, ServerTls};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

const BOTH: [TransportKind; 2] = [TransportKind::Quic, TransportKind::Tcp];

/// Generous: the machine running the tests is shared and loaded.
const BOUND: Duration = Duration::from_secs(120);

/// A hub and an agent with certificates from one CA, and a second CA's agent certificate.
struct Certs {
    hub: ServerTls,
    agent: ClientTls,
    stranger: ClientTls,
}

fn certs() -> Certs {
    transport::tls::install_provider();
    let ca = Ca::generate("rna test CA").unwrap();
    let hub = ca.issue_hub(&["localhost".to_string()]).unwrap();
    let agent = ca.issue_agent("edge-1").unwrap();
    let other = Ca::generate("another CA").unwrap();
    let stranger = other.issue_agent("edge-1").unwrap();
    Certs {
        hub: ServerTls::from_pem(&ca.cert_pem(), &hub.cert_pem, &hub.key_pem).unwrap(),
        agent: ClientTls::from_pem(&ca.cert_pem(), &agent.cert_pem, &agent.key_pem).unwrap(),
        stranger: ClientTls::from_pem(&ca.cert_pem(), &stranger.cert_pem, &stranger.key_pem)
            .unwrap(),
    }
}

/// What the hub side's handshake and the agent side's connect gave.
struct Attempt {
    hub: Result<Session, String>,
    agent: Result<Session, String>,
}

/// Brings up a hub on 127.0.0.1:0 over `kind` and connects an agent with `agent_tls`.
async fn attempt(kind: TransportKind, hub_tls: &ServerTls, agent_tls: &ClientTls) -> Attempt {
    let limits = Limits::default();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    match kind {
        TransportKind::Quic => {
            let key = EndpointKey::random().unwrap();
            let hub = transport::hub_endpoint(any, hub_tls, &limits, &key).unwrap();
            let addr = hub.local_addr().unwrap();
            let accepted = tokio::spawn(async move {
                let incoming = hub.accept().await.ok_or("endpoint closed")?;
                let connection = incoming.await.map_err(|e| e.to_string())?;
                // The endpoint must outlive the connection.
                Ok::<_, String>((Session::from(connection), hub))
            });
            let agent = transport::agent_endpoint(addr, agent_tls, &limits).unwrap();
            let dialled = match agent.connect(addr, "localhost") {
                Ok(connecting) => connecting.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let hub = accepted.await.unwrap();
            let agent_session = dialled.map(|c| {
                // Keep the agent endpoint alive as long as the test runs.
                std::mem::forget(agent);
                Session::from(c)
            });
            Attempt {
                hub: hub.map(|(s, endpoint)| {
                    std::mem::forget(endpoint);
                    s
                }),
                agent: agent_session,
            }
        }
        TransportKind::Tcp => {
            let listener = TcpListener::bind(any).await.unwrap();
            let server = TcpServer::new(listener, hub_tls, &limits).unwrap();
            let addr = server.local_addr().unwrap();
            let accepted = tokio::spawn(async move {
                let (tcp, remote) = server.accept().await.map_err(|e| e.to_string())?;
                server
                    .handshake(tcp, remote)
                    .await
                    .map(Session::from)
                    .map_err(|e| e.to_string())
            });
            let agent = tcp::connect(addr, "localhost", agent_tls, &limits)
                .await
                .map(Session::from)
                .map_err(|e| e.to_string());
            Attempt {
                hub: accepted.await.unwrap(),
                agent,
            }
        }
    }
}

/// A connected (hub, agent) pair over `kind`.
async fn pair(kind: TransportKind) -> (Session, Session) {
    let c = certs();
    let a = attempt(kind, &c.hub, &c.agent).await;
    let hub = a.hub.unwrap_or_else(|e| panic!("{kind}: hub side: {e}"));
    let agent = a
        .agent
        .unwrap_or_else(|e| panic!("{kind}: agent side: {e}"));
    assert_eq!(hub.transport(), kind);
    assert_eq!(agent.transport(), kind);
    (hub, agent)
}

/// Deterministic bytes that differ at every offset (so a lost or reordered chunk shows).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {BOUND:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flow_both_ways_exactly() {
    for kind in BOTH {
        let (hub, agent) = pair(kind).await;
        let down = pattern(1, 3 * 1024 * 1024 + 17);
        let up = pattern(2, 2 * 1024 * 1024 + 5);
        let (mut send, mut recv) = hub.open_bi().await.unwrap();
        let down2 = down.clone();
        let writer = tokio::spawn(async move {
            send.write_all(&down2).await.unwrap();
            send.finish().unwrap();
            send
        });
        let (mut a_send, mut a_recv) = bounded("accept", agent.accept_bi()).await.unwrap();
        let up2 = up.clone();
        let a_writer = tokio::spawn(async move {
            a_send.write_all(&up2).await.unwrap();
            a_send.finish().unwrap();
            a_send
        });
        let got_down = bounded("agent read", a_recv.read_to_end(64 << 20))
            .await
            .unwrap();
        let got_up = bounded("hub read", recv.read_to_end(64 << 20))
            .await
            .unwrap();
        assert_eq!(sha(&got_down), sha(&down), "{kind}: hub → agent");
        assert_eq!(sha(&got_up), sha(&up), "{kind}: agent → hub");
        let _keep = (writer.await.unwrap(), a_writer.await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_direction_closes_alone() {
    for kind in BOTH {
        let (hub, agent) = pair(kind).await;
        // The hub finishes first; the agent still answers after reading the end.
        let (mut send, mut recv) = hub.open_bi().await.unwrap();
        send.write_all(b"request").await.unwrap();
        send.finish().unwrap();
        let (mut a_send, mut a_recv) = bounded("accept", agent.accept_bi()).await.unwrap();
        let request = bounded("read", a_recv.read_to_end(1024)).await.unwrap();
        assert_eq!(request, b"request", "{kind}");
        a_send.write_all(b"answer after your end").await.unwrap();
        a_send.finish().unwrap();
        let answer = bounded("read", recv.read_to_end(1024)).await.unwrap();
        assert_eq!(answer, b"answer after your end", "{kind}");

        // The agent finishes first; the hub keeps sending, and the agent keeps reading.
        let (mut send, mut recv) = hub.open_bi().await.unwrap();
        send.write_all(b"hello").await.unwrap();
        let (mut a_send, mut a_recv) = bounded("accept", agent.accept_bi()).await.unwrap();
        a_send.finish().unwrap();
        let end = bounded("read", recv.read_to_end(1024)).await.unwrap();
        assert!(
            end.is_empty(),
            "{kind}: the agent sent nothing before its end"
        );
        send.write_all(b" world").await.unwrap();
        send.finish().unwrap();
        let all = bounded("read", a_recv.read_to_end(1024)).await.unwrap();
        assert_eq!(all, b"hello world", "{kind}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_and_stop_carry_their_codes() {
    for kind in BOTH {
        let (hub, agent) = pair(kind).await;
        // Reset: the reader sees the writer's code.
        let (mut send, _recv) = hub.open_bi().await.unwrap();
        send.write_all(b"partial").await.unwrap();
        let (_a_send, mut a_recv) = bounded("accept", agent.accept_bi()).await.unwrap();
        let mut buf = [0u8; 7];
        let n = bounded("read", a_recv.read(&mut buf)).await.unwrap();
        assert_eq!(n, Some(7), "{kind}");
        send.reset(0x100);
        let err = bounded("read", a_recv.read_to_end(1024)).await.unwrap_err();
        assert_eq!(err, StreamError::Reset(0x100), "{kind}");

        // Stop: the writer sees the reader's code.
        let (mut send, _recv) = hub.open_bi().await.unwrap();
        send.write_all(b"x").await.unwrap();
        let (_a_send, mut a_recv) = bounded("accept", agent.accept_bi()).await.unwrap();
        a_recv.stop(0x101);
        let code = bounded("stopped", send.stopped()).await.unwrap();
        assert_eq!(code, Some(0x101), "{kind}");
        let err = bounded("write", async {
            loop {
                if let Err(e) = send.write_all(&[0u8; 1024]).await {
                    return e;
                }
            }
        })
        .await;
        assert_eq!(err, StreamError::Stopped(0x101), "{kind}");
    }
}

/// MTU discovery probes the configured bound first: on loopback, which carries it, each side
/// reaches the bound (6550 bytes) with one probe, where quinn's binary search from 1200 bytes
/// sends about ten, each acknowledged, on both sides of every new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_carries_the_mtu_bound_is_found_with_one_probe() {
    let (hub, agent) = pair(TransportKind::Quic).await;
    let bound = Limits::default().max_udp_payload;
    for (side, session) in [("hub", &hub), ("agent", &agent)] {
        let path = bounded("the path MTU to reach the bound", async {
            loop {
                let path = session.path().expect("QUIC has path facts");
                if path.mtu >= bound {
                    return path;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(path.mtu, bound, "{side}");
        assert_eq!(path.mtu_probes, 1, "{side}: {path:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_close_carries_its_code() {
    for kind in BOTH {
        let (hub, agent) = pair(kind).await;
        assert_eq!(hub.close_reason(), None, "{kind}");
        assert!(
            agent.peer_certificates().is_some_and(|c| !c.is_empty()),
            "{kind}"
        );
        assert!(
            hub.peer_certificates().is_some_and(|c| !c.is_empty()),
            "{kind}"
        );
        assert!(hub.remote_address().ip().is_loopback(), "{kind}");
        let (_send, mut a_recv) = {
            let (mut send, recv) = hub.open_bi().await.unwrap();
            send.write_all(b"x").await.unwrap();
            let (_a_send, a_recv) = bounded("accept", agent.accept_bi()).await.unwrap();
            ((send, recv), a_recv)
        };
        hub.close(0x11, "token revoked");
        let end = bounded("agent sees the close", agent.closed()).await;
        assert_eq!(
            end,
            SessionEnd::ClosedByPeer {
                code: 0x11,
                reason: "token revoked".into()
            },
            "{kind}"
        );
        assert_eq!(
            bounded("hub", hub.closed()).await,
            SessionEnd::ClosedHere,
            "{kind}"
        );
        // A stream open at the close fails with the session's end, not a clean EOF.
        let mut buf = [0u8; 16];
        let mut read = Ok(Some(0));
        while let Ok(Some(_)) = read {
            read = bounded("read", a_recv.read(&mut buf)).await;
        }
        assert!(
            matches!(
                read,
                Err(StreamError::Session(SessionEnd::ClosedByPeer {
                    code: 0x11,
                    ..
                }))
            ),
            "{kind}: {read:?}"
        );
        assert!(agent.close_reason().is_some(), "{kind}");
    }
}

/// The hub opens 10,000 tunnel streams towards an agent that writes nothing on them (what
/// the hub does for every proxied connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hub_opened_streams() {
    const STREAMS: usize = 10_000;
    for kind in BOTH {
        let (hub, agent) = pair(kind).await;
        let acceptor = tokio::spawn(async move {
            let mut open = Vec::with_capacity(STREAMS);
            for _ in 0..STREAMS {
                let (send, mut recv) = agent.accept_bi().await.unwrap();
                let mut b = [0u8; 1];
                assert_eq!(recv.read(&mut b).await.unwrap(), Some(1));
                open.push((send, recv));
            }
            (open, agent)
        });
        let started = std::time::Instant::now();
        let mut open = Vec::with_capacity(STREAMS);
        for i in 0..STREAMS {
            let (mut send, recv) = bounded("open", hub.open_bi())
                .await
                .unwrap_or_else(|e| panic!("{kind}: stream {i}: {e}"));
            bounded("write", send.write_all(b"o")).await.unwrap();
            open.push((send, recv));
        }
        let (accepted, _agent) = bounded("accept all", acceptor).await.unwrap();
        assert_eq!(accepted.len(), STREAMS, "{kind}");
        eprintln!(
            "{kind}: {STREAMS} hub-opened streams open at once after {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let c = certs();
    for kind in BOTH {
        let a = attempt(kind, &c.hub, &c.stranger).await;
        let hub_err = a
            .hub
            .err()
            .unwrap_or_else(|| panic!("{kind}: the hub accepted"));
        assert!(
            hub_err.contains("UnknownIssuer") || hub_err.contains("BadSignature"),
            "{kind}: {hub_err}"
        );
        // In TLS 1.3 the client may finish its half before the hub's verdict arrives; then
        // the session ends at once instead of failing to connect.
        if let Ok(session) = a.agent {
            let end = bounded("agent sees the refusal", session.closed()).await;
            assert!(matches!(end, SessionEnd::Failed(_)), "{kind}: {end:?}");
        }
        // The hub keeps serving good agents.
        let ok = attempt(kind, &c.hub, &c.agent).await;
        assert!(ok.hub.is_ok() && ok.agent.is_ok(), "{kind}");
    }
}

/// One stream whose reader stalls must not hold up another stream of the same session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_stall_another_stream() {
    for kind in BOTH {
        let (hub, agent) = pair(kind).await;
        let (mut stalled, _r1) = hub.open_bi().await.unwrap();
        stalled.write_all(b"s").await.unwrap();
        let (_s1, _never_read) = bounded("accept", agent.accept_bi()).await.unwrap();
        // Far more than the stream window: this writer blocks once the window is full.
        let blocked = tokio::spawn(async move {
            let chunk = vec![0u8; 256 * 1024];
            loop {
                if stalled.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let (mut send, _r2) = hub.open_bi().await.unwrap();
        let data = pattern(3, 16 * 1024 * 1024);
        let data2 = data.clone();
        let writer = tokio::spawn(async move {
            send.write_all(&data2).await.unwrap();
            send.finish().unwrap();
            send
        });
        let (_s2, mut r2) = bounded("accept", agent.accept_bi()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(60), r2.read_to_end(64 << 20))
            .await
            .unwrap_or_else(|_| panic!("{kind}: the second stream stalled behind the first"))
            .unwrap();
        assert_eq!(sha(&got), sha(&data), "{kind}");
        assert!(
            !blocked.is_finished(),
            "{kind}: the stalled writer should still wait"
        );
        blocked.abort();
        let _ = writer.await;
    }
}

/// A TCP peer that never starts TLS, or speaks something else, costs the hub one bounded
/// handshake and a precise error; the listener goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_handshakes_are_bounded_and_refuse_non_tls() {
    use tokio::io::AsyncWriteExt;
    let c = certs();
    let limits = Limits {
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TcpServer::new(listener, &c.hub, &limits).unwrap();
    let addr = server.local_addr().unwrap();

    // Silent after connecting: the deadline ends it.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (tcp, remote) = server.accept().await.unwrap();
    let started = std::time::Instant::now();
    let err = bounded("silent", server.handshake(tcp, remote))
        .await
        .unwrap_err();
    assert!(
        matches!(err, tcp::TcpError::Timeout { .. }),
        "{err:?} after {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("not done within 500ms"), "{err}");

    // Plain HTTP instead of TLS: a TLS error at once, not a wait.
    let mut http = tokio::net::TcpStream::connect(addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await
        .unwrap();
    let (tcp, remote) = server.accept().await.unwrap();
    let err = bounded("http", server.handshake(tcp, remote))
        .await
        .unwrap_err();
    assert!(matches!(err, tcp::TcpError::Tls { .. }), "{err:?}");

    // A real agent is still served.
    let accepted = tokio::spawn(async move {
        let (tcp, remote) = server.accept().await.unwrap();
        server.handshake(tcp, remote).await.map(Session::from)
    });
    let agent = tcp::connect(addr, "localhost", &c.agent, &limits)
        .await
        .unwrap();
    let hub = accepted.await.unwrap().unwrap();
    assert_eq!(Session::from(agent).transport().as_str(), "tcp");
    assert_eq!(hub.transport().as_str(), "tcp");
}

/// Both transports report a round-trip time, an activity counter, stream numbers and their
/// name, for logs, heartbeats and metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_report_rtt_activity_stream_ids_and_transport_name() {
    for kind in BOTH {
        let (hub, agent) = pair(kind).await;
        let (mut send, _recv) = hub.open_bi().await.unwrap();
        send.write_all(b"x").await.unwrap();
        let _accepted = bounded("accept", agent.accept_bi()).await.unwrap();
        // Streams are numbered apart; data that arrives moves the activity counter.
        let (mut second, _r) = hub.open_bi().await.unwrap();
        assert_ne!(send.id(), second.id(), "{kind}");
        let before = agent.activity();
        second.write_all(b"more").await.unwrap();
        let (_s, mut r) = bounded("accept", agent.accept_bi()).await.unwrap();
        let mut buf = [0u8; 4];
        bounded("read", r.read(&mut buf)).await.unwrap();
        assert!(agent.activity() > before, "{kind}");
        assert_eq!(hub.path().is_some(), kind == TransportKind::Quic, "{kind}");
        for side in [&hub, &agent] {
            let rtt = side.rtt().unwrap_or_else(|| panic!("{kind}: no RTT"));
            assert!(rtt < Duration::from_secs(5), "{kind}: {rtt:?}");
            assert_eq!(side.transport().as_str(), kind.to_string());
        }
        assert_eq!(TransportKind::Quic.as_str(), "quic");
        assert_eq!(TransportKind::Tcp.as_str(), "tcp");
    }
}

/// The TCP connection under a session vanishing mid-transfer (the peer killed, a middlebox
/// dropping it) fails the open streams: a reader never takes it for a clean end of stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_tcp_connection_fails_streams_never_a_clean_end() {
    let c = certs();
    let limits = Limits::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TcpServer::new(listener, &c.hub, &limits).unwrap();
    let hub_addr = server.local_addr().unwrap();
    // A TCP relay between agent and hub that the test can cut: both its sockets close, as
    // when the agent's process is killed.
    let middle = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let middle_addr = middle.local_addr().unwrap();
    let relay = tokio::spawn(async move {
        let (mut from_agent, _) = middle.accept().await.unwrap();
        let mut to_hub = tokio::net::TcpStream::connect(hub_addr).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut from_agent, &mut to_hub).await;
    });
    let accepted = tokio::spawn(async move {
        let (tcp, remote) = server.accept().await.unwrap();
        server.handshake(tcp, remote).await.map(Session::from)
    });
    let agent = Session::from(
        tcp::connect(middle_addr, "localhost", &c.agent, &limits)
            .await
            .unwrap(),
    );
    let hub = accepted.await.unwrap().unwrap();

    // The agent sends part of an answer on a hub-opened stream, then its connection is gone.
    let (mut send, mut recv) = hub.open_bi().await.unwrap();
    send.write_all(b"open").await.unwrap();
    let (mut a_send, _a_recv) = bounded("accept", agent.accept_bi()).await.unwrap();
    a_send.write_all(&[1u8; 100_000]).await.unwrap();
    let mut first = [0u8; 1];
    bounded("read", recv.read(&mut first)).await.unwrap();
    relay.abort();
    let _ = relay.await;

    let outcome = bounded("hub read", recv.read_to_end(1 << 20)).await;
    assert!(
        matches!(outcome, Err(StreamError::Session(SessionEnd::Failed(_)))),
        "a cut connection must fail the stream: {outcome:?}"
    );
    assert!(
        matches!(bounded("hub", hub.closed()).await, SessionEnd::Failed(_)),
        "the hub's session ends as failed"
    );
    drop((a_send, agent));
}

/// Dropping a send half finishes it, as quinn does, on both transports: code written for one
/// behaves the same on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_send_half_finishes_it() {
    for kind in BOTH {
        let (hub, agent) = pair(kind).await;
        let (mut send, _recv) = hub.open_bi().await.unwrap();
        send.write_all(b"last words").await.unwrap();
        drop(send);
        let (_a_send, mut a_recv) = bounded("accept", agent.accept_bi()).await.unwrap();
        let got = bounded("read", a_recv.read_to_end(1024)).await;
        assert_eq!(got, Ok(b"last words".to_vec()), "{kind}");
    }
}

/// Keep-alive and idle timeout on TCP: a quiet but healthy session outlives several idle
/// timeouts (the keep-alive pings keep it open); a session whose peer goes silent (a relay in
/// between stops forwarding, the TCP connection stays up) ends as timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_keep_alive_holds_a_quiet_session_and_silence_times_out() {
    let c = certs();
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TcpServer::new(listener, &c.hub, &limits).unwrap();
    let hub_addr = server.local_addr().unwrap();
    let middle = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let middle_addr = middle.local_addr().unwrap();
    let (freeze, frozen) = tokio::sync::oneshot::channel::<()>();
    let _relay = tokio::spawn(async move {
        let (mut from_agent, _) = middle.accept().await.unwrap();
        let mut to_hub = tokio::net::TcpStream::connect(hub_addr).await.unwrap();
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut from_agent, &mut to_hub) => {}
            _ = frozen => {}
        }
        // Frozen: both connections stay open, nothing is forwarded any more.
        std::future::pending::<()>().await;
        drop((from_agent, to_hub));
    });
    let accepted = tokio::spawn(async move {
        let (tcp, remote) = server.accept().await.unwrap();
        server.handshake(tcp, remote).await.map(Session::from)
    });
    let agent = Session::from(
        tcp::connect(middle_addr, "localhost", &c.agent, &limits)
            .await
            .unwrap(),
    );
    let hub = accepted.await.unwrap().unwrap();

    // Quiet for three idle timeouts: neither side may end the session.
    let quiet = tokio::time::timeout(Duration::from_secs(3), hub.closed()).await;
    assert!(quiet.is_err(), "a quiet session ended: {quiet:?}");
    assert_eq!(agent.close_reason(), None);

    freeze.send(()).unwrap();
    let end = bounded("hub notices the silence", hub.closed()).await;
    assert_eq!(end, SessionEnd::TimedOut);
    let end = bounded("agent notices the silence", agent.closed()).await;
    assert_eq!(end, SessionEnd::TimedOut);
}

/// TCP handshakes in progress are capped like QUIC's (`max_incoming`): past the cap a
/// connection is refused before any TLS work, and a slot frees when a handshake ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_handshakes_in_progress_are_capped() {
    let c = certs();
    let limits = Limits {
        max_incoming: 2,
        handshake_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = std::sync::Arc::new(TcpServer::new(listener, &c.hub, &limits).unwrap());
    let addr = server.local_addr().unwrap();
    let mut silent = Vec::new();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut pending = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (tcp, remote) = server.accept().await.unwrap();
        let server = server.clone();
        let started = started_tx.clone();
        pending.push(tokio::spawn(async move {
            let handshake = server.handshake(tcp, remote);
            tokio::pin!(handshake);
            // Poll once so the slot is taken, then say so, then run to the end.
            let first = futures_poll_once(&mut handshake).await;
            started.send(()).unwrap();
            match first {
                Some(r) => r,
                None => handshake.await,
            }
        }));
    }
    for _ in 0..2 {
        bounded("slots taken", started_rx.recv()).await.unwrap();
    }
    let third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (tcp, remote) = server.accept().await.unwrap();
    let err = bounded("third", server.handshake(tcp, remote))
        .await
        .unwrap_err();
    assert!(
        matches!(err, tcp::TcpError::Busy { limit: 2, .. }),
        "{err:?}"
    );
    drop(third);
    // The silent ones end at their deadline, and a real agent gets a slot again.
    for p in pending {
        let r = bounded("silent", p).await.unwrap();
        assert!(matches!(r, Err(tcp::TcpError::Timeout { .. })), "{r:?}");
    }
    let accepted = tokio::spawn({
        let server = server.clone();
        async move {
            let (tcp, remote) = server.accept().await.unwrap();
            server.handshake(tcp, remote).await
        }
    });
    tcp::connect(addr, "localhost", &c.agent, &limits)
        .await
        .unwrap();
    bounded("agent", accepted).await.unwrap().unwrap();
    drop(silent);
}

/// Polls a future once: its output if it finished, else `None` (it stays pinned for later).
async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// A stateless reset made outside quinn, from the hub's endpoint key and the connection ID it
/// gave in the handshake, and sent from the hub endpoint's own port (what a restarted hub
/// sends the sessions of its previous run, `hub::recall`), ends the agent's connection with
/// `reset by peer`. One made with another key is ignored: the connection still carries data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_from_the_endpoint_key_and_handshake_id_ends_the_agents_connection() {
    let c = certs();
    let limits = Limits::default();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let key = EndpointKey::random().unwrap();
    let (hub, socket) = transport::hub_endpoint_and_socket(any, &c.hub, &limits, &key).unwrap();
    let addr = hub.local_addr().unwrap();
    let accepted = tokio::spawn({
        let hub = hub.clone();
        async move { hub.accept().await.unwrap().await.unwrap() }
    });
    let agent = transport::agent_endpoint(addr, &c.agent, &limits).unwrap();
    let agent_conn = bounded("connect", agent.connect(addr, "localhost").unwrap())
        .await
        .unwrap();
    let hub_conn = bounded("accept", accepted).await.unwrap();
    let cid = hub_conn.handshake_cid();
    assert_eq!(cid.len(), 12, "hub connection IDs are 12 bytes");
    let to_agent = hub_conn.remote_address();

    // A reset under another key: the agent drops it, and the connection still works.
    let stranger = EndpointKey::random().unwrap().reset_token(&cid);
    socket
        .send_to(&transport::stateless_reset(&stranger).unwrap(), to_agent)
        .unwrap();
    let echo = tokio::spawn(async move {
        let (mut send, mut recv) = hub_conn.accept_bi().await.unwrap();
        let got = recv.read_to_end(64).await.unwrap();
        send.write_all(&got).await.unwrap();
        send.finish().unwrap();
        hub_conn
    });
    let (mut send, mut recv) = agent_conn.open_bi().await.unwrap();
    send.write_all(b"still here").await.unwrap();
    send.finish().unwrap();
    let back = bounded("echo", recv.read_to_end(64)).await.unwrap();
    assert_eq!(back, b"still here");
    let _hub_conn = echo.await.unwrap();

    // The real one ends it at once.
    let token = key.reset_token(&cid);
    let packet = transport::stateless_reset(&token).unwrap();
    assert!(
        packet.len() >= 21 && packet[0] & 0xc0 == 0x40,
        "a short-header datagram"
    );
    socket.send_to(&packet, to_agent).unwrap();
    let end = bounded("the reset", agent_conn.closed()).await;
    assert!(
        matches!(end, quinn::ConnectionError::Reset),
        "ended with {end:?}"
    );
}
