//! TLS 1.3 over TCP: the transport for networks that block outbound UDP or allow only an HTTP
//! proxy. Same certificates and client-certificate check as QUIC, its own ALPN, and QUIC's
//! stream semantics (per-stream flow control, reset/stop/close with a code) carried by QMux
//! (draft-ietf-quic-qmux, the `qmux` crate) inside the TLS connection.
//!
//! The multiplexer was chosen by measurement (docs/decisions.md); its wire format and limits
//! are in docs/protocol.md, "TCP transport".

mod io;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use web_transport_trait::{Session as _, Stats as _};

use io::{ReadAhead, WriteBatch};

use super::tls::{rustls_failure, server_name, ClientTls, ServerTls, TlsError, TlsFailure};
use super::Limits;

/// ALPN identifier of the hub–agent protocol over TLS/TCP. Distinct from QUIC's `rna/1` so a
/// TCP peer can never be mistaken for a QUIC one, and so the framing can change on its own.
pub const TCP_ALPN: &[u8] = b"rna-tcp/1";

/// QMux wire format spoken inside the TLS connection: draft-02 (records, ping, reset-at).
/// Both ends are rna, so there is nothing to negotiate.
const QMUX_VERSION: qmux::Version = qmux::Version::QMux02;

/// Largest QMux record (the frame-size bound) either side accepts, in bytes. A record carries
/// one frame; 16,382 is the draft's default, fits one TLS record (16 KiB) with its header, and
/// bounds what a peer can make us buffer before a frame is parsed.
pub const MAX_RECORD_SIZE: u64 = 16_382;

/// Why a TCP session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// The TCP connection could not be made (refused, unreachable, timed out).
    #[error("TCP to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Config(#[from] TlsError),
    /// The TLS handshake failed: a certificate refused by either side, or not TLS at all.
    #[error("TLS handshake with {addr}: {}", failure.detail)]
    Tls {
        /// The peer.
        addr: SocketAddr,
        /// Which side refused which certificate, with rustls' words or the alert received.
        failure: TlsFailure,
    },
    /// The peer closed or reset the connection during the TLS handshake, without a TLS
    /// alert: a hub refusing new connections (its handshake cap, a shutdown), or a peer
    /// that gave up.
    #[error("{addr} closed the connection during the TLS handshake: {source}")]
    Closed {
        /// The peer.
        addr: SocketAddr,
        /// The cause (reset, end of file).
        source: std::io::Error,
    },
    /// TLS completed but the peer did not choose `rna-tcp/1`.
    #[error("{addr} did not negotiate ALPN rna-tcp/1")]
    Alpn {
        /// The peer.
        addr: SocketAddr,
    },
    /// The QMux session could not be established (the peer sent no transport parameters, or
    /// broke the protocol).
    #[error("session setup with {addr}: {source}")]
    Mux {
        /// The peer.
        addr: SocketAddr,
        /// qmux's error.
        source: qmux::Error,
    },
    /// The hub already has `max_incoming` TCP handshakes in progress; this one was refused
    /// before any TLS work.
    #[error("refused {addr}: {limit} handshakes already in progress")]
    Busy {
        /// The peer.
        addr: SocketAddr,
        /// The cap (`max_incoming`).
        limit: usize,
    },
    /// The whole handshake (TLS and QMux parameters) took longer than allowed.
    #[error("handshake with {addr} not done within {limit:?}")]
    Timeout {
        /// The peer.
        addr: SocketAddr,
        /// The deadline.
        limit: Duration,
    },
}

/// QMux settings from the shared transport limits, so TCP and QUIC sessions grant the same
/// streams and windows. `incoming_bidi` is how many streams the peer may open towards us.
fn mux_config(limits: &Limits, incoming_bidi: u32) -> qmux::Config {
    let mut c = qmux::Config::negotiated(QMUX_VERSION, None);
    c.max_streams_bidi = u64::from(incoming_bidi);
    // rna uses bidirectional streams only, as on QUIC.
    c.max_streams_uni = 0;
    c.max_stream_data_uni = 0;
    c.max_data = u64::from(limits.connection_window);
    c.max_stream_data_bidi_local = u64::from(limits.stream_window);
    c.max_stream_data_bidi_remote = u64::from(limits.stream_window);
    // qmux sends a keep-alive ping every third of the idle timeout while the session is
    // quiet, so NAT and proxy bindings stay open and a dead peer is noticed within it.
    c.max_idle_timeout = u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    c.max_record_size = MAX_RECORD_SIZE;
    // Datagrams are not used (UDP ASSOCIATE is not offered over TCP).
    c.max_datagram_frame_size = 0;
    // Bounded again below by the whole-handshake deadline; this one covers the parameters.
    c.handshake_timeout = limits.handshake_timeout;
    c.rtt_interval = Duration::from_secs(5);
    c
}

/// The hub's side: a bound TCP listener and the handshakes of what it accepts.
pub struct TcpServer {
    /// Bound by the caller (tests bind port 0).
    listener: TcpListener,
    /// TLS and QMux handshakes; shared with the tasks serving accepted connections, which
    /// need no listener (so the port closes as soon as the server is dropped).
    handshaker: Arc<TcpHandshaker>,
}

impl std::fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpServer")
            .field("local", &self.listener.local_addr().ok())
            .finish()
    }
}

impl TcpServer {
    /// Serves TLS/TCP sessions on an already-bound listener.
    pub fn new(listener: TcpListener, tls: &ServerTls, limits: &Limits) -> Result<Self, TcpError> {
        let config = tls.tcp_config(TCP_ALPN)?;
        Ok(TcpServer {
            listener,
            handshaker: Arc::new(TcpHandshaker {
                acceptor: TlsAcceptor::from(Arc::new(config)),
                limits: limits.clone(),
                handshakes: Arc::new(tokio::sync::Semaphore::new(limits.max_incoming)),
            }),
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts the next TCP connection; cheap, so the accept loop never waits on a peer.
    /// Run [`TcpHandshaker::handshake`] on it in its own task. Cancel-safe.
    pub async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        self.listener.accept().await
    }

    /// The handshakes of accepted connections, for the tasks that serve them.
    pub fn handshaker(&self) -> Arc<TcpHandshaker> {
        self.handshaker.clone()
    }

    /// [`TcpHandshaker::handshake`] of this server.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> Result<TcpSession, TcpError> {
        self.handshaker.handshake(tcp, remote).await
    }
}

/// The TLS acceptor and limits of the hub's TCP side.
pub struct TcpHandshaker {
    /// TLS 1.3, client certificate required, ALPN `rna-tcp/1`.
    acceptor: TlsAcceptor,
    /// Streams, windows, deadlines: the same as the QUIC endpoint's.
    limits: Limits,
    /// Handshakes in progress, at most `max_incoming` (as QUIC's), so a flood of TCP
    /// connections cannot make the hub do TLS work without bound.
    handshakes: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for TcpHandshaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpHandshaker").finish_non_exhaustive()
    }
}

impl TcpHandshaker {
    /// TLS and QMux handshakes on an accepted connection, within the handshake deadline.
    /// Refused at once, before any TLS work, while `max_incoming` others are in progress.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> Result<TcpSession, TcpError> {
        let Ok(_permit) = self.handshakes.clone().try_acquire_owned() else {
            return Err(TcpError::Busy {
                addr: remote,
                limit: self.limits.max_incoming,
            });
        };
        let limit = self.limits.handshake_timeout;
        let work = async {
            let _ = tcp.set_nodelay(true);
            let stats = socket_stats(&tcp);
            let tls = self.acceptor.accept(ReadAhead::new(tcp)).await;
            let tls = tls.map_err(|e| tls_failed(remote, &e))?;
            let agreed = negotiated(tls.get_ref().1, remote)?;
            let config = mux_config(&self.limits, self.limits.agent_streams);
            let (stream, released) = transport(tls, stats);
            let session = qmux::Session::accept(stream, config)
                .await
                .map_err(|e| mux_error(e, remote))?;
            Ok(TcpSession::new(session, agreed, remote, released))
        };
        tokio::time::timeout(limit, work)
            .await
            .unwrap_or(Err(TcpError::Timeout {
                addr: remote,
                limit,
            }))
    }
}

/// Dials the hub over TCP and sets up a session, all within the handshake deadline.
pub async fn connect(
    addr: SocketAddr,
    name: &str,
    tls: &ClientTls,
    limits: &Limits,
) -> Result<TcpSession, TcpError> {
    connect_from(addr, None, name, tls, limits).await
}

/// [`connect`] from `bind` (the agent's `--bind-address`; `None`: the address the kernel
/// picks).
pub async fn connect_from(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    name: &str,
    tls: &ClientTls,
    limits: &Limits,
) -> Result<TcpSession, TcpError> {
    let limit = limits.handshake_timeout;
    let work = async {
        let tcp = dial(addr, bind)
            .await
            .map_err(|source| TcpError::Connect { addr, source })?;
        connect_over(tcp, addr, name, tls, limits).await
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(TcpError::Timeout { addr, limit }))
}

/// A TCP connection to `addr`, from port 0 of `bind` when given.
async fn dial(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = bind else {
        return TcpStream::connect(addr).await;
    };
    let socket = match ip {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

/// Sets up a session over a TCP connection that is already open: directly to the hub, or a
/// tunnel an HTTP proxy opened with CONNECT. `remote` is the hub's address as the caller
/// knows it (for messages). The caller bounds the time.
pub async fn connect_over(
    tcp: TcpStream,
    remote: SocketAddr,
    name: &str,
    tls: &ClientTls,
    limits: &Limits,
) -> Result<TcpSession, TcpError> {
    connect_over_with(tcp, remote, name, tls.rustls_config(TCP_ALPN), limits).await
}

/// [`connect_over`] with a TLS client configuration of the caller's: its one ALPN names the
/// exchange (enrollment and renewal offer their own), its verifier checks the hub (an
/// enrolling agent's checks the join token's CA pin). The caller bounds the time.
pub async fn connect_over_with(
    tcp: TcpStream,
    remote: SocketAddr,
    name: &str,
    config: rustls::ClientConfig,
    limits: &Limits,
) -> Result<TcpSession, TcpError> {
    let _ = tcp.set_nodelay(true);
    let stats = socket_stats(&tcp);
    let connector = TlsConnector::from(Arc::new(config));
    let stream = connector
        .connect(server_name(name)?, ReadAhead::new(tcp))
        .await
        .map_err(|e| tls_failed(remote, &e))?;
    let agreed = negotiated(stream.get_ref().1, remote)?;
    // In TLS 1.3 the hub checks our certificate after our side of the handshake is done, so
    // a refusal arrives here, as an alert, while waiting for the hub's QMux parameters.
    let (stream, released) = transport(stream, stats);
    let session = qmux::Session::connect(stream, mux_config(limits, limits.tunnel_streams))
        .await
        .map_err(|e| mux_error(e, remote))?;
    Ok(TcpSession::new(session, agreed, remote, released))
}

/// The TLS stream wrapped for QMux, and what says when QMux's tasks have let go of it.
fn transport<T>(
    stream: T,
    stats: Option<qmux::SharedSocketStats>,
) -> (
    qmux::transport::Stream<Released<T>>,
    tokio::sync::watch::Receiver<()>,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (done, released) = tokio::sync::watch::channel(());
    // QMux writes a record's size prefix and its payload separately; gathered, they leave
    // as one TLS record (see `io`).
    let stream = Released {
        inner: WriteBatch::new(stream),
        _done: done,
    };
    let t = qmux::transport::Stream::new(stream, QMUX_VERSION, MAX_RECORD_SIZE);
    let t = match stats {
        Some(s) => t.with_socket_stats(s),
        None => t,
    };
    (t, released)
}

/// A session's TLS stream (its writes gathered) as QMux's reader and writer tasks hold it. When both are done
/// with it (the session's last frames, its close among them, went to the socket, or the
/// connection failed), it is dropped, and with it the sender that
/// [`TcpSession::released`] waits on.
struct Released<T> {
    inner: WriteBatch<T>,
    _done: tokio::sync::watch::Sender<()>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Released<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Released<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The kernel's TCP statistics (round-trip time) for the session's socket.
fn socket_stats(tcp: &TcpStream) -> Option<qmux::SharedSocketStats> {
    qmux::TcpStats::new(tcp)
        .ok()
        .map(|s| Arc::new(s) as qmux::SharedSocketStats)
}

/// What a completed TLS handshake agreed.
#[derive(Debug)]
struct Negotiated {
    /// The peer's certificate chain, as TLS verified it or (resumed) as its ticket held it.
    peer: Option<Vec<CertificateDer<'static>>>,
    /// The protocol.
    alpn: Vec<u8>,
    /// Whether the session was resumed from a ticket.
    resumed: bool,
}

/// After a completed handshake with `addr`, on either side: a protocol must have been
/// agreed (`rna-tcp/1`, or on a hub that enrolls `rna-enroll/1` and `rna-renew/1`; rustls
/// only agrees on one both offered); returns the peer's certificate chain, the protocol and
/// whether the session was resumed.
fn negotiated(conn: &rustls::CommonState, addr: SocketAddr) -> Result<Negotiated, TcpError> {
    let Some(alpn) = conn.alpn_protocol() else {
        return Err(TcpError::Alpn { addr });
    };
    Ok(Negotiated {
        peer: conn.peer_certificates().map(|c| c.to_vec()),
        alpn: alpn.to_vec(),
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    })
}

/// A TLS handshake with `addr` that failed, on either side: a TLS error or alert, or the
/// peer closing the connection before TLS said anything (a hub at its handshake cap or
/// shutting down drops the connection; that is no certificate refusal).
fn tls_failed(addr: SocketAddr, e: &std::io::Error) -> TcpError {
    match rustls_error(e) {
        Some(tls) => TcpError::Tls {
            addr,
            failure: rustls_failure(tls),
        },
        None => TcpError::Closed {
            addr,
            source: std::io::Error::new(e.kind(), e.to_string()),
        },
    }
}

/// rustls' own error inside an `io::Error` (tokio-rustls and QMux wrap it), if it is one.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A failed QMux setup: a TLS alert read while waiting is a TLS failure, the rest is QMux's.
fn mux_error(e: qmux::Error, addr: SocketAddr) -> TcpError {
    if let qmux::Error::Io(io) = &e {
        if let Some(tls) = rustls_error(io) {
            return TcpError::Tls {
                addr,
                failure: rustls_failure(tls),
            };
        }
    }
    TcpError::Mux { addr, source: e }
}

/// One hub–agent session over TLS/TCP. Clones share the session; it closes when the last
/// clone and the last of its streams are gone (streams hold a clone, as quinn's do).
#[derive(Clone)]
pub struct TcpSession(Arc<Inner>);

struct Inner {
    /// The QMux session.
    mux: qmux::Session,
    /// The peer's certificate chain as TLS verified it.
    peer: Option<Vec<CertificateDer<'static>>>,
    /// The peer's address (for a proxied agent: the hub address it asked for).
    remote: SocketAddr,
    /// Set when this side closed, so the end reads as "closed here", not "closed by peer"
    /// (qmux reports both as the same close).
    closed_here: AtomicBool,
    /// Streams opened or accepted so far: numbers them for log lines (qmux does not expose
    /// its stream IDs).
    streams: AtomicU64,
    /// Stream bytes the application has read: the session's activity counter.
    received: AtomicU64,
    /// Ends when QMux's tasks have let go of the TLS stream (see [`Released`]).
    released: tokio::sync::watch::Receiver<()>,
    /// The protocol TLS agreed on: `rna-tcp/1`, or an enrollment exchange.
    alpn: Vec<u8>,
    /// Whether the TLS session was resumed from a ticket.
    resumed: bool,
}

impl std::fmt::Debug for TcpSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSession")
            .field("remote", &self.0.remote)
            .finish()
    }
}

impl TcpSession {
    fn new(
        mux: qmux::Session,
        agreed: Negotiated,
        remote: SocketAddr,
        released: tokio::sync::watch::Receiver<()>,
    ) -> Self {
        TcpSession(Arc::new(Inner {
            mux,
            peer: agreed.peer,
            remote,
            released,
            alpn: agreed.alpn,
            resumed: agreed.resumed,
            closed_here: AtomicBool::new(false),
            streams: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }))
    }

    /// The protocol TLS agreed on (`rna-tcp/1`, or an enrollment exchange's).
    pub fn alpn(&self) -> &[u8] {
        &self.0.alpn
    }

    /// Whether the TLS session was resumed from a ticket.
    pub fn tls_resumed(&self) -> bool {
        self.0.resumed
    }

    /// The QMux session underneath.
    pub(crate) fn mux(&self) -> &qmux::Session {
        &self.0.mux
    }

    /// The next stream number of this session.
    pub(crate) fn next_stream(&self) -> u64 {
        self.0.streams.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts stream bytes read.
    pub(crate) fn note_received(&self, n: usize) {
        self.0.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Stream bytes read so far.
    pub(crate) fn received(&self) -> u64 {
        self.0.received.load(Ordering::Relaxed)
    }

    /// Whether this side closed the session.
    pub(crate) fn closed_here(&self) -> bool {
        self.0.closed_here.load(Ordering::Acquire)
    }

    /// The peer's certificate chain, leaf first.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.0.peer.clone()
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.0.remote
    }

    /// Closes the session with an application code the peer reads back.
    pub fn close(&self, code: u32, reason: &str) {
        // A session the peer already ended stays "closed by the peer".
        if self.0.mux.closed().now_or_never().is_none() {
            self.0.closed_here.store(true, Ordering::Release);
        }
        self.0.mux.close(code, reason);
    }

    /// Resolves once the session's connection is done with: after [`TcpSession::close`],
    /// when the close frame has gone to the socket and QMux's tasks let go of it (so a
    /// process may exit without cutting the close short), or when the connection failed.
    /// Cancel-safe.
    pub async fn released(&self) {
        let mut released = self.0.released.clone();
        // Err once the sender is gone, which is the only thing that ever happens to it.
        let _ = released.changed().await;
    }

    /// The smoothed round-trip time: the kernel's for the TCP connection, else QMux's ping.
    pub fn rtt(&self) -> Option<Duration> {
        self.0.mux.stats().rtt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub's and an agent's TLS material from a fresh CA.
    fn materials() -> (ServerTls, ClientTls) {
        super::super::tls::install_provider();
        let ca = crate::certs::Ca::generate("tcp test CA").unwrap();
        let hub = ca.issue_hub(&["localhost".to_string()]).unwrap();
        let agent = ca.issue_agent("edge").unwrap();
        (
            ServerTls::from_pem(&ca.cert_pem(), &hub.cert_pem, &hub.key_pem).unwrap(),
            ClientTls::from_pem(&ca.cert_pem(), &agent.cert_pem, &agent.key_pem).unwrap(),
        )
    }

    /// Moves whatever the server has to send to the client (after the handshake: tickets).
    fn pump(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        client.read_tls(&mut buf.as_slice()).unwrap();
        client.process_new_packets().unwrap();
    }

    /// A TLS 1.3 handshake in memory between `client` and `server`.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> (rustls::ClientConnection, rustls::ServerConnection) {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            pump(&mut client, &mut server);
            if !client.is_handshaking() && !server.is_handshaking() {
                return (client, server);
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn both_sides_keep_the_peer_chain_and_refuse_a_handshake_without_rna_tcp() {
        let (hub, agent) = materials();
        let server = hub.rustls_config(TCP_ALPN).unwrap();
        let client = agent.rustls_config(TCP_ALPN);
        let addr: SocketAddr = "127.0.0.1:4433".parse().unwrap();

        let (c, s) = handshake(client.clone(), server.clone());
        let agreed = negotiated(&s, addr).unwrap();
        assert_eq!(agreed.alpn, TCP_ALPN);
        let agent_chain = agreed.peer.unwrap_or_default();
        let hub_chain = negotiated(&c, addr).unwrap().peer.unwrap_or_default();
        assert!(!agent_chain.is_empty() && !hub_chain.is_empty());
        assert_ne!(agent_chain[0], hub_chain[0]);

        // A client that offers no protocol completes TLS but is not a `rna-tcp/1` peer.
        let mut bare = client;
        bare.alpn_protocols.clear();
        let (_, s) = handshake(bare, server);
        assert!(
            matches!(negotiated(&s, addr), Err(TcpError::Alpn { addr: a }) if a == addr),
            "{:?}",
            negotiated(&s, addr)
        );
        let e = std::io::Error::other(rustls::Error::NoCertificatesPresented);
        assert!(matches!(
            tls_failed(addr, &e),
            TcpError::Tls { addr: a, failure } if a == addr && failure.detail.contains("no certificates")
        ));
    }

    #[test]
    fn an_agents_next_connection_resumes_also_with_a_restarted_hubs_configuration() {
        use rustls::HandshakeKind::{Full, Resumed};
        let (hub, agent_tls) = materials();
        let addr: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        // Each connection gets a hub configuration built anew from the same material, as
        // after a restart, and an agent configuration as the TCP dialer makes one.
        let hub_config = || hub.rustls_config(TCP_ALPN).unwrap();
        let (mut c, mut s) = handshake(agent_tls.rustls_config(TCP_ALPN), hub_config());
        pump(&mut c, &mut s);
        assert_eq!(
            (c.handshake_kind(), s.handshake_kind()),
            (Some(Full), Some(Full))
        );
        let first_chain = s.peer_certificates().map(|c| c.to_vec());

        let (mut c, mut s) = handshake(agent_tls.rustls_config(TCP_ALPN), hub_config());
        pump(&mut c, &mut s);
        assert_eq!(
            (c.handshake_kind(), s.handshake_kind()),
            (Some(Resumed), Some(Resumed))
        );
        assert!(negotiated(&s, addr).unwrap().resumed);
        assert_eq!(s.peer_certificates().map(|c| c.to_vec()), first_chain);

        // Another agent's material (even of the same files) has no ticket of this one's.
        let other = agent_tls.with_own_tickets();
        let (c, s) = handshake(other.rustls_config(TCP_ALPN), hub_config());
        assert_eq!(
            (c.handshake_kind(), s.handshake_kind()),
            (Some(Full), Some(Full))
        );
        assert!(!negotiated(&s, addr).unwrap().resumed);
    }
}
