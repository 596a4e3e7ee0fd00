//! OIDC identities against a real issuer: npm's `oidc-provider` (tests/oidc/issuer.mjs) over
//! https with a CA made here, reached through discovery. Client-credentials tokens verify
//! and map to scopes and a tenant; the refresher renews before expiry; a rotated key is
//! picked up without a restart; each kind of bad token is refused with its own error; a
//! stopped issuer does not stop tokens signed with cached keys.
//!
//! Needs node and `npm ci` in tests/oidc (.ci/run does it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::{init_logs, within};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer as CaIssuer, KeyPair};
use rna::auth::Scope;
use rna::identity::Secret;
use rna::oidc::fetch::Fetcher;
use rna::oidc::{
    ClientCredentials, IssuerConfig, TokenAuth, TokenEndpoint, Tuning, Verifier, VerifyError,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// The audience the issuer puts in tokens unless another resource is asked for.
pub(crate) const AUDIENCE: &str = "https://hub.rna.test";

/// A running issuer process and the files it was given.
pub(crate) struct TestIssuer {
    child: Child,
    pub(crate) url: String,
    pub(crate) ca: PathBuf,
    _dir: tempfile::TempDir,
}

/// Writes a CA and a certificate for 127.0.0.1 signed by it; returns (ca, cert, key) paths.
fn make_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test issuer CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = CaIssuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("issuer.pem"),
        dir.join("issuer-key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// Starts tests/oidc/issuer.mjs with tokens living `ttl` seconds; waits for its `port=` line.
pub(crate) async fn start_issuer(ttl: u64) -> TestIssuer {
    let script_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
    assert!(
        script_dir.join("node_modules/oidc-provider").is_dir(),
        "oidc-provider is not installed: run `npm ci` in tests/oidc"
    );
    // Node starting oidc-provider is CPU-bound for seconds; a dozen tests starting issuers at
    // once on a loaded 2-core machine starved some past their deadline. Two start at a time,
    // and each one's deadline counts from its turn.
    static STARTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let _turn = STARTING.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(dir.path());
    // A node that has printed nothing after a minute is restarted once: under a full suite on
    // a loaded 2-core machine one start in many stalled past any deadline while a second start
    // came up at once.
    let mut attempt = 0;
    let (child, port) = loop {
        attempt += 1;
        let mut child = Command::new("node")
            .arg(script_dir.join("issuer.mjs"))
            .arg(&cert)
            .arg(&key)
            .env("TOKEN_TTL", ttl.to_string())
            .current_dir(&script_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node must be installed to run the OIDC tests");
        let stdout = child.stdout.take().unwrap();
        let port = tokio::time::timeout(Duration::from_secs(60), async {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(port) = line.strip_prefix("port=") {
                    return port.parse::<u16>().unwrap();
                }
            }
            panic!("the issuer exited before listening");
        })
        .await;
        match port {
            Ok(port) => break (child, port),
            Err(_) if attempt < 2 => continue,
            Err(e) => panic!("the issuer's port line within 60 s, twice: {e:?}"),
        }
    };
    TestIssuer {
        child,
        url: format!("https://127.0.0.1:{port}"),
        ca,
        _dir: dir,
    }
}

impl TestIssuer {
    /// The trusted-issuer settings rna would have for it (keys through discovery).
    pub(crate) fn config(&self) -> IssuerConfig {
        let mut c = IssuerConfig::new(&self.url, &[AUDIENCE], "rna_tenant");
        c.ca = Some(self.ca.clone());
        c.leeway = Duration::from_secs(5);
        c
    }

    /// The client-credentials settings of `client` (its secret is `<client>-secret`).
    pub(crate) fn client(&self, client: &str, scope: &str) -> ClientCredentials {
        let mut c = ClientCredentials::new(
            TokenEndpoint::Issuer(self.url.clone()),
            client,
            Secret::new(format!("{client}-secret")),
        );
        c.scope = scope.to_owned();
        c.ca = Some(self.ca.clone());
        c
    }

    /// One token through discovery and the token endpoint.
    pub(crate) async fn token(&self, creds: &ClientCredentials) -> String {
        let fetcher = creds.fetcher().unwrap();
        let url = creds.token_url(&fetcher).await.unwrap();
        let t = creds.fetch(&fetcher, &url).await.unwrap();
        t.access_token.expose().to_owned()
    }

    /// Stops the issuer process, as an outage would.
    pub(crate) async fn stop(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Makes a new signing key; returns its kid.
    pub(crate) async fn rotate(&self) -> String {
        let f = Fetcher::new(Some(&self.ca), Duration::from_secs(10), 4096).unwrap();
        let doc = f
            .get_json(&format!("{}/test/rotate", self.url))
            .await
            .unwrap();
        doc["kid"].as_str().unwrap().to_owned()
    }
}

fn verifier(issuers: Vec<IssuerConfig>, tuning: Tuning) -> Verifier {
    Verifier::new(issuers, tuning).unwrap()
}

/// The decoded header or claims (`part` 0 or 1) of a JWT.
pub(crate) fn part(token: &str, part: usize) -> serde_json::Value {
    let text = token.split('.').nth(part).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(text).unwrap()).unwrap()
}

#[tokio::test]
async fn client_credentials_token_verifies_through_discovery() {
    init_logs();
    let issuer = start_issuer(60).await;
    let v = verifier(vec![issuer.config()], Tuning::default());
    let scope = "connect:agentHub read:infra:data";
    let es = issuer.token(&issuer.client("edge", scope)).await;
    let rs = issuer.token(&issuer.client("edge-rs", scope)).await;
    let ps = issuer.token(&issuer.client("edge-ps", scope)).await;
    let ed = issuer.token(&issuer.client("edge-ed", scope)).await;
    let mut post = issuer.client("edge-post", scope);
    post.auth = TokenAuth::Body;
    let post = issuer.token(&post).await;
    assert_eq!(part(&es, 0)["alg"], "ES256");
    assert_eq!(part(&rs, 0)["alg"], "RS256");
    assert_eq!(part(&ps, 0)["alg"], "PS256");
    assert_eq!(part(&ed, 0)["alg"], "EdDSA");
    for (token, client) in [
        (&es, "edge"),
        (&rs, "edge-rs"),
        (&ps, "edge-ps"),
        (&ed, "edge-ed"),
        (&post, "edge-post"),
    ] {
        let g = v
            .verify(token)
            .await
            .unwrap_or_else(|e| panic!("{client}: {e}"));
        assert_eq!(g.issuer, issuer.url);
        assert_eq!(g.subject, client);
        assert_eq!(g.client_id.as_deref(), Some(client));
        assert_eq!(g.grant.tenant.as_str(), "acme/prod");
        assert_eq!(
            g.grant.scopes,
            vec![Scope::ConnectAgentHub, Scope::ReadInfraData]
        );
        g.require(Scope::ConnectAgentHub).unwrap();
        assert_eq!(part(token, 1)["exp"].as_i64(), Some(g.expires_at));
    }
    // One discovery + JWKS fetch served all five.
    assert_eq!(v.fetches(&issuer.url), Some(1));

    // Another client's tenant claim maps to its own tenant.
    let globex = issuer.token(&issuer.client("globex", scope)).await;
    let g = v.verify(&globex).await.unwrap();
    assert_eq!(g.grant.tenant.as_str(), "globex/prod");
    assert!(!g.grant.sees_tenant(&"acme/prod".parse().unwrap()));

    // Without the test CA the issuer's certificate is not trusted: no keys, nothing passes.
    let mut untrusted = issuer.config();
    untrusted.ca = None;
    let v = verifier(vec![untrusted], Tuning::default());
    assert_eq!(
        v.verify(&es).await,
        Err(VerifyError::KeysUnavailable(issuer.url.clone()))
    );

    // A wrong client secret is refused by the issuer with its RFC 6749 error code.
    let mut wrong = issuer.client("edge", scope);
    wrong.client_secret = Secret::new("nope".into());
    let f = wrong.fetcher().unwrap();
    let url = wrong.token_url(&f).await.unwrap();
    let err = wrong.fetch(&f, &url).await.unwrap_err().to_string();
    assert!(err.contains("invalid_client"), "{err}");
    assert!(!err.contains("nope"), "{err}");
}

#[tokio::test]
async fn refused_tokens_each_have_their_own_error() {
    init_logs();
    let issuer = start_issuer(60).await;
    let other = start_issuer(60).await;
    let v = verifier(vec![issuer.config()], Tuning::default());
    let edge = issuer.client("edge", "connect:agentHub");
    let good = issuer.token(&edge).await;
    v.verify(&good).await.unwrap();
    let claims = part(&good, 1);
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    let url = || issuer.url.clone();

    let mut wrong_aud = issuer.client("edge", "connect:agentHub");
    wrong_aud.resource = Some("https://other.example".into());
    let wrong_aud = issuer.token(&wrong_aud).await;
    assert_eq!(part(&wrong_aud, 1)["aud"], "https://other.example");

    let other_token = other.token(&other.client("edge", "connect:agentHub")).await;

    let (head, rest) = good.split_once('.').unwrap();
    let payload = rest.split_once('.').unwrap().0;
    let none = format!(
        "{}.{payload}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"at+jwt"}"#)
    );
    // HS256 keyed with the issuer's published RSA key, the classic key-confusion forgery.
    let rs = issuer
        .token(&issuer.client("edge-rs", "connect:agentHub"))
        .await;
    let rs_kid = part(&rs, 0)["kid"].as_str().unwrap().to_owned();
    let f = Fetcher::new(Some(&issuer.ca), Duration::from_secs(10), 1 << 20).unwrap();
    let disc = f
        .get_json(&format!("{}/.well-known/openid-configuration", issuer.url))
        .await
        .unwrap();
    let jwks = f.get(disc["jwks_uri"].as_str().unwrap()).await.unwrap();
    let hs_head = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","kid":"{rs_kid}"}}"#));
    let input = format!("{hs_head}.{payload}");
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &jwks),
        input.as_bytes(),
    );
    let hs256 = format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
    // The real header over another payload: the signature no longer matches.
    let mut forged = claims.clone();
    forged["scope"] = "admin".into();
    let tampered = format!(
        "{head}.{}.{}",
        URL_SAFE_NO_PAD.encode(forged.to_string()),
        good.rsplit('.').next().unwrap()
    );

    let missing_scope = issuer.token(&issuer.client("edge", "proxy")).await;

    let cases: Vec<(&str, String, i64, VerifyError)> = vec![
        (
            "wrong audience",
            wrong_aud,
            iat,
            VerifyError::WrongAudience(url()),
        ),
        (
            "expired",
            good.clone(),
            exp + 6,
            VerifyError::Expired(url()),
        ),
        (
            "not yet valid",
            good.clone(),
            iat - 6,
            VerifyError::NotYetValid(url()),
        ),
        (
            "another issuer",
            other_token,
            iat,
            VerifyError::UnknownIssuer(other.url.clone()),
        ),
        (
            "alg none",
            none,
            iat,
            VerifyError::AlgRefused("none".into()),
        ),
        (
            "HS256 with the public key",
            hs256,
            iat,
            VerifyError::AlgRefused("HS256".into()),
        ),
        (
            "tampered payload",
            tampered,
            iat,
            VerifyError::BadSignature(url()),
        ),
    ];
    let mut messages = Vec::new();
    for (what, token, at, want) in cases {
        let err = v.verify_at(&token, at).await.unwrap_err();
        assert_eq!(err, want, "{what}");
        let line = err.to_string();
        assert!(
            !line.contains(&token),
            "{what}: the token is in the message"
        );
        messages.push(line);
    }
    // Just inside the leeway both ways still passes.
    v.verify_at(&good, exp + 5).await.unwrap();
    v.verify_at(&good, iat - 5).await.unwrap();

    let g = v.verify(&missing_scope).await.unwrap();
    assert_eq!(g.grant.scopes, vec![Scope::Proxy]);
    let err = g.require(Scope::ConnectAgentHub).unwrap_err();
    assert_eq!(err, VerifyError::MissingScope(Scope::ConnectAgentHub));
    messages.push(err.to_string());

    let mut distinct = messages.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), messages.len(), "{messages:#?}");
}

#[tokio::test]
async fn refresher_renews_before_expiry() {
    init_logs();
    // 10 s tokens: renewed at about 8 s, leaving 2 s for the request on a loaded machine.
    let issuer = start_issuer(10).await;
    let v = verifier(vec![issuer.config()], Tuning::default());
    let shutdown = CancellationToken::new();
    let (mut rx, task) = issuer
        .client("edge", "connect:agentHub")
        .start(shutdown.clone())
        .await
        .unwrap();
    let first = rx.borrow_and_update().clone();
    assert_eq!(first.number, 1);
    v.verify(first.token.expose()).await.unwrap();
    let mut previous = first;
    // A bound of 4 lifetimes per renewal on a loaded machine.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(40), rx.changed())
            .await
            .expect("a renewal within three token lifetimes")
            .unwrap();
        let at = tokio::time::Instant::now();
        let current = rx.borrow_and_update().clone();
        assert_eq!(current.number, previous.number + 1);
        assert!(at < previous.expires_at, "renewed only after expiry");
        assert_ne!(current.token.expose(), previous.token.expose());
        v.verify(current.token.expose()).await.unwrap();
        previous = current;
    }
    shutdown.cancel();
    within("the refresher to stop", task).await.unwrap();
}

#[tokio::test]
async fn key_rotation_is_picked_up_without_restart() {
    init_logs();
    let issuer = start_issuer(60).await;
    let fast = verifier(
        vec![issuer.config()],
        Tuning {
            min_refresh_interval: Duration::ZERO,
            ..Tuning::default()
        },
    );
    let limited = verifier(vec![issuer.config()], Tuning::default());
    let edge = issuer.client("edge", "connect:agentHub");
    let before = issuer.token(&edge).await;
    fast.verify(&before).await.unwrap();
    limited.verify(&before).await.unwrap();

    let kid = issuer.rotate().await;
    let after = issuer.token(&edge).await;
    assert_eq!(part(&after, 0)["kid"].as_str(), Some(kid.as_str()));
    assert_ne!(part(&before, 0)["kid"], part(&after, 0)["kid"]);

    // The unknown kid triggers one refresh, which finds the new key.
    let g = fast.verify(&after).await.unwrap();
    assert_eq!(g.subject, "edge");
    assert_eq!(fast.fetches(&issuer.url), Some(2));
    // The old key is still published, so older tokens keep working.
    fast.verify(&before).await.unwrap();
    // Within the default 10 s limit the refresh is not allowed yet.
    assert_eq!(
        limited.verify(&after).await,
        Err(VerifyError::UnknownKid {
            issuer: issuer.url.clone(),
            kid
        })
    );
    assert_eq!(limited.fetches(&issuer.url), Some(1));
    // The periodic refresh (here called directly) picks it up without any token asking.
    for (_, result) in limited.refresh_all().await {
        result.unwrap();
    }
    limited.verify(&after).await.unwrap();
}

#[tokio::test]
async fn stopped_issuer_does_not_stop_cached_keys() {
    init_logs();
    let mut issuer = start_issuer(60).await;
    let v = verifier(
        vec![issuer.config()],
        Tuning {
            min_refresh_interval: Duration::ZERO,
            ..Tuning::default()
        },
    );
    let edge = issuer.client("edge", "connect:agentHub");
    let first = issuer.token(&edge).await;
    let second = issuer.token(&edge).await;
    v.verify(&first).await.unwrap();
    issuer.child.kill().await.unwrap();
    within("the issuer to exit", issuer.child.wait())
        .await
        .unwrap();

    // A token not seen before, signed with a cached key, is accepted.
    let g = v.verify(&second).await.unwrap();
    assert_eq!(g.subject, "edge");
    // Refreshes fail and keep the keys.
    for (_, result) in v.refresh_all().await {
        assert!(result.is_err());
    }
    v.verify(&second).await.unwrap();
    // An unknown kid tries a refresh, which fails: the refusal names the kid.
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"gone"}"#);
    let rest = second.split_once('.').unwrap().1;
    assert_eq!(
        v.verify(&format!("{header}.{rest}")).await,
        Err(VerifyError::UnknownKid {
            issuer: issuer.url.clone(),
            kid: "gone".into()
        })
    );
}
