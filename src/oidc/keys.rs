//! The key cache of one issuer: keys from OIDC discovery or a JWKS file, kept between
//! fetches, refreshed when a token names an unknown `kid` (at most once per
//! `min_refresh_interval`) and periodically. A failed fetch keeps the keys already held, so
//! an issuer that is down does not stop tokens signed with cached keys.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::fetch::{FetchError, Fetcher};
use super::jwks::{KeySet, MAX_JWKS_LEN};

/// The largest key file read, in bytes.
const MAX_JWKS_FILE: u64 = MAX_JWKS_LEN as u64;

/// Where an issuer's keys come from, resolved.
#[derive(Debug, Clone)]
pub enum Source {
    /// `{issuer}/.well-known/openid-configuration` names `jwks_uri` (OpenID Connect
    /// Discovery 1.0 §4); the document's `issuer` must equal the configured one (§4.3).
    Discovery {
        /// The issuer URL as configured (and as in tokens' `iss`).
        issuer: String,
        /// The client.
        fetcher: Fetcher,
    },
    /// A local JWK Set file, re-read on refresh (rotation by replacing the file).
    File(PathBuf),
}

/// The discovery document's URL for `issuer` (§4.1: the path is appended, one `/` kept).
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// Reads a string field of an issuer's discovery document, which must be an https URL.
pub async fn discover(
    fetcher: &Fetcher,
    issuer: &str,
    field: &'static str,
) -> Result<String, FetchError> {
    let url = discovery_url(issuer);
    let doc = fetcher.get_json(&url).await?;
    let bad = |message: String| FetchError::BadDocument {
        url: url.clone(),
        message,
    };
    let named = doc.get("issuer").and_then(|v| v.as_str());
    if named != Some(issuer) {
        return Err(bad(format!(
            "names issuer {:?}, not {issuer:?}",
            named.map(super::jwt::excerpt)
        )));
    }
    let value = doc
        .get(field)
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad(format!("has no {field}")))?;
    super::fetch::check_https(value)?;
    Ok(value.to_owned())
}

impl Source {
    /// Fetches the current key set.
    pub async fn fetch(&self) -> Result<KeySet, FetchError> {
        match self {
            Source::Discovery { issuer, fetcher } => {
                let jwks_uri = discover(fetcher, issuer, "jwks_uri").await?;
                let body = fetcher.get(&jwks_uri).await?;
                KeySet::parse(&body).map_err(|e| FetchError::BadDocument {
                    url: jwks_uri,
                    message: e.to_string(),
                })
            }
            Source::File(path) => {
                let bytes = crate::fsutil::read_bytes(path, MAX_JWKS_FILE).map_err(|e| {
                    FetchError::BadDocument {
                        url: path.display().to_string(),
                        message: e.to_string(),
                    }
                })?;
                KeySet::parse(&bytes).map_err(|e| FetchError::BadDocument {
                    url: path.display().to_string(),
                    message: e.to_string(),
                })
            }
        }
    }
}

/// What the cache holds between fetches.
#[derive(Debug)]
struct State {
    keys: Arc<KeySet>,
    /// When a fetch last started, successful or not: the rate limit counts attempts, so a
    /// flood of tokens with made-up `kid`s cannot make the hub hammer the issuer.
    last_attempt: Option<Instant>,
}

/// The keys of one issuer, shared by every verification.
#[derive(Debug)]
pub struct KeyCache {
    issuer: String,
    source: Source,
    min_refresh_interval: Duration,
    state: Mutex<State>,
    /// Serializes fetches: concurrent unknown-`kid` tokens wait for one fetch.
    fetching: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

impl KeyCache {
    /// An empty cache; the first [`KeyCache::keys`] or [`KeyCache::refresh`] fetches.
    pub fn new(issuer: String, source: Source, min_refresh_interval: Duration) -> KeyCache {
        KeyCache {
            issuer,
            source,
            min_refresh_interval,
            state: Mutex::new(State {
                keys: Arc::new(KeySet::default()),
                last_attempt: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        }
    }

    /// How many fetches were attempted (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The keys held now, without fetching.
    pub fn current(&self) -> Arc<KeySet> {
        self.lock().keys.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves consistent data (two plain assignments).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys, fetching first when the cache has none or lacks `kid`, if the rate limit
    /// allows. Returns the held keys when the fetch fails or is not allowed.
    pub async fn keys(&self, kid: Option<&str>) -> Arc<KeySet> {
        let held = self.current();
        let wanted = held.keys.is_empty() || kid.is_some_and(|kid| !held.has_kid(kid));
        if !wanted {
            return held;
        }
        let _one = self.fetching.lock().await;
        // Another task may have fetched while this one waited.
        let held = self.current();
        if !held.keys.is_empty() && kid.is_none_or(|kid| held.has_kid(kid)) {
            return held;
        }
        if !self.may_fetch() {
            return held;
        }
        if let Err(e) = self.fetch_now().await {
            tracing::warn!(issuer = %self.issuer, "OIDC key refresh failed, keeping {} cached keys: {e}", held.keys.len());
        }
        self.current()
    }

    fn may_fetch(&self) -> bool {
        self.lock()
            .last_attempt
            .is_none_or(|at| at.elapsed() >= self.min_refresh_interval)
    }

    /// Fetches now regardless of the rate limit (the periodic refresh and start-up); keeps
    /// the old keys on failure.
    pub async fn refresh(&self) -> Result<usize, FetchError> {
        let _one = self.fetching.lock().await;
        self.fetch_now().await
    }

    async fn fetch_now(&self) -> Result<usize, FetchError> {
        self.lock().last_attempt = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let keys = self.source.fetch().await?;
        let count = keys.keys.len();
        let mut state = self.lock();
        let changed = *state.keys != keys;
        state.keys = Arc::new(keys);
        drop(state);
        if changed {
            tracing::info!(issuer = %self.issuer, keys = count, "OIDC keys loaded");
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(kid: &str) -> String {
        // A syntactically valid P-256 JWK (the point is never used to verify here).
        let x = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        format!(r#"{{"kty":"EC","crv":"P-256","kid":"{kid}","x":"{x}","y":"{x}"}}"#)
    }

    fn write(path: &std::path::Path, kids: &[&str]) {
        let keys: Vec<String> = kids.iter().map(|k| jwk(k)).collect();
        std::fs::write(path, format!(r#"{{"keys":[{}]}}"#, keys.join(","))).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_kid_refresh_is_rate_limited_and_failures_keep_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        write(&path, &["a"]);
        let cache = KeyCache::new(
            "https://i".into(),
            Source::File(path.clone()),
            Duration::from_secs(10),
        );
        assert!(cache.keys(Some("a")).await.has_kid("a"));
        assert_eq!(cache.fetches(), 1);
        // Known kid: no fetch.
        cache.keys(Some("a")).await;
        assert_eq!(cache.fetches(), 1);
        // Rotation: "b" appears, but the last attempt was just now.
        write(&path, &["a", "b"]);
        assert!(!cache.keys(Some("b")).await.has_kid("b"));
        assert!(!cache.keys(Some("zz")).await.has_kid("zz"));
        assert_eq!(cache.fetches(), 1, "refresh within the interval");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(cache.keys(Some("b")).await.has_kid("b"));
        assert_eq!(cache.fetches(), 2);
        // Made-up kids cost one fetch per interval at most.
        for _ in 0..5 {
            cache.keys(Some("made-up")).await;
        }
        assert_eq!(cache.fetches(), 2);
        // The source breaks: the cached keys stay.
        std::fs::write(&path, "not json").unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        let keys = cache.keys(Some("c")).await;
        assert_eq!(cache.fetches(), 3);
        assert!(keys.has_kid("a") && keys.has_kid("b"));
        assert!(cache.refresh().await.is_err());
        assert!(cache.current().has_kid("a"));
    }

    #[test]
    fn discovery_url_appends_the_well_known_path() {
        assert_eq!(
            discovery_url("https://i.example/realms/x/"),
            "https://i.example/realms/x/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://i.example"),
            "https://i.example/.well-known/openid-configuration"
        );
    }
}
