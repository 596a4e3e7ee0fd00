//! The SOCKS5 front (RFC 1928 with RFC 1929 user/password): the user name names the agent,
//! the password is a token with scope `proxy`; CONNECT is routed to the agent, whose
//! answer becomes the SOCKS reply. Parsing is fast-socks5's low-level protocol steps; the
//! RFC 1929 sub-negotiation is ours, so authentication is async, bounded and never logs the
//! password.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fast_socks5::server::{
    states, AuthMethod, AuthMethodSuccessState, NoAuthentication, NoAuthenticationImpl,
    Socks5ServerProtocol, SocksServerError,
};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument};

use super::router::{self, RouteError};
use super::{NoAuthRoute, Shared};
use crate::auth::{Scope, Tenant, TokenStore};
use crate::certs::valid_agent_name;
use crate::listen::Acceptor;
use crate::proto::{Host, Open};
use crate::transport::relay::{relay, Direction, RelayError};

/// Why a SOCKS client was turned away before its request was routed.
#[derive(Debug, thiserror::Error)]
pub enum GreetError {
    /// The bytes did not follow RFC 1928/1929.
    #[error("malformed SOCKS5 handshake: {0}")]
    Protocol(#[from] SocksServerError),
    /// RFC 1929 sub-negotiation was malformed.
    #[error("malformed RFC 1929 authentication: {0}")]
    Auth(&'static str),
    /// The credentials were refused.
    #[error("authentication refused for user {user:?}: {reason}")]
    Refused {
        /// The user name (agent) the client asked for.
        user: String,
        /// Why (never the password).
        reason: String,
    },
    /// Reading the socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The SOCKS5 listener and its per-client bounds.
pub(crate) struct SocksFront {
    shared: Arc<Shared>,
    listener: Acceptor,
    half_open: Arc<HalfOpen>,
}

impl SocksFront {
    pub(crate) fn new(shared: Arc<Shared>, listener: TcpListener) -> Self {
        let limits = &shared.config.socks_limits;
        let half_open = Arc::new(HalfOpen {
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: limits.half_open_per_ip,
            max_total: limits.half_open_total,
        });
        SocksFront {
            shared,
            listener: Acceptor::new(listener, "SOCKS5"),
            half_open,
        }
    }

    /// Accepts until `stop` fires; every connection runs in `streams` so shutdown can drain
    /// them.
    pub(crate) async fn run(mut self, stop: CancellationToken, streams: TaskTracker) {
        loop {
            // Accept errors (EMFILE and the like) back off and are logged at most once a
            // second inside the acceptor, so the connections we have keep being served.
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let guard = match self.half_open.admit(peer.ip()) {
                Ok(g) => g,
                Err(reason) => {
                    self.shared.metrics.socks_refused(reason);
                    debug!(client = %peer, "SOCKS connection refused: {reason}");
                    drop(tcp);
                    continue;
                }
            };
            let shared = self.shared.clone();
            streams.spawn(
                handle(shared, tcp, peer, guard)
                    .instrument(tracing::debug_span!("socks", client = %peer)),
            );
        }
    }
}

/// Counts connections still in the greeting, per client IP and in total.
struct HalfOpen {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
    max_total: usize,
}

impl HalfOpen {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<HalfOpenGuard, &'static str> {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = map.values().sum();
        if total >= self.max_total {
            return Err("half_open_total");
        }
        let count = map.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return Err("half_open_per_ip");
        }
        *count += 1;
        Ok(HalfOpenGuard {
            owner: self.clone(),
            ip,
        })
    }
}

struct HalfOpenGuard {
    owner: Arc<HalfOpen>,
    ip: IpAddr,
}

impl Drop for HalfOpenGuard {
    fn drop(&mut self) {
        let mut map = self.owner.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Who an authenticated SOCKS client is and where it goes.
#[derive(Debug, Clone)]
struct Caller {
    tenant: Tenant,
    agent: String,
}

type Request<S> = (
    Socks5ServerProtocol<S, states::CommandRead>,
    Caller,
    Socks5Command,
    TargetAddr,
);

async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, guard: HalfOpenGuard) {
    let timeout = shared.config.socks_limits.greeting_timeout;
    let tokens = shared.tokens.current();
    let no_auth = shared.config.socks_no_auth.as_ref();
    let greeted = tokio::time::timeout(timeout, greet(&tokens, no_auth, tcp)).await;
    drop(tokens);
    drop(guard);
    let (proto, caller, cmd, target) = match greeted {
        Err(_) => {
            shared.metrics.socks_refused("greeting_timeout");
            info!(client = %peer, "SOCKS client dropped: greeting not completed within {timeout:?}");
            return;
        }
        Ok(Err(e)) => {
            let reason = match &e {
                GreetError::Refused { .. } => "auth_refused",
                _ => "bad_greeting",
            };
            shared.metrics.socks_refused(reason);
            info!(client = %peer, "SOCKS client refused: {e}");
            return;
        }
        Ok(Ok(request)) => request,
    };
    let agent = caller.agent.clone();
    let span = tracing::info_span!("stream", agent = %agent, tenant = %caller.tenant,
        stream = tracing::field::Empty);
    serve_request(shared, proto, caller, cmd, target, peer)
        .instrument(span)
        .await;
}

async fn serve_request(
    shared: Arc<Shared>,
    proto: Socks5ServerProtocol<TcpStream, states::CommandRead>,
    caller: Caller,
    cmd: Socks5Command,
    target: TargetAddr,
    peer: SocketAddr,
) {
    if cmd != Socks5Command::TCPConnect {
        shared.metrics.socks_reply(reply_name(0x07));
        info!(client = %peer, "SOCKS {cmd:?} refused: command not supported");
        let _ = proto.reply_error(&ReplyError::CommandNotSupported).await;
        return;
    }
    let open = match to_open(target) {
        Ok(open) => open,
        Err((code, why)) => {
            shared.metrics.socks_reply(reply_name(code));
            info!(client = %peer, "SOCKS request refused: {why}");
            let _ = proto.reply_error(&reply_error(code)).await;
            return;
        }
    };
    let destination = format!("{}:{}", open.host, open.port);
    let tunnel = match router::open_tunnel(&shared, &caller.tenant, &caller.agent, &open).await {
        Ok(t) => t,
        Err(e) => {
            let code = e.socks_reply();
            shared.metrics.socks_reply(reply_name(code));
            match &e {
                RouteError::NoAgent => {
                    info!(client = %peer, %destination, "SOCKS request refused: agent not connected")
                }
                other => info!(client = %peer, %destination, "SOCKS request failed: {other}"),
            }
            let _ = proto.reply_error(&reply_error(code)).await;
            return;
        }
    };
    let router::Tunnel {
        slot,
        send,
        recv,
        bound,
    } = tunnel;
    let tcp = match proto.reply_success(bound).await {
        Ok(tcp) => tcp,
        Err(e) => {
            debug!("SOCKS client gone before the reply: {e}");
            router::abort(send, recv);
            return;
        }
    };
    shared.metrics.socks_reply(reply_name(0x00));
    let metrics = shared.metrics.clone();
    let session = slot.session().clone();
    metrics.streams_open().inc();
    let stream_id = send.id();
    tracing::Span::current().record("stream", tracing::field::display(stream_id));
    let idle = Some(shared.config.caps.stream_idle_timeout);
    let outcome = relay(
        tcp,
        send,
        recv,
        idle,
        |direction, n| {
            let to_agent = direction == Direction::Sent;
            metrics.relayed(to_agent, n);
            if to_agent {
                session.add_to_agent(n);
            } else {
                session.add_from_agent(n);
            }
        },
        shared.cut_streams.cancelled(),
    )
    .await;
    metrics.streams_open().dec();
    drop(slot);
    if let Some(RelayError::Idle(quiet)) = &outcome.error {
        metrics.cap_refused("stream_idle_timeout");
        info!(stream = %stream_id, %destination, "stream closed: idle for {quiet:?}");
    }
    match outcome.error {
        None => debug!(stream = %stream_id, %destination, sent = outcome.sent,
            received = outcome.received, "stream finished"),
        Some(e) => debug!(stream = %stream_id, %destination, sent = outcome.sent,
            received = outcome.received, "stream reset: {e}"),
    }
}

/// Checks the requested destination before it is sent to the agent.
fn to_open(target: TargetAddr) -> Result<Open, (u8, String)> {
    let (host, port) = match target {
        TargetAddr::Ip(addr) => (Host::Ip(addr.ip()), addr.port()),
        TargetAddr::Domain(name, port) => {
            if !valid_host_name(&name) {
                return Err((0x04, format!("invalid host name ({} bytes)", name.len())));
            }
            (Host::Domain(name), port)
        }
    };
    if port == 0 {
        return Err((0x02, format!("port 0 of {host} is not a destination")));
    }
    Ok(Open { host, port })
}

/// A DNS name an agent could resolve: at most 253 bytes, labels of 1–63 letters, digits,
/// `-` or `_` (RFC 1035 §2.3.4; `_` appears in service names).
pub fn valid_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn reply_error(code: u8) -> ReplyError {
    match code {
        0x02 => ReplyError::ConnectionNotAllowed,
        0x03 => ReplyError::NetworkUnreachable,
        0x04 => ReplyError::HostUnreachable,
        0x05 => ReplyError::ConnectionRefused,
        0x06 => ReplyError::ConnectionTimeout,
        0x07 => ReplyError::CommandNotSupported,
        0x08 => ReplyError::AddressTypeNotSupported,
        _ => ReplyError::GeneralFailure,
    }
}

/// Metric label of a SOCKS5 reply code.
fn reply_name(code: u8) -> &'static str {
    match code {
        0x00 => "succeeded",
        0x02 => "not_allowed",
        0x03 => "network_unreachable",
        0x04 => "host_unreachable",
        0x05 => "connection_refused",
        0x06 => "ttl_expired",
        0x07 => "command_not_supported",
        0x08 => "address_type_not_supported",
        _ => "general_failure",
    }
}

/// What an unauthenticated client's bytes become: the caller and its checked destination
/// (or the SOCKS reply code it was refused with). Only for fuzzing the front.
#[doc(hidden)]
#[derive(Debug)]
pub struct FuzzRequest {
    /// Tenant of the caller.
    pub tenant: String,
    /// Agent asked for.
    pub agent: String,
    /// Destination, or the refusal code.
    pub open: Result<Open, u8>,
}

/// Runs the front's pre-routing steps (greeting, RFC 1929 authentication against `tokens`,
/// request, destination checks, error reply) on any byte stream, exactly as a TCP client
/// gets them, and stops where routing would start. Exposed for the fuzz targets.
#[doc(hidden)]
pub async fn fuzz_front<S>(
    stream: S,
    tokens: &TokenStore,
    no_auth: Option<&NoAuthRoute>,
) -> Result<FuzzRequest, GreetError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (proto, caller, cmd, target) = greet(tokens, no_auth, stream).await?;
    let open = if cmd == Socks5Command::TCPConnect {
        to_open(target).map_err(|(code, _)| code)
    } else {
        Err(0x07)
    };
    let code = match &open {
        Ok(_) => 0x04,
        Err(code) => *code,
    };
    let _ = proto.reply_error(&reply_error(code)).await;
    Ok(FuzzRequest {
        tenant: caller.tenant.to_string(),
        agent: caller.agent,
        open,
    })
}

/// Reads greeting, authentication and request. Not cancel-safe (runs under a timeout that
/// abandons the connection).
async fn greet<S>(
    tokens: &TokenStore,
    no_auth: Option<&NoAuthRoute>,
    stream: S,
) -> Result<Request<S>, GreetError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_auth = no_auth.cloned();
    let methods: &[Method] = if no_auth.is_some() {
        &[
            Method::TokenAuth(TokenAuth),
            Method::NoAuthentication(NoAuthentication),
        ]
    } else {
        &[Method::TokenAuth(TokenAuth)]
    };
    let started = Socks5ServerProtocol::start(stream)
        .negotiate_auth(methods)
        .await?;
    let (authed, caller) = match started {
        MethodStarted::TokenAuth(mut auth) => {
            let (user, password) = auth.read_credentials().await?;
            match authorize(tokens, &user, &password) {
                Ok(caller) => {
                    auth.reply(true).await?;
                    (Socks5ServerProtocol::finish_auth(auth), caller)
                }
                Err(reason) => {
                    let _ = auth.reply(false).await;
                    return Err(GreetError::Refused { user, reason });
                }
            }
        }
        MethodStarted::NoAuthentication(auth) => {
            let route = no_auth.ok_or(GreetError::Auth("no-auth method not offered"))?;
            let caller = Caller {
                tenant: route.tenant,
                agent: route.agent,
            };
            (auth.finish_auth(), caller)
        }
    };
    let (proto, cmd, target) = authed.read_command().await?;
    Ok((proto, caller, cmd, target))
}

fn authorize(tokens: &TokenStore, user: &str, password: &str) -> Result<Caller, String> {
    if !valid_agent_name(user) {
        return Err("user name is not a valid agent name".into());
    }
    let grant = tokens
        .authorize(password, Scope::Proxy, SystemTime::now())
        .map_err(|e| e.to_string())?;
    Ok(Caller {
        tenant: grant.tenant,
        agent: user.to_string(),
    })
}

/// RFC 1929 username/password, method 0x02, checked against the token store.
#[derive(Debug, Clone, Copy)]
struct TokenAuth;

/// A connection in RFC 1929 sub-negotiation.
struct TokenAuthState<T>(T);

impl<T> AuthMethod<T> for TokenAuth {
    type StartingState = TokenAuthState<T>;

    fn method_id(self) -> u8 {
        0x02
    }

    fn new(self, inner: T) -> TokenAuthState<T> {
        TokenAuthState(inner)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> TokenAuthState<T> {
    /// RFC 1929 §2: VER(1)=0x01 ULEN(1) UNAME(1-255) PLEN(1) PASSWD(1-255).
    async fn read_credentials(&mut self) -> Result<(String, String), GreetError> {
        let version = self.0.read_u8().await?;
        if version != 0x01 {
            return Err(GreetError::Auth("sub-negotiation version is not 1"));
        }
        let user = read_field(&mut self.0).await?;
        let password = read_field(&mut self.0).await?;
        let user =
            String::from_utf8(user).map_err(|_| GreetError::Auth("user name is not UTF-8"))?;
        let password =
            String::from_utf8(password).map_err(|_| GreetError::Auth("password is not UTF-8"))?;
        Ok((user, password))
    }

    /// RFC 1929 §2: VER(1)=0x01 STATUS(1), 0x00 success; anything else closes.
    async fn reply(&mut self, ok: bool) -> Result<(), GreetError> {
        self.0
            .write_all(&[0x01, if ok { 0x00 } else { 0x01 }])
            .await?;
        self.0.flush().await?;
        Ok(())
    }
}

async fn read_field<T: AsyncRead + Unpin>(r: &mut T) -> Result<Vec<u8>, GreetError> {
    let len = r.read_u8().await? as usize;
    if len == 0 {
        return Err(GreetError::Auth("empty user name or password"));
    }
    let mut field = vec![0u8; len];
    r.read_exact(&mut field).await?;
    Ok(field)
}

impl<T> AuthMethodSuccessState<T> for TokenAuthState<T> {
    fn into_inner(self) -> T {
        self.0
    }
}

fast_socks5::auth_method_enums! {
    /// The methods the front offers: token auth always, no-auth only when configured.
    enum Method / MethodStarted<T> {
        TokenAuth(TokenAuthState<T>),
        NoAuthentication(NoAuthenticationImpl<T>),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        let table = [
            ("jenkins.internal", true),
            ("a", true),
            ("_svc._tcp.example.com", true),
            ("example.com.", true),
            ("", false),
            (".", false),
            ("a..b", false),
            ("bad host", false),
            ("x\u{0}y", false),
        ];
        for (name, ok) in table {
            assert_eq!(valid_host_name(name), ok, "{name:?}");
        }
        assert!(!valid_host_name(&"a".repeat(64)));
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(!valid_host_name(&long));
    }

    #[test]
    fn destinations_are_checked_before_routing() {
        assert!(to_open(TargetAddr::Domain("a.b".into(), 80)).is_ok());
        assert_eq!(
            to_open(TargetAddr::Domain("a.b".into(), 0)).unwrap_err().0,
            0x02
        );
        assert_eq!(
            to_open(TargetAddr::Ip("10.0.0.1:0".parse().unwrap()))
                .unwrap_err()
                .0,
            0x02
        );
        assert_eq!(
            to_open(TargetAddr::Domain("a b".into(), 80)).unwrap_err().0,
            0x04
        );
    }
}
