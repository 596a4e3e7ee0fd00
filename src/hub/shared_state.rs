//! The hub's state in a Kubernetes Secret that every replica shares: loaded before the hub
//! reports ready, followed with a watch, and applied within the watch's latency (new and
//! revoked tokens for the next Hello or SOCKS login, revoked certificates closing their
//! sessions at once), as the file followers do for a hub on its own.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{HubError, Shared};
use crate::auth::{ReloadingStore, Scope, TokenStore};
use crate::enroll::{
    AgentIdentity, CertBytes, EnrollError, EnrollRequest, Issued, IssuedLog, IssuedRecord,
    JoinBook, RefusalCode, RevocationList, Revoked,
};
use crate::identity::{Secret, Tenant};
use crate::state::kube::Snapshot;
use crate::state::{Backend, Documents, KubeState, SecretRef, StateError, StateLocation};

/// The shared state of a hub replica.
#[derive(Debug)]
pub(crate) struct SharedState {
    /// Where it lives; also what enrollment and revocations write through.
    pub(crate) backend: Backend,
    /// The Secret, for the follower.
    kube: KubeState,
    /// The revocation list in force (the token store is the hub's `tokens`).
    revoked: RwLock<Arc<RevocationList>>,
    /// Documents this replica wrote and has not applied yet, with their version: applied at
    /// once by the next [`apply_pending`](SharedState::apply_pending), without waiting for
    /// the watch.
    pending: Mutex<Option<Snapshot>>,
    /// The newest version applied. The watch delivers versions in order, but what this
    /// replica wrote itself may arrive by the watch first: an older version must never
    /// replace a newer one (it would bring back a token store without the newest tokens).
    applied: Applied,
}

/// The newest version applied; see [`SharedState::applied`].
#[derive(Debug, Default)]
struct Applied(Mutex<Option<u64>>);

impl Applied {
    /// Whether `version` is newer than every version admitted so far; if so it is admitted
    /// (a version that is not a number always is).
    fn admit(&self, version: Option<u64>) -> bool {
        let Some(version) = version else {
            return true;
        };
        let mut applied = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if applied.is_some_and(|seen| seen >= version) {
            return false;
        }
        *applied = Some(version);
        true
    }

    /// Whether something at least as new as `version` was admitted already.
    fn has_seen(&self, version: Option<u64>) -> bool {
        let applied = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        version.is_some_and(|v| applied.is_some_and(|seen| seen >= v))
    }
}

/// A resourceVersion as a number. Kubernetes calls them opaque, but the API server's are
/// etcd revisions, increasing with every write; one that is not a number is taken as new.
fn version_number(snapshot: &Snapshot) -> Option<u64> {
    snapshot.version.as_deref().and_then(|v| v.parse().ok())
}

/// What a hub reads its documents as, in messages: the Secret and the key.
fn origin(kube: &KubeState, name: &str) -> std::path::PathBuf {
    Path::new(&format!("Secret {} key {name}", kube.object())).to_path_buf()
}

/// The token store and the revocation list of a snapshot; an absent document is empty.
fn parse(
    kube: &KubeState,
    snapshot: &Snapshot,
) -> (
    Result<TokenStore, crate::auth::StoreError>,
    Result<RevocationList, crate::enroll::EnrollError>,
) {
    let tokens = match snapshot.docs.get(crate::state::TOKENS) {
        Some(text) => TokenStore::parse(text, &origin(kube, crate::state::TOKENS)),
        None => Ok(TokenStore::default()),
    };
    let revoked = match snapshot.docs.get(crate::state::REVOKED) {
        Some(text) => RevocationList::parse(text, &origin(kube, crate::state::REVOKED)),
        None => Ok(RevocationList::default()),
    };
    (tokens, revoked)
}

impl SharedState {
    /// Connects to the API server and loads the state; the hub starts (and reports ready)
    /// only once this has succeeded, so a replica never serves with an empty or partial
    /// token store. A document that does not parse stops the start, as a broken token file
    /// does.
    pub(crate) async fn open(secret: &SecretRef) -> Result<(SharedState, TokenStore), HubError> {
        let kube = KubeState::connect(secret.clone()).await?;
        let snapshot = kube.read().await?;
        let (tokens, revoked) = parse(&kube, &snapshot);
        let (tokens, revoked) = (tokens?, revoked?);
        info!(secret = %kube.object(), tokens = tokens.len(),
            revoked = revoked.entries().count(), "shared state loaded");
        Ok((
            SharedState {
                backend: Backend::Kubernetes(Box::new(kube.clone())),
                kube,
                revoked: RwLock::new(Arc::new(revoked)),
                pending: Mutex::new(None),
                applied: Applied(Mutex::new(version_number(&snapshot))),
            },
            tokens,
        ))
    }

    /// The revocation list in force.
    pub(crate) fn revocations(&self) -> Arc<RevocationList> {
        self.revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies what this replica wrote last, if that was not applied yet.
    pub(crate) fn apply_pending(&self, shared: &Shared) {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(snapshot) = pending {
            apply(shared, self, &snapshot);
        }
    }

    /// Whether `snapshot` is newer than every version applied so far; if so it counts as
    /// applied from now on.
    fn is_newer(&self, snapshot: &Snapshot) -> bool {
        self.applied.admit(version_number(snapshot))
    }

    /// Puts a revocation list in force; `true` when it differs from the one before.
    fn set_revocations(&self, list: RevocationList) -> bool {
        let mut current = self.revoked.write().unwrap_or_else(PoisonError::into_inner);
        let changed = **current != list;
        *current = Arc::new(list);
        changed
    }
}

/// Applies one version of the shared state: tokens that changed are in force for the next
/// login and sessions whose token stopped being valid close; newly revoked certificates close
/// their sessions. A document that does not parse keeps the previous one, as a broken token
/// file does, and says so once per version.
pub(crate) fn apply(shared: &Shared, state: &SharedState, snapshot: &Snapshot) {
    if !state.is_newer(snapshot) {
        return;
    }
    let (tokens, revoked) = parse(&state.kube, snapshot);
    match tokens {
        Ok(store) => {
            let count = store.len();
            if shared.tokens.replace(store) {
                shared.metrics.token_reload(true);
                shared.reloads.send_modify(|n| *n += 1);
                info!(tokens = count, version = ?snapshot.version, "shared token store changed");
                shared.close_sessions_without_token();
            }
        }
        Err(e) => {
            shared.metrics.token_reload(false);
            warn!("shared token store not applied, keeping the previous tokens: {e}");
        }
    }
    match revoked {
        Ok(list) => {
            if state.set_revocations(list) {
                info!(version = ?snapshot.version, "shared revocation list changed");
                shared.close_revoked_sessions();
            }
        }
        Err(e) => warn!("shared revocation list not applied, keeping the previous one: {e}"),
    }
}

/// The hub's token store: the file, followed by the file watcher; or, with the state in a
/// Secret, the Secret's tokens (loaded now) and the shared state that follows it.
pub(crate) async fn open_tokens(
    config: &super::HubConfig,
) -> Result<(Arc<ReloadingStore>, Option<Arc<SharedState>>), HubError> {
    Ok(match &config.state {
        StateLocation::File => (Arc::new(ReloadingStore::open(&config.tokens)?), None),
        StateLocation::Kubernetes(secret) => {
            let (state, store) = SharedState::open(secret).await?;
            (
                Arc::new(ReloadingStore::detached(store)),
                Some(Arc::new(state)),
            )
        }
    })
}

/// Follows the Secret until `stop`, applying every change; nothing with the file store.
pub(crate) fn spawn_follower(shared: &Arc<Shared>, stop: &CancellationToken) {
    let Some(state) = shared.shared_state.clone() else {
        return;
    };
    let (shared, stop) = (shared.clone(), stop.clone());
    tokio::spawn(async move {
        state
            .kube
            .follow(stop, |snapshot| apply(&shared, &state, &snapshot))
            .await;
    });
}

/// Records what `rna token create --join --state kubernetes://…` needs from the hub in the
/// Secret: the CA certificate join tokens pin, and the address agents dial. Written only when
/// it differs, so replicas starting together write it once.
pub(crate) async fn publish_hub(
    state: Option<&SharedState>,
    folder: &crate::enroll::HubState,
    address: &crate::enroll::HubAddress,
) {
    let Some(state) = state else {
        return;
    };
    let ca_pem = crate::fsutil::read_text(&folder.ca(), crate::fsutil::MAX_PEM_FILE).ok();
    let Ok(address) = crate::enroll::to_state_text(address) else {
        return;
    };
    let published = state
        .backend
        .update(|docs| {
            if let Some(ca) = &ca_pem {
                if docs.get(crate::state::CA) != Some(ca.as_str()) {
                    docs.set(crate::state::CA, ca.clone());
                }
            }
            if docs.get(crate::state::ADDRESS) != Some(address.as_str()) {
                docs.set(crate::state::ADDRESS, address.clone());
            }
            Ok::<_, StateError>(())
        })
        .await;
    if let Err(e) = published {
        warn!("join lines made with --state will need --hub: {e}");
    }
}

/// An enrollment step's error: the step's own, or the shared state's (which the agent is told
/// as `unavailable`, the detail staying in the hub's log).
struct Step(EnrollError);

impl From<EnrollError> for Step {
    fn from(e: EnrollError) -> Step {
        Step(e)
    }
}

impl From<StateError> for Step {
    fn from(e: StateError) -> Step {
        Step(unavailable("shared state", e))
    }
}

impl From<crate::auth::StoreError> for Step {
    fn from(e: crate::auth::StoreError) -> Step {
        Step(unavailable("token store", e))
    }
}

fn unavailable(what: &str, e: impl std::error::Error + 'static) -> EnrollError {
    EnrollError::State {
        path: what.into(),
        message: crate::fsutil::error_chain(&e),
    }
}

/// A JSON document of the state; empty when absent.
fn doc<T: serde::de::DeserializeOwned + Default>(
    docs: &Documents,
    name: &str,
) -> Result<T, EnrollError> {
    match docs.get(name) {
        Some(text) => crate::enroll::from_state_text(text, Path::new(name)),
        None => Ok(T::default()),
    }
}

/// A document of the state parsed, or empty when absent.
fn tokens_of(docs: &Documents) -> Result<TokenStore, Step> {
    Ok(match docs.get(crate::state::TOKENS) {
        Some(text) => TokenStore::parse(text, Path::new(crate::state::TOKENS))?,
        None => TokenStore::default(),
    })
}

/// The issued-certificate log of the state; empty when absent.
fn issued_of(docs: &Documents) -> Result<IssuedLog, Step> {
    Ok(match docs.get(crate::state::ISSUED) {
        Some(text) => IssuedLog::parse(text, Path::new(crate::state::ISSUED))?,
        None => IssuedLog::default(),
    })
}

/// The revocation list of the state; empty when absent.
fn revoked_of(docs: &Documents) -> Result<RevocationList, Step> {
    Ok(match docs.get(crate::state::REVOKED) {
        Some(text) => RevocationList::parse(text, Path::new(crate::state::REVOKED))?,
        None => RevocationList::default(),
    })
}

/// Keeps what this replica just wrote, to be applied by the next
/// [`apply_pending`](SharedState::apply_pending) without waiting for the watch.
fn keep_pending(state: &SharedState, docs: Documents, version: Option<String>) {
    *state.pending.lock().unwrap_or_else(PoisonError::into_inner) =
        Some(Snapshot { docs, version });
}

/// Enrollment with the state in the Secret: spending the join token's use, logging the
/// certificate, adding the agent's connect token (revoking the one of the certificate it
/// presented, if any) and pruning lapsed enrolled tokens are one write, made only if no other
/// replica wrote in between (else done again on what it wrote), so two replicas can never
/// spend one use twice. Blocking: run off the I/O threads, inside the runtime.
pub(super) fn enroll(
    enroller: &super::enroll::Enroller,
    state: &SharedState,
    request: &EnrollRequest,
    agent: &str,
    presented: Option<&AgentIdentity>,
    now: SystemTime,
) -> Result<Issued, EnrollError> {
    let tenant = presented.map(|identity| &identity.tenant);
    let change = |docs: &mut Documents| -> Result<_, Step> {
        let mut book: JoinBook = doc(docs, crate::state::JOIN_TOKENS)?;
        let admission = book.redeem(request.join_token.expose(), agent, tenant, now)?;
        let created = book.get(&admission.token_id).map_or(0, |r| r.created);
        super::enroll::refuse_if_revoked_since(&revoked_of(docs)?, &admission, created)
            .map_err(Step)?;
        let signed = enroller
            .signer
            .sign(&request.csr_der, &admission, enroller.lifetime, now)?;
        docs.set(
            crate::state::JOIN_TOKENS,
            crate::enroll::to_state_text(&book)?,
        );
        let mut log = issued_of(docs)?;
        let replaced = presented
            .and_then(|identity| log.by_serial(&identity.serial))
            .and_then(|record| record.connect_token.clone());
        let mut store = tokens_of(docs)?;
        // As with the file store: the token lives as long as the certificate, renewals move
        // its end, and a lapsed agent's token lapses and is pruned.
        let ttl = Duration::from_secs(
            signed
                .not_after
                .saturating_sub(crate::auth::unix_now(now))
                .max(1),
        );
        let (connect_token, token) = store.create(
            admission.tenant.clone(),
            vec![Scope::ConnectAgentHub],
            Some(ttl),
            Some(format!("agent {agent} {}", super::enroll::ENROLLED_LABEL)),
            now,
        )?;
        if let Some(old) = &replaced {
            // Gone already when it was pruned or removed by hand: nothing to revoke then.
            let _ = store.revoke(old);
        }
        super::enroll::prune_enrolled_tokens(&mut store, now);
        let mut record = IssuedRecord::of(&signed, Some(admission.token_id.clone()));
        record.connect_token = Some(token.id.clone());
        log.add(record)?;
        docs.set(crate::state::ISSUED, log.to_text()?);
        docs.set(crate::state::TOKENS, store.to_toml());
        Ok((signed, connect_token, admission))
    };
    let written =
        tokio::runtime::Handle::current().block_on(state.backend.update_versioned(change));
    let ((signed, connect_token, admission), docs, version) = written.map_err(|Step(e)| e)?;
    keep_pending(state, docs, version);
    info!(agent = %agent, tenant = %admission.tenant, serial = %signed.serial,
        join_token = %admission.token_id, not_after = signed.not_after, "agent enrolled");
    Ok(Issued {
        chain: vec![CertBytes(signed.cert_der)],
        ca: CertBytes(enroller.ca_der.clone()),
        connect_token: Secret::new(connect_token.expose().to_owned()),
        serial: signed.serial,
        not_after: signed.not_after,
    })
}

/// Renewal with the state in the Secret: the revocation check, the new certificate in the
/// log (with the old one's connect token) and that token's new expiry are one conditional
/// write, so every replica sees the renewed certificate and keeps accepting the token.
/// Blocking, inside the runtime.
pub(super) fn renew(
    enroller: &super::enroll::Enroller,
    state: &SharedState,
    request: &crate::enroll::RenewRequest,
    identity: &AgentIdentity,
    now: SystemTime,
) -> Result<Issued, EnrollError> {
    let admission = crate::enroll::Admission {
        token_id: format!("renewal of {}", identity.serial),
        tenant: identity.tenant.clone(),
        agent: identity.agent.clone(),
    };
    let change = |docs: &mut Documents| -> Result<_, Step> {
        if revoked_of(docs)?.is_revoked(&identity.serial) {
            return Err(Step(EnrollError::Refused {
                code: RefusalCode::Revoked,
                message: format!(
                    "certificate {} of agent {:?} is revoked; enroll again with a new join token",
                    identity.serial, identity.agent
                ),
            }));
        }
        let signed = enroller
            .signer
            .sign(&request.csr_der, &admission, enroller.lifetime, now)?;
        let mut log = issued_of(docs)?;
        let connect_token = log
            .by_serial(&identity.serial)
            .and_then(|record| record.connect_token.clone());
        let mut record = IssuedRecord::of(&signed, None);
        record.connect_token = connect_token.clone();
        log.add(record)?;
        docs.set(crate::state::ISSUED, log.to_text()?);
        if let Some(id) = &connect_token {
            let mut store = tokens_of(docs)?;
            match store.set_expires(id, Some(signed.not_after)) {
                Ok(()) => docs.set(crate::state::TOKENS, store.to_toml()),
                // Removed by hand: the agent's next Hello says so; the certificate is fine.
                Err(e) => warn!(agent = %identity.agent, token_id = %id,
                    "renewal: the agent's connect token is not in the store: {e}"),
            }
        }
        Ok(signed)
    };
    let written =
        tokio::runtime::Handle::current().block_on(state.backend.update_versioned(change));
    let (signed, docs, version) = written.map_err(|Step(e)| e)?;
    keep_pending(state, docs, version);
    info!(agent = %identity.agent, tenant = %identity.tenant, serial = %signed.serial,
        previous = %identity.serial, not_after = signed.not_after, "agent certificate renewed");
    Ok(Issued {
        chain: vec![CertBytes(signed.cert_der)],
        ca: CertBytes(enroller.ca_der.clone()),
        connect_token: Secret::new(String::new()),
        serial: signed.serial,
        not_after: signed.not_after,
    })
}

/// A rotation's new token with the state in the Secret: a token like `old` (tenant, scopes,
/// label, expiry) added, and the issued certificates of `old` pointed at it, in one
/// conditional write; the token and its id. Blocking, inside the runtime.
pub(super) fn rotate_token(state: &SharedState, old: &str) -> Result<(Secret, String), String> {
    let now = SystemTime::now();
    let change = |docs: &mut Documents| -> Result<_, Step> {
        let mut store = tokens_of(docs)?;
        let record = store.get(old).cloned().ok_or_else(|| {
            Step(unavailable(
                "token store",
                crate::auth::StoreError::NotFound(old.to_owned()),
            ))
        })?;
        let ttl = record
            .expires
            .map(|end| Duration::from_secs(end.saturating_sub(crate::auth::unix_now(now)).max(1)));
        let (token, new) = store.create(record.tenant, record.scopes, ttl, record.label, now)?;
        docs.set(crate::state::TOKENS, store.to_toml());
        let mut log = issued_of(docs)?;
        if log.replace_connect_token(old, &new.id) > 0 {
            docs.set(crate::state::ISSUED, log.to_text()?);
        }
        Ok((token, new.id))
    };
    let written =
        tokio::runtime::Handle::current().block_on(state.backend.update_versioned(change));
    let (made, docs, version) = written.map_err(|Step(e)| e.to_string())?;
    keep_pending(state, docs, version);
    Ok(made)
}

/// Revokes the connect token `old` in the Secret (the end of a rotation): every replica
/// refuses it and closes its sessions once the watch brings the change. Blocking, inside the
/// runtime.
pub(super) fn revoke_token(state: &SharedState, old: &str) -> Result<(), String> {
    let change = |docs: &mut Documents| -> Result<_, Step> {
        let mut store = tokens_of(docs)?;
        store.revoke(old)?;
        docs.set(crate::state::TOKENS, store.to_toml());
        Ok(())
    };
    let written =
        tokio::runtime::Handle::current().block_on(state.backend.update_versioned(change));
    let ((), docs, version) = written.map_err(|Step(e)| e.to_string())?;
    keep_pending(state, docs, version);
    Ok(())
}

/// Revokes every certificate issued to `agent` in `tenant` in the Secret (the admin API's
/// revoke), and puts the new list in force on this replica at once; the others follow
/// through the watch. Blocking, inside the runtime.
pub(super) fn revoke(
    state: &SharedState,
    agent: &str,
    tenant: &Tenant,
) -> Result<Vec<Revoked>, EnrollError> {
    let now = crate::auth::unix_now(SystemTime::now());
    let change = |docs: &mut Documents| -> Result<_, Step> {
        let log = match docs.get(crate::state::ISSUED) {
            Some(text) => IssuedLog::parse(text, Path::new(crate::state::ISSUED))?,
            None => IssuedLog::default(),
        };
        let mut list = match docs.get(crate::state::REVOKED) {
            Some(text) => RevocationList::parse(text, Path::new(crate::state::REVOKED))?,
            None => RevocationList::default(),
        };
        let added = list.revoke(&log, agent, Some(tenant), now)?;
        docs.set(crate::state::REVOKED, list.to_text()?);
        Ok((added, list))
    };
    let written =
        tokio::runtime::Handle::current().block_on(state.backend.update_versioned(change));
    let ((added, list), docs, version) = written.map_err(|Step(e)| e)?;
    // In force here at once, unless the watch already brought something newer. The version
    // is left for the watch to mark applied, since the tokens of this write are not applied.
    let newer = Snapshot { docs, version };
    if !state.applied.has_seen(version_number(&newer)) {
        state.set_revocations(list);
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let applied = Applied::default();
        assert!(applied.admit(Some(12)));
        // This replica's own write (version 11) arrives after the watch brought 12.
        assert!(!applied.admit(Some(11)));
        assert!(
            !applied.admit(Some(12)),
            "the same version twice is applied once"
        );
        assert!(applied.has_seen(Some(11)) && applied.has_seen(Some(12)));
        assert!(!applied.has_seen(Some(13)) && !applied.has_seen(None));
        assert!(applied.admit(Some(13)));
        // A deleted Secret (no version) is always applied.
        assert!(applied.admit(None));
        let version = |v: &str| {
            version_number(&Snapshot {
                docs: Documents::default(),
                version: Some(v.into()),
            })
        };
        assert_eq!(version("42"), Some(42));
        assert_eq!(version("opaque"), None);
    }
}
