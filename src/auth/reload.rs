//! Following the token store file as it changes: the hub's [`ReloadingStore`] swaps in a
//! new [`TokenStore`] when the file is saved, and keeps the old one when the new file is
//! broken.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use super::store::{StoreError, TokenStore};

/// What identifies one version of the store file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    /// Modification time.
    mtime: Option<SystemTime>,
    /// Size in bytes.
    len: u64,
    /// Device and inode: an atomic save (rename) gives the path a new inode.
    dev: u64,
    ino: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Result<Self, StoreError> {
        let meta = fs::metadata(path).map_err(|source| StoreError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(FileStamp {
            mtime: meta.modified().ok(),
            len: meta.len(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// The loaded store and the stamp of the file version last tried.
#[derive(Debug)]
struct Loaded {
    store: Arc<TokenStore>,
    stamp: Option<FileStamp>,
}

/// A token store that follows its file: the hub holds one and calls
/// [`reload_if_changed`](Self::reload_if_changed) periodically and [`reload`](Self::reload)
/// on SIGHUP. A file that fails to load never replaces the store in use.
#[derive(Debug)]
pub struct ReloadingStore {
    /// The store file.
    path: PathBuf,
    /// Readers take a cheap `Arc` snapshot; reloads swap it whole.
    state: RwLock<Loaded>,
}

impl ReloadingStore {
    /// Loads the store now; a missing or invalid file is an error.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let stamp = FileStamp::of(path)?;
        let store = TokenStore::load(path)?;
        Ok(ReloadingStore {
            path: path.to_owned(),
            state: RwLock::new(Loaded {
                store: Arc::new(store),
                stamp: Some(stamp),
            }),
        })
    }

    /// A store that follows no file: its tokens come from elsewhere (a Kubernetes Secret)
    /// through [`replace`](Self::replace). [`reload`](Self::reload) has no file to read and
    /// fails; [`watch`](Self::watch) never fires.
    pub fn detached(store: TokenStore) -> Self {
        ReloadingStore {
            path: PathBuf::new(),
            state: RwLock::new(Loaded {
                store: Arc::new(store),
                stamp: None,
            }),
        }
    }

    /// Puts `store` in use; `true` when its tokens differ from the ones in use.
    pub fn replace(&self, store: TokenStore) -> bool {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let changed = state.store.to_toml() != store.to_toml();
        state.store = Arc::new(store);
        changed
    }

    /// A snapshot of the store in use.
    pub fn current(&self) -> Arc<TokenStore> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&state.store)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file now and returns the token count; on error the old store stays.
    pub fn reload(&self) -> Result<usize, StoreError> {
        // Stamp before reading: if the file changes while it is read, the stamp is already
        // stale and the next `reload_if_changed` reads it again.
        let stamp = FileStamp::of(&self.path).ok();
        let loaded = TokenStore::load(&self.path);
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        // Remember a broken version too, so a periodic check reports it once rather than on
        // every tick; fixing the file changes the stamp.
        state.stamp = stamp;
        let store = loaded?;
        let count = store.len();
        state.store = Arc::new(store);
        Ok(count)
    }

    /// Reloads when the file's (mtime, length, inode) differs from the last load attempt;
    /// `Ok(true)` if it reloaded. A broken file is reported once per change, and the old
    /// store stays in use.
    pub fn reload_if_changed(&self) -> Result<bool, StoreError> {
        let stamp = FileStamp::of(&self.path)?;
        let last = self
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .stamp;
        if last == Some(stamp) {
            return Ok(false);
        }
        self.reload().map(|_| true)
    }
}

impl ReloadingStore {
    /// Starts watching the store's folder for changes (Linux: inotify), so the hub reloads a
    /// store the moment it is saved instead of at the next poll. The folder is watched, not
    /// the file, because saves replace the file by rename (and Kubernetes Secret mounts swap
    /// a link). Without inotify the watch never fires and the periodic check alone remains.
    /// Must be called inside a Tokio runtime.
    pub fn watch(&self) -> StoreWatch {
        if self.path.as_os_str().is_empty() {
            return StoreWatch { fd: None };
        }
        let dir = crate::fsutil::folder_of(&self.path);
        match StoreWatch::start(dir) {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!(dir = %dir.display(),
                    "cannot watch the token store's folder ({e}); checking it periodically only");
                StoreWatch { fd: None }
            }
        }
    }
}

/// Change notifications for the token store's folder; see [`ReloadingStore::watch`].
#[derive(Debug)]
pub struct StoreWatch {
    /// The inotify descriptor, non-blocking and registered with the runtime; `None` when
    /// watching is not possible.
    #[cfg(target_os = "linux")]
    fd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    #[cfg(not(target_os = "linux"))]
    fd: Option<()>,
}

impl StoreWatch {
    #[cfg(target_os = "linux")]
    fn start(dir: &Path) -> io::Result<StoreWatch> {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
        // A finished write or a rename into the folder; not every MODIFY, which would read
        // a file half written by an editor.
        inotify::add_watch(&fd, dir, WatchFlags::CLOSE_WRITE | WatchFlags::MOVED_TO)?;
        // `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` may close or change its
        // descriptor while registered; an `OwnedFd` cannot (it owns one open descriptor until
        // dropped, which happens only with the `AsyncFd`), so the contract holds here.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::new(fd)?;
        Ok(StoreWatch { fd: Some(fd) })
    }

    #[cfg(not(target_os = "linux"))]
    fn start(_dir: &Path) -> io::Result<StoreWatch> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "file-change notification is only implemented for Linux",
        ))
    }

    /// Waits until something in the folder was written or renamed into it (the caller then
    /// compares the store file's stamp, so unrelated files cost one `stat`). Never returns
    /// when watching is off or failed. Cancel-safe: an event not yet read stays queued.
    pub async fn changed(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(fd) = &self.fd {
            match Self::next_events(fd).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!("token store watch failed ({e}); checking it periodically only");
                    self.fd = None;
                }
            }
        }
        std::future::pending::<()>().await
    }

    /// Reads every queued event; returns once at least one was read.
    #[cfg(target_os = "linux")]
    async fn next_events(fd: &tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>) -> io::Result<()> {
        use std::mem::MaybeUninit;
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        loop {
            let mut guard = fd.readable().await?;
            let read = guard.try_io(|fd| {
                let mut reader = rustix::fs::inotify::Reader::new(fd.get_ref(), &mut buf);
                let mut events = 0usize;
                loop {
                    match reader.next() {
                        Ok(_) => events += 1,
                        Err(rustix::io::Errno::AGAIN) if events > 0 => return Ok(()),
                        Err(e) => return Err(io::Error::from(e)),
                    }
                }
            });
            match read {
                Ok(result) => return result,
                // Nothing to read after all: readiness is cleared, wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::{AuthError, Scope, Secret, TokenRecord};

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_763_900_000)
    }

    /// `dir/tokens.toml` saved with one token of `scope`: its path, the token and its record.
    fn saved_store(dir: &Path, scope: Scope) -> (PathBuf, Secret, TokenRecord) {
        let path = dir.join("tokens.toml");
        let mut store = TokenStore::default();
        let tenant = "acme/prod".parse().unwrap();
        let (secret, record) = store
            .create(tenant, vec![scope], None, None, now())
            .unwrap();
        store.save(&path).unwrap();
        (path, secret, record)
    }

    #[tokio::test]
    async fn the_watch_fires_when_the_store_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        TokenStore::default().save(&path).unwrap();
        let reloading = ReloadingStore::open(&path).unwrap();
        let mut watch = reloading.watch();
        assert!(watch.fd.is_some(), "inotify is available on Linux");
        saved_store(dir.path(), Scope::Proxy);
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("the save is noticed without polling");
        assert!(reloading.reload_if_changed().unwrap());
        assert_eq!(reloading.current().len(), 1);
    }

    #[test]
    fn reloading_store_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, secret, record) = saved_store(dir.path(), Scope::ConnectAgentHub);

        let reloading = ReloadingStore::open(&path).unwrap();
        assert_eq!(reloading.path(), path);
        assert!(reloading.current().verify(secret.expose(), now()).is_ok());
        assert!(!reloading.reload_if_changed().unwrap());

        // Another process (`rna token revoke`) edits the file.
        let mut other = TokenStore::load(&path).unwrap();
        other.revoke(&record.id).unwrap();
        other.save(&path).unwrap();

        let before = reloading.current();
        assert!(reloading.reload_if_changed().unwrap());
        assert!(!reloading.reload_if_changed().unwrap());
        assert_eq!(
            reloading.current().verify(secret.expose(), now()),
            Err(AuthError::Revoked)
        );
        assert!(!reloading.current().is_live(&record.id, now()));
        // Snapshots taken earlier are unaffected.
        assert!(before.verify(secret.expose(), now()).is_ok());
    }

    #[test]
    fn broken_file_keeps_the_old_store() {
        let dir = tempfile::tempdir().unwrap();
        let (path, secret, _) = saved_store(dir.path(), Scope::Proxy);
        let reloading = ReloadingStore::open(&path).unwrap();

        fs::write(&path, "[[token]]\nid = 1\nbroken").unwrap();
        let err = reloading.reload().unwrap_err();
        assert!(err.to_string().contains("tokens.toml"), "{err}");
        assert_eq!(reloading.current().len(), 1);
        assert!(reloading.current().verify(secret.expose(), now()).is_ok());
        // The broken version is reported once, not on every periodic check.
        assert!(!reloading.reload_if_changed().unwrap());

        // A change after the broken one is picked up.
        fs::write(&path, "# emptied\n").unwrap();
        assert!(reloading.reload_if_changed().unwrap());
        assert!(reloading.current().is_empty());
        assert_eq!(reloading.reload().unwrap(), 0);

        // A vanished file is an error and keeps the store.
        fs::remove_file(&path).unwrap();
        assert!(reloading.reload_if_changed().is_err());
        assert!(reloading.reload().is_err());
        assert!(reloading.current().is_empty());
    }
}
