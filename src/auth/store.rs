//! The token store: the TOML file of hashed tokens, and verifying presented tokens against
//! it. Following the file as it changes is `reload.rs`'s job.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use subtle::ConstantTimeEq;

use super::time::unix_now;
use super::token::{self, AuthError, Grant, Scope};
use crate::identity::{Secret, Tenant};

/// The longest label, in characters.
const LABEL_MAX: usize = 128;
/// The first line of every saved store, so whoever opens the file knows what it is.
const HEADER: &str = "# rna token store: only SHA-256 hashes of tokens are kept here.\n";
/// Compared against when the presented id is unknown, so an unknown id costs the same
/// hashing and comparison as a known one. No SHA-256 output is all zeros in practice.
const DUMMY_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One stored token: only the SHA-256 of the token text is kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// 12 lowercase hex characters; public, shown by `token list` and in logs.
    pub id: String,
    /// Lowercase hex of the SHA-256 over the whole token text.
    pub sha256: String,
    /// The tenant the token belongs to.
    pub tenant: Tenant,
    /// What the token may do.
    pub scopes: Vec<Scope>,
    /// Creation time, unix seconds.
    pub created: u64,
    /// Expiry, unix seconds; the token is refused from this second on. `None` never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// Free text saying what the token is for (at most 128 characters, no control characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Revoked tokens stay in the file so `token list` can still show them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

impl TokenRecord {
    fn grant(&self) -> Grant {
        Grant {
            token_id: self.id.clone(),
            label: self.label.clone(),
            tenant: self.tenant.clone(),
            scopes: self.scopes.clone(),
        }
    }

    fn is_expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|expires| expires <= now)
    }
}

/// Why the token store, or a secret file, could not be read, written or changed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file failed (a missing file has kind `NotFound`).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file is not valid TOML or does not match the store format.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line number when it has one.
        message: String,
    },
    /// The file parsed but a record breaks a rule (duplicate id, bad hash, long label).
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which record and which rule.
        message: String,
    },
    /// No token has this id.
    #[error("no token with id {0:?}")]
    NotFound(String),
    /// A secret file held nothing but whitespace.
    #[error("{}: secret file is empty", .0.display())]
    EmptySecret(PathBuf),
    /// A new token was asked for with values the store refuses (no scopes, bad label, ttl).
    #[error("cannot create token: {0}")]
    CannotCreate(String),
    /// The system random number generator failed, so no token could be made.
    #[error("cannot create token: the system random number generator failed")]
    Random,
}

impl StoreError {
    /// An `Io` error of `path` from a read or write of it that failed.
    fn file(path: &Path, e: crate::fsutil::FileError) -> StoreError {
        StoreError::Io {
            path: path.to_owned(),
            source: e.problem.into(),
        }
    }
}

/// The file layout: `[[token]]` tables.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    #[serde(default, rename = "token")]
    tokens: Vec<TokenRecord>,
}

/// The set of tokens, as kept in the TOML store file, by id.
#[derive(Debug, Clone, Default)]
pub struct TokenStore {
    tokens: BTreeMap<String, TokenRecord>,
}

impl TokenStore {
    /// Reads and validates the store file; a missing file is an `Io` error of kind `NotFound`.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let text = crate::fsutil::read_text(path, crate::fsutil::MAX_TOKEN_STORE)
            .map_err(|e| StoreError::file(path, e))?;
        Self::parse(&text, path)
    }

    /// Like [`load`](Self::load), but a missing file is an empty store (for `token create`).
    pub fn load_or_empty(path: &Path) -> Result<Self, StoreError> {
        match Self::load(path) {
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(Self::default())
            }
            other => other,
        }
    }

    /// Parses and validates store text; `path` is only used in error messages.
    ///
    /// Rules checked after parsing: ids are 12 lowercase hex characters and unique, `sha256`
    /// is 64 lowercase hex characters, labels are 1 to 128 characters without control
    /// characters.
    pub fn parse(text: &str, path: &Path) -> Result<Self, StoreError> {
        let file: StoreFile = toml::from_str(text).map_err(|e| StoreError::Parse {
            path: path.to_owned(),
            message: match e.span() {
                Some(span) => {
                    let line = text
                        .get(..span.start)
                        .map_or(0, |before| before.matches('\n').count())
                        + 1;
                    format!("line {line}: {}", e.message().trim_end())
                }
                None => e.message().trim_end().to_owned(),
            },
        })?;
        let mut tokens = BTreeMap::new();
        for (index, record) in file.tokens.into_iter().enumerate() {
            let invalid = |why: String| StoreError::Invalid {
                path: path.to_owned(),
                message: format!("token #{} (id {:?}): {why}", index + 1, record.id),
            };
            if !token::is_token_id(&record.id) {
                return Err(invalid("id must be 12 lowercase hex characters".into()));
            }
            if !token::is_lower_hex(&record.sha256, 64) {
                return Err(invalid("sha256 must be 64 lowercase hex characters".into()));
            }
            if let Some(label) = &record.label {
                check_label(label).map_err(invalid)?;
            }
            if tokens.contains_key(&record.id) {
                return Err(invalid("duplicate id".into()));
            }
            tokens.insert(record.id.clone(), record);
        }
        Ok(TokenStore { tokens })
    }

    /// The store as TOML, starting with a comment line; records sorted by creation time.
    pub fn to_toml(&self) -> String {
        // Written by hand rather than with `toml::to_string` so it cannot fail: every value is
        // a validated string, a small array of scope names, or an integer.
        let mut out = String::from(HEADER);
        for record in self.records() {
            let scopes: Vec<String> = record
                .scopes
                .iter()
                .map(|scope| toml_string(scope.as_str()))
                .collect();
            out.push_str("\n[[token]]\n");
            // Writing to a String cannot fail.
            let _ = writeln!(out, "id = {}", toml_string(&record.id));
            let _ = writeln!(out, "sha256 = {}", toml_string(&record.sha256));
            let _ = writeln!(out, "tenant = {}", toml_string(record.tenant.as_str()));
            let _ = writeln!(out, "scopes = [{}]", scopes.join(", "));
            let _ = writeln!(out, "created = {}", record.created);
            if let Some(expires) = record.expires {
                let _ = writeln!(out, "expires = {expires}");
            }
            if let Some(label) = &record.label {
                let _ = writeln!(out, "label = {}", toml_string(label));
            }
            if record.revoked {
                out.push_str("revoked = true\n");
            }
        }
        out
    }

    /// Writes the store atomically ([`replace_file`](crate::fsutil::replace_file)): readers
    /// see the old or the new file, never a partial one. A store that exists keeps its mode,
    /// owner and group (an operator may have given the hub's group read access); a new one is
    /// private to its owner (0600).
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        if path.file_name().is_none() {
            return Err(StoreError::Invalid {
                path: path.to_owned(),
                message: "not a file path".into(),
            });
        }
        let mode = crate::fsutil::FileMode::KeepOr(0o600);
        crate::fsutil::replace_file(path, self.to_toml().as_bytes(), mode)
            .map_err(|e| StoreError::file(path, e))
    }

    /// Makes a new token and adds its record; returns the token text (shown once) and record.
    ///
    /// Scopes are deduplicated and sorted and must not be empty. A `ttl` is rounded up to
    /// whole seconds and must be at least one second.
    pub fn create(
        &mut self,
        tenant: Tenant,
        mut scopes: Vec<Scope>,
        ttl: Option<Duration>,
        label: Option<String>,
        now: SystemTime,
    ) -> Result<(Secret, TokenRecord), StoreError> {
        scopes.sort_unstable();
        scopes.dedup();
        if scopes.is_empty() {
            return Err(StoreError::CannotCreate(
                "a token needs at least one scope".into(),
            ));
        }
        if let Some(label) = &label {
            check_label(label).map_err(StoreError::CannotCreate)?;
        }
        let created = unix_now(now);
        let expires = match ttl {
            None => None,
            Some(ttl) if ttl.is_zero() => {
                return Err(StoreError::CannotCreate(
                    "ttl must be at least one second".into(),
                ))
            }
            Some(ttl) => {
                let secs = ttl
                    .as_secs()
                    .saturating_add(u64::from(ttl.subsec_nanos() > 0));
                // TOML integers are i64; keep every stored time representable.
                let expires = created
                    .checked_add(secs)
                    .filter(|&e| i64::try_from(e).is_ok())
                    .ok_or_else(|| StoreError::CannotCreate("ttl is too long".into()))?;
                Some(expires)
            }
        };
        let rng = SystemRandom::new();
        // 48 bits of id: a collision is unlikely, but an id must never name two tokens.
        let (id, secret) = loop {
            let (id, secret) = token::generate(&rng).map_err(|_| StoreError::Random)?;
            if !self.tokens.contains_key(&id) {
                break (id, secret);
            }
        };
        let record = TokenRecord {
            sha256: token::token_sha256(secret.expose()),
            id: id.clone(),
            tenant,
            scopes,
            created,
            expires,
            label,
            revoked: false,
        };
        self.tokens.insert(id, record.clone());
        Ok((secret, record))
    }

    /// Marks the token revoked (it stays listed); `NotFound` if no token has this id.
    pub fn revoke(&mut self, id: &str) -> Result<(), StoreError> {
        let record = self
            .tokens
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        record.revoked = true;
        Ok(())
    }

    /// Every record, sorted by creation time then id.
    pub fn records(&self) -> Vec<&TokenRecord> {
        let mut records: Vec<&TokenRecord> = self.tokens.values().collect();
        // The map is ordered by id and the sort is stable, so ties stay in id order.
        records.sort_by_key(|record| record.created);
        records
    }

    /// The record with this id.
    pub fn get(&self, id: &str) -> Option<&TokenRecord> {
        self.tokens.get(id)
    }

    /// How many tokens are stored, revoked and expired ones included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is stored.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Verifies a presented token and returns what it grants; does not check scopes.
    ///
    /// Order: format (`Malformed`), lookup by id and constant-time comparison of the SHA-256
    /// (`Unknown`; an unknown id is still hashed and compared against a dummy so it takes the
    /// same time, and a wrong secret for a known id is also `Unknown` so ids cannot be
    /// probed), then `Revoked`, then `Expired` (expiry at or before `now`).
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Grant, AuthError> {
        let id = token::token_id(token)?;
        let presented = token::token_sha256(token);
        let record = self.tokens.get(id);
        let expected = record.map_or(DUMMY_SHA256, |record| record.sha256.as_str());
        let same: bool = presented.as_bytes().ct_eq(expected.as_bytes()).into();
        let record = match record {
            Some(record) if same => record,
            _ => return Err(AuthError::Unknown),
        };
        if record.revoked {
            return Err(AuthError::Revoked);
        }
        if record.is_expired(unix_now(now)) {
            return Err(AuthError::Expired);
        }
        Ok(record.grant())
    }

    /// [`verify`](Self::verify), then requires `scope` (`Admin` satisfies any scope).
    pub fn authorize(
        &self,
        token: &str,
        scope: Scope,
        now: SystemTime,
    ) -> Result<Grant, AuthError> {
        let grant = self.verify(token, now)?;
        if grant.has(scope) {
            Ok(grant)
        } else {
            Err(AuthError::MissingScope(scope))
        }
    }

    /// Sets when the token with this id expires (unix seconds; `None` never); `NotFound` if
    /// no token has this id. An enrolled agent's connect token follows its certificate's end.
    pub fn set_expires(&mut self, id: &str, expires: Option<u64>) -> Result<(), StoreError> {
        let record = self
            .tokens
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        record.expires = expires;
        Ok(())
    }

    /// Removes every record for which `remove` holds; how many were removed.
    pub fn remove_where(&mut self, remove: impl Fn(&TokenRecord) -> bool) -> usize {
        let before = self.tokens.len();
        self.tokens.retain(|_, record| !remove(record));
        before - self.tokens.len()
    }

    /// Whether the token with this id would still verify now: it exists, is not revoked and
    /// has not expired. Used to close sessions of revoked tokens after a reload.
    pub fn is_live(&self, id: &str, now: SystemTime) -> bool {
        self.tokens
            .get(id)
            .is_some_and(|record| !record.revoked && !record.is_expired(unix_now(now)))
    }
}

/// Checks a label: 1 to 128 characters, none of them control characters (labels are printed
/// to terminals by `token list`).
fn check_label(label: &str) -> Result<(), String> {
    let chars = label.chars().count();
    if chars == 0 || chars > LABEL_MAX {
        return Err(format!(
            "label must be 1 to {LABEL_MAX} characters, not {chars}"
        ));
    }
    if label.chars().any(char::is_control) {
        return Err("label must not contain control characters".into());
    }
    Ok(())
}

/// A TOML basic string (quoted and escaped).
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Reads a secret (a token) from a file: surrounding whitespace and the trailing newline are
/// trimmed; an empty file is an error. Warns when the file is readable by group or others.
pub fn read_secret_file(path: &Path) -> Result<Secret, StoreError> {
    let secret = load_secret_file(path)?;
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "secret file is readable by group or others; chmod 600 it"
            );
        }
    }
    Ok(secret)
}

/// Like [`read_secret_file`] without the mode warning, for files read again and again (the
/// agent reads its token file before every connection attempt).
pub fn load_secret_file(path: &Path) -> Result<Secret, StoreError> {
    let text = crate::fsutil::read_text(path, crate::fsutil::MAX_SECRET_FILE)
        .map_err(|e| StoreError::file(path, e))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(StoreError::EmptySecret(path.to_owned()));
    }
    Ok(Secret::new(secret.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const NOW_SECS: u64 = 1_763_900_000;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS)
    }

    fn tenant(s: &str) -> Tenant {
        s.parse().unwrap()
    }

    fn store_with(scopes: Vec<Scope>, ttl: Option<Duration>) -> (TokenStore, Secret, TokenRecord) {
        let mut store = TokenStore::default();
        let (secret, record) = store
            .create(tenant("acme/prod"), scopes, ttl, Some("ci".into()), now())
            .unwrap();
        (store, secret, record)
    }

    #[test]
    fn create_then_verify() {
        let (store, secret, record) = store_with(
            vec![Scope::Proxy, Scope::ConnectAgentHub, Scope::Proxy],
            None,
        );
        assert_eq!(record.scopes, vec![Scope::ConnectAgentHub, Scope::Proxy]);
        assert_eq!(record.created, NOW_SECS);
        assert_eq!(record.expires, None);
        assert!(secret.expose().starts_with(&format!("rna_{}_", record.id)));
        assert_eq!(store.get(&record.id), Some(&record));
        assert_eq!(store.len(), 1);
        assert!(!store.is_empty());

        let grant = store.verify(secret.expose(), now()).unwrap();
        assert_eq!(
            grant,
            Grant {
                token_id: record.id.clone(),
                label: Some("ci".into()),
                tenant: tenant("acme/prod"),
                scopes: vec![Scope::ConnectAgentHub, Scope::Proxy],
            }
        );
        assert!(store.is_live(&record.id, now()));
        assert!(!store.is_live("000000000000", now()));
    }

    #[test]
    fn create_refuses_bad_requests() {
        let mut store = TokenStore::default();
        let mut create = |scopes: Vec<Scope>, ttl: Option<Duration>, label: Option<&str>| {
            store
                .create(tenant("a/b"), scopes, ttl, label.map(str::to_owned), now())
                .map(|_| ())
        };
        let proxy = || vec![Scope::Proxy];
        let long = "x".repeat(129);
        let cases = [
            (create(vec![], None, None), "at least one scope"),
            (
                create(proxy(), Some(Duration::ZERO), None),
                "at least one second",
            ),
            (create(proxy(), Some(Duration::MAX), None), "too long"),
            (create(proxy(), None, Some(&long)), "1 to 128 characters"),
            (create(proxy(), None, Some("")), "1 to 128 characters"),
            (
                create(proxy(), None, Some("a\x1b[31m")),
                "control characters",
            ),
        ];
        for (result, why) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        assert!(create(proxy(), None, Some(&"é".repeat(128))).is_ok());
    }

    #[test]
    fn sub_second_ttl_rounds_up() {
        let (_, _, record) = store_with(vec![Scope::Proxy], Some(Duration::from_millis(1)));
        assert_eq!(record.expires, Some(NOW_SECS + 1));
    }

    #[test]
    fn wrong_secret_is_unknown_like_an_unknown_id() {
        let (store, secret, record) = store_with(vec![Scope::Proxy], None);
        let text = secret.expose();
        // Same id, different secret.
        let last = if text.ends_with('0') { "1" } else { "0" };
        let wrong = format!("{}{last}", &text[..text.len() - 1]);
        assert_eq!(store.verify(&wrong, now()), Err(AuthError::Unknown));
        // Unknown id, right secret part.
        let other_id = if record.id == "000000000000" {
            "111111111111"
        } else {
            "000000000000"
        };
        let unknown = text.replacen(&record.id, other_id, 1);
        assert_eq!(store.verify(&unknown, now()), Err(AuthError::Unknown));
        // A valid token against an empty store.
        assert_eq!(
            TokenStore::default().verify(text, now()),
            Err(AuthError::Unknown)
        );
    }

    #[test]
    fn malformed_tokens() {
        let (store, secret, record) = store_with(vec![Scope::Proxy], None);
        let text = secret.expose();
        let secret_part = &text[17..];
        let cases = [
            ("empty", String::new()),
            ("no prefix", format!("{}_{secret_part}", record.id)),
            ("wrong prefix", format!("rnb_{}_{secret_part}", record.id)),
            (
                "short id",
                format!("rna_{}_{secret_part}", &record.id[..11]),
            ),
            (
                "uppercase hex",
                text.to_uppercase().replacen("RNA_", "rna_", 1),
            ),
            (
                "uppercase secret",
                format!("rna_{}_{}", record.id, secret_part.to_uppercase()),
            ),
            ("extra part", format!("{text}_00")),
            ("trailing newline", format!("{text}\n")),
            ("leading space", format!(" {text}")),
            ("short secret", text[..text.len() - 1].to_owned()),
            ("dash instead of underscore", text.replacen('_', "-", 2)),
            ("non-hex", format!("rna_{}_{}", record.id, "g".repeat(48))),
            (
                "multibyte",
                format!("rna_{}é_{}", &record.id[..10], &secret_part[..48]),
            ),
            ("256 chars", "a".repeat(256)),
            (
                "256 chars with prefix",
                format!("{text}{}", "0".repeat(256 - 65)),
            ),
        ];
        for (name, token) in cases {
            assert_eq!(
                store.verify(&token, now()),
                Err(AuthError::Malformed),
                "{name}"
            );
        }
    }

    #[test]
    fn revoked_token_is_refused() {
        let (mut store, secret, record) = store_with(vec![Scope::Proxy], None);
        store.revoke(&record.id).unwrap();
        assert_eq!(
            store.verify(secret.expose(), now()),
            Err(AuthError::Revoked)
        );
        assert!(!store.is_live(&record.id, now()));
        assert!(matches!(
            store.revoke("ffffffffffff"),
            Err(StoreError::NotFound(id)) if id == "ffffffffffff"
        ));
    }

    #[test]
    fn expired_token_is_refused() {
        let (store, secret, record) = store_with(vec![Scope::Proxy], Some(Duration::from_secs(1)));
        assert_eq!(record.expires, Some(NOW_SECS + 1));
        let later = now() + Duration::from_secs(2);
        assert_eq!(
            store.verify(secret.expose(), later),
            Err(AuthError::Expired)
        );
        assert!(!store.is_live(&record.id, later));
        // The expiry second itself is already expired; the one before is not.
        let at = now() + Duration::from_secs(1);
        assert_eq!(store.verify(secret.expose(), at), Err(AuthError::Expired));
        assert!(store.verify(secret.expose(), now()).is_ok());
        assert!(store.is_live(&record.id, now()));
    }

    #[test]
    fn authorize_checks_scope() {
        let (store, secret, _) = store_with(vec![Scope::ConnectAgentHub], None);
        assert!(store
            .authorize(secret.expose(), Scope::ConnectAgentHub, now())
            .is_ok());
        assert_eq!(
            store.authorize(secret.expose(), Scope::Proxy, now()),
            Err(AuthError::MissingScope(Scope::Proxy))
        );
        // Verification errors come before the scope check.
        assert_eq!(
            store.authorize("nope", Scope::Proxy, now()),
            Err(AuthError::Malformed)
        );

        let (store, secret, _) = store_with(vec![Scope::Admin], None);
        for scope in Scope::ALL {
            let grant = store.authorize(secret.expose(), scope, now()).unwrap();
            assert!(grant.sees_tenant(&tenant("someone/else")));
        }
    }

    #[test]
    fn records_sorted_by_created_then_id() {
        let mut store = TokenStore::default();
        for secs in [30, 10, 20, 10] {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            store
                .create(tenant("a/b"), vec![Scope::Proxy], None, None, at)
                .unwrap();
        }
        let order: Vec<(u64, &str)> = store
            .records()
            .iter()
            .map(|r| (r.created, r.id.as_str()))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        assert_eq!(order.len(), 4);
    }

    #[test]
    fn save_keeps_the_mode_of_an_existing_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let mut store = TokenStore::default();
        store.save(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        store
            .create(tenant("acme/prod"), vec![Scope::Proxy], None, None, now())
            .unwrap();
        store.save(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        assert_eq!(TokenStore::load(&path).unwrap().records().len(), 1);
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let mut store = TokenStore::default();
        let (secret, first) = store
            .create(
                tenant("acme/prod"),
                vec![Scope::ConnectAgentHub, Scope::Proxy],
                Some(Duration::from_secs(30 * 86_400)),
                Some(r#"ci "main" \ bücher"#.into()),
                now(),
            )
            .unwrap();
        let (_, second) = store
            .create(tenant("other/dev"), vec![Scope::Admin], None, None, now())
            .unwrap();
        store.revoke(&second.id).unwrap();
        store.save(&path).unwrap();

        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(HEADER), "{text}");
        assert!(!text.contains(secret.expose()), "{text}");
        assert!(!text.contains(&secret.expose()[17..]), "{text}");
        assert!(text.contains(&first.sha256));

        let loaded = TokenStore::load(&path).unwrap();
        assert_eq!(loaded.records(), store.records());
        assert!(loaded.verify(secret.expose(), now()).is_ok());
        assert_eq!(loaded.get(&second.id).map(|r| r.revoked), Some(true));
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        // Saving again replaces the file.
        let mut loaded = loaded;
        loaded.revoke(&first.id).unwrap();
        loaded.save(&path).unwrap();
        let again = TokenStore::load(&path).unwrap();
        assert_eq!(
            again.verify(secret.expose(), now()),
            Err(AuthError::Revoked)
        );
    }

    #[test]
    fn file_format_matches_the_documented_example() {
        let text = r#"# rna token store: only SHA-256 hashes of tokens are kept here.
[[token]]
id = "0123456789ab"
sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
tenant = "acme/prod"
scopes = ["connect:agentHub", "proxy"]
created = 1763900000
expires = 1766492000
label = "ci"
"#;
        let store = TokenStore::parse(text, Path::new("tokens.toml")).unwrap();
        let record = store.get("0123456789ab").unwrap();
        assert_eq!(record.tenant, tenant("acme/prod"));
        assert_eq!(record.scopes, vec![Scope::ConnectAgentHub, Scope::Proxy]);
        assert_eq!(record.expires, Some(1_766_492_000));
        assert_eq!(record.label.as_deref(), Some("ci"));
        assert!(!record.revoked);
        assert_eq!(
            TokenStore::parse(&store.to_toml(), Path::new("x"))
                .unwrap()
                .records(),
            store.records()
        );
        assert!(TokenStore::parse("", Path::new("x")).unwrap().is_empty());
        assert!(TokenStore::parse(HEADER, Path::new("x"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn parse_errors_name_the_path() {
        let hash = "a".repeat(64);
        let record = |id: &str, sha: &str, extra: &str| {
            format!(
                "[[token]]\nid = \"{id}\"\nsha256 = \"{sha}\"\ntenant = \"acme/prod\"\n\
                 scopes = [\"proxy\"]\ncreated = 1\n{extra}"
            )
        };
        let ok = record("0123456789ab", &hash, "");
        let cases = [
            (
                "unknown field",
                record("0123456789ab", &hash, "foo = 1\n"),
                "line 7: unknown field `foo`",
            ),
            (
                "unknown top-level",
                format!("version = 1\n{ok}"),
                "unknown field `version`",
            ),
            (
                "duplicate id",
                format!("{ok}{ok}"),
                "token #2 (id \"0123456789ab\"): duplicate id",
            ),
            (
                "bad sha256",
                record("0123456789ab", "abc", ""),
                "sha256 must be 64",
            ),
            (
                "uppercase sha256",
                record("0123456789ab", &"A".repeat(64), ""),
                "sha256 must be 64",
            ),
            ("bad id", record("0123456789AB", &hash, ""), "id must be 12"),
            ("short id", record("0123", &hash, ""), "id must be 12"),
            (
                "long label",
                record(
                    "0123456789ab",
                    &hash,
                    &format!("label = \"{}\"\n", "x".repeat(129)),
                ),
                "label must be 1 to 128",
            ),
            ("bad scope", ok.replace("\"proxy\"", "\"root\""), "root"),
            (
                "bad tenant",
                ok.replace("acme/prod", "acme"),
                "must be organization/environment",
            ),
            (
                "negative time",
                ok.replace("created = 1", "created = -1"),
                "line 6",
            ),
            ("missing field", ok.replace("created = 1\n", ""), "created"),
            ("not toml", "[[token]\n".to_owned(), "line 1"),
        ];
        let path = Path::new("/etc/rna/tokens.toml");
        for (name, text, why) in cases {
            let err = TokenStore::parse(&text, path).unwrap_err();
            assert!(
                matches!(err, StoreError::Parse { .. } | StoreError::Invalid { .. }),
                "{name}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.starts_with("/etc/rna/tokens.toml: "),
                "{name}: {message}"
            );
            assert!(message.contains(why), "{name}: {message}");
        }
    }

    #[test]
    fn load_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let err = TokenStore::load(&path).unwrap_err();
        assert!(
            matches!(&err, StoreError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert!(err.to_string().contains("absent.toml"), "{err}");
        assert!(TokenStore::load_or_empty(&path).unwrap().is_empty());
        assert!(super::super::ReloadingStore::open(&path).is_err());
    }

    #[test]
    fn secret_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "  rna_abc\n\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "rna_abc");

        fs::write(&path, " \n").unwrap();
        let err = read_secret_file(&path).unwrap_err();
        assert!(matches!(err, StoreError::EmptySecret(_)), "{err:?}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");

        let missing = dir.path().join("missing");
        let err = read_secret_file(&missing).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
