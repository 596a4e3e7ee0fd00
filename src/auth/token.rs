//! Token vocabulary: scopes, grants, and the `rna_<id>_<secret>` text. Tenants and the masked
//! secret a token travels in are identity rules, in `crate::identity`.

use std::fmt;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

use crate::identity::{Secret, Tenant};

/// A permission a token carries. The wire and file names are the `as_str` strings.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Scope {
    /// `connect:agentHub`: an agent may register with the hub.
    #[serde(rename = "connect:agentHub")]
    ConnectAgentHub,
    /// `proxy`: the SOCKS front may be used.
    #[serde(rename = "proxy")]
    Proxy,
    /// `read:infra:data`: read the hub's inventory (agents, sessions).
    #[serde(rename = "read:infra:data")]
    ReadInfraData,
    /// `exec:infra:op`: run operations on the infrastructure.
    #[serde(rename = "exec:infra:op")]
    ExecInfraOp,
    /// `read:metrics`: read the hub's Prometheus metrics, which count every tenant (so the
    /// token's own tenant does not narrow them); for the monitoring system only.
    #[serde(rename = "read:metrics")]
    ReadMetrics,
    /// `admin`: every scope, in every tenant.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    /// Every scope, in their sort order.
    pub const ALL: [Scope; 6] = [
        Scope::ConnectAgentHub,
        Scope::Proxy,
        Scope::ReadInfraData,
        Scope::ExecInfraOp,
        Scope::ReadMetrics,
        Scope::Admin,
    ];

    /// The wire and file name of the scope.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ConnectAgentHub => "connect:agentHub",
            Scope::Proxy => "proxy",
            Scope::ReadInfraData => "read:infra:data",
            Scope::ExecInfraOp => "exec:infra:op",
            Scope::ReadMetrics => "read:metrics",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not the name of any [`Scope`]; the message lists the valid names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {input:?}; valid scopes are {}", valid_scopes())]
pub struct ParseScopeError {
    /// The refused text.
    input: String,
}

fn valid_scopes() -> String {
    Scope::ALL.map(Scope::as_str).join(", ")
}

impl FromStr for Scope {
    type Err = ParseScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| ParseScopeError {
                input: s.to_owned(),
            })
    }
}

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The public id of the token, for logs and for closing sessions when it is revoked.
    pub token_id: String,
    /// The token's free-text label, if it has one.
    pub label: Option<String>,
    /// The tenant the token belongs to.
    pub tenant: Tenant,
    /// The scopes the token carries, deduplicated and sorted.
    pub scopes: Vec<Scope>,
}

impl Grant {
    /// Whether the token carries `scope`; `Admin` implies every scope.
    pub fn has(&self, scope: Scope) -> bool {
        self.is_admin() || self.scopes.contains(&scope)
    }

    /// Whether the token may see `tenant`: its own, or every tenant for `Admin`.
    pub fn sees_tenant(&self, tenant: &Tenant) -> bool {
        self.is_admin() || self.tenant == *tenant
    }

    /// Whether the token carries `Admin`.
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }
}

/// Why a presented token was refused. The messages never include the token text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The text is not `rna_<12 hex>_<48 hex>`.
    #[error("token is malformed")]
    Malformed,
    /// No token with this id and secret is stored (a wrong secret looks the same, so callers
    /// cannot probe which ids exist).
    #[error("token is not known")]
    Unknown,
    /// The token was revoked.
    #[error("token was revoked")]
    Revoked,
    /// The token's expiry has passed.
    #[error("token has expired")]
    Expired,
    /// The token is valid but lacks the scope the operation needs.
    #[error("token lacks scope {0}")]
    MissingScope(Scope),
}

/// Bytes of randomness in a token id (12 hex characters).
const ID_BYTES: usize = 6;
/// Bytes of randomness in a token secret (48 hex characters, 192 bits).
const SECRET_BYTES: usize = 24;
/// The fixed start of every token.
const PREFIX: &str = "rna_";
/// Length of the token text: prefix, id, `_`, secret.
const TOKEN_LEN: usize = PREFIX.len() + 2 * ID_BYTES + 1 + 2 * SECRET_BYTES;

/// Whether `s` is exactly `len` lowercase hex digits.
pub(crate) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `id` is a well-formed token id.
pub(super) fn is_token_id(id: &str) -> bool {
    is_lower_hex(id, 2 * ID_BYTES)
}

/// Checks the token format and returns its id (`rna_<id>_<secret>`: the id is public).
pub fn token_id(token: &str) -> Result<&str, AuthError> {
    if token.len() != TOKEN_LEN || !token.starts_with(PREFIX) {
        return Err(AuthError::Malformed);
    }
    let id_end = PREFIX.len() + 2 * ID_BYTES;
    // `get` rather than indexing: the text may not be ASCII, and a slice at a non-boundary
    // would panic.
    match (
        token.get(PREFIX.len()..id_end),
        token.get(id_end..id_end + 1),
        token.get(id_end + 1..),
    ) {
        (Some(id), Some("_"), Some(secret))
            if is_token_id(id) && is_lower_hex(secret, 2 * SECRET_BYTES) =>
        {
            Ok(id)
        }
        _ => Err(AuthError::Malformed),
    }
}

/// Lowercase hex of the SHA-256 of the whole token text, as kept in the store.
pub(super) fn token_sha256(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// A fresh random token: its id and the whole token text.
pub(super) fn generate(rng: &SystemRandom) -> Result<(String, Secret), ring::error::Unspecified> {
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill(&mut id)?;
    rng.fill(&mut secret)?;
    let id = hex(&id);
    let token = format!("{PREFIX}{id}_{}", hex(&secret));
    Ok((id, Secret::new(token)))
}

/// Lowercase hex encoding.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_strings_round_trip() {
        let names = [
            (Scope::ConnectAgentHub, "connect:agentHub"),
            (Scope::Proxy, "proxy"),
            (Scope::ReadInfraData, "read:infra:data"),
            (Scope::ExecInfraOp, "exec:infra:op"),
            (Scope::ReadMetrics, "read:metrics"),
            (Scope::Admin, "admin"),
        ];
        assert_eq!(names.map(|(scope, _)| scope), Scope::ALL);
        for (scope, name) in names {
            assert_eq!(scope.as_str(), name);
            assert_eq!(scope.to_string(), name);
            assert_eq!(name.parse::<Scope>(), Ok(scope));
            // serde uses the same names.
            let json = serde_json::to_string(&scope).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), scope);
        }
    }

    #[test]
    fn bad_scope_lists_valid_names() {
        for bad in ["", "Admin", "connect:agenthub", "proxy ", "read"] {
            let err = bad.parse::<Scope>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
            for scope in Scope::ALL {
                assert!(err.contains(scope.as_str()), "{err}");
            }
            assert!(serde_json::from_str::<Scope>(&format!("{bad:?}")).is_err());
        }
    }

    #[test]
    fn grant_scopes_and_tenants() {
        let acme: Tenant = "acme/prod".parse().unwrap();
        let other: Tenant = "other/prod".parse().unwrap();
        let grant = |scopes: Vec<Scope>| Grant {
            token_id: "0123456789ab".into(),
            label: None,
            tenant: acme.clone(),
            scopes,
        };
        let agent = grant(vec![Scope::ConnectAgentHub]);
        assert!(agent.has(Scope::ConnectAgentHub));
        assert!(!agent.has(Scope::Proxy));
        assert!(!agent.is_admin());
        assert!(agent.sees_tenant(&acme));
        assert!(!agent.sees_tenant(&other));

        let admin = grant(vec![Scope::Admin]);
        assert!(admin.is_admin());
        for scope in Scope::ALL {
            assert!(admin.has(scope), "{scope}");
        }
        assert!(admin.sees_tenant(&acme));
        assert!(admin.sees_tenant(&other));
    }

    #[test]
    fn generated_tokens_have_the_documented_shape() {
        let rng = SystemRandom::new();
        let (id, token) = generate(&rng).unwrap();
        let text = token.expose();
        assert_eq!(text.len(), 65);
        assert!(text.starts_with(&format!("rna_{id}_")));
        assert_eq!(token_id(text), Ok(id.as_str()));
        let (other, _) = generate(&rng).unwrap();
        assert_ne!(id, other);
        assert!(is_lower_hex(&token_sha256(text), 64));
    }

    #[test]
    fn auth_error_messages() {
        let cases = [
            (AuthError::Malformed, "token is malformed"),
            (AuthError::Unknown, "token is not known"),
            (AuthError::Revoked, "token was revoked"),
            (AuthError::Expired, "token has expired"),
            (
                AuthError::MissingScope(Scope::ConnectAgentHub),
                "token lacks scope connect:agentHub",
            ),
        ];
        for (err, text) in cases {
            assert_eq!(err.to_string(), text);
        }
    }
}
