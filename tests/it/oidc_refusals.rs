//! Every kind of refused JWT, through a running hub: at the admin API each has its own HTTP
//! status and message, at an agent's Hello its own close code and one hub log line naming
//! it, and each its own `rna_oidc_tokens_total` result: wrong audience, expired, not yet
//! valid, another issuer, `alg: none`, HS256 signed with the issuer's published key, a token
//! missing the scope, and a tenant claim of another tenant reaching for an agent. The tokens
//! are forged here with an ES256 key the hub trusts through a JWK Set file, so each claim can
//! be set to exactly what the case needs (the real issuer's refusals are in oidc_flow.rs).
//! Also: SIGHUP makes a running hub read its issuers file again.

use std::time::Duration;

use crate::common::*;
use crate::oidc::AUDIENCE;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use rna::agent::SessionError;
use rna::oidc::IssuerConfig;
use rna::proto::CloseCode;
use serde_json::{json, Value};

/// The trusted issuer the tokens below claim.
const ISS: &str = "https://forge.rna.test";

/// An ES256 key the hub trusts as `ISS`'s, and its published JWK Set.
struct Forge {
    pair: EcdsaKeyPair,
    jwks: String,
    config: IssuerConfig,
    _dir: tempfile::TempDir,
}

fn forge() -> Forge {
    forge_for(ISS)
}

/// A key the hub trusts as `iss`'s.
fn forge_for(iss: &str) -> Forge {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let p = pair.public_key().as_ref();
    let jwks = format!(
        r#"{{"keys":[{{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"k1","x":"{}","y":"{}"}}]}}"#,
        URL_SAFE_NO_PAD.encode(&p[1..33]),
        URL_SAFE_NO_PAD.encode(&p[33..])
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, &jwks).unwrap();
    let mut config = IssuerConfig::new(iss, &[AUDIENCE], "rna_tenant");
    config.jwks_file = Some(path);
    config.leeway = Duration::from_secs(5);
    Forge {
        pair,
        jwks,
        config,
        _dir: dir,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims of a good token for client `edge` of acme/prod with `scope`.
fn claims(scope: &str) -> Value {
    let now = now();
    json!({
        "iss": ISS, "sub": "edge", "aud": [AUDIENCE], "exp": now + 300, "iat": now,
        "nbf": now, "client_id": "edge", "scope": scope, "rna_tenant": "acme/prod",
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

impl Forge {
    /// An ES256 token over `claims`, signed with the trusted key.
    fn sign(&self, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"})),
            b64(claims)
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    /// `alg: none` over `claims`, no signature.
    fn unsigned(&self, claims: &Value) -> String {
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "at+jwt"})),
            b64(claims)
        )
    }

    /// HS256 keyed with the issuer's published JWK Set: the key-confusion forgery.
    fn hs256_with_public_key(&self, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": "HS256", "kid": "k1", "typ": "at+jwt"})),
            b64(claims)
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.jwks.as_bytes());
        let mac = ring::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
    }
}

/// The `error` of a JSON refusal.
fn error_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.to_owned())
}

/// One refusal: the token, what the admin API answers, what an agent presenting it (with
/// `connect:agentHub` where the case allows) is closed with, and the metric's labels.
struct Case {
    what: &'static str,
    api_token: String,
    agent_token: String,
    status: u16,
    message: String,
    close: CloseCode,
    metric: (&'static str, &'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_refused_jwt_has_its_status_close_code_log_line_and_metric() {
    let logs = process_logs();
    let f = forge();
    let config = f.config.clone();
    let world = World::start_with(move |c| c.oidc_issuers = vec![config]).await;
    let read = "read:infra:data";
    let connect = "connect:agentHub";
    let both = |token: &dyn Fn(&str) -> String| (token(read), token(connect));

    // The good token works, so every refusal below is the case's own.
    let (status, body) =
        http_get_as(world.api, "/api/v1/agents", Some(&f.sign(&claims(read)))).await;
    assert_eq!(status, 200, "{body}");

    let mut cases = Vec::new();
    let mut case = |what, tokens: (String, String), status, message: String, close, metric| {
        cases.push(Case {
            what,
            api_token: tokens.0,
            agent_token: tokens.1,
            status,
            message,
            close,
            metric,
        })
    };
    case(
        "wrong audience",
        both(&|s| f.sign(&with(claims(s), "aud", json!(["https://other.example"])))),
        401,
        format!("JWT audience is not accepted by issuer {ISS}"),
        CloseCode::BadToken,
        (ISS, "wrong_audience"),
    );
    case(
        "expired",
        both(&|s| f.sign(&with(claims(s), "exp", json!(now() - 60)))),
        401,
        format!("JWT from issuer {ISS} has expired"),
        CloseCode::TokenExpired,
        (ISS, "expired"),
    );
    case(
        "not yet valid",
        both(&|s| f.sign(&with(claims(s), "nbf", json!(now() + 600)))),
        401,
        format!("JWT from issuer {ISS} is not valid yet"),
        CloseCode::BadToken,
        (ISS, "not_yet_valid"),
    );
    case(
        "another issuer",
        both(&|s| f.sign(&with(claims(s), "iss", json!("https://elsewhere.example")))),
        401,
        "JWT issuer \"https://elsewhere.example\" is not trusted".into(),
        CloseCode::BadToken,
        ("untrusted", "untrusted_issuer"),
    );
    case(
        "alg none",
        both(&|s| f.unsigned(&claims(s))),
        401,
        "JWT algorithm \"none\" is refused".into(),
        CloseCode::BadToken,
        ("unknown", "alg_refused"),
    );
    case(
        "HS256 with the issuer's public key",
        both(&|s| f.hs256_with_public_key(&claims(s))),
        401,
        "JWT algorithm \"HS256\" is refused".into(),
        CloseCode::BadToken,
        ("unknown", "alg_refused"),
    );
    // Valid, but without the scope the route (or the Hello) needs.
    case(
        "missing scope",
        (f.sign(&claims("proxy")), f.sign(&claims("proxy"))),
        403,
        "JWT lacks scope read:infra:data".into(),
        CloseCode::MissingScope,
        (ISS, "missing_scope"),
    );

    let metric =
        |labels: (&'static str, &'static str)| world.hub.metrics().oidc_tokens(labels.0, labels.1);
    let mut messages = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        // The admin API: status and message.
        let before = metric(c.metric);
        let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&c.api_token)).await;
        assert_eq!(status, c.status, "{}: {body}", c.what);
        assert_eq!(error_of(&body), c.message, "{}", c.what);
        assert!(
            !body.contains(&c.api_token),
            "{}: the token is echoed",
            c.what
        );
        assert_eq!(metric(c.metric), before + 1, "{}: counted", c.what);
        messages.push(c.message.clone());

        // An agent's Hello: its close code, and one hub line naming the agent and the cause.
        let name = format!("refused-{i}");
        let mut config = world.agent_config(&name, &c.agent_token);
        // One attempt is enough; a slow retry keeps the hub's line budget for the others.
        config.backoff.refused = Duration::from_secs(30);
        let agent = world.spawn_agent(config);
        let seen = within(
            &format!("{}: the agent to be refused", c.what),
            agent
                .handle
                .wait_until(|s| matches!(&s.last_error, Some(SessionError::Rejected { .. }))),
        )
        .await;
        match &seen.last_error {
            Some(SessionError::Rejected { code, reason }) => {
                assert_eq!(*code, c.close, "{}: {reason}", c.what);
                assert!(
                    reason.contains(&c.message.replace("read:infra:data", "connect:agentHub")),
                    "{}: {reason}",
                    c.what
                );
            }
            other => panic!("{}: {other:?}", c.what),
        }
        agent.stop().await;
        let line = format!("agent refused: agent \"{name}\": ");
        eventually(&format!("{}: the hub's log line", c.what), || {
            logs.text().lines().any(|l| {
                l.contains(&line)
                    && l.contains(&c.message.replace("read:infra:data", "connect:agentHub"))
            })
        })
        .await;
        assert!(
            !logs.text().contains(&c.agent_token),
            "{}: a token is in the logs",
            c.what
        );
    }
    // Each refusal reads differently (the two alg refusals name their algorithm).
    let mut distinct = messages.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), messages.len(), "{messages:#?}");

    // A tenant claim of another tenant reaching for acme/prod's agent: the agent answers
    // exactly as one that does not exist, at the agents list, its inventory and a Kubernetes
    // command; the same JWT with acme/prod reaches it.
    let agent = world
        .connect_agent("acme/prod", "edge", &f.sign(&claims(connect)), 1)
        .await;
    let globex = f.sign(&with(claims(read), "rna_tenant", json!("globex/prod")));
    let acme = f.sign(&claims(read));
    let (status, body) = http_get_as(world.api, "/api/v1/agents", Some(&globex)).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("edge"), "{body}");
    for path in [
        "/api/v1/agents/edge/inventory",
        "/api/v1/agents/edge/kube/v1/Namespace/default",
    ] {
        let (status, body) = http_get_as(world.api, path, Some(&globex)).await;
        let missing = path.replace("/edge/", "/nobody/");
        let (status_missing, body_missing) = http_get_as(world.api, &missing, Some(&globex)).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(
            (status, body.replace("edge", "X")),
            (status_missing, body_missing.replace("nobody", "X")),
            "{path}: another tenant's agent reads as a missing one"
        );
        let (status, body) = http_get_as(world.api, path, Some(&acme)).await;
        assert_ne!(status, 404, "{path}: {body}");
    }
    agent.stop().await;
    world.stop().await;
}

impl Forge {
    /// This issuer as an `[[oidc_issuer]]` table of the hub's issuers file.
    fn table(&self) -> String {
        format!(
            "[[oidc_issuer]]\nurl = \"{}\"\naudiences = [\"{AUDIENCE}\"]\n\
             tenant_claim = \"rna_tenant\"\njwks_file = \"{}\"\n",
            self.config.url,
            self.config.jwks_file.as_ref().unwrap().display()
        )
    }

    /// A good token of this issuer with `read:infra:data`.
    fn reader(&self) -> String {
        self.sign(&with(
            claims("read:infra:data"),
            "iss",
            json!(self.config.url),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_issuers_file() {
    let a = forge_for("https://forge-a.rna.test");
    let b = forge_for("https://forge-b.rna.test");
    let dir = tempfile::tempdir().unwrap();
    rna::certs::init_dir(dir.path(), &["127.0.0.1".to_string()], false).unwrap();
    let store = dir.path().join("tokens.toml");
    std::fs::write(&store, "").unwrap();
    let issuers = dir.path().join("issuers.toml");
    std::fs::write(&issuers, a.table()).unwrap();
    let args = hub_process_args(
        &dir.path().display().to_string(),
        &store.display().to_string(),
        "127.0.0.1:0",
        &["--oidc-issuers-file", &issuers.display().to_string()],
    );
    let (hub, mut log) = spawn_logged(&args);
    let serving = wait_line(&mut log, "hub serving").await;
    let api: std::net::SocketAddr = field(&serving, "api").parse().unwrap();
    let status = async |token: &str| http_get_as(api, "/api/v1/agents", Some(token)).await.0;
    assert_eq!(status(&a.reader()).await, 200);
    assert_eq!(status(&b.reader()).await, 401, "b is not trusted yet");

    // B added: trusted after SIGHUP, A kept.
    std::fs::write(&issuers, format!("{}\n{}", a.table(), b.table())).unwrap();
    signal(&hub, "-HUP");
    let line = wait_line(&mut log, "OIDC issuers reloaded").await;
    assert!(
        line.contains("forge-b.rna.test") && line.contains("kept"),
        "{line}"
    );
    assert_eq!(status(&b.reader()).await, 200);
    assert_eq!(status(&a.reader()).await, 200);

    // A broken file changes nothing, and says so.
    std::fs::write(
        &issuers,
        "[[oidc_issuer]]\nurl = \"http://forge-c.rna.test\"\naudiences = [\"x\"]\n\
         tenant = \"acme/prod\"\n",
    )
    .unwrap();
    signal(&hub, "-HUP");
    let line = wait_line(&mut log, "OIDC issuers not reloaded").await;
    assert!(line.contains("url must be an https URL"), "{line}");
    assert_eq!(status(&a.reader()).await, 200);
    assert_eq!(status(&b.reader()).await, 200);

    // A removed: its tokens are refused from now on.
    std::fs::write(&issuers, b.table()).unwrap();
    signal(&hub, "-HUP");
    let line = wait_line(&mut log, "OIDC issuers reloaded").await;
    assert!(line.contains("forge-a.rna.test"), "{line}");
    assert_eq!(status(&a.reader()).await, 401);
    assert_eq!(status(&b.reader()).await, 200);
    signal(&hub, "-TERM");
}
