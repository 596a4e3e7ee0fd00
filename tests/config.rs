//! Configuration from flags, `RNA_*` variables and TOML files: precedence, and the exact
//! message of every error path. Runs the real binary with `--check-config`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RNA: &str = env!("CARGO_BIN_EXE_rna");

/// A folder with a CA, hub and agent certificates, a token store and a token file.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        rna::certs::init_dir(dir.path(), &["127.0.0.1".to_string()], false).expect("certs");
        rna::certs::issue_agent_files(dir.path(), "edge", false).expect("agent cert");
        std::fs::write(dir.path().join("tokens.toml"), "").expect("tokens");
        std::fs::write(dir.path().join("token.txt"), "rna_secret_token_value\n").expect("token");
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    /// A hub file with everything required; `extra` lines are appended.
    fn hub_file(&self, extra: &str) -> PathBuf {
        self.write(
            "hub.toml",
            &format!(
                "ca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub-key.pem\"\ntokens = \"tokens.toml\"\n{extra}"
            ),
        )
    }

    fn agent_file(&self, extra: &str) -> PathBuf {
        self.write(
            "agent.toml",
            &format!(
                "name = \"edge\"\nca = \"ca.pem\"\ncert = \"agent-edge.pem\"\nkey = \"agent-edge-key.pem\"\ntoken_file = \"token.txt\"\n{extra}"
            ),
        )
    }
}

fn rna(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(RNA);
    cmd.args(args).env("RNA_LOG_FORMAT", "text");
    // Nothing from the calling environment may leak into the precedence checks.
    for (key, _) in std::env::vars() {
        if key.starts_with("RNA_") && key != "RNA_LOG_FORMAT" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run rna")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `--check-config`, expecting success, and returns the printed configuration.
fn valid(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = args.to_vec();
    all.push("--check-config");
    let out = rna(&all, env);
    assert!(out.status.success(), "{:?}: {}", args, stderr(&out));
    stdout(&out)
}

/// Runs `--check-config`, expecting the usage exit code, and returns stderr's first line.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = args.to_vec();
    all.push("--check-config");
    let out = rna(&all, env);
    assert_eq!(out.status.code(), Some(2), "{:?}: {}", args, stdout(&out));
    stderr(&out).lines().next().unwrap_or_default().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn flags_win_over_environment_over_file_over_defaults() {
    let setup = Setup::new();
    let bare = setup.hub_file("");
    let out = valid(&["hub", "--config", s(&bare)], &[]);
    assert!(
        out.contains("listen: 0.0.0.0:4433"),
        "default listen: {out}"
    );
    assert!(out.contains("grace: 30s"), "default grace: {out}");

    let file = setup.hub_file("listen = \"127.0.0.1:5001\"\ngrace = \"7s\"\n");
    let out = valid(&["hub", "--config", s(&file)], &[]);
    assert!(out.contains("listen: 127.0.0.1:5001"), "file: {out}");
    assert!(out.contains("grace: 7s"), "file: {out}");

    let env = [("RNA_LISTEN", "127.0.0.1:5002")];
    let out = valid(&["hub", "--config", s(&file)], &env);
    assert!(
        out.contains("listen: 127.0.0.1:5002"),
        "env over file: {out}"
    );
    assert!(
        out.contains("grace: 7s"),
        "file still used for the rest: {out}"
    );

    let out = valid(
        &["hub", "--config", s(&file), "--listen", "127.0.0.1:5003"],
        &env,
    );
    assert!(
        out.contains("listen: 127.0.0.1:5003"),
        "flag over env: {out}"
    );

    // The file itself may come from the environment.
    let out = valid(&["hub"], &[("RNA_CONFIG", s(&file))]);
    assert!(out.contains("listen: 127.0.0.1:5001"), "RNA_CONFIG: {out}");
}

#[test]
fn agent_lists_come_whole_from_one_source_and_secrets_are_masked() {
    let setup = Setup::new();
    let file = setup.agent_file(
        "hub = [\"hub-a.example:4433\", \"hub-b.example:4433\"]\nallow = [\"10.0.0.0/8\", \"jenkins.internal:8080\"]\nmetrics = \"off\"\n",
    );
    let out = valid(&["agent", "--config", s(&file)], &[]);
    assert!(out.contains("hub-b.example"), "{out}");
    assert!(out.contains("jenkins.internal"), "{out}");
    assert!(out.contains("metrics: Off"), "{out}");
    assert!(
        !out.contains("rna_secret_token_value"),
        "the token is masked: {out}"
    );

    let out = valid(
        &["agent", "--config", s(&file), "--allow", "192.168.0.0/16"],
        &[("RNA_HUB", "hub-c.example:4433")],
    );
    assert!(
        out.contains("hub-c.example") && !out.contains("hub-a.example"),
        "{out}"
    );
    assert!(
        out.contains("192.168.0.0") && !out.contains("jenkins.internal"),
        "{out}"
    );
}

#[test]
fn unknown_key_names_file_key_and_line() {
    let setup = Setup::new();
    let file = setup.hub_file("lisen = \"0.0.0.0:4433\"\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: lisen: unknown key (did you mean `listen`?) (line 5)",
            s(&file)
        )
    );
    let file = setup.agent_file("[tls]\nverify = false\n");
    assert_eq!(
        refused(&["agent", "--config", s(&file)], &[]),
        format!("rna: {}: tls: unknown key (line 6)", s(&file))
    );
}

#[test]
fn bad_values_name_file_and_key() {
    let setup = Setup::new();
    let file = setup.agent_file("hub = [\"hub.example:4433\", \"x:y\"]\n");
    assert_eq!(
        refused(&["agent", "--config", s(&file)], &[]),
        format!(
            "rna: {}: hub[1]: invalid hub address \"x:y\": expected host:port",
            s(&file)
        )
    );
    let file = setup.hub_file("socks = \"localhost\"\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: socks: invalid address \"localhost\": expected ip:port",
            s(&file)
        )
    );
    let file = setup.hub_file("grace = \"soon\"\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: grace: invalid duration \"soon\": expected a number with a unit ms, s, m, h or d (e.g. 10s)",
            s(&file)
        )
    );
    let file = setup.hub_file("grace = 30\n");
    let line = refused(&["hub", "--config", s(&file)], &[]);
    assert!(
        line.starts_with(&format!(
            "rna: {}: invalid type: integer `30`, expected a string",
            s(&file)
        )),
        "{line}"
    );
    let file = setup.hub_file("heartbeat_interval = \"20s\"\nheartbeat_timeout = \"10s\"\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: heartbeat_timeout: 10s must be longer than heartbeat_interval 20s",
            s(&file)
        )
    );
    // A flag's bad value is clap's to report, naming the flag.
    let out = rna(&["hub", "--listen", "nowhere", "--check-config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid value 'nowhere' for '--listen <LISTEN>'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_files_name_what_is_missing() {
    let setup = Setup::new();
    let nowhere = setup.path("nowhere.toml");
    assert_eq!(
        refused(&["hub", "--config", s(&nowhere)], &[]),
        format!(
            "rna: {}: cannot read: No such file or directory (os error 2)",
            s(&nowhere)
        )
    );
    let file = setup.write("hub.toml", "ca = \"ca.pem\"\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        "rna: missing cert: give --cert, RNA_CERT or `cert` in the config file"
    );
    let file = setup.agent_file("hub = [\"127.0.0.1:4433\"]\ntoken_file = \"none.txt\"\n");
    // The file names token_file twice: TOML refuses the duplicate key.
    let line = refused(&["agent", "--config", s(&file)], &[]);
    assert!(line.contains("duplicate key"), "{line}");
    std::fs::remove_file(setup.path("token.txt")).expect("remove token");
    let file = setup.agent_file("hub = [\"127.0.0.1:4433\"]\n");
    assert_eq!(
        refused(&["agent", "--config", s(&file)], &[]),
        format!(
            "rna: {}: token_file: {}: No such file or directory (os error 2)",
            s(&file),
            s(&setup.path("token.txt"))
        )
    );
}

#[test]
fn unreadable_keys_name_the_key_and_where_it_was_given() {
    let setup = Setup::new();
    // Not a key at all.
    let bogus = setup.write("bogus-key.pem", "this is not PEM\n");
    let file = setup.hub_file("");
    let text = std::fs::read_to_string(&file)
        .expect("read")
        .replace("hub-key.pem", "bogus-key.pem");
    std::fs::write(&file, text).expect("write");
    let line = refused(&["hub", "--config", s(&file)], &[]);
    assert_eq!(
        line,
        format!(
            "rna: {}: key: {}: no private key (-----BEGIN PRIVATE KEY-----) found",
            s(&file),
            s(&bogus)
        )
    );
    // A folder where a file should be, given by a flag: the error says "command line".
    let folder = setup.path("keys.d");
    std::fs::create_dir(&folder).expect("mkdir");
    let line = refused(
        &[
            "hub",
            "--config",
            s(&setup.hub_file("")),
            "--key",
            s(&folder),
        ],
        &[],
    );
    assert_eq!(
        line,
        format!(
            "rna: command line: key: cannot read or write {}: Is a directory (os error 21)",
            s(&folder)
        )
    );
    // A certificate file holding a key.
    let line = refused(
        &[
            "agent",
            "--config",
            s(&setup.agent_file("hub = [\"127.0.0.1:4433\"]\n")),
            "--cert",
            s(&setup.path("agent-edge-key.pem")),
        ],
        &[],
    );
    assert!(
        line.starts_with("rna: command line: cert: ") && line.contains("agent-edge-key.pem"),
        "{line}"
    );
}

#[test]
fn worker_threads_come_from_flag_env_or_file_and_are_checked() {
    let setup = Setup::new();
    let default = rna::runtime::default_worker_threads();
    let bare = setup.hub_file("");
    let out = valid(&["hub", "--config", s(&bare)], &[]);
    assert!(
        out.contains(&format!("worker_threads: {default},")),
        "default: {out}"
    );
    let file = setup.hub_file("worker_threads = 3\n");
    let out = valid(&["hub", "--config", s(&file)], &[]);
    assert!(out.contains("worker_threads: 3,"), "file: {out}");
    let env = [("RNA_WORKER_THREADS", "5")];
    let out = valid(&["hub", "--config", s(&file)], &env);
    assert!(out.contains("worker_threads: 5,"), "env over file: {out}");
    let out = valid(
        &["hub", "--config", s(&file), "--worker-threads", "2"],
        &env,
    );
    assert!(out.contains("worker_threads: 2,"), "flag over env: {out}");

    let agent = setup.agent_file("hub = [\"hub.example:4433\"]\nworker_threads = 4\n");
    let out = valid(&["agent", "--config", s(&agent)], &[]);
    assert!(out.contains("worker_threads: 4,"), "agent file: {out}");
    let agent = setup.agent_file("hub = [\"hub.example:4433\"]\nworker_threads = 0\n");
    assert_eq!(
        refused(&["agent", "--config", s(&agent)], &[]),
        format!(
            "rna: {}: worker_threads: 0 must be between 1 and 1024",
            s(&agent)
        )
    );
    assert_eq!(
        refused(
            &["hub", "--config", s(&bare), "--worker-threads", "2000"],
            &[]
        ),
        "rna: command line: worker_threads: 2000 must be between 1 and 1024"
    );
}

#[test]
fn session_and_inventory_caps_come_from_flag_or_file_and_are_checked() {
    let setup = Setup::new();
    let file = setup.hub_file(
        "max_sessions_per_agent = 7\nmax_sessions_per_token = 70\ninventory_interval = \"2s\"\n\
         max_heavy_requests_per_tenant = 3\n",
    );
    let out = valid(&["hub", "--config", s(&file)], &[]);
    for want in [
        "sessions_per_agent: 7,",
        "sessions_per_token: 70,",
        "inventory_interval: 2s,",
        "heavy_requests_per_tenant: 3,",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    let out = valid(
        &["hub", "--config", s(&file), "--max-sessions-per-agent", "2"],
        &[],
    );
    assert!(
        out.contains("sessions_per_agent: 2,"),
        "flag over file: {out}"
    );
    let file = setup.hub_file("inventory_interval = \"30s\"\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: inventory_interval: 30s is longer than 20s",
            s(&file)
        )
    );
    let file = setup.hub_file("max_sessions_per_token = 0\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: max_sessions_per_token: must be at least 1",
            s(&file)
        )
    );
}
