//! The hub's state folder: where its CA, hub certificate, token store, join tokens,
//! issued-certificate log and revocation list live, created on a hub's first start and reused
//! afterwards, so a hub needs nothing but `--state-dir` and its names.

use std::path::{Path, PathBuf};

use super::{read_state, write_state, EnrollError, JoinBook};

/// The largest join token file read: about 30,000 join tokens.
const MAX_JOIN_FILE: u64 = 8 * 1024 * 1024;
/// The largest address file read.
const MAX_ADDRESS_FILE: u64 = 16 * 1024;

/// The files of a hub's state folder. Secret files (CA key, hub key, token store, join
/// tokens) are written with mode 0600, the folder with 0700.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubState {
    /// The folder.
    dir: PathBuf,
}

/// What the hub tells `rna token create --join` about itself, so the printed line names an
/// address agents can dial: its names and the port it listens on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubAddress {
    /// The names of the hub certificate (`--hub-name`), first the one to print.
    pub names: Vec<String>,
    /// The UDP (and TCP) port agents connect to.
    pub port: u16,
}

impl HubAddress {
    /// `HOST:PORT` of the first name (an IPv6 address in brackets), if there is a name.
    pub fn first(&self) -> Option<String> {
        let host = self.names.first()?;
        Some(if host.contains(':') {
            format!("[{host}]:{}", self.port)
        } else {
            format!("{host}:{}", self.port)
        })
    }
}

impl HubState {
    /// The state folder `dir` (nothing is read or created yet).
    pub fn new(dir: &Path) -> HubState {
        HubState {
            dir: dir.to_path_buf(),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate, `ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA key, `ca-key.pem`, which signs enrolled agents' certificates.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    /// The hub certificate, `hub.pem`.
    pub fn hub_cert(&self) -> PathBuf {
        self.dir.join("hub.pem")
    }

    /// The hub key, `hub-key.pem`.
    pub fn hub_key(&self) -> PathBuf {
        self.dir.join("hub-key.pem")
    }

    /// The token store, `tokens.toml`.
    pub fn tokens(&self) -> PathBuf {
        self.dir.join("tokens.toml")
    }

    /// The join tokens, `join-tokens.json`.
    pub fn join_tokens(&self) -> PathBuf {
        self.dir.join("join-tokens.json")
    }

    /// The issued-certificate log, `issued.json`.
    pub fn issued(&self) -> PathBuf {
        self.dir.join("issued.json")
    }

    /// The revocation list, `revoked.json`.
    pub fn revoked(&self) -> PathBuf {
        self.dir.join("revoked.json")
    }

    /// The hub's names and port, `hub-address.json`, written by the hub at every start.
    pub fn address(&self) -> PathBuf {
        self.dir.join("hub-address.json")
    }

    /// Creates what is missing: the folder (0700); with `certs`, the CA and a hub certificate
    /// for `hub_names` (a first start needs at least one name); with `tokens`, an empty token
    /// store. What exists is reused as it is (its certificate already names the hub).
    pub fn prepare(
        &self,
        hub_names: &[String],
        certs: bool,
        tokens: bool,
    ) -> Result<(), EnrollError> {
        let fail = |path: &Path, message: String| EnrollError::State {
            path: path.to_path_buf(),
            message,
        };
        crate::fsutil::create_private_dir(&self.dir).map_err(|e| fail(&self.dir, e.to_string()))?;
        if certs && !self.ca().exists() {
            if hub_names.is_empty() {
                return Err(fail(
                    &self.dir,
                    "a new state folder needs at least one --hub-name (the DNS name or IP \
                     address agents dial) for the hub certificate"
                        .into(),
                ));
            }
            crate::certs::init_dir(&self.dir, hub_names, false)
                .map_err(|e| fail(&self.dir, crate::fsutil::error_chain(&e)))?;
        }
        let store = self.tokens();
        if tokens && !store.exists() {
            crate::auth::TokenStore::default()
                .save(&store)
                .map_err(|e| fail(&store, crate::fsutil::error_chain(&e)))?;
        }
        Ok(())
    }

    /// Reads the join tokens; none when the file does not exist yet.
    pub fn load_join_tokens(&self) -> Result<JoinBook, EnrollError> {
        Ok(read_state(&self.join_tokens(), MAX_JOIN_FILE)?.unwrap_or_default())
    }

    /// Writes the join tokens atomically, mode 0600.
    pub fn save_join_tokens(&self, book: &JoinBook) -> Result<(), EnrollError> {
        write_state(&self.join_tokens(), book)
    }

    /// Records the hub's names and port for `rna token create --join`.
    pub fn save_address(&self, address: &HubAddress) -> Result<(), EnrollError> {
        write_state(&self.address(), address)
    }

    /// The hub's names and port as last recorded; `None` before a hub has started here.
    pub fn load_address(&self) -> Result<Option<HubAddress>, EnrollError> {
        read_state(&self.address(), MAX_ADDRESS_FILE)
    }
}

/// The DNS names and IP addresses of the first certificate of a PEM file (the hub's names, in
/// the order `--hub-name` gave them); none when it cannot be read.
pub fn certificate_names(path: &Path) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok(certs) = crate::certs::load_certs(path) else {
        return Vec::new();
    };
    let Some(first) = certs.first() else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(first) else {
        return Vec::new();
    };
    let Ok(Some(sans)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    sans.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => <[u8; 4]>::try_from(*ip)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*ip)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_state_folder_is_made_once_private_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let state = HubState::new(&tmp.path().join("hub"));
        state.prepare(&[], false, false).unwrap();
        assert!(!state.ca().exists() && !state.tokens().exists());
        let err = state.prepare(&[], true, true).unwrap_err().to_string();
        assert!(err.contains("--hub-name"), "{err}");
        state
            .prepare(&["hub.example.com".into()], true, true)
            .unwrap();
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(state.dir().to_path_buf()), 0o700);
        for secret in [state.ca_key(), state.hub_key(), state.tokens()] {
            assert_eq!(mode(secret.clone()), 0o600, "{}", secret.display());
        }
        assert_eq!(
            certificate_names(&state.hub_cert()),
            vec!["hub.example.com".to_string()]
        );
        let ca = std::fs::read(state.ca()).unwrap();
        // A second start keeps the CA, even without names.
        state.prepare(&[], true, true).unwrap();
        assert_eq!(std::fs::read(state.ca()).unwrap(), ca);
        assert!(state.load_join_tokens().unwrap().records().next().is_none());
        assert_eq!(state.load_address().unwrap(), None);
        let address = HubAddress {
            names: vec!["::1".into()],
            port: 4433,
        };
        state.save_address(&address).unwrap();
        assert_eq!(
            state.load_address().unwrap().unwrap().first().unwrap(),
            "[::1]:4433"
        );
    }
}
