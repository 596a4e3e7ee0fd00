//! OAuth 2.0 client credentials (RFC 6749 §4.4) for an agent: trade a client id and secret
//! at the issuer's token endpoint for a short-lived access token, and keep a fresh one in a
//! `watch` channel, renewed at 80 % of each token's lifetime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fetch::{Egress, FetchError, Fetcher};
use crate::identity::Secret;

/// The largest token response read, in bytes: a JWT and a few fields.
pub const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// The largest client secret file read, in bytes.
const MAX_SECRET_FILE: u64 = 4096;
/// The scope asked for when none is configured: what an agent needs to register.
pub const DEFAULT_SCOPE: &str = "connect:agentHub";
/// The lifetime assumed when the answer has no `expires_in` (RFC 6749 §5.1 only recommends
/// it): short, so a token of unknown lifetime is replaced early rather than late.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(300);
/// The longest lifetime believed: an issuer's `expires_in` beyond a day is read as a day, so
/// the token is renewed at least daily and no answer, however large, can overflow the
/// renewal time.
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// The longest pause between two failed attempts.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// Where tokens are requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEndpoint {
    /// The token endpoint URL itself.
    Url(String),
    /// An issuer URL whose discovery document names `token_endpoint`.
    Issuer(String),
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenAuth {
    /// HTTP Basic with the form-encoded id and secret (`client_secret_basic`), which every
    /// server must support.
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    Body,
}

/// Why no token was obtained. No message contains the secret or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The token endpoint (or discovery) could not be reached or answered badly.
    #[error("token request failed: {0}")]
    Fetch(#[from] FetchError),
    /// The server refused the request (RFC 6749 §5.2 `error`, e.g. `invalid_client`).
    #[error("token endpoint {url} refused the request: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        /// The endpoint.
        url: String,
        /// The error code.
        error: String,
        /// The server's description, if any.
        description: Option<String>,
    },
    /// The answer is not a bearer-token response.
    #[error("token endpoint {url} answered without a usable token: {message}")]
    BadResponse {
        /// The endpoint.
        url: String,
        /// What was wrong.
        message: &'static str,
    },
    /// The client secret file cannot be read or is empty.
    #[error("client secret file {path}: {message}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// A token from the endpoint.
#[derive(Debug, Clone)]
pub struct TokenResponse {
    /// The access token (a JWT for rna's hubs); masked in `Debug`.
    pub access_token: Secret,
    /// Its lifetime from `expires_in`.
    pub expires_in: Duration,
}

/// The current token and how many have been obtained, as the refresher publishes it.
#[derive(Debug, Clone)]
pub struct CurrentToken {
    /// The access token.
    pub token: Secret,
    /// When it expires, by this process's monotonic clock.
    pub expires_at: Instant,
    /// 1 for the first token, then one more per refresh.
    pub number: u64,
}

/// The settings of the flow, validated by whoever builds it (the agent's configuration).
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    /// Where tokens come from.
    pub endpoint: TokenEndpoint,
    /// The client id.
    pub client_id: String,
    /// The client secret (read with [`ClientCredentials::read_secret`]).
    pub client_secret: Secret,
    /// Space-separated scopes asked for ([`DEFAULT_SCOPE`] by default).
    pub scope: String,
    /// `audience` parameter (Auth0, Okta and others), if set.
    pub audience: Option<String>,
    /// `resource` parameter (RFC 8707 resource indicators), if set.
    pub resource: Option<String>,
    /// Basic or body authentication.
    pub auth: TokenAuth,
    /// A CA (PEM) for the endpoint instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// Deadline of one request.
    pub deadline: Duration,
    /// How connections to the endpoint leave (the agent's proxy), if not directly.
    pub egress: Option<Egress>,
}

/// `application/x-www-form-urlencoded` of one value (HTML form rules, as RFC 6749 App. B).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'*') {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ClientCredentials {
    /// A flow with the default scope, Basic authentication, the system's roots and a 10 s
    /// deadline.
    pub fn new(endpoint: TokenEndpoint, client_id: &str, client_secret: Secret) -> Self {
        ClientCredentials {
            endpoint,
            client_id: client_id.to_owned(),
            client_secret,
            scope: DEFAULT_SCOPE.to_owned(),
            audience: None,
            resource: None,
            auth: TokenAuth::Basic,
            ca: None,
            deadline: Duration::from_secs(10),
            egress: None,
        }
    }

    /// Reads a client secret from a file (one line; the trailing newline is not part of it).
    pub fn read_secret(path: &Path) -> Result<Secret, ClientError> {
        let fail = |message: String| ClientError::SecretFile {
            path: path.to_owned(),
            message,
        };
        let text =
            crate::fsutil::read_text(path, MAX_SECRET_FILE).map_err(|e| fail(e.to_string()))?;
        let secret = text.trim_end_matches(['\r', '\n']);
        if secret.is_empty() {
            return Err(fail("is empty".into()));
        }
        Ok(Secret::new(secret.to_owned()))
    }

    /// The https client for the endpoint.
    pub fn fetcher(&self) -> Result<Fetcher, ClientError> {
        Ok(Fetcher::with_egress(
            self.ca.as_deref(),
            self.deadline,
            MAX_TOKEN_RESPONSE,
            self.egress.clone(),
        )?)
    }

    /// The token endpoint URL, from discovery when configured with an issuer.
    pub async fn token_url(&self, fetcher: &Fetcher) -> Result<String, ClientError> {
        match &self.endpoint {
            TokenEndpoint::Url(url) => {
                super::fetch::check_https(url)?;
                Ok(url.clone())
            }
            TokenEndpoint::Issuer(issuer) => {
                Ok(super::keys::discover(fetcher, issuer, "token_endpoint").await?)
            }
        }
    }

    /// The form body and the Basic credentials of one request.
    fn request(&self) -> (String, Option<String>) {
        let mut form = vec![("grant_type", "client_credentials")];
        if !self.scope.is_empty() {
            form.push(("scope", &self.scope));
        }
        if let Some(a) = &self.audience {
            form.push(("audience", a));
        }
        if let Some(r) = &self.resource {
            form.push(("resource", r));
        }
        let basic = match self.auth {
            TokenAuth::Basic => Some(STANDARD.encode(format!(
                "{}:{}",
                form_encode(&self.client_id),
                form_encode(self.client_secret.expose())
            ))),
            TokenAuth::Body => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", self.client_secret.expose()));
                None
            }
        };
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        (body, basic)
    }

    /// Requests one token from `url`.
    pub async fn fetch(&self, fetcher: &Fetcher, url: &str) -> Result<TokenResponse, ClientError> {
        let (body, basic) = self.request();
        match fetcher.post_form(url, body, basic).await {
            Ok(body) => parse_response(url, &body),
            Err(FetchError::Status { url, body, .. }) => {
                let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let text = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(super::jwt::excerpt);
                Err(ClientError::Refused {
                    url,
                    error: text("error").unwrap_or_else(|| "no error code".into()),
                    description: text("error_description"),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Fetches the first token (its error is returned, so a misconfigured agent fails at
    /// start), then keeps renewing it at 80 % of each lifetime until `shutdown`. A failed
    /// renewal is retried after 1 s, 2 s, 4 s … then every 30 s, until one succeeds or
    /// `shutdown`; each failure is one warning line. The task ends when every receiver is
    /// gone.
    pub async fn start(
        self,
        shutdown: CancellationToken,
    ) -> Result<(watch::Receiver<CurrentToken>, JoinHandle<()>), ClientError> {
        let fetcher = self.fetcher()?;
        let url = self.token_url(&fetcher).await?;
        let first = self.fetch(&fetcher, &url).await?;
        let current = CurrentToken {
            token: first.access_token,
            expires_at: Instant::now() + first.expires_in,
            number: 1,
        };
        let mut renew_at = Instant::now() + first.expires_in.mul_f64(0.8);
        let (tx, rx) = watch::channel(current);
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_secs(1);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(renew_at) => {}
                }
                match self.fetch(&fetcher, &url).await {
                    Ok(t) => {
                        let now = Instant::now();
                        renew_at = now + t.expires_in.mul_f64(0.8);
                        pause = Duration::from_secs(1);
                        tx.send_modify(|c| {
                            c.token = t.access_token;
                            c.expires_at = now + t.expires_in;
                            c.number += 1;
                        });
                        tracing::debug!(client_id = %self.client_id, lifetime = ?t.expires_in, "OIDC token renewed");
                    }
                    Err(e) => {
                        tracing::warn!(client_id = %self.client_id, "OIDC token renewal failed, retrying in {pause:?}: {e}");
                        renew_at = Instant::now() + pause;
                        pause = (pause * 2).min(MAX_RETRY_PAUSE);
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok((rx, task))
    }
}

/// The first pause after a failed request of an agent's refresher; doubled after each
/// further failure up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The wall-clock time `after` from now, as RFC 3339 for log lines.
fn wall_clock_in(after: Duration) -> String {
    let at = std::time::SystemTime::now() + after;
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    crate::clock::format_rfc3339(secs)
}

impl ClientCredentials {
    /// Where tokens come from, for log lines: the token URL, or the issuer whose discovery
    /// document names it.
    pub fn endpoint_text(&self) -> &str {
        match &self.endpoint {
            TokenEndpoint::Url(url) | TokenEndpoint::Issuer(url) => url,
        }
    }

    /// An agent's refresher: obtains a token and keeps a fresh one in the returned channel
    /// (`None` until the first arrives) until `shutdown`, renewing at 80 % of each lifetime.
    /// It never gives up: a failed request (the issuer down, a wrong secret) is one log line
    /// naming the endpoint and the cause, then a retry after 1 s, 2 s, 4 s … 30 s, and never
    /// later than the current token's end; a token that expires while renewals fail is one
    /// more error line, so no session runs past its token unannounced. Neither the secret nor
    /// a token is ever logged. Fails at once only when the https client cannot be made (an
    /// unreadable CA file). The task ends at `shutdown` or when every receiver is gone.
    pub fn keep_fresh(
        self,
        shutdown: CancellationToken,
    ) -> Result<(watch::Receiver<Option<CurrentToken>>, JoinHandle<()>), ClientError> {
        let fetcher = self.fetcher()?;
        let (tx, rx) = watch::channel(None::<CurrentToken>);
        let task = tokio::spawn(async move {
            let client_id = self.client_id.clone();
            let mut url: Option<String> = None;
            let mut next = Instant::now();
            let mut pause = FIRST_RETRY_PAUSE;
            let mut expires_at: Option<Instant> = None;
            let mut expiry_told = false;
            let mut number = 0u64;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(next) => {}
                }
                let result = async {
                    let endpoint = match &url {
                        Some(u) => u.clone(),
                        None => {
                            let u = self.token_url(&fetcher).await?;
                            url = Some(u.clone());
                            u
                        }
                    };
                    self.fetch(&fetcher, &endpoint).await.map(|t| (endpoint, t))
                }
                .await;
                let now = Instant::now();
                match result {
                    Ok((endpoint, t)) => {
                        number += 1;
                        next = now + t.expires_in.mul_f64(0.8);
                        expires_at = Some(now + t.expires_in);
                        pause = FIRST_RETRY_PAUSE;
                        // A new lifetime: its end is told again if renewals fail again.
                        expiry_told = false;
                        tx.send_replace(Some(CurrentToken {
                            token: t.access_token,
                            expires_at: now + t.expires_in,
                            number,
                        }));
                        let what = if number == 1 {
                            "OIDC token obtained"
                        } else {
                            "OIDC token renewed"
                        };
                        tracing::info!(token_url = %endpoint, %client_id,
                            expires_at = %wall_clock_in(t.expires_in),
                            lifetime = ?t.expires_in, "{what}");
                    }
                    Err(e) => {
                        let mut delay = pause;
                        match expires_at {
                            Some(end) if now < end => delay = delay.min(end - now),
                            Some(_) if !expiry_told => {
                                expiry_told = true;
                                tracing::error!(endpoint = %self.endpoint_text(), %client_id,
                                    "the OIDC token has expired and no new one could be \
                                     obtained; hubs close this agent's sessions until one is");
                            }
                            _ => {}
                        }
                        let endpoint = url.as_deref().unwrap_or(self.endpoint_text());
                        match &e {
                            // Only an operator can fix these (secret, client, scope).
                            ClientError::Refused { .. } | ClientError::BadResponse { .. } => {
                                tracing::error!(token_url = %endpoint, %client_id,
                                    retry_in = ?delay, "no OIDC token: {e}")
                            }
                            _ => tracing::warn!(token_url = %endpoint, %client_id,
                                retry_in = ?delay, "no OIDC token: {e}"),
                        }
                        next = now + delay;
                        pause = (pause * 2).min(MAX_RETRY_PAUSE);
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok((rx, task))
    }
}

/// Parses a successful token response (RFC 6749 §5.1).
pub fn parse_response(url: &str, body: &[u8]) -> Result<TokenResponse, ClientError> {
    let bad = |message| ClientError::BadResponse {
        url: url.to_owned(),
        message,
    };
    if body.len() > MAX_TOKEN_RESPONSE {
        return Err(bad("answer is too large"));
    }
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| bad("answer is not JSON"))?;
    let token = doc
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("no access_token"))?;
    if let Some(kind) = doc.get("token_type") {
        if !kind
            .as_str()
            .is_some_and(|k| k.eq_ignore_ascii_case("bearer"))
        {
            return Err(bad("token_type is not Bearer"));
        }
    }
    let expires_in = match doc.get("expires_in") {
        None => ASSUMED_LIFETIME,
        Some(v) => match v.as_u64() {
            Some(secs) if secs > 0 => Duration::from_secs(secs).min(MAX_LIFETIME),
            _ => return Err(bad("expires_in is not a positive whole number")),
        },
    };
    Ok(TokenResponse {
        access_token: Secret::new(token.to_owned()),
        expires_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_forms() {
        let mut c = ClientCredentials::new(
            TokenEndpoint::Url("https://i/token".into()),
            "edge agent",
            Secret::new("s:e&c=ret".into()),
        );
        c.audience = Some("rna-hub".into());
        let (body, basic) = c.request();
        assert_eq!(
            body,
            "grant_type=client_credentials&scope=connect%3AagentHub&audience=rna-hub"
        );
        // RFC 6749 §2.3.1: form-encode, then base64 of id:secret.
        let decoded = String::from_utf8(STANDARD.decode(basic.unwrap()).unwrap()).unwrap();
        assert_eq!(decoded, "edge+agent:s%3Ae%26c%3Dret");
        c.auth = TokenAuth::Body;
        c.audience = None;
        c.resource = Some("https://hub".into());
        let (body, basic) = c.request();
        assert!(basic.is_none());
        assert_eq!(
            body,
            "grant_type=client_credentials&scope=connect%3AagentHub&resource=https%3A%2F%2Fhub\
             &client_id=edge+agent&client_secret=s%3Ae%26c%3Dret"
        );
    }

    #[test]
    fn responses_table() {
        let ok = parse_response(
            "u",
            br#"{"access_token":"a.b.c","token_type":"Bearer","expires_in":60}"#,
        )
        .unwrap();
        assert_eq!(ok.access_token.expose(), "a.b.c");
        assert_eq!(ok.expires_in, Duration::from_secs(60));
        assert!(!format!("{ok:?}").contains("a.b.c"), "token is masked");
        let default =
            parse_response("u", br#"{"access_token":"t","token_type":"bearer"}"#).unwrap();
        assert_eq!(default.expires_in, ASSUMED_LIFETIME);
        // A lifetime too large to add to a clock reading is read as the longest believed.
        let huge = parse_response(
            "u",
            br#"{"access_token":"t","token_type":"Bearer","expires_in":18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(huge.expires_in, MAX_LIFETIME);
        let _ = tokio::time::Instant::now() + huge.expires_in;
        for (body, why) in [
            (&b"nope"[..], "answer is not JSON"),
            (br#"{"token_type":"Bearer"}"#, "no access_token"),
            (br#"{"access_token":""}"#, "no access_token"),
            (
                br#"{"access_token":"t","token_type":"mac"}"#,
                "token_type is not Bearer",
            ),
            (
                br#"{"access_token":"t","expires_in":0}"#,
                "expires_in is not a positive whole number",
            ),
            (
                br#"{"access_token":"t","expires_in":"60"}"#,
                "expires_in is not a positive whole number",
            ),
        ] {
            assert_eq!(
                parse_response("u", body).unwrap_err(),
                ClientError::BadResponse {
                    url: "u".into(),
                    message: why
                }
            );
        }
        let big = vec![b' '; MAX_TOKEN_RESPONSE + 1];
        assert!(parse_response("u", &big).is_err());
    }

    #[test]
    fn secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "hunter2\n").unwrap();
        assert_eq!(
            ClientCredentials::read_secret(&path).unwrap().expose(),
            "hunter2"
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(ClientCredentials::read_secret(&path).is_err());
        assert!(ClientCredentials::read_secret(&dir.path().join("missing")).is_err());
    }
}
