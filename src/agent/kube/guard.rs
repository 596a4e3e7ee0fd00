//! The agent's own credentials: no Kubernetes command reads or changes the Secrets the agent
//! runs with (its TLS key and hub token), and none hands out or mints a ServiceAccount token,
//! whatever the caller's scope. Reading them would let a caller become the agent (the token
//! is a SOCKS password, the key its identity) or act in the cluster past the hub's audit.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// The Secrets the shipped manifest (`deploy/kubernetes/agent.yaml`) mounts into the agent's
/// pod, protected when no list is configured: they live in the agent's own namespace.
pub const DEFAULT_PROTECTED_SECRETS: [&str; 2] = ["rna-agent-tls", "rna-agent-token"];

/// The Secret type whose data the token controller fills with a ServiceAccount's token.
pub const SERVICE_ACCOUNT_TOKEN: &str = "kubernetes.io/service-account-token";

/// One `--kube-protected-secret` entry: `name` (in the agent's own namespace) or
/// `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The namespace; `None` is the agent's own (its identity's default namespace).
    pub namespace: Option<String>,
    /// The Secret's name.
    pub name: String,
}

impl FromStr for SecretRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (namespace, name) = match s.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, s),
        };
        // Secret names are DNS subdomains, namespaces DNS labels (RFC 1123).
        let valid = |n: &str, max: usize, dots: bool| {
            !n.is_empty()
                && n.len() <= max
                && n.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.')
                })
                && !n.starts_with(['-', '.'])
                && !n.ends_with(['-', '.'])
        };
        if !valid(name, 253, true) || namespace.is_some_and(|ns| !valid(ns, 63, false)) {
            return Err(format!(
                "invalid Secret {s:?}: expected NAME (in the agent's namespace) or NAMESPACE/NAME"
            ));
        }
        Ok(SecretRef {
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The default list: [`DEFAULT_PROTECTED_SECRETS`] in the agent's own namespace.
pub fn default_protected() -> Vec<SecretRef> {
    DEFAULT_PROTECTED_SECRETS
        .iter()
        .map(|name| SecretRef {
            namespace: None,
            name: (*name).to_string(),
        })
        .collect()
}

/// Whether a resolved resource is core Secrets.
pub fn is_secrets(group: &str, plural: &str) -> bool {
    group.is_empty() && plural == "secrets"
}

/// The protected Secrets with their namespaces resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretGuard {
    /// (namespace, name) pairs.
    protected: Vec<(String, String)>,
}

impl SecretGuard {
    /// Resolves `list` against the agent's own namespace.
    pub fn new(list: &[SecretRef], own_namespace: &str) -> SecretGuard {
        SecretGuard {
            protected: list
                .iter()
                .map(|r| {
                    (
                        r.namespace.as_deref().unwrap_or(own_namespace).to_string(),
                        r.name.clone(),
                    )
                })
                .collect(),
        }
    }

    /// Why the Secret `namespace/name` may not be touched, if it is one of the agent's own.
    pub fn refuses_name(&self, namespace: &str, name: &str) -> Option<String> {
        self.protected
            .iter()
            .any(|(ns, n)| ns == namespace && n == name)
            .then(|| {
                format!(
                    "secret {namespace}/{name} holds this agent's own credentials: the agent \
                     never reads or changes it (kube_protected_secret)"
                )
            })
    }

    /// Why a Secret object (as JSON) may not be handed out or written: one of the agent's
    /// own, or a ServiceAccount token.
    pub fn refuses_object(&self, object: &Value) -> Option<String> {
        let meta = object.get("metadata");
        let field = |v: Option<&Value>, f: &str| {
            v.and_then(|m| m.get(f))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let namespace = field(meta, "namespace");
        let name = field(meta, "name");
        if let Some(why) = self.refuses_name(&namespace, &name) {
            return Some(why);
        }
        (object.get("type").and_then(Value::as_str) == Some(SERVICE_ACCOUNT_TOKEN)).then(|| {
            format!(
                "secret {namespace}/{name} is a ServiceAccount token ({SERVICE_ACCOUNT_TOKEN}): \
                 the agent never hands out or mints Kubernetes credentials"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_parse() {
        let ok = [
            ("rna-agent-tls", None, "rna-agent-tls"),
            (
                "rna-system/rna-agent-token",
                Some("rna-system"),
                "rna-agent-token",
            ),
            ("ns/a.b-c", Some("ns"), "a.b-c"),
        ];
        for (s, ns, name) in ok {
            let r: SecretRef = s.parse().unwrap();
            assert_eq!((r.namespace.as_deref(), r.name.as_str()), (ns, name), "{s}");
            assert_eq!(r.to_string(), s);
        }
        for bad in ["", "/x", "ns/", "Upper", "a/b/c", "ns.x/y", "-a", "a_b"] {
            assert!(bad.parse::<SecretRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_guard_knows_own_secrets_and_service_account_tokens() {
        let guard = SecretGuard::new(
            &[
                "rna-agent-token".parse().unwrap(),
                "vault/rna-agent-tls".parse().unwrap(),
            ],
            "rna-system",
        );
        assert!(guard
            .refuses_name("rna-system", "rna-agent-token")
            .is_some());
        assert!(guard.refuses_name("default", "rna-agent-token").is_none());
        assert!(guard.refuses_name("vault", "rna-agent-tls").is_some());
        assert!(guard.refuses_name("rna-system", "rna-agent-tls").is_none());
        let own = json!({"metadata": {"namespace": "rna-system", "name": "rna-agent-token"}});
        assert!(guard.refuses_object(&own).is_some());
        let sa =
            json!({"metadata": {"namespace": "shop", "name": "t"}, "type": SERVICE_ACCOUNT_TOKEN});
        assert!(guard.refuses_object(&sa).is_some());
        let plain = json!({"metadata": {"namespace": "shop", "name": "db"}, "type": "Opaque"});
        assert!(guard.refuses_object(&plain).is_none());
        assert_eq!(default_protected().len(), 2);
    }
}
