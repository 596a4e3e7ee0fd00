//! Authentication of a SOCKS client: the greeting, RFC 1929 user/password sub-negotiation
//! against the token store, and the user name that names the agent (and maybe its tenant).

use std::time::SystemTime;

use fast_socks5::server::{
    states, AuthMethod, AuthMethodSuccessState, NoAuthentication, NoAuthenticationImpl,
    Socks5ServerProtocol,
};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::Socks5Command;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::GreetError;
use crate::auth::{Masked, Scope, Tenant, TokenStore};
use crate::hub::NoAuthRoute;
use crate::identity::valid_agent_name;

/// Who an authenticated SOCKS client is and where it goes.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    /// The tenant whose agent is asked for: the token's own, or the one an `admin` token
    /// named with `agent@organization/environment`.
    pub(super) tenant: Tenant,
    /// The agent asked for.
    pub(super) agent: String,
    /// The id of the token that authenticated the client (`None` for the loopback no-auth
    /// route): checked again when the request is routed, and the connection is reset when
    /// the token stops being valid.
    pub(super) token_id: Option<String>,
    /// Set when a token that is not `admin` named another tenant: the request is answered
    /// exactly like one for an agent that does not exist.
    pub(super) foreign: bool,
}

/// Bytes read from a client at once while it negotiates. The parser asks for 1 to 255 bytes
/// at a time (a version, a length, then the field); read straight from the socket, every
/// such piece is a system call, and a greeting, an RFC 1929 request and a CONNECT cost
/// about ten of them. Through this buffer each message the client sent in one piece is one
/// read, and a client that sends several messages without waiting for the answers (greeting
/// and authentication together) is parsed from one read. 1 KiB holds the longest of them,
/// the RFC 1929 request (3 + 255 + 255 bytes), and is the most a client's early bytes can
/// make the front hold per connection.
pub(super) const GREETING_BUFFER: usize = 1024;

/// The client's connection while the front negotiates: read through [`GREETING_BUFFER`].
/// Bytes it holds after the request are the client's first payload bytes; they are sent to
/// the agent ahead of the relay.
pub(super) type Greeting<S> = BufReader<S>;

pub(super) type Request<S> = (
    Socks5ServerProtocol<Greeting<S>, states::CommandRead>,
    Caller,
    Socks5Command,
    TargetAddr,
);

/// Where the front reads tokens: the store as it is at the moment credentials arrive, so a
/// token revoked while a client sat in its greeting is refused.
pub(super) trait Tokens {
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
pub(super) async fn greet<S>(
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
    let stream = BufReader::with_capacity(GREETING_BUFFER, stream);
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

    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    /// A client connection that counts the reads the front makes on it (each one a system
    /// call on a TCP socket).
    struct CountingReads<S> {
        inner: S,
        reads: Arc<AtomicUsize>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for CountingReads<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for CountingReads<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_client_that_sends_everything_at_once_is_parsed_from_one_read() {
        let mut store = TokenStore::default();
        let (secret, _) = store
            .create(
                "acme/prod".parse().unwrap(),
                vec![Scope::Proxy],
                None,
                None,
                SystemTime::now(),
            )
            .unwrap();
        let token = secret.expose().as_bytes();
        // Greeting (user/password), RFC 1929 request, CONNECT jenkins.internal:8080 and the
        // first payload bytes, all in one piece.
        let mut bytes = vec![0x05, 0x01, 0x02, 0x01, 4];
        bytes.extend_from_slice(b"edge");
        bytes.push(token.len() as u8);
        bytes.extend_from_slice(token);
        bytes.extend_from_slice(&[0x05, 0x01, 0x00, 0x03, 16]);
        bytes.extend_from_slice(b"jenkins.internal");
        bytes.extend_from_slice(&8080u16.to_be_bytes());
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(&bytes).await.unwrap();
        let reads = Arc::new(AtomicUsize::new(0));
        let server = CountingReads {
            inner: server,
            reads: reads.clone(),
        };
        let (proto, caller, cmd, target) = greet(&store, None, server).await.unwrap();
        assert_eq!(caller.agent, "edge");
        assert_eq!(cmd, Socks5Command::TCPConnect);
        assert_eq!(target.to_string(), "jenkins.internal:8080");
        // One read took everything; parsing 1–255 bytes at a time from the socket took 11.
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        // What came behind the request waits in the buffer for the agent.
        let buffered = proto
            .reply_success("127.0.0.1:1".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(buffered.buffer(), b"GET / HTTP/1.1\r\n");
        // The client read the method, authentication and request replies.
        let mut replies = [0u8; 2 + 2 + 10];
        client.read_exact(&mut replies).await.unwrap();
        assert_eq!(&replies[..5], &[0x05, 0x02, 0x01, 0x00, 0x05]);
        assert_eq!(replies[5], 0x00);
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
}
