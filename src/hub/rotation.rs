//! Rotation of an agent's connect token over its live sessions: `POST
//! /api/v1/agents/{agent}/rotate-token` makes a new token like the old one, sends it to the
//! agent on each session's control stream (`Control::RotateToken`), and revokes the old
//! token once no session uses it any more: the agent acknowledges by moving to a new session
//! with the new token (make-before-break), so no running transfer breaks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use tracing::{info, warn, Instrument};

use super::api::{AdminOnly, ApiError, Authorized};
use super::Shared;
use crate::auth::TokenStore;
use crate::identity::Secret;
use crate::proto::Control;

/// The longest the hub waits for the agent to leave every session of the old token before it
/// revokes the token anyway (which closes those sessions): an agent that cannot make a new
/// session keeps its old one this long.
const ROTATION_GRACE: Duration = Duration::from_secs(10 * 60);

/// How often the hub looks whether the old token is still in use.
const IN_USE_CHECK: Duration = Duration::from_millis(250);

/// `POST /api/v1/agents/{agent}/rotate-token` (an `admin` token; `?tenant=` when several
/// tenants have the name): rotates the connect token of every live session of that agent in
/// that tenant. 404 when it has no live session with an opaque token (a JWT session renews
/// its own credential).
pub(crate) async fn rotate_token(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    axum::extract::Path(agent): axum::extract::Path<String>,
    auth: Authorized<AdminOnly>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let tenant = auth.tenant.clone();
    // Sessions by the token they registered with: several instances of one name may hold
    // different tokens, and each gets its own new one.
    let mut by_token: BTreeMap<String, Vec<Arc<super::registry::AgentSession>>> = BTreeMap::new();
    for session in shared.registry.sessions() {
        if session.name == agent
            && session.tenant == tenant
            && !super::credential::is_oidc_id(&session.token_id)
        {
            by_token
                .entry(session.token_id.clone())
                .or_default()
                .push(session);
        }
    }
    if by_token.is_empty() {
        return Err(ApiError::Status(
            StatusCode::NOT_FOUND,
            format!("agent {agent:?} has no live session with a connect token in {tenant}"),
        ));
    }
    let mut rotated = Vec::new();
    for (old, sessions) in by_token {
        let (shared2, old2) = (shared.clone(), old.clone());
        let made = tokio::task::spawn_blocking(move || replace_token(&shared2, &old2))
            .await
            .map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let (token, new_id) = made.map_err(|e| {
            warn!("connect token rotation failed: {e}");
            ApiError::Status(
                StatusCode::SERVICE_UNAVAILABLE,
                "the token store could not be written".into(),
            )
        })?;
        // The new token verifies before the agent first presents it.
        let _ = shared.reload_tokens(true);
        let sent = sessions
            .iter()
            .filter(|s| {
                s.send_control(Control::RotateToken {
                    token: token.clone(),
                })
            })
            .count();
        info!(token_id = %auth.grant.token_id, agent = %agent, tenant = %tenant,
            old = %old, new = %new_id, sessions = sent, "connect token rotated through the admin API");
        let span = tracing::info_span!("rotation", agent = %agent, old = %old);
        tokio::spawn(revoke_when_unused(shared.clone(), old.clone()).instrument(span));
        rotated.push(serde_json::json!({
            "old_token_id": old,
            "new_token_id": new_id,
            "sessions": sent,
        }));
    }
    Ok(axum::Json(serde_json::json!({
        "agent": agent,
        "tenant": tenant.to_string(),
        "rotated": rotated,
    })))
}

/// Adds a token like `old` (tenant, scopes, label, expiry) to the store and points the
/// issued-certificate log at it. Blocking (file I/O).
/// With the state in a Kubernetes Secret, both are one write there, seen by every replica.
fn replace_token(shared: &Shared, old: &str) -> Result<(Secret, String), String> {
    if let Some(state) = &shared.shared_state {
        return super::shared_state::rotate_token(state, old);
    }
    let path = &shared.config.tokens;
    let _one_at_a_time = shared.enroller.as_ref().map(|e| e.lock_state());
    let mut store = TokenStore::load_or_empty(path).map_err(|e| e.to_string())?;
    let record = store
        .get(old)
        .cloned()
        .ok_or_else(|| format!("token {old} is not in the store"))?;
    let now = SystemTime::now();
    let ttl = record
        .expires
        .map(|end| Duration::from_secs(end.saturating_sub(crate::auth::unix_now(now)).max(1)));
    let (token, new) = store
        .create(record.tenant, record.scopes, ttl, record.label, now)
        .map_err(|e| e.to_string())?;
    store.save(path).map_err(|e| e.to_string())?;
    if let Some(enroller) = &shared.enroller {
        enroller.relink_connect_token(old, &new.id)?;
    }
    Ok((token, new.id))
}

/// Revokes `old` once no session uses it, or after [`ROTATION_GRACE`].
async fn revoke_when_unused(shared: Arc<Shared>, old: String) {
    let deadline = tokio::time::Instant::now() + ROTATION_GRACE;
    let in_use = |shared: &Shared| {
        shared
            .registry
            .sessions()
            .iter()
            .any(|s| s.token_id == old && s.closed_by_hub().is_none())
    };
    while in_use(&shared) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(IN_USE_CHECK).await;
    }
    let still_used = in_use(&shared);
    let (shared2, old2) = (shared.clone(), old.clone());
    let revoked = tokio::task::spawn_blocking(move || {
        if let Some(state) = &shared2.shared_state {
            return super::shared_state::revoke_token(state, &old2);
        }
        let path = &shared2.config.tokens;
        let _one_at_a_time = shared2.enroller.as_ref().map(|e| e.lock_state());
        let mut store = TokenStore::load_or_empty(path).map_err(|e| e.to_string())?;
        store.revoke(&old2).map_err(|e| e.to_string())?;
        store.save(path).map_err(|e| e.to_string())
    })
    .await;
    match revoked {
        Ok(Ok(())) => {
            let _ = shared.reload_tokens(true);
            if still_used {
                warn!(
                    "old connect token revoked after {ROTATION_GRACE:?} while a session still used it"
                );
            } else {
                info!("old connect token revoked: no session uses it any more");
            }
        }
        Ok(Err(e)) => warn!("the old connect token could not be revoked: {e}"),
        Err(e) => warn!("the old connect token could not be revoked: {e}"),
    }
}
