//! HTTP proxy egress for the agent: which proxy applies (`--proxy` or the environment, with
//! curl's `NO_PROXY` rules), and a `CONNECT` tunnel through it (RFC 9110 §9.3.6) that the
//! TLS/TCP session then runs inside.
//!
//! Hand-written rather than hyper-util's `Tunnel`: the tunnel's errors must name the proxy's
//! status ("403 Forbidden") and tell a refused password from an unreachable proxy, and the
//! `NO_PROXY` rules must be curl's; see docs/decisions.md.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest proxy response head read before giving up: a CONNECT answer is a status line and a
/// few headers; anything longer is not a proxy we can talk to.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// The port of a proxy URL that names none; 1080, as curl uses.
pub const DEFAULT_PROXY_PORT: u16 = 1080;

/// Why the proxy setting is unusable or the tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy URL could not be read.
    #[error("invalid proxy URL {url:?}: {problem}")]
    Url {
        /// The URL with any password masked.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
    /// No TCP connection to the proxy itself.
    #[error("proxy {proxy} unreachable: {source}")]
    Unreachable {
        /// The proxy (`host:port`).
        proxy: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The proxy answered 407 (or 401, which some proxies, tinyproxy among them, send for
    /// CONNECT): it wants credentials, or refused the ones given.
    #[error("proxy {proxy} refused the credentials ({status}){hint}")]
    Auth {
        /// The proxy (`host:port`).
        proxy: String,
        /// Code and reason phrase, e.g. `407 Proxy Authentication Required`.
        status: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The proxy answered with another non-success status.
    #[error("proxy {proxy} refused CONNECT {target}: {status}")]
    Status {
        /// The proxy (`host:port`).
        proxy: String,
        /// The hub address asked for.
        target: String,
        /// Code and reason phrase, e.g. `403 Forbidden`.
        status: String,
    },
    /// The proxy's answer is not an HTTP response head.
    #[error("proxy {proxy} sent a malformed answer to CONNECT: {detail}")]
    Malformed {
        /// The proxy (`host:port`).
        proxy: String,
        /// What was wrong.
        detail: String,
    },
    /// Reading or writing the CONNECT exchange failed.
    #[error("proxy {proxy}: {source}")]
    Io {
        /// The proxy (`host:port`).
        proxy: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The CONNECT exchange took longer than allowed.
    #[error("proxy {proxy} did not open the tunnel within {limit:?}")]
    Timeout {
        /// The proxy (`host:port`).
        proxy: String,
        /// The deadline.
        limit: Duration,
    },
}

/// Proxy credentials; the password is never printed.
#[derive(Clone, PartialEq, Eq)]
struct Credentials {
    user: String,
    password: String,
}

/// An HTTP proxy: `http://[user:pass@]host[:port]`. `Debug` and `Display` mask the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Host name or IP address (without brackets).
    host: String,
    /// TCP port.
    port: u16,
    /// Basic credentials, when given.
    credentials: Option<Credentials>,
}

impl ProxyUrl {
    /// Reads a proxy URL. `http://` is the only scheme (a scheme-less value means http, as
    /// in curl); user and password may be percent-encoded.
    pub fn parse(text: &str) -> Result<ProxyUrl, ProxyError> {
        let fail = |problem: &str| ProxyError::Url {
            url: mask_url(text),
            problem: problem.to_string(),
        };
        let text = text.trim();
        let rest = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(fail(&format!(
                    "scheme {scheme}:// is not supported; use an http:// proxy (the agent's \
                     TLS runs inside the tunnel)"
                )))
            }
            None => text,
        };
        // Path, query and fragment mean nothing for a proxy; only a bare "/" is accepted.
        let authority = match rest.find(['/', '?', '#']) {
            Some(i) if &rest[i..] == "/" => &rest[..i],
            Some(_) => return Err(fail("a proxy URL has no path")),
            None => rest,
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let credentials = match userinfo {
            None => None,
            Some(u) => {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                Some(Credentials {
                    user: percent_decode(user).ok_or_else(|| fail("bad %-escape in the user"))?,
                    password: percent_decode(password)
                        .ok_or_else(|| fail("bad %-escape in the password"))?,
                })
            }
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| fail("bad host or port"))?;
        if host.is_empty() {
            return Err(fail("no host"));
        }
        Ok(ProxyUrl {
            host,
            port: port.unwrap_or(DEFAULT_PROXY_PORT),
            credentials,
        })
    }

    /// `host:port` of the proxy (IPv6 in brackets), for messages.
    pub fn authority(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    /// Whether credentials were given.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.credentials {
            // The whole user information is masked: some proxies take their secret as the
            // user name with an empty password.
            Some(_) => write!(f, "http://MASKED@{}", self.authority()),
            None => write!(f, "http://{}", self.authority()),
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

impl std::str::FromStr for ProxyUrl {
    type Err = ProxyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProxyUrl::parse(s)
    }
}

/// A URL as it may appear in an error: whatever sits between `://` and `@` is masked.
fn mask_url(text: &str) -> String {
    let (scheme, rest) = text.split_once("://").unwrap_or(("", text));
    let shown = match rest.rsplit_once('@') {
        Some((_, host)) => format!("MASKED@{host}"),
        None => rest.to_string(),
    };
    if scheme.is_empty() {
        shown
    } else {
        format!("{scheme}://{shown}")
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` → (host without brackets, port).
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        // More than one colon without brackets: a bare IPv6 address, no port.
        Some((h, _)) if h.contains(':') => Some((s.to_string(), None)),
        Some((h, p)) => Some((h.to_string(), Some(p.parse().ok()?))),
        None => Some((s.to_string(), None)),
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One `NO_PROXY` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bypass {
    /// A host name: matches itself and every name below it (`example.com` matches
    /// `www.example.com`, not `notexample.com`).
    Domain(String, Option<u16>),
    /// An IP address: matches that address only.
    Ip(IpAddr, Option<u16>),
    /// A CIDR block.
    Net(IpAddr, u8, Option<u16>),
}

/// Hosts reached directly, never through the proxy: curl's `NO_PROXY` rules. A
/// comma-separated list; `*` alone matches every host; a name matches itself and its
/// subdomains, with or without a leading dot; IP addresses match exactly and CIDR blocks by
/// prefix (a name is never resolved to check them); case and a trailing dot are ignored.
/// An entry may end in `:port` to match that port only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    /// `*`: nothing goes through the proxy.
    all: bool,
    /// The entries, in order.
    entries: Vec<Bypass>,
}

impl NoProxy {
    /// Reads a `NO_PROXY` value. Entries that are none of the above are skipped, as curl does.
    pub fn parse(list: &str) -> NoProxy {
        let list = list.trim();
        if list == "*" {
            return NoProxy {
                all: true,
                entries: Vec::new(),
            };
        }
        let entries = list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .filter_map(parse_bypass)
            .collect();
        NoProxy {
            all: false,
            entries,
        }
    }

    /// Whether `host:port` is reached directly.
    pub fn bypasses(&self, host: &str, port: u16) -> bool {
        if self.all {
            return true;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = name.parse::<IpAddr>().ok();
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        self.entries.iter().any(|entry| match (entry, ip) {
            (Bypass::Ip(want, p), Some(ip)) => *want == ip && port_ok(p),
            (Bypass::Net(net, bits, p), Some(ip)) => in_net(ip, *net, *bits) && port_ok(p),
            (Bypass::Domain(d, p), None) => {
                port_ok(p)
                    && (name == *d
                        || (name.len() > d.len()
                            && name.ends_with(d.as_str())
                            && name.as_bytes()[name.len() - d.len() - 1] == b'.'))
            }
            _ => false,
        })
    }
}

fn parse_bypass(token: &str) -> Option<Bypass> {
    // CIDR first: its "/" never appears in a host.
    if let Some((addr, bits)) = token.split_once('/') {
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = addr.parse().ok()?;
        let bits: u8 = bits.parse().ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        return (bits <= max).then_some(Bypass::Net(ip, bits, None));
    }
    if let Ok(ip) = token.parse::<IpAddr>() {
        return Some(Bypass::Ip(ip, None));
    }
    let (host, port) = split_host_port(token)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(Bypass::Ip(ip, port));
    }
    let name = host.trim_start_matches('.').trim_end_matches('.');
    if name.is_empty() {
        return None;
    }
    Some(Bypass::Domain(name.to_ascii_lowercase(), port))
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    // An IPv4-mapped IPv6 address is compared as the IPv4 address it carries.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Which proxy the agent uses for which hub address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxySettings {
    /// The proxy, if any.
    pub proxy: Option<ProxyUrl>,
    /// Hosts reached directly.
    pub no_proxy: NoProxy,
}

impl ProxySettings {
    /// The proxy from `--proxy` when given, else from the environment as curl reads it for an
    /// https target: `https_proxy`, `HTTPS_PROXY`, `all_proxy`, `ALL_PROXY` (first one set and
    /// not empty); `no_proxy`/`NO_PROXY` applies to either. `env` looks a variable up (main.rs
    /// passes `std::env::var`; tests pass a table).
    pub fn resolve(
        flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ProxySettings, ProxyError> {
        let var = |names: &[&str]| {
            names
                .iter()
                .filter_map(|n| env(n))
                .find(|v| !v.trim().is_empty())
        };
        let proxy = match flag.filter(|f| !f.trim().is_empty()) {
            Some(f) => Some(f.to_string()),
            None => var(&["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]),
        };
        Ok(ProxySettings {
            proxy: proxy.as_deref().map(ProxyUrl::parse).transpose()?,
            no_proxy: NoProxy::parse(&var(&["no_proxy", "NO_PROXY"]).unwrap_or_default()),
        })
    }

    /// The proxy to use for the hub at `host:port`, or `None` to dial it directly.
    pub fn for_hub(&self, host: &str, port: u16) -> Option<&ProxyUrl> {
        self.proxy
            .as_ref()
            .filter(|_| !self.no_proxy.bypasses(host, port))
    }
}

/// Opens a tunnel to `target_host:target_port` through `proxy` with `CONNECT`, sending Basic
/// credentials when the URL has them, all within `limit`. The returned stream is the tunnel:
/// the caller runs TLS inside it.
pub async fn connect(
    proxy: &ProxyUrl,
    target_host: &str,
    target_port: u16,
    limit: Duration,
) -> Result<TcpStream, ProxyError> {
    let name = proxy.authority();
    tokio::time::timeout(limit, tunnel(proxy, target_host, target_port))
        .await
        .unwrap_or(Err(ProxyError::Timeout { proxy: name, limit }))
}

async fn tunnel(
    proxy: &ProxyUrl,
    target_host: &str,
    target_port: u16,
) -> Result<TcpStream, ProxyError> {
    let name = proxy.authority();
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|source| ProxyError::Unreachable {
            proxy: name.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let target = join_host_port(target_host, target_port);
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(c) = &proxy.credentials {
        request.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            basic_credentials(c)
        ));
    }
    request.push_str("\r\n");
    let io = |source| ProxyError::Io {
        proxy: name.clone(),
        source,
    };
    tcp.write_all(request.as_bytes()).await.map_err(io)?;
    let head = read_head(&mut tcp).await.map_err(|e| match e {
        HeadError::Io(source) => ProxyError::Io {
            proxy: name.clone(),
            source,
        },
        HeadError::Malformed(detail) => ProxyError::Malformed {
            proxy: name.clone(),
            detail,
        },
    })?;
    let (code, reason) = parse_status(&head).map_err(|detail| ProxyError::Malformed {
        proxy: name.clone(),
        detail,
    })?;
    let status = if reason.is_empty() {
        code.to_string()
    } else {
        format!("{code} {reason}")
    };
    match code {
        200..=299 => Ok(tcp),
        // The tunnel is not open yet, so an authentication status is the proxy's own.
        401 | 407 => Err(ProxyError::Auth {
            proxy: name,
            status,
            hint: if proxy.has_credentials() {
                ""
            } else {
                "; it needs them: --proxy http://USER:PASSWORD@host:port"
            },
        }),
        _ => Err(ProxyError::Status {
            proxy: name,
            target,
            status,
        }),
    }
}

enum HeadError {
    Io(std::io::Error),
    Malformed(String),
}

/// Reads the response head up to and including the blank line, byte by byte so nothing of
/// what follows (the hub's TLS) is consumed, and never more than [`MAX_RESPONSE_HEAD`].
async fn read_head(tcp: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(HeadError::Malformed(format!(
                "response head longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        match tcp.read(&mut byte).await.map_err(HeadError::Io)? {
            0 if head.is_empty() => {
                return Err(HeadError::Malformed(
                    "closed the connection without answering".into(),
                ))
            }
            0 => {
                return Err(HeadError::Malformed(
                    "closed the connection in the middle of its answer".into(),
                ))
            }
            _ => head.push(byte[0]),
        }
    }
    Ok(head)
}

/// The status code and reason phrase of an HTTP/1.x response head (RFC 9112 §4).
fn parse_status(head: &[u8]) -> Result<(u16, String), String> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end])
        .map_err(|_| "status line is not text".to_string())?
        .trim_end_matches('\r');
    let shown: String = line.chars().take(80).collect();
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !(version == "HTTP/1.1" || version == "HTTP/1.0") {
        return Err(format!("not an HTTP/1.x status line: {shown:?}"));
    }
    let code = parts
        .next()
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|c| (100..=599).contains(c))
        .ok_or_else(|| format!("no status code in {shown:?}"))?;
    let reason = parts.next().unwrap_or_default().trim();
    // Only printable text reaches a log line.
    let reason = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(80)
        .collect();
    Ok((code, reason))
}

/// The value of a `Proxy-Authorization: Basic` header (RFC 7617 §2): base64 of `user:password`.
fn basic_credentials(c: &Credentials) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_follow_rfc7617() {
        // RFC 7617 §2's example.
        let c = Credentials {
            user: "Aladdin".into(),
            password: "open sesame".into(),
        };
        assert_eq!(basic_credentials(&c), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    }

    #[test]
    fn proxy_urls_parse_and_never_print_the_password() {
        /// (URL, host, port, (user, password)).
        type Case = (
            &'static str,
            &'static str,
            u16,
            Option<(&'static str, &'static str)>,
        );
        let table: &[Case] = &[
            ("http://proxy.corp:3128", "proxy.corp", 3128, None),
            ("proxy.corp:3128", "proxy.corp", 3128, None),
            ("http://proxy.corp", "proxy.corp", 1080, None),
            ("http://proxy.corp:3128/", "proxy.corp", 3128, None),
            ("HTTP://10.0.0.1:8080", "10.0.0.1", 8080, None),
            ("http://[::1]:3128", "::1", 3128, None),
            ("http://u:p@proxy:3128", "proxy", 3128, Some(("u", "p"))),
            (
                "http://me%40corp:p%3Ass@proxy:3128",
                "proxy",
                3128,
                Some(("me@corp", "p:ss")),
            ),
            ("http://user@proxy:3128", "proxy", 3128, Some(("user", ""))),
        ];
        for (text, host, port, creds) in table {
            let url = ProxyUrl::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(url.host, *host, "{text}");
            assert_eq!(url.port, *port, "{text}");
            let got = url
                .credentials
                .as_ref()
                .map(|c| (c.user.as_str(), c.password.as_str()));
            assert_eq!(got, *creds, "{text}");
        }
        let url = ProxyUrl::parse("http://agent:s3cret@proxy:3128").unwrap();
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(!shown.contains("agent"), "{shown}");
            assert!(shown.contains("http://MASKED@proxy:3128"), "{shown}");
        }
        for bad in [
            "https://proxy:3128",
            "socks5://proxy:1080",
            "http://proxy:99999",
            "http://proxy:port",
            "http://",
            "http://proxy:3128/path",
            "http://u:%zz@proxy:1",
            "http://[::1:3128",
        ] {
            assert!(ProxyUrl::parse(bad).is_err(), "{bad} should be refused");
        }
        let err = ProxyUrl::parse("https://u:hunter2@proxy:3128")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("use an http:// proxy"), "{err}");
    }

    /// curl's documented `NO_PROXY` behaviour (CURLOPT_NOPROXY), plus ports.
    #[test]
    fn no_proxy_follows_curl() {
        let table: &[(&str, &str, u16, bool)] = &[
            ("", "hub.example.com", 443, false),
            ("*", "hub.example.com", 443, true),
            ("*", "10.1.2.3", 443, true),
            // A name matches itself and names below it.
            ("example.com", "example.com", 443, true),
            ("example.com", "hub.example.com", 443, true),
            ("example.com", "a.b.example.com", 443, true),
            ("example.com", "notexample.com", 443, false),
            ("example.com", "example.com.org", 443, false),
            ("ample.com", "www.example.com", 443, false),
            // A leading dot is ignored: the name itself matches too.
            (".example.com", "hub.example.com", 443, true),
            (".example.com", "example.com", 443, true),
            // Case and a trailing dot do not matter.
            ("Example.COM", "HUB.example.com.", 443, true),
            // Lists, with spaces and empty entries.
            ("foo.org, example.com ,,", "hub.example.com", 443, true),
            ("foo.org,bar.org", "hub.example.com", 443, false),
            // A lone * only: inside a list it is not a wildcard.
            ("foo.org,*", "hub.example.com", 443, false),
            // IP addresses match exactly, never as suffixes.
            ("10.0.0.1", "10.0.0.1", 443, true),
            ("10.0.0.1", "10.0.0.12", 443, false),
            ("0.0.1", "10.0.0.1", 443, false),
            ("::1", "::1", 443, true),
            ("[::1]", "[::1]", 443, true),
            // CIDR blocks.
            ("10.0.0.0/8", "10.200.3.4", 443, true),
            ("10.0.0.0/8", "11.0.0.1", 443, false),
            ("192.168.1.0/24", "192.168.1.77", 443, true),
            ("192.168.1.0/24", "192.168.2.1", 443, false),
            ("0.0.0.0/0", "8.8.8.8", 443, true),
            ("fd00::/8", "fd12::1", 443, true),
            ("fd00::/8", "fe80::1", 443, false),
            ("10.0.0.0/8", "::ffff:10.1.1.1", 443, true),
            // A name is never resolved to check IP entries.
            ("127.0.0.0/8", "localhost", 443, false),
            // Ports: an entry with a port matches that port only.
            ("example.com:443", "hub.example.com", 443, true),
            ("example.com:443", "hub.example.com", 8443, false),
            ("10.0.0.1:443", "10.0.0.1", 443, true),
            ("10.0.0.1:443", "10.0.0.1", 80, false),
            ("[::1]:443", "::1", 443, true),
            // Garbage entries are skipped, the rest still applies.
            ("10.0.0.0/99,example.com", "hub.example.com", 443, true),
        ];
        for (list, host, port, bypass) in table {
            assert_eq!(
                NoProxy::parse(list).bypasses(host, *port),
                *bypass,
                "NO_PROXY={list:?} host {host}:{port}"
            );
        }
    }

    #[test]
    fn the_flag_wins_then_the_environment_in_curls_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let host = |s: &ProxySettings| s.proxy.as_ref().map(|p| p.host.clone());
        let s = ProxySettings::resolve(None, env(&[])).unwrap();
        assert_eq!(s.proxy, None);
        let s = ProxySettings::resolve(Some("http://flag:1"), env(&[("HTTPS_PROXY", "env:1")]))
            .unwrap();
        assert_eq!(host(&s).as_deref(), Some("flag"));
        let s = ProxySettings::resolve(
            None,
            env(&[
                ("HTTPS_PROXY", "upper:1"),
                ("https_proxy", "lower:1"),
                ("ALL_PROXY", "all:1"),
            ]),
        )
        .unwrap();
        assert_eq!(host(&s).as_deref(), Some("lower"));
        let s = ProxySettings::resolve(None, env(&[("https_proxy", ""), ("ALL_PROXY", "all:1")]))
            .unwrap();
        assert_eq!(host(&s).as_deref(), Some("all"));
        let s = ProxySettings::resolve(
            None,
            env(&[("HTTPS_PROXY", "p:1"), ("NO_PROXY", ".corp,10.0.0.0/8")]),
        )
        .unwrap();
        assert!(s.for_hub("hub.corp", 443).is_none());
        assert!(s.for_hub("10.9.9.9", 443).is_none());
        assert!(s.for_hub("hub.example.com", 443).is_some());
        assert!(ProxySettings::resolve(None, env(&[("HTTPS_PROXY", "ftp://x:1")])).is_err());
    }

    #[test]
    fn status_lines_are_read_strictly() {
        let ok = |h: &str| parse_status(h.as_bytes());
        assert_eq!(
            ok("HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok((200, "Connection established".into()))
        );
        assert_eq!(
            ok("HTTP/1.0 403 Forbidden\r\n\r\n"),
            Ok((403, "Forbidden".into()))
        );
        assert_eq!(ok("HTTP/1.1 502\r\n\r\n"), Ok((502, String::new())));
        for bad in [
            "SSH-2.0-OpenSSH_9.6\r\n",
            "HTTP/2 200\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "HTTP/1.1 abc OK\r\n\r\n",
            "HTTP/1.1 999 Nope\r\n\r\n",
            "\r\n\r\n",
        ] {
            assert!(ok(bad).is_err(), "{bad:?}");
        }
    }
}
