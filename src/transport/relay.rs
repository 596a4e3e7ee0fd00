//! Copies bytes between a TCP connection and a session stream (QUIC or the TCP fallback),
//! both ways, keeping half-close and turning errors into resets.
//!
//! A FIN on either side becomes a stream finish (or a TCP `shutdown(Write)`), and the other
//! direction keeps flowing until it ends too. An error or reset on either side aborts both
//! directions: the QUIC stream is reset and stopped, and the TCP peer gets an RST (zero linger),
//! never a clean EOF that could pass a truncated transfer off as complete.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::session::{RecvStream, SendStream, StreamError};
use crate::proto::StreamCode;

/// Bytes read from TCP per stream write at most. Large reads keep per-chunk overhead low on
/// bulk transfers.
const TCP_READ_MAX: usize = 64 * 1024;

/// The relay reads from TCP into an arena and hands filled parts to quinn as `Bytes` without
/// copying; a new arena is allocated only when the old one is used up, never per chunk. The
/// first arena is small (most proxied connections carry little), each next one twice the size
/// up to [`ARENA_MAX`], so a bulk transfer allocates about once per 2 MiB.
const ARENA_FIRST: usize = 16 * 1024;

/// Largest arena.
const ARENA_MAX: usize = 2 * 1024 * 1024;

/// A read into less room than this starts a new arena.
const READ_MIN: usize = 4 * 1024;

/// Chunks taken from the QUIC stream per TCP write: quinn hands out one chunk per received
/// frame (about a packet), and writing them to TCP together in one `writev` saves a system
/// call per packet.
const QUIC_CHUNKS: usize = 64;

/// Which way bytes moved, from the point of view of the side running the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// TCP → QUIC stream.
    Sent,
    /// QUIC stream → TCP.
    Received,
}

/// Why a relay ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading from the TCP peer failed (usually a reset).
    #[error("TCP read: {0}")]
    TcpRead(io::Error),
    /// Writing to the TCP peer failed.
    #[error("TCP write: {0}")]
    TcpWrite(io::Error),
    /// The stream's peer stopped reading or the session was lost.
    #[error("stream write: {0}")]
    StreamWrite(StreamError),
    /// The stream's peer reset the stream or the session was lost.
    #[error("stream read: {0}")]
    StreamRead(StreamError),
    /// No byte moved in either direction for this long.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// The relay was told to stop (shutdown grace over).
    #[error("cut off: shutdown grace period over")]
    Cut,
    /// What had to come first on the stream ([`relay_after`]'s `first`) failed: for an early
    /// SOCKS reply, the agent could not connect after all.
    #[error("{0}")]
    First(String),
}

/// How a relay ended.
#[derive(Debug)]
pub struct RelayOutcome {
    /// Bytes moved TCP → stream.
    pub sent: u64,
    /// Bytes moved stream → TCP.
    pub received: u64,
    /// `None` if both directions finished cleanly.
    pub error: Option<RelayError>,
}

/// Relays until both directions have finished, one fails, or `cut` completes (which aborts
/// both directions like an error). `meter` is called for every chunk moved, so live byte
/// counters stay current during long transfers. With `idle`, a relay in which no byte moved
/// either way for that long is aborted the same way (both sides reset), so a destination
/// that black-holes cannot pin a stream forever.
///
/// Cancel-safe in the sense that dropping it drops the TCP connection and the stream (quinn
/// resets an unfinished stream on drop); use [`relay`]'s return value for orderly endings.
pub async fn relay<M>(
    tcp: TcpStream,
    send: SendStream,
    recv: RecvStream,
    idle: Option<Duration>,
    meter: M,
    cut: impl std::future::Future<Output = ()>,
) -> RelayOutcome
where
    M: Fn(Direction, usize),
{
    relay_after(tcp, send, recv, idle, meter, cut, async |_| Ok(())).await
}

/// [`relay`], where the stream → TCP direction first runs `first` on the stream (the TCP →
/// stream direction runs from the start). The hub's early SOCKS reply reads the agent's
/// answer to `Open` this way while the client's first bytes already travel to the agent; an
/// error of `first` aborts both directions like any other ([`RelayError::First`]).
pub async fn relay_after<M>(
    mut tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    idle: Option<Duration>,
    meter: M,
    cut: impl std::future::Future<Output = ()>,
    first: impl AsyncFnOnce(&mut RecvStream) -> Result<(), String>,
) -> RelayOutcome
where
    M: Fn(Direction, usize),
{
    let _ = tcp.set_nodelay(true);
    // Until both directions have finished cleanly, any close of this socket is abortive:
    // if the process is killed mid-transfer, the kernel answers the peer with an RST, never
    // with the FIN that would pass a truncated transfer off as complete.
    let _ = tcp.set_zero_linger();
    let mut sent = 0u64;
    let mut received = 0u64;
    let started = Instant::now();
    // Milliseconds after `started` of the last byte moved; shared by both directions.
    let last_active = AtomicU64::new(0);
    let meter = |direction: Direction, n: usize| {
        let now = started.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        last_active.store(now, Ordering::Relaxed);
        meter(direction, n);
    };
    let idle_limit = idle.unwrap_or(Duration::MAX);
    let error = {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let up = tcp_to_stream(&mut tcp_read, &mut send, &meter, &mut sent);
        let down = async {
            first(&mut recv).await.map_err(RelayError::First)?;
            stream_to_tcp(&mut recv, &mut tcp_write, &meter, &mut received).await
        };
        tokio::pin!(up, down, cut);
        let mut up_done = false;
        let mut down_done = false;
        let check = tokio::time::sleep(idle_limit.min(Duration::from_secs(86_400 * 365)));
        tokio::pin!(check);
        loop {
            tokio::select! {
                () = &mut cut => break Some(RelayError::Cut),
                () = &mut check, if idle.is_some() => {
                    let last = started + Duration::from_millis(last_active.load(Ordering::Relaxed));
                    let quiet = last.elapsed();
                    if quiet >= idle_limit {
                        break Some(RelayError::Idle(quiet));
                    }
                    check.as_mut().reset((last + idle_limit).into());
                    continue;
                }
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(e) => break Some(e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(e) => break Some(e),
                },
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    if error.is_some() {
        // Abort both directions: the peer of the stream sees a reset, the TCP peer an RST.
        send.reset(StreamCode::Reset as u32);
        recv.stop(StreamCode::Reset as u32);
        let _ = tcp.set_zero_linger();
    } else {
        // Both FINs are exchanged: close normally so queued bytes still reach the peer.
        let _ = socket2::SockRef::from(&tcp).set_linger(None);
    }
    drop(tcp);
    RelayOutcome {
        sent,
        received,
        error,
    }
}

async fn tcp_to_stream<M: Fn(Direction, usize)>(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream,
    meter: &M,
    total: &mut u64,
) -> Result<(), RelayError> {
    let mut arena_size = ARENA_FIRST;
    let mut arena = BytesMut::with_capacity(arena_size);
    loop {
        if arena.capacity() - arena.len() < READ_MIN {
            // The old arena's bytes may still be queued in quinn; they keep it alive until
            // sent and acknowledged.
            arena_size = (arena_size * 2).min(ARENA_MAX);
            arena = BytesMut::with_capacity(arena_size);
        }
        let room = (arena.capacity() - arena.len()).min(TCP_READ_MAX);
        let n = {
            let mut limited = (&mut arena).limit(room);
            tcp.read_buf(&mut limited)
                .await
                .map_err(RelayError::TcpRead)?
        };
        if n == 0 {
            // TCP FIN → stream finish; the other direction keeps flowing.
            let _ = send.finish();
            return Ok(());
        }
        let chunk = arena.split().freeze();
        send.write_chunk(chunk)
            .await
            .map_err(RelayError::StreamWrite)?;
        *total += n as u64;
        meter(Direction::Sent, n);
    }
}

async fn stream_to_tcp<M: Fn(Direction, usize)>(
    recv: &mut RecvStream,
    tcp: &mut WriteHalf<'_>,
    meter: &M,
    total: &mut u64,
) -> Result<(), RelayError> {
    let mut chunks: [Bytes; QUIC_CHUNKS] = std::array::from_fn(|_| Bytes::new());
    loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                let moved: usize = chunks[..n].iter().map(Bytes::len).sum();
                write_all_vectored(tcp, &mut chunks[..n])
                    .await
                    .map_err(RelayError::TcpWrite)?;
                *total += moved as u64;
                meter(Direction::Received, moved);
            }
            Ok(None) => {
                // Stream finish → TCP FIN (half-close); the other direction keeps flowing.
                tcp.shutdown().await.map_err(RelayError::TcpWrite)?;
                return Ok(());
            }
            Err(e) => return Err(RelayError::StreamRead(e)),
        }
    }
}

/// Writes every chunk with as few `writev` calls as the socket allows.
async fn write_all_vectored(tcp: &mut WriteHalf<'_>, chunks: &mut [Bytes]) -> io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        let written = {
            let mut slices = [IoSlice::new(&[]); QUIC_CHUNKS];
            let live = &chunks[first..];
            for (slot, chunk) in slices.iter_mut().zip(live) {
                *slot = IoSlice::new(chunk);
            }
            tcp.write_vectored(&slices[..live.len().min(QUIC_CHUNKS)])
                .await?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        first = consume(chunks, first, written);
    }
    Ok(())
}

/// Takes `written` bytes off the front of `chunks[first..]` (a short `writev` may end inside
/// a chunk) and returns the index of the first chunk with bytes left, skipping empty ones.
fn consume(chunks: &mut [Bytes], mut first: usize, mut written: usize) -> usize {
    while written > 0 && first < chunks.len() {
        let len = chunks[first].len();
        if written >= len {
            written -= len;
            first += 1;
        } else {
            chunks[first].advance(written);
            written = 0;
        }
    }
    // Empty chunks (none are expected) are skipped.
    while first < chunks.len() && chunks[first].is_empty() {
        first += 1;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `chunks` after a `writev` of `written` bytes: the index of the next chunk to write
    /// and what is left of every chunk from there.
    fn after(chunks: &[&str], first: usize, written: usize) -> (usize, Vec<String>) {
        let mut chunks: Vec<Bytes> = chunks
            .iter()
            .map(|c| Bytes::copy_from_slice(c.as_bytes()))
            .collect();
        let next = consume(&mut chunks, first, written);
        let left = chunks[next..]
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        (next, left)
    }

    /// A relay running between a QUIC stream on loopback (hub and agent endpoints with
    /// certificates made here) and a TCP connection, and the peers of each.
    struct Pair {
        /// The running relay and its outcome.
        relay: tokio::task::JoinHandle<RelayOutcome>,
        /// The TCP peer.
        tcp_peer: TcpStream,
        /// The stream peer's sending half.
        peer_send: SendStream,
        /// The stream peer's receiving half.
        peer_recv: RecvStream,
        /// Kept so the connection stays open.
        _endpoints: (
            quinn::Endpoint,
            quinn::Endpoint,
            quinn::Connection,
            quinn::Connection,
        ),
    }

    async fn pair() -> Pair {
        use crate::transport::{
            agent_endpoint, hub_endpoint, ClientTls, EndpointKey, Limits, ServerTls,
        };
        crate::transport::tls::install_provider();
        let ca = crate::certs::Ca::generate("relay test CA").unwrap();
        let hub_cert = ca.issue_hub(&["localhost".to_string()]).unwrap();
        let agent_cert = ca.issue_agent("edge").unwrap();
        let server =
            ServerTls::from_pem(&ca.cert_pem(), &hub_cert.cert_pem, &hub_cert.key_pem).unwrap();
        let client =
            ClientTls::from_pem(&ca.cert_pem(), &agent_cert.cert_pem, &agent_cert.key_pem).unwrap();
        let limits = Limits::default();
        let hub = hub_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &server,
            &limits,
            &EndpointKey::random().unwrap(),
        )
        .unwrap();
        let hub_addr = hub.local_addr().unwrap();
        let agent = agent_endpoint(hub_addr, &client, &limits).unwrap();
        let (agent_conn, hub_conn) = tokio::join!(
            async { agent.connect(hub_addr, "localhost").unwrap().await.unwrap() },
            async { hub.accept().await.unwrap().await.unwrap() },
        );
        // A stream exists for the peer once something was sent on it.
        let agent_session = crate::transport::session::Session::from(agent_conn.clone());
        let hub_session = crate::transport::session::Session::from(hub_conn.clone());
        let (mut send, recv) = agent_session.open_bi().await.unwrap();
        send.write_all(b"!").await.unwrap();
        let (peer_send, mut peer_recv) = hub_session.accept_bi().await.unwrap();
        let mut first = [0u8; 1];
        peer_recv.read_exact(&mut first).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tcp_peer, tcp) = tokio::join!(
            async {
                TcpStream::connect(listener.local_addr().unwrap())
                    .await
                    .unwrap()
            },
            async { listener.accept().await.unwrap().0 },
        );
        let relay = tokio::spawn(relay(
            tcp,
            send,
            recv,
            None,
            |_, _| {},
            std::future::pending(),
        ));
        Pair {
            relay,
            tcp_peer,
            peer_send,
            peer_recv,
            _endpoints: (hub, agent, hub_conn, agent_conn),
        }
    }

    /// Every wait of these tests is bounded: a hang fails instead of blocking.
    async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("timed out")
    }

    #[tokio::test]
    async fn a_fin_becomes_a_finish_and_the_other_direction_keeps_flowing() {
        let mut p = pair().await;
        // The TCP peer sends and half-closes: the stream peer reads it, then the finish.
        p.tcp_peer.write_all(b"ping").await.unwrap();
        p.tcp_peer.shutdown().await.unwrap();
        let got = bounded(p.peer_recv.read_to_end(1024)).await.unwrap();
        assert_eq!(got, b"ping");
        // The other direction is still open, and its finish becomes a FIN.
        p.peer_send.write_all(b"pong").await.unwrap();
        p.peer_send.finish().unwrap();
        let mut back = Vec::new();
        bounded(p.tcp_peer.read_to_end(&mut back)).await.unwrap();
        assert_eq!(back, b"pong");
        let outcome = bounded(p.relay).await.unwrap();
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!((outcome.sent, outcome.received), (4, 4));
    }

    #[tokio::test]
    async fn a_stream_reset_becomes_a_tcp_reset_never_a_clean_end() {
        let mut p = pair().await;
        p.peer_send.write_all(b"part of a transfer").await.unwrap();
        let mut part = [0u8; 18];
        bounded(p.tcp_peer.read_exact(&mut part)).await.unwrap();
        p.peer_send.reset(StreamCode::Reset.into());
        let outcome = bounded(p.relay).await.unwrap();
        assert!(
            matches!(outcome.error, Some(RelayError::StreamRead(_))),
            "{:?}",
            outcome.error
        );
        let mut rest = Vec::new();
        let err = bounded(p.tcp_peer.read_to_end(&mut rest))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        // The stream's other half is stopped too.
        let stopped = bounded(p.peer_recv.read_to_end(1024)).await.unwrap_err();
        assert!(matches!(stopped, StreamError::Reset(_)), "{stopped:?}");
    }

    #[tokio::test]
    async fn a_tcp_reset_becomes_a_stream_reset() {
        let mut p = pair().await;
        // Closing with zero linger sends an RST.
        p.tcp_peer.set_zero_linger().unwrap();
        drop(p.tcp_peer);
        let outcome = bounded(p.relay).await.unwrap();
        assert!(
            matches!(
                outcome.error,
                Some(RelayError::TcpRead(_) | RelayError::TcpWrite(_))
            ),
            "{:?}",
            outcome.error
        );
        let err = bounded(p.peer_recv.read_to_end(1024)).await.unwrap_err();
        assert!(matches!(err, StreamError::Reset(_)), "{err:?}");
    }

    /// Chunks, the first to write, bytes written; the next chunk and what is left.
    type Case<'a> = (&'a [&'a str], usize, usize, usize, &'a [&'a str]);

    #[test]
    fn a_short_write_resumes_exactly_where_it_ended() {
        let cases: [Case; 8] = [
            // Everything written.
            (&["abc", "de"], 0, 5, 2, &[]),
            // A write that ends between two chunks.
            (&["abc", "de"], 0, 3, 1, &["de"]),
            // One that ends inside a chunk keeps the rest of it, in order.
            (&["abc", "de"], 0, 2, 0, &["c", "de"]),
            (&["abc", "de", "fgh"], 0, 4, 1, &["e", "fgh"]),
            // Resuming from a later chunk.
            (&["abc", "de", "fgh"], 1, 3, 2, &["gh"]),
            // Empty chunks are skipped, before and after what was written.
            (&["", "ab", "", "c"], 0, 2, 3, &["c"]),
            (&["ab", "", ""], 0, 2, 3, &[]),
            // Nothing written yet: only leading empty chunks go.
            (&["", "ab"], 0, 0, 1, &["ab"]),
        ];
        for (chunks, first, written, next, left) in cases {
            let want: Vec<String> = left.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                after(chunks, first, written),
                (next, want),
                "{chunks:?} from {first} after writing {written}"
            );
        }
    }
}
