//! Compares stream multiplexers for the TLS-over-TCP transport, each over the same TLS 1.3
//! connection (tokio-rustls, ring, rna's own certificate checks) on loopback: one bulk stream,
//! 100 parallel streams, and 10,000 streams opened by the side that accepted the TCP
//! connection (the hub) towards the side that dialled (the agent), as rna opens tunnel streams.
//!
//! Run: `cargo run --release --example muxbench -- qmux` (or `yamux`; `--answer` after it has
//! the agent write one byte back on each stream); `benches/mux.sh` runs all in one go. Each candidate runs in its own process so its memory figure is its own.

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rna::certs::Ca;
use rna::transport::{ClientTls, ServerTls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use web_transport_trait::{RecvStream as _, SendStream as _, Session as _};

/// Bytes of the single bulk stream.
const BULK: usize = 256 * 1024 * 1024;
/// Parallel streams and bytes on each.
const PARALLEL: usize = 100;
const PARALLEL_BYTES: usize = 2 * 1024 * 1024;
/// Streams opened at once.
const MANY: usize = 10_000;
/// How long the stream-opening test waits before it reports a stall.
const STALL: Duration = Duration::from_secs(10);
const CHUNK: usize = 64 * 1024;
const ALPN: &[u8] = b"rna-bench/1";

/// A yamux stream as a tokio byte stream.
type YStream = Compat<yamux::Stream>;

/// One send half, whichever multiplexer made it.
enum Tx {
    Q(qmux::SendStream),
    Y(WriteHalf<YStream>),
}

/// One receive half.
enum Rx {
    Q(qmux::RecvStream),
    Y(ReadHalf<YStream>),
}

impl Tx {
    async fn write_all(&mut self, buf: &[u8]) {
        match self {
            Tx::Q(s) => s.write_all(buf).await.map(|_| ()).expect("qmux write"),
            Tx::Y(s) => s.write_all(buf).await.expect("yamux write"),
        }
    }
    async fn finish(&mut self) {
        match self {
            Tx::Q(s) => s.finish().expect("qmux finish"),
            Tx::Y(s) => s.shutdown().await.expect("yamux shutdown"),
        }
    }
}

impl Rx {
    /// Bytes read, 0 at the end.
    async fn read(&mut self, buf: &mut [u8]) -> usize {
        match self {
            Rx::Q(s) => match s.read_chunk(buf.len()).await.expect("qmux read") {
                Some(b) => {
                    buf[..b.len()].copy_from_slice(&b);
                    b.len()
                }
                None => 0,
            },
            Rx::Y(s) => s.read(buf).await.expect("yamux read"),
        }
    }
    async fn drain(&mut self) -> usize {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0;
        loop {
            let n = self.read(&mut buf).await;
            if n == 0 {
                return total;
            }
            total += n;
        }
    }
}

/// Opens and accepts streams on one side of a session.
#[derive(Clone)]
enum Side {
    Q(Box<qmux::Session>),
    Y {
        open: mpsc::UnboundedSender<oneshot::Sender<yamux::Stream>>,
        accept: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<yamux::Stream>>>,
    },
}

fn split_y(s: yamux::Stream) -> (Tx, Rx) {
    let (r, w): (ReadHalf<_>, WriteHalf<_>) = tokio::io::split(s.compat());
    (Tx::Y(w), Rx::Y(r))
}

impl Side {
    async fn open(&self) -> (Tx, Rx) {
        match self {
            Side::Q(s) => {
                let (tx, rx) = s.open_bi().await.expect("qmux open");
                (Tx::Q(tx), Rx::Q(rx))
            }
            Side::Y { open, .. } => {
                let (tx, rx) = oneshot::channel();
                open.send(tx).expect("yamux driver");
                split_y(rx.await.expect("yamux open"))
            }
        }
    }
    async fn accept(&self) -> (Tx, Rx) {
        match self {
            Side::Q(s) => {
                let (tx, rx) = s.accept_bi().await.expect("qmux accept");
                (Tx::Q(tx), Rx::Q(rx))
            }
            Side::Y { accept, .. } => split_y(accept.lock().await.recv().await.expect("accept")),
        }
    }
}

/// Runs a yamux connection: opens streams on request, hands inbound ones out.
fn yamux_side<T>(io: T, mode: yamux::Mode) -> Side
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let mut config = yamux::Config::default();
    // 10,000 streams need the connection window unbounded: yamux asserts it is at least
    // 256 KiB × max streams.
    config.set_max_connection_receive_window(None);
    config.set_max_num_streams(16_384);
    let mut conn = yamux::Connection::new(io.compat(), config, mode);
    let (open_tx, mut open_rx) = mpsc::unbounded_channel::<oneshot::Sender<yamux::Stream>>();
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut pending: Option<oneshot::Sender<yamux::Stream>> = None;
        std::future::poll_fn(|cx| loop {
            if pending.is_none() {
                if let Poll::Ready(Some(tx)) = open_rx.poll_recv(cx) {
                    pending = Some(tx);
                }
            }
            if pending.is_some() {
                if let Poll::Ready(r) = conn.poll_new_outbound(cx) {
                    if let (Some(tx), Ok(s)) = (pending.take(), r) {
                        let _ = tx.send(s);
                    }
                    continue;
                }
            }
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => {
                    let _ = in_tx.send(s);
                }
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        })
        .await;
    });
    Side::Y {
        open: open_tx,
        accept: Arc::new(tokio::sync::Mutex::new(in_rx)),
    }
}

fn qmux_config() -> qmux::Config {
    let mut c = qmux::Config::negotiated(qmux::Version::QMux02, None);
    c.max_streams_bidi = 16_384;
    c.max_streams_uni = 0;
    c.max_data = 32 * 1024 * 1024;
    c.max_stream_data_bidi_local = 4 * 1024 * 1024;
    c.max_stream_data_bidi_remote = 4 * 1024 * 1024;
    c.max_stream_data_uni = 0;
    c
}

/// (hub side, agent side) over one TLS 1.3 connection on loopback.
async fn pair(mux: &str) -> (Side, Side) {
    rna::transport::tls::install_provider();
    let ca = Ca::generate("bench CA").expect("CA");
    let hub = ca.issue_hub(&["localhost".into()]).expect("hub cert");
    let agent = ca.issue_agent("bench").expect("agent cert");
    let server = ServerTls::from_pem(&ca.cert_pem(), &hub.cert_pem, &hub.key_pem).expect("tls");
    let client = ClientTls::from_pem(&ca.cert_pem(), &agent.cert_pem, &agent.key_pem).expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        server.rustls_config(ALPN).expect("server config"),
    ));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client.rustls_config(ALPN)));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        tcp.set_nodelay(true).expect("nodelay");
        acceptor.accept(tcp).await.expect("server TLS")
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let client_tls = connector.connect(name, tcp).await.expect("client TLS");
    let server_tls = accepted.await.expect("join");
    match mux {
        "qmux" => {
            let rec = qmux_config().max_record_size;
            let s = qmux::transport::Stream::new(server_tls, qmux::Version::QMux02, rec);
            let c = qmux::transport::Stream::new(client_tls, qmux::Version::QMux02, rec);
            let (s, c) = tokio::join!(
                qmux::Session::accept(s, qmux_config()),
                qmux::Session::connect(c, qmux_config())
            );
            (
                Side::Q(Box::new(s.expect("qmux"))),
                Side::Q(Box::new(c.expect("qmux"))),
            )
        }
        "yamux" => (
            yamux_side(server_tls, yamux::Mode::Server),
            yamux_side(client_tls, yamux::Mode::Client),
        ),
        other => panic!("unknown multiplexer {other}: qmux or yamux"),
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn send_bytes(mut tx: Tx, n: usize) {
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK);
        tx.write_all(&chunk[..k]).await;
        left -= k;
    }
    tx.finish().await;
    // Keep the half alive until the peer has read everything (dropping may reset).
    tokio::time::sleep(Duration::from_millis(200)).await;
}

async fn bulk(hub: &Side, agent: &Side) -> f64 {
    let agent = agent.clone();
    let reader = tokio::spawn(async move {
        let (_tx, mut rx) = agent.accept().await;
        rx.drain().await
    });
    let started = Instant::now();
    let (tx, _rx) = hub.open().await;
    tokio::spawn(send_bytes(tx, BULK));
    let got = reader.await.expect("reader");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(got, BULK);
    BULK as f64 / secs / 1e6
}

async fn parallel(hub: &Side, agent: &Side) -> f64 {
    let agent2 = agent.clone();
    let readers = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..PARALLEL {
            let (tx, mut rx) = agent2.accept().await;
            set.spawn(async move {
                let _keep = tx;
                rx.drain().await
            });
        }
        let mut total = 0;
        while let Some(n) = set.join_next().await {
            total += n.expect("reader");
        }
        total
    });
    let started = Instant::now();
    for _ in 0..PARALLEL {
        let (tx, rx) = hub.open().await;
        tokio::spawn(async move {
            let _keep = rx;
            send_bytes(tx, PARALLEL_BYTES).await
        });
    }
    let got = readers.await.expect("readers");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(got, PARALLEL * PARALLEL_BYTES);
    got as f64 / secs / 1e6
}

/// Opens `MANY` streams from the hub side; the agent side reads one byte on each and, when
/// `answer`, writes one back. Returns (streams the agent saw, seconds, KiB of RSS per stream).
async fn many(hub: &Side, agent: &Side, answer: bool) -> (usize, f64, f64) {
    let before = rss_kib();
    let agent = agent.clone();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let acceptor = tokio::spawn(async move {
        let mut keep = Vec::with_capacity(MANY);
        loop {
            let (mut tx, mut rx) = agent.accept().await;
            let mut b = [0u8; 1];
            rx.read(&mut b).await;
            if answer {
                tx.write_all(b"k").await;
            }
            keep.push((tx, rx));
            let _ = seen_tx.send(());
        }
    });
    let started = Instant::now();
    let hub2 = hub.clone();
    let opener = tokio::spawn(async move {
        let mut keep = Vec::with_capacity(MANY);
        for _ in 0..MANY {
            let (mut tx, rx) = hub2.open().await;
            tx.write_all(b"o").await;
            keep.push((tx, rx));
        }
        keep
    });
    let mut seen = 0;
    let deadline = tokio::time::sleep(STALL);
    tokio::pin!(deadline);
    while seen < MANY {
        tokio::select! {
            Some(()) = seen_rx.recv() => seen += 1,
            () = &mut deadline => break,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let per = (rss_kib().saturating_sub(before)) as f64 / seen.max(1) as f64;
    opener.abort();
    acceptor.abort();
    (seen, secs, per)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mux = args.next().unwrap_or_else(|| "qmux".into());
    let answer = args.next().as_deref() == Some("--answer");
    let (hub, agent) = pair(&mux).await;
    // Streams first, while the heap is fresh, so the memory figure is the streams' own.
    let (seen, secs, per) = many(&hub, &agent, answer).await;
    let how = if answer {
        "agent answers each"
    } else {
        "agent silent"
    };
    println!(
        "{mux}: {MANY} streams opened by the hub, {how}: {seen} reached the agent in \
         {secs:.2} s, {per:.1} KiB RSS per stream (both ends)"
    );
    if answer {
        return;
    }
    let (hub, agent) = pair(&mux).await;
    let b = bulk(&hub, &agent).await;
    println!("{mux}: bulk 1 stream {b:.0} MB/s");
    let p = parallel(&hub, &agent).await;
    println!("{mux}: {PARALLEL} parallel streams {p:.0} MB/s");
}
