//! The hub's log of the certificates it issued by enrollment: who, which tenant, which serial,
//! valid until when. It backs `rna certs list` and revocation by agent name, and is kept as
//! JSON in the hub's state folder.

use std::collections::BTreeMap;
use std::path::Path;

use super::{load_by_serial, save_by_serial, BySerial, EnrollError, RevocationList, SignedCert};
use crate::identity::Tenant;

/// The largest issued-certificate log read: about 50,000 certificates.
pub const MAX_ISSUED_FILE: u64 = 16 * 1024 * 1024;

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedRecord {
    /// Lowercase hex of the serial number.
    pub serial: String,
    /// The tenant bound into the certificate.
    pub tenant: Tenant,
    /// The agent name it certifies.
    pub agent: String,
    /// Start of validity, unix seconds.
    pub not_before: u64,
    /// End of validity, unix seconds.
    pub not_after: u64,
    /// The join token it was enrolled with; `None` for a renewal over a live session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
    /// The id of the connect token that goes with this certificate: made by enrollment, kept
    /// by a renewal, replaced by a rotation. The hub moves that token's expiry with each
    /// renewal and revokes it when the certificate is replaced by a new enrollment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_token: Option<String>,
}

impl IssuedRecord {
    /// The record of a certificate just signed.
    pub fn of(cert: &SignedCert, join_token: Option<String>) -> IssuedRecord {
        IssuedRecord {
            serial: cert.serial.clone(),
            tenant: cert.tenant.clone(),
            agent: cert.agent.clone(),
            not_before: cert.not_before,
            not_after: cert.not_after,
            join_token,
            connect_token: None,
        }
    }
}

/// What a listed certificate is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// Within its validity and not revoked.
    Valid,
    /// Past its `not_after` (or before its `not_before`).
    Expired,
    /// On the revocation list.
    Revoked,
}

/// Issued certificates by serial.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssuedLog {
    records: BTreeMap<String, IssuedRecord>,
}

impl IssuedLog {
    /// Reads the log; a missing file is an empty log (a hub's first start).
    pub fn load(path: &Path) -> Result<IssuedLog, EnrollError> {
        Ok(IssuedLog {
            records: load_by_serial(path, MAX_ISSUED_FILE)?,
        })
    }

    /// Parses the list from its text (a state document); `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<IssuedLog, EnrollError> {
        let listed = super::from_state_text(text, origin)?;
        Ok(IssuedLog {
            records: super::by_serial(listed, origin)?,
        })
    }

    /// The list as its file holds it.
    pub fn to_text(&self) -> Result<String, EnrollError> {
        super::to_state_text(&self.records.values().collect::<Vec<_>>())
    }

    /// Writes the log atomically (mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), EnrollError> {
        save_by_serial(path, &self.records)
    }

    /// Adds a record; a serial already logged is refused, since a serial must name one
    /// certificate.
    pub fn add(&mut self, record: IssuedRecord) -> Result<(), EnrollError> {
        if self.records.contains_key(&record.serial) {
            return Err(EnrollError::CannotCreate {
                what: "issued-certificate record",
                message: format!("serial {} is already logged", record.serial),
            });
        }
        self.records.insert(record.serial.clone(), record);
        Ok(())
    }

    /// The certificate with this serial (lowercase hex).
    pub fn by_serial(&self, serial: &str) -> Option<&IssuedRecord> {
        self.records.get(serial)
    }

    /// Makes `new` the connect token of every certificate whose connect token is `old` (a
    /// rotated token); how many changed.
    pub fn replace_connect_token(&mut self, old: &str, new: &str) -> usize {
        let mut changed = 0;
        for record in self.records.values_mut() {
            if record.connect_token.as_deref() == Some(old) {
                record.connect_token = Some(new.to_owned());
                changed += 1;
            }
        }
        changed
    }

    /// Every certificate issued to this agent name (in any tenant unless `tenant` is given),
    /// oldest first.
    pub fn by_agent(&self, agent: &str, tenant: Option<&Tenant>) -> Vec<&IssuedRecord> {
        let mut found: Vec<&IssuedRecord> = self
            .records
            .values()
            .filter(|r| r.agent == agent && tenant.is_none_or(|t| *t == r.tenant))
            .collect();
        found.sort_by_key(|r| r.not_before);
        found
    }

    /// The certificates `target` names: the one with that serial, else every one of that
    /// agent name.
    pub fn find(&self, target: &str, tenant: Option<&Tenant>) -> Vec<&IssuedRecord> {
        match self.by_serial(target) {
            Some(record) if tenant.is_none_or(|t| *t == record.tenant) => vec![record],
            _ => self.by_agent(target, tenant),
        }
    }

    /// Every certificate with its state at unix second `now`, by tenant, agent, then
    /// `not_before`.
    pub fn list(&self, revoked: &RevocationList, now: u64) -> Vec<(&IssuedRecord, CertState)> {
        let mut rows: Vec<(&IssuedRecord, CertState)> = self
            .records
            .values()
            .map(|r| {
                let state = if revoked.is_revoked(&r.serial) {
                    CertState::Revoked
                } else if now < r.not_before || now >= r.not_after {
                    CertState::Expired
                } else {
                    CertState::Valid
                };
                (r, state)
            })
            .collect();
        rows.sort_by(|(a, _), (b, _)| {
            (&a.tenant, &a.agent, a.not_before).cmp(&(&b.tenant, &b.agent, b.not_before))
        });
        rows
    }

    /// How many certificates are logged.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl BySerial for IssuedRecord {
    fn serial(&self) -> &str {
        &self.serial
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(
        serial: &str,
        tenant: &str,
        agent: &str,
        nb: u64,
        na: u64,
    ) -> IssuedRecord {
        IssuedRecord {
            serial: serial.into(),
            tenant: tenant.parse().unwrap(),
            agent: agent.into(),
            not_before: nb,
            not_after: na,
            join_token: Some("0123456789ab".into()),
            connect_token: None,
        }
    }

    #[test]
    fn lookup_by_serial_or_name_and_list_states() {
        let mut log = IssuedLog::default();
        log.add(record("0a", "acme/prod", "edge", 100, 200))
            .unwrap();
        log.add(record("0b", "acme/prod", "edge", 150, 300))
            .unwrap();
        log.add(record("0c", "other/prod", "edge", 100, 300))
            .unwrap();
        log.add(record("0d", "acme/prod", "core", 100, 300))
            .unwrap();
        assert!(log.add(record("0a", "acme/prod", "x", 1, 2)).is_err());
        assert_eq!(log.len(), 4);
        let serials =
            |v: Vec<&IssuedRecord>| v.iter().map(|r| r.serial.clone()).collect::<Vec<_>>();
        let acme: Tenant = "acme/prod".parse().unwrap();
        let other: Tenant = "other/prod".parse().unwrap();
        let cases: Vec<(&str, Option<&Tenant>, Vec<&str>)> = vec![
            ("0b", None, vec!["0b"]),
            ("0c", Some(&acme), vec![]),
            ("edge", None, vec!["0a", "0c", "0b"]),
            ("edge", Some(&acme), vec!["0a", "0b"]),
            ("edge", Some(&other), vec!["0c"]),
            ("nobody", None, vec![]),
        ];
        for (target, tenant, want) in cases {
            assert_eq!(
                serials(log.find(target, tenant)),
                want,
                "{target} {tenant:?}"
            );
        }
        let mut revoked = RevocationList::default();
        revoked.revoke(&log, "0d", None, 120).unwrap();
        let states: Vec<(String, CertState)> = log
            .list(&revoked, 200)
            .into_iter()
            .map(|(r, s)| (r.serial.clone(), s))
            .collect();
        assert_eq!(
            states,
            vec![
                ("0d".into(), CertState::Revoked),
                ("0a".into(), CertState::Expired),
                ("0b".into(), CertState::Valid),
                ("0c".into(), CertState::Valid),
            ]
        );
    }

    #[test]
    fn the_log_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issued.json");
        assert!(IssuedLog::load(&path).unwrap().is_empty());
        let mut log = IssuedLog::default();
        log.add(record("0a", "acme/prod", "edge", 100, 200))
            .unwrap();
        log.add(IssuedRecord {
            join_token: None,
            ..record("0b", "acme/prod", "edge", 150, 300)
        })
        .unwrap();
        log.save(&path).unwrap();
        assert_eq!(IssuedLog::load(&path).unwrap(), log);
        let text = std::fs::read_to_string(&path).unwrap();
        let twice = text.replace("\"0b\"", "\"0a\"");
        std::fs::write(&path, twice).unwrap();
        let err = IssuedLog::load(&path).unwrap_err().to_string();
        assert!(err.contains("serial 0a appears twice"), "{err}");
        std::fs::write(
            &path,
            text.replace("\"agent\"", "\"surprise\": 1, \"agent\""),
        )
        .unwrap();
        let err = IssuedLog::load(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
