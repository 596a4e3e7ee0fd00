//! The one check of a presented secret: an opaque rna token against the token store, or a
//! JWT from a trusted OIDC issuer, each mapped to the same [`Grant`] and scope rule, so
//! the agent's Hello, the admin API and the status page accept both alike.

use std::time::SystemTime;

use crate::auth::{AuthError, Grant, Scope};
use crate::oidc::issuer::looks_like_jwt;
use crate::oidc::{Verifier, VerifyError};
use crate::proto::CloseCode;

use super::registry::AgentSession;
use super::Shared;
use crate::identity::Secret;
use tracing::{info, warn};

/// The prefix of a JWT caller's [`Grant::token_id`]: `oidc:<issuer>#<sub>`. It names who
/// acted in audit lines and per-token caps (one OIDC client is one "token" for the caps,
/// however many JWTs it fetches), and it can never collide with an opaque token's id.
pub(crate) const OIDC_ID_PREFIX: &str = "oidc:";

/// A caller whose secret verified and carries the required scope.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// What the caller may do. For a JWT: the tenant from its claim (or issuer), its scopes,
    /// `token_id` = `oidc:<issuer>#<sub>` and `label` = its `client_id`.
    pub(crate) grant: Grant,
    /// For a JWT, its `exp` plus the issuer's leeway (Unix seconds): the hub closes a session
    /// past it. `None` for an opaque token, whose expiry the token store follows.
    pub(crate) expires_at: Option<i64>,
}

/// Why a presented secret was refused. Messages never contain the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CredentialError {
    /// An opaque token that did not verify or lacks the scope.
    #[error(transparent)]
    Token(#[from] AuthError),
    /// A JWT that did not verify or lacks the scope.
    #[error(transparent)]
    Jwt(#[from] VerifyError),
}

impl CredentialError {
    /// Whether the secret is valid but lacks the scope (403 rather than 401).
    pub(crate) fn is_missing_scope(&self) -> bool {
        matches!(
            self,
            CredentialError::Token(AuthError::MissingScope(_))
                | CredentialError::Jwt(VerifyError::MissingScope(_))
        )
    }

    /// The close code an agent refused with this error gets.
    pub(crate) fn close_code(&self) -> CloseCode {
        match self {
            CredentialError::Token(e) => super::session::token_close(e),
            CredentialError::Jwt(VerifyError::Expired(_)) => CloseCode::TokenExpired,
            CredentialError::Jwt(VerifyError::MissingScope(_)) => CloseCode::MissingScope,
            CredentialError::Jwt(_) => CloseCode::BadToken,
        }
    }
}

/// Checks `secret` and requires `scope`: a JWT (by its shape) when issuers are trusted,
/// otherwise an opaque token from the current store. Without trusted issuers a JWT is
/// refused as a malformed token, exactly as before issuers existed.
pub(crate) async fn authorize(
    shared: &Shared,
    secret: &str,
    scope: Scope,
) -> Result<Caller, CredentialError> {
    match &shared.oidc {
        Some(verifier) if looks_like_jwt(secret) => {
            let result = authorize_jwt(verifier, secret, scope).await;
            let (issuer, outcome) = match &result {
                Ok((issuer, _)) => (issuer.as_str(), "accepted"),
                Err((issuer, e)) => (issuer.as_deref().unwrap_or("unknown"), outcome(e)),
            };
            shared.metrics.oidc_token(issuer, outcome);
            match result {
                Ok((_, caller)) => Ok(caller),
                Err((_, e)) => Err(e.into()),
            }
        }
        _ => {
            let grant = shared
                .tokens
                .current()
                .authorize(secret, scope, SystemTime::now())?;
            Ok(Caller {
                grant,
                expires_at: None,
            })
        }
    }
}

/// Verifies a JWT and maps it to a [`Caller`]; both results carry the trusted issuer when
/// one was found (for the metric's label: never the claimed, untrusted `iss`).
async fn authorize_jwt(
    verifier: &Verifier,
    token: &str,
    scope: Scope,
) -> Result<(String, Caller), (Option<String>, VerifyError)> {
    let oidc = verifier
        .verify(token)
        .await
        .map_err(|e| (trusted_issuer(&e), e))?;
    oidc.require(scope)
        .map_err(|e| (Some(oidc.issuer.clone()), e))?;
    let mut grant = oidc.grant;
    grant.token_id = format!("{OIDC_ID_PREFIX}{}#{}", oidc.issuer, oidc.subject);
    let caller = Caller {
        grant,
        expires_at: Some(oidc.valid_until),
    };
    Ok((oidc.issuer, caller))
}

/// The trusted issuer a refusal names, if any; `untrusted` for a token of another issuer.
fn trusted_issuer(e: &VerifyError) -> Option<String> {
    match e {
        VerifyError::UnknownIssuer(_) => Some("untrusted".into()),
        VerifyError::UnknownKid { issuer, .. }
        | VerifyError::MissingClaim { issuer, .. }
        | VerifyError::KeysUnavailable(issuer)
        | VerifyError::BadSignature(issuer)
        | VerifyError::Expired(issuer)
        | VerifyError::NotYetValid(issuer)
        | VerifyError::WrongAudience(issuer)
        | VerifyError::BadTenant(issuer) => Some(issuer.clone()),
        VerifyError::Malformed(_) | VerifyError::AlgRefused(_) | VerifyError::MissingScope(_) => {
            None
        }
    }
}

/// The metric's `result` label of a refusal.
fn outcome(e: &VerifyError) -> &'static str {
    match e {
        VerifyError::Malformed(_) => "malformed",
        VerifyError::AlgRefused(_) => "alg_refused",
        VerifyError::UnknownIssuer(_) => "untrusted_issuer",
        VerifyError::UnknownKid { .. } => "unknown_kid",
        VerifyError::KeysUnavailable(_) => "keys_unavailable",
        VerifyError::BadSignature(_) => "bad_signature",
        VerifyError::Expired(_) => "expired",
        VerifyError::NotYetValid(_) => "not_yet_valid",
        VerifyError::WrongAudience(_) => "wrong_audience",
        VerifyError::MissingClaim { .. } => "missing_claim",
        VerifyError::BadTenant(_) => "bad_tenant",
        VerifyError::MissingScope(_) => "missing_scope",
    }
}

/// Checks a renewed credential an agent sent for its live `session`: it must verify with
/// `connect:agentHub` and name the same caller (`oidc:<issuer>#<sub>`, or the same opaque
/// token) and tenant; the session then lives until the new credential's end. Anything else
/// closes the session with the matching code and one log line.
pub(crate) async fn reauthenticate(shared: &Shared, session: &AgentSession, token: &Secret) {
    let refused = match authorize(shared, token.expose(), Scope::ConnectAgentHub).await {
        Ok(caller)
            if caller.grant.token_id == session.token_id
                && caller.grant.tenant == session.tenant =>
        {
            if let Some(until) = caller.expires_at {
                session.set_credential_expiry(until);
            }
            info!(token_id = %session.token_id, valid_until = caller.expires_at,
                "agent re-authenticated its session");
            return;
        }
        Ok(caller) => (
            CloseCode::BadToken,
            format!(
                "re-authentication names another identity ({} in {}) than the session's",
                caller.grant.token_id, caller.grant.tenant
            ),
        ),
        Err(e) => (e.close_code(), format!("re-authentication refused: {e}")),
    };
    warn!(token_id = %session.token_id, "closing agent session: {}", refused.1);
    session.close(refused.0, &refused.1);
}

/// Whether `token_id` names a JWT caller (whose validity is its `exp`, not the store).
pub(crate) fn is_oidc_id(token_id: &str) -> bool {
    token_id.starts_with(OIDC_ID_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_close_code_and_scope_refusals_are_told_apart() {
        let issuer = || "https://issuer.example".to_string();
        let cases = [
            (
                CredentialError::Token(AuthError::Unknown),
                CloseCode::BadToken,
                false,
            ),
            (
                CredentialError::Token(AuthError::Revoked),
                CloseCode::TokenRevoked,
                false,
            ),
            (
                CredentialError::Token(AuthError::Expired),
                CloseCode::TokenExpired,
                false,
            ),
            (
                CredentialError::Token(AuthError::MissingScope(Scope::Proxy)),
                CloseCode::MissingScope,
                true,
            ),
            (
                CredentialError::Jwt(VerifyError::Expired(issuer())),
                CloseCode::TokenExpired,
                false,
            ),
            (
                CredentialError::Jwt(VerifyError::WrongAudience(issuer())),
                CloseCode::BadToken,
                false,
            ),
            (
                CredentialError::Jwt(VerifyError::UnknownIssuer(issuer())),
                CloseCode::BadToken,
                false,
            ),
            (
                CredentialError::Jwt(VerifyError::MissingScope(Scope::ConnectAgentHub)),
                CloseCode::MissingScope,
                true,
            ),
        ];
        for (err, code, scope) in cases {
            assert_eq!(err.close_code(), code, "{err}");
            assert_eq!(err.is_missing_scope(), scope, "{err}");
        }
        assert!(is_oidc_id("oidc:https://issuer.example#edge"));
        assert!(!is_oidc_id("0123456789ab"));
    }
}
