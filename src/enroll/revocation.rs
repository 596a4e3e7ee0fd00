//! The hub's revocation list: serials of certificates it refuses from now on, with whose they
//! were. Kept as JSON in the hub's state folder so a restart keeps every revocation.

use std::collections::BTreeMap;
use std::path::Path;

use super::{load_by_serial, save_by_serial, BySerial, EnrollError, IssuedLog};
use crate::identity::Tenant;

/// The largest revocation list read.
pub const MAX_REVOCATION_FILE: u64 = 16 * 1024 * 1024;

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// Lowercase hex of the serial number.
    pub serial: String,
    /// The tenant of the agent it certified.
    pub tenant: Tenant,
    /// The agent it certified.
    pub agent: String,
    /// When it was revoked, unix seconds.
    pub revoked_at: u64,
    /// Its end of validity, unix seconds; past it the entry could be dropped, since the
    /// certificate is refused as expired anyway.
    pub not_after: u64,
}

/// Revoked certificates by serial.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    entries: BTreeMap<String, Revoked>,
}

impl RevocationList {
    /// Reads the list; a missing file is an empty list (a hub's first start).
    pub fn load(path: &Path) -> Result<RevocationList, EnrollError> {
        Ok(RevocationList {
            entries: load_by_serial(path, MAX_REVOCATION_FILE)?,
        })
    }

    /// Parses the list from its text (a state document); `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<RevocationList, EnrollError> {
        let listed = super::from_state_text(text, origin)?;
        Ok(RevocationList {
            entries: super::by_serial(listed, origin)?,
        })
    }

    /// The list as its file holds it.
    pub fn to_text(&self) -> Result<String, EnrollError> {
        super::to_state_text(&self.entries.values().collect::<Vec<_>>())
    }

    /// Writes the list atomically (mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), EnrollError> {
        save_by_serial(path, &self.entries)
    }

    /// Revokes what `target` names in `log`: the certificate with that serial, else every
    /// certificate of that agent name (in `tenant` only, when given). Returns the newly
    /// revoked entries; revoking an already revoked certificate again changes nothing.
    /// Nothing matching is an error that names the target, so a typo is not a silent no-op.
    pub fn revoke(
        &mut self,
        log: &IssuedLog,
        target: &str,
        tenant: Option<&Tenant>,
        now: u64,
    ) -> Result<Vec<Revoked>, EnrollError> {
        let found = log.find(target, tenant);
        if found.is_empty() {
            return Err(EnrollError::NotFound(format!(
                "no issued certificate has serial or agent name {target:?}"
            )));
        }
        let mut added = Vec::new();
        for record in found {
            if self.entries.contains_key(&record.serial) {
                continue;
            }
            let entry = Revoked {
                serial: record.serial.clone(),
                tenant: record.tenant.clone(),
                agent: record.agent.clone(),
                revoked_at: now,
                not_after: record.not_after,
            };
            self.entries.insert(entry.serial.clone(), entry.clone());
            added.push(entry);
        }
        Ok(added)
    }

    /// Whether the certificate with this serial is revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.entries.contains_key(serial)
    }

    /// The entry of this serial.
    pub fn get(&self, serial: &str) -> Option<&Revoked> {
        self.entries.get(serial)
    }

    /// Every entry, by serial.
    pub fn entries(&self) -> impl Iterator<Item = &Revoked> {
        self.entries.values()
    }
}

impl BySerial for Revoked {
    fn serial(&self) -> &str {
        &self.serial
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enroll::issued::tests::record;

    fn log() -> IssuedLog {
        let mut log = IssuedLog::default();
        log.add(record("0a", "acme/prod", "edge", 100, 200))
            .unwrap();
        log.add(record("0b", "acme/prod", "edge", 150, 300))
            .unwrap();
        log.add(record("0c", "other/prod", "edge", 100, 300))
            .unwrap();
        log
    }

    #[test]
    fn revoke_by_serial_or_name_table() {
        let acme: Tenant = "acme/prod".parse().unwrap();
        type Case<'a> = (&'a str, Option<&'a Tenant>, Result<Vec<&'a str>, &'a str>);
        let cases: Vec<Case> = vec![
            ("0b", None, Ok(vec!["0b"])),
            ("edge", None, Ok(vec!["0a", "0c", "0b"])),
            ("edge", Some(&acme), Ok(vec!["0a", "0b"])),
            (
                "0c",
                Some(&acme),
                Err("no issued certificate has serial or agent name \"0c\""),
            ),
            ("nobody", None, Err("\"nobody\"")),
        ];
        for (target, tenant, want) in cases {
            let mut list = RevocationList::default();
            let got = list.revoke(&log(), target, tenant, 170);
            match (got, want) {
                (Ok(added), Ok(serials)) => {
                    let got: Vec<&str> = added.iter().map(|r| r.serial.as_str()).collect();
                    assert_eq!(got, serials, "{target}");
                    for serial in serials {
                        assert!(list.is_revoked(serial));
                        assert_eq!(list.get(serial).unwrap().revoked_at, 170);
                    }
                }
                (Err(err), Err(text)) => assert!(err.to_string().contains(text), "{err}"),
                (got, want) => panic!("{target}: got {got:?}, want {want:?}"),
            }
        }
        // Revoking twice adds nothing and keeps the first time.
        let mut list = RevocationList::default();
        list.revoke(&log(), "0a", None, 1).unwrap();
        assert!(list.revoke(&log(), "0a", None, 2).unwrap().is_empty());
        assert_eq!(list.get("0a").unwrap().revoked_at, 1);
        assert!(!list.is_revoked("0b"));
    }

    #[test]
    fn revocations_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        assert_eq!(
            RevocationList::load(&path).unwrap(),
            RevocationList::default()
        );
        let mut list = RevocationList::default();
        list.revoke(&log(), "edge", None, 170).unwrap();
        list.save(&path).unwrap();
        let back = RevocationList::load(&path).unwrap();
        assert_eq!(back, list);
        assert!(back.is_revoked("0c"));
        assert_eq!(back.entries().count(), 3);
        std::fs::write(&path, "[{\"serial\": 1}]").unwrap();
        let err = RevocationList::load(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
    }
}
