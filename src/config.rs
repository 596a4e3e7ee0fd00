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

/// How one key's value is written in a file: the type serde reads and writes, and the two
/// conversions. Text values are read through `FromStr` (or the key's own check) after serde,
/// so a bad value is reported as `file: key[i]: message`, while a value of the wrong TOML type
/// keeps serde's message and line.
trait Form {
    /// The value as the options hold it.
    type Value;
    /// The value as the file holds it.
    type File: Serialize + serde::de::DeserializeOwned + fmt::Debug;
    /// Reads a file value; `base` is the file's folder, which relative paths start from.
    fn read(file: Self::File, base: Option<&Path>) -> Result<Self::Value, String>;
    /// Writes a value in force the way [`Form::read`] reads it back.
    fn show(value: &Self::Value) -> Self::File;
}

/// Numbers and booleans are TOML's own types: a string where a number belongs gets serde's
/// "invalid type" message with its line.
macro_rules! native_form {
    ($($t:ty),*) => {$(
        impl Form for $t {
            type Value = $t;
            type File = $t;
            fn read(file: $t, _: Option<&Path>) -> Result<$t, String> {
                Ok(file)
            }
            fn show(value: &$t) -> $t {
                *value
            }
        }
    )*};
}
native_form!(usize, u32, bool);

/// Values written as text, read through `FromStr` and printed through `Display`.
macro_rules! text_form {
    ($($t:ty),*) => {$(
        impl Form for $t {
            type Value = $t;
            type File = String;
            fn read(file: String, _: Option<&Path>) -> Result<$t, String> {
                file.parse().map_err(|e| format!("{e}"))
            }
            fn show(value: &$t) -> String {
                value.to_string()
            }
        }
    )*};
}
text_form!(String, HubTarget, Rule, ResourceRule, SecretRef);

impl Form for SocketAddr {
    type Value = SocketAddr;
    type File = String;
    fn read(file: String, _: Option<&Path>) -> Result<SocketAddr, String> {
        parse_addr(&file)
    }
    fn show(value: &SocketAddr) -> String {
        value.to_string()
    }
}

impl Form for Duration {
    type Value = Duration;
    type File = FileDuration;
    fn read(file: FileDuration, _: Option<&Path>) -> Result<Duration, String> {
        parse_duration(&file.0)
    }
    fn show(value: &Duration) -> FileDuration {
        FileDuration(format_duration(*value))
    }
}

impl Form for PathBuf {
    type Value = PathBuf;
    type File = PathBuf;
    /// Relative paths in a file are relative to the file's folder.
    fn read(file: PathBuf, base: Option<&Path>) -> Result<PathBuf, String> {
        Ok(match base {
            Some(base) if file.is_relative() => base.join(file),
            _ => file,
        })
    }
    /// Absolute, so the printed file reads the same files from any folder.
    fn show(value: &PathBuf) -> PathBuf {
        std::path::absolute(value).unwrap_or_else(|_| value.clone())
    }
}

impl Form for Congestion {
    type Value = Congestion;
    type File = String;
    fn read(file: String, _: Option<&Path>) -> Result<Congestion, String> {
        Congestion::from_str(&file)
    }
    fn show(value: &Congestion) -> String {
        use clap::ValueEnum;
        value
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

impl Form for LogFormat {
    type Value = LogFormat;
    type File = String;
    fn read(file: String, _: Option<&Path>) -> Result<LogFormat, String> {
        LogFormat::from_str(&file)
    }
    fn show(value: &LogFormat) -> String {
        match value {
            LogFormat::Text => "text".to_string(),
            LogFormat::Json => "json".to_string(),
        }
    }
}

/// A Kubernetes namespace in a file: checked as it is read, so the error names its index.
/// Flags take any text; cluster-mode validation checks those.
struct Namespace;

impl Form for Namespace {
    type Value = String;
    type File = String;
    fn read(file: String, _: Option<&Path>) -> Result<String, String> {
        parse_namespace(&file)
    }
    fn show(value: &String) -> String {
        value.clone()
    }
}

/// The pieces of code that differ between a key holding one value (`Option<T>`: `None` when
/// not given) and a key holding a list (`Vec<T>`: empty when not given; a list is taken whole
/// from one source).
macro_rules! slot {
    (file Option $f:ty) => { Option<<$f as Form>::File> };
    (file Vec $f:ty) => { Option<Vec<<$f as Form>::File>> };
    (given Option $v:expr) => { $v.is_some() };
    (given Vec $v:expr) => { !$v.is_empty() };
    (or Option $high:expr, $low:expr) => { $high.or($low) };
    (or Vec $high:expr, $low:expr) => { or_vec($high, $low) };
    (read Option $c:ident, $key:expr, $v:expr, $f:ty) => { $c.one::<$f>($key, $v)? };
    (read Vec $c:ident, $key:expr, $v:expr, $f:ty) => { $c.list::<$f>($key, $v)? };
    (show Option $v:expr, $f:ty) => { $v.as_ref().map(<$f as Form>::show) };
    (show Vec $v:expr, $f:ty) => {
        $v.map(|list| list.iter().map(<$f as Form>::show).collect::<Vec<_>>())
    };
}

/// Where a key's value in force is: `field(place)` or `field(place, check)` is a field of
/// the validated configuration that the key sets (through `check`, a `fn(T) -> Result<T,
/// String>`) and prints from; `show(expression)` is printed from `expression` (an `Option`)
/// and validated by hand, because the key has rules of its own.
macro_rules! in_force {
    (field($place:expr $(, $check:expr)?)) => {
        Some($place)
    };
    (show($show:expr)) => {
        $show
    };
}

/// Sets a `field` key's place from the options, when given; `show` keys are set by hand.
macro_rules! apply {
    ($o:ident, $sources:ident, $key:ident, field($place:expr)) => {
        if let Some(value) = $o.$key {
            $place = value;
        }
    };
    ($o:ident, $sources:ident, $key:ident, field($place:expr, $check:expr)) => {
        if let Some(value) = $o.$key {
            $place = $check(value).map_err(|m| $sources.invalid(stringify!($key), m))?;
        }
    };
    ($o:ident, $sources:ident, $key:ident, show($show:expr)) => {};
}

/// The form of a key: its own type unless the entry names another with `as`.
macro_rules! form {
    ($ty:ty) => {
        $ty
    };
    ($ty:ty, $form:ty) => {
        $form
    };
}

/// One command's settings, each key written once: its doc comment (the `--help` text), its
/// clap attributes, its type (`Option<T>` or `Vec<T>`, optionally `as` another [`Form`]) and
/// where its value in force is (`=> field(...)` or `=> show(...)`, see [`in_force!`]). From
/// this list come the clap options struct, the file struct (with `deny_unknown_fields` and
/// the log keys), reading a file into options, merging, setting the `field` keys into the
/// validated configuration, and printing.
macro_rules! settings {
    (
        $(#[doc = $sdoc:literal])*
        $options:ident, file $file:ident, in force from $c:ident: $config:ty, $o:ident;
        $(
            $(#[doc = $doc:literal])*
            #[arg($($arg:tt)*)]
            $key:ident: $kind:ident<$ty:ty> $(as $form:ty)? => $how:ident($($place:tt)*);
        )*
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, Default, Args)]
        pub struct $options {
            $(
                $(#[doc = $doc])*
                #[arg($($arg)*)]
                pub $key: $kind<$ty>,
            )*
        }

        /// The command's TOML file, as written: the same keys and the log keys. Values are
        /// checked as they become options; `--check-config` prints the configuration in force
        /// in this form.
        #[derive(Debug, Default, Deserialize, Serialize)]
        #[serde(default, deny_unknown_fields)]
        struct $file {
            $(
                $(#[doc = $doc])*
                $key: slot!(file $kind form!($ty $(, $form)?)),
            )*
            log_format: Option<<LogFormat as Form>::File>,
            log_level: Option<String>,
        }

        impl Options for $options {
            fn given(&self) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $(if slot!(given $kind self.$key) {
                    keys.push(stringify!($key));
                })*
                keys
            }

            fn or(self, lower: $options) -> $options {
                $options {
                    $($key: slot!(or $kind self.$key, lower.$key),)*
                }
            }

            fn parse_file(text: &str, path: &Path) -> Result<($options, LogOptions), ConfigError> {
                let (file, origin): ($file, String) = parse_toml(text, path)?;
                let checker = Checker {
                    origin: &origin,
                    base: path.parent(),
                };
                let options = $options {
                    $($key: slot!(
                        read $kind checker, stringify!($key), file.$key, form!($ty $(, $form)?)
                    ),)*
                };
                let log = LogOptions {
                    log_format: checker.one::<LogFormat>("log_format", file.log_format)?,
                    log_level: file.log_level,
                };
                Ok((options, log))
            }
        }

        impl $options {
            /// Checks the `field` keys that were given and writes them into `$c`, whose
            /// defaults they replace; an error names the key and where it came from.
            fn apply(&self, $c: &mut $config, sources: &Sources) -> Result<(), ConfigError> {
                $(apply!(self, sources, $key, $how($($place)*));)*
                Ok(())
            }

            /// The values in force, read from the validated `$c`, as the file's keys.
            fn in_force(&self, $c: &$config, log: &LogOptions) -> $file {
                let $o = self;
                $file {
                    $($key: slot!(
                        show $kind (in_force!($how($($place)*))), form!($ty $(, $form)?)
                    ),)*
                    log_format: log.log_format.as_ref().map(<LogFormat as Form>::show),
                    log_level: log.log_level.clone(),
                }
            }
        }
    };
}

/// What [`merge`] needs of an options type; [`settings!`] implements it.
trait Options: Sized {
    /// The keys this holds a value for.
    fn given(&self) -> Vec<&'static str>;
    /// `self` where given, else `lower`. Lists are taken whole from one source.
    fn or(self, lower: Self) -> Self;
    /// Parses the text of a file; `path` names it in errors and anchors relative paths.
    fn parse_file(text: &str, path: &Path) -> Result<(Self, LogOptions), ConfigError>;
    /// Reads a file into options (and its log settings).
    fn read_file(path: &Path) -> Result<(Self, LogOptions), ConfigError> {
        Self::parse_file(&read_text(path)?, path)
    }
}

fn or_vec<T>(high: Vec<T>, low: Vec<T>) -> Vec<T> {
    if high.is_empty() {
        low
    } else {
        high
    }
}

settings! {
    /// Hub settings from flags and environment (`None`: not given).
    HubOptions, file HubFile, in force from config: HubConfig, options;
    /// UDP address agents connect to [default: 0.0.0.0:4433].
    #[arg(long, env = "RNA_LISTEN")]
    listen: Option<SocketAddr> => show(Some(config.listen));
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
    /// Accept SOCKS5 clients without credentials and route them to AGENT@TENANT (only when
    /// --socks is a loopback address).
    #[arg(long, env = "RNA_SOCKS_NO_AUTH", value_name = "AGENT@TENANT")]
    socks_no_auth: Option<String> =>
        show(config.socks_no_auth.as_ref().map(|r| format!("{}@{}", r.agent, r.tenant)));
    /// Heartbeat interval announced to agents [default: 10s].
    #[arg(long, env = "RNA_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    heartbeat_interval: Option<Duration> => field(config.heartbeat.interval);
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
    /// Agent connections in the handshake at once; more are refused before any TLS work
    /// [default: 256].
    #[arg(long, env = "RNA_MAX_HANDSHAKES")]
    max_handshakes: Option<usize> => field(config.caps.handshakes, at_least_one);
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
    /// Folder for state kept across restarts (the QUIC endpoint key, so agents learn of a
    /// restart at once); created if missing.
    #[arg(long, env = "RNA_STATE_DIR")]
    state_dir: Option<PathBuf> => show(config.state_dir.clone());
    /// Time a Kubernetes command (other than wait, which has its own timeout) may take
    /// [default: 60s].
    #[arg(long, env = "RNA_KUBE_TIMEOUT", value_parser = parse_duration)]
    kube_timeout: Option<Duration> => field(config.kube_timeout);
    /// Kubernetes waits one token may have running at once; one more gets 429 [default: 8].
    #[arg(long, env = "RNA_MAX_KUBE_WAITS_PER_TOKEN")]
    max_kube_waits_per_token: Option<usize> =>
        field(config.caps.kube_waits_per_token, at_least_one);
}

settings! {
    /// Agent settings from flags and environment (`None` or empty: not given).
    AgentOptions, file AgentFile, in force from settings: AgentSettings, options;
    /// Hub address (host:port, or host for port 4433); repeat for several hubs. Every
    /// address a name resolves to gets its own connection.
    #[arg(long, env = "RNA_HUB", value_delimiter = ',')]
    hub: Vec<HubTarget> => show(Some(settings.config.hubs.clone()));
    /// TLS name to verify the hub as [default: the host of --hub].
    #[arg(long, env = "RNA_SERVER_NAME")]
    server_name: Option<String> => show(settings.config.server_name.clone());
    /// Agent identifier; must equal the certificate's common name.
    #[arg(long, env = "RNA_NAME")]
    name: Option<String> => show(Some(settings.config.name.clone()));
    /// CA to verify the hub with.
    #[arg(long, env = "RNA_CA")]
    ca: Option<PathBuf> => show(options.ca.clone());
    /// Agent certificate (PEM).
    #[arg(long, env = "RNA_CERT")]
    cert: Option<PathBuf> => show(options.cert.clone());
    /// Agent private key (PEM).
    #[arg(long, env = "RNA_KEY")]
    key: Option<PathBuf> => show(options.key.clone());
    /// File holding the agent's token (scope connect:agentHub).
    #[arg(long, env = "RNA_TOKEN_FILE")]
    token_file: Option<PathBuf> => show(options.token_file.clone());
    /// Destinations the agent may dial: CIDR, IP, host or *.domain, optionally :port.
    /// Without any, everything but the default-denied ranges is allowed.
    #[arg(long, env = "RNA_ALLOW", value_delimiter = ',')]
    allow: Vec<Rule> => show(Some(settings.config.policy.allow_rules().to_vec()));
    /// Destinations the agent refuses (checked first).
    #[arg(long, env = "RNA_DENY", value_delimiter = ',')]
    deny: Vec<Rule> => show(Some(settings.config.policy.deny_rules().to_vec()));
    /// Time allowed to resolve and connect one destination [default: 10s].
    #[arg(long, env = "RNA_DIAL_TIMEOUT", value_parser = parse_duration)]
    dial_timeout: Option<Duration> => field(settings.config.dial_timeout);
    /// Time a session must stay up to earn an immediate reconnect when it drops; shorter
    /// sessions back off [default: 1s].
    #[arg(long, env = "RNA_STABLE_SESSION", value_parser = parse_duration)]
    stable_session: Option<Duration> => field(settings.config.stable_session);
    /// Tunnel streams the hub may have open on this agent's connection [default: 16384].
    #[arg(long, env = "RNA_MAX_STREAMS")]
    max_streams: Option<u32> => field(settings.config.limits.tunnel_streams, at_least_one);
    /// Address of the agent's /healthz, /readyz and /metrics, or `off`; the default is skipped
    /// with a warning when its port is taken [default: 127.0.0.1:4434].
    #[arg(long, env = "RNA_METRICS")]
    metrics: Option<String> =>
        show(Some(settings.metrics.addr().map_or_else(|| "off".to_string(), |a| a.to_string())));
    /// Dials in progress at once; more tunnel requests fail at once [default: 256].
    #[arg(long, env = "RNA_MAX_PENDING_DIALS")]
    max_pending_dials: Option<usize> => field(settings.config.max_pending_dials, at_least_one);
    /// Largest protocol frame accepted from a hub, in bytes, 1024 to 65536 [default: 65536].
    #[arg(long, env = "RNA_MAX_FRAME")]
    max_frame: Option<usize> => field(settings.config.max_frame, frame_size);
    /// Congestion controller for data sent to hubs: cubic or bbr [default: cubic].
    #[arg(long, env = "RNA_CONGESTION")]
    congestion: Option<Congestion> => field(settings.config.limits.congestion);
    /// Worker threads of the runtime, 1 to 1024 [default: 1 with at most two CPUs, else one
    /// per CPU].
    #[arg(long, env = "RNA_WORKER_THREADS")]
    worker_threads: Option<usize> => show(Some(settings.worker_threads));
    /// Cluster mode: run the hub's Kubernetes commands as this agent's ServiceAccount or
    /// kubeconfig identity [default: on when the in-cluster environment is detected or
    /// --kubeconfig is given].
    #[arg(long, env = "RNA_KUBERNETES", num_args = 0..=1, default_missing_value = "true")]
    kubernetes: Option<bool> => show(kubernetes_in_force(settings));
    /// Kubeconfig to act with instead of the in-cluster ServiceAccount (turns cluster mode on).
    #[arg(long, env = "RNA_KUBECONFIG")]
    kubeconfig: Option<PathBuf> =>
        show(kubeconfig_in_force(settings).map(|(path, _)| path.clone()));
    /// Context of --kubeconfig to use [default: its current context].
    #[arg(long, env = "RNA_KUBE_CONTEXT")]
    kube_context: Option<String> =>
        show(kubeconfig_in_force(settings).and_then(|(_, context)| context.clone()));
    /// Namespaces Kubernetes commands may touch; repeat [default: all that RBAC allows].
    #[arg(long, env = "RNA_KUBE_NAMESPACE", value_delimiter = ',')]
    kube_namespace: Vec<String> as Namespace =>
        show(kube(settings).map(|k| k.allow.namespaces.clone()));
    /// Resources Kubernetes commands may touch, as plural[.group] (deployments.apps,
    /// configmaps, *.example.com); repeat [default: all that RBAC allows].
    #[arg(long, env = "RNA_KUBE_RESOURCE", value_delimiter = ',')]
    kube_resource: Vec<ResourceRule> => show(kube(settings).map(|k| k.allow.resources.clone()));
    /// How often the Kubernetes inventory is collected and reported to the hubs [default: 5m].
    #[arg(long, env = "RNA_KUBE_INVENTORY_INTERVAL", value_parser = parse_duration)]
    kube_inventory_interval: Option<Duration> => show(kube(settings).map(|k| k.inventory_interval));
    /// Secrets holding the agent's own credentials, as NAME (in the agent's namespace) or
    /// NAMESPACE/NAME: no Kubernetes command reads or changes them; repeat
    /// [default: rna-agent-tls,rna-agent-token].
    #[arg(long, env = "RNA_KUBE_PROTECTED_SECRET", value_delimiter = ',')]
    kube_protected_secret: Vec<SecretRef> =>
        show(kube(settings).map(|k| k.protected_secrets.clone()));
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

/// Converts file values, naming the file and key in errors.
struct Checker<'a> {
    origin: &'a str,
    base: Option<&'a Path>,
}

impl Checker<'_> {
    fn invalid(&self, key: String, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            key,
            message,
        }
    }

    fn one<F: Form>(
        &self,
        key: &str,
        value: Option<F::File>,
    ) -> Result<Option<F::Value>, ConfigError> {
        value
            .map(|v| F::read(v, self.base).map_err(|m| self.invalid(key.to_string(), m)))
            .transpose()
    }

    fn list<F: Form>(
        &self,
        key: &str,
        values: Option<Vec<F::File>>,
    ) -> Result<Vec<F::Value>, ConfigError> {
        values
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, v)| F::read(v, self.base).map_err(|m| self.invalid(format!("{key}[{i}]"), m)))
            .collect()
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
        .map(|k| (strsim::levenshtein(key, k), *k))
        .min()
        .filter(|(d, _)| *d <= (key.len() / 3).max(1));
    let message = match closest {
        Some((_, k)) => format!("unknown key (did you mean `{k}`?)"),
        None => "unknown key".to_string(),
    };
    Some((key.to_string(), message))
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

/// Merges command line over file (if any): the options in force, the log settings, and where
/// each value came from.
fn merge<O: Options>(
    file: Option<&Path>,
    cli: O,
    cli_log: LogOptions,
) -> Result<(O, LogOptions, Sources), ConfigError> {
    match file {
        Some(path) => {
            let (options, log) = O::read_file(path)?;
            let sources = Sources {
                file: Some(path.display().to_string()),
                command_line: cli.given(),
            };
            Ok((cli.or(options), cli_log.or(log), sources))
        }
        None => Ok((cli, cli_log, Sources::command_line())),
    }
}

/// Parses the text of a hub configuration file, as `--config` reads it: `path` names the
/// file in errors and anchors its relative paths. The `config_files` fuzz target drives it.
pub fn parse_hub_file(text: &str, path: &Path) -> Result<(HubOptions, LogOptions), ConfigError> {
    HubOptions::parse_file(text, path)
}

/// Parses the text of an agent configuration file; see [`parse_hub_file`].
pub fn parse_agent_file(
    text: &str,
    path: &Path,
) -> Result<(AgentOptions, LogOptions), ConfigError> {
    AgentOptions::parse_file(text, path)
}

/// Merges command line over file (if any) for the hub.
pub fn merge_hub(
    file: Option<&Path>,
    cli: HubOptions,
    cli_log: LogOptions,
) -> Result<(HubOptions, LogOptions, Sources), ConfigError> {
    merge(file, cli, cli_log)
}

/// Merges command line over file (if any) for the agent.
pub fn merge_agent(
    file: Option<&Path>,
    cli: AgentOptions,
    cli_log: LogOptions,
) -> Result<(AgentOptions, LogOptions, Sources), ConfigError> {
    merge(file, cli, cli_log)
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
    sources.invalid(key, crate::fsutil::error_chain(&e))
}

macro_rules! required {
    ($opt:expr, $key:literal, $flag:literal, $env:literal) => {
        $opt.clone().ok_or(ConfigError::Missing {
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
        return Err(invalid("tokens", crate::fsutil::error_chain(&e)));
    }
    let listen = o.listen.unwrap_or(SocketAddr::from((
        [0, 0, 0, 0],
        crate::proto::DEFAULT_HUB_PORT,
    )));
    let socks = o.socks.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1080)));
    let mut config = HubConfig::new(listen, socks, tls, tokens);
    config.api = Some(o.api.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))));
    config.state_dir = o.state_dir.clone();
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

fn at_least_one<T: Default + PartialEq>(n: T) -> Result<T, String> {
    if n == T::default() {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// The admin API's cap on a Kubernetes apply body: at least a frame, at most what the
/// command channel carries.
fn kube_request_size(n: usize) -> Result<usize, String> {
    let max = crate::proto::kube::MAX_KUBE_REQUEST;
    if !(MIN_FRAME..=max).contains(&n) {
        return Err(format!("{n} must be between {MIN_FRAME} and {max} bytes"));
    }
    Ok(n)
}

/// The least time between two inventory reports of one session. The agent waits 30 s for
/// the hub to take a report; a turn must come before that.
fn inventory_interval(t: Duration) -> Result<Duration, String> {
    if t > Duration::from_secs(20) {
        return Err(format!("{t:?} is longer than 20s"));
    }
    Ok(t)
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
    // Checked before any file is read, so a bad count is the first line the agent prints.
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
    let token = read_secret_file(&token_file)
        .map_err(|e| invalid("token_file", crate::fsutil::error_chain(&e)))?;
    let mut config = AgentConfig::new(o.hub.clone(), name, tls, token);
    config.token_file = Some(token_file);
    if let Some(name) = o.server_name.clone() {
        crate::transport::tls::server_name(&name)
            .map_err(|e| invalid("server_name", crate::fsutil::error_chain(&e)))?;
        config.server_name = Some(name);
    }
    config.policy = Policy::new(o.allow.clone(), o.deny.clone());
    let metrics = match o.metrics.as_deref() {
        None => MetricsListen::Default(DEFAULT_AGENT_METRICS),
        Some("off") => MetricsListen::Off,
        Some(addr) => MetricsListen::On(parse_addr(addr).map_err(|e| invalid("metrics", e))?),
    };
    config.kube = kube_settings(
        o.kubernetes,
        o.kubeconfig.clone(),
        o.kube_context.clone(),
        o.kube_namespace.clone(),
        o.kube_resource.clone(),
        o.kube_inventory_interval,
        in_cluster_detected(),
    )
    .map_err(|(key, message)| invalid(key, message))?;
    if let Some(kube) = config.kube.as_mut() {
        if !o.kube_protected_secret.is_empty() {
            kube.protected_secrets = o.kube_protected_secret.clone();
        }
    }
    // Read the kubeconfig now, so a broken one fails here (and in --check-config) with its key.
    if let Some(KubeSource::Kubeconfig { path, .. }) = config.kube.as_ref().map(|k| &k.source) {
        kube::config::Kubeconfig::read_from(path)
            .map_err(|e| invalid("kubeconfig", crate::fsutil::error_chain(&e)))?;
    }
    let mut settings = AgentSettings {
        config,
        metrics,
        worker_threads,
    };
    o.apply(&mut settings, sources)?;
    Ok(settings)
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

/// Cluster mode as printed: off and asked-for are written out; only detected is left out, so
/// the printed file detects it the same way.
fn kubernetes_in_force(settings: &AgentSettings) -> Option<bool> {
    match kube(settings) {
        None => Some(false),
        Some(k) if k.required => Some(true),
        Some(_) => None,
    }
}

/// Cluster mode's settings, if it is on.
fn kube(settings: &AgentSettings) -> Option<&KubeSettings> {
    settings.config.kube.as_ref()
}

/// The kubeconfig and context cluster mode acts with, if it uses a kubeconfig.
fn kubeconfig_in_force(settings: &AgentSettings) -> Option<(&PathBuf, &Option<String>)> {
    match kube(settings).map(|k| &k.source) {
        Some(KubeSource::Kubeconfig { path, context }) => Some((path, context)),
        _ => None,
    }
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
    to_toml(&options.in_force(config, log))
}

/// The agent configuration in force (defaults included) as the keys of its configuration
/// file, for `--check-config`: pasted into a file, it gives the same configuration. The token
/// appears only as the path of its file; paths are absolute.
pub fn agent_file_text(
    options: &AgentOptions,
    settings: &AgentSettings,
    log: &LogOptions,
) -> Result<String, ConfigError> {
    to_toml(&options.in_force(settings, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    settings! {
        /// A command with two keys, each declared once, to show what one entry gives.
        DemoOptions, file DemoFile, in force from config: Duration, options;
        /// How long to wait.
        #[arg(long, env = "RNA_DEMO_WAIT", value_parser = parse_duration)]
        wait: Option<Duration> => field(*config, inventory_interval);
        /// Where to look; repeat.
        #[arg(long, env = "RNA_DEMO_PLACE", value_delimiter = ',')]
        place: Vec<PathBuf> => show(Some(options.place.clone()));
    }

    /// One entry is a flag with its variable, a file key read with its checks and relative
    /// paths, a merge that prefers the command line, and a printed key that reads back.
    #[test]
    fn one_entry_is_a_flag_a_variable_a_file_key_a_merge_and_a_printed_key() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            options: DemoOptions,
        }
        let command = Cli::command();
        let wait = command
            .get_arguments()
            .find(|a| a.get_id() == "wait")
            .expect("--wait");
        assert_eq!(wait.get_long(), Some("wait"));
        assert_eq!(
            wait.get_env().and_then(|e| e.to_str()),
            Some("RNA_DEMO_WAIT")
        );
        let cli = Cli::try_parse_from(["demo", "--wait", "9s"]).expect("flags parse");
        assert_eq!(cli.options.wait, Some(Duration::from_secs(9)));
        assert!(Cli::try_parse_from(["demo", "--wait", "soon"]).is_err());

        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("demo.toml");
        std::fs::write(
            &file,
            "wait = 30\nplace = [\"a\", \"/b\"]\nlog_level = \"debug\"\n",
        )
        .expect("write");
        let (from_file, log) = DemoOptions::read_file(&file).expect("file reads");
        assert_eq!(from_file.wait, Some(Duration::from_secs(30)));
        assert_eq!(from_file.place, [tmp.path().join("a"), PathBuf::from("/b")]);
        assert_eq!(log.log_level.as_deref(), Some("debug"));
        let err = DemoOptions::parse_file("wait = \"soon\"\n", Path::new("demo.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("demo.toml: wait: invalid duration \"soon\""),
            "{err}"
        );
        let err = DemoOptions::parse_file("wai = 1\n", Path::new("demo.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "demo.toml: wai: unknown key (did you mean `wait`?) (line 1)"
        );

        // The file's value is checked as it is set, and the error names the file.
        let (file_only, _, sources) =
            merge(Some(&file), DemoOptions::default(), LogOptions::default()).expect("merge");
        let mut config = Duration::from_secs(1);
        let err = file_only
            .apply(&mut config, &sources)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("{}: wait: 30s is longer than 20s", file.display())
        );

        let (merged, _, sources) =
            merge(Some(&file), cli.options, LogOptions::default()).expect("merge");
        assert_eq!(merged.wait, Some(Duration::from_secs(9)), "the flag wins");
        assert_eq!(merged.place, from_file.place, "the file fills the rest");
        assert_eq!(sources.of("wait"), "command line");
        assert_eq!(sources.of("place[1]"), file.display().to_string());
        merged.apply(&mut config, &sources).expect("9s is allowed");
        assert_eq!(config, Duration::from_secs(9));

        let printed = to_toml(&merged.in_force(&config, &log)).expect("print");
        let copy = tmp.path().join("printed.toml");
        std::fs::write(&copy, &printed).expect("write");
        let (again, _) = DemoOptions::read_file(&copy).expect("printed file reads");
        assert_eq!(again.wait, Some(Duration::from_secs(9)), "{printed}");
        assert_eq!(again.place, merged.place, "{printed}");
        assert!(printed.contains("wait = \"9s\""), "{printed}");
    }

    /// Every flag of hub and agent is a key of their files under the same name, and its
    /// variable is `RNA_` and the key in capitals: the three spellings come from one name.
    #[test]
    fn every_flag_is_a_file_key_and_an_rna_variable() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        enum Cli {
            Hub(Box<HubOptions>),
            Agent(Box<AgentOptions>),
        }
        let command = Cli::command();
        for (name, keys) in [
            ("hub", accepted_keys::<HubFile>()),
            ("agent", accepted_keys::<AgentFile>()),
        ] {
            let sub = command.find_subcommand(name).expect("subcommand");
            let flags: Vec<_> = sub
                .get_arguments()
                .filter_map(|a| a.get_long().map(|l| (l, a.get_env())))
                .filter(|(l, _)| *l != "help")
                .collect();
            assert!(flags.len() > 20, "{flags:?}");
            for (flag, env) in &flags {
                let key = flag.replace('-', "_");
                assert!(keys.contains(&key), "{name}: --{flag} is no file key");
                let env = env.and_then(|e| e.to_str()).unwrap_or_default();
                assert_eq!(
                    env,
                    format!("RNA_{}", key.to_uppercase()),
                    "{name} --{flag}"
                );
            }
            // The file has the flags and the two log keys (global flags of every command).
            assert_eq!(keys.len(), flags.len() + 2, "{name}: {keys:?}");
        }
    }

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
        let err = AgentOptions::parse_file(text, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "agent.toml: hub: invalid type: integer `2`, expected a string (line 4)"
        );
        // A broken document names no key: there is none to name.
        let err = AgentOptions::parse_file("hub = [\n", Path::new("agent.toml"))
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
        let (hub, _) = HubOptions::parse_file(
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
        let (agent, _) = AgentOptions::parse_file(
            "max_pending_dials = 5\nmax_frame = 1024\ncongestion = \"bbr\"\n",
            Path::new("agent.toml"),
        )
        .unwrap();
        assert_eq!(agent.max_pending_dials, Some(5));
        assert_eq!(agent.max_frame, Some(1024));
        assert_eq!(agent.congestion, Some(Congestion::Bbr));
        let err = AgentOptions::parse_file("congestion = \"reno\"\n", Path::new("agent.toml"))
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
        let err = HubOptions::parse_file("stream_idle_timeout = \"soon\"\n", Path::new("hub.toml"))
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
        let (from_file, _) = HubOptions::read_file(&file).unwrap();
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
        let (options, log) = HubOptions::read_file(&hub).expect("examples/hub.toml parses");
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
        let (options, _) = AgentOptions::read_file(&agent).expect("examples/agent.toml parses");
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
