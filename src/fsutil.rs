//! Bounded reads of the files rna is given (token files, the token store, certificates, keys,
//! configuration files, Kubernetes manifests), and the error chain text printed for users.
//!
//! Every path comes from an operator, so it may name `/dev/zero`, a FIFO nobody writes to, or
//! a file far larger than anything rna expects. [`read_bytes`] refuses what is not a regular
//! file before reading a byte, and stops at a stated size, so no such path can hang or exhaust
//! a process. It lives below every other module so hub, agent and CLI all use it.
//!
//! Files rna writes for others to read (the token store, keys and certificates) are replaced
//! whole by [`replace_file`], so a reader never sees half of one.

use std::error::Error;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest token (secret) file read: a token is under 100 bytes.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;
/// Largest token store read: about 60,000 tokens.
pub const MAX_TOKEN_STORE: u64 = 16 * 1024 * 1024;
/// Largest PEM file (CA, certificate chain, key) read.
pub const MAX_PEM_FILE: u64 = 1024 * 1024;
/// Largest configuration file read.
pub const MAX_CONFIG_FILE: u64 = 1024 * 1024;
/// Largest Kubernetes manifest read by `rna kube apply`: the hub's largest apply body.
pub const MAX_MANIFEST: u64 = 4 * 1024 * 1024;

/// What is wrong with a file rna was asked to read.
#[derive(Debug)]
pub enum FileProblem {
    /// Opening or reading failed.
    Io(io::Error),
    /// The path names something that is not a regular file (a FIFO, a device, a folder).
    NotRegular(&'static str),
    /// The file holds more than the limit.
    TooLarge(u64),
    /// The file is not UTF-8 text.
    NotText,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileProblem::Io(e) => write!(f, "{e}"),
            FileProblem::NotRegular(kind) => {
                write!(f, "is {kind}, not a regular file; give the path of a file")
            }
            FileProblem::TooLarge(limit) => {
                write!(
                    f,
                    "is larger than {limit} bytes, the most rna reads from it"
                )
            }
            FileProblem::NotText => write!(f, "is not UTF-8 text"),
        }
    }
}

impl From<FileProblem> for io::Error {
    /// For errors that already name the file: keeps the kind of an I/O error (`NotFound`).
    fn from(p: FileProblem) -> io::Error {
        match p {
            FileProblem::Io(e) => e,
            FileProblem::NotText => io::Error::new(io::ErrorKind::InvalidData, p.to_string()),
            other => io::Error::other(other.to_string()),
        }
    }
}

/// A file that could not be read, and why; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// Why (not a `source`: the message already carries it).
    pub problem: FileProblem,
}

/// What kind of thing a non-regular file is, for the error message.
fn kind_of(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a folder"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Creates `dir` (and its parents) with mode 0700 for the last part, for folders that hold
/// keys and tokens; an existing folder keeps its mode (an operator may have chosen it).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Reads a whole regular file of at most `limit` bytes. A FIFO, device, socket or folder is
/// refused without blocking: the file is opened non-blocking (opening a FIFO for reading
/// would otherwise wait for a writer) and checked on the open descriptor, so swapping the
/// path between the check and the read changes nothing.
pub fn read_bytes(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let fail = |problem| FileError {
        path: path.to_path_buf(),
        problem,
    };
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| fail(FileProblem::Io(e)))?;
    let meta = file.metadata().map_err(|e| fail(FileProblem::Io(e)))?;
    if !meta.is_file() {
        return Err(fail(FileProblem::NotRegular(kind_of(meta.file_type()))));
    }
    if meta.len() > limit {
        return Err(fail(FileProblem::TooLarge(limit)));
    }
    // The file may grow after the check: read one byte past the limit to notice.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| fail(FileProblem::Io(e)))?;
    if bytes.len() as u64 > limit {
        return Err(fail(FileProblem::TooLarge(limit)));
    }
    Ok(bytes)
}

/// Like [`read_bytes`], for UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> Result<String, FileError> {
    let bytes = read_bytes(path, limit)?;
    String::from_utf8(bytes).map_err(|_| FileError {
        path: path.to_path_buf(),
        problem: FileProblem::NotText,
    })
}

/// Reads a stream (standard input) to its end, refusing more than `limit` bytes.
pub fn read_stream_text(input: impl Read, what: &str, limit: u64) -> Result<String, String> {
    let mut bytes = Vec::new();
    input
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{what}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "{what}: larger than {limit} bytes, the most rna reads from it"
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("{what}: not UTF-8 text"))
}

/// The permissions of a file [`replace_file`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMode {
    /// Exactly this mode (the umask does not narrow it), owned by the writer.
    Exactly(u32),
    /// The mode, owner and group of the file being replaced (an operator may have given
    /// another group read access); this mode when there is none yet.
    KeepOr(u32),
}

/// Creates `path` exclusively (an existing name, a link included, is `AlreadyExists`) with
/// exactly `mode`: a link at that name is never followed, and the umask does not narrow the
/// mode (a certificate stays readable at 0644).
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(file)
}

/// The folder a file path is in: its parent, or `.` for a bare file name.
pub fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Replaces the file at `path` with `bytes`: a new file is written beside it (same folder,
/// created exclusively, with `mode`), fsynced, renamed over `path`, and the folder fsynced so
/// the rename lasts. Readers see the old or the new file, never half of one; a link at `path`
/// is replaced itself, never written through. On error the new file is removed and the error
/// names the file that failed (the new file, `path` or the folder).
pub fn replace_file(path: &Path, bytes: &[u8], mode: FileMode) -> Result<(), FileError> {
    let fail = |path: &Path, e: io::Error| FileError {
        path: path.to_path_buf(),
        problem: FileProblem::Io(e),
    };
    let Some(name) = path.file_name() else {
        let e = io::Error::new(io::ErrorKind::InvalidInput, "not a file path");
        return Err(fail(path, e));
    };
    let dir = folder_of(path);
    // Process id and a counter: two writers, in this process or another, never share a name.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let temp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let existing = match mode {
        FileMode::KeepOr(_) => std::fs::metadata(path).ok(),
        FileMode::Exactly(_) => None,
    };
    let mode = match (mode, &existing) {
        (FileMode::KeepOr(_), Some(meta)) => meta.mode() & 0o7777,
        (FileMode::KeepOr(mode) | FileMode::Exactly(mode), _) => mode,
    };
    let mut file = create_new(&temp, mode).map_err(|e| fail(&temp, e))?;
    let written = (|| {
        if let Some(meta) = &existing {
            // Changing the owner needs privileges; keeping ours is the safe fallback.
            let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
            // A new owner may have cleared set-id bits; set the mode again.
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        file.write_all(bytes)?;
        file.sync_all()
    })()
    .map_err(|e| fail(&temp, e))
    .and_then(|()| std::fs::rename(&temp, path).map_err(|e| fail(path, e)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail(dir, e))
}

/// An error and its causes, `: `-separated, each cause left out when the text so far already
/// says it: many errors print their cause in their own message and also return it as their
/// `source`, and a reader should see each fact once.
pub fn error_chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !more.is_empty() && !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_bytes(&path, 5).unwrap(), b"12345");
        let err = read_bytes(&path, 4).unwrap_err();
        assert!(matches!(err.problem, FileProblem::TooLarge(4)), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        let missing = read_bytes(&dir.path().join("none"), 5).unwrap_err();
        assert!(
            matches!(&missing.problem, FileProblem::Io(e) if e.kind() == io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn devices_fifos_and_folders_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for (path, kind) in [
            (Path::new("/dev/zero"), "character device"),
            (fifo.as_path(), "FIFO"),
            (dir.path(), "folder"),
        ] {
            let err = read_text(path, MAX_SECRET_FILE).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(kind), "{text}");
            assert!(text.starts_with(&path.display().to_string()), "{text}");
        }
    }

    #[test]
    fn a_stream_over_the_limit_is_refused() {
        assert_eq!(
            read_stream_text(&b"abc"[..], "standard input", 3).unwrap(),
            "abc"
        );
        let err =
            read_stream_text(std::io::repeat(0).take(10_000), "standard input", 100).unwrap_err();
        assert!(err.contains("larger than 100 bytes"), "{err}");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("binding UDP 127.0.0.1:1: {source}")]
        struct Bind {
            source: io::Error,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("QUIC listener: {0}")]
        struct Outer(#[from] Bind);
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read or write x")]
        struct Quiet {
            source: io::Error,
        }
        let busy = || io::Error::from(io::ErrorKind::AddrInUse);
        let e = Outer(Bind { source: busy() });
        let text = error_chain(&e);
        assert_eq!(text.matches(&busy().to_string()).count(), 1, "{text}");
        assert!(text.starts_with("QUIC listener: binding UDP"), "{text}");
        let e = Quiet { source: busy() };
        assert_eq!(
            error_chain(&e),
            format!("cannot read or write x: {}", busy())
        );
    }

    #[test]
    fn replace_file_swaps_the_whole_file_with_the_asked_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        replace_file(&path, b"old", FileMode::KeepOr(0o600)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&path), 0o600, "a new file gets the mode asked for");
        // A reader holding the old file keeps reading the old bytes: the name moved to a new
        // file, nothing was written into the old one.
        let mut reader = File::open(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        replace_file(&path, b"new", FileMode::KeepOr(0o600)).unwrap();
        let mut old = String::new();
        reader.read_to_string(&mut old).unwrap();
        assert_eq!(old, "old");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(mode(&path), 0o640, "KeepOr keeps the replaced file's mode");
        replace_file(&path, b"key", FileMode::Exactly(0o600)).unwrap();
        assert_eq!(mode(&path), 0o600, "Exactly sets the mode asked for");
        // A link at the name is replaced, never written through.
        let target = dir.path().join("target");
        std::fs::write(&target, b"untouched").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        replace_file(&link, b"file", FileMode::Exactly(0o644)).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(mode(&link), 0o644);
        let names = |d: &Path| {
            let mut n: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(dir.path()), ["link", "store", "target"]);
    }

    #[test]
    fn replace_file_leaves_no_temporary_file_on_error() {
        let dir = tempfile::tempdir().unwrap();
        // A folder that is not empty cannot be renamed over: the rename fails.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        let err = replace_file(&path, b"bytes", FileMode::Exactly(0o600)).unwrap_err();
        assert_eq!(err.path, path, "{err}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["taken"], "the new file was removed");
        let err = replace_file(Path::new("/"), b"", FileMode::Exactly(0o600)).unwrap_err();
        assert!(err.to_string().contains("not a file path"), "{err}");
    }
}
