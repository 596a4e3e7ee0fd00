//! One session abstraction over both transports: hub and agent open and accept streams, reset
//! and stop them with a code, close the session with a code and learn why it ended, without
//! knowing whether QUIC or TLS/TCP carries it.
//!
//! Enums rather than `dyn` trait objects: there are exactly two transports, and a `match` per
//! call keeps every read and write on the relay's hot path free of boxing and of the
//! heap-allocated futures an object-safe async trait would need.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use rustls::pki_types::CertificateDer;
use web_transport_trait::{RecvStream as _, SendStream as _, Session as _};

use super::tcp::TcpSession;

/// How long a failed TCP stream operation waits for its session's end reason. qmux records
/// the reason right after failing the streams, so this is only ever a scheduling delay.
const SESSION_END_WAIT: Duration = Duration::from_secs(1);

/// Which transport carries a session: for logs, the agents API and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// QUIC over UDP.
    Quic,
    /// TLS 1.3 over TCP (directly or through an HTTP proxy).
    Tcp,
}

impl TransportKind {
    /// `quic` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Quic => "quic",
            TransportKind::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionEnd {
    /// The peer closed it with an application code (a `CloseCode`).
    #[error("closed by the peer with code {code:#x} ({reason})")]
    ClosedByPeer {
        /// The code the peer sent.
        code: u64,
        /// The reason text the peer sent.
        reason: String,
    },
    /// This side closed it.
    #[error("closed here")]
    ClosedHere,
    /// Nothing was heard from the peer within the idle timeout.
    #[error("idle timeout: the peer went silent")]
    TimedOut,
    /// The transport failed: connection reset, protocol violation, TLS alert.
    #[error("transport failed: {0}")]
    Failed(String),
}

impl SessionEnd {
    fn from_quic(e: &quinn::ConnectionError) -> SessionEnd {
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => SessionEnd::ClosedByPeer {
                code: c.error_code.into_inner(),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            quinn::ConnectionError::LocallyClosed => SessionEnd::ClosedHere,
            quinn::ConnectionError::TimedOut => SessionEnd::TimedOut,
            other => SessionEnd::Failed(other.to_string()),
        }
    }

    fn from_tcp(e: &qmux::Error, closed_here: bool) -> SessionEnd {
        match e {
            qmux::Error::ConnectionClosed { .. } | qmux::Error::Closed if closed_here => {
                SessionEnd::ClosedHere
            }
            qmux::Error::ConnectionClosed { code, reason } => SessionEnd::ClosedByPeer {
                code: code.into_inner(),
                reason: reason.clone(),
            },
            qmux::Error::IdleTimeout => SessionEnd::TimedOut,
            other => SessionEnd::Failed(other.to_string()),
        }
    }
}

/// Why a stream operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The peer reset its sending side with this code (a `StreamCode`).
    #[error("reset by the peer with code {0:#x}")]
    Reset(u64),
    /// The peer stopped reading with this code.
    #[error("stopped by the peer with code {0:#x}")]
    Stopped(u64),
    /// The session ended.
    #[error("session ended: {0}")]
    Session(SessionEnd),
    /// This side already finished or reset the stream.
    #[error("stream already closed")]
    Closed,
    /// More data than the caller's limit.
    #[error("stream longer than {0} bytes")]
    TooLong(usize),
    /// Anything else the transport reported.
    #[error("{0}")]
    Other(String),
}

impl StreamError {
    fn from_read(e: quinn::ReadError) -> StreamError {
        match e {
            quinn::ReadError::Reset(code) => StreamError::Reset(code.into_inner()),
            quinn::ReadError::ConnectionLost(e) => StreamError::Session(SessionEnd::from_quic(&e)),
            quinn::ReadError::ClosedStream => StreamError::Closed,
            other => StreamError::Other(other.to_string()),
        }
    }

    fn from_write(e: quinn::WriteError) -> StreamError {
        match e {
            quinn::WriteError::Stopped(code) => StreamError::Stopped(code.into_inner()),
            quinn::WriteError::ConnectionLost(e) => StreamError::Session(SessionEnd::from_quic(&e)),
            quinn::WriteError::ClosedStream => StreamError::Closed,
            other => StreamError::Other(other.to_string()),
        }
    }

    /// A QMux stream error; one that is about the session reads the session's end reason
    /// (qmux fails the streams with a bare "closed" just before it records why).
    async fn from_tcp(e: qmux::Error, t: &TcpSession) -> StreamError {
        match Self::of_stream(e) {
            Ok(stream) => stream,
            Err(other) => {
                let end = tokio::time::timeout(SESSION_END_WAIT, t.mux().closed()).await;
                let e = end.unwrap_or(other);
                StreamError::Session(SessionEnd::from_tcp(&e, t.closed_here()))
            }
        }
    }

    /// [`StreamError::from_tcp`] for callers that cannot wait.
    fn from_tcp_now(e: qmux::Error, t: &TcpSession) -> StreamError {
        match Self::of_stream(e) {
            Ok(stream) => stream,
            Err(other) => {
                let e = t.mux().closed().now_or_never().unwrap_or(other);
                StreamError::Session(SessionEnd::from_tcp(&e, t.closed_here()))
            }
        }
    }

    /// A QMux error about the stream itself, or the error back when it is about the session.
    fn of_stream(e: qmux::Error) -> Result<StreamError, qmux::Error> {
        match e {
            qmux::Error::StreamReset(code) => Ok(StreamError::Reset(code.into_inner())),
            qmux::Error::StreamStop(code) => Ok(StreamError::Stopped(code.into_inner())),
            qmux::Error::StreamClosed => Ok(StreamError::Closed),
            other => Err(other),
        }
    }
}

/// A hub–agent session on either transport. Clones share the session.
#[derive(Debug, Clone)]
pub enum Session {
    /// A QUIC connection.
    Quic(quinn::Connection),
    /// A TLS/TCP connection carrying QMux.
    Tcp(TcpSession),
}

impl From<quinn::Connection> for Session {
    fn from(c: quinn::Connection) -> Self {
        Session::Quic(c)
    }
}

impl From<TcpSession> for Session {
    fn from(s: TcpSession) -> Self {
        Session::Tcp(s)
    }
}

impl Session {
    /// Which transport carries this session.
    pub fn transport(&self) -> TransportKind {
        match self {
            Session::Quic(_) => TransportKind::Quic,
            Session::Tcp(_) => TransportKind::Tcp,
        }
    }

    /// Opens a bidirectional stream; waits while the peer's stream limit is reached.
    /// The peer learns of the stream when the first byte (or a finish) is sent on it.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), StreamError> {
        match self {
            Session::Quic(c) => quic_streams(c.open_bi().await),
            Session::Tcp(t) => tcp_streams(t, t.mux().open_bi().await).await,
        }
    }

    /// Lets the peer have up to `n` of its bidirectional streams open at once (more than it
    /// was granted so far: QUIC cannot take a grant back). A TLS/TCP session keeps the window
    /// it was set up with, since QMux grants it without a table per stream.
    pub fn grant_streams(&self, n: u32) {
        match self {
            Session::Quic(c) => c.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(n)),
            Session::Tcp(_) => {}
        }
    }

    /// Accepts the next stream the peer opened. Cancel-safe.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), StreamError> {
        match self {
            Session::Quic(c) => quic_streams(c.accept_bi().await),
            Session::Tcp(t) => tcp_streams(t, t.mux().accept_bi().await).await,
        }
    }

    /// Closes the session at once with an application code and reason the peer reads back
    /// as [`SessionEnd::ClosedByPeer`]. Streams still open are cut.
    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Session::Quic(c) => c.close(quinn::VarInt::from_u32(code), reason.as_bytes()),
            Session::Tcp(t) => t.close(code, reason),
        }
    }

    /// Resolves when the session has ended, with the reason. Cancel-safe.
    pub async fn closed(&self) -> SessionEnd {
        match self {
            Session::Quic(c) => SessionEnd::from_quic(&c.closed().await),
            Session::Tcp(t) => {
                let e = t.mux().closed().await;
                SessionEnd::from_tcp(&e, t.closed_here())
            }
        }
    }

    /// After [`Session::close`]: resolves once the close has gone out, at most after
    /// `limit`. QUIC: at once (the endpoint's `wait_idle` sends its closes); TCP: when the
    /// session's connection is done with (its close frame went to the socket). Call before
    /// a process may exit, so the peer reads the close code, not a cut connection.
    pub async fn flush_close(&self, limit: Duration) {
        if let Session::Tcp(t) = self {
            let _ = tokio::time::timeout(limit, t.released()).await;
        }
    }

    /// Why the session ended, or `None` while it is alive.
    pub fn close_reason(&self) -> Option<SessionEnd> {
        match self {
            Session::Quic(c) => c.close_reason().map(|e| SessionEnd::from_quic(&e)),
            Session::Tcp(_) => self.closed().now_or_never(),
        }
    }

    /// The peer's certificate chain (leaf first) as TLS verified it.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        match self {
            Session::Quic(c) => c
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|chain| *chain),
            Session::Tcp(t) => t.peer_certificates(),
        }
    }

    /// Whether the TLS session was resumed from a ticket (`false` while unknown).
    pub fn tls_resumed(&self) -> bool {
        match self {
            Session::Quic(c) => super::tls::resumed(c),
            Session::Tcp(t) => t.tls_resumed(),
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Session::Quic(c) => c.remote_address(),
            Session::Tcp(t) => t.remote_address(),
        }
    }

    /// The QUIC connection underneath, for a QUIC session.
    pub fn quic(&self) -> Option<&quinn::Connection> {
        match self {
            Session::Quic(c) => Some(c),
            Session::Tcp(_) => None,
        }
    }

    /// The smoothed round-trip time, when known.
    pub fn rtt(&self) -> Option<Duration> {
        match self {
            Session::Quic(c) => Some(c.stats().path.rtt),
            Session::Tcp(t) => t.rtt(),
        }
    }

    /// A counter that moves whenever stream data arrives from the peer, so traffic can count
    /// as a sign of life next to heartbeats. QUIC: stream frames received; TCP: stream bytes
    /// read (TCP's own delivery is in order, so data read is data the peer sent). Compare
    /// two readings of the same session only.
    pub fn activity(&self) -> u64 {
        match self {
            Session::Quic(c) => c.stats().frame_rx.stream,
            Session::Tcp(t) => t.received(),
        }
    }

    /// A counter that moves whenever the peer acknowledged packets of ours: QUIC ACK frames
    /// received. `None` on TCP, whose acknowledgements the kernel keeps to itself.
    pub fn acknowledgements(&self) -> Option<u64> {
        match self {
            Session::Quic(c) => Some(c.stats().frame_rx.acks),
            Session::Tcp(_) => None,
        }
    }

    /// Path facts only QUIC has (TCP hides loss and MTU in the kernel): `None` on TCP.
    pub fn path(&self) -> Option<PathFacts> {
        match self {
            Session::Quic(c) => {
                let path = c.stats().path;
                Some(PathFacts {
                    lost_packets: path.lost_packets,
                    mtu: path.current_mtu,
                    mtu_probes: path.sent_plpmtud_probes,
                })
            }
            Session::Tcp(_) => None,
        }
    }
}

/// Packet-level facts of a QUIC path, for the agents API and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathFacts {
    /// Packets declared lost so far.
    pub lost_packets: u64,
    /// The path MTU discovery has reached, in bytes.
    pub mtu: u16,
    /// MTU probes this side sent so far, lost ones included.
    pub mtu_probes: u64,
}

/// A QUIC stream opened or accepted, as a session stream; a refusal is the session's end.
fn quic_streams(
    streams: Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
) -> Result<(SendStream, RecvStream), StreamError> {
    match streams {
        Ok((s, r)) => Ok((SendStream::Quic(s), RecvStream::Quic(r))),
        Err(e) => Err(StreamError::Session(SessionEnd::from_quic(&e))),
    }
}

/// A stream of the TCP fallback opened or accepted, numbered for the session's counters; a
/// refusal says how the session ended when it did.
async fn tcp_streams(
    t: &TcpSession,
    streams: Result<(qmux::SendStream, qmux::RecvStream), qmux::Error>,
) -> Result<(SendStream, RecvStream), StreamError> {
    match streams {
        Ok((s, r)) => {
            let id = t.next_stream();
            Ok((
                SendStream::Tcp(s, t.clone(), id),
                RecvStream::Tcp(r, t.clone()),
            ))
        }
        Err(e) => Err(StreamError::from_tcp(e, t).await),
    }
}

/// The sending half of a stream. Dropping it finishes it (unless it was reset), as quinn's
/// does: the peer reads what was written, then the end. Abort with [`SendStream::reset`].
pub enum SendStream {
    /// A QUIC stream.
    Quic(quinn::SendStream),
    /// A QMux stream, with its session (for the end reason, and to keep it open) and its
    /// number in the session.
    Tcp(qmux::SendStream, TcpSession, u64),
}

impl Drop for SendStream {
    fn drop(&mut self) {
        // qmux resets a stream dropped unfinished, quinn finishes it; finish here so both
        // behave like quinn. Err means already finished or reset: nothing to do.
        if let SendStream::Tcp(s, _, _) = self {
            let _ = s.finish();
        }
    }
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendStream::Quic(s) => s.fmt(f),
            SendStream::Tcp(..) => f.write_str("SendStream(tcp)"),
        }
    }
}

impl SendStream {
    /// Writes all of `buf`, waiting for flow-control credit. Cancel-safe only in that
    /// dropping it leaves an unknown prefix written.
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s) => s.write_all(buf).await.map_err(StreamError::from_write),
            SendStream::Tcp(s, t, _) => match s.write_all(buf).await {
                Ok(_) => Ok(()),
                Err(e) => Err(StreamError::from_tcp(e, t).await),
            },
        }
    }

    /// Writes one chunk without copying it.
    pub async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s) => s.write_chunk(chunk).await.map_err(StreamError::from_write),
            SendStream::Tcp(s, t, _) => match s.write_chunk(chunk).await {
                Ok(()) => Ok(()),
                Err(e) => Err(StreamError::from_tcp(e, t).await),
            },
        }
    }

    /// The stream's number in its session, for log lines (QUIC: the stream index).
    pub fn id(&self) -> u64 {
        match self {
            SendStream::Quic(s) => s.id().index(),
            SendStream::Tcp(_, _, id) => *id,
        }
    }

    /// Ends this direction cleanly: the peer reads everything written, then end of stream.
    pub fn finish(&mut self) -> Result<(), StreamError> {
        match self {
            SendStream::Quic(s) => s.finish().map_err(|_| StreamError::Closed),
            SendStream::Tcp(s, f, _) => s.finish().map_err(|e| StreamError::from_tcp_now(e, f)),
        }
    }

    /// Abandons this direction: the peer's reads fail with [`StreamError::Reset`]`(code)`.
    pub fn reset(&mut self, code: u32) {
        match self {
            SendStream::Quic(s) => {
                // Err only when already finished or reset: nothing left to abandon.
                let _ = s.reset(quinn::VarInt::from_u32(code));
            }
            SendStream::Tcp(s, _, _) => s.reset(code),
        }
    }

    /// Resolves when the peer stopped reading (`Some(code)`), or `None` once the stream was
    /// finished and the peer no longer cares. Cancel-safe.
    pub async fn stopped(&mut self) -> Result<Option<u64>, StreamError> {
        match self {
            SendStream::Quic(s) => match s.stopped().await {
                Ok(code) => Ok(code.map(|c| c.into_inner())),
                Err(quinn::StoppedError::ConnectionLost(e)) => {
                    Err(StreamError::Session(SessionEnd::from_quic(&e)))
                }
                Err(other) => Err(StreamError::Other(other.to_string())),
            },
            SendStream::Tcp(s, t, _) => match s.closed().await {
                Ok(()) => Ok(None),
                Err(qmux::Error::StreamStop(code)) => Ok(Some(code.into_inner())),
                Err(e) => Err(StreamError::from_tcp(e, t).await),
            },
        }
    }

    /// Scheduling priority against the session's other streams (higher first).
    pub fn set_priority(&mut self, priority: i32) {
        match self {
            SendStream::Quic(s) => {
                let _ = s.set_priority(priority);
            }
            SendStream::Tcp(s, _, _) => s.set_priority(priority),
        }
    }
}

/// The receiving half of a stream. Dropping it before the end stops it (code 0) on both
/// transports, as quinn's does.
pub enum RecvStream {
    /// A QUIC stream.
    Quic(quinn::RecvStream),
    /// A QMux stream, with its session (for the end reason, and to keep it open).
    Tcp(qmux::RecvStream, TcpSession),
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvStream::Quic(s) => s.fmt(f),
            RecvStream::Tcp(..) => f.write_str("RecvStream(tcp)"),
        }
    }
}

impl RecvStream {
    /// Up to `max` bytes in order, or `None` at the end of the stream. Cancel-safe.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        match self {
            RecvStream::Quic(r) => r
                .read_chunk(max, true)
                .await
                .map(|c| c.map(|c| c.bytes))
                .map_err(StreamError::from_read),
            RecvStream::Tcp(r, t) => match r.read_chunk(max).await {
                Ok(chunk) => {
                    if let Some(c) = &chunk {
                        t.note_received(c.len());
                    }
                    Ok(chunk)
                }
                Err(e) => Err(StreamError::from_tcp(e, t).await),
            },
        }
    }

    /// Reads into `buf`: the count, or `None` at the end of the stream. Cancel-safe.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, StreamError> {
        match self {
            RecvStream::Quic(r) => r.read(buf).await.map_err(StreamError::from_read),
            RecvStream::Tcp(..) => Ok(self.read_chunk(buf.len()).await?.map(|b| {
                buf[..b.len()].copy_from_slice(&b);
                b.len()
            })),
        }
    }

    /// Up to `chunks.len()` chunks in order: the count, or `None` at the end of the stream.
    /// Cancel-safe. QUIC hands over what has arrived; on TCP the first chunk is awaited and
    /// the ones already buffered are taken with it.
    pub async fn read_chunks(
        &mut self,
        chunks: &mut [Bytes],
    ) -> Result<Option<usize>, StreamError> {
        if chunks.is_empty() {
            return Ok(Some(0));
        }
        if let RecvStream::Quic(r) = self {
            return r.read_chunks(chunks).await.map_err(StreamError::from_read);
        }
        let Some(first) = self.read_chunk(usize::MAX).await? else {
            return Ok(None);
        };
        chunks[0] = first;
        let mut n = 1;
        // qmux's read is cancel-safe: a read that would wait is dropped unfinished, and an
        // end or error is met again by the next call.
        while n < chunks.len() {
            match self.read_chunk(usize::MAX).now_or_never() {
                Some(Ok(Some(chunk))) => {
                    chunks[n] = chunk;
                    n += 1;
                }
                _ => break,
            }
        }
        Ok(Some(n))
    }

    /// Reads until the end of the stream, failing with [`StreamError::TooLong`] past
    /// `limit` bytes (checked before the data is kept).
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, StreamError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.read_chunk(64 * 1024).await? {
            if out.len() + chunk.len() > limit {
                return Err(StreamError::TooLong(limit));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Tells the peer to stop sending: its writes fail with [`StreamError::Stopped`]`(code)`.
    pub fn stop(&mut self, code: u32) {
        match self {
            RecvStream::Quic(r) => {
                // Err only when already stopped or finished.
                let _ = r.stop(quinn::VarInt::from_u32(code));
            }
            RecvStream::Tcp(r, _) => r.stop(code),
        }
    }
}

/// Framed readers (`read_frame`, the control stream's `FramedRead`) read session streams
/// through `AsyncRead`. A reset or a lost session is an `io::Error` wrapping the
/// [`StreamError`].
impl tokio::io::AsyncRead for RecvStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        let room = buf.remaining();
        if room == 0 {
            return Poll::Ready(Ok(()));
        }
        // One read, polled once: qmux's (and quinn's) reads are cancel-safe, keep the wakers
        // they registered when dropped pending, and lose no data, so nothing need be kept
        // between polls.
        let (read, session) = match this {
            RecvStream::Quic(r) => return std::pin::Pin::new(r).poll_read(cx, buf),
            RecvStream::Tcp(r, t) => (r.read_chunk(room), t),
        };
        let read = std::pin::pin!(read);
        match read.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(chunk))) => {
                session.note_received(chunk.len());
                buf.put_slice(&chunk);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(std::io::Error::other(
                StreamError::from_tcp_now(e, session),
            ))),
        }
    }
}
