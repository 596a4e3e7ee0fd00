//! Agent enrollment and the certificate lifecycle below hub and agent: join tokens, the hub
//! CA pin, certificate signing requests, the enrollment messages, the revocation list, the
//! issued-certificate log and the renewal schedule.
//!
//! A fresh agent holds one line, `rna agent --hub HOST:PORT --join rna_join_<id>.<secret>.<pin>`.
//! It checks the hub's CA against the pin ([`pin`]) before it sends anything secret, makes its
//! private key itself and sends only a CSR ([`csr`], [`wire`]); the hub checks the join token
//! ([`join`]), signs a short-lived client certificate with the tenant bound inside it, and
//! records it ([`issued`]); revocations persist ([`revocation`]); agents renew at two thirds of
//! the lifetime ([`renew`]). docs/protocol.md describes the formats.

use std::io;
use std::path::{Path, PathBuf};

pub mod csr;
pub mod issued;
pub mod join;
pub mod pin;
pub mod renew;
pub mod revocation;
pub mod state;
pub mod wire;

pub use csr::{agent_identity, make_csr, AgentCsr, AgentIdentity, SignedCert, Signer};
pub use issued::{CertState, IssuedLog, IssuedRecord};
pub use join::{Admission, CaPin, JoinBook, JoinLine, JoinRecord, JoinToken, NameRule, NewJoin};
pub use pin::{ca_pin, PinnedHubVerifier};
pub use renew::{renew_at, renew_in, renewal_due};
pub use revocation::{RevocationList, Revoked};
pub use state::{HubAddress, HubState};
pub use wire::{
    CertBytes, EnrollReply, EnrollRequest, Issued, RefusalCode, RenewRequest, ENROLL_ALPN,
    RENEW_ALPN,
};

/// Why an enrollment step failed. A refusal of what a peer or a user presented carries the
/// [`RefusalCode`] the hub sends back, so each refusal maps once, at the edge, to its wire
/// value.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// A join token, CSR or certificate was refused; the message says which rule it broke and
    /// never contains a secret.
    #[error("{message}")]
    Refused {
        /// The code the hub answers with.
        code: RefusalCode,
        /// One readable line.
        message: String,
    },
    /// A join token, certificate or key could not be made (bad parameters, the random number
    /// generator or rcgen failed).
    #[error("cannot create {what}: {message}")]
    CannotCreate {
        /// What was being made.
        what: &'static str,
        /// Why not.
        message: String,
    },
    /// No issued certificate matches what was asked for (a revocation target).
    #[error("{0}")]
    NotFound(String),
    /// An enrollment message could not be encoded or decoded.
    #[error("enrollment message: {0}")]
    Codec(#[from] crate::proto::codec::CodecError),
    /// A state file (revocation list, issued-certificate log) could not be read or written.
    #[error("{}: {message}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong, with the parser's line when it has one.
        message: String,
    },
}

impl EnrollError {
    /// A refusal with `code` and a message.
    pub(crate) fn refused(code: RefusalCode, message: impl Into<String>) -> Self {
        EnrollError::Refused {
            code,
            message: message.into(),
        }
    }

    /// The refusal code, if this error refuses what a peer presented.
    pub fn code(&self) -> Option<RefusalCode> {
        match self {
            EnrollError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn state(path: &Path, message: impl ToString) -> Self {
        EnrollError::State {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// Reads a JSON state file of at most `limit` bytes; a missing file is `Ok(None)`.
fn read_state<T: serde::de::DeserializeOwned>(
    path: &Path,
    limit: u64,
) -> Result<Option<T>, EnrollError> {
    match crate::fsutil::read_text(path, limit) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EnrollError::state(path, e)),
        Err(e) if matches!(&e.problem, crate::fsutil::FileProblem::Io(io) if io.kind() == io::ErrorKind::NotFound) => {
            Ok(None)
        }
        Err(e) => Err(EnrollError::state(path, e.problem)),
    }
}

/// A state document as its file holds it (pretty JSON and a newline), for a state kept
/// elsewhere than in files (a Kubernetes Secret) in the same format.
pub fn to_state_text<T: serde::Serialize>(value: &T) -> Result<String, EnrollError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| EnrollError::state(Path::new("state document"), e))?;
    text.push('\n');
    Ok(text)
}

/// Parses a state document; `origin` names it in errors.
pub fn from_state_text<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &Path,
) -> Result<T, EnrollError> {
    serde_json::from_str(text).map_err(|e| EnrollError::state(origin, e))
}

/// A record of a state file kept by certificate serial: the issued-certificate log and the
/// revocation list.
trait BySerial: serde::Serialize + serde::de::DeserializeOwned {
    /// The serial that names the record.
    fn serial(&self) -> &str;
}

/// Reads a state file of records by serial; a missing file holds none (a hub's first start),
/// and a serial listed twice is refused, since a serial names one certificate.
fn load_by_serial<T: BySerial>(
    path: &Path,
    limit: u64,
) -> Result<std::collections::BTreeMap<String, T>, EnrollError> {
    let listed: Vec<T> = read_state(path, limit)?.unwrap_or_default();
    by_serial(listed, path)
}

/// Records by serial from a list; a serial listed twice is refused.
fn by_serial<T: BySerial>(
    listed: Vec<T>,
    path: &Path,
) -> Result<std::collections::BTreeMap<String, T>, EnrollError> {
    let mut records = std::collections::BTreeMap::new();
    for record in listed {
        let serial = record.serial().to_owned();
        if records.contains_key(&serial) {
            return Err(EnrollError::state(
                path,
                format!("serial {serial} appears twice"),
            ));
        }
        records.insert(serial, record);
    }
    Ok(records)
}

/// Writes records by serial as a list, atomically (mode 0600).
fn save_by_serial<T: BySerial>(
    path: &Path,
    records: &std::collections::BTreeMap<String, T>,
) -> Result<(), EnrollError> {
    write_state(path, &records.values().collect::<Vec<_>>())
}

/// Writes a JSON state file atomically with mode 0600.
fn write_state<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), EnrollError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| EnrollError::state(path, e))?;
    bytes.push(b'\n');
    crate::fsutil::replace_file(path, &bytes, crate::fsutil::FileMode::Exactly(0o600))
        .map_err(|e| EnrollError::state(path, e.problem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn state_files_are_replaced_whole_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(read_state::<Vec<u32>>(&path, 1024).unwrap().is_none());
        write_state(&path, &vec![1u32, 2]).unwrap();
        write_state(&path, &vec![3u32]).unwrap();
        assert_eq!(read_state::<Vec<u32>>(&path, 1024).unwrap(), Some(vec![3]));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        fs::write(&path, "{not json").unwrap();
        let err = read_state::<Vec<u32>>(&path, 1024).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        let err = read_state::<Vec<u32>>(&path, 4).unwrap_err().to_string();
        assert!(err.contains("larger than 4 bytes"), "{err}");
    }
}
