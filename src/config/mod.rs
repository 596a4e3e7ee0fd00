//! Hub and agent configuration: flags, `RNA_*` variables and TOML files become one validated
//! configuration, exactly once. Precedence: flags > environment > file > defaults.
//!
//! Flags and variables arrive as [`HubOptions`] / [`AgentOptions`] (clap fills them; a field
//! is `None` when neither was given). A file is read into the same types, every value checked
//! with an error that names the file and the key (`agent.toml: hub[1]: invalid hub address
//! "x:y"`). The two are merged field by field, defaults fill the rest, and the result is
//! turned into the library's [`HubConfig`](crate::hub::HubConfig) /
//! [`AgentConfig`](crate::agent::AgentConfig) with every file they name read.
//!
//! A new key is one entry in its command's list (`hub.rs` or `agent.rs`): `settings.rs` makes
//! its flag, variable, file key, merge and printed form, `file.rs` reads it from files.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::transport::tls::TlsError;

// The key machinery comes first: its macros are used by the two lists after it.
#[macro_use]
mod settings;
mod agent;
mod file;
mod hub;

pub use agent::{
    agent_file_text, agent_settings, kube_settings, AgentOptions, AgentSettings, MetricsListen,
    DEFAULT_AGENT_METRICS,
};
pub use file::{parse_agent_file, parse_hub_file};
pub use hub::{hub_config, hub_file_text, load_issuers, HubOptions};
use settings::Options;

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

/// A required value: `value`, or the error that names its key, flag and variable.
fn required<T: Clone>(
    value: &Option<T>,
    key: &'static str,
    flag: &'static str,
    env: &'static str,
) -> Result<T, ConfigError> {
    value.clone().ok_or(ConfigError::Missing { key, flag, env })
}

/// The TLS files hub and agent both name, each required: the CA, the certificate chain and
/// its key.
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    /// The three paths, or the first one missing (in the order ca, cert, key).
    fn required(
        ca: &Option<PathBuf>,
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
    ) -> Result<TlsFiles, ConfigError> {
        Ok(TlsFiles {
            ca: required(ca, "ca", "ca", "CA")?,
            cert: required(cert, "cert", "cert", "CERT")?,
            key: required(key, "key", "key", "KEY")?,
        })
    }

    /// Reads the files with `load` (`ServerTls::load` or `ClientTls::load`), then runs
    /// `check`: a key of another certificate, or a certificate of another CA, would only
    /// fail at the first handshake, so it is refused now, in `--check-config` too.
    fn load<T>(
        &self,
        sources: &Sources,
        load: fn(&Path, &Path, &Path) -> Result<T, TlsError>,
        check: fn(&T) -> Result<(), TlsError>,
    ) -> Result<T, ConfigError> {
        let tls = load(&self.ca, &self.cert, &self.key).map_err(|e| self.error(sources, e))?;
        check(&tls).map_err(|e| self.error(sources, e))?;
        Ok(tls)
    }

    /// A TLS loading or checking error, reported under the key whose file failed (`ca`,
    /// `cert` or `key`), found by the path the error names; a key that is not the
    /// certificate's is reported under `key`, other failures (a certificate the CA did not
    /// issue) under `cert`, each with the files involved.
    fn error(&self, sources: &Sources, e: TlsError) -> ConfigError {
        use crate::certs::CertError;
        match &e {
            TlsError::KeyMismatch => {
                return sources.invalid(
                    "key",
                    format!(
                        "{}: not the key of the certificate {}",
                        self.key.display(),
                        self.cert.display()
                    ),
                )
            }
            TlsError::NotIssuedByCa(reason) => {
                return sources.invalid(
                    "cert",
                    format!(
                        "{}: not a certificate of the CA {}: {reason}",
                        self.cert.display(),
                        self.ca.display()
                    ),
                )
            }
            _ => {}
        }
        let failed = match &e {
            TlsError::Cert(CertError::Io { path, .. } | CertError::Pem { path, .. }) => Some(path),
            _ => None,
        };
        let files = [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)];
        let key = files
            .iter()
            .find(|(_, file)| failed == Some(*file))
            .map_or("cert", |(key, _)| key);
        sources.invalid(key, crate::fsutil::error_chain(&e))
    }
}

/// A file struct as TOML, for `--check-config`.
fn to_toml<T: Serialize>(file: &T) -> Result<String, ConfigError> {
    toml::to_string(file).map_err(|e| ConfigError::Print(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::agent::AgentFile;
    use super::hub::{inventory_interval, HubFile};
    use super::settings::{at_least_one, frame_size};
    use super::*;
    use crate::agent::kube::KubeSource;
    use crate::transport::Congestion;

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

        reads_back_as_printed(
            &dir.join("hub.toml"),
            "ca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub-key.pem\"\n\
             tokens = \"tokens.toml\"\ngrace = 45\nheartbeat_interval = \"1500ms\"\n\
             socks_no_auth = \"edge@acme/prod\"\nmax_frame = 2048\ncongestion = \"bbr\"\n\
             state_dir = \"state\"\nmetrics_per_agent = true\n",
            merge_hub,
            hub_config,
            hub_file_text,
        );
        let printed = reads_back_as_printed(
            &dir.join("agent.toml"),
            "hub = [\"hub.example\", \"[::1]:5000\"]\nname = \"edge\"\nca = \"ca.pem\"\n\
             cert = \"agent-edge.pem\"\nkey = \"agent-edge-key.pem\"\n\
             token_file = \"token.txt\"\nallow = [\"10.0.0.0/8\", \"*.svc.local:443\"]\n\
             deny = [\"10.9.0.0/16\"]\ndial_timeout = 3\nmetrics = \"off\"\n\
             kubeconfig = \"kubeconfig\"\nkube_context = \"prod\"\n\
             kube_namespace = [\"shop\"]\nkube_resource = [\"deployments.apps\"]\n\
             kube_inventory_interval = \"90s\"\nserver_name = \"hub.example\"\n",
            merge_agent,
            agent_settings,
            agent_file_text,
        );
        assert!(!printed.contains("rna_x"), "{printed}");
    }

    /// Writes `text` to `file`, prints the configuration it gives beside it and reads that
    /// back: the same validated configuration and the same printed text. Returns the text.
    fn reads_back_as_printed<O: Default + Clone, C: fmt::Debug>(
        file: &Path,
        text: &str,
        merge: impl Fn(Option<&Path>, O, LogOptions) -> Result<(O, LogOptions, Sources), ConfigError>,
        validate: impl Fn(O, &Sources) -> Result<C, ConfigError>,
        print: impl Fn(&O, &C, &LogOptions) -> Result<String, ConfigError>,
    ) -> String {
        std::fs::write(file, text).unwrap();
        let (options, log, sources) =
            merge(Some(file), O::default(), LogOptions::default()).unwrap();
        let config = validate(options.clone(), &sources).unwrap();
        let printed = print(&options, &config, &log).unwrap();
        let copy = file.with_extension("printed.toml");
        std::fs::write(&copy, &printed).unwrap();
        let (again, log_again, sources) =
            merge(Some(&copy), O::default(), LogOptions::default()).unwrap();
        let reread = validate(again.clone(), &sources).unwrap();
        assert_eq!(format!("{config:?}"), format!("{reread:?}"));
        assert_eq!(print(&again, &reread, &log_again).unwrap(), printed);
        printed
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
             retry_threshold = 0\ntls_timeout = \"2s\"\nhello_timeout = \"3s\"\n\
             handshake_wait = \"0s\"\nsocks_early_reply = \"60s\"\n",
            Path::new("hub.toml"),
        )
        .unwrap();
        // Zero is a handshake wait of its own (refuse at once); elsewhere it is refused.
        assert_eq!(hub.handshake_wait, Some(Duration::ZERO));
        assert_eq!(
            hub.socks_early_reply,
            Some(crate::hub::EarlyReply::Within(Duration::from_secs(60)))
        );
        let err = HubOptions::parse_file("tls_timeout = \"0s\"\n", Path::new("hub.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be greater than zero"), "{err}");
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
        documents_every_key(&hub, accepted_keys::<HubFile>(), 15);

        let agent = example("agent.toml");
        let (options, _) = AgentOptions::read_file(&agent).expect("examples/agent.toml parses");
        assert_eq!(options.allow.len(), 3);
        documents_every_key(&agent, accepted_keys::<AgentFile>(), 12);
    }

    /// `file` sets each of `keys` (more than `fewest` of them, so a broken key list cannot
    /// pass unnoticed).
    fn documents_every_key(file: &Path, keys: Vec<String>, fewest: usize) {
        let text = std::fs::read_to_string(file).expect("read example");
        assert!(keys.len() > fewest, "{keys:?}");
        for key in keys {
            assert!(
                text.contains(&format!("{key} = ")),
                "examples/{} lacks {key}",
                file.file_name().unwrap_or_default().to_string_lossy()
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
