//! What the hub is told to do, validated: addresses, TLS, tokens, and every deadline and cap of
//! its fronts, with their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::Tenant;
use crate::listen::HttpLimits;
use crate::transport::control::Heartbeat;
use crate::transport::{Limits, ServerTls};

/// Where unauthenticated SOCKS clients go (loopback-only `--socks-no-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoAuthRoute {
    /// The agent to route to.
    pub agent: String,
    /// The agent's tenant.
    pub tenant: Tenant,
}

/// Bounds on SOCKS clients before they are authenticated.
#[derive(Debug, Clone)]
pub struct SocksLimits {
    /// The greeting, authentication and request must complete within this.
    pub greeting_timeout: Duration,
    /// Connections from one client still in the greeting; IPv6 clients are counted per
    /// /64. A newcomer over it is refused.
    pub half_open_per_ip: usize,
    /// Connections in the greeting from all clients. When full, a newcomer is admitted and
    /// the oldest half-open connection of the client holding the most is closed.
    pub half_open_total: usize,
}

impl Default for SocksLimits {
    fn default() -> Self {
        SocksLimits {
            greeting_timeout: Duration::from_secs(10),
            half_open_per_ip: 256,
            half_open_total: 4096,
        }
    }
}

/// Resource caps of the hub beyond the SOCKS pre-authentication bounds. Each refusal is
/// counted in `rna_cap_refusals_total{cap=...}`.
#[derive(Debug, Clone)]
pub struct HubCaps {
    /// Agent connections in the handshake (QUIC, TLS, Hello) at once; more are refused
    /// before any cryptographic work (`cap="quic_handshakes"`), or, over QUIC from a validated
    /// address, first wait up to `handshake_wait` for a slot.
    pub handshakes: usize,
    /// Time a QUIC attempt from a validated address may wait for a handshake slot when all
    /// are taken (at most 512 wait at once; the default 2 s stays well inside an `auto` agent's 5 s before it tries TCP), before it is refused; 0 refuses at once. A
    /// waiting agent costs no new attempt: its first Initial is answered when a slot frees,
    /// where a refused one backs off and starts over (S1, docs/performance.md).
    pub handshake_wait: Duration,
    /// Handshakes at once from one source block (an IPv4 address, an IPv6 /64) whose address
    /// is validated; more are refused (`cap="quic_handshakes_per_source"`), so one sender
    /// cannot take every slot.
    pub handshakes_per_source: usize,
    /// Handshakes in progress from which on a connection attempt from an address not yet
    /// validated is answered with a QUIC Retry (counted in `rna_quic_retries_total`); 0 asks
    /// every new address. Spoofed sources never answer a Retry, so they hold at most this
    /// many slots and are sent less than they send.
    pub retry_threshold: usize,
    /// Time for the QUIC and TLS handshake, from the first packet; short, so attempts that
    /// never finish free their slot soon (`rna_handshake_failures_total{reason="tls_timeout"}`).
    pub tls_timeout: Duration,
    /// Time, after TLS, for the agent to open its control stream and send Hello; an agent
    /// sends it at once, so this is only reached by a client that holds a certificate and no
    /// intent to register (closed `handshake_timeout`, `reason="timeout"`).
    pub hello_timeout: Duration,
    /// Tunnel streams open or being opened on one agent connection; a SOCKS request beyond
    /// it is answered 0x01 (`cap="streams_per_agent"`).
    pub streams_per_agent: usize,
    /// Largest frame body accepted from an agent (Hello, control frames, Open replies); a
    /// longer one closes the connection with a protocol error (`cap="frame_size"`).
    pub max_frame: usize,
    /// A tunnel stream with no byte moving either way for this long is reset on both sides
    /// (`cap="stream_idle_timeout"`).
    pub stream_idle_timeout: Duration,
    /// Largest body of a Kubernetes apply request through the admin API, at most the
    /// protocol's 4 MiB; a larger one is answered 413 `RequestTooLarge`
    /// (`cap="kube_request"`).
    pub kube_request: usize,
    /// Kubernetes waits one token may have running at once; one more is answered 429
    /// `TooManyWaits` (`cap="kube_waits_per_token"`), so a read-only token cannot hold an
    /// agent's command slots for hours.
    pub kube_waits_per_token: usize,
    /// Sessions one agent name may hold in its tenant at once (replicas, reconnects not yet
    /// noticed); one more is refused `too_many_sessions (0x23)`
    /// (`cap="sessions_per_agent"`).
    pub sessions_per_agent: usize,
    /// Sessions registered with one token at once; one more is refused
    /// `too_many_sessions (0x23)` (`cap="sessions_per_token"`).
    pub sessions_per_token: usize,
    /// Least time between two inventory reports the hub reads from one session: a report
    /// sent sooner waits for its turn, and one sent while another waits is refused with
    /// stream code 0x102 (`cap="inventory_interval"`).
    pub inventory_interval: Duration,
    /// Inventory reads through the admin API served at once per tenant; more wait for a
    /// turn up to 10 s, then get 429 (`cap="heavy_requests_per_tenant"`).
    pub heavy_requests_per_tenant: usize,
    /// Bytes per second the answers of those reads are sent at, per tenant together (a
    /// 3 MB inventory takes about 0.1 s at the default 32 MiB/s).
    pub heavy_bytes_per_second: u64,
}

impl Default for HubCaps {
    fn default() -> Self {
        HubCaps {
            // A reconnect storm of 10,000 agents on 2 cores (S1, docs/performance.md) needs
            // more than 256 in progress: with 256, 22,000 refusals sent agents back to start
            // over; with 1,024 and the wait below, none. A handshake in progress holds about
            // 40 KiB (quinn and rustls state), so 1,024 bound about 40 MiB.
            handshakes: 1024,
            handshake_wait: Duration::from_secs(2),
            handshakes_per_source: 16,
            retry_threshold: 32,
            tls_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(5),
            // As many as an agent grants by default (`Limits::tunnel_streams`), so one agent
            // carries 10,000 and more concurrent streams out of the box.
            streams_per_agent: 16_384,
            max_frame: crate::proto::codec::MAX_FRAME,
            stream_idle_timeout: Duration::from_secs(3600),
            kube_request: crate::proto::kube::MAX_KUBE_REQUEST,
            kube_waits_per_token: 8,
            // Replicas sharing a name, doubled during a rolling update, plus sessions of
            // reconnected agents the hub has not yet noticed are gone.
            sessions_per_agent: 16,
            // One token is often shared by all agents of a tenant.
            sessions_per_token: 1024,
            inventory_interval: Duration::from_secs(5),
            heavy_requests_per_tenant: 4,
            heavy_bytes_per_second: 32 * 1024 * 1024,
        }
    }
}

/// Everything the hub needs, validated.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// UDP address agents connect to.
    pub listen: SocketAddr,
    /// Where agents connect over TLS/TCP (the fallback for networks without UDP).
    pub tcp_listen: TcpListen,
    /// TCP address of the SOCKS5 front.
    pub socks: SocketAddr,
    /// TCP address of the admin API, if served.
    pub api: Option<SocketAddr>,
    /// Deadlines and connection caps of the admin API.
    pub api_limits: HttpLimits,
    /// The hub's certificate and the CA agents must chain to.
    pub tls: ServerTls,
    /// The token store file.
    pub tokens: PathBuf,
    /// Route for unauthenticated SOCKS clients (loopback only).
    pub socks_no_auth: Option<NoAuthRoute>,
    /// QUIC limits of agent connections.
    pub limits: Limits,
    /// Heartbeat timing announced to agents: `interval` is the ceiling of the paced interval
    /// (see `heartbeat_min`, `heartbeat_rate`), `timeout` the silence limit (at least three
    /// intervals).
    pub heartbeat: Heartbeat,
    /// The shortest heartbeat interval announced: what a small fleet gets, and how soon an
    /// agent's ping draws a restarted hub's stateless reset.
    pub heartbeat_min: Duration,
    /// Agent pings per second the hub budgets for: the interval is the number of agents
    /// connected divided by this, between `heartbeat_min` and `heartbeat.interval`.
    pub heartbeat_rate: u32,
    /// Pre-authentication SOCKS bounds.
    pub socks_limits: SocksLimits,
    /// Caps on handshakes, streams, frames and idle streams.
    pub caps: HubCaps,
    /// How long the agent may take to answer `Open` (it dials within its own timeout).
    pub open_timeout: Duration,
    /// When a SOCKS request is answered before the agent's own answer.
    pub socks_early_reply: EarlyReply,
    /// On shutdown, how long in-flight streams may continue.
    pub grace: Duration,
    /// How often the token store file is checked for changes.
    pub token_poll: Duration,
    /// Label session metrics with the agent name too (opt in: one series per agent).
    pub metrics_per_agent: bool,
    /// Folder for state that must survive restarts (the endpoint key). Without it every start
    /// makes a new key, and agents of a restarted hub notice only at their idle timeout.
    pub state_dir: Option<PathBuf>,
    /// Enrollment: the state folder whose CA key signs enrolled agents and whose join tokens
    /// admit them. `None`: the hub offers no enrollment (no CA key at hand), and its TLS
    /// offers only the agent protocol, requiring a client certificate.
    pub enrollment: Option<crate::enroll::HubState>,
    /// Lifetime of the certificates the hub signs for enrolled agents.
    pub agent_cert_lifetime: Duration,
    /// How long a Kubernetes command (other than wait, which has its own) may take.
    pub kube_timeout: Duration,
    /// Worker threads of the process's runtime (read by `main` before the hub starts).
    pub worker_threads: usize,
    /// The file the trusted OIDC issuers were read from, for `--check-config`.
    pub oidc_issuers_file: Option<PathBuf>,
    /// Where tokens, join tokens, issued certificates and revocations are kept: the files
    /// (`tokens` and the enrollment state folder), or one Kubernetes Secret that replicas
    /// share and follow.
    pub state: crate::state::StateLocation,
    /// Trusted OIDC issuers: a JWT one of them signed is accepted wherever a token is.
    /// Empty: only opaque tokens are accepted.
    pub oidc_issuers: Vec<crate::oidc::IssuerConfig>,
    /// How often issuer keys are fetched (hourly, at most every 10 s on an unknown `kid`);
    /// tests shorten it.
    pub oidc_tuning: crate::oidc::Tuning,
}

impl HubConfig {
    /// A configuration with the defaults for everything but addresses, TLS and tokens.
    pub fn new(listen: SocketAddr, socks: SocketAddr, tls: ServerTls, tokens: PathBuf) -> Self {
        HubConfig {
            listen,
            tcp_listen: TcpListen::SameAsQuic,
            socks,
            api: None,
            api_limits: HttpLimits::default(),
            tls,
            tokens,
            socks_no_auth: None,
            limits: Limits::default(),
            heartbeat: Heartbeat::default(),
            heartbeat_min: Duration::from_millis(250),
            heartbeat_rate: 1_000,
            socks_limits: SocksLimits::default(),
            caps: HubCaps::default(),
            open_timeout: Duration::from_secs(15),
            socks_early_reply: EarlyReply::Off,
            grace: Duration::from_secs(30),
            token_poll: Duration::from_secs(2),
            metrics_per_agent: false,
            state_dir: None,
            enrollment: None,
            agent_cert_lifetime: crate::enroll::csr::DEFAULT_CERT_LIFETIME,
            kube_timeout: Duration::from_secs(60),
            worker_threads: crate::runtime::default_worker_threads(),
            oidc_issuers_file: None,
            state: crate::state::StateLocation::File,
            oidc_issuers: Vec::new(),
            oidc_tuning: crate::oidc::Tuning::default(),
        }
    }
}

/// Where the hub serves agents over TLS/TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpListen {
    /// The TCP port of the QUIC address (`--listen 0.0.0.0:443` serves UDP and TCP 443).
    #[default]
    SameAsQuic,
    /// Not served: agents connect over QUIC only.
    Off,
    /// This address.
    At(SocketAddr),
}

impl std::str::FromStr for TcpListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(TcpListen::Off),
            "same" => Ok(TcpListen::SameAsQuic),
            addr => addr
                .parse()
                .map(TcpListen::At)
                .map_err(|_| format!("{addr:?} is not an address (host:port), `same` or `off`")),
        }
    }
}

impl std::fmt::Display for TcpListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TcpListen::SameAsQuic => f.write_str("same"),
            TcpListen::Off => f.write_str("off"),
            TcpListen::At(addr) => write!(f, "{addr}"),
        }
    }
}

/// When the SOCKS front answers a request before the agent has answered its `Open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyReply {
    /// Every request waits for the agent's answer and gets its exact reply code.
    Off,
    /// A request for a host and port the agent connected to within this window is answered
    /// at once; its bytes follow the `Open` to the agent.
    Within(Duration),
}

impl EarlyReply {
    /// The window; zero when off.
    pub fn window(self) -> Duration {
        match self {
            EarlyReply::Off => Duration::ZERO,
            EarlyReply::Within(window) => window,
        }
    }
}

impl std::str::FromStr for EarlyReply {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(EarlyReply::Off);
        }
        match crate::duration::parse_duration_or_zero(s) {
            Ok(window) if window.is_zero() => Ok(EarlyReply::Off),
            Ok(window) => Ok(EarlyReply::Within(window)),
            Err(e) => Err(format!("{e}, or off")),
        }
    }
}

impl std::fmt::Display for EarlyReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EarlyReply::Off => f.write_str("off"),
            EarlyReply::Within(window) => f.write_str(&crate::duration::format_duration(*window)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_early_reply_window_is_a_duration_or_off_and_prints_back_alike() {
        for (text, want, printed) in [
            ("off", EarlyReply::Off, "off"),
            ("0s", EarlyReply::Off, "off"),
            ("0", EarlyReply::Off, "off"),
            ("60s", EarlyReply::Within(Duration::from_secs(60)), "1m"),
            (
                "500ms",
                EarlyReply::Within(Duration::from_millis(500)),
                "500ms",
            ),
            ("2h", EarlyReply::Within(Duration::from_secs(7200)), "2h"),
        ] {
            let got: EarlyReply = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), printed);
            assert_eq!(printed.parse::<EarlyReply>().unwrap(), want);
        }
        assert_eq!(EarlyReply::Off.window(), Duration::ZERO);
        for bad in ["", "on", "soon", "-1s"] {
            let err = bad.parse::<EarlyReply>().unwrap_err();
            assert!(
                err.contains("invalid duration") && err.ends_with("or off"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_tcp_listener_is_an_address_same_or_off_and_prints_back_alike() {
        for (text, want) in [
            ("same", TcpListen::SameAsQuic),
            ("off", TcpListen::Off),
            (
                "127.0.0.1:443",
                TcpListen::At("127.0.0.1:443".parse().unwrap()),
            ),
            ("[::1]:8443", TcpListen::At("[::1]:8443".parse().unwrap())),
        ] {
            let got: TcpListen = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text);
        }
        for bad in ["", "on", "443", "hub.example.com:443"] {
            let e = bad.parse::<TcpListen>().unwrap_err();
            assert!(e.contains("`same` or `off`"), "{bad}: {e}");
        }
    }
}
