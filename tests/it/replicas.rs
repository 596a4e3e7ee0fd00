//! Hub replicas sharing their state through Kubernetes: three real `rna hub` processes with
//! `--state kubernetes://…` against the fake API server, `rna token --state …` from an
//! operator's kubeconfig, and one agent process connected to all three.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    agent_process_args, curl, field, have_curl, http_server, pattern, socks_connect, within, Dest,
    Rna, RnaProcess,
};
use crate::fake_kube::FakeKube;

const STATE: &str = "kubernetes://default/rna-hub-state";
const TENANT: &str = "acme/prod";

/// One hub process.
struct Hub {
    process: RnaProcess,
    socks: SocketAddr,
    quic: String,
    api: String,
}

/// The fake API server, the shared CA and hub certificate, and the hub processes.
struct Replicas {
    fake: FakeKube,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    hubs: Vec<Hub>,
    /// More arguments for every hub.
    hub_args: Vec<String>,
}

impl Replicas {
    /// `n` hubs, each with a state folder of its own holding the same CA, CA key and hub
    /// certificate (as replicas mount one Secret), sharing the state in the fake's Secret.
    async fn start(n: usize) -> Replicas {
        Replicas::start_with(n, &[]).await
    }

    /// `n` hubs started with `hub_args` besides the usual ones.
    async fn start_with(n: usize, hub_args: &[&str]) -> Replicas {
        let fake = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = fake.kubeconfig(dir.path(), "kubeconfig", None);
        let certs = dir.path().join("certs");
        let ran = Rna::new(["certs", "init", "--dir", certs.to_str().unwrap()])
            .arg("--hub-name")
            .arg("127.0.0.1")
            .run_async()
            .await;
        assert_eq!(ran.code(), 0, "{}", ran.stderr);
        let mut replicas = Replicas {
            fake,
            dir,
            kubeconfig,
            hubs: Vec::new(),
            hub_args: hub_args.iter().map(|a| a.to_string()).collect(),
        };
        for i in 0..n {
            let hub = replicas.start_hub(i, "127.0.0.1:0").await;
            replicas.hubs.push(hub);
        }
        replicas
    }

    /// Starts hub `i` (again, after a kill) on `listen`: it serves only once the state is
    /// loaded.
    async fn start_hub(&self, i: usize, listen: &str) -> Hub {
        let state_dir = self.dir.path().join(format!("hub-{i}"));
        std::fs::create_dir_all(&state_dir).unwrap();
        for file in ["ca.pem", "ca-key.pem", "hub.pem", "hub-key.pem"] {
            let to = state_dir.join(file);
            if !to.exists() {
                std::fs::copy(self.dir.path().join("certs").join(file), to).unwrap();
            }
        }
        let mut hub = self.rna([
            "hub",
            "--state",
            STATE,
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--listen",
            listen,
            "--socks",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "1s",
            "--heartbeat-timeout",
            "5s",
        ]);
        for arg in &self.hub_args {
            hub = hub.arg(arg);
        }
        let mut process = hub.logs_at("info").discard_stdout().spawn();
        let serving = process.wait_line("hub serving").await;
        Hub {
            socks: field(&serving, "socks").parse().unwrap(),
            quic: field(&serving, "quic"),
            api: field(&serving, "api"),
            process,
        }
    }

    /// `rna ARGS` with the operator's kubeconfig.
    fn rna<I, S>(&self, args: I) -> Rna
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Rna::new(args).env("KUBECONFIG", self.kubeconfig.to_str().unwrap())
    }

    /// `rna token create --state … --tenant acme/prod --scope SCOPES`: the token.
    async fn token(&self, scopes: &str) -> String {
        let ran = self
            .rna([
                "token", "create", "--state", STATE, "--tenant", TENANT, "--scope", scopes,
            ])
            .run_async()
            .await;
        assert_eq!(ran.code(), 0, "{}", ran.stderr);
        ran.stdout.trim().to_string()
    }

    /// An agent process named `name` with `token`, connected to every hub.
    async fn agent(&self, name: &str, token: &str) -> RnaProcess {
        let certs = self.dir.path().join("certs");
        let ran = Rna::new(["certs", "agent", "--dir", certs.to_str().unwrap(), name])
            .run_async()
            .await;
        assert_eq!(ran.code(), 0, "{}", ran.stderr);
        let token_file = self.dir.path().join(format!("token-{name}.txt"));
        std::fs::write(&token_file, token).unwrap();
        let mut extra = vec!["--allow", "127.0.0.0/8"];
        for hub in &self.hubs[1..] {
            extra.extend(["--hub", hub.quic.as_str()]);
        }
        let args = agent_process_args(
            &self.hubs[0].quic,
            name,
            certs.join("ca.pem").to_str().unwrap(),
            certs.to_str().unwrap(),
            token_file.to_str().unwrap(),
            &extra,
        );
        Rna::new(&args).logs_at("info").discard_stdout().spawn()
    }
}

/// Whether SOCKS on `socks` accepts `token` (RFC 1929: a refused login is 0xff here). The
/// agent `nobody` does not exist, so an accepted login ends in 0x04, never in a stream.
async fn accepts(socks: SocketAddr, token: &str) -> bool {
    socks_connect(socks, "nobody", token, Dest::Ip(([127, 0, 0, 1], 9).into()))
        .await
        .err()
        != Some(0xff)
}

/// Whether `agent` serves through the hub at `socks`: a CONNECT through it succeeds.
async fn reaches(socks: SocketAddr, agent: &str, token: &str, http: SocketAddr) -> bool {
    socks_connect(socks, agent, token, Dest::Ip(http))
        .await
        .is_ok()
}

/// Polls `probe` every 20 ms until it is true; the time it took, or `None` past `limit`.
async fn time_until(limit: Duration, mut probe: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() <= limit {
        if probe().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits (bounded) until `agent` is reachable through every hub.
async fn wait_everywhere(replicas: &Replicas, agent: &str, token: &str, http: SocketAddr) {
    for hub in &replicas.hubs {
        time_until(Duration::from_secs(60), async || {
            reaches(hub.socks, agent, token, http).await
        })
        .await
        .unwrap_or_else(|| panic!("agent {agent} never connected to hub {}", hub.quic));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_made_with_the_cli_works_on_every_replica_within_a_second() {
    let replicas = Replicas::start(3).await;
    let unknown = "rna_000000000000_000000000000000000000000000000000000000000000000";
    for hub in &replicas.hubs {
        assert!(!accepts(hub.socks, unknown).await, "a token nobody made");
    }
    let early = replicas.token("proxy").await;
    let made = Instant::now();
    for (i, hub) in replicas.hubs.iter().enumerate() {
        let took = time_until(Duration::from_secs(1), async || {
            accepts(hub.socks, &early).await
        })
        .await;
        assert!(
            took.is_some(),
            "hub {i} did not accept the token within 1 s of `rna token create`"
        );
    }
    eprintln!(
        "token in force on all three {:?} after the CLI wrote it",
        made.elapsed()
    );
    // A replica started later loads the state before it serves: the token works at once.
    let late = replicas.start_hub(3, "127.0.0.1:0").await;
    assert!(accepts(late.socks, &early).await);
    assert!(
        !accepts(
            late.socks,
            "rna_000000000000_000000000000000000000000000000000000000000000000"
        )
        .await
    );
    // The Secret holds hashes only, never the token.
    let secret = replicas
        .fake
        .object("", "secrets", "default", "rna-hub-state")
        .expect("the state Secret");
    assert!(!secret.to_string().contains(&early));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_through_the_cli_closes_the_agent_on_every_replica_within_two_seconds() {
    let replicas = Replicas::start(3).await;
    let http = http_server().await;
    let client = replicas.token("proxy").await;
    let connect = replicas.token("connect:agentHub").await;
    let _agent = replicas.agent("edge", &connect).await;
    wait_everywhere(&replicas, "edge", &client, http).await;

    // The watch restarts after a compaction (410 Gone) and still follows the Secret.
    replicas.fake.compact();

    let id = &connect[4..16];
    let ran = replicas
        .rna(["token", "revoke", "--state", STATE, id])
        .run_async()
        .await;
    assert_eq!(ran.code(), 0, "{}", ran.stderr);
    let revoked = Instant::now();
    for (i, hub) in replicas.hubs.iter().enumerate() {
        let gone = time_until(Duration::from_secs(2), async || {
            !reaches(hub.socks, "edge", &client, http).await
        })
        .await;
        assert!(
            gone.is_some(),
            "hub {i} still routes to the agent 2 s after its token was revoked"
        );
    }
    eprintln!(
        "agent closed on all three {:?} after the revocation",
        revoked.elapsed()
    );
    let listed = replicas
        .rna(["token", "list", "--state", STATE])
        .run_async()
        .await;
    assert_eq!(listed.code(), 0, "{}", listed.stderr);
    let line = listed
        .stdout
        .lines()
        .find(|l| l.starts_with(id))
        .expect("the revoked token is listed");
    assert!(line.contains("revoked"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_writers_at_once_lose_nothing() {
    let replicas = Replicas::start(1).await;
    // The Secret as the manifests make it: the writers keep what is not theirs.
    replicas
        .fake
        .seed(serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "rna-hub-state", "namespace": "default",
            "labels": {"team": "platform"}, "annotations": {"note": "kept"}},
        "type": "Opaque"}));
    let writers = (0..20).map(|_| {
        let run = replicas
            .rna([
                "token", "create", "--state", STATE, "--tenant", TENANT, "--scope", "proxy",
            ])
            .run_async();
        tokio::spawn(run)
    });
    let mut tokens = Vec::new();
    for writer in writers.collect::<Vec<_>>() {
        let ran = writer.await.unwrap();
        assert_eq!(ran.code(), 0, "{}", ran.stderr);
        tokens.push(ran.stdout.trim().to_string());
    }
    let listed = replicas
        .rna(["token", "list", "--state", STATE])
        .run_async()
        .await;
    assert_eq!(listed.code(), 0, "{}", listed.stderr);
    for token in &tokens {
        assert!(
            listed.stdout.contains(&token[4..16]),
            "token {} was lost:\n{}",
            &token[4..16],
            listed.stdout
        );
    }
    let writes = replicas
        .fake
        .requests()
        .iter()
        .filter(|r| r.starts_with("PUT ") || r.starts_with("POST "))
        .count();
    eprintln!("20 tokens stored with {writes} writes (the rest were conflicts, read again)");
    let secret = replicas
        .fake
        .object("", "secrets", "default", "rna-hub-state")
        .unwrap();
    assert_eq!(secret["metadata"]["labels"]["team"], "platform");
    assert_eq!(secret["metadata"]["annotations"]["note"], "kept");
    let hub = &replicas.hubs[0];
    for token in &tokens {
        let took = time_until(Duration::from_secs(5), async || {
            accepts(hub.socks, token).await
        })
        .await;
        assert!(took.is_some(), "the hub never accepted {}", &token[4..16]);
    }
}

/// Sends GET /bytes/LEN through `socks` to `agent` and reads the first MiB of the answer.
async fn start_download(
    socks: SocketAddr,
    agent: &str,
    token: &str,
    http: SocketAddr,
    len: usize,
) -> tokio::net::TcpStream {
    let mut s = socks_connect(socks, agent, token, Dest::Ip(http))
        .await
        .expect("socks connect");
    s.write_all(
        format!("GET /bytes/{len} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    s
}

/// Reads the rest of a download and checks its body is the pattern, byte for byte.
async fn finish_download(mut s: tokio::net::TcpStream, len: usize) {
    let mut all = Vec::new();
    within("the download to finish", s.read_to_end(&mut all))
        .await
        .expect("download completes without a reset");
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP head")
        + 4;
    assert_eq!(all.len() - at, len, "body length");
    assert!(
        all[at..] == pattern(len)[..],
        "body differs from what was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_one_replica_leaves_transfers_through_the_others_byte_exact() {
    if !have_curl() {
        return;
    }
    let mut replicas = Replicas::start(3).await;
    let http = http_server().await;
    let client = replicas.token("proxy").await;
    let connect = replicas.token("connect:agentHub").await;
    let _agent = replicas.agent("edge", &connect).await;
    wait_everywhere(&replicas, "edge", &client, http).await;

    // Transfers in the middle of their life through the two survivors.
    const LEN: usize = 64 * 1024 * 1024;
    let mut downloads = Vec::new();
    for hub in &replicas.hubs[1..] {
        let mut s = start_download(hub.socks, "edge", &client, http, LEN).await;
        let mut first = vec![0u8; 1 << 20];
        s.read_exact(&mut first).await.expect("first MiB");
        downloads.push((s, first));
    }
    replicas.hubs[0].process.child.kill().await.unwrap();
    for (s, first) in downloads {
        // The first MiB read includes the HTTP head; check the whole transfer together.
        let mut rest = Vec::new();
        let mut s = s;
        within("the download to finish", s.read_to_end(&mut rest))
            .await
            .expect("no reset after a replica died");
        let all = [first, rest].concat();
        let at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(all.len() - at, LEN);
        assert!(all[at..] == pattern(LEN)[..], "body differs");
    }
    // New transfers through the survivors work, with curl as the SOCKS client.
    let url = format!("http://127.0.0.1:{}/bytes/1000000", http.port());
    for hub in &replicas.hubs[1..] {
        let (code, body) = curl(hub.socks, "edge", &client, &[&url]).await;
        assert_eq!(code, 0);
        assert!(body == pattern(1_000_000), "curl body differs");
    }
    // The killed replica comes back on its address: it loads the state, and the agent,
    // which kept its sessions to the others, reconnects to it.
    let address = replicas.hubs[0].quic.clone();
    replicas.hubs[0] = replicas.start_hub(0, &address).await;
    let back = replicas.hubs[0].socks;
    time_until(Duration::from_secs(60), async || {
        reaches(back, "edge", &client, http).await
    })
    .await
    .expect("the agent reconnects to the returned replica");
    let fresh = start_download(back, "edge", &client, http, 100_000).await;
    finish_download(fresh, 100_000).await;
}

/// deploy/kubernetes-replicas renders with kubectl, every object parses as its Kubernetes
/// type, the hub runs as replicas against the state Secret the manifests make, is reachable
/// per pod (headless Service) and as one (SOCKS and API), keeps a disruption budget, and its
/// Role grants nothing but reading, following and updating that one Secret.
#[test]
fn the_replica_manifests_render_parse_and_limit_the_hub_to_its_state() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Secret, Service};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
    use serde_json::Value;

    fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> T {
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"))
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes-replicas");
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&root)
        .output()
        .expect("run kubectl (Debian: kubernetes-client; .ci/run installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect();
    let in_hub_ns = |d: &&Value| d["metadata"]["namespace"] == "rna-hub";
    let of_kind = |kind: &str| -> Vec<Value> {
        docs.iter()
            .filter(in_hub_ns)
            .filter(|d| d["kind"] == kind)
            .cloned()
            .collect()
    };
    let deployment: Deployment = typed(&of_kind("Deployment")[0]);
    let spec = deployment.spec.as_ref().unwrap();
    assert!(spec.replicas.unwrap_or(1) >= 2, "at least two replicas");
    let hub_labels = spec.selector.match_labels.clone().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap();
    let state = args
        .iter()
        .find_map(|a| a.strip_prefix("--state="))
        .expect("--state");
    assert_eq!(state, "kubernetes://$(POD_NAMESPACE)/rna-hub-state");
    let location: rna::state::StateLocation = state
        .replace("$(POD_NAMESPACE)", "rna-hub")
        .parse()
        .unwrap();
    let rna::state::StateLocation::Kubernetes(secret) = location else {
        panic!("not a Kubernetes location");
    };
    let env = container.env.clone().unwrap();
    let namespace = env.iter().find(|e| e.name == "POD_NAMESPACE").unwrap();
    assert_eq!(
        namespace
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.namespace"
    );
    assert!(!args.iter().any(|a| a.starts_with("--tokens")), "{args:?}");
    let probe = container.readiness_probe.as_ref().unwrap();
    assert_eq!(
        probe.http_get.as_ref().unwrap().path.as_deref(),
        Some("/readyz")
    );
    assert!(container.startup_probe.is_some());
    let account = pod.service_account_name.clone().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(true));

    // The Secret named by --state is one the manifests make (so the hub needs no `create`).
    let secrets: Vec<Secret> = of_kind("Secret").iter().map(typed).collect();
    assert!(secrets
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some(secret.name.as_str())));

    let services: Vec<Service> = of_kind("Service").iter().map(typed).collect();
    let selects_hub = |s: &Service| s.spec.as_ref().unwrap().selector.as_ref() == Some(&hub_labels);
    let headless = services
        .iter()
        .filter(|s| selects_hub(s))
        .find(|s| s.spec.as_ref().unwrap().cluster_ip.as_deref() == Some("None"))
        .expect("a headless Service: every hub pod in DNS");
    assert!(headless
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .any(|p| p.port == 4433 && p.protocol.as_deref() == Some("UDP")));
    assert!(
        services.iter().filter(|s| selects_hub(s)).any(|s| {
            let ports: Vec<i32> = s
                .spec
                .as_ref()
                .unwrap()
                .ports
                .as_ref()
                .unwrap()
                .iter()
                .map(|p| p.port)
                .collect();
            ports.contains(&1080) && ports.contains(&8080)
        }),
        "a Service for SOCKS and the API"
    );
    let pdbs: Vec<PodDisruptionBudget> = of_kind("PodDisruptionBudget").iter().map(typed).collect();
    assert!(pdbs.iter().any(|p| {
        let spec = p.spec.as_ref().unwrap();
        spec.selector.as_ref().unwrap().match_labels.as_ref() == Some(&hub_labels)
            && (spec.max_unavailable.is_some() || spec.min_available.is_some())
    }));

    // RBAC: the hub's ServiceAccount is bound to Roles only, and each rule is the state Secret.
    let bindings: Vec<RoleBinding> = of_kind("RoleBinding").iter().map(typed).collect();
    let roles: Vec<Role> = of_kind("Role").iter().map(typed).collect();
    let mut granted = 0;
    for binding in bindings.iter().filter(|b| {
        b.subjects
            .iter()
            .flatten()
            .any(|s| s.kind == "ServiceAccount" && s.name == account)
    }) {
        assert_eq!(binding.role_ref.kind, "Role");
        let role = roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(binding.role_ref.name.as_str()))
            .expect("the bound Role");
        for rule in role.rules.iter().flatten() {
            granted += 1;
            assert_eq!(
                rule.api_groups.as_deref(),
                Some(&[String::new()][..]),
                "{rule:?}"
            );
            assert_eq!(
                rule.resources.as_deref(),
                Some(&["secrets".to_string()][..]),
                "{rule:?}"
            );
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&[secret.name.clone()][..]),
                "{rule:?}"
            );
            assert!(rule.non_resource_urls.is_none(), "{rule:?}");
            for verb in &rule.verbs {
                assert!(
                    ["get", "list", "watch", "update"].contains(&verb.as_str()),
                    "the hub may not {verb}"
                );
            }
        }
    }
    assert!(
        granted > 0,
        "the hub's ServiceAccount is bound to its state Role"
    );
    for doc in docs.iter().filter(|d| d["kind"] == "ClusterRoleBinding") {
        let binding: ClusterRoleBinding = typed(doc);
        assert!(
            !binding
                .subjects
                .iter()
                .flatten()
                .any(|s| s.name == account && s.namespace.as_deref() == Some("rna-hub")),
            "no cluster-wide grant to the hub"
        );
    }
}

/// Whether an enrolling agent process enrolled (`true`) or was refused and exited; its log.
async fn enrollment(process: &mut RnaProcess) -> (bool, String) {
    within("the agent to enroll or be refused", async {
        let mut log = String::new();
        while let Some(line) = process.log.recv().await {
            log.push_str(&line);
            log.push('\n');
            if line.contains(" enrolled agent=") {
                return (true, log);
            }
        }
        (false, log)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_enrolling_at_once_never_overspend_a_join_token_and_a_revocation_reaches_all() {
    let replicas = Replicas::start(3).await;
    let http = http_server().await;
    let client = replicas.token("proxy").await;
    let admin = replicas.token("admin").await;
    // One join token for a fleet of three, spent by eight agents at once on three replicas.
    let ran = replicas
        .rna([
            "token",
            "create",
            "--join",
            "--state",
            STATE,
            "--tenant",
            TENANT,
            "--name-prefix",
            "edge-",
            "--uses",
            "3",
        ])
        .run_async()
        .await;
    assert_eq!(ran.code(), 0, "{}", ran.stderr);
    let words: Vec<&str> = ran.stdout.split_whitespace().collect();
    let join = words[words.iter().position(|w| *w == "--join").unwrap() + 1].to_string();
    let mut agents = Vec::new();
    for i in 0..8 {
        let dir = replicas.dir.path().join(format!("agent-{i}"));
        let hub = &replicas.hubs[i % 3].quic;
        let name = format!("edge-{i}");
        let process = Rna::new(["agent", "--hub", hub, "--join", &join, "--name", &name])
            .env("RNA_STATE_DIR", dir.to_str().unwrap())
            .env("RNA_ALLOW", "127.0.0.0/8")
            .env("RNA_METRICS", "off")
            .logs_at("info")
            .discard_stdout()
            .spawn();
        agents.push((name, dir, process));
    }
    let mut enrolled = Vec::new();
    for (name, dir, mut process) in agents {
        let (ok, log) = enrollment(&mut process).await;
        if ok {
            enrolled.push((name, dir, process));
        } else {
            assert!(
                log.contains("(spent)"),
                "{name} refused for another reason:\n{log}"
            );
        }
    }
    assert_eq!(
        enrolled.len(),
        3,
        "a join token of 3 uses enrolled {}",
        enrolled.len()
    );
    let listed = replicas
        .rna(["certs", "list", "--state", STATE])
        .run_async()
        .await;
    assert_eq!(listed.code(), 0, "{}", listed.stderr);
    assert_eq!(
        listed
            .stdout
            .lines()
            .filter(|l| l.contains("edge-"))
            .count(),
        3
    );

    // One enrolled agent restarted from its state folder, connected to all three replicas.
    let (name, dir, process) = enrolled.remove(0);
    drop(process);
    let mut args = vec!["agent".to_string()];
    for hub in &replicas.hubs {
        args.extend(["--hub".to_string(), hub.quic.clone()]);
    }
    let _agent = Rna::new(&args)
        .env("RNA_STATE_DIR", dir.to_str().unwrap())
        .env("RNA_ALLOW", "127.0.0.0/8")
        .env("RNA_METRICS", "off")
        .logs_at("info")
        .discard_stdout()
        .spawn();
    wait_everywhere(&replicas, &name, &client, http).await;

    // Revoked through one replica's admin API: its sessions close on all three.
    let api = rna::admin_client::ApiClient::new(
        &format!("http://{}", replicas.hubs[1].api),
        rna::auth::Secret::new(admin),
    )
    .unwrap();
    let answer = within(
        "revoke",
        api.request(
            http::Method::POST,
            &format!("/api/v1/agents/{name}/revoke"),
            None,
        ),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.json());
    let revoked = Instant::now();
    for (i, hub) in replicas.hubs.iter().enumerate() {
        let gone = time_until(Duration::from_secs(2), async || {
            !reaches(hub.socks, &name, &client, http).await
        })
        .await;
        assert!(
            gone.is_some(),
            "hub {i} still routes to {name} 2 s after its revocation"
        );
    }
    eprintln!(
        "certificate revocation closed {name} on all three {:?} after the API answered",
        revoked.elapsed()
    );
    let listed = replicas
        .rna(["certs", "list", "--state", STATE])
        .run_async()
        .await;
    let line = listed
        .stdout
        .lines()
        .find(|l| l.contains(&name))
        .unwrap()
        .to_string();
    assert!(line.ends_with("revoked"), "{line}");
    // And through the CLI, from the operator's kubeconfig.
    let (other, _, _) = &enrolled[0];
    let ran = replicas
        .rna(["certs", "revoke", "--state", STATE, other])
        .run_async()
        .await;
    assert_eq!(ran.code(), 0, "{}", ran.stderr);
    assert!(ran.stdout.starts_with("revoked "), "{}", ran.stdout);
    let listed = replicas
        .rna(["certs", "list", "--state", STATE])
        .run_async()
        .await;
    let revoked_count = listed
        .stdout
        .lines()
        .filter(|l| l.ends_with("revoked"))
        .count();
    assert_eq!(revoked_count, 2, "{}", listed.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_shared_state_keeps_the_tokens_in_force_and_stops_a_new_replica_precisely() {
    use base64::Engine as _;
    let mut replicas = Replicas::start(1).await;
    let token = replicas.token("proxy").await;
    let hub = &replicas.hubs[0];
    time_until(Duration::from_secs(5), async || {
        accepts(hub.socks, &token).await
    })
    .await
    .expect("the token works");
    // Someone else writes a token store that does not parse.
    let broken = base64::engine::general_purpose::STANDARD.encode("[[token]]\nid = 1\n");
    replicas.fake.apply_as(
        "someone",
        serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "rna-hub-state", "namespace": "default"},
            "data": {"tokens.toml": broken}}),
    );
    let line = replicas.hubs[0]
        .process
        .wait_line("shared token store not applied")
        .await;
    assert!(line.contains("keeping the previous tokens"), "{line}");
    assert!(
        line.contains("Secret default/rna-hub-state key tokens.toml"),
        "{line}"
    );
    assert!(
        accepts(replicas.hubs[0].socks, &token).await,
        "the previous tokens stay"
    );

    // A replica starting now refuses to serve with it, in one line naming the Secret's key.
    let state_dir = replicas.dir.path().join("hub-0");
    let ran = replicas
        .rna([
            "hub",
            "--state",
            STATE,
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--socks",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ])
        .run_async()
        .await;
    assert_ne!(ran.code(), 0);
    assert!(
        ran.stderr
            .contains("Secret default/rna-hub-state key tokens.toml: line"),
        "{}",
        ran.stderr
    );
    // The CLI says so too, and refuses a location it cannot use.
    let listed = replicas
        .rna(["token", "list", "--state", STATE])
        .run_async()
        .await;
    assert_ne!(listed.code(), 0);
    assert!(
        listed.stderr.contains("key tokens.toml"),
        "{}",
        listed.stderr
    );
    let bad = replicas
        .rna(["token", "list", "--state", "kubernetes://Default/x"])
        .run_async()
        .await;
    assert_ne!(bad.code(), 0);
    assert!(
        bad.stderr.contains("the namespace must be a DNS label"),
        "{}",
        bad.stderr
    );
    replicas.hubs.clear();
}

/// The admin API of hub `i`, with `admin`.
fn admin_api(replicas: &Replicas, i: usize, admin: &str) -> rna::admin_client::ApiClient {
    rna::admin_client::ApiClient::new(
        &format!("http://{}", replicas.hubs[i].api),
        rna::auth::Secret::new(admin.to_owned()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_rotated_through_one_replica_works_on_all_and_the_old_one_is_refused_everywhere() {
    let mut replicas = Replicas::start(3).await;
    let http = http_server().await;
    let client = replicas.token("proxy").await;
    let admin = replicas.token("admin").await;
    // The agent's token also logs in to SOCKS, so every replica can be asked whether it
    // accepts the old and the new one.
    let old = replicas.token("connect:agentHub,proxy").await;
    let _agent = replicas.agent("edge", &old).await;
    wait_everywhere(&replicas, "edge", &client, http).await;

    let answer = within(
        "rotate-token",
        admin_api(&replicas, 1, &admin).request(
            http::Method::POST,
            "/api/v1/agents/edge/rotate-token",
            None,
        ),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.json());
    let json = answer.json();
    let new_id = json["rotated"][0]["new_token_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The agent stores the token it was sent in its token file.
    let token_file = replicas.dir.path().join("token-edge.txt");
    let new = within("the agent to store the rotated token", async {
        loop {
            let text = std::fs::read_to_string(&token_file).unwrap_or_default();
            let text = text.trim();
            if text != old && text.len() == old.len() {
                return text.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(&new[4..16], new_id);
    for (i, hub) in replicas.hubs.iter().enumerate() {
        let took = time_until(Duration::from_secs(2), async || {
            accepts(hub.socks, &new).await
        })
        .await;
        assert!(took.is_some(), "hub {i} does not accept the rotated token");
    }
    // The replica that rotated revokes the old token once the agent left its sessions.
    replicas.hubs[1]
        .process
        .wait_line("old connect token revoked")
        .await;
    let revoked = Instant::now();
    for (i, hub) in replicas.hubs.iter().enumerate() {
        let gone = time_until(Duration::from_secs(2), async || {
            !accepts(hub.socks, &old).await
        })
        .await;
        assert!(
            gone.is_some(),
            "hub {i} still accepts the old token 2 s after its revocation"
        );
    }
    eprintln!(
        "old token refused on all three {:?} after the rotating replica revoked it",
        revoked.elapsed()
    );
    // The agent serves through every replica with the new token.
    wait_everywhere(&replicas, "edge", &client, http).await;
    let listed = replicas
        .rna(["token", "list", "--state", STATE])
        .run_async()
        .await;
    assert_eq!(listed.code(), 0, "{}", listed.stderr);
    let line = |id: &str| {
        listed
            .stdout
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("token {id} not listed:\n{}", listed.stdout))
            .to_owned()
    };
    assert!(line(&old[4..16]).contains("revoked"));
    assert!(!line(&new_id).contains("revoked"));
}

/// The serial of the certificate in an agent state folder.
fn agent_serial(dir: &std::path::Path) -> String {
    let state = rna::agent::AgentState::new(dir);
    let chain = rna::certs::load_certs(&state.cert()).unwrap();
    rna::enroll::agent_identity(&chain[0]).unwrap().serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_renewed_through_one_replica_is_in_the_shared_state() {
    // Renewal two thirds into a 6 s lifetime.
    let replicas = Replicas::start_with(2, &["--agent-cert-lifetime", "6s"]).await;
    let http = http_server().await;
    let client = replicas.token("proxy").await;
    let ran = replicas
        .rna([
            "token", "create", "--join", "--state", STATE, "--tenant", TENANT, "--name", "edge",
        ])
        .run_async()
        .await;
    assert_eq!(ran.code(), 0, "{}", ran.stderr);
    let words: Vec<&str> = ran.stdout.split_whitespace().collect();
    let join = words[words.iter().position(|w| *w == "--join").unwrap() + 1].to_string();
    let dir = replicas.dir.path().join("agent-edge");
    let mut agent = Rna::new([
        "agent",
        "--hub",
        &replicas.hubs[0].quic,
        "--join",
        &join,
        "--name",
        "edge",
    ])
    .env("RNA_STATE_DIR", dir.to_str().unwrap())
    .env("RNA_ALLOW", "127.0.0.0/8")
    .env("RNA_METRICS", "off")
    .logs_at("info")
    .discard_stdout()
    .spawn();
    agent.wait_line("connected to hub").await;
    let first = agent_serial(&dir);
    let enrolled = Instant::now();
    agent.wait_line("certificate renewed").await;
    let renewed = agent_serial(&dir);
    assert_ne!(renewed, first);
    let listed = replicas
        .rna(["certs", "list", "--state", STATE])
        .run_async()
        .await;
    assert_eq!(listed.code(), 0, "{}", listed.stderr);
    for serial in [&first, &renewed] {
        assert!(
            listed.stdout.lines().any(|l| l.contains(serial.as_str())),
            "certificate {serial} not in the shared list:\n{}",
            listed.stdout
        );
    }
    // The connect token follows the certificates: past the first one's end (and the token's
    // first expiry), the agent still serves.
    agent.wait_line("certificate renewed").await;
    assert!(enrolled.elapsed() > Duration::from_secs(6));
    let served = time_until(Duration::from_secs(20), async || {
        reaches(replicas.hubs[0].socks, "edge", &client, http).await
    })
    .await;
    assert!(
        served.is_some(),
        "the agent stopped serving after its first certificate ended"
    );

    // Stopped, the agent's connect token lapses with its last certificate, and the next
    // enrollment, through the other replica, prunes it from the shared store.
    let token = std::fs::read_to_string(rna::agent::AgentState::new(&dir).token()).unwrap();
    let token_id = token.trim()[4..16].to_owned();
    drop(agent);
    let token_state = async || {
        let listed = replicas
            .rna(["token", "list", "--state", STATE])
            .run_async()
            .await;
        assert_eq!(listed.code(), 0, "{}", listed.stderr);
        listed
            .stdout
            .lines()
            .find(|l| l.starts_with(&token_id))
            .map(|l| l.split_whitespace().nth(4).unwrap_or("").to_owned())
    };
    let lapsed = time_until(Duration::from_secs(20), async || {
        token_state().await.as_deref() == Some("expired")
    })
    .await;
    assert!(lapsed.is_some(), "{:?}", token_state().await);
    let ran = replicas
        .rna([
            "token", "create", "--join", "--state", STATE, "--tenant", TENANT, "--name", "other",
        ])
        .run_async()
        .await;
    assert_eq!(ran.code(), 0, "{}", ran.stderr);
    let words: Vec<&str> = ran.stdout.split_whitespace().collect();
    let join = words[words.iter().position(|w| *w == "--join").unwrap() + 1].to_string();
    let other_dir = replicas.dir.path().join("agent-other");
    let mut other = Rna::new([
        "agent",
        "--hub",
        &replicas.hubs[1].quic,
        "--join",
        &join,
        "--name",
        "other",
    ])
    .env("RNA_STATE_DIR", other_dir.to_str().unwrap())
    .env("RNA_ALLOW", "127.0.0.0/8")
    .env("RNA_METRICS", "off")
    .logs_at("info")
    .discard_stdout()
    .spawn();
    assert!(enrollment(&mut other).await.0, "other did not enroll");
    assert_eq!(token_state().await, None, "the lapsed token was not pruned");
}
