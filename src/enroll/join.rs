//! Join tokens: the one line a hub prints and an agent pastes, `rna_join_<id>.<secret>.<pin>`,
//! and the record the hub keeps of each (hashed, bound to a tenant and an agent name, with
//! uses left and an expiry).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{EnrollError, RefusalCode};
use crate::auth::{hex, is_lower_hex};
use crate::clock::format_rfc3339;
use crate::identity::{valid_agent_name, Secret, Tenant};

/// The fixed start of every join token; distinct from `rna_` connect tokens so neither is
/// ever taken for the other.
pub const JOIN_PREFIX: &str = "rna_join_";
/// Bytes of randomness in a join token id (12 hex characters), public: it names the record.
const ID_BYTES: usize = 6;
/// Bytes of randomness in a join token secret (48 hex characters, 192 bits).
const SECRET_BYTES: usize = 24;
/// Bytes of the CA pin, a SHA-256 (64 hex characters).
const PIN_BYTES: usize = 32;
/// The exact length of a join token: prefix, id, `.`, secret, `.`, pin.
pub const JOIN_TOKEN_LEN: usize =
    JOIN_PREFIX.len() + 2 * ID_BYTES + 1 + 2 * SECRET_BYTES + 1 + 2 * PIN_BYTES;
/// Uses of a join token when none are asked for: one agent, once.
pub const DEFAULT_USES: u32 = 1;
/// Lifetime of a join token when none is asked for.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60 * 60);
/// The longest lifetime a join token may have (a reusable token for a fleet of pods is the
/// longest-lived use; past a year it is a standing credential, which a connect token is for).
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Compared against when the presented id is unknown, so an unknown id costs the same
/// hashing and comparison as a known one.
const DUMMY_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn malformed(why: impl fmt::Display) -> EnrollError {
    EnrollError::refused(
        RefusalCode::Malformed,
        format!("join token is malformed: {why}"),
    )
}

/// Decodes lowercase hex of the right length (checked by the caller).
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = value(digits[2 * i])? << 4 | value(digits[2 * i + 1])?;
    }
    Some(out)
}

/// The SHA-256 of a CA certificate's SubjectPublicKeyInfo (DER), as kubeadm's
/// `--discovery-token-ca-cert-hash`. It names the CA's key, not the certificate, so a CA
/// certificate renewed with the same key keeps its pin. Printed as `sha256:<64 hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CaPin([u8; PIN_BYTES]);

impl CaPin {
    /// The pin of this SubjectPublicKeyInfo DER.
    pub fn of_spki(spki_der: &[u8]) -> CaPin {
        CaPin(Sha256::digest(spki_der).into())
    }

    /// The 64 lowercase hex digits, as they appear in a join token.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for CaPin {
    type Err = String;

    /// `sha256:<64 hex>` or the bare 64 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("sha256:").unwrap_or(s);
        match unhex::<PIN_BYTES>(digits) {
            Some(bytes) if is_lower_hex(digits, 2 * PIN_BYTES) => Ok(CaPin(bytes)),
            _ => Err(format!(
                "CA pin {s:?} is not sha256: and 64 lowercase hex digits"
            )),
        }
    }
}

impl TryFrom<String> for CaPin {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CaPin> for String {
    fn from(pin: CaPin) -> Self {
        pin.to_string()
    }
}

/// A parsed join token: its public id, the credential the hub checks, and the CA pin the agent
/// checks the hub against. `Debug` never shows the secret.
#[derive(Clone)]
pub struct JoinToken {
    /// 12 lowercase hex digits.
    id: String,
    /// `rna_join_<id>.<secret>`: what the hub hashes and compares.
    credential: Secret,
    /// The hub CA's SPKI hash.
    pin: CaPin,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"MASKED")
            .field("pin", &self.pin)
            .finish()
    }
}

impl JoinToken {
    /// Parses `rna_join_<12 hex>.<48 hex>.<64 hex>` strictly: exact length first (so nothing
    /// long is scanned), then each part. The error says which part is wrong and never quotes
    /// the text, which may hold a secret.
    pub fn parse(text: &str) -> Result<JoinToken, EnrollError> {
        if text.len() != JOIN_TOKEN_LEN {
            return Err(malformed(format_args!(
                "expected {JOIN_TOKEN_LEN} characters, got {}",
                text.len()
            )));
        }
        let Some(rest) = text.strip_prefix(JOIN_PREFIX) else {
            return Err(malformed(format_args!("it must start with {JOIN_PREFIX}")));
        };
        let mut parts = rest.split('.');
        let (Some(id), Some(secret), Some(pin), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed(
                "expected three '.'-separated parts: id, secret, CA pin",
            ));
        };
        if !is_lower_hex(id, 2 * ID_BYTES) {
            return Err(malformed(format_args!(
                "the id must be {} lowercase hex digits",
                2 * ID_BYTES
            )));
        }
        if !is_lower_hex(secret, 2 * SECRET_BYTES) {
            return Err(malformed(format_args!(
                "the secret must be {} lowercase hex digits",
                2 * SECRET_BYTES
            )));
        }
        let Some(pin) = unhex::<PIN_BYTES>(pin).filter(|_| is_lower_hex(pin, 2 * PIN_BYTES)) else {
            return Err(malformed(format_args!(
                "the CA pin must be {} lowercase hex digits",
                2 * PIN_BYTES
            )));
        };
        Ok(JoinToken {
            id: id.to_owned(),
            credential: Secret::new(format!("{JOIN_PREFIX}{id}.{secret}")),
            pin: CaPin(pin),
        })
    }

    /// The public id, which names the hub's record.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hub CA's SPKI hash the agent checks before sending the token.
    pub fn pin(&self) -> CaPin {
        self.pin
    }

    /// The whole token text, for sending to the hub once the pin has been checked.
    pub fn text(&self) -> Secret {
        Secret::new(format!(
            "{}.{}",
            self.credential.expose(),
            self.pin.to_hex()
        ))
    }

    /// Lowercase hex of the SHA-256 of `rna_join_<id>.<secret>`, as the hub stores it. The pin
    /// is left out: it is public and the hub knows its own.
    fn sha256(&self) -> String {
        hex(&Sha256::digest(self.credential.expose().as_bytes()))
    }
}

/// Which agent names a join token may enroll.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum NameRule {
    /// Exactly this agent name (one machine).
    Exact(String),
    /// Any valid agent name that starts with this (a fleet: `edge-` admits `edge-7f3a`).
    Prefix(String),
}

impl NameRule {
    /// Whether the rule admits `name` (which must itself be a valid agent name).
    pub fn allows(&self, name: &str) -> bool {
        valid_agent_name(name)
            && match self {
                NameRule::Exact(exact) => name == exact,
                NameRule::Prefix(prefix) => name.starts_with(prefix.as_str()),
            }
    }

    /// Checks the rule's own text: an exact name is a valid agent name, a prefix is a non-empty
    /// start of one.
    fn validate(&self) -> Result<(), String> {
        match self {
            NameRule::Exact(name) if valid_agent_name(name) => Ok(()),
            NameRule::Exact(name) => Err(format!(
                "invalid agent name {name:?}: use 1 to 63 letters, digits, '-' or '_'"
            )),
            NameRule::Prefix(prefix) if valid_agent_name(prefix) && prefix.len() < 63 => Ok(()),
            NameRule::Prefix(prefix) => Err(format!(
                "invalid agent name prefix {prefix:?}: use 1 to 62 letters, digits, '-' or '_'"
            )),
        }
    }
}

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameRule::Exact(name) => f.write_str(name),
            NameRule::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// What the hub keeps of one join token: only the SHA-256 of its credential.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRecord {
    /// 12 lowercase hex characters; public, shown by `token list` and in logs.
    pub id: String,
    /// Lowercase hex of the SHA-256 of `rna_join_<id>.<secret>`.
    pub sha256: String,
    /// The tenant every agent enrolled with this token belongs to.
    pub tenant: Tenant,
    /// The agent names it may enroll.
    pub name: NameRule,
    /// Enrollments left; the token is spent at zero (kept so `token list` shows it).
    pub uses_left: u32,
    /// Creation time, unix seconds.
    pub created: u64,
    /// Expiry, unix seconds; refused from this second on. Join tokens always expire.
    pub expires: u64,
}

/// What a join token is asked to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJoin {
    /// The tenant of the agents it enrolls.
    pub tenant: Tenant,
    /// The agent names it may enroll.
    pub name: NameRule,
    /// How many enrollments it allows (default [`DEFAULT_USES`]).
    pub uses: u32,
    /// How long it lives (default [`DEFAULT_TTL`], at most [`MAX_TTL`]).
    pub ttl: Duration,
}

impl NewJoin {
    /// A single-use, one-hour join token for `tenant` and `name`.
    pub fn new(tenant: Tenant, name: NameRule) -> NewJoin {
        NewJoin {
            tenant,
            name,
            uses: DEFAULT_USES,
            ttl: DEFAULT_TTL,
        }
    }
}

/// A freshly made join token and the line to paste on the agent machine; `Debug` masks both.
#[derive(Clone)]
pub struct JoinLine {
    /// The token text, shown once.
    pub token: Secret,
    /// `rna agent --hub HOST:PORT --join rna_join_…`, shown once.
    pub command: Secret,
}

impl fmt::Debug for JoinLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinLine(MASKED)")
    }
}

/// Checks `HOST:PORT` for the printed command: a DNS name, an IPv4 address or a bracketed IPv6
/// address, and a port 1..=65535. Only characters a shell takes literally, so the line works
/// pasted as is.
fn check_hub_address(hub: &str) -> Result<(), String> {
    let bad = || format!("hub address {hub:?} must be HOST:PORT (IPv6 as [ADDRESS]:PORT)");
    let (host, port) = hub.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Makes a join token: returns the line to print and the record to store.
///
/// `hub` is the `HOST:PORT` agents dial; `pin` is the hub CA's ([`super::ca_pin`]). The ttl is
/// rounded up to whole seconds, at least one second and at most [`MAX_TTL`]; uses at least 1.
pub fn create(
    new: NewJoin,
    pin: CaPin,
    hub: &str,
    now: SystemTime,
) -> Result<(JoinLine, JoinRecord), EnrollError> {
    let cannot = |message: String| EnrollError::CannotCreate {
        what: "join token",
        message,
    };
    new.name.validate().map_err(cannot)?;
    check_hub_address(hub).map_err(cannot)?;
    if new.uses == 0 {
        return Err(cannot("uses must be at least 1".into()));
    }
    if new.ttl.is_zero() || new.ttl > MAX_TTL {
        return Err(cannot("ttl must be between 1 second and 365 days".into()));
    }
    let secs = new
        .ttl
        .as_secs()
        .saturating_add(u64::from(new.ttl.subsec_nanos() > 0));
    let created = crate::auth::unix_now(now);
    let expires = created
        .checked_add(secs)
        .filter(|&e| i64::try_from(e).is_ok())
        .ok_or_else(|| cannot("ttl is too long".into()))?;
    let rng = SystemRandom::new();
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill(&mut id)
        .and_then(|()| rng.fill(&mut secret))
        .map_err(|_| cannot("the system random number generator failed".into()))?;
    let text = format!(
        "{JOIN_PREFIX}{}.{}.{}",
        hex(&id),
        hex(&secret),
        pin.to_hex()
    );
    let token = JoinToken::parse(&text)?;
    let record = JoinRecord {
        id: token.id.clone(),
        sha256: token.sha256(),
        tenant: new.tenant,
        name: new.name,
        uses_left: new.uses,
        created,
        expires,
    };
    // The agent names itself in its CSR, so the line carries the name: the exact one, or for
    // a fleet the prefix and the machine's short host name, which the shell fills in.
    let name = match &record.name {
        NameRule::Exact(name) => name.clone(),
        NameRule::Prefix(prefix) => format!("{prefix}$(hostname -s)"),
    };
    let command = Secret::new(format!("rna agent --hub {hub} --join {text} --name {name}"));
    Ok((
        JoinLine {
            token: Secret::new(text),
            command,
        },
        record,
    ))
}

/// What a redeemed join token allows the hub to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The join token's id, for the issued-certificate log.
    pub token_id: String,
    /// The tenant to bind into the certificate.
    pub tenant: Tenant,
    /// The agent name to certify.
    pub agent: String,
}

impl JoinRecord {
    /// Whether the token is expired at unix second `now`.
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires <= now
    }

    /// Checks a presented token for enrolling `agent`, without spending a use.
    ///
    /// `tenant` is the tenant the agent already belongs to, if it has one (a certificate it
    /// re-enrolls with); a join token of another tenant is refused. Order: secret (`Unknown`,
    /// compared in constant time), expiry (`Expired`), uses (`Spent`), tenant
    /// (`TenantMismatch`), name (`NameNotAllowed`).
    pub fn check(
        &self,
        token: &JoinToken,
        agent: &str,
        tenant: Option<&Tenant>,
        now: SystemTime,
    ) -> Result<Admission, EnrollError> {
        let same: bool = token
            .sha256()
            .as_bytes()
            .ct_eq(self.sha256.as_bytes())
            .into();
        if !same || token.id != self.id {
            return Err(unknown());
        }
        let now = crate::auth::unix_now(now);
        if self.is_expired(now) {
            return Err(EnrollError::refused(
                RefusalCode::Expired,
                format!(
                    "join token {} expired at {}",
                    self.id,
                    format_rfc3339(self.expires)
                ),
            ));
        }
        if self.uses_left == 0 {
            return Err(EnrollError::refused(
                RefusalCode::Spent,
                format!(
                    "join token {} has already been used; create a new one",
                    self.id
                ),
            ));
        }
        if let Some(tenant) = tenant.filter(|t| **t != self.tenant) {
            return Err(EnrollError::refused(
                RefusalCode::TenantMismatch,
                format!(
                    "join token {} is for tenant {}, not {tenant}",
                    self.id, self.tenant
                ),
            ));
        }
        if !self.name.allows(agent) {
            return Err(EnrollError::refused(
                RefusalCode::NameNotAllowed,
                format!(
                    "join token {} may enroll agent {}, not {agent:?}",
                    self.id, self.name
                ),
            ));
        }
        Ok(Admission {
            token_id: self.id.clone(),
            tenant: self.tenant.clone(),
            agent: agent.to_owned(),
        })
    }

    /// [`check`](Self::check), then spends one use.
    pub fn redeem(
        &mut self,
        token: &JoinToken,
        agent: &str,
        tenant: Option<&Tenant>,
        now: SystemTime,
    ) -> Result<Admission, EnrollError> {
        let admission = self.check(token, agent, tenant, now)?;
        self.uses_left -= 1;
        Ok(admission)
    }
}

fn unknown() -> EnrollError {
    EnrollError::refused(RefusalCode::Unknown, "join token is not known")
}

/// The hub's join tokens by id. Serializes as a list of records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinBook {
    records: BTreeMap<String, JoinRecord>,
}

impl JoinBook {
    /// Adds or replaces a record.
    pub fn insert(&mut self, record: JoinRecord) {
        self.records.insert(record.id.clone(), record);
    }

    /// The record with this id.
    pub fn get(&self, id: &str) -> Option<&JoinRecord> {
        self.records.get(id)
    }

    /// Every record, by id.
    pub fn records(&self) -> impl Iterator<Item = &JoinRecord> {
        self.records.values()
    }

    /// Parses a presented token text and redeems it for `agent` (see [`JoinRecord::check`]).
    /// An unknown id is hashed and compared like a known one, so ids cannot be probed by time.
    pub fn redeem(
        &mut self,
        text: &str,
        agent: &str,
        tenant: Option<&Tenant>,
        now: SystemTime,
    ) -> Result<Admission, EnrollError> {
        let token = JoinToken::parse(text)?;
        match self.records.get_mut(&token.id) {
            Some(record) => record.redeem(&token, agent, tenant, now),
            None => {
                let _ = token.sha256().as_bytes().ct_eq(DUMMY_SHA256.as_bytes());
                Err(unknown())
            }
        }
    }
}

impl serde::Serialize for JoinBook {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.records.values())
    }
}

impl<'de> serde::Deserialize<'de> for JoinBook {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<JoinRecord>::deserialize(d)?;
        let mut book = JoinBook::default();
        for record in list {
            if !is_lower_hex(&record.id, 2 * ID_BYTES) || !is_lower_hex(&record.sha256, 64) {
                return Err(serde::de::Error::custom(format!(
                    "join token record {:?}: id must be 12 and sha256 64 lowercase hex digits",
                    record.id
                )));
            }
            if let Err(e) = record.name.validate() {
                return Err(serde::de::Error::custom(e));
            }
            if book.records.contains_key(&record.id) {
                return Err(serde::de::Error::custom(format!(
                    "join token id {:?} appears twice",
                    record.id
                )));
            }
            book.insert(record);
        }
        Ok(book)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB: &str = "hub.example.com:443";

    fn pin() -> CaPin {
        CaPin::of_spki(b"a CA key")
    }

    fn tenant(s: &str) -> Tenant {
        s.parse().unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn make(name: NameRule, uses: u32) -> (JoinLine, JoinRecord) {
        let new = NewJoin {
            uses,
            ..NewJoin::new(tenant("acme/prod"), name)
        };
        create(new, pin(), HUB, at(1_000)).unwrap()
    }

    #[test]
    fn created_line_pastes_as_one_agent_command() {
        let (line, record) = make(NameRule::Exact("edge".into()), 1);
        let text = line.token.expose();
        assert_eq!(text.len(), JOIN_TOKEN_LEN);
        assert_eq!(
            line.command.expose(),
            format!("rna agent --hub {HUB} --join {text} --name edge")
        );
        let (fleet, _) = make(NameRule::Prefix("edge-".into()), 5);
        assert!(fleet
            .command
            .expose()
            .ends_with(" --name edge-$(hostname -s)"));
        let token = JoinToken::parse(text).unwrap();
        assert_eq!(token.id(), record.id);
        assert_eq!(token.pin(), pin());
        assert_eq!(token.text().expose(), text);
        assert_eq!(record.uses_left, 1);
        assert_eq!(record.created, 1_000);
        assert_eq!(record.expires, 1_000 + 3_600);
        // Only the hash is kept, and it is not of the printed text.
        assert!(!record.sha256.contains(&text[JOIN_PREFIX.len()..]));
        assert!(is_lower_hex(&record.sha256, 64));
        // Nothing secret prints.
        for shown in [format!("{line:?}"), format!("{token:?}")] {
            assert!(!shown.contains(&text[22..60]), "{shown}");
        }
        let (other, _) = make(NameRule::Exact("edge".into()), 1);
        assert_ne!(other.token.expose(), text);
    }

    #[test]
    fn parse_refusals_say_which_part_is_wrong() {
        let (line, _) = make(NameRule::Exact("edge".into()), 1);
        let good = line.token.expose().to_owned();
        let id_at = JOIN_PREFIX.len();
        let secret_at = id_at + 13;
        let pin_at = secret_at + 49;
        let with = |at: usize, c: &str| {
            let mut s = good.clone();
            s.replace_range(at..at + 1, c);
            s
        };
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "expected 135 characters, got 0"),
            (good[..good.len() - 1].to_owned(), "got 134"),
            (format!("{good}0"), "got 136"),
            ("x".repeat(100_000), "got 100000"),
            (with(0, "R"), "must start with rna_join_"),
            (with(secret_at - 1, "_"), "three '.'-separated parts"),
            (with(pin_at - 1, "x"), "three '.'-separated parts"),
            (with(id_at, "."), "three '.'-separated parts"),
            (with(id_at, "A"), "id must be 12 lowercase hex"),
            (with(secret_at + 3, "g"), "secret must be 48 lowercase hex"),
            (with(pin_at + 63, "F"), "CA pin must be 64 lowercase hex"),
        ];
        for (text, why) in cases {
            let err = JoinToken::parse(&text).unwrap_err();
            assert_eq!(err.code(), Some(RefusalCode::Malformed), "{text:?}");
            let msg = err.to_string();
            assert!(msg.starts_with("join token is malformed: "), "{msg}");
            assert!(msg.contains(why), "{text:?}: {msg}");
            // A refusal never quotes the token text.
            assert!(!msg.contains(&good[secret_at..secret_at + 48]), "{msg}");
        }
    }

    #[test]
    fn non_ascii_of_the_right_length_is_refused_without_panicking() {
        let text = format!("{JOIN_PREFIX}{}", "é".repeat((JOIN_TOKEN_LEN - 9) / 2));
        let text = format!("{text}{}", "a".repeat(JOIN_TOKEN_LEN - text.len()));
        assert_eq!(text.len(), JOIN_TOKEN_LEN);
        assert_eq!(
            JoinToken::parse(&text).unwrap_err().code(),
            Some(RefusalCode::Malformed)
        );
    }

    #[test]
    fn check_refusals_table() {
        let acme = tenant("acme/prod");
        let other = tenant("other/prod");
        let (line, record) = make(NameRule::Exact("edge".into()), 1);
        let token = JoinToken::parse(line.token.expose()).unwrap();
        let (fleet_line, fleet) = make(NameRule::Prefix("edge-".into()), 3);
        let fleet_token = JoinToken::parse(fleet_line.token.expose()).unwrap();
        let (stranger_line, _) = make(NameRule::Exact("edge".into()), 1);
        let stranger = JoinToken::parse(stranger_line.token.expose()).unwrap();
        let spent = JoinRecord {
            uses_left: 0,
            ..record.clone()
        };
        // A token with the right id but another secret.
        let mut forged_text = line.token.expose().to_owned();
        let pos = JOIN_PREFIX.len() + 13;
        let flipped = if &forged_text[pos..=pos] == "0" {
            "1"
        } else {
            "0"
        };
        forged_text.replace_range(pos..=pos, flipped);
        let forged = JoinToken::parse(&forged_text).unwrap();

        type Case<'a> = (
            &'a JoinRecord,
            &'a JoinToken,
            &'a str,
            Option<&'a Tenant>,
            u64,
            Result<(), (RefusalCode, &'a str)>,
        );
        let cases: Vec<Case> = vec![
            (&record, &token, "edge", None, 1_000, Ok(())),
            (&record, &token, "edge", Some(&acme), 4_599, Ok(())),
            (&fleet, &fleet_token, "edge-7f3a", None, 1_000, Ok(())),
            (&fleet, &fleet_token, "edge-", None, 1_000, Ok(())),
            (
                &record,
                &forged,
                "edge",
                None,
                1_000,
                Err((RefusalCode::Unknown, "join token is not known")),
            ),
            (
                &record,
                &stranger,
                "edge",
                None,
                1_000,
                Err((RefusalCode::Unknown, "join token is not known")),
            ),
            (
                &record,
                &token,
                "edge",
                None,
                4_600,
                Err((RefusalCode::Expired, "expired at 1970-01-01T01:16:40Z")),
            ),
            (
                &spent,
                &token,
                "edge",
                None,
                1_000,
                Err((RefusalCode::Spent, "has already been used")),
            ),
            (
                &record,
                &token,
                "edge",
                Some(&other),
                1_000,
                Err((
                    RefusalCode::TenantMismatch,
                    "is for tenant acme/prod, not other/prod",
                )),
            ),
            (
                &record,
                &token,
                "other",
                None,
                1_000,
                Err((
                    RefusalCode::NameNotAllowed,
                    "may enroll agent edge, not \"other\"",
                )),
            ),
            (
                &record,
                &token,
                "edge2",
                None,
                1_000,
                Err((RefusalCode::NameNotAllowed, "not \"edge2\"")),
            ),
            (
                &fleet,
                &fleet_token,
                "core-1",
                None,
                1_000,
                Err((RefusalCode::NameNotAllowed, "may enroll agent edge-*, not")),
            ),
            (
                &fleet,
                &fleet_token,
                "edge-a.b",
                None,
                1_000,
                Err((RefusalCode::NameNotAllowed, "not \"edge-a.b\"")),
            ),
        ];
        for (record, token, agent, tenant, now, want) in cases {
            let got = record.check(token, agent, tenant, at(now));
            match (got, want) {
                (Ok(admission), Ok(())) => {
                    assert_eq!(admission.agent, agent);
                    assert_eq!(admission.tenant, acme);
                    assert_eq!(admission.token_id, record.id);
                }
                (Err(err), Err((code, text))) => {
                    assert_eq!(err.code(), Some(code), "{agent} {now}: {err}");
                    assert!(err.to_string().contains(text), "{err}");
                }
                (got, want) => panic!("{agent} at {now}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn uses_are_spent_one_by_one_and_refusals_spend_none() {
        let (line, record) = make(NameRule::Prefix("edge-".into()), 2);
        let mut book = JoinBook::default();
        book.insert(record.clone());
        let text = line.token.expose();
        let err = book.redeem(text, "core", None, at(1_000)).unwrap_err();
        assert_eq!(err.code(), Some(RefusalCode::NameNotAllowed));
        assert_eq!(book.get(&record.id).unwrap().uses_left, 2);
        book.redeem(text, "edge-1", None, at(1_000)).unwrap();
        book.redeem(text, "edge-2", None, at(1_000)).unwrap();
        assert_eq!(book.get(&record.id).unwrap().uses_left, 0);
        let err = book.redeem(text, "edge-3", None, at(1_000)).unwrap_err();
        assert_eq!(err.code(), Some(RefusalCode::Spent));
        // An id the hub never made, and text that is no token.
        let (unknown_line, _) = make(NameRule::Exact("edge".into()), 1);
        let err = book
            .redeem(unknown_line.token.expose(), "edge", None, at(1_000))
            .unwrap_err();
        assert_eq!(err.code(), Some(RefusalCode::Unknown));
        let err = book
            .redeem("rna_0123", "edge", None, at(1_000))
            .unwrap_err();
        assert_eq!(err.code(), Some(RefusalCode::Malformed));
    }

    #[test]
    fn create_refuses_bad_requests() {
        let acme = tenant("acme/prod");
        let exact = |n: &str| NameRule::Exact(n.into());
        let cases: Vec<(NewJoin, &str, &str)> = vec![
            (
                NewJoin::new(acme.clone(), exact("")),
                HUB,
                "invalid agent name",
            ),
            (
                NewJoin::new(acme.clone(), exact("a.b")),
                HUB,
                "invalid agent name",
            ),
            (
                NewJoin::new(acme.clone(), NameRule::Prefix("a/".into())),
                HUB,
                "invalid agent name prefix",
            ),
            (
                NewJoin::new(acme.clone(), NameRule::Prefix("a".repeat(63))),
                HUB,
                "invalid agent name prefix",
            ),
            (
                NewJoin {
                    uses: 0,
                    ..NewJoin::new(acme.clone(), exact("edge"))
                },
                HUB,
                "uses must be at least 1",
            ),
            (
                NewJoin {
                    ttl: Duration::ZERO,
                    ..NewJoin::new(acme.clone(), exact("edge"))
                },
                HUB,
                "ttl must be between",
            ),
            (
                NewJoin {
                    ttl: MAX_TTL + Duration::from_secs(1),
                    ..NewJoin::new(acme.clone(), exact("edge"))
                },
                HUB,
                "ttl must be between",
            ),
            (
                NewJoin::new(acme.clone(), exact("edge")),
                "hub",
                "HOST:PORT",
            ),
            (
                NewJoin::new(acme.clone(), exact("edge")),
                "hub:0",
                "HOST:PORT",
            ),
            (
                NewJoin::new(acme.clone(), exact("edge")),
                "hub:70000",
                "HOST:PORT",
            ),
            (
                NewJoin::new(acme.clone(), exact("edge")),
                ":443",
                "HOST:PORT",
            ),
            (
                NewJoin::new(acme.clone(), exact("edge")),
                "h;rm -rf:443",
                "HOST:PORT",
            ),
            (
                NewJoin::new(acme.clone(), exact("edge")),
                "::1:443",
                "HOST:PORT",
            ),
        ];
        for (new, hub, why) in cases {
            let err = create(new.clone(), pin(), hub, at(1_000)).unwrap_err();
            assert!(
                matches!(err, EnrollError::CannotCreate { .. }),
                "{new:?} {hub}"
            );
            assert!(err.to_string().contains(why), "{hub}: {err}");
        }
        for hub in ["[::1]:443", "10.0.0.1:8443", "hub-1.example.com:1"] {
            create(NewJoin::new(acme.clone(), exact("edge")), pin(), hub, at(0)).unwrap();
        }
        // A sub-second ttl rounds up.
        let (_, record) = create(
            NewJoin {
                ttl: Duration::from_millis(1_500),
                ..NewJoin::new(acme, exact("edge"))
            },
            pin(),
            HUB,
            at(10),
        )
        .unwrap();
        assert_eq!(record.expires, 12);
    }

    #[test]
    fn records_persist_and_bad_files_are_refused() {
        let (_, one) = make(NameRule::Exact("edge".into()), 1);
        let (_, two) = make(NameRule::Prefix("edge-".into()), 5);
        let mut book = JoinBook::default();
        book.insert(one.clone());
        book.insert(two.clone());
        let json = serde_json::to_string(&book).unwrap();
        assert!(json.contains("\"exact\":\"edge\""), "{json}");
        assert!(json.contains("\"prefix\":\"edge-\""), "{json}");
        let back: JoinBook = serde_json::from_str(&json).unwrap();
        assert_eq!(back, book);
        let toml_text = toml::to_string(&one).unwrap();
        assert_eq!(toml::from_str::<JoinRecord>(&toml_text).unwrap(), one);

        let twice = serde_json::to_string(&vec![one.clone(), one.clone()]).unwrap();
        let err = serde_json::from_str::<JoinBook>(&twice).unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
        let bad_hash = JoinRecord {
            sha256: "XYZ".into(),
            ..one.clone()
        };
        let err = serde_json::from_str::<JoinBook>(&serde_json::to_string(&[bad_hash]).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("64 lowercase hex"), "{err}");
        let bad_name = JoinRecord {
            name: NameRule::Exact("a b".into()),
            ..one
        };
        let err = serde_json::from_str::<JoinBook>(&serde_json::to_string(&[bad_name]).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("invalid agent name"), "{err}");
        let extra = json.replacen("\"uses_left\"", "\"surprise\":1,\"uses_left\"", 1);
        assert!(serde_json::from_str::<JoinBook>(&extra).is_err());
    }

    #[test]
    fn ca_pin_text_round_trips() {
        let pin = pin();
        let text = pin.to_string();
        assert!(text.starts_with("sha256:") && text.len() == 71, "{text}");
        assert_eq!(text.parse::<CaPin>().unwrap(), pin);
        assert_eq!(pin.to_hex().parse::<CaPin>().unwrap(), pin);
        for bad in ["", "sha256:", "sha1:00", &text.to_uppercase(), &text[..70]] {
            assert!(bad.parse::<CaPin>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&pin).unwrap();
        assert_eq!(serde_json::from_str::<CaPin>(&json).unwrap(), pin);
    }
}
