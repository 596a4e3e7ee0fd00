//! The SOCKS5 front (RFC 1928 with RFC 1929 user/password): the user name names the agent
//! (`agent`, or `agent@organization/environment` for an `admin` token), the password is a
//! token with scope `proxy`; CONNECT is routed to the agent, whose answer becomes the SOCKS
//! reply. Parsing is fast-socks5's low-level protocol steps; the RFC 1929 sub-negotiation is
//! ours, so authentication is async, bounded and never logs the password. A connection lives
//! only as long as its token: revoking it (or its expiry) resets the connection.

use std::collections::{BTreeMap, HashMap};
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
use tracing::{debug, info, warn, Instrument};

use super::router::{self, RouteError};
use super::{NoAuthRoute, Shared};
use crate::auth::{Masked, Scope, Tenant, TokenStore};
use crate::identity::valid_agent_name;
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
    #[error("authentication refused for {who}: {reason}")]
    Refused {
        /// The user name as it may be logged ([`describe_user`]): quoted when it is an agent
        /// name, otherwise only its length.
        who: String,
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
            state: Mutex::new(HalfOpenState::default()),
            max_per_source: limits.half_open_per_ip,
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
            let (guard, evicted) = match self.half_open.admit(peer.ip()) {
                Ok(admitted) => admitted,
                Err(reason) => {
                    self.shared.metrics.socks_refused(reason);
                    debug!(client = %peer, "SOCKS connection refused: {reason}");
                    drop(tcp);
                    continue;
                }
            };
            if let Some(source) = evicted {
                self.shared.metrics.socks_refused("half_open_total");
                debug!(client = %peer, evicted = %source,
                    "SOCKS greeting limit reached: dropped the oldest half-open connection of the busiest source");
            }
            let shared = self.shared.clone();
            streams.spawn(
                handle(shared, tcp, peer, guard)
                    .instrument(tracing::debug_span!("socks", client = %peer)),
            );
        }
    }
}

/// Where a half-open connection comes from, for its per-source count: the IPv4 address, or
/// the /64 network of an IPv6 address (one host usually holds a whole /64, so counting
/// single IPv6 addresses would give it millions of allowances).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source(IpAddr);

impl Source {
    fn of(ip: IpAddr) -> Source {
        Source(super::admission::source_block(ip))
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(net) => write!(f, "{net}/64"),
            IpAddr::V4(ip) => write!(f, "{ip}"),
        }
    }
}

/// Connections still in the greeting, per source and in total. A source at its own cap is
/// refused; when the total is full, the oldest half-open connection of the source holding
/// the most is dropped to make room, so a flood from a few sources cannot lock out a client
/// from anywhere else.
struct HalfOpen {
    state: Mutex<HalfOpenState>,
    max_per_source: usize,
    max_total: usize,
}

#[derive(Default)]
struct HalfOpenState {
    /// Per source, its half-open connections by admission number (oldest first), each with
    /// the token that drops it.
    sources: HashMap<Source, BTreeMap<u64, CancellationToken>>,
    total: usize,
    next: u64,
}

impl HalfOpen {
    /// Admits a connection from `ip`, returning its guard and the source whose oldest
    /// half-open connection was dropped to make room, if one was.
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<(HalfOpenGuard, Option<Source>), &'static str> {
        let source = Source::of(ip);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let held = state.sources.get(&source).map_or(0, BTreeMap::len);
        if held >= self.max_per_source {
            return Err("half_open_per_ip");
        }
        let mut evicted = None;
        if state.total >= self.max_total {
            evicted = state.evict_busiest();
            if evicted.is_none() {
                return Err("half_open_total");
            }
        }
        let seq = state.next;
        state.next += 1;
        let drop_me = CancellationToken::new();
        state
            .sources
            .entry(source)
            .or_default()
            .insert(seq, drop_me.clone());
        state.total += 1;
        Ok((
            HalfOpenGuard {
                owner: self.clone(),
                source,
                seq,
                dropped: drop_me,
            },
            evicted,
        ))
    }
}

impl HalfOpenState {
    /// Drops the oldest half-open connection of the source holding the most (the oldest
    /// among equals) and returns that source.
    fn evict_busiest(&mut self) -> Option<Source> {
        let (&source, _) = self
            .sources
            .iter()
            .filter_map(|(source, held)| {
                held.keys()
                    .next()
                    .map(|&oldest| (source, (held.len(), oldest)))
            })
            .max_by(|(_, (a_len, a_oldest)), (_, (b_len, b_oldest))| {
                a_len.cmp(b_len).then(b_oldest.cmp(a_oldest))
            })?;
        let held = self.sources.get_mut(&source)?;
        let (_, drop_it) = held.pop_first()?;
        if held.is_empty() {
            self.sources.remove(&source);
        }
        self.total -= 1;
        drop_it.cancel();
        Some(source)
    }
}

/// One admitted half-open connection; leaves the count when dropped.
struct HalfOpenGuard {
    owner: Arc<HalfOpen>,
    source: Source,
    seq: u64,
    /// Fired when the connection is dropped to make room for a newcomer.
    dropped: CancellationToken,
}

impl Drop for HalfOpenGuard {
    fn drop(&mut self) {
        let mut state = self.owner.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(held) = state.sources.get_mut(&self.source) else {
            return;
        };
        // An evicted connection was already taken out of the count.
        if held.remove(&self.seq).is_some() {
            if held.is_empty() {
                state.sources.remove(&self.source);
            }
            state.total -= 1;
        }
    }
}

/// Who an authenticated SOCKS client is and where it goes.
#[derive(Debug, Clone)]
struct Caller {
    /// The tenant whose agent is asked for: the token's own, or the one an `admin` token
    /// named with `agent@organization/environment`.
    tenant: Tenant,
    agent: String,
    /// The id of the token that authenticated the client (`None` for the loopback no-auth
    /// route): checked again when the request is routed, and the connection is reset when
    /// the token stops being valid.
    token_id: Option<String>,
    /// Set when a token that is not `admin` named another tenant: the request is answered
    /// exactly like one for an agent that does not exist.
    foreign: bool,
}

type Request<S> = (
    Socks5ServerProtocol<S, states::CommandRead>,
    Caller,
    Socks5Command,
    TargetAddr,
);

async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, guard: HalfOpenGuard) {
    let timeout = shared.config.socks_limits.greeting_timeout;
    let no_auth = shared.config.socks_no_auth.as_ref();
    let greeting = tokio::time::timeout(timeout, greet(&*shared.tokens, no_auth, tcp));
    let greeted = tokio::select! {
        greeted = greeting => greeted,
        () = guard.dropped.cancelled() => {
            // Counted when it was chosen (`half_open_total`), where the newcomer is known.
            debug!(client = %peer, "SOCKS client dropped: oldest half-open connection of the busiest source, to make room");
            return;
        }
    };
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
            info!(client = %peer, "SOCKS client refused: {}", Masked(&e.to_string()));
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
            info!(client = %peer, "SOCKS request refused: {}", Masked(&why));
            let _ = proto.reply_error(&reply_error(code)).await;
            return;
        }
    };
    let destination = format!("{}:{}", open.host, open.port);
    let destination = Masked(&destination);
    // Joined before the token is checked again, so a revocation landing between the check
    // and the end of the relay still resets this connection.
    let token_cut = caller
        .token_id
        .as_ref()
        .map(|id| shared.socks_tokens.enter(id));
    if let Some(id) = &caller.token_id {
        if !shared.tokens.current().is_live(id, SystemTime::now()) {
            shared.metrics.socks_reply(reply_name(0x02));
            info!(client = %peer, %destination, token_id = %id,
                "SOCKS request refused: token revoked or expired since authentication");
            let _ = proto.reply_error(&reply_error(0x02)).await;
            return;
        }
    }
    let routed = if caller.foreign {
        Err(RouteError::NoAgent)
    } else {
        router::open_tunnel(&shared, &caller.tenant, &caller.agent, &open).await
    };
    let tunnel = match routed {
        Ok(t) => t,
        Err(e) => {
            let code = e.socks_reply();
            shared.metrics.socks_reply(reply_name(code));
            match &e {
                RouteError::NoAgent => {
                    info!(client = %peer, %destination, "SOCKS request refused: agent not connected")
                }
                other => info!(client = %peer, %destination, "SOCKS request failed: {}",
                    Masked(&other.to_string())),
            }
            let _ = proto.reply_error(&reply_error(code)).await;
            return;
        }
    };
    if token_cut.as_ref().is_some_and(|cut| cut.is_cancelled()) {
        shared.metrics.socks_reply(reply_name(0x02));
        info!(client = %peer, %destination,
            "SOCKS request refused: token revoked or expired while the agent dialed");
        router::abort(tunnel.send, tunnel.recv);
        let _ = proto.reply_error(&reply_error(0x02)).await;
        return;
    }
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
    let cut = async {
        match &token_cut {
            Some(token) => tokio::select! {
                () = shared.cut_streams.cancelled() => {}
                () = token.cancelled() => {}
            },
            None => shared.cut_streams.cancelled().await,
        }
    };
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
        cut,
    )
    .await;
    metrics.streams_open().dec();
    drop(slot);
    if let Some(RelayError::Idle(quiet)) = &outcome.error {
        metrics.cap_refused("stream_idle_timeout");
        info!(stream = %stream_id, %destination, "stream closed: idle for {quiet:?}");
    }
    let token_gone = token_cut.as_ref().is_some_and(|cut| cut.is_cancelled());
    match outcome.error {
        // The relay's own "cut" names the shutdown grace; this cut was the token's.
        Some(RelayError::Cut) if token_gone => info!(stream = %stream_id, %destination,
            sent = outcome.sent, received = outcome.received,
            "stream reset: its token was revoked or expired"),
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
    let open = if caller.foreign {
        Err(0x04)
    } else if cmd == Socks5Command::TCPConnect {
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

/// Where the front reads tokens: the store as it is at the moment credentials arrive, so a
/// token revoked while a client sat in its greeting is refused.
trait Tokens {
    /// Runs `f` on the store as it is now.
    fn with_current<R>(&self, f: impl FnOnce(&TokenStore) -> R) -> R;
}

impl Tokens for crate::auth::ReloadingStore {
    fn with_current<R>(&self, f: impl FnOnce(&TokenStore) -> R) -> R {
        f(&self.current())
    }
}

impl Tokens for TokenStore {
    fn with_current<R>(&self, f: impl FnOnce(&TokenStore) -> R) -> R {
        f(self)
    }
}

/// Reads greeting, authentication and request. Not cancel-safe (runs under a timeout that
/// abandons the connection).
async fn greet<S>(
    tokens: &impl Tokens,
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
            match tokens.with_current(|store| authorize(store, &user, &password)) {
                Ok(caller) => {
                    auth.reply(true).await?;
                    (Socks5ServerProtocol::finish_auth(auth), caller)
                }
                Err(reason) => {
                    let _ = auth.reply(false).await;
                    return Err(GreetError::Refused {
                        who: describe_user(&user),
                        reason,
                    });
                }
            }
        }
        MethodStarted::NoAuthentication(auth) => {
            let route = no_auth.ok_or(GreetError::Auth("no-auth method not offered"))?;
            let caller = Caller {
                tenant: route.tenant,
                agent: route.agent,
                token_id: None,
                foreign: false,
            };
            (auth.finish_auth(), caller)
        }
    };
    let (proto, cmd, target) = authed.read_command().await?;
    Ok((proto, caller, cmd, target))
}

/// Splits a SOCKS user name into the agent and the tenant it names, if any:
/// `agent` or `agent@organization/environment`. `None` if it is neither.
fn parse_user(user: &str) -> Option<(&str, Option<Tenant>)> {
    let (agent, tenant) = match user.split_once('@') {
        Some((agent, tenant)) => (agent, Some(tenant.parse::<Tenant>().ok()?)),
        None => (user, None),
    };
    valid_agent_name(agent).then_some((agent, tenant))
}

/// The user name as it may appear in a log line: quoted when it is an agent name (with its
/// tenant), otherwise only its length, since a client that swapped user name and password
/// sends its token there.
pub fn describe_user(user: &str) -> String {
    match parse_user(user) {
        Some(_) => format!("user {:?}", Masked(user).to_string()),
        None => format!(
            "a user name of {} bytes that is not an agent name",
            user.len()
        ),
    }
}

fn authorize(tokens: &TokenStore, user: &str, password: &str) -> Result<Caller, String> {
    let Some((agent, named)) = parse_user(user) else {
        return Err(
            "user name is not an agent name (agent, or agent@organization/environment)".into(),
        );
    };
    let grant = tokens
        .authorize(password, Scope::Proxy, SystemTime::now())
        .map_err(|e| e.to_string())?;
    // Another tenant's agent must look exactly like a missing one, so a token that may not
    // see the named tenant is not refused here but answered "host unreachable" on routing.
    let (tenant, foreign) = match named {
        None => (grant.tenant.clone(), false),
        Some(tenant) if grant.sees_tenant(&tenant) => (tenant, false),
        Some(_) => (grant.tenant.clone(), true),
    };
    Ok(Caller {
        tenant,
        agent: agent.to_string(),
        token_id: Some(grant.token_id),
        foreign,
    })
}

/// SOCKS connections by the id of the token that authenticated them, so those of a token
/// that was revoked, removed or expired are reset (as agent sessions are closed).
#[derive(Debug, Default)]
pub(crate) struct TokenStreams {
    by_token: Mutex<HashMap<String, TokenEntry>>,
}

#[derive(Debug)]
struct TokenEntry {
    /// Cancelled to reset every connection of the token.
    cut: CancellationToken,
    /// Connections holding a [`TokenStreamGuard`] of this entry.
    holders: usize,
    /// Tells this entry from a later one of the same id (after a cut, a token made live
    /// again by editing the store starts afresh).
    generation: u64,
}

/// A connection's membership in [`TokenStreams`]; `cancelled()` fires when its token stops
/// being valid.
#[derive(Debug)]
pub(crate) struct TokenStreamGuard {
    owner: Arc<TokenStreams>,
    id: String,
    generation: u64,
    cut: CancellationToken,
}

impl TokenStreams {
    /// Joins a connection authenticated by token `id`.
    pub(crate) fn enter(self: &Arc<Self>, id: &str) -> TokenStreamGuard {
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut map = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(id.to_string()).or_insert_with(|| TokenEntry {
            cut: CancellationToken::new(),
            holders: 0,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        });
        entry.holders += 1;
        TokenStreamGuard {
            owner: self.clone(),
            id: id.to_string(),
            generation: entry.generation,
            cut: entry.cut.clone(),
        }
    }

    /// Resets the connections of every token that `store` no longer accepts at `now`;
    /// returns how many connections that was.
    pub(crate) fn cut_without_token(&self, store: &TokenStore, now: SystemTime) -> usize {
        let mut map = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        let mut cut = 0;
        map.retain(|id, entry| {
            if store.is_live(id, now) {
                return true;
            }
            let why = match store.get(id) {
                Some(r) if !r.revoked => "token expired",
                Some(_) => "token revoked",
                None => "token removed from the store",
            };
            warn!(token_id = %id, connections = entry.holders,
                "resetting SOCKS connections: {why}");
            entry.cut.cancel();
            cut += entry.holders;
            false
        });
        cut
    }

    /// Tokens with connections now (for tests of the bookkeeping).
    #[cfg(test)]
    fn tokens(&self) -> usize {
        self.by_token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl TokenStreamGuard {
    /// Completes when the token stops being valid. Cancel-safe.
    pub(crate) async fn cancelled(&self) {
        self.cut.cancelled().await
    }

    /// Whether the token already stopped being valid.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cut.is_cancelled()
    }
}

impl Drop for TokenStreamGuard {
    fn drop(&mut self) {
        let mut map = self
            .owner
            .by_token
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.id) {
            if entry.generation == self.generation {
                entry.holders -= 1;
                if entry.holders == 0 {
                    map.remove(&self.id);
                }
            }
        }
    }
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
    fn user_names_name_an_agent_and_maybe_a_tenant() {
        let token = "rna_17c7aa00ff11_0123456789abcdef0123456789abcdef0123456789abcdef";
        /// User name, its agent and tenant (if it names them), how it is logged.
        type Case<'a> = (&'a str, Option<(&'a str, Option<&'a str>)>, &'a str);
        let table: &[Case] = &[
            ("edge", Some(("edge", None)), "user \"edge\""),
            (
                "edge@globex/prod",
                Some(("edge", Some("globex/prod"))),
                "user \"edge@globex/prod\"",
            ),
            (
                "edge@globex",
                None,
                "a user name of 11 bytes that is not an agent name",
            ),
            (
                "@acme/prod",
                None,
                "a user name of 10 bytes that is not an agent name",
            ),
            (
                "ed ge",
                None,
                "a user name of 5 bytes that is not an agent name",
            ),
            (
                token,
                None,
                "a user name of 65 bytes that is not an agent name",
            ),
            // Short enough to be an agent name, shaped like a token: masked all the same.
            (
                "rna_17c7aa00ff11_abc",
                Some(("rna_17c7aa00ff11_abc", None)),
                "user \"rna_17c7aa00ff11_***\"",
            ),
        ];
        for (user, want, shown) in table {
            let got =
                parse_user(user).map(|(agent, tenant)| (agent, tenant.map(|t| t.to_string())));
            let want = want.map(|(agent, tenant)| (agent, tenant.map(str::to_string)));
            assert_eq!(got, want, "{user}");
            assert_eq!(describe_user(user), *shown, "{user}");
        }
    }

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        let table = [
            ("10.1.2.3", "10.1.2.3"),
            ("::ffff:10.1.2.3", "10.1.2.3"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
            ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
            ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
            ("::1", "::/64"),
        ];
        for (ip, want) in table {
            assert_eq!(Source::of(ip.parse().unwrap()).to_string(), want, "{ip}");
        }
    }

    fn half_open(per_source: usize, total: usize) -> Arc<HalfOpen> {
        Arc::new(HalfOpen {
            state: Mutex::new(HalfOpenState::default()),
            max_per_source: per_source,
            max_total: total,
        })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_full_half_open_set_drops_the_busiest_sources_oldest() {
        let limits = half_open(2, 4);
        // One /64 is one source: its third connection is refused whatever the address.
        let (a1, _) = limits.admit(ip("2001:db8::1")).unwrap();
        let (a2, _) = limits.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(
            limits.admit(ip("2001:db8::3")).err(),
            Some("half_open_per_ip")
        );
        let (b1, _) = limits.admit(ip("10.0.0.1")).unwrap();
        let (c1, evicted) = limits.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(evicted, None);
        // Full: a newcomer drops the oldest connection of the busiest source (the /64).
        let (d1, evicted) = limits.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(evicted, Some(Source::of(ip("2001:db8::9"))));
        assert!(a1.dropped.is_cancelled());
        assert!(!a2.dropped.is_cancelled());
        // Among equals (one each), the oldest goes.
        let (_e1, evicted) = limits.admit(ip("10.0.0.4")).unwrap();
        assert_eq!(evicted, Some(Source::of(ip("2001:db8::2"))));
        assert!(a2.dropped.is_cancelled());
        let (_f1, evicted) = limits.admit(ip("10.0.0.5")).unwrap();
        assert_eq!(evicted, Some(Source::of(ip("10.0.0.1"))));
        assert!(b1.dropped.is_cancelled());
        // Dropping evicted guards changes nothing; dropping a live one frees its place.
        drop((a1, a2, b1));
        assert_eq!(limits.state.lock().unwrap().total, 4);
        drop(c1);
        let (_g1, evicted) = limits.admit(ip("10.0.0.6")).unwrap();
        assert_eq!(evicted, None);
        assert!(!d1.dropped.is_cancelled());
    }

    #[test]
    fn token_streams_are_cut_when_the_token_stops_being_valid() {
        let mut store = TokenStore::default();
        let now = SystemTime::now();
        let tenant: Tenant = "acme/prod".parse().unwrap();
        let (_, kept) = store
            .create(tenant.clone(), vec![Scope::Proxy], None, None, now)
            .unwrap();
        let (_, revoked) = store
            .create(tenant, vec![Scope::Proxy], None, None, now)
            .unwrap();
        let streams = Arc::new(TokenStreams::default());
        let k1 = streams.enter(&kept.id);
        let r1 = streams.enter(&revoked.id);
        let r2 = streams.enter(&revoked.id);
        assert_eq!(streams.cut_without_token(&store, now), 0);
        store.revoke(&revoked.id).unwrap();
        assert_eq!(streams.cut_without_token(&store, now), 2);
        assert!(r1.is_cancelled() && r2.is_cancelled());
        assert!(!k1.is_cancelled());
        assert_eq!(streams.tokens(), 1);
        // A later connection of the same id is a new entry; the old guards leave it alone.
        let r3 = streams.enter(&revoked.id);
        drop((r1, r2));
        assert_eq!(streams.tokens(), 2);
        drop((r3, k1));
        assert_eq!(streams.tokens(), 0);
        let gone = streams.enter("ffffffffffff");
        assert_eq!(streams.cut_without_token(&store, now), 1);
        assert!(gone.is_cancelled());
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
