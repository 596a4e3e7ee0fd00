//! `rna dev`: the embedded default. Prepares a state folder (CA, hub and agent certificates, a
//! token store and the token itself) once and reuses it on later runs.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::auth::{read_secret_file, Scope, Secret, StoreError, Tenant, TokenStore};
use crate::certs::{self, CertError};

/// The agent name `rna dev` runs.
pub const DEV_AGENT: &str = "local";

/// The tenant of the dev token and agent.
pub const DEV_TENANT: &str = "dev/local";

/// Errors preparing the state folder.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Certificates could not be made or read.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The token store could not be made or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The folder could not be created.
    #[error("creating {path}: {source}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Paths and the token of a prepared state folder.
#[derive(Debug, Clone)]
pub struct DevState {
    /// The folder.
    pub dir: PathBuf,
    /// The token (all scopes but admin, tenant `dev/local`).
    pub token: Secret,
}

impl DevState {
    /// CA certificate path.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Hub certificate path.
    pub fn hub_cert(&self) -> PathBuf {
        self.dir.join("hub.pem")
    }
    /// Hub key path.
    pub fn hub_key(&self) -> PathBuf {
        self.dir.join("hub-key.pem")
    }
    /// Agent certificate path.
    pub fn agent_cert(&self) -> PathBuf {
        self.dir.join(format!("agent-{DEV_AGENT}.pem"))
    }
    /// Agent key path.
    pub fn agent_key(&self) -> PathBuf {
        self.dir.join(format!("agent-{DEV_AGENT}-key.pem"))
    }
    /// Token store path.
    pub fn tokens(&self) -> PathBuf {
        self.dir.join("tokens.toml")
    }
    /// The tenant of the dev agent.
    pub fn tenant() -> Tenant {
        // A constant that is valid by construction.
        DEV_TENANT
            .parse()
            .unwrap_or_else(|_| unreachable!("dev tenant is valid"))
    }

    /// Creates what is missing in `dir` and reuses what is there.
    pub fn prepare(dir: &Path) -> Result<DevState, DevError> {
        std::fs::create_dir_all(dir).map_err(|source| DevError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        if !dir.join("ca.pem").exists() {
            let names = ["localhost", "127.0.0.1", "::1"].map(String::from);
            certs::init_dir(dir, &names, true)?;
        }
        if !dir.join(format!("agent-{DEV_AGENT}.pem")).exists() {
            certs::issue_agent_files(dir, DEV_AGENT, true)?;
        }
        let store_path = dir.join("tokens.toml");
        let token_path = dir.join("token.txt");
        let now = SystemTime::now();
        let existing = if token_path.exists() && store_path.exists() {
            let token = read_secret_file(&token_path)?;
            let store = TokenStore::load(&store_path)?;
            store
                .authorize(token.expose(), Scope::Proxy, now)
                .ok()
                .map(|_| token)
        } else {
            None
        };
        let token = match existing {
            Some(token) => token,
            None => {
                let mut store = TokenStore::load_or_empty(&store_path)?;
                let scopes = vec![
                    Scope::ConnectAgentHub,
                    Scope::Proxy,
                    Scope::ReadInfraData,
                    Scope::ExecInfraOp,
                    // So the same token also reads the hub's /metrics.
                    Scope::ReadMetrics,
                ];
                let (token, _) =
                    store.create(Self::tenant(), scopes, None, Some("dev".into()), now)?;
                store.save(&store_path)?;
                certs::write_private(
                    &token_path,
                    format!("{}\n", token.expose()).as_bytes(),
                    true,
                )?;
                token
            }
        };
        Ok(DevState {
            dir: dir.to_path_buf(),
            token,
        })
    }
}
