//! Trusted issuers and the [`Verifier`]: a JWT access token is accepted when a trusted
//! issuer signed it with an allowed algorithm, it is within its lifetime (with at most 60 s
//! of clock leeway), it is meant for one of the accepted audiences and it carries the
//! required claims; it then maps to the same [`Grant`] an opaque token gives.
//!
//! The settings are modelled on Kubernetes' structured `AuthenticationConfiguration` `jwt:`
//! entries (issuer URL, audiences, claim mappings, required claims), flattened for TOML.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::fetch::{FetchError, Fetcher};
use super::jwks::{verify_signature, MAX_JWKS_LEN};
use super::jwt::{self, excerpt, Alg, VerifyError};
use super::keys::{KeyCache, Source};
use crate::auth::{Grant, Scope};
use crate::identity::Tenant;

/// The largest clock leeway an issuer may configure: a minute covers real clock skew; more
/// would stretch every token's lifetime.
pub const MAX_LEEWAY: Duration = Duration::from_secs(60);

/// Which claim carries the token's scopes. Either claim may hold a space-separated string
/// or an array; the names are where issuers put them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeClaim {
    /// `scope` (RFC 8693 §4.2, RFC 9068 §2.2.3; Keycloak, Auth0, Dex, oidc-provider).
    #[default]
    Scope,
    /// `scp` (Okta, Microsoft Entra).
    Scp,
}

impl ScopeClaim {
    /// The claim's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeClaim::Scope => "scope",
            ScopeClaim::Scp => "scp",
        }
    }
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// OIDC discovery under the issuer URL, then its `jwks_uri`.
    Discovery,
    /// A local JWK Set file.
    File(PathBuf),
}

/// One trusted issuer, as written in the hub's configuration (`[[oidc_issuers]]` or
/// wherever the configuration embeds it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The issuer URL, exactly as tokens carry it in `iss` (https).
    pub url: String,
    /// Accepted audiences: a token's `aud` must contain one.
    pub audiences: Vec<String>,
    /// A JWK Set file to read keys from instead of OIDC discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// A CA (PEM) for the issuer's https endpoints instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The claim holding the tenant (`organization/environment`). Exactly one of
    /// `tenant_claim` and `tenant` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_claim: Option<String>,
    /// A fixed tenant for every token of this issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Tenant>,
    /// Which claim holds the scopes.
    #[serde(default)]
    pub scope_claim: ScopeClaim,
    /// Claims that must be present with exactly this string value (Kubernetes'
    /// `claimValidationRules` in their simplest form), e.g. `{ azp = "rna-agents" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub required_claims: BTreeMap<String, String>,
    /// Accepted signature algorithms; all of RS256, PS256, ES256 and EdDSA when unset.
    #[serde(default = "all_algs")]
    pub algorithms: Vec<Alg>,
    /// Clock leeway for `exp`, `nbf` and `iat`, at most 60 s (a whole number of seconds or a
    /// duration such as `"30s"`).
    #[serde(default = "default_leeway", with = "leeway_serde")]
    pub leeway: Duration,
}

fn all_algs() -> Vec<Alg> {
    Alg::ALL.to_vec()
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// Reads a leeway as whole seconds or a duration text; writes whole seconds.
mod leeway_serde {
    use std::time::Duration;

    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match <Raw as serde::Deserialize>::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => crate::duration::parse_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// A trusted-issuer setting that cannot work; the message names the issuer and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuerConfigError {
    /// The URL is not https.
    #[error("OIDC issuer {0:?}: url must be an https URL")]
    NotHttps(String),
    /// Two entries name the same issuer.
    #[error("OIDC issuer {0:?} is listed twice")]
    Duplicate(String),
    /// No audience (or an empty one) is listed: a token for any service of the
    /// organisation would pass.
    #[error("OIDC issuer {0:?}: audiences must list at least one non-empty audience")]
    NoAudience(String),
    /// Neither or both of `tenant_claim` and `tenant`.
    #[error("OIDC issuer {0:?}: set exactly one of tenant_claim and tenant")]
    Tenant(String),
    /// An empty algorithm list.
    #[error("OIDC issuer {0:?}: algorithms must not be empty")]
    NoAlgorithm(String),
    /// A leeway over [`MAX_LEEWAY`].
    #[error("OIDC issuer {0:?}: leeway must be at most 60s")]
    Leeway(String),
    /// The https client for the issuer cannot be built (CA file).
    #[error("OIDC issuer {issuer:?}: {source}")]
    Fetcher {
        /// The issuer.
        issuer: String,
        /// Why.
        source: FetchError,
    },
}

impl IssuerConfig {
    /// A configuration with discovery, a tenant claim and the defaults elsewhere.
    pub fn new(url: &str, audiences: &[&str], tenant_claim: &str) -> IssuerConfig {
        IssuerConfig {
            url: url.to_owned(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            jwks_file: None,
            ca: None,
            tenant_claim: Some(tenant_claim.to_owned()),
            tenant: None,
            scope_claim: ScopeClaim::Scope,
            required_claims: BTreeMap::new(),
            algorithms: all_algs(),
            leeway: default_leeway(),
        }
    }

    /// Where the keys come from.
    pub fn key_source(&self) -> KeySource {
        match &self.jwks_file {
            Some(path) => KeySource::File(path.clone()),
            None => KeySource::Discovery,
        }
    }

    /// Checks the rules the types cannot express.
    pub fn validate(&self) -> Result<(), IssuerConfigError> {
        let url = || self.url.clone();
        if super::fetch::check_https(&self.url).is_err() {
            return Err(IssuerConfigError::NotHttps(url()));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(|a| a.is_empty()) {
            return Err(IssuerConfigError::NoAudience(url()));
        }
        if self.tenant_claim.is_some() == self.tenant.is_some() {
            return Err(IssuerConfigError::Tenant(url()));
        }
        if self.algorithms.is_empty() {
            return Err(IssuerConfigError::NoAlgorithm(url()));
        }
        if self.leeway > MAX_LEEWAY {
            return Err(IssuerConfigError::Leeway(url()));
        }
        Ok(())
    }
}

/// How often keys are fetched; not settings, but tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// At most one fetch per issuer in this interval when tokens name unknown `kid`s.
    pub min_refresh_interval: Duration,
    /// The periodic refresh, which picks up rotations before the first token needs them.
    pub refresh_every: Duration,
    /// Deadline of one discovery or JWKS request.
    pub fetch_deadline: Duration,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            min_refresh_interval: Duration::from_secs(10),
            refresh_every: Duration::from_secs(3600),
            fetch_deadline: Duration::from_secs(10),
        }
    }
}

/// An accepted JWT: the grant, and who acted for audit lines and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcGrant {
    /// What the token grants, as an opaque token's grant: `token_id` is `jti` (or `sub`
    /// when the issuer sets no `jti`), `label` is the `client_id`.
    pub grant: Grant,
    /// The issuer URL.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `client_id` (RFC 9068 §2.2), if present.
    pub client_id: Option<String>,
    /// `exp`, in Unix seconds.
    pub expires_at: i64,
    /// `exp` plus the issuer's leeway: the last second the token verifies, so the hub closes
    /// a session once this passes (closing at `exp` would let the agent reconnect with the
    /// same token, accepted within the leeway, only to be closed again).
    pub valid_until: i64,
}

impl OidcGrant {
    /// Refuses unless the token carries `scope` (`admin` implies every scope).
    pub fn require(&self, scope: Scope) -> Result<(), VerifyError> {
        if self.grant.has(scope) {
            Ok(())
        } else {
            Err(VerifyError::MissingScope(scope))
        }
    }
}

/// One trusted issuer at run time.
#[derive(Debug)]
struct Trusted {
    config: IssuerConfig,
    cache: KeyCache,
}

/// Verifies JWTs against the trusted issuers. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Verifier {
    /// By issuer URL. Replaced whole by [`Verifier::reload`]; a verification clones the one
    /// issuer it needs out of the lock before it awaits anything.
    issuers: std::sync::RwLock<HashMap<String, Arc<Trusted>>>,
    tuning: Tuning,
}

/// What [`Verifier::reload`] changed, by issuer URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Newly trusted (keys are fetched on their first token, or at once by the caller).
    pub added: Vec<String>,
    /// No longer trusted: their tokens are refused from now on.
    pub removed: Vec<String>,
    /// Whose settings changed (their keys are fetched again).
    pub changed: Vec<String>,
    /// Unchanged, with their cached keys.
    pub kept: Vec<String>,
}

/// Whether `token` has the shape of a JWT (three base64url parts), so a caller can tell it
/// from an opaque `rna_…` token before choosing how to check it.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Verifier {
    /// Builds the verifier; no key is fetched yet (see [`Verifier::refresh_all`]).
    pub fn new(configs: Vec<IssuerConfig>, tuning: Tuning) -> Result<Verifier, IssuerConfigError> {
        Ok(Verifier {
            issuers: std::sync::RwLock::new(Self::build(configs, &tuning)?),
            tuning,
        })
    }

    /// Replaces the trusted issuers with `configs` (the hub's issuers file read again on
    /// SIGHUP), all or nothing: a list that fails its checks leaves the current one in force.
    /// An issuer whose settings are unchanged keeps its cached keys, so a reload never makes
    /// its tokens wait for the issuer.
    pub fn reload(&self, configs: Vec<IssuerConfig>) -> Result<Reloaded, IssuerConfigError> {
        let mut fresh = Self::build(configs, &self.tuning)?;
        let mut issuers = self.issuers.write().unwrap_or_else(|p| p.into_inner());
        let mut out = Reloaded::default();
        for (url, trusted) in fresh.iter_mut() {
            match issuers.get(url) {
                Some(old) if old.config == trusted.config => {
                    *trusted = old.clone();
                    out.kept.push(url.clone());
                }
                Some(_) => out.changed.push(url.clone()),
                None => out.added.push(url.clone()),
            }
        }
        out.removed = issuers
            .keys()
            .filter(|url| !fresh.contains_key(*url))
            .cloned()
            .collect();
        *issuers = fresh;
        for list in [
            &mut out.added,
            &mut out.removed,
            &mut out.changed,
            &mut out.kept,
        ] {
            list.sort();
        }
        Ok(out)
    }

    /// The issuer `url`, if trusted.
    fn trusted(&self, url: &str) -> Option<Arc<Trusted>> {
        self.issuers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .cloned()
    }

    /// Every trusted issuer, by URL.
    fn all(&self) -> Vec<(String, Arc<Trusted>)> {
        self.issuers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(url, t)| (url.clone(), t.clone()))
            .collect()
    }

    /// The run-time issuers of `configs`, each checked; a duplicate URL is refused.
    fn build(
        configs: Vec<IssuerConfig>,
        tuning: &Tuning,
    ) -> Result<HashMap<String, Arc<Trusted>>, IssuerConfigError> {
        let mut issuers = HashMap::new();
        for config in configs {
            config.validate()?;
            let source = match config.key_source() {
                KeySource::File(path) => Source::File(path),
                KeySource::Discovery => Source::Discovery {
                    issuer: config.url.clone(),
                    fetcher: Fetcher::new(
                        config.ca.as_deref(),
                        tuning.fetch_deadline,
                        MAX_JWKS_LEN,
                    )
                    .map_err(|source| IssuerConfigError::Fetcher {
                        issuer: config.url.clone(),
                        source,
                    })?,
                },
            };
            let cache = KeyCache::new(config.url.clone(), source, tuning.min_refresh_interval);
            let url = config.url.clone();
            if issuers
                .insert(url.clone(), Arc::new(Trusted { config, cache }))
                .is_some()
            {
                return Err(IssuerConfigError::Duplicate(url));
            }
        }
        Ok(issuers)
    }

    /// Whether any issuer is trusted.
    pub fn is_empty(&self) -> bool {
        self.issuers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// How many key fetches were attempted for `issuer`.
    pub fn fetches(&self, issuer: &str) -> Option<u64> {
        self.trusted(issuer).map(|t| t.cache.fetches())
    }

    /// Fetches every issuer's keys now; failures are returned (and keep older keys).
    pub async fn refresh_all(&self) -> Vec<(String, Result<usize, FetchError>)> {
        let mut out = Vec::new();
        for (url, trusted) in self.all() {
            out.push((url, trusted.cache.refresh().await));
        }
        out
    }

    /// Refreshes every issuer's keys every `refresh_every` until `shutdown`; a failure is
    /// one warning line and the cached keys stay. Cancel-safe.
    pub async fn run_refresher(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.tuning.refresh_every) => {}
            }
            for (issuer, result) in self.refresh_all().await {
                if let Err(e) = result {
                    tracing::warn!(%issuer, "OIDC periodic key refresh failed: {e}");
                }
            }
        }
    }

    /// Verifies `token` now.
    pub async fn verify(&self, token: &str) -> Result<OidcGrant, VerifyError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.verify_at(token, now).await
    }

    /// Verifies `token` as of `now` (Unix seconds).
    pub async fn verify_at(&self, token: &str, now: i64) -> Result<OidcGrant, VerifyError> {
        let parsed = jwt::parse(token)?;
        let iss = parsed
            .claims
            .str("iss")
            .ok_or(VerifyError::Malformed("no iss claim"))?;
        let trusted = self
            .trusted(iss)
            .ok_or_else(|| VerifyError::UnknownIssuer(excerpt(iss)))?;
        let config = &trusted.config;
        let issuer = config.url.clone();
        let alg = parsed.header.alg;
        if !config.algorithms.contains(&alg) {
            return Err(VerifyError::AlgRefused(alg.to_string()));
        }
        let kid = parsed.header.kid.as_deref();
        let keys = trusted.cache.keys(kid).await;
        if keys.keys.is_empty() {
            return Err(VerifyError::KeysUnavailable(issuer));
        }
        if let Some(kid) = kid {
            if !keys.has_kid(kid) {
                return Err(VerifyError::UnknownKid {
                    issuer,
                    kid: excerpt(kid),
                });
            }
        }
        verify_signature(
            &keys,
            alg,
            kid,
            &parsed.signing_input,
            &parsed.signature,
            &issuer,
        )?;
        // From here on the claims are the issuer's.
        let claims = &parsed.claims;
        let leeway = config.leeway.as_secs() as i64;
        let exp = claims
            .time("exp")?
            .ok_or(VerifyError::Malformed("no exp claim"))?;
        if now > exp.saturating_add(leeway) {
            return Err(VerifyError::Expired(issuer));
        }
        for name in ["nbf", "iat"] {
            if claims
                .time(name)?
                .is_some_and(|t| t > now.saturating_add(leeway))
            {
                return Err(VerifyError::NotYetValid(issuer));
            }
        }
        let auds = claims.audiences()?;
        if !config.audiences.iter().any(|a| auds.contains(&a.as_str())) {
            return Err(VerifyError::WrongAudience(issuer));
        }
        for (claim, value) in &config.required_claims {
            if claims.str(claim) != Some(value.as_str()) {
                return Err(VerifyError::MissingClaim {
                    issuer,
                    claim: claim.clone(),
                });
            }
        }
        let tenant = match (&config.tenant, &config.tenant_claim) {
            (Some(tenant), _) => tenant.clone(),
            (None, Some(claim)) => claims
                .str(claim)
                .and_then(|t| t.parse::<Tenant>().ok())
                .ok_or_else(|| VerifyError::BadTenant(issuer.clone()))?,
            (None, None) => return Err(VerifyError::BadTenant(issuer)),
        };
        let scopes = jwt::scopes(claims, config.scope_claim.as_str())?;
        let subject = claims
            .str("sub")
            .ok_or(VerifyError::Malformed("no sub claim"))?
            .to_owned();
        let client_id = claims.str("client_id").map(str::to_owned);
        let token_id = claims.str("jti").unwrap_or(&subject).to_owned();
        Ok(OidcGrant {
            grant: Grant {
                token_id,
                label: client_id.clone(),
                tenant,
                scopes,
            },
            issuer,
            subject,
            client_id,
            expires_at: exp,
            valid_until: exp.saturating_add(leeway),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    const ISS: &str = "https://issuer.example";
    const NOW: i64 = 1_800_000_000;

    struct Fixture {
        _dir: tempfile::TempDir,
        pair: EcdsaKeyPair,
        verifier: Verifier,
    }

    fn fixture(tune: impl FnOnce(&mut IssuerConfig)) -> Fixture {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let p = pair.public_key().as_ref();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"k1","x":"{}","y":"{}"}}]}}"#,
                URL_SAFE_NO_PAD.encode(&p[1..33]),
                URL_SAFE_NO_PAD.encode(&p[33..])
            ),
        )
        .unwrap();
        let mut config = IssuerConfig::new(ISS, &["rna-hub"], "rna_tenant");
        config.jwks_file = Some(path);
        tune(&mut config);
        let verifier = Verifier::new(vec![config], Tuning::default()).unwrap();
        Fixture {
            _dir: dir,
            pair,
            verifier,
        }
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({
            "iss": ISS, "sub": "agent-7", "aud": ["rna-hub"], "exp": NOW + 300,
            "iat": NOW, "nbf": NOW, "jti": "j1", "client_id": "edge",
            "scope": "connect:agentHub read:infra:data openid", "rna_tenant": "acme/prod",
        })
    }

    fn sign(f: &Fixture, header: serde_json::Value, claims: &serde_json::Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = f.pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn es256() -> serde_json::Value {
        serde_json::json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"})
    }

    #[tokio::test]
    async fn a_good_token_maps_to_a_grant() {
        let f = fixture(|_| {});
        let g = f
            .verifier
            .verify_at(&sign(&f, es256(), &claims()), NOW)
            .await
            .unwrap();
        assert_eq!(g.issuer, ISS);
        assert_eq!(g.subject, "agent-7");
        assert_eq!(g.client_id.as_deref(), Some("edge"));
        assert_eq!(g.expires_at, NOW + 300);
        assert_eq!(g.valid_until, NOW + 300 + 30, "exp plus the default leeway");
        assert_eq!(g.grant.tenant.as_str(), "acme/prod");
        assert_eq!(g.grant.token_id, "j1");
        assert_eq!(
            g.grant.scopes,
            vec![Scope::ConnectAgentHub, Scope::ReadInfraData]
        );
        assert!(g.require(Scope::ConnectAgentHub).is_ok());
        assert_eq!(
            g.require(Scope::ExecInfraOp),
            Err(VerifyError::MissingScope(Scope::ExecInfraOp))
        );
    }

    #[tokio::test]
    async fn claim_checks_table() {
        let f = fixture(|c| {
            c.required_claims.insert("client_id".into(), "edge".into());
        });
        let with = |k: &str, v: serde_json::Value| {
            let mut c = claims();
            c[k] = v;
            c
        };
        let without = |k: &str| {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        let iss = || ISS.to_string();
        let table: Vec<(&str, serde_json::Value, Result<(), VerifyError>)> = vec![
            ("exp within leeway", with("exp", (NOW - 30).into()), Ok(())),
            (
                "expired",
                with("exp", (NOW - 31).into()),
                Err(VerifyError::Expired(iss())),
            ),
            (
                "no exp",
                without("exp"),
                Err(VerifyError::Malformed("no exp claim")),
            ),
            ("nbf within leeway", with("nbf", (NOW + 30).into()), Ok(())),
            (
                "nbf later",
                with("nbf", (NOW + 31).into()),
                Err(VerifyError::NotYetValid(iss())),
            ),
            (
                "iat later",
                with("iat", (NOW + 31).into()),
                Err(VerifyError::NotYetValid(iss())),
            ),
            ("aud string", with("aud", "rna-hub".into()), Ok(())),
            (
                "wrong aud",
                with("aud", "other".into()),
                Err(VerifyError::WrongAudience(iss())),
            ),
            (
                "no aud",
                without("aud"),
                Err(VerifyError::WrongAudience(iss())),
            ),
            (
                "other iss",
                with("iss", "https://evil.example".into()),
                Err(VerifyError::UnknownIssuer("https://evil.example".into())),
            ),
            (
                "iss with slash",
                with("iss", format!("{ISS}/").into()),
                Err(VerifyError::UnknownIssuer(format!("{ISS}/"))),
            ),
            (
                "no iss",
                without("iss"),
                Err(VerifyError::Malformed("no iss claim")),
            ),
            (
                "required claim",
                with("client_id", "other".into()),
                Err(VerifyError::MissingClaim {
                    issuer: iss(),
                    claim: "client_id".into(),
                }),
            ),
            (
                "bad tenant",
                with("rna_tenant", "acme".into()),
                Err(VerifyError::BadTenant(iss())),
            ),
            (
                "no tenant",
                without("rna_tenant"),
                Err(VerifyError::BadTenant(iss())),
            ),
            (
                "no sub",
                without("sub"),
                Err(VerifyError::Malformed("no sub claim")),
            ),
            (
                "exp text",
                with("exp", "soon".into()),
                Err(VerifyError::Malformed("a time claim is not a number")),
            ),
        ];
        for (what, c, want) in table {
            let got = f
                .verifier
                .verify_at(&sign(&f, es256(), &c), NOW)
                .await
                .map(|_| ());
            assert_eq!(got, want, "{what}");
        }
    }

    #[tokio::test]
    async fn header_and_signature_checks() {
        let f = fixture(|c| c.algorithms = vec![Alg::ES256, Alg::RS256]);
        let good = sign(&f, es256(), &claims());
        // A changed payload keeps the signature of the old one.
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut c = claims();
        c["scope"] = "admin".into();
        let forged = URL_SAFE_NO_PAD.encode(c.to_string());
        parts[1] = &forged;
        let tampered = parts.join(".");
        let iss = || ISS.to_string();
        let table: Vec<(&str, String, VerifyError)> = vec![
            ("tampered", tampered, VerifyError::BadSignature(iss())),
            (
                "unknown kid",
                sign(&f, serde_json::json!({"alg":"ES256","kid":"k9"}), &claims()),
                VerifyError::UnknownKid {
                    issuer: iss(),
                    kid: "k9".into(),
                },
            ),
            (
                "alg not allowed for issuer",
                sign(&f, serde_json::json!({"alg":"EdDSA","kid":"k1"}), &claims()),
                VerifyError::AlgRefused("EdDSA".into()),
            ),
            (
                "RS256 on an EC key",
                sign(&f, serde_json::json!({"alg":"RS256","kid":"k1"}), &claims()),
                VerifyError::BadSignature(iss()),
            ),
            (
                "none",
                sign(&f, serde_json::json!({"alg":"none"}), &claims()),
                VerifyError::AlgRefused("none".into()),
            ),
            (
                "HS256",
                sign(&f, serde_json::json!({"alg":"HS256","kid":"k1"}), &claims()),
                VerifyError::AlgRefused("HS256".into()),
            ),
        ];
        for (what, token, want) in table {
            assert_eq!(f.verifier.verify_at(&token, NOW).await, Err(want), "{what}");
        }
        // No kid: any key of the right type may verify.
        let no_kid = sign(&f, serde_json::json!({"alg":"ES256"}), &claims());
        assert!(f.verifier.verify_at(&no_kid, NOW).await.is_ok());
    }

    #[tokio::test]
    async fn reload_keeps_unchanged_issuers_keys_and_is_all_or_nothing() {
        let f = fixture(|_| {});
        let token = sign(&f, es256(), &claims());
        f.verifier.verify_at(&token, NOW).await.unwrap();
        assert_eq!(f.verifier.fetches(ISS), Some(1));
        let config = || {
            let issuers = f.verifier.issuers.read().unwrap();
            issuers[ISS].config.clone()
        };
        let mut other = IssuerConfig::new("https://other.example", &["rna-hub"], "t");
        other.jwks_file = config().jwks_file;

        // Unchanged: kept with its keys (no new fetch); a new issuer is added.
        let r = f.verifier.reload(vec![config(), other.clone()]).unwrap();
        assert_eq!(r.kept, vec![ISS.to_string()]);
        assert_eq!(r.added, vec!["https://other.example".to_string()]);
        f.verifier.verify_at(&token, NOW).await.unwrap();
        assert_eq!(f.verifier.fetches(ISS), Some(1));

        // A list that breaks a rule changes nothing.
        let mut bad = other.clone();
        bad.url = "http://plain.example".into();
        assert!(f.verifier.reload(vec![config(), bad]).is_err());
        assert_eq!(f.verifier.fetches("https://other.example"), Some(0));

        // Changed settings start a new key cache; a removed issuer's tokens are refused.
        let mut changed = config();
        changed.leeway = Duration::from_secs(10);
        let r = f.verifier.reload(vec![changed]).unwrap();
        assert_eq!(r.changed, vec![ISS.to_string()]);
        assert_eq!(r.removed, vec!["https://other.example".to_string()]);
        assert_eq!(f.verifier.fetches(ISS), Some(0));
        f.verifier.verify_at(&token, NOW).await.unwrap();
        assert_eq!(f.verifier.fetches(ISS), Some(1));
        f.verifier.reload(vec![other]).unwrap();
        assert_eq!(
            f.verifier.verify_at(&token, NOW).await,
            Err(VerifyError::UnknownIssuer(ISS.into()))
        );
    }

    #[tokio::test]
    async fn fixed_tenant_and_scp_claim() {
        let f = fixture(|c| {
            c.tenant_claim = None;
            c.tenant = Some("fixed/one".parse().unwrap());
            c.scope_claim = ScopeClaim::Scp;
        });
        let mut c = claims();
        c["scp"] = serde_json::json!(["proxy"]);
        let g = f
            .verifier
            .verify_at(&sign(&f, es256(), &c), NOW)
            .await
            .unwrap();
        assert_eq!(g.grant.tenant.as_str(), "fixed/one");
        assert_eq!(g.grant.scopes, vec![Scope::Proxy]);
    }

    #[test]
    fn config_parses_from_toml_and_validates() {
        let c: IssuerConfig = toml::from_str(
            r#"
            url = "https://login.example.com/realms/rna"
            audiences = ["rna-hub"]
            tenant_claim = "rna_tenant"
            scope_claim = "scp"
            required_claims = { azp = "rna" }
            algorithms = ["ES256", "EdDSA"]
            leeway = "45s"
            "#,
        )
        .unwrap();
        assert_eq!(c.leeway, Duration::from_secs(45));
        assert_eq!(c.key_source(), KeySource::Discovery);
        assert!(c.validate().is_ok());
        let back: IssuerConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(toml::from_str::<IssuerConfig>(
            "url = \"https://x\"\naudiences = [\"a\"]\nbogus = 1"
        )
        .is_err());
        assert!(toml::from_str::<IssuerConfig>(
            "url = \"https://x\"\naudiences = [\"a\"]\nalgorithms = [\"HS256\"]"
        )
        .is_err());
        let base = IssuerConfig::new("https://x", &["a"], "t");
        let bad = |f: &dyn Fn(&mut IssuerConfig)| {
            let mut c = base.clone();
            f(&mut c);
            c.validate().unwrap_err()
        };
        let u = || "https://x".to_string();
        assert_eq!(
            bad(&|c| c.url = "http://x".into()),
            IssuerConfigError::NotHttps("http://x".into())
        );
        assert_eq!(
            bad(&|c| c.audiences.clear()),
            IssuerConfigError::NoAudience(u())
        );
        assert_eq!(
            bad(&|c| c.audiences.push(String::new())),
            IssuerConfigError::NoAudience(u())
        );
        assert_eq!(
            bad(&|c| c.tenant = Some("a/b".parse().unwrap())),
            IssuerConfigError::Tenant(u())
        );
        assert_eq!(
            bad(&|c| c.tenant_claim = None),
            IssuerConfigError::Tenant(u())
        );
        assert_eq!(
            bad(&|c| c.algorithms.clear()),
            IssuerConfigError::NoAlgorithm(u())
        );
        assert_eq!(
            bad(&|c| c.leeway = Duration::from_secs(61)),
            IssuerConfigError::Leeway(u())
        );
        assert!(matches!(
            Verifier::new(vec![base.clone(), base.clone()], Tuning::default()),
            Err(IssuerConfigError::Duplicate(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_refresh_runs_every_interval_until_shutdown() {
        let Fixture { _dir, verifier, .. } = fixture(|_| {});
        let verifier = Arc::new(verifier);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(verifier.clone().run_refresher(shutdown.clone()));
        // Paused time: the runtime jumps from timer to timer, so three hours pass at once.
        tokio::time::sleep(Duration::from_secs(3 * 3600 + 1)).await;
        assert_eq!(verifier.fetches(ISS), Some(3));
        shutdown.cancel();
        task.await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(verifier.fetches(ISS), Some(3), "no refresh after shutdown");
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJh.eyJp.c2ln"));
        assert!(!looks_like_jwt("rna_0123456789ab_00"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c d"));
    }
}
