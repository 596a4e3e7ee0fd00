//! The hub's settings: its one list of keys, and their validation into a [`HubConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::settings::{
    at_least_one, bytes_from_frame_to, frame_size, worker_threads, ZeroOrDuration,
};
use super::{parse_duration, required, to_toml, ConfigError, LogOptions, Sources, TlsFiles};
use crate::auth::Tenant;
use crate::enroll::HubState;
use crate::hub::{EarlyReply, HubConfig, NoAuthRoute, TcpListen};
use crate::state::StateLocation;
use crate::transport::{Congestion, ServerTls};

settings! {
    /// Hub settings from flags and environment (`None`: not given).
    HubOptions, file HubFile, in force from config: HubConfig, options;
    /// Address agents connect to: UDP for QUIC, and the same TCP port for the TLS/TCP
    /// fallback unless --tcp-listen says otherwise [default: 0.0.0.0:4433].
    #[arg(long, env = "RNA_LISTEN")]
    listen: Option<SocketAddr> => show(Some(config.listen));
    /// Where agents connect over TLS/TCP, the fallback for networks that block UDP or allow
    /// only an HTTP proxy: an address, `same` (the TCP port of --listen) or `off`
    /// [default: same].
    #[arg(long, env = "RNA_TCP_LISTEN", value_name = "ADDR|same|off")]
    tcp_listen: Option<TcpListen> => field(config.tcp_listen);
    /// SOCKS5 address [default: 127.0.0.1:1080].
    #[arg(long, env = "RNA_SOCKS")]
    socks: Option<SocketAddr> => show(Some(config.socks));
    /// Admin API and status page address [default: 127.0.0.1:8080].
    #[arg(long, env = "RNA_API")]
    api: Option<SocketAddr> => show(config.api);
    /// Time a client of the admin API has to send a request head, from connecting or from
    /// the previous answer on a kept-alive connection [default: 10s].
    #[arg(long, env = "RNA_API_HEADER_TIMEOUT", value_parser = parse_duration)]
    api_header_timeout: Option<Duration> => field(config.api_limits.header_timeout);
    /// Time an admin API request has for its body, and a quick answer to be ready
    /// (Kubernetes commands have their own deadlines) [default: 30s].
    #[arg(long, env = "RNA_API_REQUEST_TIMEOUT", value_parser = parse_duration)]
    api_request_timeout: Option<Duration> => field(config.api_limits.request_timeout);
    /// Admin API connections open at once; more are answered 503 [default: 1024].
    #[arg(long, env = "RNA_API_MAX_CONNECTIONS")]
    api_max_connections: Option<usize> => field(config.api_limits.max_connections, at_least_one);
    /// Admin API connections one client IP may have open at once; more are answered 503
    /// [default: 64].
    #[arg(long, env = "RNA_API_MAX_CONNECTIONS_PER_IP")]
    api_max_connections_per_ip: Option<usize> =>
        field(config.api_limits.max_connections_per_ip, at_least_one);
    /// CA that agent certificates must chain to.
    #[arg(long, env = "RNA_CA")]
    ca: Option<PathBuf> => show(options.ca.clone());
    /// Hub certificate (PEM).
    #[arg(long, env = "RNA_CERT")]
    cert: Option<PathBuf> => show(options.cert.clone());
    /// Hub private key (PEM).
    #[arg(long, env = "RNA_KEY")]
    key: Option<PathBuf> => show(options.key.clone());
    /// Token store (see `rna token`).
    #[arg(long, env = "RNA_TOKENS")]
    tokens: Option<PathBuf> => show(Some(config.tokens.clone()));
    /// Where tokens, join tokens, issued certificates and revocations live: `file` (the
    /// token store and the state folder's files) or `kubernetes://NAMESPACE/NAME`, one Secret
    /// that every hub replica follows and `rna token`/`rna certs --state` edit [default: file].
    #[arg(long, env = "RNA_STATE", value_name = "file|kubernetes://NAMESPACE/NAME")]
    state: Option<StateLocation> => show(Some(config.state.clone()));
    /// Accept SOCKS5 clients without credentials and route them to AGENT@TENANT (only when
    /// --socks is a loopback address).
    #[arg(long, env = "RNA_SOCKS_NO_AUTH", value_name = "AGENT@TENANT")]
    socks_no_auth: Option<String> =>
        show(config.socks_no_auth.as_ref().map(|r| format!("{}@{}", r.agent, r.tenant)));
    /// Longest heartbeat interval announced to agents, reached by a large fleet (the interval
    /// is agents connected / --heartbeat-rate, at least --heartbeat-min) [default: 10s].
    #[arg(long, env = "RNA_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    heartbeat_interval: Option<Duration> => field(config.heartbeat.interval);
    /// Shortest heartbeat interval announced to agents, what a small fleet gets: an agent
    /// notices a restarted hub within about this long [default: 250ms].
    #[arg(long, env = "RNA_HEARTBEAT_MIN", value_parser = parse_duration)]
    heartbeat_min: Option<Duration> => field(config.heartbeat_min);
    /// Agent pings per second the hub budgets for; the announced interval grows with the
    /// fleet to stay within it [default: 1000].
    #[arg(long, env = "RNA_HEARTBEAT_RATE")]
    heartbeat_rate: Option<u32> => field(config.heartbeat_rate, at_least_one);
    /// Silence after which an agent connection is closed [default: 30s].
    #[arg(long, env = "RNA_HEARTBEAT_TIMEOUT", value_parser = parse_duration)]
    heartbeat_timeout: Option<Duration> => field(config.heartbeat.timeout);
    /// Time in-flight streams get to finish on shutdown [default: 30s].
    #[arg(long, env = "RNA_GRACE", value_parser = parse_duration)]
    grace: Option<Duration> => field(config.grace);
    /// Time a SOCKS client has for greeting, authentication and request [default: 10s].
    #[arg(long, env = "RNA_SOCKS_GREETING_TIMEOUT", value_parser = parse_duration)]
    socks_greeting_timeout: Option<Duration> => field(config.socks_limits.greeting_timeout);
    /// SOCKS connections one client (IPv4 address or IPv6 /64) may have in the greeting at
    /// once [default: 256].
    #[arg(long, env = "RNA_SOCKS_HALF_OPEN_PER_IP")]
    socks_half_open_per_ip: Option<usize> => field(config.socks_limits.half_open_per_ip);
    /// SOCKS connections in the greeting from all clients at once; when full, the busiest
    /// client's oldest one is closed for a newcomer [default: 4096].
    #[arg(long, env = "RNA_SOCKS_HALF_OPEN_TOTAL")]
    socks_half_open_total: Option<usize> => field(config.socks_limits.half_open_total);
    /// Answer a SOCKS request at once, before the agent has, when the agent's session
    /// connected to the same host and port within this window (e.g. 60s): the client's first
    /// bytes then travel with the request, saving one hub-agent round trip per connection.
    /// The first request to a destination, and any after the window, waits for the agent and
    /// gets its exact reply code; a destination the agent can no longer reach (down, or
    /// denied by a reloaded policy) is answered success and then reset, until the agent's
    /// failure is read. `off` waits for the agent's answer every time [default: off].
    #[arg(long, env = "RNA_SOCKS_EARLY_REPLY")]
    socks_early_reply: Option<EarlyReply> => field(config.socks_early_reply);
    /// Time an agent has to answer a tunnel request [default: 15s].
    #[arg(long, env = "RNA_OPEN_TIMEOUT", value_parser = parse_duration)]
    open_timeout: Option<Duration> => field(config.open_timeout);
    /// How often the token store file is checked for changes [default: 2s].
    #[arg(long, env = "RNA_TOKEN_POLL", value_parser = parse_duration)]
    token_poll: Option<Duration> => field(config.token_poll);
    /// Label metrics with the agent name too (one series per agent: opt in only when the
    /// number of agents is bounded) [default: false].
    #[arg(long, env = "RNA_METRICS_PER_AGENT", num_args = 0..=1, default_missing_value = "true")]
    metrics_per_agent: Option<bool> => field(config.metrics_per_agent);
    /// Agent connections in the handshake at once; more wait (QUIC, see --handshake-wait) or
    /// are refused before any TLS work [default: 1024].
    #[arg(long, env = "RNA_MAX_HANDSHAKES")]
    max_handshakes: Option<usize> => field(config.caps.handshakes, at_least_one);
    /// Time a QUIC agent connection attempt (from a validated address) may wait for a
    /// handshake slot when all are taken, before it is refused; 0s refuses at once
    /// [default: 2s].
    #[arg(long, env = "RNA_HANDSHAKE_WAIT", value_parser = crate::duration::parse_duration_or_zero)]
    handshake_wait: Option<Duration> as ZeroOrDuration => field(config.caps.handshake_wait);
    /// Agent handshakes at once from one validated source (an IPv4 address or an IPv6 /64);
    /// more are refused [default: 16].
    #[arg(long, env = "RNA_MAX_HANDSHAKES_PER_SOURCE")]
    max_handshakes_per_source: Option<usize> =>
        field(config.caps.handshakes_per_source, at_least_one);
    /// Handshakes in progress from which on new addresses must answer a QUIC Retry before any
    /// TLS work; 0 asks every new address [default: 32].
    #[arg(long, env = "RNA_RETRY_THRESHOLD")]
    retry_threshold: Option<usize> => field(config.caps.retry_threshold);
    /// Time for an agent's QUIC and TLS handshake [default: 5s].
    #[arg(long, env = "RNA_TLS_TIMEOUT", value_parser = parse_duration)]
    tls_timeout: Option<Duration> => field(config.caps.tls_timeout);
    /// Time after TLS for an agent to send Hello [default: 5s].
    #[arg(long, env = "RNA_HELLO_TIMEOUT", value_parser = parse_duration)]
    hello_timeout: Option<Duration> => field(config.caps.hello_timeout);
    /// Tunnel streams open or opening on one agent connection; more are answered 0x01
    /// [default: 16384].
    #[arg(long, env = "RNA_MAX_STREAMS_PER_AGENT")]
    max_streams_per_agent: Option<usize> => field(config.caps.streams_per_agent, at_least_one);
    /// Largest protocol frame accepted from an agent, in bytes, 1024 to 65536
    /// [default: 65536].
    #[arg(long, env = "RNA_MAX_FRAME")]
    max_frame: Option<usize> => field(config.caps.max_frame, frame_size);
    /// A tunnel stream with no byte moving either way for this long is reset [default: 1h].
    #[arg(long, env = "RNA_STREAM_IDLE_TIMEOUT", value_parser = parse_duration)]
    stream_idle_timeout: Option<Duration> => field(config.caps.stream_idle_timeout);
    /// Largest Kubernetes apply body through the admin API, in bytes, 1024 to 4194304; a
    /// larger one gets 413 [default: 4194304].
    #[arg(long, env = "RNA_MAX_KUBE_REQUEST")]
    max_kube_request: Option<usize> => field(config.caps.kube_request, kube_request_size);
    /// Sessions one agent name may hold in its tenant at once; more are refused
    /// too_many_sessions [default: 16].
    #[arg(long, env = "RNA_MAX_SESSIONS_PER_AGENT")]
    max_sessions_per_agent: Option<usize> => field(config.caps.sessions_per_agent, at_least_one);
    /// Sessions registered with one token at once; more are refused too_many_sessions
    /// [default: 1024].
    #[arg(long, env = "RNA_MAX_SESSIONS_PER_TOKEN")]
    max_sessions_per_token: Option<usize> => field(config.caps.sessions_per_token, at_least_one);
    /// Least time between two inventory reports read from one agent session, up to 20s; a
    /// sooner one waits its turn [default: 5s].
    #[arg(long, env = "RNA_INVENTORY_INTERVAL", value_parser = parse_duration)]
    inventory_interval: Option<Duration> =>
        field(config.caps.inventory_interval, inventory_interval);
    /// Inventory reads through the admin API served at once per tenant; more wait up to
    /// 10 s, then get 429 [default: 4].
    #[arg(long, env = "RNA_MAX_HEAVY_REQUESTS_PER_TENANT")]
    max_heavy_requests_per_tenant: Option<usize> =>
        field(config.caps.heavy_requests_per_tenant, at_least_one);
    /// Congestion controller for data sent to agents: cubic or bbr [default: cubic].
    #[arg(long, env = "RNA_CONGESTION")]
    congestion: Option<Congestion> => field(config.limits.congestion);
    /// Worker threads of the runtime, 1 to 1024 [default: 1 with at most two CPUs, else one
    /// per CPU].
    #[arg(long, env = "RNA_WORKER_THREADS")]
    worker_threads: Option<usize> => field(config.worker_threads, worker_threads);
    /// Folder for state kept across restarts: the QUIC endpoint key (so agents learn of a
    /// restart at once) and, unless --ca/--cert/--key/--tokens name other files, the CA, the
    /// hub certificate and the token store, made on the first start; with the CA key there the
    /// hub enrolls agents with join tokens. Created (0700) if missing.
    #[arg(long, env = "RNA_STATE_DIR")]
    state_dir: Option<PathBuf> => show(config.state_dir.clone());
    /// DNS name or IP address agents dial, written into the hub certificate a new state folder
    /// gets, and printed in join lines; repeat for several.
    #[arg(long, env = "RNA_HUB_NAME", value_delimiter = ',')]
    hub_name: Vec<String> => show(Some(options.hub_name.clone()));
    /// Lifetime of the certificates the hub signs for enrolled agents, 1s to 825d
    /// [default: 30d].
    #[arg(long, env = "RNA_AGENT_CERT_LIFETIME", value_parser = parse_duration)]
    agent_cert_lifetime: Option<Duration> => field(config.agent_cert_lifetime, cert_lifetime);
    /// Time a Kubernetes command (other than wait, which has its own timeout) may take
    /// [default: 60s].
    #[arg(long, env = "RNA_KUBE_TIMEOUT", value_parser = parse_duration)]
    kube_timeout: Option<Duration> => field(config.kube_timeout);
    /// Kubernetes waits one token may have running at once; one more gets 429 [default: 8].
    #[arg(long, env = "RNA_MAX_KUBE_WAITS_PER_TOKEN")]
    max_kube_waits_per_token: Option<usize> =>
        field(config.caps.kube_waits_per_token, at_least_one);
    /// A TOML file of trusted OIDC issuers (`[[oidc_issuer]]` tables, see
    /// examples/oidc-issuers.toml); a JWT one of them signed is accepted wherever a token is.
    #[arg(long, env = "RNA_OIDC_ISSUERS_FILE")]
    oidc_issuers_file: Option<PathBuf> => show(config.oidc_issuers_file.clone());
}

/// Validates hub options into the hub's configuration, reading the certificate files.
pub fn hub_config(o: HubOptions, sources: &Sources) -> Result<HubConfig, ConfigError> {
    let invalid = |key: &str, message: String| sources.invalid(key, message);
    // With the state in a Kubernetes Secret, no token store file is made, read or needed.
    let shared_state = o.state.as_ref().is_some_and(StateLocation::is_kubernetes);
    // A state folder supplies every file not named explicitly, made on the first start.
    let state = match &o.state_dir {
        Some(dir) => {
            let state = HubState::new(dir);
            let certs = o.ca.is_none() || o.cert.is_none() || o.key.is_none();
            state
                .prepare(&o.hub_name, certs, o.tokens.is_none() && !shared_state)
                .map_err(|e| invalid("state_dir", e.to_string()))?;
            Some(state)
        }
        None => None,
    };
    let or_state = |given: &Option<PathBuf>, file: fn(&HubState) -> PathBuf| {
        given.clone().or_else(|| state.as_ref().map(file))
    };
    let files = TlsFiles::required(
        &or_state(&o.ca, HubState::ca),
        &or_state(&o.cert, HubState::hub_cert),
        &or_state(&o.key, HubState::hub_key),
    )?;
    let tokens = match shared_state {
        true => PathBuf::new(),
        false => required(
            &or_state(&o.tokens, HubState::tokens),
            "tokens",
            "tokens",
            "TOKENS",
        )?,
    };
    let tls = files.load(sources, ServerTls::load, ServerTls::check)?;
    if !shared_state {
        if let Err(e) = crate::auth::TokenStore::load_or_empty(&tokens) {
            return Err(invalid("tokens", crate::fsutil::error_chain(&e)));
        }
    }
    let listen = o.listen.unwrap_or(SocketAddr::from((
        [0, 0, 0, 0],
        crate::proto::DEFAULT_HUB_PORT,
    )));
    let socks = o.socks.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1080)));
    let mut config = HubConfig::new(listen, socks, tls, tokens);
    config.api = Some(o.api.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))));
    config.state_dir = o.state_dir.clone();
    config.state = o.state.clone().unwrap_or_default();
    // Enrollment signs with the state folder's CA key, so it is offered only when the CA
    // agents are checked against is that CA.
    config.enrollment = state.filter(|s| s.ca_key().exists() && files.ca == s.ca());
    if let Some(path) = &o.oidc_issuers_file {
        config.oidc_issuers = load_issuers(path).map_err(|m| invalid("oidc_issuers_file", m))?;
        config.oidc_issuers_file = Some(path.clone());
    }
    if let Some(route) = &o.socks_no_auth {
        config.socks_no_auth = Some(parse_no_auth(route).map_err(|m| invalid("socks_no_auth", m))?);
    }
    o.apply(&mut config, sources)?;
    if config.heartbeat.timeout <= config.heartbeat.interval {
        return Err(invalid(
            "heartbeat_timeout",
            format!(
                "{:?} must be longer than heartbeat_interval {:?}",
                config.heartbeat.timeout, config.heartbeat.interval
            ),
        ));
    }
    if config.heartbeat_min > config.heartbeat.interval {
        return Err(invalid(
            "heartbeat_min",
            format!(
                "{:?} must not be longer than heartbeat_interval {:?}",
                config.heartbeat_min, config.heartbeat.interval
            ),
        ));
    }
    if config.socks_no_auth.is_some() && !config.socks.ip().is_loopback() {
        return Err(invalid(
            "socks_no_auth",
            format!(
                "only allowed when socks listens on a loopback address, not {}",
                config.socks
            ),
        ));
    }
    Ok(config)
}

/// The trusted-issuers file: `[[oidc_issuer]]` tables, nothing else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuersFile {
    #[serde(default)]
    oidc_issuer: Vec<crate::oidc::IssuerConfig>,
}

/// Reads and checks the trusted OIDC issuers in `path`: relative `jwks_file` and `ca` paths
/// start from the file's folder, and every rule (https, audiences, tenant, leeway, duplicates,
/// readable CA) is checked now, so a bad issuer stops the start and `--check-config` names it.
/// No key is fetched here: an issuer that is down at start is not a configuration error.
/// SIGHUP reads the file again through this same function.
pub fn load_issuers(path: &std::path::Path) -> Result<Vec<crate::oidc::IssuerConfig>, String> {
    let text = crate::fsutil::read_text(path, crate::fsutil::MAX_CONFIG_FILE)
        .map_err(|e| e.to_string())?;
    let file: IssuersFile =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    let mut issuers = file.oidc_issuer;
    for issuer in &mut issuers {
        for p in [&mut issuer.jwks_file, &mut issuer.ca]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(jwks) = &issuer.jwks_file {
            if let Err(e) = std::fs::metadata(jwks) {
                return Err(format!(
                    "{}: OIDC issuer {:?}: jwks_file {}: {e}",
                    path.display(),
                    issuer.url,
                    jwks.display()
                ));
            }
        }
    }
    crate::oidc::Verifier::new(issuers.clone(), crate::oidc::Tuning::default())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(issuers)
}

/// The admin API's cap on a Kubernetes apply body: at least a frame, at most what the
/// command channel carries.
fn kube_request_size(n: usize) -> Result<usize, String> {
    bytes_from_frame_to(n, crate::proto::kube::MAX_KUBE_REQUEST)
}

/// An enrolled agent's certificate lifetime: what the signer accepts.
fn cert_lifetime(t: Duration) -> Result<Duration, String> {
    if t < Duration::from_secs(1) || t > crate::enroll::csr::MAX_CERT_LIFETIME {
        return Err(format!("{t:?} is not between 1s and 825d"));
    }
    Ok(t)
}

/// The least time between two inventory reports of one session. The agent waits 30 s for
/// the hub to take a report; a turn must come before that.
pub(super) fn inventory_interval(t: Duration) -> Result<Duration, String> {
    if t > Duration::from_secs(20) {
        return Err(format!("{t:?} is longer than 20s"));
    }
    Ok(t)
}

/// `AGENT@TENANT`, the route of `socks_no_auth`.
fn parse_no_auth(route: &str) -> Result<NoAuthRoute, String> {
    let (agent, tenant) = route
        .split_once('@')
        .ok_or_else(|| format!("{route:?}: expected AGENT@TENANT"))?;
    if !crate::certs::valid_agent_name(agent) {
        return Err(format!("{agent:?} is not a valid agent name"));
    }
    let tenant: Tenant = tenant.parse().map_err(|e| format!("{e}"))?;
    Ok(NoAuthRoute {
        agent: agent.to_string(),
        tenant,
    })
}

/// The hub configuration in force (defaults included) as the keys of its configuration file,
/// for `--check-config`: pasted into a file, it gives the same configuration. Secrets appear
/// only as the paths of their files; paths are absolute.
pub fn hub_file_text(
    options: &HubOptions,
    config: &HubConfig,
    log: &LogOptions,
) -> Result<String, ConfigError> {
    to_toml(&options.in_force(config, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_issuers_parse_and_pass_their_checks() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/oidc-issuers.toml");
        let text = std::fs::read_to_string(&path).expect("read example");
        let file: IssuersFile = toml::from_str(&text).expect("examples/oidc-issuers.toml parses");
        assert_eq!(file.oidc_issuer.len(), 2);
        for issuer in &file.oidc_issuer {
            issuer.validate().expect("example issuer is valid");
        }
        assert_eq!(
            file.oidc_issuer[1].tenant.as_ref().map(|t| t.as_str()),
            Some("acme/ci")
        );
    }

    #[test]
    fn relative_issuer_paths_start_from_the_issuers_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("jwks.json"), "{\"keys\":[]}").expect("write");
        let path = dir.path().join("issuers.toml");
        std::fs::write(
            &path,
            "[[oidc_issuer]]\nurl = \"https://ci.example\"\naudiences = [\"rna\"]\n\
             tenant = \"acme/ci\"\njwks_file = \"jwks.json\"\n",
        )
        .expect("write");
        let issuers = load_issuers(&path).expect("loads");
        assert_eq!(issuers[0].jwks_file, Some(dir.path().join("jwks.json")));
    }
}
