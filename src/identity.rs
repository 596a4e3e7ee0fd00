//! Identity rules shared by every layer: agent names, tenants, and the masked secret a token
//! travels in. A leaf below `proto` (whose `Hello` carries a name and a [`Secret`]), `auth`
//! (tokens belong to a tenant) and `certs` (a certificate's common name is an agent name), so
//! none of them imports another for these rules.

use std::fmt;
use std::str::FromStr;

/// The longest agent name: one DNS label, so names fit in host names and SNI-like places.
const MAX_AGENT_NAME: usize = 63;

/// Whether `name` is a valid agent identifier: `^[A-Za-z0-9_-]{1,63}$`.
pub fn valid_agent_name(name: &str) -> bool {
    (1..=MAX_AGENT_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An `organization/environment` pair that owns agents and tokens; each part matches
/// `^[A-Za-z0-9_.-]{1,63}$`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Tenant(String);

/// The longest organization or environment name.
const TENANT_PART_MAX: usize = 63;

/// A string that is not a valid [`Tenant`]; the message says which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseTenantError {
    /// The whole message, quoting the input.
    message: String,
}

impl Tenant {
    /// The tenant as `organization/environment`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Tenant {
    type Err = ParseTenantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |why: String| ParseTenantError {
            message: format!("tenant {s:?} {why}"),
        };
        let mut parts = s.split('/');
        let (Some(organization), Some(environment), None) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(fail("must be organization/environment".into()));
        };
        for (what, part) in [("organization", organization), ("environment", environment)] {
            if part.is_empty() || part.len() > TENANT_PART_MAX {
                return Err(fail(format!(
                    "must be organization/environment: {what} must be 1 to \
                     {TENANT_PART_MAX} characters"
                )));
            }
            if !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            {
                return Err(fail(format!(
                    "must be organization/environment: {what} may only contain letters, \
                     digits, '_', '.' and '-'"
                )));
            }
        }
        Ok(Tenant(s.to_owned()))
    }
}

impl TryFrom<String> for Tenant {
    type Error = ParseTenantError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Tenant> for String {
    fn from(tenant: Tenant) -> Self {
        tenant.0
    }
}

/// A secret string (a token) that never prints: `Debug` and `Display` show `MASKED`.
///
/// It serializes as the plain string because the wire has to carry it; deliberately no
/// `PartialEq`, so nobody compares secrets in variable time.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret string.
    pub fn new(s: String) -> Self {
        Secret(s)
    }

    /// The secret text, for sending or verifying; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_name_table() {
        let (longest, too_long) = ("a".repeat(63), "a".repeat(64));
        let table: &[(&str, bool)] = &[
            ("edge-1", true),
            ("A_b-9", true),
            (&longest, true),
            ("", false),
            (&too_long, false),
            ("dot.ted", false),
            ("slash/x", false),
            ("space x", false),
            ("ünïcode", false),
        ];
        for &(name, ok) in table {
            assert_eq!(valid_agent_name(name), ok, "{name:?}");
        }
    }

    #[test]
    fn tenant_table() {
        let part63 = "a".repeat(63);
        let part64 = "a".repeat(64);
        let ok = [
            "acme/prod".to_owned(),
            "Acme-Corp/eu_west.1".to_owned(),
            "a/b".to_owned(),
            format!("{part63}/{part63}"),
        ];
        for input in &ok {
            let tenant: Tenant = input.parse().unwrap();
            assert_eq!(tenant.as_str(), input);
            assert_eq!(tenant.to_string(), *input);
        }
        let bad = [
            ("acme".to_owned(), "must be organization/environment"),
            ("".to_owned(), "must be organization/environment"),
            ("a/b/c".to_owned(), "must be organization/environment"),
            ("/prod".to_owned(), "organization must be 1 to 63"),
            ("acme/".to_owned(), "environment must be 1 to 63"),
            ("/".to_owned(), "organization must be 1 to 63"),
            (format!("{part64}/prod"), "organization must be 1 to 63"),
            (format!("acme/{part64}"), "environment must be 1 to 63"),
            ("ac me/prod".to_owned(), "organization may only contain"),
            ("acme/pröd".to_owned(), "environment may only contain"),
            ("acme/prod\n".to_owned(), "environment may only contain"),
            ("acme:x/prod".to_owned(), "organization may only contain"),
        ];
        for (input, why) in &bad {
            let err = input.parse::<Tenant>().unwrap_err().to_string();
            assert!(err.starts_with(&format!("tenant {input:?} ")), "{err}");
            assert!(err.contains(why), "{input:?}: {err}");
        }
        assert_eq!(
            "acme".parse::<Tenant>().unwrap_err().to_string(),
            r#"tenant "acme" must be organization/environment"#
        );
    }

    #[test]
    fn tenant_serde_is_a_validated_string() {
        let tenant: Tenant = serde_json::from_str("\"acme/prod\"").unwrap();
        assert_eq!(tenant.as_str(), "acme/prod");
        assert_eq!(serde_json::to_string(&tenant).unwrap(), "\"acme/prod\"");
        let err = serde_json::from_str::<Tenant>("\"acme\"").unwrap_err();
        assert!(
            err.to_string().contains("organization/environment"),
            "{err}"
        );
    }

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("hunter2-very-secret".into());
        for text in [
            format!("{secret:?}"),
            format!("{secret}"),
            format!("{secret:#?}"),
        ] {
            assert_eq!(text, "MASKED");
        }
        assert_eq!(
            format!("{:?}", Some(secret.clone())),
            "Some(MASKED)",
            "nested Debug stays masked"
        );
        assert_eq!(secret.expose(), "hunter2-very-secret");
        // The wire carries the plain string.
        let json = serde_json::to_string(&secret).unwrap();
        assert_eq!(json, "\"hunter2-very-secret\"");
        let back: Secret = serde_json::from_str(&json).unwrap();
        assert_eq!(back.expose(), "hunter2-very-secret");
    }
}
