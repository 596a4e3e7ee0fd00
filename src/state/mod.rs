//! Where the hub's shared state lives: the token store, join tokens, the issued-certificate
//! log and the revocation list, as files (the default) or as one Kubernetes Secret that hub
//! replicas and `rna token` / `rna certs` share.
//!
//! Both backends hold the same documents, named as the files of a hub's state folder
//! (`tokens.toml`, `join-tokens.json`, …) and in the same formats; this layer moves them as
//! text and never parses them, so it sits below hub and CLI and knows nothing of tokens or
//! certificates. Every change is a read-modify-write ([`update`]): the change is computed on
//! what was read and written only if nobody wrote in between, else read again and applied
//! again, so two writers at once never lose each other's change.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

pub mod file;
pub mod kube;

pub use file::FileState;
pub use kube::KubeState;

/// The token store document (TOML, as `tokens.toml` of a state folder).
pub const TOKENS: &str = "tokens.toml";
/// The join tokens document (JSON).
pub const JOIN_TOKENS: &str = "join-tokens.json";
/// The issued-certificate log (JSON).
pub const ISSUED: &str = "issued.json";
/// The revocation list (JSON).
pub const REVOKED: &str = "revoked.json";
/// The hub CA certificate (PEM, public): `rna token create --join` pins it in join tokens.
pub const CA: &str = "ca.pem";
/// The hub's names and port (JSON), printed in join lines.
pub const ADDRESS: &str = "hub-address.json";

/// How many times a change is read and applied again after a conflicting write before the
/// writer gives up. Each conflict means another writer succeeded, so this is only reached
/// under a storm of writers.
pub const MAX_ATTEMPTS: usize = 32;

/// Where the state is kept: `file` or `kubernetes://NAMESPACE/NAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StateLocation {
    /// The files of the state folder (or the paths given explicitly), as always.
    #[default]
    File,
    /// One Secret, shared by every hub replica and the CLI.
    Kubernetes(SecretRef),
}

/// A Secret by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl StateLocation {
    /// Whether the state is shared through Kubernetes.
    pub fn is_kubernetes(&self) -> bool {
        matches!(self, StateLocation::Kubernetes(_))
    }
}

impl FromStr for StateLocation {
    type Err = StateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| StateError::Location(format!("{s:?}: {why}"));
        if s == "file" {
            return Ok(StateLocation::File);
        }
        let Some(rest) = s.strip_prefix("kubernetes://") else {
            return Err(bad("expected file or kubernetes://NAMESPACE/NAME"));
        };
        let Some((namespace, name)) = rest.split_once('/') else {
            return Err(bad("expected kubernetes://NAMESPACE/NAME"));
        };
        // RFC 1123 label for the namespace, DNS subdomain for the name, as the API server
        // checks them: a typo is refused here, not by the first request.
        if !is_dns_label(namespace, 63) {
            return Err(bad(
                "the namespace must be a DNS label (a-z, 0-9, -; at most 63)",
            ));
        }
        if !name.split('.').all(|part| is_dns_label(part, 63)) || name.len() > 253 {
            return Err(bad(
                "the Secret name must be a DNS subdomain (a-z, 0-9, -, .; at most 253)",
            ));
        }
        Ok(StateLocation::Kubernetes(SecretRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }))
    }
}

impl fmt::Display for StateLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateLocation::File => f.write_str("file"),
            StateLocation::Kubernetes(s) => write!(f, "kubernetes://{}/{}", s.namespace, s.name),
        }
    }
}

fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The documents of the state by name ([`TOKENS`], [`JOIN_TOKENS`], …), as text. A document
/// never written is absent, which each reader takes as empty (a hub's first start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Documents {
    docs: BTreeMap<String, String>,
}

impl Documents {
    /// The text of a document, if it exists.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.docs.get(name).map(String::as_str)
    }

    /// Replaces (or adds) a document.
    pub fn set(&mut self, name: &str, text: String) {
        self.docs.insert(name.to_owned(), text);
    }

    /// Every document, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.docs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The total size of the documents in bytes.
    pub fn size(&self) -> usize {
        self.docs.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// `--state` is not `file` or `kubernetes://NAMESPACE/NAME`.
    #[error("state location {0}")]
    Location(String),
    /// No Kubernetes client could be made (no kubeconfig, not in a cluster).
    #[error("Kubernetes client for the state: {0}")]
    Client(String),
    /// The API server refused or failed a request.
    #[error("{what} Secret {object}: {message}")]
    Api {
        /// What was being done (reading, writing, watching).
        what: &'static str,
        /// `NAMESPACE/NAME`.
        object: String,
        /// The server's or the client's message.
        message: String,
    },
    /// Writes kept conflicting with other writers.
    #[error("the state changed under every one of {0} attempts to write it; try again")]
    Conflict(usize),
    /// The documents no longer fit in one Secret.
    #[error("the state would be {size} bytes; a Kubernetes Secret holds at most {limit}")]
    TooLarge {
        /// The size it would have.
        size: usize,
        /// What one object may hold.
        limit: usize,
    },
    /// A document is not UTF-8 text.
    #[error("state document {0} is not UTF-8 text")]
    NotText(String),
    /// A state file could not be read or written.
    #[error("{0}")]
    File(String),
    /// No file was given for a document that had to be written.
    #[error("no file is configured for the state document {0}")]
    NoFile(String),
}

/// What [`Versioned::write`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Written {
    /// Written; the new version.
    Done(Option<String>),
    /// Someone else wrote since the version read: read again.
    Conflict,
}

/// A store of [`Documents`] with a version that changes on every write, written only if the
/// version is still the one read (optimistic concurrency).
pub(crate) trait Versioned {
    /// The documents and their version (`None`: nothing stored yet).
    async fn read(&self) -> Result<(Documents, Option<String>), StateError>;
    /// Writes `docs` if the stored version is still `version`.
    async fn write(&self, docs: &Documents, version: Option<&str>) -> Result<Written, StateError>;
}

/// Reads, applies `change` and writes, again from a fresh read after each conflict, at most
/// [`MAX_ATTEMPTS`] times. `change` may run several times, each time on the latest documents,
/// so it must compute its result from what it is given. A change that leaves the documents
/// as they were writes nothing. Returns the change's result, the documents written and the
/// version they have now (the one written, or the one read when nothing changed).
pub(crate) async fn update<S: Versioned, T, E: From<StateError>>(
    store: &S,
    mut change: impl FnMut(&mut Documents) -> Result<T, E>,
) -> Result<(T, Documents, Option<String>), E> {
    for _ in 0..MAX_ATTEMPTS {
        let (before, version) = store.read().await?;
        let mut docs = before.clone();
        let result = change(&mut docs)?;
        if docs == before {
            return Ok((result, docs, version));
        }
        match store.write(&docs, version.as_deref()).await? {
            Written::Done(written) => return Ok((result, docs, written)),
            Written::Conflict => {
                tracing::debug!("state write conflicted with another writer; reading again");
            }
        }
    }
    Err(StateError::Conflict(MAX_ATTEMPTS).into())
}

/// The state backend in use: files or a Kubernetes Secret.
#[derive(Debug)]
pub enum Backend {
    /// Files (the default).
    File(FileState),
    /// A Secret shared by hub replicas (boxed: a client is large, and a backend is made
    /// once).
    Kubernetes(Box<KubeState>),
}

impl Backend {
    /// The backend of `location`: for [`StateLocation::File`], `files`; for Kubernetes, a
    /// client made as `kubectl` would (`KUBECONFIG` or `~/.kube/config`, else the pod's
    /// ServiceAccount).
    pub async fn open(location: &StateLocation, files: FileState) -> Result<Backend, StateError> {
        Ok(match location {
            StateLocation::File => Backend::File(files),
            StateLocation::Kubernetes(secret) => {
                Backend::Kubernetes(Box::new(KubeState::connect(secret.clone()).await?))
            }
        })
    }

    /// The documents as stored now.
    pub async fn read(&self) -> Result<Documents, StateError> {
        Ok(match self {
            Backend::File(f) => Versioned::read(f).await?.0,
            Backend::Kubernetes(k) => Versioned::read(k.as_ref()).await?.0,
        })
    }

    /// Applies `change` with [`update`]'s conflict rule; the result and the documents
    /// written.
    pub async fn update<T, E: From<StateError>>(
        &self,
        change: impl FnMut(&mut Documents) -> Result<T, E>,
    ) -> Result<(T, Documents), E> {
        let (result, docs, _) = self.update_versioned(change).await?;
        Ok((result, docs))
    }

    /// [`update`](Self::update), also returning the version the documents have now, so a
    /// follower can tell it from versions it has seen.
    pub async fn update_versioned<T, E: From<StateError>>(
        &self,
        change: impl FnMut(&mut Documents) -> Result<T, E>,
    ) -> Result<(T, Documents, Option<String>), E> {
        match self {
            Backend::File(f) => update(f, change).await,
            Backend::Kubernetes(k) => update(k.as_ref(), change).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn locations_parse_and_print() {
        assert_eq!(
            "file".parse::<StateLocation>().unwrap(),
            StateLocation::File
        );
        let k: StateLocation = "kubernetes://rna/rna-hub-state".parse().unwrap();
        assert_eq!(k.to_string(), "kubernetes://rna/rna-hub-state");
        assert!(k.is_kubernetes());
        for bad in [
            "",
            "files",
            "kubernetes://",
            "kubernetes://ns",
            "kubernetes://NS/name",
            "kubernetes://ns/Name",
            "kubernetes://ns/a/b",
            "kubernetes://-ns/name",
            "s3://bucket/key",
        ] {
            let err = bad.parse::<StateLocation>().unwrap_err().to_string();
            assert!(err.starts_with("state location"), "{bad}: {err}");
        }
    }

    /// A store in memory whose version is a counter; `interfere` writes of another writer
    /// land between this writer's read and write, as a second hub's would.
    #[derive(Default)]
    struct Memory {
        state: Mutex<(Documents, u64)>,
        interfere: Mutex<Vec<(String, String)>>,
        writes: Mutex<usize>,
    }

    impl Versioned for Memory {
        async fn read(&self) -> Result<(Documents, Option<String>), StateError> {
            let state = self.state.lock().unwrap();
            Ok((state.0.clone(), Some(state.1.to_string())))
        }

        async fn write(
            &self,
            docs: &Documents,
            version: Option<&str>,
        ) -> Result<Written, StateError> {
            let mut state = self.state.lock().unwrap();
            if let Some((name, text)) = self.interfere.lock().unwrap().pop() {
                // The other writer wins the race.
                state.0.set(&name, text);
                state.1 += 1;
            }
            if version != Some(state.1.to_string().as_str()) {
                return Ok(Written::Conflict);
            }
            state.0 = docs.clone();
            state.1 += 1;
            *self.writes.lock().unwrap() += 1;
            Ok(Written::Done(Some(state.1.to_string())))
        }
    }

    #[tokio::test]
    async fn a_conflicting_write_is_read_again_and_keeps_both_changes() {
        let store = Memory::default();
        store.interfere.lock().unwrap().extend([
            ("b".to_string(), "theirs".to_string()),
            ("c".into(), "3".into()),
        ]);
        let mut runs = 0;
        let (result, written, _) = update(&store, |docs: &mut Documents| {
            runs += 1;
            docs.set("a", "mine".into());
            Ok::<_, StateError>(runs)
        })
        .await
        .unwrap();
        // Two conflicts, then a write on top of both of the other writer's changes.
        assert_eq!(result, 3);
        assert_eq!(written.get("a"), Some("mine"));
        assert_eq!(written.get("b"), Some("theirs"));
        assert_eq!(written.get("c"), Some("3"));
        assert_eq!(store.state.lock().unwrap().0, written);
        assert_eq!(*store.writes.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn endless_conflicts_give_up_and_an_unchanged_state_is_not_written() {
        let store = Memory::default();
        store
            .interfere
            .lock()
            .unwrap()
            .extend((0..MAX_ATTEMPTS).map(|i| (format!("other{i}"), "x".to_string())));
        let err = update(&store, |docs: &mut Documents| {
            docs.set("a", "mine".into());
            Ok::<_, StateError>(())
        })
        .await
        .unwrap_err();
        assert!(matches!(err, StateError::Conflict(MAX_ATTEMPTS)), "{err}");
        assert_eq!(*store.writes.lock().unwrap(), 0);

        let store = Memory::default();
        update(&store, |_: &mut Documents| Ok::<_, StateError>(()))
            .await
            .unwrap();
        assert_eq!(store.state.lock().unwrap().1, 0, "nothing was written");
    }

    #[tokio::test]
    async fn a_refused_change_writes_nothing() {
        let store = Memory::default();
        let err = update(&store, |docs: &mut Documents| {
            docs.set("a", "half".into());
            Err::<(), _>(StateError::NoFile("a".into()))
        })
        .await
        .unwrap_err();
        assert!(matches!(err, StateError::NoFile(_)));
        assert_eq!(store.state.lock().unwrap().0, Documents::default());
    }
}
