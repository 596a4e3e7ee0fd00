//! The Kubernetes backend: every document is one key of one Secret, written with the
//! resourceVersion read (an update that the API server refuses with 409 when another writer
//! came first) and followed with a watch by name.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use tokio_util::sync::CancellationToken;

use super::{Documents, SecretRef, StateError, Versioned, Written};

/// What one Secret may hold (the API server refuses larger ones); a little is kept for the
/// object's own fields.
pub const SECRET_LIMIT: usize = 1024 * 1024 - 16 * 1024;
/// The first wait after a failed list or watch; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The longest wait between two attempts to follow the Secret.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long one watch request lasts before it is made again from the last version seen
/// (the API server ends watches itself within 30 minutes; below its 295 s request limit).
const WATCH_SECONDS: u32 = 240;

/// The Secret that holds the state.
#[derive(Clone)]
pub struct KubeState {
    api: Api<Secret>,
    secret: SecretRef,
    /// The labels and annotations of the Secret as last read, with its resourceVersion: a
    /// write of that version keeps them, so what an operator or `kubectl apply` put there
    /// survives the hub's writes.
    seen: Arc<Mutex<Option<(String, ObjectMeta)>>>,
}

impl std::fmt::Debug for KubeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeState")
            .field("secret", &self.object())
            .finish_non_exhaustive()
    }
}

/// One version of the state as the API server holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The documents (none when the Secret does not exist yet).
    pub docs: Documents,
    /// Its resourceVersion.
    pub version: Option<String>,
}

impl KubeState {
    /// A client as `kubectl` makes one (`KUBECONFIG`, `~/.kube/config`, else the pod's
    /// ServiceAccount), for `secret`. Nothing is requested yet.
    pub async fn connect(secret: SecretRef) -> Result<KubeState, StateError> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| StateError::Client(e.to_string()))?;
        Ok(KubeState::with_client(client, secret))
    }

    /// The state in `secret`, through `client`.
    pub fn with_client(client: kube::Client, secret: SecretRef) -> KubeState {
        KubeState {
            api: Api::namespaced(client, &secret.namespace),
            secret,
            seen: Arc::default(),
        }
    }

    /// `NAMESPACE/NAME`.
    pub fn object(&self) -> String {
        format!("{}/{}", self.secret.namespace, self.secret.name)
    }

    fn failed(&self, what: &'static str, e: impl ToString) -> StateError {
        StateError::Api {
            what,
            object: self.object(),
            message: e.to_string(),
        }
    }

    /// The documents of a Secret; data that is not UTF-8 is refused, not guessed at.
    fn documents(secret: &Secret) -> Result<Documents, StateError> {
        let mut docs = Documents::default();
        for (name, ByteString(bytes)) in secret.data.iter().flatten() {
            let text =
                String::from_utf8(bytes.clone()).map_err(|_| StateError::NotText(name.clone()))?;
            docs.set(name, text);
        }
        Ok(docs)
    }

    /// Follows the Secret until `stop`: `apply` gets the documents at once and again after
    /// every change, within the watch's latency (well under a second). A failed list or
    /// watch is logged once per failure and tried again with backoff; a watch whose version
    /// has expired (410 Gone) lists again. A deleted Secret is an empty state: every token
    /// in it stops working, as when the file store is emptied.
    pub async fn follow(&self, stop: CancellationToken, mut apply: impl FnMut(Snapshot)) {
        let mut backoff = BACKOFF_MIN;
        let by_name = format!("metadata.name={}", self.secret.name);
        'list: loop {
            if stop.is_cancelled() {
                return;
            }
            let params = ListParams::default().fields(&by_name);
            let listed = tokio::select! {
                _ = stop.cancelled() => return,
                listed = self.api.list(&params) => listed,
            };
            let mut version = match listed {
                Ok(list) => {
                    let docs = match list.items.first().map(Self::documents).transpose() {
                        Ok(docs) => docs.unwrap_or_default(),
                        Err(e) => {
                            tracing::warn!(secret = %self.object(), "keeping the previous state: {e}");
                            Documents::default()
                        }
                    };
                    let version = list.metadata.resource_version.unwrap_or_default();
                    apply(Snapshot {
                        docs,
                        version: Some(version.clone()),
                    });
                    version
                }
                Err(e) => {
                    tracing::warn!(secret = %self.object(), retry_in = ?backoff,
                        "cannot read the shared state: {e}");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue 'list;
                }
            };
            backoff = BACKOFF_MIN;
            loop {
                let params = WatchParams::default()
                    .fields(&by_name)
                    .timeout(WATCH_SECONDS);
                let events = tokio::select! {
                    _ = stop.cancelled() => return,
                    events = self.api.watch(&params, &version) => events,
                };
                let mut events = match events {
                    Ok(events) => events.boxed(),
                    Err(e) => {
                        tracing::warn!(secret = %self.object(), "watching the shared state failed: {e}");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue 'list;
                    }
                };
                loop {
                    let event = tokio::select! {
                        _ = stop.cancelled() => return,
                        event = events.try_next() => event,
                    };
                    match event {
                        // The watch ran its time: watch again from the last version seen.
                        Ok(None) => break,
                        Ok(Some(WatchEvent::Added(s) | WatchEvent::Modified(s))) => {
                            version = s.metadata.resource_version.clone().unwrap_or(version);
                            match Self::documents(&s) {
                                Ok(docs) => apply(Snapshot {
                                    docs,
                                    version: Some(version.clone()),
                                }),
                                Err(e) => tracing::warn!(secret = %self.object(),
                                    "keeping the previous state: {e}"),
                            }
                        }
                        Ok(Some(WatchEvent::Deleted(s))) => {
                            version = s.metadata.resource_version.clone().unwrap_or(version);
                            tracing::warn!(secret = %self.object(),
                                "the shared state Secret was deleted: no token is valid until it is back");
                            apply(Snapshot {
                                docs: Documents::default(),
                                version: None,
                            });
                        }
                        Ok(Some(WatchEvent::Bookmark(b))) => {
                            version = b.metadata.resource_version;
                        }
                        Ok(Some(WatchEvent::Error(status))) => {
                            if status.code != 410 {
                                tracing::warn!(secret = %self.object(),
                                    "watching the shared state failed: {}", status.message);
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(BACKOFF_MAX);
                            } else {
                                tracing::debug!(secret = %self.object(),
                                    "watch version expired (410 Gone); listing again");
                            }
                            continue 'list;
                        }
                        Err(e) => {
                            tracing::warn!(secret = %self.object(), "the shared state's watch broke: {e}");
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            continue 'list;
                        }
                    }
                }
            }
        }
    }
}

impl Versioned for KubeState {
    async fn read(&self) -> Result<(Documents, Option<String>), StateError> {
        match self.api.get_opt(&self.secret.name).await {
            Ok(Some(secret)) => {
                let version = secret.metadata.resource_version.clone();
                let meta = ObjectMeta {
                    labels: secret.metadata.labels.clone(),
                    annotations: secret.metadata.annotations.clone(),
                    ..ObjectMeta::default()
                };
                *self.seen.lock().unwrap_or_else(PoisonError::into_inner) =
                    version.clone().map(|v| (v, meta));
                Ok((Self::documents(&secret)?, version))
            }
            Ok(None) => Ok((Documents::default(), None)),
            Err(e) => Err(self.failed("reading", e)),
        }
    }

    /// Creates the Secret when `version` is `None`, else replaces it with `version` as its
    /// resourceVersion: the API server answers 409 when another writer came first (or created
    /// it first), which is [`Written::Conflict`].
    async fn write(&self, docs: &Documents, version: Option<&str>) -> Result<Written, StateError> {
        if docs.size() > SECRET_LIMIT {
            return Err(StateError::TooLarge {
                size: docs.size(),
                limit: SECRET_LIMIT,
            });
        }
        let data: BTreeMap<String, ByteString> = docs
            .iter()
            .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
            .collect();
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|(v, _)| Some(v.as_str()) == version)
            .map(|(_, meta)| meta)
            .unwrap_or_default();
        let mut labels = seen.labels.unwrap_or_default();
        for (key, value) in [
            ("app.kubernetes.io/name", "rna"),
            ("app.kubernetes.io/component", "hub-state"),
        ] {
            labels
                .entry(key.to_owned())
                .or_insert_with(|| value.to_owned());
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.secret.name.clone()),
                namespace: Some(self.secret.namespace.clone()),
                resource_version: version.map(str::to_owned),
                labels: Some(labels),
                annotations: seen.annotations,
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Secret::default()
        };
        let params = PostParams {
            field_manager: Some("rna".into()),
            ..PostParams::default()
        };
        let written = match version {
            None => self.api.create(&params, &secret).await,
            Some(_) => self.api.replace(&self.secret.name, &params, &secret).await,
        };
        match written {
            Ok(s) => Ok(Written::Done(s.metadata.resource_version)),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Written::Conflict),
            Err(e) => Err(self.failed("writing", e)),
        }
    }
}

impl KubeState {
    /// The documents and their resourceVersion as stored now.
    pub async fn read(&self) -> Result<Snapshot, StateError> {
        let (docs, version) = Versioned::read(self).await?;
        Ok(Snapshot { docs, version })
    }
}
