//! Authentication of a SOCKS client: the greeting, RFC 1929 user/password sub-negotiation
//! against the token store, and the user name that names the agent (and maybe its tenant).

use std::time::SystemTime;

use fast_socks5::server::{
    states, AuthMethod, AuthMethodSuccessState, NoAuthentication, NoAuthenticationImpl,
    Socks5ServerProtocol,
};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::Socks5Command;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

pub(super) type Request<S> = (
    Socks5ServerProtocol<S, states::CommandRead>,
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
