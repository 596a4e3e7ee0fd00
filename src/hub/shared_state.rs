//! The hub's state in a Kubernetes Secret that every replica shares: loaded before the hub
//! reports ready, followed with a watch, and applied within the watch's latency (new and
//! revoked tokens for the next Hello or SOCKS login, revoked certificates closing their
//! sessions at once), as the file followers do for a hub on its own.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{HubError, Shared};
use crate::auth::TokenStore;
use crate::enroll::RevocationList;
use crate::state::kube::Snapshot;
use crate::state::{Backend, KubeState, SecretRef};

/// The shared state of a hub replica.
#[derive(Debug)]
pub(crate) struct SharedState {
    /// Where it lives; also what enrollment and revocations write through.
    pub(crate) backend: Backend,
    /// The Secret, for the follower.
    kube: KubeState,
    /// The revocation list in force (the token store is the hub's `tokens`).
    revoked: RwLock<Arc<RevocationList>>,
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
                backend: Backend::Kubernetes(kube.clone()),
                kube,
                revoked: RwLock::new(Arc::new(revoked)),
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

/// Follows the Secret until `stop`, applying every change.
pub(crate) async fn follow(shared: Arc<Shared>, state: Arc<SharedState>, stop: CancellationToken) {
    state
        .kube
        .follow(stop, |snapshot| apply(&shared, &state, &snapshot))
        .await;
}

/// Records what `rna token create --join --state kubernetes://…` needs from the hub in the
/// Secret: the CA certificate join tokens pin, and the address agents dial. Written only when
/// it differs, so replicas starting together write it once.
pub(crate) async fn publish_hub(
    state: &SharedState,
    ca_pem: Option<String>,
    address: &crate::enroll::HubAddress,
) -> Result<(), crate::state::StateError> {
    let address = crate::enroll::to_state_text(address)
        .map_err(|e| crate::state::StateError::File(e.to_string()))?;
    state
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
            Ok::<_, crate::state::StateError>(())
        })
        .await
        .map(|_| ())
}
