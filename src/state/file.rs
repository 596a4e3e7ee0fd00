//! The file backend: each document is the file of the hub's state folder it is named after
//! (or the path given for it, like `--tokens`), read and written exactly as before there were
//! backends.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::{Documents, StateError, Versioned, Written, TOKENS};
use crate::fsutil::{FileMode, FileProblem};

/// The largest state file read (the token store's limit, which is the largest).
const MAX_STATE_FILE: u64 = crate::fsutil::MAX_TOKEN_STORE;

/// Documents kept as files, one path per document name.
#[derive(Debug, Clone, Default)]
pub struct FileState {
    paths: BTreeMap<String, PathBuf>,
}

impl FileState {
    /// No files yet; add them with [`with`](Self::with).
    pub fn new() -> FileState {
        FileState::default()
    }

    /// Keeps document `name` in the file `path`.
    pub fn with(mut self, name: &str, path: PathBuf) -> FileState {
        self.paths.insert(name.to_owned(), path);
        self
    }

    /// The file of document `name`, if one was given.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.paths.get(name).cloned()
    }

    /// The version of what is on disk: a digest over every document, so a write can tell
    /// whether another process saved a file since it was read.
    fn version(docs: &Documents) -> String {
        let mut hash = Sha256::new();
        for (name, text) in docs.iter() {
            hash.update((name.len() as u64).to_be_bytes());
            hash.update(name);
            hash.update((text.len() as u64).to_be_bytes());
            hash.update(text);
        }
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn read_now(&self) -> Result<Documents, StateError> {
        let mut docs = Documents::default();
        for (name, path) in &self.paths {
            match crate::fsutil::read_text(path, MAX_STATE_FILE) {
                Ok(text) => docs.set(name, text),
                Err(e) if matches!(&e.problem, FileProblem::Io(io) if io.kind() == io::ErrorKind::NotFound) =>
                    {}
                Err(e) => return Err(StateError::File(e.to_string())),
            }
        }
        Ok(docs)
    }
}

impl Versioned for FileState {
    async fn read(&self) -> Result<(Documents, Option<String>), StateError> {
        let docs = self.read_now()?;
        let version = Self::version(&docs);
        Ok((docs, Some(version)))
    }

    /// Writes the documents that changed, each atomically (a reader sees the old or the new
    /// file). The version is checked just before: a save by another process in between is a
    /// conflict. Files are not locked, so two writers in the same instant can still race, as
    /// they always could with files; the Kubernetes backend has no such window.
    async fn write(&self, docs: &Documents, version: Option<&str>) -> Result<Written, StateError> {
        let current = self.read_now()?;
        if version != Some(Self::version(&current).as_str()) {
            return Ok(Written::Conflict);
        }
        for (name, text) in docs.iter() {
            if current.get(name) == Some(text) {
                continue;
            }
            let path = self
                .paths
                .get(name)
                .ok_or_else(|| StateError::NoFile(name.to_owned()))?;
            // The token store keeps the mode an operator gave it; the JSON files are private.
            let mode = if name == TOKENS {
                FileMode::KeepOr(0o600)
            } else {
                FileMode::Exactly(0o600)
            };
            crate::fsutil::replace_file(path, text.as_bytes(), mode)
                .map_err(|e| StateError::File(e.to_string()))?;
        }
        Ok(Written::Done(Some(Self::version(docs))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{update, REVOKED};
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn documents_are_the_files_and_a_save_in_between_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let files = FileState::new()
            .with(TOKENS, dir.path().join("tokens.toml"))
            .with(REVOKED, dir.path().join("revoked.json"));
        let (docs, version) = files.read().await.unwrap();
        assert_eq!(docs, Documents::default());
        std::fs::write(dir.path().join("tokens.toml"), "# theirs\n").unwrap();
        let mut mine = docs.clone();
        mine.set(REVOKED, "[]\n".into());
        assert_eq!(
            files.write(&mine, version.as_deref()).await.unwrap(),
            Written::Conflict
        );
        // Through `update`, the change lands on top of the other save.
        update(&files, |docs: &mut Documents| {
            docs.set(REVOKED, "[]\n".into());
            Ok::<_, StateError>(())
        })
        .await
        .unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("tokens.toml"), "# theirs\n");
        assert_eq!(read("revoked.json"), "[]\n");
        let mode = std::fs::metadata(dir.path().join("revoked.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = update(&FileState::new(), |docs: &mut Documents| {
            docs.set(REVOKED, "[]\n".into());
            Ok::<_, StateError>(())
        })
        .await
        .unwrap_err();
        assert!(matches!(err, StateError::NoFile(_)), "{err}");
    }
}
