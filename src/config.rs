//! Hub and agent configuration: flags, `RNA_*` variables and TOML files become one validated
//! configuration, exactly once. Precedence: flags > environment > file > defaults.
//!
//! Flags and variables arrive as [`HubOptions`] / [`AgentOptions`] (clap fills them; a field
//! is `None` when neither was given). A file is read into the same types, every value checked
//! with an error that names the file and the key (`agent.toml: hub[1]: invalid hub address
//! "x:y"`). The two are merged field by field, defaults fill the rest, and the result is
//! turned into the library's [`HubConfig`] / [`AgentConfig`] with every file they name read.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::agent::kube::{
    in_cluster_detected, KubeAllow, KubeSettings, KubeSource, ResourceRule, SecretRef,
};
use crate::agent::{AgentConfig, HubTarget, Policy, Rule};
use crate::auth::{read_secret_file, Tenant};
use crate::hub::{HubConfig, NoAuthRoute};
use crate::transport::control::Heartbeat;
use crate::transport::{ClientTls, Congestion, ServerTls};

/// A configuration error, naming where the bad value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {cause}")]
    Read {
        /// The file.
        file: String,
        /// The cause (not a `source`: the message already carries it).
        cause: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// toml's message (line, column, key).
        message: String,
    },
    /// A value is invalid. `origin` is the file name, or `command line` for flags and
    /// environment variables.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// Where the value came from.
        origin: String,
        /// The key (or flag name) in error, with list index if any.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The configuration in force could not be written as TOML (a path that is not UTF-8).
    #[error("cannot print the configuration as TOML: {0}")]
    Print(String),
    /// A required value is missing everywhere.
    #[error("missing {key}: give --{flag}, RNA_{env} or `{key}` in the config file")]
    Missing {
        /// The file key.
        key: &'static str,
        /// The flag.
        flag: &'static str,
        /// The environment variable suffix.
        env: &'static str,
    },
}

/// Durations are read and printed by the one parser below every layer; re-exported for the
/// callers that know them from here.
pub use crate::duration::{format_duration, parse_duration};

/// A duration as a file writes it: a string with a unit (`"10s"`) or an integer number of
/// seconds, as flags accept a bare number. Kept as text and checked by [`parse_duration`], so
/// both spellings get the same errors.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileDuration(String);

impl<'de> Deserialize<'de> for FileDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FileDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: a number of seconds or a string such as \"10s\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileDuration, E> {
                Ok(FileDuration(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FileDuration, E> {
                Ok(FileDuration(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FileDuration, E> {
                // Negative: parse_duration refuses it with its usual message.
                Ok(FileDuration(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for FileDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl From<Duration> for FileDuration {
    fn from(d: Duration) -> Self {
        FileDuration(format_duration(d))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("invalid log format {s:?}: expected text or json")),
        }
    }
}

/// The help heading of options every command takes, so `--help` shows them apart from the
/// command's own flags.
const GLOBAL: &str = "Global options";

/// Logging settings shared by every command: global options, given before or after the
/// command name.
#[derive(Debug, Clone, Default, Args)]
pub struct LogOptions {
    /// Log format: text or json [default: json when stdout is not a terminal, else text].
    #[arg(long, global = true, env = "RNA_LOG_FORMAT", help_heading = GLOBAL)]
    pub log_format: Option<LogFormat>,
    /// Log filter (tracing env-filter syntax, e.g. `info` or `rna=debug`) [default: info;
    /// RUST_LOG also works].
    #[arg(long, global = true, env = "RNA_LOG_LEVEL", help_heading = GLOBAL)]
    pub log_level: Option<String>,
}

impl LogOptions {
    fn or(self, lower: LogOptions) -> LogOptions {
        LogOptions {
            log_format: self.log_format.or(lower.log_format),
            log_level: self.log_level.or(lower.log_level),
        }
    }
}

/// Hub settings from flags and environment (`None`: not given).
#[derive(Debug, Clone, Default, Args)]
pub struct HubOptions {
    /// UDP address agents connect to [default: 0.0.0.0:4433].
    #[arg(long, env = "RNA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// SOCKS5 address [default: 127.0.0.1:1080].
    #[arg(long, env = "RNA_SOCKS")]
    pub socks: Option<SocketAddr>,
    /// Admin API and status page address [default: 127.0.0.1:8080].
    #[arg(long, env = "RNA_API")]
    pub api: Option<SocketAddr>,
    /// Time a client of the admin API has to send a request head, from connecting or from
    /// the previous answer on a kept-alive connection [default: 10s].
    #[arg(long, env = "RNA_API_HEADER_TIMEOUT", value_parser = parse_duration)]
    pub api_header_timeout: Option<Duration>,
    /// Time an admin API request has for its body, and a quick answer to be ready
    /// (Kubernetes commands have their own deadlines) [default: 30s].
    #[arg(long, env = "RNA_API_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub api_request_timeout: Option<Duration>,
    /// Admin API connections open at once; more are answered 503 [default: 1024].
    #[arg(long, env = "RNA_API_MAX_CONNECTIONS")]
    pub api_max_connections: Option<usize>,
    /// Admin API connections one client IP may have open at once; more are answered 503
    /// [default: 64].
    #[arg(long, env = "RNA_API_MAX_CONNECTIONS_PER_IP")]
    pub api_max_connections_per_ip: Option<usize>,
    /// CA that agent certificates must chain to.
    #[arg(long, env = "RNA_CA")]
    pub ca: Option<PathBuf>,
    /// Hub certificate (PEM).
    #[arg(long, env = "RNA_CERT")]
    pub cert: Option<PathBuf>,
    /// Hub private key (PEM).
    #[arg(long, env = "RNA_KEY")]
    pub key: Option<PathBuf>,
    /// Token store (see `rna token`).
    #[arg(long, env = "RNA_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Accept SOCKS5 clients without credentials and route them to AGENT@TENANT (only when
    /// --socks is a loopback address).
    #[arg(long, env = "RNA_SOCKS_NO_AUTH", value_name = "AGENT@TENANT")]
    pub socks_no_auth: Option<String>,
    /// Heartbeat interval announced to agents [default: 10s].
    #[arg(long, env = "RNA_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Silence after which an agent connection is closed [default: 30s].
    #[arg(long, env = "RNA_HEARTBEAT_TIMEOUT", value_parser = parse_duration)]
    pub heartbeat_timeout: Option<Duration>,
    /// Time in-flight streams get to finish on shutdown [default: 30s].
    #[arg(long, env = "RNA_GRACE", value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// Time a SOCKS client has for greeting, authentication and request [default: 10s].
    #[arg(long, env = "RNA_SOCKS_GREETING_TIMEOUT", value_parser = parse_duration)]
    pub socks_greeting_timeout: Option<Duration>,
    /// SOCKS connections one client (IPv4 address or IPv6 /64) may have in the greeting at
    /// once [default: 256].
    #[arg(long, env = "RNA_SOCKS_HALF_OPEN_PER_IP")]
    pub socks_half_open_per_ip: Option<usize>,
    /// SOCKS connections in the greeting from all clients at once; when full, the busiest
    /// client's oldest one is closed for a newcomer [default: 4096].
    #[arg(long, env = "RNA_SOCKS_HALF_OPEN_TOTAL")]
    pub socks_half_open_total: Option<usize>,
    /// Time an agent has to answer a tunnel request [default: 15s].
    #[arg(long, env = "RNA_OPEN_TIMEOUT", value_parser = parse_duration)]
    pub open_timeout: Option<Duration>,
    /// How often the token store file is checked for changes [default: 2s].
    #[arg(long, env = "RNA_TOKEN_POLL", value_parser = parse_duration)]
    pub token_poll: Option<Duration>,
    /// Label metrics with the agent name too (one series per agent: opt in only when the
    /// number of agents is bounded) [default: false].
    #[arg(long, env = "RNA_METRICS_PER_AGENT", num_args = 0..=1, default_missing_value = "true")]
    pub metrics_per_agent: Option<bool>,
    /// Agent connections in the handshake at once; more are refused before any TLS work
    /// [default: 256].
    #[arg(long, env = "RNA_MAX_HANDSHAKES")]
    pub max_handshakes: Option<usize>,
    /// Agent handshakes at once from one validated source (an IPv4 address or an IPv6 /64);
    /// more are refused [default: 16].
    #[arg(long, env = "RNA_MAX_HANDSHAKES_PER_SOURCE")]
    pub max_handshakes_per_source: Option<usize>,
    /// Handshakes in progress from which on new addresses must answer a QUIC Retry before any
    /// TLS work; 0 asks every new address [default: 32].
    #[arg(long, env = "RNA_RETRY_THRESHOLD")]
    pub retry_threshold: Option<usize>,
    /// Time for an agent's QUIC and TLS handshake [default: 5s].
    #[arg(long, env = "RNA_TLS_TIMEOUT", value_parser = parse_duration)]
    pub tls_timeout: Option<Duration>,
    /// Time after TLS for an agent to send Hello [default: 5s].
    #[arg(long, env = "RNA_HELLO_TIMEOUT", value_parser = parse_duration)]
    pub hello_timeout: Option<Duration>,
    /// Tunnel streams open or opening on one agent connection; more are answered 0x01
    /// [default: 16384].
    #[arg(long, env = "RNA_MAX_STREAMS_PER_AGENT")]
    pub max_streams_per_agent: Option<usize>,
    /// Largest protocol frame accepted from an agent, in bytes, 1024 to 65536
    /// [default: 65536].
    #[arg(long, env = "RNA_MAX_FRAME")]
    pub max_frame: Option<usize>,
    /// A tunnel stream with no byte moving either way for this long is reset [default: 1h].
    #[arg(long, env = "RNA_STREAM_IDLE_TIMEOUT", value_parser = parse_duration)]
    pub stream_idle_timeout: Option<Duration>,
    /// Largest Kubernetes apply body through the admin API, in bytes, 1024 to 4194304; a
    /// larger one gets 413 [default: 4194304].
    #[arg(long, env = "RNA_MAX_KUBE_REQUEST")]
    pub max_kube_request: Option<usize>,
    /// Sessions one agent name may hold in its tenant at once; more are refused
    /// too_many_sessions [default: 16].
    #[arg(long, env = "RNA_MAX_SESSIONS_PER_AGENT")]
    pub max_sessions_per_agent: Option<usize>,
    /// Sessions registered with one token at once; more are refused too_many_sessions
    /// [default: 1024].
    #[arg(long, env = "RNA_MAX_SESSIONS_PER_TOKEN")]
    pub max_sessions_per_token: Option<usize>,
    /// Least time between two inventory reports read from one agent session, up to 20s; a
    /// sooner one waits its turn [default: 5s].
    #[arg(long, env = "RNA_INVENTORY_INTERVAL", value_parser = parse_duration)]
    pub inventory_interval: Option<Duration>,
    /// Inventory reads through the admin API served at once per tenant; more wait up to
    /// 10 s, then get 429 [default: 4].
    #[arg(long, env = "RNA_MAX_HEAVY_REQUESTS_PER_TENANT")]
    pub max_heavy_requests_per_tenant: Option<usize>,
    /// Congestion controller for data sent to agents: cubic or bbr [default: cubic].
    #[arg(long, env = "RNA_CONGESTION")]
    pub congestion: Option<Congestion>,
    /// Worker threads of the runtime, 1 to 1024 [default: 1 with at most two CPUs, else one
    /// per CPU].
    #[arg(long, env = "RNA_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Folder for state kept across restarts (the QUIC endpoint key, so agents learn of a
    /// restart at once); created if missing.
    #[arg(long, env = "RNA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Time a Kubernetes command (other than wait, which has its own timeout) may take
    /// [default: 60s].
    #[arg(long, env = "RNA_KUBE_TIMEOUT", value_parser = parse_duration)]
    pub kube_timeout: Option<Duration>,
    /// Kubernetes waits one token may have running at once; one more gets 429 [default: 8].
    #[arg(long, env = "RNA_MAX_KUBE_WAITS_PER_TOKEN")]
    pub max_kube_waits_per_token: Option<usize>,
}

/// Agent settings from flags and environment (`None` or empty: not given).
#[derive(Debug, Clone, Default, Args)]
pub struct AgentOptions {
    /// Hub address (host:port, or host for port 4433); repeat for several hubs. Every
    /// address a name resolves to gets its own connection.
    #[arg(long, env = "RNA_HUB", value_delimiter = ',')]
    pub hub: Vec<HubTarget>,
    /// TLS name to verify the hub as [default: the host of --hub].
    #[arg(long, env = "RNA_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Agent identifier; must equal the certificate's common name.
    #[arg(long, env = "RNA_NAME")]
    pub name: Option<String>,
    /// CA to verify the hub with.
    #[arg(long, env = "RNA_CA")]
    pub ca: Option<PathBuf>,
    /// Agent certificate (PEM).
    #[arg(long, env = "RNA_CERT")]
    pub cert: Option<PathBuf>,
    /// Agent private key (PEM).
    #[arg(long, env = "RNA_KEY")]
    pub key: Option<PathBuf>,
    /// File holding the agent's token (scope connect:agentHub).
    #[arg(long, env = "RNA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Destinations the agent may dial: CIDR, IP, host or *.domain, optionally :port.
    /// Without any, everything but the default-denied ranges is allowed.
    #[arg(long, env = "RNA_ALLOW", value_delimiter = ',')]
    pub allow: Vec<Rule>,
    /// Destinations the agent refuses (checked first).
    #[arg(long, env = "RNA_DENY", value_delimiter = ',')]
    pub deny: Vec<Rule>,
    /// Time allowed to resolve and connect one destination [default: 10s].
    #[arg(long, env = "RNA_DIAL_TIMEOUT", value_parser = parse_duration)]
    pub dial_timeout: Option<Duration>,
    /// Tunnel streams the hub may have open on this agent's connection [default: 16384].
    #[arg(long, env = "RNA_MAX_STREAMS")]
    pub max_streams: Option<u32>,
    /// Address of the agent's /healthz, /readyz and /metrics, or `off`; the default is skipped
    /// with a warning when its port is taken [default: 127.0.0.1:4434].
    #[arg(long, env = "RNA_METRICS")]
    pub metrics: Option<String>,
    /// Dials in progress at once; more tunnel requests fail at once [default: 256].
    #[arg(long, env = "RNA_MAX_PENDING_DIALS")]
    pub max_pending_dials: Option<usize>,
    /// Largest protocol frame accepted from a hub, in bytes, 1024 to 65536 [default: 65536].
    #[arg(long, env = "RNA_MAX_FRAME")]
    pub max_frame: Option<usize>,
    /// Congestion controller for data sent to hubs: cubic or bbr [default: cubic].
    #[arg(long, env = "RNA_CONGESTION")]
    pub congestion: Option<Congestion>,
    /// Worker threads of the runtime, 1 to 1024 [default: 1 with at most two CPUs, else one
    /// per CPU].
    #[arg(long, env = "RNA_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Cluster mode: run the hub's Kubernetes commands as this agent's ServiceAccount or
    /// kubeconfig identity [default: on when the in-cluster environment is detected or
    /// --kubeconfig is given].
    #[arg(long, env = "RNA_KUBERNETES", num_args = 0..=1, default_missing_value = "true")]
    pub kubernetes: Option<bool>,
    /// Kubeconfig to act with instead of the in-cluster ServiceAccount (turns cluster mode on).
    #[arg(long, env = "RNA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of --kubeconfig to use [default: its current context].
    #[arg(long, env = "RNA_KUBE_CONTEXT")]
    pub kube_context: Option<String>,
    /// Namespaces Kubernetes commands may touch; repeat [default: all that RBAC allows].
    #[arg(long, env = "RNA_KUBE_NAMESPACE", value_delimiter = ',')]
    pub kube_namespace: Vec<String>,
    /// Resources Kubernetes commands may touch, as plural[.group] (deployments.apps,
    /// configmaps, *.example.com); repeat [default: all that RBAC allows].
    #[arg(long, env = "RNA_KUBE_RESOURCE", value_delimiter = ',')]
    pub kube_resource: Vec<ResourceRule>,
    /// How often the Kubernetes inventory is collected and reported to the hubs [default: 5m].
    #[arg(long, env = "RNA_KUBE_INVENTORY_INTERVAL", value_parser = parse_duration)]
    pub kube_inventory_interval: Option<Duration>,
    /// Secrets holding the agent's own credentials, as NAME (in the agent's namespace) or
    /// NAMESPACE/NAME: no Kubernetes command reads or changes them; repeat
    /// [default: rna-agent-tls,rna-agent-token].
    #[arg(long, env = "RNA_KUBE_PROTECTED_SECRET", value_delimiter = ',')]
    pub kube_protected_secret: Vec<SecretRef>,
}

/// Where the values in force came from, so an error names the file only for a value that the
/// file supplied.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    file: Option<String>,
    command_line: Vec<&'static str>,
}

impl Sources {
    /// Values from flags and environment only.
    pub fn command_line() -> Sources {
        Sources::default()
    }

    /// The origin of `key`: the file, unless a flag or variable gave it.
    fn of(&self, key: &str) -> String {
        let base = key.split('[').next().unwrap_or(key);
        match &self.file {
            Some(file) if !self.command_line.contains(&base) => file.clone(),
            _ => "command line".to_string(),
        }
    }

    fn invalid(&self, key: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            origin: self.of(key),
            key: key.into(),
            message: message.to_string(),
        }
    }
}

/// `given()` (the keys holding a value: `Some` or a non-empty list) and `or()` (field by
/// field, `self` where given, else `lower`; lists are taken whole from one source) for an
/// options type, from one list of its fields. The struct literal in `or` makes the compiler
/// refuse a list that misses a field.
macro_rules! merge_options {
    ($ty:ident; $($opt:ident),* ; $($list:ident),*) => {
        impl $ty {
            /// The keys this holds a value for.
            pub fn given(&self) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $(if self.$opt.is_some() { keys.push(stringify!($opt)); })*
                $(if !self.$list.is_empty() { keys.push(stringify!($list)); })*
                keys
            }

            /// `self` where given, else `lower`. Lists are taken whole from one source.
            pub fn or(self, lower: $ty) -> $ty {
                $ty {
                    $($opt: self.$opt.or(lower.$opt),)*
                    $($list: or_vec(self.$list, lower.$list),)*
                }
            }
        }
    };
}

fn or_vec<T>(high: Vec<T>, low: Vec<T>) -> Vec<T> {
    if high.is_empty() {
        low
    } else {
        high
    }
}

merge_options!(
    HubOptions;
    listen, socks, api, api_header_timeout, api_request_timeout, api_max_connections,
    api_max_connections_per_ip, ca, cert, key, tokens, socks_no_auth, heartbeat_interval,
    heartbeat_timeout, grace, socks_greeting_timeout, socks_half_open_per_ip,
    socks_half_open_total, open_timeout, token_poll, metrics_per_agent, max_handshakes,
    max_handshakes_per_source, retry_threshold, tls_timeout, hello_timeout,
    max_streams_per_agent, max_frame, max_kube_request, stream_idle_timeout, congestion,
    state_dir, kube_timeout, worker_threads, max_kube_waits_per_token, max_sessions_per_agent,
    max_sessions_per_token, inventory_interval, max_heavy_requests_per_tenant;
);

merge_options!(
    AgentOptions;
    server_name, name, ca, cert, key, token_file, dial_timeout, max_streams, metrics,
    max_pending_dials, max_frame, congestion, kubernetes, kubeconfig, kube_context,
    kube_inventory_interval, worker_threads;
    hub, allow, deny, kube_namespace, kube_resource, kube_protected_secret
);

/// The hub's TOML file, as written (values checked when converted). `--check-config` prints
/// the configuration in force in this form. Duration keys take a string with a unit or an
/// integer number of seconds.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HubFile {
    listen: Option<String>,
    socks: Option<String>,
    api: Option<String>,
    api_header_timeout: Option<FileDuration>,
    api_request_timeout: Option<FileDuration>,
    api_max_connections: Option<usize>,
    api_max_connections_per_ip: Option<usize>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    tokens: Option<PathBuf>,
    socks_no_auth: Option<String>,
    heartbeat_interval: Option<FileDuration>,
    heartbeat_timeout: Option<FileDuration>,
    grace: Option<FileDuration>,
    socks_greeting_timeout: Option<FileDuration>,
    socks_half_open_per_ip: Option<usize>,
    socks_half_open_total: Option<usize>,
    open_timeout: Option<FileDuration>,
    token_poll: Option<FileDuration>,
    metrics_per_agent: Option<bool>,
    max_handshakes: Option<usize>,
    max_handshakes_per_source: Option<usize>,
    retry_threshold: Option<usize>,
    tls_timeout: Option<FileDuration>,
    hello_timeout: Option<FileDuration>,
    max_streams_per_agent: Option<usize>,
    max_frame: Option<usize>,
    max_kube_request: Option<usize>,
    max_sessions_per_agent: Option<usize>,
    max_sessions_per_token: Option<usize>,
    inventory_interval: Option<FileDuration>,
    max_heavy_requests_per_tenant: Option<usize>,
    stream_idle_timeout: Option<FileDuration>,
    congestion: Option<String>,
    state_dir: Option<PathBuf>,
    kube_timeout: Option<FileDuration>,
    max_kube_waits_per_token: Option<usize>,
    worker_threads: Option<usize>,
    log_format: Option<String>,
    log_level: Option<String>,
}

/// The agent's TOML file, as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    hub: Option<Vec<String>>,
    server_name: Option<String>,
    name: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    token_file: Option<PathBuf>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    dial_timeout: Option<FileDuration>,
    max_streams: Option<u32>,
    metrics: Option<String>,
    max_pending_dials: Option<usize>,
    max_frame: Option<usize>,
    congestion: Option<String>,
    kubernetes: Option<bool>,
    kubeconfig: Option<PathBuf>,
    kube_context: Option<String>,
    kube_namespace: Option<Vec<String>>,
    kube_resource: Option<Vec<String>>,
    kube_inventory_interval: Option<FileDuration>,
    kube_protected_secret: Option<Vec<String>>,
    worker_threads: Option<usize>,
    log_format: Option<String>,
    log_level: Option<String>,
}

/// Converts file values, naming the file and key in errors.
struct Checker<'a> {
    origin: &'a str,
    base: Option<&'a Path>,
}

impl Checker<'_> {
    fn parse<T, E: fmt::Display>(
        &self,
        key: &str,
        value: Option<String>,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Option<T>, ConfigError> {
        value
            .map(|v| {
                parse(&v).map_err(|e| ConfigError::Invalid {
                    origin: self.origin.to_string(),
                    key: key.to_string(),
                    message: e.to_string(),
                })
            })
            .transpose()
    }

    fn list<T, E: fmt::Display>(
        &self,
        key: &str,
        values: Option<Vec<String>>,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Vec<T>, ConfigError> {
        values
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, v)| {
                parse(v).map_err(|e| ConfigError::Invalid {
                    origin: self.origin.to_string(),
                    key: format!("{key}[{i}]"),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    fn duration(
        &self,
        key: &str,
        value: Option<FileDuration>,
    ) -> Result<Option<Duration>, ConfigError> {
        self.parse(key, value.map(|d| d.0), parse_duration)
    }

    /// Relative paths in a file are relative to the file's folder.
    fn path(&self, p: Option<PathBuf>) -> Option<PathBuf> {
        p.map(|p| match self.base {
            Some(base) if p.is_relative() => base.join(p),
            _ => p,
        })
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("invalid address {s:?}: expected ip:port"))
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    crate::fsutil::read_text(path, crate::fsutil::MAX_CONFIG_FILE).map_err(|e| ConfigError::Read {
        file: path.display().to_string(),
        cause: e.problem.into(),
    })
}

fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<(T, String), ConfigError> {
    let origin = path.display().to_string();
    let parsed = toml::from_str(text).map_err(|e| match unknown_key(e.message()) {
        Some((key, message)) => ConfigError::Invalid {
            origin: origin.clone(),
            key,
            message: message + &location(text, e.span()),
        },
        None => match key_at(text, e.span()) {
            // serde names no key for a value of the wrong type: find it by the span.
            Some(key) => ConfigError::Invalid {
                origin: origin.clone(),
                key,
                message: e.message().to_string() + &location(text, e.span()),
            },
            None => ConfigError::Parse {
                file: origin.clone(),
                message: e.message().to_string() + &location(text, e.span()),
            },
        },
    })?;
    Ok((parsed, origin))
}

/// The top-level key whose value holds `span` (the place serde reported an error at).
fn key_at(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let span = span?;
    let table = toml::de::DeTable::parse(text).ok()?;
    let found = table.get_ref().iter().find(|(_, value)| {
        let v = value.span();
        v.start <= span.start && span.end <= v.end
    });
    found.map(|(key, _)| key.get_ref().to_string())
}

/// serde's "unknown field `x`, expected one of `a`, `b`" as the key and a short message
/// with the closest accepted key.
fn unknown_key(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (key, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest
        .split_once("expected one of ")
        .map(|(_, list)| list.split(", ").map(|k| k.trim_matches('`')).collect())
        .unwrap_or_default();
    let closest = expected
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .min()
        .filter(|(d, _)| *d <= (key.len() / 3).max(1));
    let message = match closest {
        Some((_, k)) => format!("unknown key (did you mean `{k}`?)"),
        None => "unknown key".to_string(),
    };
    Some((key.to_string(), message))
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev + cost);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// ` (line N)` for a span in `text`.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// Reads a hub file into options (and its log settings).
pub fn read_hub_file(path: &Path) -> Result<(HubOptions, LogOptions), ConfigError> {
    parse_hub_file(&read_text(path)?, path)
}

/// Parses the text of a hub file; `path` names it in errors and anchors relative paths.
pub fn parse_hub_file(text: &str, path: &Path) -> Result<(HubOptions, LogOptions), ConfigError> {
    let (f, origin): (HubFile, String) = parse_toml(text, path)?;
    let c = Checker {
        origin: &origin,
        base: path.parent(),
    };
    let options = HubOptions {
        listen: c.parse("listen", f.listen, parse_addr)?,
        socks: c.parse("socks", f.socks, parse_addr)?,
        api: c.parse("api", f.api, parse_addr)?,
        api_header_timeout: c.duration("api_header_timeout", f.api_header_timeout)?,
        api_request_timeout: c.duration("api_request_timeout", f.api_request_timeout)?,
        api_max_connections: f.api_max_connections,
        api_max_connections_per_ip: f.api_max_connections_per_ip,
        ca: c.path(f.ca),
        cert: c.path(f.cert),
        key: c.path(f.key),
        tokens: c.path(f.tokens),
        socks_no_auth: f.socks_no_auth,
        heartbeat_interval: c.duration("heartbeat_interval", f.heartbeat_interval)?,
        heartbeat_timeout: c.duration("heartbeat_timeout", f.heartbeat_timeout)?,
        grace: c.duration("grace", f.grace)?,
        socks_greeting_timeout: c.duration("socks_greeting_timeout", f.socks_greeting_timeout)?,
        socks_half_open_per_ip: f.socks_half_open_per_ip,
        socks_half_open_total: f.socks_half_open_total,
        open_timeout: c.duration("open_timeout", f.open_timeout)?,
        token_poll: c.duration("token_poll", f.token_poll)?,
        metrics_per_agent: f.metrics_per_agent,
        max_handshakes: f.max_handshakes,
        max_handshakes_per_source: f.max_handshakes_per_source,
        retry_threshold: f.retry_threshold,
        tls_timeout: c.duration("tls_timeout", f.tls_timeout)?,
        hello_timeout: c.duration("hello_timeout", f.hello_timeout)?,
        max_streams_per_agent: f.max_streams_per_agent,
        max_frame: f.max_frame,
        max_kube_request: f.max_kube_request,
        max_sessions_per_agent: f.max_sessions_per_agent,
        max_sessions_per_token: f.max_sessions_per_token,
        inventory_interval: c.duration("inventory_interval", f.inventory_interval)?,
        max_heavy_requests_per_tenant: f.max_heavy_requests_per_tenant,
        stream_idle_timeout: c.duration("stream_idle_timeout", f.stream_idle_timeout)?,
        congestion: c.parse("congestion", f.congestion, Congestion::from_str)?,
        state_dir: c.path(f.state_dir),
        kube_timeout: c.duration("kube_timeout", f.kube_timeout)?,
        max_kube_waits_per_token: f.max_kube_waits_per_token,
        worker_threads: f.worker_threads,
    };
    let log = LogOptions {
        log_format: c.parse("log_format", f.log_format, LogFormat::from_str)?,
        log_level: f.log_level,
    };
    Ok((options, log))
}

/// Reads an agent file into options (and its log settings).
pub fn read_agent_file(path: &Path) -> Result<(AgentOptions, LogOptions), ConfigError> {
    parse_agent_file(&read_text(path)?, path)
}

/// Parses the text of an agent file; `path` names it in errors and anchors relative paths.
pub fn parse_agent_file(
    text: &str,
    path: &Path,
) -> Result<(AgentOptions, LogOptions), ConfigError> {
    let (f, origin): (AgentFile, String) = parse_toml(text, path)?;
    let c = Checker {
        origin: &origin,
        base: path.parent(),
    };
    let options = AgentOptions {
        hub: c.list("hub", f.hub, HubTarget::from_str)?,
        server_name: f.server_name,
        name: f.name,
        ca: c.path(f.ca),
        cert: c.path(f.cert),
        key: c.path(f.key),
        token_file: c.path(f.token_file),
        allow: c.list("allow", f.allow, Rule::from_str)?,
        deny: c.list("deny", f.deny, Rule::from_str)?,
        dial_timeout: c.duration("dial_timeout", f.dial_timeout)?,
        max_streams: f.max_streams,
        metrics: f.metrics,
        max_pending_dials: f.max_pending_dials,
        max_frame: f.max_frame,
        congestion: c.parse("congestion", f.congestion, Congestion::from_str)?,
        kubernetes: f.kubernetes,
        kubeconfig: c.path(f.kubeconfig),
        kube_context: f.kube_context,
        kube_namespace: c.list("kube_namespace", f.kube_namespace, parse_namespace)?,
        kube_resource: c.list("kube_resource", f.kube_resource, ResourceRule::from_str)?,
        kube_inventory_interval: c
            .duration("kube_inventory_interval", f.kube_inventory_interval)?,
        kube_protected_secret: c.list(
            "kube_protected_secret",
            f.kube_protected_secret,
            SecretRef::from_str,
        )?,
        worker_threads: f.worker_threads,
    };
    let log = LogOptions {
        log_format: c.parse("log_format", f.log_format, LogFormat::from_str)?,
        log_level: f.log_level,
    };
    Ok((options, log))
}

/// Merges command line over file (if any): the options in force and the log settings.
pub fn merge_hub(
    file: Option<&Path>,
    cli: HubOptions,
    cli_log: LogOptions,
) -> Result<(HubOptions, LogOptions, Sources), ConfigError> {
    match file {
        Some(path) => {
            let (options, log) = read_hub_file(path)?;
            let sources = Sources {
                file: Some(path.display().to_string()),
                command_line: cli.given(),
            };
            Ok((cli.or(options), cli_log.or(log), sources))
        }
        None => Ok((cli, cli_log, Sources::command_line())),
    }
}

/// Merges command line over file (if any) for the agent.
pub fn merge_agent(
    file: Option<&Path>,
    cli: AgentOptions,
    cli_log: LogOptions,
) -> Result<(AgentOptions, LogOptions, Sources), ConfigError> {
    match file {
        Some(path) => {
            let (options, log) = read_agent_file(path)?;
            let sources = Sources {
                file: Some(path.display().to_string()),
                command_line: cli.given(),
            };
            Ok((cli.or(options), cli_log.or(log), sources))
        }
        None => Ok((cli, cli_log, Sources::command_line())),
    }
}

/// `e` and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        // Some errors already print their cause.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// A TLS loading or checking error, reported under the key whose file failed (`ca`, `cert`
/// or `key`), found by the path the error names; a key that is not the certificate's is
/// reported under `key`, other failures (a certificate the CA did not issue) under `cert`,
/// each with the files involved.
fn tls_error(
    sources: &Sources,
    files: [(&str, &Path); 3],
    e: crate::transport::tls::TlsError,
) -> ConfigError {
    use crate::certs::CertError;
    use crate::transport::tls::TlsError;
    let [(_, ca), (_, cert), (_, key)] = files;
    match &e {
        TlsError::KeyMismatch => {
            return sources.invalid(
                "key",
                format!(
                    "{}: not the key of the certificate {}",
                    key.display(),
                    cert.display()
                ),
            )
        }
        TlsError::NotIssuedByCa(reason) => {
            return sources.invalid(
                "cert",
                format!(
                    "{}: not a certificate of the CA {}: {reason}",
                    cert.display(),
                    ca.display()
                ),
            )
        }
        _ => {}
    }
    let failed = match &e {
        TlsError::Cert(CertError::Io { path, .. } | CertError::Pem { path, .. }) => Some(path),
        _ => None,
    };
    let key = files
        .iter()
        .find(|(_, file)| failed.is_some_and(|f| f == file))
        .map_or("cert", |(key, _)| key);
    sources.invalid(key, chain(&e))
}

macro_rules! required {
    ($opt:expr, $key:literal, $flag:literal, $env:literal) => {
        $opt.ok_or(ConfigError::Missing {
            key: $key,
            flag: $flag,
            env: $env,
        })?
    };
}

/// Validates hub options into the hub's configuration, reading the certificate files.
pub fn hub_config(o: HubOptions, sources: &Sources) -> Result<HubConfig, ConfigError> {
    let invalid = |key: &str, message: String| sources.invalid(key, message);
    let ca = required!(o.ca, "ca", "ca", "CA");
    let cert = required!(o.cert, "cert", "cert", "CERT");
    let key = required!(o.key, "key", "key", "KEY");
    let tokens = required!(o.tokens, "tokens", "tokens", "TOKENS");
    let files = [
        ("ca", ca.as_path()),
        ("cert", cert.as_path()),
        ("key", key.as_path()),
    ];
    let tls = ServerTls::load(&ca, &cert, &key).map_err(|e| tls_error(sources, files, e))?;
    // A key of another certificate, or a certificate of another CA, would only fail at the
    // first handshake; say so now, in --check-config too.
    tls.check().map_err(|e| tls_error(sources, files, e))?;
    if let Err(e) = crate::auth::TokenStore::load_or_empty(&tokens) {
        return Err(invalid("tokens", chain(&e)));
    }
    let listen = o.listen.unwrap_or(SocketAddr::from((
        [0, 0, 0, 0],
        crate::proto::DEFAULT_HUB_PORT,
    )));
    let socks = o.socks.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1080)));
    let mut config = HubConfig::new(listen, socks, tls, tokens);
    config.api = Some(o.api.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))));
    let api = &mut config.api_limits;
    if let Some(t) = o.api_header_timeout {
        api.header_timeout = t;
    }
    if let Some(t) = o.api_request_timeout {
        api.request_timeout = t;
    }
    if let Some(n) = o.api_max_connections {
        api.max_connections = at_least_one(n).map_err(|m| invalid("api_max_connections", m))?;
    }
    if let Some(n) = o.api_max_connections_per_ip {
        api.max_connections_per_ip =
            at_least_one(n).map_err(|m| invalid("api_max_connections_per_ip", m))?;
    }
    if let Some(route) = o.socks_no_auth {
        config.socks_no_auth =
            Some(parse_no_auth(&route).map_err(|m| invalid("socks_no_auth", m))?);
    }
    let heartbeat = Heartbeat {
        interval: o.heartbeat_interval.unwrap_or(config.heartbeat.interval),
        timeout: o.heartbeat_timeout.unwrap_or(config.heartbeat.timeout),
    };
    if heartbeat.timeout <= heartbeat.interval {
        return Err(invalid(
            "heartbeat_timeout",
            format!(
                "{:?} must be longer than heartbeat_interval {:?}",
                heartbeat.timeout, heartbeat.interval
            ),
        ));
    }
    config.heartbeat = heartbeat;
    if let Some(g) = o.grace {
        config.grace = g;
    }
    let limits = &mut config.socks_limits;
    if let Some(t) = o.socks_greeting_timeout {
        limits.greeting_timeout = t;
    }
    if let Some(n) = o.socks_half_open_per_ip {
        limits.half_open_per_ip = n;
    }
    if let Some(n) = o.socks_half_open_total {
        limits.half_open_total = n;
    }
    if let Some(t) = o.open_timeout {
        config.open_timeout = t;
    }
    if let Some(t) = o.token_poll {
        config.token_poll = t;
    }
    config.metrics_per_agent = o.metrics_per_agent.unwrap_or(false);
    config.state_dir = o.state_dir;
    if let Some(t) = o.kube_timeout {
        config.kube_timeout = t;
    }
    let caps = &mut config.caps;
    if let Some(n) = o.max_handshakes {
        caps.handshakes = at_least_one(n).map_err(|m| invalid("max_handshakes", m))?;
    }
    if let Some(n) = o.max_handshakes_per_source {
        caps.handshakes_per_source =
            at_least_one(n).map_err(|m| invalid("max_handshakes_per_source", m))?;
    }
    if let Some(n) = o.retry_threshold {
        caps.retry_threshold = n;
    }
    if let Some(t) = o.tls_timeout {
        caps.tls_timeout = t;
    }
    if let Some(t) = o.hello_timeout {
        caps.hello_timeout = t;
    }
    if let Some(n) = o.max_streams_per_agent {
        caps.streams_per_agent =
            at_least_one(n).map_err(|m| invalid("max_streams_per_agent", m))?;
    }
    if let Some(n) = o.max_frame {
        caps.max_frame = frame_size(n).map_err(|m| invalid("max_frame", m))?;
    }
    if let Some(t) = o.stream_idle_timeout {
        caps.stream_idle_timeout = t;
    }
    if let Some(n) = o.max_kube_request {
        let max = crate::proto::kube::MAX_KUBE_REQUEST;
        if !(MIN_FRAME..=max).contains(&n) {
            return Err(invalid(
                "max_kube_request",
                format!("{n} must be between {MIN_FRAME} and {max} bytes"),
            ));
        }
        caps.kube_request = n;
    }
    if let Some(n) = o.max_kube_waits_per_token {
        caps.kube_waits_per_token =
            at_least_one(n).map_err(|m| invalid("max_kube_waits_per_token", m))?;
    }
    if let Some(n) = o.max_sessions_per_agent {
        caps.sessions_per_agent =
            at_least_one(n).map_err(|m| invalid("max_sessions_per_agent", m))?;
    }
    if let Some(n) = o.max_sessions_per_token {
        caps.sessions_per_token =
            at_least_one(n).map_err(|m| invalid("max_sessions_per_token", m))?;
    }
    if let Some(t) = o.inventory_interval {
        // The agent waits 30 s for the hub to take a report; a turn must come before that.
        if t > Duration::from_secs(20) {
            return Err(invalid(
                "inventory_interval",
                format!("{t:?} is longer than 20s"),
            ));
        }
        caps.inventory_interval = t;
    }
    if let Some(n) = o.max_heavy_requests_per_tenant {
        caps.heavy_requests_per_tenant =
            at_least_one(n).map_err(|m| invalid("max_heavy_requests_per_tenant", m))?;
    }
    if let Some(c) = o.congestion {
        config.limits.congestion = c;
    }
    if let Some(n) = o.worker_threads {
        config.worker_threads = worker_threads(n).map_err(|m| invalid("worker_threads", m))?;
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

fn at_least_one(n: usize) -> Result<usize, String> {
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// The smallest frame cap: Hello with a long name, token and capabilities fits well below.
const MIN_FRAME: usize = 1024;

fn frame_size(n: usize) -> Result<usize, String> {
    let max = crate::proto::codec::MAX_FRAME;
    if !(MIN_FRAME..=max).contains(&n) {
        return Err(format!("{n} must be between {MIN_FRAME} and {max} bytes"));
    }
    Ok(n)
}

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

/// The agent's health and metrics address when none is given: loopback, port 4434, next to
/// the hub's 4433 and outside Prometheus' own 9090 and its exporter range 9100-9999 (see
/// docs/decisions.md).
pub const DEFAULT_AGENT_METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4434);

/// Where the agent serves health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// Not served.
    Off,
    /// Served on this address, which was asked for: failing to bind it stops the agent.
    On(SocketAddr),
    /// Served on [`DEFAULT_AGENT_METRICS`], nobody asked for it: if another program (or a
    /// second agent) holds the port, the agent warns and runs without the endpoint.
    Default(SocketAddr),
}

impl MetricsListen {
    /// The address served, if any.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            MetricsListen::Off => None,
            MetricsListen::On(a) | MetricsListen::Default(a) => Some(*a),
        }
    }
}

/// The agent's validated settings.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The agent's configuration.
    pub config: AgentConfig,
    /// Health and metrics endpoint.
    pub metrics: MetricsListen,
    /// Worker threads of the process's runtime.
    pub worker_threads: usize,
}

/// Validates agent options into the agent's configuration, reading certificates and token.
pub fn agent_settings(o: AgentOptions, sources: &Sources) -> Result<AgentSettings, ConfigError> {
    let invalid = |key: &str, message: String| sources.invalid(key, message);
    let worker_threads = match o.worker_threads {
        Some(n) => worker_threads(n).map_err(|m| invalid("worker_threads", m))?,
        None => crate::runtime::default_worker_threads(),
    };
    if o.hub.is_empty() {
        return Err(ConfigError::Missing {
            key: "hub",
            flag: "hub",
            env: "HUB",
        });
    }
    let name = required!(o.name, "name", "name", "NAME");
    if !crate::certs::valid_agent_name(&name) {
        return Err(invalid(
            "name",
            format!("{name:?} must match ^[A-Za-z0-9_-]{{1,63}}$"),
        ));
    }
    let ca = required!(o.ca, "ca", "ca", "CA");
    let cert = required!(o.cert, "cert", "cert", "CERT");
    let key = required!(o.key, "key", "key", "KEY");
    let token_file = required!(o.token_file, "token_file", "token-file", "TOKEN_FILE");
    let files = [
        ("ca", ca.as_path()),
        ("cert", cert.as_path()),
        ("key", key.as_path()),
    ];
    let tls = ClientTls::load(&ca, &cert, &key).map_err(|e| tls_error(sources, files, e))?;
    // The hub would refuse such a certificate at every handshake; say so now.
    tls.check().map_err(|e| tls_error(sources, files, e))?;
    let token = read_secret_file(&token_file).map_err(|e| invalid("token_file", chain(&e)))?;
    let mut config = AgentConfig::new(o.hub, name, tls, token);
    config.token_file = Some(token_file);
    if let Some(name) = o.server_name {
        crate::transport::tls::server_name(&name).map_err(|e| invalid("server_name", chain(&e)))?;
        config.server_name = Some(name);
    }
    config.policy = Policy::new(o.allow, o.deny);
    if let Some(t) = o.dial_timeout {
        config.dial_timeout = t;
    }
    if let Some(n) = o.max_streams {
        if n == 0 {
            return Err(invalid("max_streams", "must be at least 1".into()));
        }
        config.limits.tunnel_streams = n;
    }
    if let Some(n) = o.max_pending_dials {
        config.max_pending_dials = at_least_one(n).map_err(|m| invalid("max_pending_dials", m))?;
    }
    if let Some(n) = o.max_frame {
        config.max_frame = frame_size(n).map_err(|m| invalid("max_frame", m))?;
    }
    if let Some(c) = o.congestion {
        config.limits.congestion = c;
    }
    let metrics = match o.metrics.as_deref() {
        None => MetricsListen::Default(DEFAULT_AGENT_METRICS),
        Some("off") => MetricsListen::Off,
        Some(addr) => MetricsListen::On(parse_addr(addr).map_err(|e| invalid("metrics", e))?),
    };
    config.kube = kube_settings(
        o.kubernetes,
        o.kubeconfig,
        o.kube_context,
        o.kube_namespace,
        o.kube_resource,
        o.kube_inventory_interval,
        in_cluster_detected(),
    )
    .map_err(|(key, message)| invalid(key, message))?;
    if let Some(kube) = config.kube.as_mut() {
        if !o.kube_protected_secret.is_empty() {
            kube.protected_secrets = o.kube_protected_secret;
        }
    }
    // Read the kubeconfig now, so a broken one fails here (and in --check-config) with its key.
    if let Some(KubeSource::Kubeconfig { path, .. }) = config.kube.as_ref().map(|k| &k.source) {
        kube::config::Kubeconfig::read_from(path).map_err(|e| invalid("kubeconfig", chain(&e)))?;
    }
    Ok(AgentSettings {
        config,
        metrics,
        worker_threads,
    })
}

/// A worker thread count, 1 to [`crate::runtime::MAX_WORKER_THREADS`].
fn worker_threads(n: usize) -> Result<usize, String> {
    let max = crate::runtime::MAX_WORKER_THREADS;
    if (1..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} must be between 1 and {max}"))
    }
}

/// A namespace name (RFC 1123 label).
fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid namespace {s:?}: expected a DNS label (lowercase letters, digits, -)"
        ))
    }
}

/// Decides cluster mode: explicit `kubernetes` wins; otherwise a kubeconfig or a detected
/// in-cluster environment turns it on. Errors name the key at fault.
pub fn kube_settings(
    kubernetes: Option<bool>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    namespaces: Vec<String>,
    resources: Vec<ResourceRule>,
    inventory_interval: Option<Duration>,
    in_cluster: bool,
) -> Result<Option<KubeSettings>, (&'static str, String)> {
    for ns in &namespaces {
        parse_namespace(ns).map_err(|e| ("kube_namespace", e))?;
    }
    let on = kubernetes.unwrap_or(kubeconfig.is_some() || in_cluster);
    if !on {
        if kubernetes == Some(false) || (namespaces.is_empty() && resources.is_empty()) {
            return Ok(None);
        }
        return Err((
            "kube_namespace",
            "an allow list for Kubernetes commands was given but cluster mode is off: give \
             --kubeconfig, run in a cluster, or set --kubernetes"
                .into(),
        ));
    }
    if context.is_some() && kubeconfig.is_none() {
        return Err(("kube_context", "needs --kubeconfig".into()));
    }
    let source = match kubeconfig {
        Some(path) => KubeSource::Kubeconfig { path, context },
        None if in_cluster => KubeSource::InCluster,
        None => {
            return Err((
                "kubernetes",
                "cluster mode needs --kubeconfig outside a Kubernetes pod (no in-cluster \
                 ServiceAccount found)"
                    .into(),
            ))
        }
    };
    let mut settings = KubeSettings::new(source);
    settings.allow = KubeAllow {
        namespaces,
        resources,
    };
    if let Some(i) = inventory_interval {
        settings.inventory_interval = i;
    }
    // Asked for explicitly (flag or kubeconfig): a broken identity stops the agent. Only
    // detected: it turns cluster mode off with a warning.
    settings.required = kubernetes == Some(true) || settings.source != KubeSource::InCluster;
    Ok(Some(settings))
}

/// A path as printed: absolute, so the printed file reads the same files from any folder.
fn shown(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn congestion_name(c: Congestion) -> Option<String> {
    use clap::ValueEnum;
    c.to_possible_value().map(|v| v.get_name().to_string())
}

fn log_keys(log: &LogOptions) -> (Option<String>, Option<String>) {
    let format = log.log_format.map(|f| match f {
        LogFormat::Text => "text".to_string(),
        LogFormat::Json => "json".to_string(),
    });
    (format, log.log_level.clone())
}

fn to_toml<T: Serialize>(file: &T) -> Result<String, ConfigError> {
    toml::to_string(file).map_err(|e| ConfigError::Print(e.to_string()))
}

/// The hub configuration in force (defaults included) as the keys of its configuration file,
/// for `--check-config`: pasted into a file, it gives the same configuration. Secrets appear
/// only as the paths of their files; paths are absolute.
pub fn hub_file_text(
    options: &HubOptions,
    config: &HubConfig,
    log: &LogOptions,
) -> Result<String, ConfigError> {
    let (log_format, log_level) = log_keys(log);
    let d = |d: Duration| Some(FileDuration::from(d));
    let file = HubFile {
        listen: Some(config.listen.to_string()),
        socks: Some(config.socks.to_string()),
        api: config.api.map(|a| a.to_string()),
        api_header_timeout: d(config.api_limits.header_timeout),
        api_request_timeout: d(config.api_limits.request_timeout),
        api_max_connections: Some(config.api_limits.max_connections),
        api_max_connections_per_ip: Some(config.api_limits.max_connections_per_ip),
        ca: options.ca.as_deref().map(shown),
        cert: options.cert.as_deref().map(shown),
        key: options.key.as_deref().map(shown),
        tokens: Some(shown(&config.tokens)),
        socks_no_auth: config
            .socks_no_auth
            .as_ref()
            .map(|r| format!("{}@{}", r.agent, r.tenant)),
        heartbeat_interval: d(config.heartbeat.interval),
        heartbeat_timeout: d(config.heartbeat.timeout),
        grace: d(config.grace),
        socks_greeting_timeout: d(config.socks_limits.greeting_timeout),
        socks_half_open_per_ip: Some(config.socks_limits.half_open_per_ip),
        socks_half_open_total: Some(config.socks_limits.half_open_total),
        open_timeout: d(config.open_timeout),
        token_poll: d(config.token_poll),
        metrics_per_agent: Some(config.metrics_per_agent),
        max_handshakes: Some(config.caps.handshakes),
        max_handshakes_per_source: Some(config.caps.handshakes_per_source),
        retry_threshold: Some(config.caps.retry_threshold),
        tls_timeout: d(config.caps.tls_timeout),
        hello_timeout: d(config.caps.hello_timeout),
        max_streams_per_agent: Some(config.caps.streams_per_agent),
        max_frame: Some(config.caps.max_frame),
        max_kube_request: Some(config.caps.kube_request),
        stream_idle_timeout: d(config.caps.stream_idle_timeout),
        congestion: congestion_name(config.limits.congestion),
        state_dir: config.state_dir.as_deref().map(shown),
        kube_timeout: d(config.kube_timeout),
        max_kube_waits_per_token: Some(config.caps.kube_waits_per_token),
        max_sessions_per_agent: Some(config.caps.sessions_per_agent),
        max_sessions_per_token: Some(config.caps.sessions_per_token),
        inventory_interval: d(config.caps.inventory_interval),
        max_heavy_requests_per_tenant: Some(config.caps.heavy_requests_per_tenant),
        worker_threads: Some(config.worker_threads),
        log_format,
        log_level,
    };
    to_toml(&file)
}

/// The agent configuration in force (defaults included) as the keys of its configuration
/// file, for `--check-config`: pasted into a file, it gives the same configuration. The token
/// appears only as the path of its file; paths are absolute.
pub fn agent_file_text(
    options: &AgentOptions,
    settings: &AgentSettings,
    log: &LogOptions,
) -> Result<String, ConfigError> {
    let config = &settings.config;
    let (log_format, log_level) = log_keys(log);
    let d = |d: Duration| Some(FileDuration::from(d));
    let strings = |v: &[Rule]| Some(v.iter().map(|r| r.to_string()).collect::<Vec<_>>());
    let kube = config.kube.as_ref();
    let (kubeconfig, kube_context) = match kube.map(|k| &k.source) {
        Some(KubeSource::Kubeconfig { path, context }) => (Some(shown(path)), context.clone()),
        _ => (None, None),
    };
    let file = AgentFile {
        hub: Some(config.hubs.iter().map(|h| h.to_string()).collect()),
        server_name: config.server_name.clone(),
        name: Some(config.name.clone()),
        ca: options.ca.as_deref().map(shown),
        cert: options.cert.as_deref().map(shown),
        key: options.key.as_deref().map(shown),
        token_file: options.token_file.as_deref().map(shown),
        allow: strings(config.policy.allow_rules()),
        deny: strings(config.policy.deny_rules()),
        dial_timeout: d(config.dial_timeout),
        max_streams: Some(config.limits.tunnel_streams),
        metrics: Some(
            settings
                .metrics
                .addr()
                .map_or_else(|| "off".to_string(), |a| a.to_string()),
        ),
        max_pending_dials: Some(config.max_pending_dials),
        max_frame: Some(config.max_frame),
        congestion: congestion_name(config.limits.congestion),
        // Only detected (not asked for): left out, so the file detects it the same way.
        kubernetes: match kube {
            None => Some(false),
            Some(k) if k.required => Some(true),
            Some(_) => None,
        },
        kubeconfig,
        kube_context,
        kube_namespace: kube.map(|k| k.allow.namespaces.clone()),
        kube_resource: kube.map(|k| k.allow.resources.iter().map(|r| r.to_string()).collect()),
        kube_inventory_interval: kube.and_then(|k| d(k.inventory_interval)),
        kube_protected_secret: kube
            .map(|k| k.protected_secrets.iter().map(|r| r.to_string()).collect()),
        worker_threads: Some(settings.worker_threads),
        log_format,
        log_level,
    };
    to_toml(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_mode_is_decided_once() {
        let kc = || Some(PathBuf::from("/k"));
        // (kubernetes, kubeconfig, in cluster) → None: off, Some(required)
        let table = [
            (None, None, false, None),
            (None, None, true, Some(false)),
            (Some(false), None, true, None),
            (Some(false), kc(), true, None),
            (None, kc(), false, Some(true)),
            (Some(true), None, true, Some(true)),
        ];
        for (k, config, in_cluster, want) in table {
            let got =
                kube_settings(k, config.clone(), None, vec![], vec![], None, in_cluster).unwrap();
            assert_eq!(
                got.map(|s| s.required),
                want,
                "{k:?} {config:?} {in_cluster}"
            );
        }
        // Detected only: not required, a broken identity turns cluster mode off.
        let detected = kube_settings(None, None, None, vec![], vec![], None, true)
            .unwrap()
            .unwrap();
        assert!(!detected.required);
        assert_eq!(detected.source, KubeSource::InCluster);
        // Asked for without any identity: refused with the key named.
        let err = kube_settings(Some(true), None, None, vec![], vec![], None, false).unwrap_err();
        assert_eq!(err.0, "kubernetes");
        let err =
            kube_settings(None, None, Some("ctx".into()), vec![], vec![], None, true).unwrap_err();
        assert_eq!(err.0, "kube_context");
        let err = kube_settings(None, kc(), None, vec!["Bad_NS".into()], vec![], None, false)
            .unwrap_err();
        assert_eq!(err.0, "kube_namespace");
        let err =
            kube_settings(None, None, None, vec!["shop".into()], vec![], None, false).unwrap_err();
        assert_eq!(err.0, "kube_namespace");
    }

    /// The configuration a printed file gives is the one that was printed, field for field
    /// (compared through the validated configuration's debug form).
    #[test]
    fn printed_files_give_the_same_validated_configuration() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        crate::certs::init_dir(dir, &["127.0.0.1".to_string()], false).unwrap();
        crate::certs::issue_agent_files(dir, "edge", false).unwrap();
        std::fs::write(dir.join("tokens.toml"), "").unwrap();
        std::fs::write(dir.join("token.txt"), "rna_x\n").unwrap();
        std::fs::write(dir.join("kubeconfig"), "apiVersion: v1\nkind: Config\n").unwrap();

        let hub = dir.join("hub.toml");
        std::fs::write(
            &hub,
            "ca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub-key.pem\"\n\
             tokens = \"tokens.toml\"\ngrace = 45\nheartbeat_interval = \"1500ms\"\n\
             socks_no_auth = \"edge@acme/prod\"\nmax_frame = 2048\ncongestion = \"bbr\"\n\
             state_dir = \"state\"\nmetrics_per_agent = true\n",
        )
        .unwrap();
        let (options, log, sources) =
            merge_hub(Some(&hub), HubOptions::default(), LogOptions::default()).unwrap();
        let config = hub_config(options.clone(), &sources).unwrap();
        let printed = hub_file_text(&options, &config, &log).unwrap();
        let copy = dir.join("printed-hub.toml");
        std::fs::write(&copy, &printed).unwrap();
        let (again, log_again, sources) =
            merge_hub(Some(&copy), HubOptions::default(), LogOptions::default()).unwrap();
        let reread = hub_config(again.clone(), &sources).unwrap();
        assert_eq!(format!("{config:?}"), format!("{reread:?}"));
        assert_eq!(hub_file_text(&again, &reread, &log_again).unwrap(), printed);

        let agent = dir.join("agent.toml");
        std::fs::write(
            &agent,
            "hub = [\"hub.example\", \"[::1]:5000\"]\nname = \"edge\"\nca = \"ca.pem\"\n\
             cert = \"agent-edge.pem\"\nkey = \"agent-edge-key.pem\"\n\
             token_file = \"token.txt\"\nallow = [\"10.0.0.0/8\", \"*.svc.local:443\"]\n\
             deny = [\"10.9.0.0/16\"]\ndial_timeout = 3\nmetrics = \"off\"\n\
             kubeconfig = \"kubeconfig\"\nkube_context = \"prod\"\n\
             kube_namespace = [\"shop\"]\nkube_resource = [\"deployments.apps\"]\n\
             kube_inventory_interval = \"90s\"\nserver_name = \"hub.example\"\n",
        )
        .unwrap();
        let (options, log, sources) =
            merge_agent(Some(&agent), AgentOptions::default(), LogOptions::default()).unwrap();
        let settings = agent_settings(options.clone(), &sources).unwrap();
        let printed = agent_file_text(&options, &settings, &log).unwrap();
        let copy = dir.join("printed-agent.toml");
        std::fs::write(&copy, &printed).unwrap();
        let (again, log_again, sources) =
            merge_agent(Some(&copy), AgentOptions::default(), LogOptions::default()).unwrap();
        let reread = agent_settings(again.clone(), &sources).unwrap();
        assert_eq!(format!("{settings:?}"), format!("{reread:?}"));
        assert_eq!(
            agent_file_text(&again, &reread, &log_again).unwrap(),
            printed
        );
        assert!(!printed.contains("rna_x"), "{printed}");
    }

    #[test]
    fn type_errors_name_the_key_they_are_at() {
        let text = "name = \"edge\"\nhub = [\n  \"a:1\",\n  2,\n]\nmax_streams = \"x\"\n";
        let err = parse_agent_file(text, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "agent.toml: hub: invalid type: integer `2`, expected a string (line 4)"
        );
        // A broken document names no key: there is none to name.
        let err = parse_agent_file("hub = [\n", Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agent.toml: "), "{err}");
        assert!(!err.starts_with("agent.toml: hub: "), "{err}");
    }

    #[test]
    fn command_line_wins_over_file_and_lists_are_taken_whole() {
        let cli = AgentOptions {
            name: Some("cli".into()),
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        let file = AgentOptions {
            name: Some("file".into()),
            server_name: Some("hub.internal".into()),
            allow: vec![
                "192.168.0.0/16".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            deny: vec!["10.9.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        let merged = cli.or(file);
        assert_eq!(merged.name.as_deref(), Some("cli"));
        assert_eq!(merged.server_name.as_deref(), Some("hub.internal"));
        assert_eq!(merged.allow.len(), 1);
        assert_eq!(merged.deny.len(), 1);
    }

    #[test]
    fn caps_come_from_files_and_are_checked() {
        let (hub, _) = parse_hub_file(
            "max_handshakes = 3\nmax_streams_per_agent = 4\nmax_frame = 2048\n\
             stream_idle_timeout = \"90s\"\nmax_handshakes_per_source = 2\n\
             retry_threshold = 0\ntls_timeout = \"2s\"\nhello_timeout = \"3s\"\n",
            Path::new("hub.toml"),
        )
        .unwrap();
        assert_eq!(hub.max_handshakes, Some(3));
        assert_eq!(hub.max_streams_per_agent, Some(4));
        assert_eq!(hub.max_frame, Some(2048));
        assert_eq!(hub.stream_idle_timeout, Some(Duration::from_secs(90)));
        assert_eq!(hub.max_handshakes_per_source, Some(2));
        assert_eq!(hub.retry_threshold, Some(0));
        assert_eq!(hub.tls_timeout, Some(Duration::from_secs(2)));
        assert_eq!(hub.hello_timeout, Some(Duration::from_secs(3)));
        let (agent, _) = parse_agent_file(
            "max_pending_dials = 5\nmax_frame = 1024\ncongestion = \"bbr\"\n",
            Path::new("agent.toml"),
        )
        .unwrap();
        assert_eq!(agent.max_pending_dials, Some(5));
        assert_eq!(agent.max_frame, Some(1024));
        assert_eq!(agent.congestion, Some(Congestion::Bbr));
        let err = parse_agent_file("congestion = \"reno\"\n", Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("congestion: invalid congestion controller"),
            "{err}"
        );
        let cli = HubOptions {
            max_handshakes: Some(9),
            ..Default::default()
        };
        assert_eq!(cli.or(hub).max_handshakes, Some(9));

        assert_eq!(
            frame_size(1023).unwrap_err(),
            "1023 must be between 1024 and 65536 bytes"
        );
        assert!(frame_size(65537).is_err());
        assert!(frame_size(65536).is_ok());
        assert_eq!(at_least_one(0).unwrap_err(), "must be at least 1");
        let err = parse_hub_file("stream_idle_timeout = \"soon\"\n", Path::new("hub.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("hub.toml: stream_idle_timeout: invalid duration"),
            "{err}"
        );
    }

    #[test]
    fn hub_state_dir_comes_from_the_file_relative_to_it_and_the_flag_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("hub.toml");
        std::fs::write(&file, "state_dir = \"state\"\n").unwrap();
        let (from_file, _) = read_hub_file(&file).unwrap();
        assert_eq!(from_file.state_dir, Some(tmp.path().join("state")));
        let cli = HubOptions {
            state_dir: Some(PathBuf::from("/var/lib/rna")),
            ..Default::default()
        };
        let (merged, _, _) = merge_hub(Some(&file), cli, LogOptions::default()).unwrap();
        assert_eq!(merged.state_dir, Some(PathBuf::from("/var/lib/rna")));
    }

    /// The keys a file type accepts, from serde's own "expected one of" list.
    fn accepted_keys<T: serde::de::DeserializeOwned + fmt::Debug>() -> Vec<String> {
        let err = toml::from_str::<T>("no_such_key_ = 1").expect_err("unknown key refused");
        let message = err.message().to_string();
        let list = message
            .split_once("expected one of ")
            .map(|(_, l)| l.to_string())
            .unwrap_or_default();
        list.split(", ")
            .map(|k| k.trim_matches('`').to_string())
            .filter(|k| !k.is_empty())
            .collect()
    }

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name)
    }

    #[test]
    fn examples_parse_and_document_every_key() {
        let hub = example("hub.toml");
        let (options, log) = read_hub_file(&hub).expect("examples/hub.toml parses");
        assert!(options.listen.is_some() && log.log_format.is_some());
        let text = std::fs::read_to_string(&hub).expect("read example");
        let keys = accepted_keys::<HubFile>();
        assert!(keys.len() > 15, "{keys:?}");
        for key in keys {
            assert!(
                text.contains(&format!("{key} = ")),
                "examples/hub.toml lacks {key}"
            );
        }

        let agent = example("agent.toml");
        let (options, _) = read_agent_file(&agent).expect("examples/agent.toml parses");
        assert_eq!(options.allow.len(), 3);
        let text = std::fs::read_to_string(&agent).expect("read example");
        let keys = accepted_keys::<AgentFile>();
        assert!(keys.len() > 12, "{keys:?}");
        for key in keys {
            assert!(
                text.contains(&format!("{key} = ")),
                "examples/agent.toml lacks {key}"
            );
        }
    }

    #[test]
    fn errors_name_the_file_only_for_values_the_file_gave() {
        let sources = Sources {
            file: Some("hub.toml".into()),
            command_line: vec!["key"],
        };
        assert_eq!(sources.of("cert"), "hub.toml");
        assert_eq!(sources.of("key"), "command line");
        assert_eq!(Sources::command_line().of("cert"), "command line");
        let with_list = Sources {
            file: Some("agent.toml".into()),
            command_line: vec!["allow"],
        };
        assert_eq!(with_list.of("allow[2]"), "command line");
        assert_eq!(with_list.of("hub[1]"), "agent.toml");
    }
}
