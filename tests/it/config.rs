//! Configuration from flags, `RNA_*` variables and TOML files: precedence, and the exact
//! message of every error path. Runs the real binary with `--check-config`.

use std::path::{Path, PathBuf};

use crate::common::{Ran, Rna};

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

/// `rna ARGS` with `env` and nothing of the calling environment's `RNA_*` variables, which
/// must not leak into the precedence checks.
fn rna(args: &[&str], env: &[(&str, &str)]) -> Ran {
    Rna::new(args).envs(env).run()
}

fn stdout(o: &Ran) -> String {
    o.stdout.clone()
}

fn stderr(o: &Ran) -> String {
    o.stderr.clone()
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

/// `--check-config` output read as the TOML file it is.
fn table(out: &str) -> toml::Table {
    out.parse()
        .unwrap_or_else(|e| panic!("--check-config output is not TOML: {e}\n{out}"))
}

/// A string key of printed output.
fn key<'a>(t: &'a toml::Table, name: &str) -> &'a str {
    t.get(name)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("no string {name} in {t:?}"))
}

/// A list key of printed output, as strings.
fn list(t: &toml::Table, name: &str) -> Vec<String> {
    t.get(name)
        .and_then(|v| v.as_array())
        .unwrap_or_else(|| panic!("no list {name} in {t:?}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn flags_win_over_environment_over_file_over_defaults() {
    let setup = Setup::new();
    let bare = setup.hub_file("");
    let out = table(&valid(&["hub", "--config", s(&bare)], &[]));
    assert_eq!(key(&out, "listen"), "0.0.0.0:4433", "default listen");
    assert_eq!(key(&out, "grace"), "30s", "default grace");

    let file = setup.hub_file("listen = \"127.0.0.1:5001\"\ngrace = \"7s\"\n");
    let out = table(&valid(&["hub", "--config", s(&file)], &[]));
    assert_eq!(key(&out, "listen"), "127.0.0.1:5001", "file");
    assert_eq!(key(&out, "grace"), "7s", "file");

    let env = [("RNA_LISTEN", "127.0.0.1:5002")];
    let out = table(&valid(&["hub", "--config", s(&file)], &env));
    assert_eq!(key(&out, "listen"), "127.0.0.1:5002", "env over file");
    assert_eq!(key(&out, "grace"), "7s", "file still used for the rest");

    let out = table(&valid(
        &["hub", "--config", s(&file), "--listen", "127.0.0.1:5003"],
        &env,
    ));
    assert_eq!(key(&out, "listen"), "127.0.0.1:5003", "flag over env");

    // The file itself may come from the environment.
    let out = table(&valid(&["hub"], &[("RNA_CONFIG", s(&file))]));
    assert_eq!(key(&out, "listen"), "127.0.0.1:5001", "RNA_CONFIG");
}

#[test]
fn agent_lists_come_whole_from_one_source_and_secrets_are_masked() {
    let setup = Setup::new();
    let file = setup.agent_file(
        "hub = [\"hub-a.example:4433\", \"hub-b.example:4433\"]\nallow = [\"10.0.0.0/8\", \"jenkins.internal:8080\"]\nmetrics = \"off\"\n",
    );
    let text = valid(&["agent", "--config", s(&file)], &[]);
    let out = table(&text);
    assert_eq!(
        list(&out, "hub"),
        ["hub-a.example:4433", "hub-b.example:4433"]
    );
    assert_eq!(list(&out, "allow"), ["10.0.0.0/8", "jenkins.internal:8080"]);
    assert_eq!(key(&out, "metrics"), "off");
    assert!(
        !text.contains("rna_secret_token_value") && !text.contains("PRIVATE KEY"),
        "secrets appear only as paths: {text}"
    );
    assert_eq!(key(&out, "token_file"), s(&setup.path("token.txt")));

    let out = table(&valid(
        &["agent", "--config", s(&file), "--allow", "192.168.0.0/16"],
        &[("RNA_HUB", "hub-c.example:4433")],
    ));
    assert_eq!(list(&out, "hub"), ["hub-c.example:4433"]);
    assert_eq!(list(&out, "allow"), ["192.168.0.0/16"]);
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
            "rna: {}: hub[1]: invalid hub address \"x:y\": expected host or host:port",
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
    // A value of the wrong type names its key and line.
    let file = setup.agent_file("hub = \"127.0.0.1:4433\"\n");
    assert_eq!(
        refused(&["agent", "--config", s(&file)], &[]),
        format!(
            "rna: {}: hub: invalid type: string \"127.0.0.1:4433\", expected a sequence (line 6)",
            s(&file)
        )
    );
    let file = setup.hub_file("max_handshakes = \"many\"\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: max_handshakes: invalid type: string \"many\", expected usize (line 5)",
            s(&file)
        )
    );
    // A duration is a string with a unit or a whole number of seconds, nothing else.
    let file = setup.hub_file("grace = 1.5\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: grace: invalid type: floating point `1.5`, expected a duration: a number of seconds or a string such as \"10s\" (line 5)",
            s(&file)
        )
    );
    let file = setup.hub_file("grace = -1\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: grace: invalid duration \"-1\": expected a number with a unit ms, s, m, h or d (e.g. 10s)",
            s(&file)
        )
    );
    let file = setup.hub_file("grace = 0\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: grace: invalid duration \"0\": must be greater than zero",
            s(&file)
        )
    );
    let file = setup.hub_file("heartbeat_interval = \"20s\"\nheartbeat_timeout = \"10s\"\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: heartbeat_timeout: 10s must be longer than heartbeat_interval 20s",
            s(&file)
        )
    );
    // The paced interval's floor above its ceiling, and a budget of no pings at all.
    let file = setup.hub_file("heartbeat_interval = \"1s\"\nheartbeat_min = \"2s\"\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!(
            "rna: {}: heartbeat_min: 2s must not be longer than heartbeat_interval 1s",
            s(&file)
        )
    );
    let file = setup.hub_file("heartbeat_rate = 0\n");
    assert_eq!(
        refused(&["hub", "--config", s(&file)], &[]),
        format!("rna: {}: heartbeat_rate: must be at least 1", s(&file))
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
            "rna: command line: key: cannot read or write {}: is a folder, not a regular file; \
             give the path of a file",
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
    let threads = |out: &str| {
        table(out)
            .get("worker_threads")
            .and_then(|v| v.as_integer())
    };
    let out = valid(&["hub", "--config", s(&bare)], &[]);
    assert_eq!(threads(&out), Some(default as i64), "default: {out}");
    let file = setup.hub_file("worker_threads = 3\n");
    let out = valid(&["hub", "--config", s(&file)], &[]);
    assert_eq!(threads(&out), Some(3), "file: {out}");
    let env = [("RNA_WORKER_THREADS", "5")];
    let out = valid(&["hub", "--config", s(&file)], &env);
    assert_eq!(threads(&out), Some(5), "env over file: {out}");
    let out = valid(
        &["hub", "--config", s(&file), "--worker-threads", "2"],
        &env,
    );
    assert_eq!(threads(&out), Some(2), "flag over env: {out}");

    let agent = setup.agent_file("hub = [\"hub.example:4433\"]\nworker_threads = 4\n");
    let out = valid(&["agent", "--config", s(&agent)], &[]);
    assert_eq!(threads(&out), Some(4), "agent file: {out}");
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

/// `--check-config` output for `args`, written to `name` in a fresh folder and checked again
/// as a config file: the second run must print exactly the same keys and values.
fn reads_back_the_same(setup: &Setup, command: &str, args: &[&str], name: &str) -> toml::Table {
    let mut all = vec![command];
    all.extend_from_slice(args);
    let first = valid(&all, &[]);
    // Another folder: printed paths must not depend on where the file is.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let copy = elsewhere.path().join(name);
    std::fs::write(&copy, &first).expect("write printed file");
    let second = valid(&[command, "--config", s(&copy)], &[]);
    let body = |out: &str| out.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&first), body(&second), "{command} output read back");
    assert!(!first.contains(&setup.dir.path().join("nothing").display().to_string()));
    table(&first)
}

/// The keys of an example file, which documents every key (some as comments, `# key = …`).
fn example_keys(name: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let text = std::fs::read_to_string(path).expect("read example");
    let mut keys: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim_start_matches(['#', ' ']).split_once(" = "))
        .map(|(k, _)| k.to_string())
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[test]
fn check_config_prints_the_configuration_in_force_as_a_file_that_reads_back_the_same() {
    let setup = Setup::new();
    // Every key set, defaults left to the program where a file leaves them out.
    let hub = setup.hub_file(
        "listen = \"127.0.0.1:5001\"\nsocks_no_auth = \"edge@acme/prod\"\ngrace = 45\n\
         state_dir = \"state\"\nlog_format = \"text\"\nlog_level = \"info\"\n\
         congestion = \"bbr\"\nmax_frame = 2048\noidc_issuers_file = \"issuers.toml\"\n",
    );
    setup.write(
        "issuers.toml",
        "[[oidc_issuer]]\nurl = \"https://issuer.example\"\naudiences = [\"rna\"]\n\
         tenant_claim = \"rna_tenant\"\n",
    );
    let out = reads_back_the_same(&setup, "hub", &["--config", s(&hub)], "hub.toml");
    let mut keys: Vec<String> = out.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, example_keys("hub.toml"), "every hub key is printed");
    assert_eq!(key(&out, "grace"), "45s");
    assert_eq!(
        key(&out, "heartbeat_interval"),
        "10s",
        "defaults are printed"
    );
    assert_eq!(
        key(&out, "key"),
        s(&setup.path("hub-key.pem")),
        "paths only"
    );
    assert_eq!(key(&out, "state_dir"), s(&setup.path("state")));
    assert_eq!(
        key(&out, "oidc_issuers_file"),
        s(&setup.path("issuers.toml"))
    );

    std::fs::write(setup.path("kubeconfig"), "apiVersion: v1\nkind: Config\n").expect("write");
    let agent = setup.agent_file(
        "hub = [\"hub-a.example\", \"[::1]:5000\"]\nserver_name = \"hub.example\"\n\
         state_dir = \"agent-state\"\n\
         allow = [\"10.0.0.0/8\", \"jenkins.internal:8080\"]\ndeny = [\"10.9.0.0/16\"]\n\
         dial_timeout = \"500ms\"\nmetrics = \"127.0.0.1:0\"\nkubeconfig = \"kubeconfig\"\n\
         kube_context = \"prod\"\nkube_namespace = [\"shop\"]\n\
         kube_resource = [\"deployments.apps\"]\nkube_inventory_interval = 90\n\
         log_format = \"json\"\nlog_level = \"debug\"\nproxy = \"http://proxy.example:3128\"\n\
         bind_address = \"192.0.2.10\"\n",
    );
    let out = reads_back_the_same(&setup, "agent", &["--config", s(&agent)], "agent.toml");
    assert_eq!(key(&out, "proxy"), "http://proxy.example:3128");
    assert_eq!(key(&out, "bind_address"), "192.0.2.10");
    let mut keys: Vec<String> = out.keys().cloned().collect();
    keys.sort();
    // The oidc_* keys replace token_file, so this file cannot hold them: they are printed by
    // agent_oidc_client_credentials_are_checked_and_printed.
    let examples: Vec<String> = example_keys("agent.toml")
        .into_iter()
        .filter(|k| !k.starts_with("oidc_"))
        .collect();
    assert_eq!(keys, examples, "every agent key is printed");
    assert_eq!(list(&out, "hub"), ["hub-a.example:4433", "[::1]:5000"]);
    assert_eq!(key(&out, "dial_timeout"), "500ms");
    assert_eq!(key(&out, "kube_inventory_interval"), "90s");
    assert_eq!(key(&out, "kubeconfig"), s(&setup.path("kubeconfig")));
    assert_eq!(list(&out, "kube_resource"), ["deployments.apps"]);

    // The command line's values are printed too, and read back the same.
    let out = reads_back_the_same(
        &setup,
        "agent",
        &[
            "--hub",
            "hub.example",
            "--name",
            "edge",
            "--ca",
            s(&setup.path("ca.pem")),
            "--cert",
            s(&setup.path("agent-edge.pem")),
            "--key",
            s(&setup.path("agent-edge-key.pem")),
            "--token-file",
            s(&setup.path("token.txt")),
        ],
        "agent.toml",
    );
    assert_eq!(key(&out, "metrics"), "127.0.0.1:4434", "the default");
    assert_eq!(out.get("kubernetes").and_then(|v| v.as_bool()), Some(false));
}

#[test]
fn every_duration_key_takes_a_bare_number_of_seconds() {
    let setup = Setup::new();
    for (command, example) in [("hub", "hub.toml"), ("agent", "agent.toml")] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(example);
        let text = std::fs::read_to_string(path).expect("read example");
        // Keys set or shown commented out (`# kube_timeout = "60s"`) with a duration.
        let mut durations: Vec<String> = text
            .lines()
            .filter_map(|l| l.trim_start_matches(['#', ' ']).split_once(" = "))
            .filter(|(_, value)| {
                format!("v = {value}")
                    .parse::<toml::Table>()
                    .ok()
                    .and_then(|t| t.get("v").and_then(|v| v.as_str().map(str::to_string)))
                    .is_some_and(|d| rna::config::parse_duration(&d).is_ok())
            })
            .map(|(k, _)| k.to_string())
            .collect();
        durations.sort();
        durations.dedup();
        let least = if command == "hub" { 8 } else { 2 };
        assert!(durations.len() >= least, "{example}: {durations:?}");
        // Rising values in key order, so heartbeat_timeout stays above heartbeat_interval,
        // with heartbeat_min first, so it stays below it; small enough for every upper bound
        // (inventory_interval: 20 s).
        if let Some(at) = durations.iter().position(|k| k == "heartbeat_min") {
            let min = durations.remove(at);
            durations.insert(0, min);
        }
        let seconds = |i: usize| i + 1;
        let lines: String = durations
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} = {}\n", seconds(i)))
            .collect();
        let file = if command == "hub" {
            setup.hub_file(&lines)
        } else {
            setup.agent_file(&format!(
                "hub = [\"hub.example\"]\nkubernetes = true\nkubeconfig = \"kubeconfig\"\n{lines}"
            ))
        };
        std::fs::write(setup.path("kubeconfig"), "apiVersion: v1\nkind: Config\n").expect("write");
        let out = table(&valid(&[command, "--config", s(&file)], &[]));
        for (i, k) in durations.iter().enumerate() {
            let want =
                rna::config::format_duration(std::time::Duration::from_secs(seconds(i) as u64));
            assert_eq!(key(&out, k), want, "{command} {k}");
        }
    }
}

#[test]
fn check_config_refuses_a_key_of_another_certificate_and_a_certificate_of_another_ca() {
    let setup = Setup::new();
    // Another CA, with its own hub and agent certificates.
    let other = setup.path("other");
    rna::certs::init_dir(&other, &["127.0.0.1".to_string()], false).expect("other CA");
    rna::certs::issue_agent_files(&other, "edge", false).expect("other agent");
    let other = |f: &str| s(&setup.path("other").join(f)).to_string();

    let hub = setup.hub_file("");
    assert_eq!(
        refused(
            &["hub", "--config", s(&hub), "--key", &other("hub-key.pem")],
            &[]
        ),
        format!(
            "rna: command line: key: {}: not the key of the certificate {}",
            other("hub-key.pem"),
            s(&setup.path("hub.pem"))
        )
    );
    let line = refused(
        &[
            "hub",
            "--config",
            s(&hub),
            "--cert",
            &other("hub.pem"),
            "--key",
            &other("hub-key.pem"),
        ],
        &[],
    );
    assert!(
        line.starts_with(&format!(
            "rna: command line: cert: {}: not a certificate of the CA {}: ",
            other("hub.pem"),
            s(&setup.path("ca.pem"))
        )),
        "{line}"
    );
    // An agent certificate is not a hub certificate, even from the right CA.
    let line = refused(
        &[
            "hub",
            "--config",
            s(&hub),
            "--cert",
            s(&setup.path("agent-edge.pem")),
            "--key",
            s(&setup.path("agent-edge-key.pem")),
        ],
        &[],
    );
    assert!(line.contains("not a certificate of the CA"), "{line}");

    let agent = setup.agent_file("hub = [\"hub.example\"]\n");
    assert_eq!(
        refused(
            &[
                "agent",
                "--config",
                s(&agent),
                "--key",
                &other("agent-edge-key.pem")
            ],
            &[]
        ),
        format!(
            "rna: command line: key: {}: not the key of the certificate {}",
            other("agent-edge-key.pem"),
            s(&setup.path("agent-edge.pem"))
        )
    );
    let line = refused(
        &[
            "agent",
            "--config",
            s(&agent),
            "--cert",
            &other("agent-edge.pem"),
            "--key",
            &other("agent-edge-key.pem"),
        ],
        &[],
    );
    assert!(
        line.starts_with(&format!(
            "rna: command line: cert: {}: not a certificate of the CA {}: ",
            other("agent-edge.pem"),
            s(&setup.path("ca.pem"))
        )),
        "{line}"
    );
    // The matching pairs still pass.
    valid(&["hub", "--config", s(&hub)], &[]);
    valid(&["agent", "--config", s(&agent)], &[]);
}

#[test]
fn a_hub_without_a_port_is_dialed_on_the_default_port() {
    let setup = Setup::new();
    let file = setup.agent_file("");
    let out = table(&valid(
        &[
            "agent",
            "--config",
            s(&file),
            "--hub",
            "hub.example,[::1],10.0.0.5:5000",
        ],
        &[],
    ));
    assert_eq!(
        list(&out, "hub"),
        ["hub.example:4433", "[::1]:4433", "10.0.0.5:5000"]
    );
    // The hub listens on that same port by default.
    let out = table(&valid(&["hub", "--config", s(&setup.hub_file(""))], &[]));
    assert_eq!(key(&out, "listen"), "0.0.0.0:4433");
}

#[test]
fn log_options_are_global_and_shown_once_apart_from_each_commands_flags() {
    for command in [
        &["hub"][..],
        &["agent"],
        &["dev"],
        &["token", "list"],
        &["kube"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let out = rna(&args, &[]);
        assert!(out.status.success(), "{command:?}");
        let help = stdout(&out);
        let (own, global) = help
            .split_once("\nGlobal options:\n")
            .unwrap_or_else(|| panic!("{command:?}: no Global options section:\n{help}"));
        for flag in ["--log-format", "--log-level"] {
            assert!(
                !own.contains(flag),
                "{command:?}: {flag} among its own flags"
            );
            assert_eq!(global.matches(flag).count(), 1, "{command:?}: {flag}");
        }
    }
    // Before or after the command name.
    let setup = Setup::new();
    let hub = setup.hub_file("");
    for args in [
        &["--log-format", "json", "hub", "--config", s(&hub)][..],
        &["hub", "--config", s(&hub), "--log-format", "json"],
    ] {
        let out = table(&valid(args, &[]));
        assert_eq!(key(&out, "log_format"), "json", "{args:?}");
    }
}

#[test]
fn a_token_is_revoked_by_its_id_or_by_the_whole_token() {
    let setup = Setup::new();
    let store = setup.path("store.toml");
    let create = || {
        let out = rna(
            &[
                "token",
                "create",
                "--store",
                s(&store),
                "--tenant",
                "acme/prod",
                "--scope",
                "proxy",
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_string()
    };
    let whole = create();
    let by_id = create();
    let id = |token: &str| token.split('_').nth(1).expect("id").to_string();
    for (arg, revoked) in [(whole.clone(), id(&whole)), (id(&by_id), id(&by_id))] {
        let out = rna(&["token", "revoke", "--store", s(&store), &arg], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), format!("revoked {revoked}\n"));
    }
    let listing = stdout(&rna(&["token", "list", "--store", s(&store)], &[]));
    for token in [&whole, &by_id] {
        let row = listing
            .lines()
            .find(|l| l.starts_with(&id(token)))
            .unwrap_or_else(|| panic!("{listing}"));
        assert!(row.contains("revoked"), "{row}");
    }
    // Something that looks like a token but is not one is refused, and its text not echoed.
    let out = rna(
        &[
            "token",
            "revoke",
            "--store",
            s(&store),
            "rna_0123456789ab_notasecretatall",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out).trim_end(),
        "rna: \"rna_0123456789ab\"…: not a token (rna_ followed by 12 and 48 hex digits); give the whole token or its id from `rna token list`"
    );
}

/// `rna … | head -1`: the reader is gone before anything is written. The process ends quietly
/// with success instead of panicking on the broken pipe.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let setup = Setup::new();
    let hub = setup.hub_file("");
    let store = setup.path("store.toml");
    let out = rna(
        &[
            "token",
            "create",
            "--store",
            s(&store),
            "--tenant",
            "acme/prod",
            "--scope",
            "proxy",
        ],
        &[],
    );
    assert!(out.status.success());
    for args in [
        &["hub", "--config", s(&hub), "--check-config"][..],
        &["token", "list", "--store", s(&store)],
    ] {
        let out = Rna::new(args).closed_stdout().run();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{args:?}");
    }
}

#[test]
fn admin_api_limits_come_from_flag_env_or_file_and_are_checked() {
    let setup = Setup::new();
    let bare = setup.hub_file("");
    let out = valid(&["hub", "--config", s(&bare)], &[]);
    for want in [
        "api_header_timeout = \"10s\"\n",
        "api_request_timeout = \"30s\"\n",
        "api_max_connections = 1024\n",
        "api_max_connections_per_ip = 64\n",
    ] {
        assert!(out.contains(want), "default {want}: {out}");
    }
    let file = setup.hub_file(
        "api_header_timeout = \"3s\"\napi_request_timeout = \"4s\"\napi_max_connections = 10\n\
         api_max_connections_per_ip = 2\n",
    );
    let out = valid(&["hub", "--config", s(&file)], &[]);
    for want in [
        "api_header_timeout = \"3s\"\n",
        "api_request_timeout = \"4s\"\n",
        "api_max_connections = 10\n",
        "api_max_connections_per_ip = 2\n",
    ] {
        assert!(out.contains(want), "file {want}: {out}");
    }
    let env = [
        ("RNA_API_HEADER_TIMEOUT", "5s"),
        ("RNA_API_MAX_CONNECTIONS_PER_IP", "7"),
    ];
    let out = valid(&["hub", "--config", s(&file)], &env);
    assert!(
        out.contains("api_header_timeout = \"5s\"\n"),
        "env over file: {out}"
    );
    assert!(
        out.contains("api_max_connections_per_ip = 7\n"),
        "env: {out}"
    );
    assert!(
        out.contains("api_request_timeout = \"4s\"\n"),
        "file for the rest: {out}"
    );
    let out = valid(
        &["hub", "--config", s(&file), "--api-request-timeout", "9s"],
        &env,
    );
    assert!(
        out.contains("api_request_timeout = \"9s\"\n"),
        "flag: {out}"
    );

    let zero = setup.hub_file("api_max_connections = 0\n");
    assert_eq!(
        refused(&["hub", "--config", s(&zero)], &[]),
        format!("rna: {}: api_max_connections: must be at least 1", s(&zero))
    );
    let zero = setup.hub_file("api_header_timeout = \"0s\"\n");
    assert!(refused(&["hub", "--config", s(&zero)], &[])
        .ends_with("api_header_timeout: invalid duration \"0s\": must be greater than zero"));
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
        "max_sessions_per_agent = 7\n",
        "max_sessions_per_token = 70\n",
        "inventory_interval = \"2s\"\n",
        "max_heavy_requests_per_tenant = 3\n",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    let out = valid(
        &["hub", "--config", s(&file), "--max-sessions-per-agent", "2"],
        &[],
    );
    assert!(
        out.contains("max_sessions_per_agent = 2\n"),
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

#[test]
fn the_proxy_comes_from_the_flag_or_the_environment_and_its_password_is_never_printed() {
    let setup = Setup::new();
    let agent = setup.agent_file("hub = [\"hub.example\"]\n");
    let args = ["agent", "--config", s(&agent)];
    // HTTPS_PROXY as curl reads it; the password never reaches the printed configuration.
    let out = valid(
        &args,
        &[("HTTPS_PROXY", "http://ops:s3cret-pw@proxy.internal:3128")],
    );
    assert!(!out.contains("s3cret-pw"), "{out}");
    assert!(!out.contains("ops:"), "{out}");
    assert!(out.contains("proxy.internal:3128"), "{out}");
    // The flag wins over the environment.
    let out = valid(
        &[&args[..], &["--proxy", "http://other.internal:8080"]].concat(),
        &[("HTTPS_PROXY", "http://proxy.internal:3128")],
    );
    assert!(out.contains("http://other.internal:8080"), "{out}");
    // Transport and proxy values that mean nothing are refused with the key named.
    let out = rna(
        &[
            &args[..],
            &["--proxy", "ftp://proxy.internal", "--check-config"],
        ]
        .concat(),
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("proxy: invalid proxy URL"),
        "{}",
        stderr(&out)
    );
    let out = rna(
        &[&args[..], &["--transport", "udp", "--check-config"]].concat(),
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("auto"), "{}", stderr(&out));
}

#[test]
fn check_config_names_a_bad_oidc_issuer_precisely() {
    let setup = Setup::new();
    let hub = setup.hub_file("oidc_issuers_file = \"issuers.toml\"\n");
    let issuers = setup.path("issuers.toml");
    let cases = [
        (
            "[[oidc_issuer]]\nurl = \"http://issuer.example\"\naudiences = [\"rna\"]\n\
             tenant_claim = \"t\"\n",
            "OIDC issuer \"http://issuer.example\": url must be an https URL".to_string(),
        ),
        (
            "[[oidc_issuer]]\nurl = \"https://issuer.example\"\naudiences = []\n\
             tenant_claim = \"t\"\n",
            "OIDC issuer \"https://issuer.example\": audiences must list at least one \
             non-empty audience"
                .to_string(),
        ),
        (
            "[[oidc_issuer]]\nurl = \"https://issuer.example\"\naudiences = [\"rna\"]\n\
             tenant_claim = \"t\"\ntenant = \"acme/prod\"\n",
            "OIDC issuer \"https://issuer.example\": set exactly one of tenant_claim and tenant"
                .to_string(),
        ),
        (
            "[[oidc_issuer]]\nurl = \"https://issuer.example\"\naudiences = [\"rna\"]\n\
             tenant_claim = \"t\"\nleeway = \"5m\"\n",
            "OIDC issuer \"https://issuer.example\": leeway must be at most 60s".to_string(),
        ),
        (
            "[[oidc_issuer]]\nurl = \"https://a.example\"\naudiences = [\"rna\"]\n\
             tenant = \"acme/prod\"\n[[oidc_issuer]]\nurl = \"https://a.example\"\n\
             audiences = [\"rna\"]\ntenant = \"acme/prod\"\n",
            "OIDC issuer \"https://a.example\" is listed twice".to_string(),
        ),
        (
            "[[oidc_issuer]]\nurl = \"https://issuer.example\"\naudiences = [\"rna\"]\n\
             tenant_claim = \"t\"\nalgorithms = [\"HS256\"]\n",
            "HS256".to_string(),
        ),
        (
            "[[oidc_issuers]]\nurl = \"https://issuer.example\"\n",
            "unknown field `oidc_issuers`".to_string(),
        ),
        (
            "[[oidc_issuer]]\nurl = \"https://issuer.example\"\naudiences = [\"rna\"]\n\
             tenant = \"acme/ci\"\njwks_file = \"missing.json\"\n",
            format!(
                "OIDC issuer \"https://issuer.example\": jwks_file {}: No such file",
                s(&setup.path("missing.json"))
            ),
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&issuers, text).expect("write issuers");
        let line = refused(&["hub", "--config", s(&hub)], &[]);
        let prefix = format!("rna: {}: oidc_issuers_file: {}: ", s(&hub), s(&issuers));
        assert!(line.starts_with(&prefix), "{line}");
        assert!(line.contains(&expected), "{line}\nexpected: {expected}");
    }
    // A good file passes, and so does an issuer that cannot be reached: keys are fetched by
    // the running hub, not by the check.
    std::fs::write(
        &issuers,
        "[[oidc_issuer]]\nurl = \"https://127.0.0.1:9\"\naudiences = [\"rna\"]\n\
         tenant_claim = \"rna_tenant\"\nscope_claim = \"scp\"\n",
    )
    .expect("write issuers");
    valid(&["hub", "--config", s(&hub)], &[]);
}

#[test]
fn agent_oidc_client_credentials_are_checked_and_printed() {
    let setup = Setup::new();
    setup.write("oidc-secret", "s3cr3t-client-value\n");
    setup.write("empty-secret", "\n");
    let base = |extra: &str| {
        setup.write(
            "agent-oidc.toml",
            &format!(
                "hub = [\"hub.example\"]\nname = \"edge\"\nca = \"ca.pem\"\n\
                 cert = \"agent-edge.pem\"\nkey = \"agent-edge-key.pem\"\n{extra}"
            ),
        )
    };
    // Each incomplete or contradictory combination: exit 2, the key at fault, what to do.
    let cases = [
        (
            "oidc_issuer = \"https://login.example\"\n",
            "oidc_client_id: OIDC client credentials need --oidc-client-id",
        ),
        (
            "oidc_client_id = \"edge\"\noidc_issuer = \"https://login.example\"\n",
            "oidc_client_secret_file: --oidc-client-id needs --oidc-client-secret-file",
        ),
        (
            "oidc_client_id = \"edge\"\noidc_client_secret_file = \"oidc-secret\"\n",
            "oidc_client_id: --oidc-client-id needs --oidc-token-url or --oidc-issuer",
        ),
        (
            "oidc_client_id = \"edge\"\noidc_client_secret_file = \"oidc-secret\"\n\
             oidc_issuer = \"https://login.example\"\n\
             oidc_token_url = \"https://login.example/token\"\n",
            "oidc_token_url: give --oidc-token-url or --oidc-issuer",
        ),
        (
            "oidc_client_id = \"edge\"\noidc_client_secret_file = \"oidc-secret\"\n\
             oidc_issuer = \"http://login.example\"\n",
            "oidc_issuer: \"http://login.example\" is not an https URL",
        ),
        (
            "oidc_client_id = \"edge\"\noidc_client_secret_file = \"oidc-secret\"\n\
             oidc_issuer = \"https://login.example\"\ntoken_file = \"token.txt\"\n",
            "token_file: --token-file and --oidc-client-id are two ways to authenticate",
        ),
        (
            "oidc_client_id = \"edge\"\noidc_client_secret_file = \"empty-secret\"\n\
             oidc_issuer = \"https://login.example\"\n",
            "oidc_client_secret_file: client secret file",
        ),
        (
            "oidc_client_id = \"edge\"\noidc_client_secret_file = \"oidc-secret\"\n\
             oidc_issuer = \"https://login.example\"\noidc_scope = \"connect:agentHub a\\\"b\"\n",
            "oidc_scope: scope \"a\\\"b\" holds",
        ),
        (
            "oidc_client_id = \"edge\"\noidc_client_secret_file = \"oidc-secret\"\n\
             oidc_issuer = \"https://login.example\"\noidc_ca = \"token.txt\"\n",
            "oidc_ca: CA file",
        ),
    ];
    for (extra, expected) in cases {
        let file = base(extra);
        let line = refused(&["agent", "--config", s(&file)], &[]);
        assert!(
            line.starts_with(&format!("rna: {}: ", s(&file))) && line.contains(expected),
            "{extra}: {line}\nexpected: {expected}"
        );
    }
    // Flags and variables name the flag's origin: a client id without a secret file.
    let line = refused(
        &[
            "agent",
            "--config",
            s(&base("")),
            "--oidc-issuer",
            "https://login.example",
        ],
        &[("RNA_OIDC_CLIENT_ID", "edge")],
    );
    assert!(
        line.contains("oidc_client_secret_file: --oidc-client-id needs"),
        "{line}"
    );

    // Complete: no token file needed; every key is printed, read back the same, and neither
    // the secret nor its file's content appears.
    let secret = s(&setup.path("oidc-secret")).to_owned();
    let ca = s(&setup.path("ca.pem")).to_owned();
    let mut printed: Vec<String> = Vec::new();
    for endpoint in [
        ["--oidc-issuer", "https://login.example/realms/ops/"],
        ["--oidc-token-url", "https://login.example/token"],
    ] {
        let file = base("");
        let out = reads_back_the_same(
            &setup,
            "agent",
            &[
                "--config",
                s(&file),
                endpoint[0],
                endpoint[1],
                "--oidc-client-id",
                "edge",
                "--oidc-client-secret-file",
                &secret,
                "--oidc-scope",
                "connect:agentHub   proxy",
                "--oidc-audience",
                "https://hub.example",
                "--oidc-ca",
                &ca,
            ],
            "agent.toml",
        );
        assert!(out.get("token_file").is_none(), "{out:?}");
        assert_eq!(key(&out, "oidc_client_id"), "edge");
        assert_eq!(key(&out, "oidc_client_secret_file"), secret);
        assert_eq!(key(&out, "oidc_scope"), "connect:agentHub proxy");
        assert_eq!(key(&out, "oidc_audience"), "https://hub.example");
        assert_eq!(key(&out, "oidc_ca"), ca);
        assert!(!format!("{out:?}").contains("s3cr3t"), "{out:?}");
        printed.extend(out.keys().filter(|k| k.starts_with("oidc_")).cloned());
        if endpoint[0] == "--oidc-issuer" {
            // Printed without the trailing slash, as discovery uses it.
            assert_eq!(key(&out, "oidc_issuer"), "https://login.example/realms/ops");
            assert!(out.get("oidc_token_url").is_none());
        } else {
            assert_eq!(key(&out, "oidc_token_url"), "https://login.example/token");
        }
    }
    printed.sort();
    printed.dedup();
    let examples: Vec<String> = example_keys("agent.toml")
        .into_iter()
        .filter(|k| k.starts_with("oidc_"))
        .collect();
    assert_eq!(
        printed, examples,
        "every oidc key is printed and documented"
    );
    // The default scope is printed when none is given.
    let out = table(&valid(
        &[
            "agent",
            "--config",
            s(&base("")),
            "--oidc-issuer",
            "https://login.example",
            "--oidc-client-id",
            "edge",
            "--oidc-client-secret-file",
            &secret,
        ],
        &[],
    ));
    assert_eq!(key(&out, "oidc_scope"), "connect:agentHub");
}
