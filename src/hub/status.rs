//! The agents status page at `GET /` of the admin API: server-rendered HTML, one row per
//! agent connection, seen through the same tenant scope as `GET /api/v1/agents`.
//!
//! Who may see it: a bearer token in `Authorization`, or a cookie set by a login that answers
//! 303 to `/` so the token leaves the URL. Logins and sign-outs change what the browser is
//! signed in as, so a page of another site must not cause them (login CSRF): the login form's POST and the sign-out POST are refused
//! (403) when the browser says they came from another site (`Sec-Fetch-Site`, or else
//! `Origin` against `Host`), and a `?token=` link logs in only when the browser says the
//! user opened it directly (`Sec-Fetch-Site: none`: typed, pasted, bookmarked). Everything
//! shown that came from the network (agent names, versions, OS strings) is escaped.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tracing::info;

use super::api::{authorize, bearer_token, visible_page};
use super::page::{PageQuery, PageRequest};
use super::registry::AgentInfo;
use super::Shared;
use crate::auth::{format_rfc3339, unix_now, Grant, Scope};

/// Name of the cookie that carries the token after a login.
pub(crate) const COOKIE: &str = "rna_token";

/// Seconds between automatic reloads of the page.
pub(crate) const REFRESH_SECONDS: u64 = 5;

/// Longest token text accepted from a login: opaque tokens are 69 characters, JWTs from
/// an OIDC issuer are usually under 2 KiB; browsers keep cookies of up to about 4 KiB.
const MAX_TOKEN_LEN: usize = 3800;

/// A refused status-page request: an HTML page (the login form with the reason, or the 403
/// page), never the API's JSON, since a person reads it. Boxed: a `Response` is large.
pub(crate) struct Refusal(Box<Response>);

impl Refusal {
    /// The login form with `status` and the reason, if any.
    fn login(status: StatusCode, message: Option<&str>) -> Self {
        Refusal(Box::new(html(status, login_page(message))))
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        *self.0
    }
}

/// The `token` field of a sign-in link's query or of the login form.
#[derive(Deserialize)]
pub(crate) struct SignIn {
    token: Option<String>,
}

/// `GET /`: the status page, or a login (`?token=`, opened directly only), or the login form.
/// A query that does not decode is no sign-in link: the page is shown as without one.
pub(crate) async fn page(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    query: Result<Query<SignIn>, QueryRejection>,
    paging: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let paging = paging
        .map_err(|e| e.body_text())
        .and_then(|Query(q)| q.request().map_err(|e| e.to_string()));
    if let Some(token) = query.ok().and_then(|Query(q)| q.token) {
        if !opened_directly(&headers) {
            info!(
                site = header_text(&headers, SEC_FETCH_SITE),
                "status page: sign-in link refused, it was not opened directly"
            );
            return Err(Refusal::login(
                StatusCode::FORBIDDEN,
                Some(
                    "a sign-in link works only when opened directly (typed, pasted or \
                     bookmarked); sign in here instead",
                ),
            ));
        }
        return login(&shared, &token).await;
    }
    show(&shared, &headers, paging).await
}

/// `POST /`: the login form (`application/x-www-form-urlencoded`, field `token`), from this
/// hub's own page only.
/// A body that is not such a form is answered like an empty one.
pub(crate) async fn login_form(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<SignIn>, FormRejection>,
) -> Result<Response, Refusal> {
    same_site(&headers, "sign-in")?;
    let token = form.ok().and_then(|Form(f)| f.token).unwrap_or_default();
    login(&shared, &token).await
}

/// `POST /sign-out`: clears the cookie and goes back to the login form; from this hub's own
/// page only, so another site cannot sign the user out.
pub(crate) async fn sign_out(headers: HeaderMap) -> Result<Response, Refusal> {
    same_site(&headers, "sign-out")?;
    let mut resp = redirect_home();
    resp.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_static(CLEAR_COOKIE));
    Ok(resp)
}

/// Fetch Metadata request header (W3C Fetch Metadata): which site caused the request.
const SEC_FETCH_SITE: &str = "sec-fetch-site";

/// A header's text for a log line.
fn header_text(headers: &HeaderMap, name: impl header::AsHeaderName) -> &str {
    headers
        .get(name)
        .map_or("-", |v| v.to_str().unwrap_or("(not text)"))
}

/// Whether the browser says the user started this navigation (address bar, bookmark), not a
/// page. A request without the header is refused too: every current browser sends it, and
/// scripts use `Authorization` instead of a sign-in link.
fn opened_directly(headers: &HeaderMap) -> bool {
    headers
        .get(SEC_FETCH_SITE)
        .is_some_and(|v| v.as_bytes() == b"none")
}

/// Refuses (403, the login form) a state-changing request that a page of another site sent.
/// Browsers send `Sec-Fetch-Site` or at least `Origin` with every cross-site POST; a request
/// with neither comes from a script, not from a page, and cannot carry a victim's cookie.
fn same_site(headers: &HeaderMap, what: &str) -> Result<(), Refusal> {
    let allowed = match headers.get(SEC_FETCH_SITE) {
        Some(site) => matches!(site.as_bytes(), b"same-origin" | b"none"),
        None => match headers.get(header::ORIGIN) {
            None => true,
            Some(origin) => origin_is_host(origin.as_bytes(), headers.get(header::HOST)),
        },
    };
    if allowed {
        return Ok(());
    }
    info!(
        site = header_text(headers, SEC_FETCH_SITE),
        origin = header_text(headers, header::ORIGIN),
        "status page: cross-site {what} refused"
    );
    Err(Refusal::login(
        StatusCode::FORBIDDEN,
        Some(&format!(
            "{what} refused: the request came from another site"
        )),
    ))
}

/// Whether `Origin` (RFC 6454 section 7: `scheme://host[:port]`, or `null`) names the host
/// the request was sent to.
fn origin_is_host(origin: &[u8], host: Option<&HeaderValue>) -> bool {
    let Some(host) = host.map(HeaderValue::as_bytes).filter(|h| !h.is_empty()) else {
        return false;
    };
    let rest = origin
        .strip_prefix(b"http://")
        .or_else(|| origin.strip_prefix(b"https://"));
    rest.is_some_and(|r| r.eq_ignore_ascii_case(host))
}

const CLEAR_COOKIE: &str = "rna_token=; Max-Age=0; HttpOnly; SameSite=Strict; Path=/";

/// Checks a token presented to log in; on success the cookie is set and the browser is sent
/// to `/`, so the token leaves the address bar and the history.
async fn login(shared: &Shared, token: &str) -> Result<Response, Refusal> {
    let token = token.trim();
    if token.is_empty() {
        return Err(Refusal::login(
            StatusCode::UNAUTHORIZED,
            Some("enter a token"),
        ));
    }
    let malformed = || Refusal::login(StatusCode::UNAUTHORIZED, Some("token is malformed"));
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed());
    }
    check(shared, token, false).await?;
    // A token that verified is `rna_<hex>_<hex>` or a JWT (base64url and dots): always a
    // valid cookie value.
    let cookie = HeaderValue::from_str(&format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
    ))
    .map_err(|_| malformed())?;
    let mut resp = redirect_home();
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(resp)
}

/// Renders the page for the token in `Authorization` or, failing that, in the cookie.
/// The page is asked for by `paging` (`?limit=`, `?continue=`); a bad one, once signed in,
/// is a 400 page with the reason and a link to the first page.
async fn show(
    shared: &Shared,
    headers: &HeaderMap,
    paging: Result<PageRequest, String>,
) -> Result<Response, Refusal> {
    let bearer = bearer_token(headers)
        .map_err(|e| Refusal::login(StatusCode::UNAUTHORIZED, Some(&e.to_string())))?;
    let (token, from_cookie) = match bearer {
        Some(t) => (t.to_string(), false),
        None => cookie_value(headers, COOKIE)
            .map(|t| (t, true))
            .ok_or_else(|| Refusal::login(StatusCode::UNAUTHORIZED, None))?,
    };
    let grant = check(shared, &token, from_cookie).await?;
    let paging = match paging {
        Ok(p) => p,
        Err(why) => return Ok(html(StatusCode::BAD_REQUEST, bad_page(&why))),
    };
    let page = visible_page(shared, &grant, &paging);
    let next = page.more.then(|| page.agents.last()).flatten().map(|last| {
        let token = super::page::continue_after(last);
        match paging.explicit_limit {
            true => format!("/?limit={}&continue={token}", paging.limit),
            false => format!("/?continue={token}"),
        }
    });
    let view = View {
        agents: &page.agents,
        total: page.total,
        next,
        scope: if grant.is_admin() {
            None
        } else {
            Some(grant.tenant.to_string())
        },
        stale_after: shared.config.heartbeat.timeout,
        hub_address: hub_address(shared.config.listen, headers),
        now_unix: unix_now(SystemTime::now()),
        draining: shared.draining.load(Ordering::SeqCst),
    };
    Ok(html(StatusCode::OK, render(&view)))
}

/// Verifies `token` for reading the inventory. A refusal is the login form (401) or, for a
/// valid token without the scope, a 403 page; a stale cookie is cleared.
async fn check(shared: &Shared, token: &str, from_cookie: bool) -> Result<Grant, Refusal> {
    authorize(shared, token, Scope::ReadInfraData)
        .await
        .map_err(|e| {
            let mut resp = match e {
                e if e.is_missing_scope() => html(StatusCode::FORBIDDEN, forbidden_page()),
                other => html(
                    StatusCode::UNAUTHORIZED,
                    login_page(Some(&other.to_string())),
                ),
            };
            if from_cookie {
                resp.headers_mut()
                    .insert(header::SET_COOKIE, HeaderValue::from_static(CLEAR_COOKIE));
            }
            Refusal(Box::new(resp))
        })
}

fn redirect_home() -> Response {
    let mut resp = (StatusCode::SEE_OTHER, ()).into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static("/"));
    private(h);
    resp
}

/// Headers of every status-page response: never cached, never named as a referrer.
fn private(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// An HTML response that is never cached, framed, sniffed or allowed to load anything.
fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    private(h);
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// The value of `name` in a cookie header (RFC 6265 section 4.2: `a=b; c=d`).
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.trim_matches('"').to_string())
}

/// The address agents dial, as far as the page can tell: the QUIC listen address, with the
/// host the browser used when the hub listens on every interface.
fn hub_address(listen: SocketAddr, headers: &HeaderMap) -> String {
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|h| match h.rsplit_once(':') {
            // `[::1]:8080` and `name:8080` lose the API port; a bare `[::1]` stays whole.
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => h,
        })
        .filter(|h| !h.is_empty())
        .unwrap_or("HUB_HOST");
    format!("{host}:{}", listen.port())
}

/// Everything the page shows.
pub(crate) struct View<'a> {
    /// The rows of this page, already filtered to what the token may see.
    pub(crate) agents: &'a [AgentInfo],
    /// Connections the token may see on all pages.
    pub(crate) total: usize,
    /// The link to the next page, when more connections follow this one.
    pub(crate) next: Option<String>,
    /// The tenant the token is limited to; `None` for an admin token (every tenant).
    pub(crate) scope: Option<String>,
    /// Silence longer than this is shown as stale (the hub's heartbeat timeout).
    pub(crate) stale_after: Duration,
    /// Where agents connect, for the empty state's command line.
    pub(crate) hub_address: String,
    /// Render time, unix seconds.
    pub(crate) now_unix: u64,
    /// Whether the hub is shutting down.
    pub(crate) draining: bool,
}

/// HTML-escapes text for element content and quoted attribute values.
struct Esc<'a>(&'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// Sign-out is a POST (a link could be followed by any page); the form is checked like the
/// login's.
const SIGN_OUT: &str = "<form method=\"post\" action=\"/sign-out\" class=\"inline\">\
     <button type=\"submit\" id=\"sign-out\">Sign out</button></form>";

const STYLE: &str = "\
body{font:13px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:20px;color:#1f2328;background:#fff}\
h1{font-size:20px;margin:0 0 4px}\
header{display:flex;justify-content:space-between;align-items:baseline;margin-bottom:16px}\
.muted{color:#656d76}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #d0d7de;white-space:nowrap;vertical-align:top}\
th{background:#f6f8fa;font-weight:600;white-space:normal;vertical-align:bottom}.scroll{overflow-x:auto}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
tr:hover td{background:#f6f8fa}\
.stale{color:#cf222e;font-weight:600}\
.banner{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;margin-bottom:16px}\
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:12px;overflow-x:auto}\
form{margin:16px 0}form.inline{display:inline;margin:0}input{font:inherit;padding:6px;width:28em}button{font:inherit;padding:6px 14px}\
.error{color:#cf222e}";

fn head(out: &mut String, title: &str, refresh: bool) {
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    if refresh {
        let _ = write!(
            out,
            "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">"
        );
    }
    let _ = write!(
        out,
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"referrer\" content=\"no-referrer\">\
         <title>{}</title><style>{STYLE}</style></head><body>",
        Esc(title)
    );
}

/// The page for a signed-in token.
pub(crate) fn render(view: &View<'_>) -> String {
    let mut out = String::with_capacity(4096 + view.agents.len() * 1024);
    head(&mut out, "rna hub: agents", true);
    let scope = match &view.scope {
        Some(tenant) => format!("tenant {}", Esc(tenant)),
        None => "all tenants (admin)".to_string(),
    };
    let count = view.total;
    let shown = match view.agents.len() {
        n if n < count => format!(" (this page: {n})"),
        _ => String::new(),
    };
    let _ = write!(
        out,
        "<header><div><h1>Agents</h1><span class=\"muted\" id=\"summary\">{count} connection{}{shown} \
         &middot; {scope} &middot; as of <time datetime=\"{now}\">{now_text}</time> &middot; \
         refreshes every {REFRESH_SECONDS} s</span></div>\
         {SIGN_OUT}</header>",
        if count == 1 { "" } else { "s" },
        now = format_rfc3339(view.now_unix),
        now_text = human_time(view.now_unix),
    );
    if view.draining {
        out.push_str(
            "<div class=\"banner\" id=\"draining\">This hub is shutting down: it accepts no \
             new streams and agents will reconnect to another hub.</div>",
        );
    }
    if view.agents.is_empty() {
        render_empty(&mut out, view);
    } else {
        render_table(&mut out, view);
    }
    if let Some(next) = &view.next {
        let _ = write!(
            out,
            "<p><a id=\"next\" href=\"{}\">Next page &rarr;</a> \
             <a href=\"/\" class=\"muted\">first page</a></p>",
            Esc(next)
        );
    }
    out.push_str("</body></html>\n");
    out
}

fn render_empty(out: &mut String, view: &View<'_>) {
    let tenant = view.scope.as_deref().unwrap_or("ORG/ENV");
    let _ = write!(
        out,
        "<section id=\"empty\"><p>No agent is connected{}. To connect a first agent, make \
         it a certificate and a token on the hub machine:</p>\
         <pre>rna certs agent --dir certs my-agent\n\
         (umask 077 &amp;&amp; rna token create --store tokens.toml --tenant {} \\\n    \
         --scope connect:agentHub --label my-agent &gt; token.txt)</pre>\
         <p>copy <code>ca.pem</code>, the agent's certificate and key, and <code>token.txt</code> \
         to a machine inside the private network, and run there:</p>\
         <pre id=\"connect\">rna agent --hub {} --name my-agent --token-file token.txt \\\n    \
         --ca ca.pem --cert agent-my-agent.pem --key agent-my-agent-key.pem \\\n    \
         --allow 10.0.0.0/8</pre>\
         <p class=\"muted\">The agent dials out to UDP port {} of the hub; it shows up here \
         within seconds.</p></section>",
        match &view.scope {
            Some(t) => format!(" in tenant {}", Esc(t)),
            None => String::new(),
        },
        Esc(tenant),
        Esc(&view.hub_address),
        Esc(view.hub_address.rsplit(':').next().unwrap_or("4433")),
    );
}

fn render_table(out: &mut String, view: &View<'_>) {
    out.push_str(
        "<div class=\"scroll\"><table id=\"agents\"><thead><tr>\
         <th>Agent</th><th>Tenant</th><th>Version</th><th>OS/arch</th><th>Remote address</th><th>Transport</th>\
         <th>Connected since</th><th class=\"num\">Last heartbeat</th><th class=\"num\">RTT</th>\
         <th class=\"num\">Lost packets</th><th class=\"num\">Open streams</th>\
         <th class=\"num\" title=\"bytes from the agent to clients\">Bytes in</th>\
         <th class=\"num\" title=\"bytes from clients to the agent\">Bytes out</th>\
         </tr></thead><tbody>",
    );
    for a in view.agents {
        let stale = a.last_heartbeat_seconds_ago > view.stale_after.as_secs_f64();
        let up = view.now_unix.saturating_sub(a.connected_since_unix);
        let _ = write!(
            out,
            "<tr data-session=\"{id}\" data-agent=\"{name}\" data-tenant=\"{tenant}\">\
             <td class=\"c-name\">{name} <span class=\"muted\">#{id}</span></td>\
             <td class=\"c-tenant\">{tenant}</td>\
             <td class=\"c-version\">{version}</td>\
             <td class=\"c-os\">{os}/{arch}</td>\
             <td class=\"c-remote\">{remote}</td>\
             <td class=\"c-transport\">{transport}</td>\
             <td class=\"c-since\"><time datetime=\"{since}\">{since_text}</time><br>\
             <span class=\"muted\">up {up}</span></td>\
             <td class=\"num c-heartbeat{stale_class}\">{heartbeat:.1} s ago{stale_text}</td>\
             <td class=\"num c-rtt\">{rtt}</td>\
             <td class=\"num c-lost\">{lost}</td>\
             <td class=\"num c-streams\" title=\"{total} opened in this session\">{open}</td>\
             <td class=\"num c-in\" title=\"{bytes_in} bytes\">{bytes_in_h}</td>\
             <td class=\"num c-out\" title=\"{bytes_out} bytes\">{bytes_out_h}</td></tr>",
            id = a.session_id,
            name = Esc(&a.name),
            tenant = Esc(&a.tenant),
            version = Esc(&a.version),
            os = Esc(&a.os),
            arch = Esc(&a.arch),
            remote = a.remote_address,
            since = format_rfc3339(a.connected_since_unix),
            since_text = human_time(a.connected_since_unix),
            up = human_duration(up),
            stale_class = if stale { " stale" } else { "" },
            heartbeat = a.last_heartbeat_seconds_ago,
            stale_text = if stale { " (stale)" } else { "" },
            rtt = if a.rtt_ms > 0.0 {
                format!("{:.2} ms", a.rtt_ms)
            } else {
                "&ndash;".to_string()
            },
            transport = a.transport,
            lost = a
                .lost_packets
                .map_or_else(|| "&ndash;".to_string(), |n| n.to_string()),
            total = a.streams_total,
            open = a.open_streams,
            bytes_in = a.bytes_in,
            bytes_in_h = human_bytes(a.bytes_in),
            bytes_out = a.bytes_out,
            bytes_out_h = human_bytes(a.bytes_out),
        );
    }
    out.push_str("</tbody></table></div>");
}

/// The login form, with the reason the last attempt failed.
pub(crate) fn login_page(message: Option<&str>) -> String {
    let mut out = String::with_capacity(2048);
    head(&mut out, "rna hub: sign in", false);
    out.push_str("<h1>Agents</h1>");
    if let Some(message) = message {
        let _ = write!(out, "<p class=\"error\" id=\"error\">{}</p>", Esc(message));
    }
    out.push_str(
        "<form method=\"post\" action=\"/\" id=\"login\"><label for=\"token\">Token</label> \
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
         required autofocus> <button type=\"submit\">Sign in</button></form>\
         <p class=\"muted\">A token with the <code>read:infra:data</code> scope shows the agents \
         of its tenant; an <code>admin</code> token shows every tenant. Scripts can send \
         <code>Authorization: Bearer &lt;token&gt;</code> instead.</p></body></html>\n",
    );
    out
}

/// A page link that does not work (a bad `limit` or `continue`), with the reason.
fn bad_page(why: &str) -> String {
    let mut out = String::with_capacity(1024);
    head(&mut out, "rna hub: bad page link", false);
    let _ = writeln!(
        out,
        "<h1>Agents</h1><p class=\"error\" id=\"error\">{}</p>\
         <p><a href=\"/\">Go to the first page</a></p></body></html>",
        Esc(why)
    );
    out
}

fn forbidden_page() -> String {
    let mut out = String::with_capacity(1024);
    head(&mut out, "rna hub: not allowed", false);
    out.push_str(
        "<h1>Agents</h1><p class=\"error\" id=\"error\">This token lacks the \
         <code>read:infra:data</code> scope.</p><p>Sign out and sign in with another token. \
         ",
    );
    out.push_str(SIGN_OUT);
    out.push_str("</p></body></html>\n");
    out
}

/// `2026-11-23 12:30:50 UTC`.
fn human_time(unix: u64) -> String {
    format_rfc3339(unix)
        .replacen('T', " ", 1)
        .replace('Z', " UTC")
}

/// `42s`, `4m 12s`, `3h 05m`, `2d 04h`.
fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `12.3 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> AgentInfo {
        AgentInfo {
            session_id: 7,
            name: name.to_string(),
            tenant: "acme/prod".into(),
            version: "0.1.0".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            capabilities: vec![],
            remote_address: "127.0.0.1:5000".parse().unwrap(),
            connected_since_unix: 1_795_000_000,
            last_heartbeat_seconds_ago: 1.5,
            rtt_ms: 0.42,
            heartbeat_interval_ms: 500,
            transport: "quic",
            lost_packets: Some(3),
            path_mtu: Some(1452),
            certificate_not_after_unix: None,
            open_streams: 2,
            streams_total: 9,
            bytes_in: 5 * 1024 * 1024 + 300 * 1024,
            bytes_out: 512,
        }
    }

    fn view(agents: &[AgentInfo]) -> View<'_> {
        View {
            agents,
            total: agents.len(),
            next: None,
            scope: Some("acme/prod".into()),
            stale_after: Duration::from_secs(30),
            hub_address: "hub.example.com:4433".into(),
            now_unix: 1_795_000_300,
            draining: false,
        }
    }

    #[test]
    fn network_text_is_escaped_everywhere() {
        let mut a = info("<script>alert(1)</script>");
        a.version = "1\"><img src=x onerror=alert(2)>".into();
        a.os = "linux'&".into();
        a.arch = "<b>".into();
        a.tenant = "t\"/x".into();
        let page = render(&view(std::slice::from_ref(&a)));
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("<b>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("data-agent=\"&lt;script&gt;alert(1)&lt;/script&gt;\""));
        assert!(page.contains("1&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
        assert!(page.contains("linux&#39;&amp;/&lt;b&gt;"));
        assert!(page.contains("data-tenant=\"t&quot;/x\""));
        let login = login_page(Some("<i>bad</i>"));
        assert!(login.contains("&lt;i&gt;bad&lt;/i&gt;") && !login.contains("<i>"));
    }

    #[test]
    fn row_shows_every_column() {
        let page = render(&view(&[info("db-gateway")]));
        for want in [
            "<meta http-equiv=\"refresh\" content=\"5\">",
            "1 connection &middot; tenant acme/prod",
            "<td class=\"c-name\">db-gateway <span class=\"muted\">#7</span></td>",
            "<td class=\"c-tenant\">acme/prod</td>",
            "<td class=\"c-version\">0.1.0</td>",
            "<td class=\"c-os\">linux/x86_64</td>",
            "<td class=\"c-remote\">127.0.0.1:5000</td>",
            "<td class=\"c-transport\">quic</td>",
            "<time datetime=\"2026-11-18T11:06:40Z\">2026-11-18 11:06:40 UTC</time><br>\
             <span class=\"muted\">up 5m 00s</span>",
            "<td class=\"num c-heartbeat\">1.5 s ago</td>",
            "<td class=\"num c-rtt\">0.42 ms</td>",
            "<td class=\"num c-lost\">3</td>",
            ">2</td>",
            "title=\"5550080 bytes\">5.3 MiB</td>",
            "title=\"512 bytes\">512 B</td>",
            "<form method=\"post\" action=\"/sign-out\"",
        ] {
            assert!(page.contains(want), "missing {want:?} in {page}");
        }
        assert!(!page.contains("id=\"empty\""));
        assert!(!page.contains("http://") && !page.contains("<script"));
    }

    #[test]
    fn stale_heartbeat_is_red_and_says_so() {
        let mut a = info("quiet");
        a.last_heartbeat_seconds_ago = 31.0;
        a.rtt_ms = 0.0;
        let page = render(&view(&[a]));
        assert!(page.contains("<td class=\"num c-heartbeat stale\">31.0 s ago (stale)</td>"));
        assert!(page.contains(".stale{color:#cf222e"));
        assert!(page.contains("<td class=\"num c-rtt\">&ndash;</td>"));
    }

    #[test]
    fn empty_state_says_how_to_connect_an_agent() {
        let page = render(&view(&[]));
        assert!(page.contains("0 connections"));
        assert!(page.contains("No agent is connected in tenant acme/prod"));
        assert!(page.contains(
            "rna agent --hub hub.example.com:4433 --name my-agent --token-file token.txt"
        ));
        assert!(page.contains("--tenant acme/prod"));
        assert!(page.contains("UDP port 4433"));
        assert!(!page.contains("<table"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(252), "4m 12s");
        assert_eq!(human_duration(3 * 3600 + 5 * 60), "3h 05m");
        assert_eq!(human_duration(2 * 86_400 + 4 * 3600), "2d 04h");
    }

    #[test]
    fn cookie_parsing() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; rna_token=rna_x_y"),
        );
        assert_eq!(cookie_value(&h, COOKIE).as_deref(), Some("rna_x_y"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("rna_token="));
        assert_eq!(cookie_value(&h, COOKIE), None);
    }

    #[test]
    fn hub_address_for_the_connect_line() {
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("hub.example.com:8080"),
        );
        let any: SocketAddr = "0.0.0.0:4433".parse().unwrap();
        assert_eq!(hub_address(any, &h), "hub.example.com:4433");
        h.insert(header::HOST, HeaderValue::from_static("[::1]:8080"));
        assert_eq!(hub_address(any, &h), "[::1]:4433");
        let fixed: SocketAddr = "10.0.0.5:4433".parse().unwrap();
        assert_eq!(hub_address(fixed, &h), "10.0.0.5:4433");
        assert_eq!(hub_address(any, &HeaderMap::new()), "HUB_HOST:4433");
    }
}
