//! Accepting TCP connections without spinning, and serving small HTTP endpoints with
//! deadlines and connection caps. Shared by the hub (SOCKS front, admin API) and the agent
//! (health and metrics endpoint), so it lives below both.
//!
//! Why: an accept that fails with `EMFILE` leaves the connection in the kernel's queue, so the
//! next accept fails again at once; a loop that only logs and retries burns a core and writes
//! a log line per try. And an HTTP server without deadlines keeps every half-sent request (and
//! its descriptor) for as long as the client likes.

mod log_budget;
mod slots;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use log_budget::LogBudget;
pub use slots::{KeyedSlots, Slot, SlotsFull};

/// First pause after an accept error that is not about one connection (`EMFILE`, `ENFILE`,
/// `ENOBUFS`, ...); doubled on every further error in a row, up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(10);

/// Longest pause between accept attempts: service resumes at most this long after
/// descriptors are free again.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// At most one log line per listener per this interval; the rest are counted.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// How long connections of a stopped HTTP server get to finish the request they are in.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// A TCP listener whose [`accept`](Acceptor::accept) backs off on errors and logs them at
/// most once a second, with the number of errors left unlogged in between.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    /// Names the listener in log lines (`SOCKS5`, `admin API`, ...).
    what: &'static str,
    /// Pause before the next accept after an error; reset by a success.
    backoff: Duration,
    /// One line per [`LOG_EVERY`], with the errors not logged since the last one.
    log: LogBudget,
    /// Whether errors happened since the last success, so recovery is logged once.
    failing: bool,
}

impl Acceptor {
    /// Wraps a bound listener; `what` names it in log lines.
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        Acceptor {
            listener,
            what,
            backoff: MIN_BACKOFF,
            log: LogBudget::per(LOG_EVERY),
            failing: false,
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection. Errors are never returned: an error about one connection (reset
    /// or aborted before it was accepted) is skipped, any other (out of descriptors or
    /// memory) pauses this listener with an exponential backoff up to 1 s, so the process
    /// keeps serving the connections it has instead of spinning.
    ///
    /// Cancel-safe: dropping the future loses no connection (one accepted is returned at
    /// once; a pause in progress is just cut short).
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = MIN_BACKOFF;
                    // Said once, and within the same one-line-a-second budget as the errors,
                    // so a listener flapping at the descriptor limit cannot flood the log.
                    if self.failing {
                        if let Some(unlogged) = self.log.line() {
                            info!(
                                listener = self.what,
                                unlogged_errors = unlogged,
                                "accepting connections again"
                            );
                            self.failing = false;
                        }
                    }
                    return accepted;
                }
                Err(e) => {
                    self.failing = true;
                    if let Some(unlogged) = self.log.event() {
                        warn!(
                            listener = self.what,
                            unlogged_errors = unlogged,
                            "accept failed, backing off: {e}"
                        );
                    }
                    if !is_per_connection(&e) {
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
}

/// Errors about one queued connection only: the next accept may well succeed.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Deadlines and caps of an HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request head must arrive whole within this, counted from the connection's start
    /// or, on a kept-alive connection, from the end of the previous answer: it bounds idle
    /// keep-alive connections too.
    pub header_timeout: Duration,
    /// After its head, a request's body must arrive within this, and an answer that is not a
    /// long-running command (those have their own bounds) must be ready within it as well.
    pub request_timeout: Duration,
    /// Connections open at once from all clients; more are answered 503 and closed.
    pub max_connections: usize,
    /// Connections open at once from one client IP address; more are answered 503 and
    /// closed.
    pub max_connections_per_ip: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_connections_per_ip: 64,
        }
    }
}

/// Which connection cap turned a client away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionCap {
    /// [`HttpLimits::max_connections`].
    Total,
    /// [`HttpLimits::max_connections_per_ip`].
    PerIp,
}

/// Takes a place for a connection from `ip` in `open` (capped in total when `open` was made,
/// and per address at `max_per_ip`), or names the cap that is full.
fn admit(
    open: &KeyedSlots<IpAddr>,
    ip: IpAddr,
    max_per_ip: usize,
) -> Result<Slot<IpAddr>, ConnectionCap> {
    open.take(ip, max_per_ip).map_err(|full| match full {
        SlotsFull::Total => ConnectionCap::Total,
        SlotsFull::Key => ConnectionCap::PerIp,
    })
}

/// What a client over a connection cap reads before the connection closes.
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n";

/// Serves `app` over HTTP/1.1 on `acceptor` until `stop` fires, with `limits`' header
/// deadline and connection caps (apply [`request_deadline`] to `app` for the request
/// deadline). `refused` is told of every connection turned away by a cap. On stop, open
/// connections finish the request they are in (at most 5 s) and close.
pub async fn serve_http<F>(
    mut acceptor: Acceptor,
    app: Router,
    limits: &HttpLimits,
    stop: CancellationToken,
    refused: F,
) where
    F: Fn(ConnectionCap) + Send + Sync + 'static,
{
    let open = KeyedSlots::new(Some(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let tasks = TaskTracker::new();
    // Refusals are logged at most once a second, with how many there were since.
    let mut refusals = LogBudget::per(LOG_EVERY);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        let guard = match admit(&open, peer.ip(), limits.max_connections_per_ip) {
            Ok(g) => g,
            Err(cap) => {
                refused(cap);
                if let Some(unlogged) = refusals.event() {
                    // This refusal and those that went without a line since the last.
                    warn!(listener = acceptor.what, client = %peer, ?cap,
                        refused = unlogged + 1,
                        "connections refused: connection cap reached");
                }
                // Best effort and never waiting: a client that does not read gets nothing.
                let _ = tcp.try_write(OVER_CAP);
                continue;
            }
        };
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let stop = stop.clone();
        tasks.spawn(async move {
            let _guard = guard;
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        debug!(client = %peer, "HTTP connection ended: {e}");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HTTP_DRAIN, conn).await;
                }
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(HTTP_DRAIN, tasks.wait()).await;
}

/// The request deadline of one set of routes, for [`request_deadline`].
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// How long the body may take to arrive after the head.
    pub timeout: Duration,
    /// Largest body read ahead of the route (at least every route's own limit): memory held
    /// per request stays bounded; a longer body is the route's to refuse.
    pub max_body: usize,
    /// Whether the answer must also be ready within `timeout` (off for routes that run
    /// long commands under their own deadline).
    pub bound_answer: bool,
}

/// Middleware (`axum::middleware::from_fn_with_state(deadline, request_deadline)`): reads the
/// whole body within the deadline (408 when it does not arrive; a body over `max_body` reaches
/// the route as the length-limit error its extractor turns into 413), then runs the route,
/// bounded by the same deadline when `bound_answer` (503 when late).
pub async fn request_deadline(
    State(deadline): State<Deadline>,
    request: Request,
    next: Next,
) -> Response {
    let started = tokio::time::Instant::now();
    let (parts, body) = request.into_parts();
    let read = Limited::new(body, deadline.max_body).collect();
    let body = match tokio::time::timeout(deadline.timeout, read).await {
        Ok(Ok(collected)) => Body::from(collected.to_bytes()),
        // Too large, or broken: the route answers as it would have (its own 413, after its
        // own authorization), since its body extractor meets the same error.
        Ok(Err(e)) => Body::new(http_body_util::StreamBody::new(futures_util::stream::once(
            async move { Err::<hyper::body::Frame<axum::body::Bytes>, _>(e) },
        ))),
        Err(_) => {
            debug!(timeout = ?deadline.timeout, "request body did not arrive in time");
            return closing(
                StatusCode::REQUEST_TIMEOUT,
                "request body did not arrive in time\n",
            );
        }
    };
    let request = Request::from_parts(parts, body);
    if !deadline.bound_answer {
        return next.run(request).await;
    }
    let left = deadline.timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, next.run(request)).await {
        Ok(response) => response,
        Err(_) => closing(
            StatusCode::SERVICE_UNAVAILABLE,
            "answer not ready in time\n",
        ),
    }
}

/// A plain-text answer after which the connection is closed (its request was cut short).
fn closing(status: StatusCode, text: &'static str) -> Response {
    let mut response = (status, text).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_ip_and_in_total_and_free_on_drop() {
        let c = KeyedSlots::new(Some(3));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = admit(&c, a, 2).unwrap();
        let a2 = admit(&c, a, 2).unwrap();
        assert_eq!(admit(&c, a, 2).err(), Some(ConnectionCap::PerIp));
        let b1 = admit(&c, b, 2).unwrap();
        assert_eq!(admit(&c, b, 2).err(), Some(ConnectionCap::Total));
        drop(a1);
        let b2 = admit(&c, b, 2).unwrap();
        drop((a2, b1, b2));
        assert_eq!((c.total(), c.keys()), (0, 0), "no zero entries kept");
    }

    #[test]
    fn only_connection_errors_skip_the_backoff() {
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
        ] {
            assert!(is_per_connection(&io::Error::from(kind)));
        }
        // EMFILE and ENFILE: the process or the system is out of descriptors.
        for errno in [24, 23, 105, 12] {
            assert!(!is_per_connection(&io::Error::from_raw_os_error(errno)));
        }
    }
}
