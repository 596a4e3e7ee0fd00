//! Enrollment end to end with the real binary: a hub started from an empty state folder, the
//! line `rna token create --join` prints pasted as is on a fresh agent, refusals of spent,
//! expired, misnamed and foreign join tokens, the tenant bound into the certificate; and,
//! against a QUIC server of the test's own, what the agent sends: nothing to a hub of another
//! CA, and a CSR but never its key to the right one.

use std::net::SocketAddr;
use std::ops::Not;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rna::certs::{parse_certs, parse_key, Ca};
use rna::enroll::wire::{decode_request, encode_reply};
use rna::enroll::{
    Admission, CertBytes, EnrollReply, HubState, Issued, JoinToken, Signer, ENROLL_ALPN,
};
use rna::identity::Secret;

use crate::common::{
    curl, eventually, eventually_async, field, have_curl, http_server, pattern, sha256_hex, within,
    Rna, RnaProcess,
};

/// A hub process serving from the state folder `dir`.
struct HubProcess {
    process: RnaProcess,
    dir: PathBuf,
    socks: SocketAddr,
    /// The agent listener, `127.0.0.1:PORT`.
    quic: String,
    /// The admin API, `127.0.0.1:PORT`.
    api: String,
}

impl HubProcess {
    async fn start(dir: &Path) -> HubProcess {
        HubProcess::start_with(dir, &[]).await
    }

    async fn start_with(dir: &Path, extra: &[&str]) -> HubProcess {
        let dir_text = dir.display().to_string();
        let mut args = vec!["hub", "--state-dir", &dir_text, "--hub-name", "127.0.0.1"];
        // `extra` may name the agent listener (a hub restarted on its port).
        if !extra.contains(&"--listen") {
            args.extend(["--listen", "127.0.0.1:0"]);
        }
        args.extend(["--socks", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
        args.extend(extra);
        let mut process = Rna::new(args).logs_at("info").discard_stdout().spawn();
        let serving = process.wait_line("hub serving").await;
        let socks = field(&serving, "socks").parse().unwrap();
        HubProcess {
            process,
            dir: dir.to_path_buf(),
            socks,
            quic: field(&serving, "quic"),
            api: field(&serving, "api"),
        }
    }

    fn state(&self) -> String {
        self.dir.display().to_string()
    }

    /// `rna token create --join … ARGS`: the printed line.
    async fn join_line(&self, tenant: &str, args: &[&str]) -> String {
        let mut all = vec![
            "token",
            "create",
            "--join",
            "--state-dir",
            &self.dir.to_str().unwrap(),
            "--tenant",
            tenant,
        ];
        all.extend(args);
        let ran = Rna::new(&all).run_async().await;
        assert_eq!(ran.code(), 0, "{}", ran.stderr);
        let lines: Vec<&str> = ran.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {}", ran.stdout);
        lines[0].to_string()
    }

    /// A connect-free token of `tenant` with `scope`, from the hub's own store.
    async fn token(&mut self, tenant: &str, scope: &str) -> String {
        let state = self.state();
        let ran = Rna::new([
            "token",
            "create",
            "--state-dir",
            &state,
            "--tenant",
            tenant,
            "--scope",
            scope,
        ])
        .run_async()
        .await;
        assert_eq!(ran.code(), 0, "{}", ran.stderr);
        self.process.wait_line("token store reloaded").await;
        ran.stdout.trim().to_string()
    }
}

/// Enrollment over QUIC alone, for the tests that answer it with a QUIC server of their own.
fn quic_only() -> rna::agent::enroll::Reach {
    rna::agent::enroll::Reach {
        transport: rna::agent::TransportMode::Quic,
        ..Default::default()
    }
}

/// Every log line up to and including the first that contains `needle`.
async fn lines_until(
    log: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> Vec<String> {
    within(needle, async {
        let mut lines = Vec::new();
        while let Some(line) = log.recv().await {
            let found = line.contains(needle);
            lines.push(line);
            if found {
                return lines;
            }
        }
        panic!("the process ended before logging {needle:?}: {lines:#?}");
    })
    .await
}

/// The pasted line as argv, without its leading `rna`.
fn argv(line: &str) -> Vec<String> {
    let words: Vec<String> = line.split_whitespace().map(String::from).collect();
    assert_eq!(words[0], "rna", "{line}");
    words[1..].to_vec()
}

/// An agent run from `args` with its state in `state`, allowed to dial loopback, no metrics
/// port. The state folder comes from the environment, so the pasted line stays as printed.
fn agent(args: &[String], state: &Path) -> Rna {
    Rna::new(args)
        .env("RNA_STATE_DIR", state.to_str().unwrap())
        .env("RNA_ALLOW", "127.0.0.0/8")
        .env("RNA_METRICS", "off")
        .logs_at("info")
        .discard_stdout()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pasted_join_line_enrolls_connects_and_restarts_from_its_state_folder() {
    if !have_curl() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::start(&tmp.path().join("hub")).await;
    // The hub made its CA, certificate and token store; the secret files are private.
    let state = HubState::new(&hub.dir);
    for secret in [state.ca_key(), state.hub_key(), state.tokens()] {
        assert_eq!(mode(&secret), 0o600, "{}", secret.display());
    }
    let proxy = hub.token("acme/prod", "proxy").await;
    let line = hub.join_line("acme/prod", &["--name", "edge"]).await;
    assert!(line.starts_with("rna agent --hub 127.0.0.1:"), "{line}");

    let agent_dir = tmp.path().join("agent");
    let mut first = agent(&argv(&line), &agent_dir).spawn();
    let started = lines_until(&mut first.log, "connected to hub").await;
    assert!(
        started.iter().any(|l| l.contains("enrolled")),
        "{started:#?}"
    );
    // A fresh 30-day certificate is no reason for agent or hub to warn about its expiry.
    assert!(
        !started.iter().any(|l| l.contains("expires in")),
        "{started:#?}"
    );
    let handshake = lines_until(&mut hub.process.log, "agent connected").await;
    assert!(
        !handshake.iter().any(|l| l.contains("expires in")),
        "{handshake:#?}"
    );
    for (file, want) in [
        ("agent-key.pem", 0o600),
        ("token.txt", 0o600),
        ("agent.pem", 0o644),
        ("ca.pem", 0o644),
    ] {
        assert_eq!(mode(&agent_dir.join(file)), want, "{file}");
    }
    // The join token is spent, and listed so; only its hash is kept.
    let listed = Rna::new(["token", "list", "--state-dir", &hub.state()])
        .run_async()
        .await;
    assert!(listed.stdout.contains("spent"), "{}", listed.stdout);
    let secret = &line.split(" --join ").nth(1).unwrap()[22..70];
    let kept = std::fs::read_to_string(state.join_tokens()).unwrap();
    assert!(!kept.contains(secret), "the join secret is stored in clear");

    let http = http_server().await;
    let url = format!("http://127.0.0.1:{}/bytes/300000", http.port());
    let (code, body) = curl(hub.socks, "edge", &proxy, &[&url]).await;
    assert_eq!(code, 0);
    assert_eq!(body, pattern(300_000));

    first.signal("-TERM");
    assert!(first.exit().await.success());
    // Restarted from its state folder alone: no --join, no --name, no files named.
    let hub_flag = argv(&line)[2].clone();
    let mut again = agent(&["agent".into(), "--hub".into(), hub_flag], &agent_dir).spawn();
    again.wait_line("connected to hub").await;
    let (code, body) = curl(hub.socks, "edge", &proxy, &[&url]).await;
    assert_eq!(code, 0);
    assert_eq!(body, pattern(300_000));
    again.signal("-TERM");
    assert!(again.exit().await.success());
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
}

/// Runs an agent that must fail to enroll and returns its standard error.
async fn refused(args: Vec<String>, state: &Path) -> String {
    let ran = agent(&args, state).run_async().await;
    assert_ne!(ran.code(), 0, "{}", ran.stderr);
    assert!(!state.join("agent-key.pem").exists(), "nothing is stored");
    ran.stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spent_expired_and_misnamed_join_tokens_are_refused_precisely() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::start(&tmp.path().join("hub")).await;

    // Used twice: the second agent is refused, and says so.
    let line = hub.join_line("acme/prod", &["--name", "edge"]).await;
    let mut first = agent(&argv(&line), &tmp.path().join("a1")).spawn();
    first.wait_line("connected to hub").await;
    let err = refused(argv(&line), &tmp.path().join("a2")).await;
    assert!(
        err.contains("the hub refused enrollment (spent)") && err.contains("already been used"),
        "{err}"
    );

    // Bound to `edge`: it cannot enroll `other`, and the refusal spends nothing.
    let line = hub.join_line("acme/prod", &["--name", "edge"]).await;
    let misnamed = line.replace("--name edge", "--name other");
    let err = refused(argv(&misnamed), &tmp.path().join("a3")).await;
    assert!(
        err.contains("(name_not_allowed)") && err.contains("not \"other\""),
        "{err}"
    );
    let mut right = agent(&argv(&line), &tmp.path().join("a4")).spawn();
    right.wait_line("connected to hub").await;

    // Expired: refused once its second has passed.
    let line = hub
        .join_line("acme/prod", &["--name", "late", "--ttl", "1s"])
        .await;
    let store = hub.dir.clone();
    eventually("the join token to expire", || {
        HubState::new(&store)
            .load_join_tokens()
            .unwrap()
            .records()
            .all(|r| {
                r.name.to_string() != "late" || r.is_expired(rna::auth::unix_now(SystemTime::now()))
            })
    })
    .await;
    let err = refused(argv(&line), &tmp.path().join("a5")).await;
    assert!(
        err.contains("(expired)") && err.contains("expired at"),
        "{err}"
    );

    // Unknown: a well-formed token the hub never made (another id).
    let text = line
        .split(" --join ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let forged = line.replace(text, &format!("rna_join_{}{}", "0".repeat(12), &text[21..]));
    let err = refused(argv(&forged), &tmp.path().join("a6")).await;
    assert!(err.contains("(unknown)"), "{err}");

    // Each refusal is counted by its reason.
    assert!(have_curl(), "these tests drive curl");
    let metrics_token = hub.token("ops/monitoring", "read:metrics").await;
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-H"])
        .arg(format!("Authorization: Bearer {metrics_token}"))
        .arg(format!("http://{}/metrics", hub.api))
        .output();
    let metrics = String::from_utf8(within("curl", out).await.unwrap().stdout).unwrap();
    for reason in ["spent", "name_not_allowed", "expired", "unknown"] {
        let line = format!("rna_handshake_failures_total{{reason=\"enroll_{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} not in {metrics}");
    }

    for agent in [&first, &right] {
        agent.signal("-TERM");
    }
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_of_one_tenant_is_refused_with_a_token_of_another() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::start(&tmp.path().join("hub")).await;
    let line = hub.join_line("acme/prod", &["--name", "edge"]).await;
    let agent_dir = tmp.path().join("agent");
    let mut enrolled = agent(&argv(&line), &agent_dir).spawn();
    enrolled.wait_line("connected to hub").await;
    enrolled.signal("-TERM");
    assert!(enrolled.exit().await.success());

    // The certificate says acme/prod; a connect token of globex/prod must not go with it.
    let foreign = hub.token("globex/prod", "connect:agentHub").await;
    std::fs::write(agent_dir.join("token.txt"), format!("{foreign}\n")).unwrap();
    let hub_flag = argv(&line)[2].clone();
    let mut mixed = agent(&["agent".into(), "--hub".into(), hub_flag], &agent_dir).spawn();
    let refusal = mixed.wait_line("tenant_mismatch").await;
    assert!(refusal.contains("0x05"), "{refusal}");
    let logged = hub.process.wait_line("tenant_mismatch").await;
    assert!(
        logged.contains("bound to tenant acme/prod") && logged.contains("globex/prod"),
        "{logged}"
    );
    mixed.signal("-TERM");
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
}

/// What the test's own enrollment server saw.
#[derive(Debug, Default)]
struct Received {
    /// Connections whose handshake completed.
    handshakes: usize,
    /// Every decrypted byte received on any stream.
    bytes: Vec<u8>,
}

/// A QUIC server speaking `rna-enroll/1` with the hub certificate of `ca` (sent with the CA),
/// recording what it receives; with `sign`, it answers a request as a hub would.
async fn enrollment_server(
    ca: Arc<Ca>,
    sign: bool,
) -> (SocketAddr, Arc<std::sync::Mutex<Received>>) {
    let hub = ca.issue_hub(&["127.0.0.1".to_string()]).unwrap();
    let mut chain = parse_certs(&hub.cert_pem).unwrap();
    chain.push(ca.cert_der().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, parse_key(&hub.key_pem).unwrap())
    .unwrap();
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let received = Arc::new(std::sync::Mutex::new(Received::default()));
    let seen = received.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(connection) = incoming.await else {
                continue;
            };
            seen.lock().unwrap().handshakes += 1;
            let Ok((mut send, mut recv)) = connection.accept_bi().await else {
                continue;
            };
            let bytes = recv.read_to_end(64 * 1024).await.unwrap_or_default();
            seen.lock().unwrap().bytes.extend_from_slice(&bytes);
            if sign && bytes.len() > 4 {
                let request = decode_request(&bytes[4..]).unwrap();
                let signer = Signer::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
                let agent = rna::enroll::csr::requested_agent(&request.csr_der).unwrap();
                let admission = Admission {
                    token_id: "0123456789ab".into(),
                    tenant: "acme/prod".parse().unwrap(),
                    agent,
                };
                let signed = signer
                    .sign(
                        &request.csr_der,
                        &admission,
                        Duration::from_secs(3600),
                        SystemTime::now(),
                    )
                    .unwrap();
                let reply = EnrollReply::Issued(Issued {
                    chain: vec![CertBytes(signed.cert_der)],
                    ca: CertBytes(ca.cert_der()),
                    connect_token: Secret::new(format!("rna_0123456789ab_{}", "e".repeat(48))),
                    serial: signed.serial,
                    not_after: signed.not_after,
                });
                let _ = send.write_all(&encode_reply(&reply).unwrap()).await;
                let _ = send.finish();
                let _ = connection.closed().await;
            }
        }
    });
    (addr, received)
}

/// A join line of the hub whose CA is `ca`, dialling `addr`.
fn join_line_for(ca: &Ca, addr: SocketAddr) -> (String, String) {
    let pin = rna::enroll::ca_pin(&ca.cert_der()).unwrap();
    let new = rna::enroll::NewJoin::new(
        "acme/prod".parse().unwrap(),
        rna::enroll::NameRule::Exact("edge".into()),
    );
    let (line, _) =
        rna::enroll::join::create(new, pin, &addr.to_string(), SystemTime::now()).unwrap();
    (
        line.command.expose().to_string(),
        line.token.expose().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_of_another_ca_never_receives_the_join_secret() {
    let right = Ca::generate("rna CA").unwrap();
    let impostor = Arc::new(Ca::generate("rna CA").unwrap());
    let (addr, received) = enrollment_server(impostor, false).await;
    // The line names the impostor's address but pins the right CA.
    let (line, token) = join_line_for(&right, addr);
    let tmp = tempfile::tempdir().unwrap();
    let ran = agent(&argv(&line), &tmp.path().join("agent"))
        .run_async()
        .await;
    assert_ne!(ran.code(), 0);
    assert!(
        ran.stderr
            .contains("does not match the join token's CA pin"),
        "{}",
        ran.stderr
    );
    let seen = received.lock().unwrap();
    assert_eq!(
        seen.handshakes, 0,
        "the agent finished a handshake with the impostor"
    );
    assert!(seen.bytes.is_empty());
    let secret = JoinToken::parse(&token).unwrap();
    assert!(!String::from_utf8_lossy(&seen.bytes).contains(secret.id()));
    assert!(!tmp.path().join("agent").join("agent-key.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_enrollment_request_carries_a_csr_and_never_the_private_key() {
    let ca = Arc::new(Ca::generate("rna CA").unwrap());
    let (addr, received) = enrollment_server(ca.clone(), true).await;
    let (_, token) = join_line_for(&ca, addr);
    let tmp = tempfile::tempdir().unwrap();
    let state = rna::agent::AgentState::new(&tmp.path().join("agent"));
    let hub: rna::agent::HubTarget = addr.to_string().parse().unwrap();
    within(
        "enrollment",
        rna::agent::enroll::enroll(&[hub], None, "edge", &token, &state, &quic_only()),
    )
    .await
    .unwrap();
    let bytes = received.lock().unwrap().bytes.clone();
    let request = decode_request(&bytes[4..]).unwrap();
    assert_eq!(request.join_token.expose(), token);
    // The key the agent stored: neither its PEM nor its DER (nor any 16-byte run of its
    // secret part outside the CSR's public key) is in what the hub received.
    let key_pem = std::fs::read_to_string(state.key()).unwrap();
    let key_der = parse_key(&key_pem).unwrap();
    let key_der = key_der.secret_der();
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(&bytes, key_pem.as_bytes()));
    assert!(!contains(&bytes, key_der));
    for run in key_der.chunks(16).filter(|c| c.len() == 16) {
        assert!(!contains(&bytes, run) || contains(&request.csr_der, run));
    }
    // The CSR is for the stored key: the issued certificate works with it.
    let tls = rna::transport::ClientTls::load(&state.ca(), &state.cert(), &state.key()).unwrap();
    tls.check().unwrap();
}

/// The serial of the certificate an agent state folder holds.
fn stored_serial(state: &rna::agent::AgentState) -> String {
    let chain = rna::certs::load_certs(&state.cert()).unwrap();
    rna::enroll::agent_identity(&chain[0]).unwrap().serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_enrollment_is_replaced_by_enrolling_again_with_a_new_join_token() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub =
        HubProcess::start_with(&tmp.path().join("hub"), &["--agent-cert-lifetime", "5s"]).await;
    let first_line = hub.join_line("acme/prod", &["--name", "edge"]).await;
    let agent_dir = tmp.path().join("agent");
    let state = rna::agent::AgentState::new(&agent_dir);
    let mut first = agent(&argv(&first_line), &agent_dir).spawn();
    first.wait_line("connected to hub").await;
    first.signal("-TERM");
    assert!(first.exit().await.success());
    let old_serial = stored_serial(&state);

    eventually("the stored certificate to expire", || {
        !state.still_valid(SystemTime::now())
    })
    .await;
    assert_eq!(state.renewal_due(SystemTime::now()), Some(true));
    // The spent line cannot renew it, and an expired certificate is no fallback.
    let ran = agent(&argv(&first_line), &agent_dir).run_async().await;
    assert_ne!(ran.code(), 0);
    assert!(ran.stderr.contains("(spent)"), "{}", ran.stderr);
    assert_eq!(
        stored_serial(&state),
        old_serial,
        "a refusal changes nothing"
    );

    // A new join token enrolls the same folder again: a new key and certificate.
    let old_key = std::fs::read(state.key()).unwrap();
    let second_line = hub.join_line("acme/prod", &["--name", "edge"]).await;
    let mut second = agent(&argv(&second_line), &agent_dir).spawn();
    second.wait_line("enrolled").await;
    second.wait_line("connected to hub").await;
    assert_ne!(stored_serial(&state), old_serial);
    assert_ne!(std::fs::read(state.key()).unwrap(), old_key);
    second.signal("-TERM");
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_closes_the_session_at_once_and_survives_a_hub_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let hub_dir = tmp.path().join("hub");
    let mut hub = HubProcess::start(&hub_dir).await;
    // Two uses: the second must not bring the revoked agent back.
    let line = hub
        .join_line("acme/prod", &["--name", "edge", "--uses", "2"])
        .await;
    let agent_dir = tmp.path().join("agent");
    let mut live = agent(&argv(&line), &agent_dir).spawn();
    live.wait_line("connected to hub").await;

    let revoke = Rna::new(["certs", "revoke", "--state-dir", &hub.state(), "edge"]);
    let ran = revoke.run_async().await;
    assert_eq!(ran.code(), 0, "{}", ran.stderr);
    let revoked_at = std::time::Instant::now();
    assert!(ran.stdout.starts_with("revoked "), "{}", ran.stdout);
    let closed = live.wait_line("certificate_revoked").await;
    let took = revoked_at.elapsed();
    eprintln!("revocation closed the live session {took:?} after `rna certs revoke` returned");
    // One second is the goal; the bound allows for a loaded machine.
    assert!(took < Duration::from_secs(5), "{took:?}: {closed}");
    hub.process
        .wait_line("closing agent session: certificate revoked")
        .await;
    let listed = Rna::new(["certs", "list", "--state-dir", &hub.state()])
        .run_async()
        .await;
    assert!(listed.stdout.contains("revoked"), "{}", listed.stdout);

    // The join token's second use cannot enroll the revoked name again.
    let err = refused(argv(&line), &tmp.path().join("again")).await;
    assert!(err.contains("(revoked)"), "{err}");
    live.signal("-TERM");
    assert!(live.exit().await.success());

    // A restarted hub keeps the revocation and the issued certificate.
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
    let hub = HubProcess::start(&hub_dir).await;
    let mut after = agent(
        &["agent".into(), "--hub".into(), hub.quic.clone()],
        &agent_dir,
    )
    .spawn();
    after.wait_line("certificate_revoked").await;
    let listed = Rna::new(["certs", "list", "--state-dir", &hub.state()])
        .run_async()
        .await;
    assert!(
        listed.stdout.contains("edge") && listed.stdout.contains("revoked"),
        "{}",
        listed.stdout
    );
    after.signal("-TERM");
}

/// `curl -X POST` with a bearer token: the status code and the body.
async fn post(url: &str, token: &str) -> (String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-X", "POST", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(url)
        .output();
    let out = within("curl", out).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_api_revokes_an_agent_with_an_admin_token_only() {
    if !have_curl() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::start(&tmp.path().join("hub")).await;
    let admin = hub.token("ops/admin", "admin").await;
    let reader = hub.token("acme/prod", "read:infra:data").await;
    let line = hub.join_line("acme/prod", &["--name", "edge"]).await;
    let agent_dir = tmp.path().join("agent");
    let mut live = agent(&argv(&line), &agent_dir).spawn();
    live.wait_line("connected to hub").await;

    let url = |agent: &str| format!("http://{}/api/v1/agents/{agent}/revoke", hub.api);
    let (code, body) = post(&url("edge"), &reader).await;
    assert_eq!(code, "403", "{body}");
    let (code, body) = post(&url("nobody"), &admin).await;
    assert_eq!(code, "404", "{body}");
    assert!(body.contains("nobody"), "{body}");
    let (code, body) = post(&url("edge"), &admin).await;
    assert_eq!(code, "200", "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let serial = answer["revoked"][0]["serial"].as_str().unwrap().to_string();
    assert_eq!(answer["revoked"][0]["tenant"], "acme/prod");
    let chain = rna::certs::load_certs(&agent_dir.join("agent.pem")).unwrap();
    assert_eq!(
        rna::enroll::agent_identity(&chain[0]).unwrap().serial,
        serial
    );
    live.wait_line("certificate_revoked").await;
    live.signal("-TERM");
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
}

/// The join token of a printed line.
fn token_of(line: &str) -> String {
    line.split(" --join ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_of_another_tenant_cannot_enroll_an_agent_of_this_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::start(&tmp.path().join("hub")).await;
    let hub_target: rna::agent::HubTarget = hub.quic.parse().unwrap();
    let state = rna::agent::AgentState::new(&tmp.path().join("agent"));
    let enroll = |line: String| {
        let (hub, state) = (hub_target.clone(), state.clone());
        async move {
            let (token, hubs) = (token_of(&line), [hub]);
            let reach = quic_only();
            let enrolling = rna::agent::enroll::enroll(&hubs, None, "edge", &token, &state, &reach);
            within("enrollment", enrolling).await
        }
    };
    let first = hub.join_line("acme/prod", &["--name", "edge"]).await;
    enroll(first).await.unwrap();
    let serial = stored_serial(&state);

    // The agent now belongs to acme/prod: a join token of globex/prod is refused, and nothing
    // it holds changes.
    let foreign = hub.join_line("globex/prod", &["--name", "edge"]).await;
    match enroll(foreign).await {
        Err(rna::agent::EnrollmentError::Refused { code, message }) => {
            assert_eq!(code, rna::enroll::RefusalCode::TenantMismatch);
            assert!(
                message.contains("is for tenant globex/prod, not acme/prod"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stored_serial(&state), serial);

    // A join token of its own tenant enrolls it again.
    let own = hub.join_line("acme/prod", &["--name", "edge"]).await;
    let renewed = enroll(own).await.unwrap();
    assert_ne!(renewed, serial);
    assert_eq!(stored_serial(&state), renewed);
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_lines_work_in_a_shell_and_an_unknown_address_is_a_named_placeholder() {
    let tmp = tempfile::tempdir().unwrap();
    // A state folder no hub has run from yet: the line says what to replace.
    let fresh = tmp.path().join("fresh");
    let ran = Rna::new([
        "certs",
        "init",
        "--dir",
        fresh.to_str().unwrap(),
        "--hub-name",
        "x",
    ])
    .run_async()
    .await;
    assert_eq!(ran.code(), 0, "{}", ran.stderr);
    let ran = Rna::new([
        "token",
        "create",
        "--join",
        "--state-dir",
        fresh.to_str().unwrap(),
        "--tenant",
        "acme/prod",
        "--name",
        "edge",
    ])
    .run_async()
    .await;
    assert_eq!(ran.code(), 0, "{}", ran.stderr);
    assert!(
        ran.stdout
            .starts_with("rna agent --hub HUB-HOST:4433 --join rna_join_"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stderr.contains("replace HUB-HOST:4433"),
        "{}",
        ran.stderr
    );

    // A fleet token: the printed line names the agent by its host name, filled in by the shell.
    let mut hub = HubProcess::start(&tmp.path().join("hub")).await;
    let line = hub
        .join_line("acme/prod", &["--name-prefix", "edge-", "--uses", "3"])
        .await;
    assert!(line.ends_with(" --name edge-$(hostname -s)"), "{line}");
    let host = std::process::Command::new("hostname")
        .arg("-s")
        .output()
        .unwrap();
    let host = String::from_utf8(host.stdout).unwrap().trim().to_string();
    if !rna::identity::valid_agent_name(&format!("edge-{host}")) {
        eprintln!("host name {host:?} makes no agent name; the shell part is not checked");
        return;
    }
    let script = line.replacen("rna ", &format!("exec {} ", crate::common::RNA), 1);
    let agent_dir = tmp.path().join("fleet");
    let mut member = shell(&script, &agent_dir);
    member.wait_line("connected to hub").await;
    let chain = rna::certs::load_certs(&agent_dir.join("agent.pem")).unwrap();
    let identity = rna::enroll::agent_identity(&chain[0]).unwrap();
    assert_eq!(identity.agent, format!("edge-{host}"));
    member.signal("-TERM");
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
}

/// Runs `script` with `sh -c` as the agent's environment of [`agent`] sets it up, its standard
/// error followed line by line like an [`RnaProcess`]'s (`exec` makes the pid rna's).
fn shell(script: &str, state: &Path) -> RnaProcess {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(script);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RNA_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .env("RNA_STATE_DIR", state)
        .env("RNA_ALLOW", "127.0.0.0/8")
        .env("RNA_METRICS", "off")
        .env("RNA_LOG_FORMAT", "text")
        .env("RNA_LOG_LEVEL", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, log) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            let _ = tx.send(line);
        }
    });
    RnaProcess { child, log }
}

/// The files of an agent state folder copied to `to`, to start an agent from them later.
fn copy_state(state: &rna::agent::AgentState, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in [state.ca(), state.cert(), state.key(), state.token()] {
        std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_renews_over_the_live_session_without_breaking_a_download() {
    if !have_curl() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Renewal two thirds into a 6 s lifetime: every 4 s or so, so a download of 10 s or more
    // spans at least one.
    let mut hub =
        HubProcess::start_with(&tmp.path().join("hub"), &["--agent-cert-lifetime", "6s"]).await;
    let proxy = hub.token("acme/prod", "proxy").await;
    let line = hub.join_line("acme/prod", &["--name", "edge"]).await;
    let agent_dir = tmp.path().join("agent");
    let state = rna::agent::AgentState::new(&agent_dir);
    let mut live = agent(&argv(&line), &agent_dir).spawn();
    live.wait_line("connected to hub").await;
    let first_serial = stored_serial(&state);
    let old = tmp.path().join("old");
    copy_state(&state, &old);

    let http = http_server().await;
    const SIZE: usize = 64 * 1024 * 1024;
    let url = format!("http://127.0.0.1:{}/bytes/{SIZE}", http.port());
    let socks = hub.socks;
    let download = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let got = curl(socks, "edge", &proxy, &["--limit-rate", "6M", &url]).await;
        (got, started.elapsed())
    });
    // The agent renews, makes a new session with the new certificate, and moves to it while
    // the download still runs on the old one.
    let renewed = lines_until(&mut live.log, "certificate renewed").await;
    assert!(
        !renewed.iter().any(|l| l.contains("renewal failed")),
        "{renewed:#?}"
    );
    lines_until(
        &mut live.log,
        "new session with the renewed certificate or rotated token is up",
    )
    .await;
    assert!(
        !download.is_finished(),
        "the download must still run when the agent moves"
    );
    let ((code, body), took) = within("the download", download).await.unwrap();
    eprintln!("64 MiB through SOCKS in {took:?} across a certificate renewal");
    assert_eq!(code, 0);
    assert_eq!(body.len(), SIZE);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(SIZE)));

    // A new certificate and key in the state folder; the key stays private.
    let serial = stored_serial(&state);
    assert_ne!(serial, first_serial);
    assert_eq!(mode(&state.key()), 0o600);
    let listed = Rna::new(["certs", "list", "--state-dir", &hub.state()])
        .run_async()
        .await;
    assert!(
        listed.stdout.contains(&serial) && listed.stdout.contains(&first_serial),
        "{}",
        listed.stdout
    );
    hub.process.wait_line("agent certificate renewed").await;

    // The first certificate, expired now, is refused by the hub (its token is still live).
    eventually("the first certificate to expire", || {
        rna::agent::AgentState::new(&old)
            .still_valid(SystemTime::now())
            .not()
    })
    .await;
    // `rna agent` itself refuses to start with an expired certificate, so the attempt is
    // made through the library: the hub's TLS refuses it.
    rna::transport::tls::install_provider();
    let tls = rna::transport::ClientTls::load(
        &old.join("ca.pem"),
        &old.join("agent.pem"),
        &old.join("agent-key.pem"),
    )
    .unwrap();
    let hub_addr: SocketAddr = hub.quic.parse().unwrap();
    let token = rna::auth::read_secret_file(&old.join("token.txt")).unwrap();
    let config = rna::agent::AgentConfig::new(
        vec![hub.quic.parse().unwrap()],
        "edge".into(),
        tls.clone(),
        token,
    );
    let endpoint = rna::transport::agent_endpoint(hub_addr, &tls, &config.limits).unwrap();
    let refused = rna::agent::session::connect(&endpoint, hub_addr, "127.0.0.1", &config)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, rna::agent::SessionError::Tls(why)
            if why.contains("refused this agent's certificate") && why.contains("expired")),
        "{refused}"
    );
    // The agents API shows when each session's certificate expires: renewed ones only now.
    let first_end =
        rna::certs::not_after(&rna::certs::load_certs(&old.join("agent.pem")).unwrap()[0])
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
    let reader = hub.token("acme/prod", "read:infra:data").await;
    // The first session closes once the download's stream has ended: polled, not assumed.
    eventually_async("only sessions of renewed certificates", async || {
        let out = tokio::process::Command::new("curl")
            .args(["-sf", "-H"])
            .arg(format!("Authorization: Bearer {reader}"))
            .arg(format!("http://{}/api/v1/agents", hub.api))
            .output()
            .await
            .unwrap();
        let Ok(listed) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        let agents = listed["agents"].as_array().cloned().unwrap_or_default();
        let ends: Vec<Option<u64>> = agents
            .iter()
            .map(|a| a["certificate_not_after_unix"].as_u64())
            .collect();
        !ends.is_empty() && ends.iter().all(|end| end.is_some_and(|e| e > first_end))
    })
    .await;
    // The renewing agent is still connected.
    let (code, body) = curl(
        hub.socks,
        "edge",
        &hub.token("acme/prod", "proxy").await,
        &[&format!("http://127.0.0.1:{}/bytes/1000", http.port())],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(body, pattern(1000));
    live.signal("-TERM");
    assert!(live.exit().await.success());
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connect_token_rotates_over_the_live_session_and_the_old_one_is_refused() {
    if !have_curl() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hub_dir = tmp.path().join("hub");
    let port = crate::common::free_udp_and_tcp_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut hub = HubProcess::start_with(&hub_dir, &["--listen", &listen]).await;
    let admin = hub.token("ops/admin", "admin").await;
    let proxy = hub.token("acme/prod", "proxy").await;
    let reader = hub.token("acme/prod", "read:infra:data").await;
    let line = hub.join_line("acme/prod", &["--name", "edge"]).await;
    let agent_dir = tmp.path().join("agent");
    let state = rna::agent::AgentState::new(&agent_dir);
    let mut live = agent(&argv(&line), &agent_dir).spawn();
    live.wait_line("connected to hub").await;
    let old_token = std::fs::read_to_string(state.token()).unwrap();

    let http = http_server().await;
    const SIZE: usize = 64 * 1024 * 1024;
    let url = format!("http://127.0.0.1:{}/bytes/{SIZE}", http.port());
    let socks = hub.socks;
    let download =
        tokio::spawn(
            async move { curl(socks, "edge", &proxy, &["--limit-rate", "12M", &url]).await },
        );
    // Once bytes flow, so the transfer runs on the session that gets the new token.
    let rotate = |agent: &str| format!("http://{}/api/v1/agents/{agent}/rotate-token", hub.api);
    eventually_async("the download to start", async || {
        let status = tokio::process::Command::new("curl")
            .args(["-sf", "-H"])
            .arg(format!("Authorization: Bearer {reader}"))
            .arg(format!("http://{}/api/v1/agents", hub.api))
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&status.stdout).contains("\"open_streams\":1")
    })
    .await;
    let (code, body) = post(&rotate("edge"), &reader).await;
    assert_eq!(code, "403", "{body}");
    let (code, body) = post(&rotate("nobody"), &admin).await;
    assert_eq!(code, "404", "{body}");
    let (code, body) = post(&rotate("edge"), &admin).await;
    assert_eq!(code, "200", "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let old_id = answer["rotated"][0]["old_token_id"]
        .as_str()
        .unwrap()
        .to_string();
    let new_id = answer["rotated"][0]["new_token_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(answer["rotated"][0]["sessions"], 1, "{body}");
    assert!(old_token.contains(&old_id), "{old_id}");

    lines_until(&mut live.log, "connect token rotated by the hub and stored").await;
    let new_token = std::fs::read_to_string(state.token()).unwrap();
    assert!(new_token.contains(&new_id), "{new_token}");
    assert_eq!(mode(&state.token()), 0o600);
    lines_until(&mut live.log, "rotated token is up").await;
    assert!(
        !download.is_finished(),
        "the download must still run when the agent moves"
    );
    let (code, body) = within("the download", download).await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(body.len(), SIZE);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(SIZE)));
    // The old token is revoked once the old session has drained, and refused from then on.
    hub.process
        .wait_line("old connect token revoked: no session uses it any more")
        .await;
    rna::transport::tls::install_provider();
    let tls = rna::transport::ClientTls::load(&state.ca(), &state.cert(), &state.key()).unwrap();
    let hub_addr: SocketAddr = hub.quic.parse().unwrap();
    let config = rna::agent::AgentConfig::new(
        vec![hub.quic.parse().unwrap()],
        "edge".into(),
        tls.clone(),
        Secret::new(old_token.trim().to_string()),
    );
    let endpoint = rna::transport::agent_endpoint(hub_addr, &tls, &config.limits).unwrap();
    let refused = rna::agent::session::connect(&endpoint, hub_addr, "127.0.0.1", &config)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &refused,
            rna::agent::SessionError::Rejected {
                code: rna::proto::CloseCode::TokenRevoked,
                ..
            }
        ),
        "{refused}"
    );

    // A restarted hub (same port) takes the agent back with the new token.
    hub.process.signal("-TERM");
    assert!(hub.process.exit().await.success());
    lines_until(&mut live.log, "hub is going away").await;
    let _hub = HubProcess::start_with(&hub_dir, &["--listen", &listen]).await;
    let after = lines_until(&mut live.log, "connected to hub").await;
    assert!(
        !after.iter().any(|l| l.contains("token_revoked")),
        "{after:#?}"
    );
    live.signal("-TERM");
    assert!(live.exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_enroll_over_the_tcp_fallback_when_udp_gets_no_answer_or_tcp_is_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    // TCP on X; nothing answers UDP on X (the hub's QUIC is elsewhere): UDP blocked on the
    // way, as far as an agent dialing X can tell.
    let x = crate::common::free_udp_and_tcp_port();
    let tcp_listen = format!("127.0.0.1:{x}");
    let hub = HubProcess::start_with(&tmp.path().join("hub"), &["--tcp-listen", &tcp_listen]).await;
    assert_ne!(hub.quic, tcp_listen);
    for (name, extra) in [
        ("edge-tcp", vec!["--transport", "tcp"]),
        ("edge-auto", vec!["--quic-fallback-after", "1s"]),
    ] {
        let line = hub.join_line("acme/prod", &["--name", name]).await;
        let mut args = argv(&line);
        assert_eq!(args[1], "--hub", "{line}");
        args[2] = tcp_listen.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        let dir = tmp.path().join(name);
        let mut agent = agent(&args, &dir).spawn();
        let log = lines_until(&mut agent.log, "connected to hub").await;
        let enrolled = log
            .iter()
            .position(|l| l.contains("enrolled"))
            .unwrap_or_else(|| panic!("{log:#?}"));
        if name == "edge-auto" {
            let fell_back = log
                .iter()
                .position(|l| l.contains("(UDP)") && l.contains("trying TLS over TCP"))
                .unwrap_or_else(|| panic!("{log:#?}"));
            assert!(fell_back < enrolled, "{log:#?}");
        }
        assert!(log.last().unwrap().contains("transport=tcp"), "{log:#?}");
        assert!(rna::agent::AgentState::new(&dir).is_enrolled());
        agent.signal("-TERM");
        assert!(agent.exit().await.success());
    }
}
