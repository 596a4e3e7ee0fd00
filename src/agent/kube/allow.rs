//! The agent's own limit on Kubernetes commands (`--kube-namespace`, `--kube-resource`),
//! checked before any call to the API server. RBAC stays the real boundary; this list lets
//! the agent's operator narrow it further without touching the cluster's roles.

use std::fmt;
use std::str::FromStr;

/// One `--kube-resource` entry: `plural` (any group) or `plural.group` (`deployments.apps`,
/// `widgets.example.com`); `*.group` allows every resource of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRule {
    /// Plural resource name, or `*`.
    pub plural: String,
    /// API group; `None` matches any group (the core group included).
    pub group: Option<String>,
}

impl FromStr for ResourceRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (plural, group) = match s.split_once('.') {
            Some((p, g)) => (p, Some(g)),
            None => (s, None),
        };
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.len() <= 253
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        };
        if !(plural == "*" || valid_name(plural)) || group.is_some_and(|g| !valid_name(g)) {
            return Err(format!(
                "invalid resource {s:?}: expected a plural resource name, optionally with its \
                 group (deployments.apps, configmaps, widgets.example.com, *.example.com)"
            ));
        }
        Ok(ResourceRule {
            plural: plural.to_string(),
            group: group.map(str::to_string),
        })
    }
}

impl fmt::Display for ResourceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.group {
            Some(g) => write!(f, "{}.{g}", self.plural),
            None => f.write_str(&self.plural),
        }
    }
}

impl ResourceRule {
    fn matches(&self, group: &str, plural: &str) -> bool {
        (self.plural == "*" || self.plural == plural)
            && self.group.as_deref().is_none_or(|g| g == group)
    }
}

/// Namespaces and resources the agent will act on; empty lists mean "all that RBAC allows".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeAllow {
    /// Namespaces (`--kube-namespace`).
    pub namespaces: Vec<String>,
    /// Resources (`--kube-resource`).
    pub resources: Vec<ResourceRule>,
}

/// What a command touches, for the allow check.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// API group (`""` for core).
    pub group: &'a str,
    /// Plural resource name.
    pub plural: &'a str,
    /// Whether the resource is namespaced.
    pub namespaced: bool,
    /// The namespace (`None`: all namespaces, for a list).
    pub namespace: Option<&'a str>,
    /// Object name (`None` for a list).
    pub name: Option<&'a str>,
}

impl KubeAllow {
    /// Whether anything is restricted.
    pub fn is_open(&self) -> bool {
        self.namespaces.is_empty() && self.resources.is_empty()
    }

    /// Whether the resource (group, plural) is on the list.
    pub fn allows_resource(&self, group: &str, plural: &str) -> bool {
        self.resources.is_empty() || self.resources.iter().any(|r| r.matches(group, plural))
    }

    /// Whether objects in `namespace` may be touched.
    pub fn allows_namespace(&self, namespace: &str) -> bool {
        self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace)
    }

    /// Checks a command's target; the error says which list refused it.
    ///
    /// With a namespace list, namespaced objects must be in a listed namespace (and a list
    /// must name one), a `Namespace` object must be a listed one, and other cluster-scoped
    /// resources are refused unless `--kube-resource` names them explicitly.
    pub fn check(&self, t: Target<'_>) -> Result<(), String> {
        let resource = if t.group.is_empty() {
            t.plural.to_string()
        } else {
            format!("{}.{}", t.plural, t.group)
        };
        if !self.allows_resource(t.group, t.plural) {
            return Err(format!(
                "resource {resource} is not in the agent's --kube-resource list"
            ));
        }
        if self.namespaces.is_empty() {
            return Ok(());
        }
        if t.namespaced {
            return match t.namespace {
                Some(ns) if self.allows_namespace(ns) => Ok(()),
                Some(ns) => Err(format!(
                    "namespace {ns:?} is not in the agent's --kube-namespace list"
                )),
                None => Err(
                    "the agent is limited to some namespaces (--kube-namespace): name one".into(),
                ),
            };
        }
        if t.group.is_empty() && t.plural == "namespaces" {
            return match t.name {
                Some(name) if self.allows_namespace(name) => Ok(()),
                Some(name) => Err(format!(
                    "namespace {name:?} is not in the agent's --kube-namespace list"
                )),
                // A list is filtered to the allowed namespaces afterwards.
                None => Ok(()),
            };
        }
        let explicit = self
            .resources
            .iter()
            .any(|r| r.plural == t.plural && r.group.as_deref().is_none_or(|g| g == t.group));
        if explicit {
            Ok(())
        } else {
            Err(format!(
                "cluster-scoped resource {resource} is refused while the agent is limited to \
                 some namespaces; name it in --kube-resource to allow it"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target<'a>(
        group: &'a str,
        plural: &'a str,
        namespaced: bool,
        namespace: Option<&'a str>,
        name: Option<&'a str>,
    ) -> Target<'a> {
        Target {
            group,
            plural,
            namespaced,
            namespace,
            name,
        }
    }

    #[test]
    fn rules_parse() {
        let ok = [
            ("deployments.apps", "deployments", Some("apps")),
            ("configmaps", "configmaps", None),
            ("widgets.example.com", "widgets", Some("example.com")),
            ("*.example.com", "*", Some("example.com")),
        ];
        for (s, plural, group) in ok {
            let r: ResourceRule = s.parse().unwrap();
            assert_eq!(
                (r.plural.as_str(), r.group.as_deref()),
                (plural, group),
                "{s}"
            );
            assert_eq!(r.to_string(), s);
        }
        for bad in ["", "Deployments", "deploy ments", "a.", ".apps", "a/b"] {
            assert!(bad.parse::<ResourceRule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn checks_follow_both_lists() {
        let open = KubeAllow::default();
        assert!(open
            .check(target("", "nodes", false, None, Some("n1")))
            .is_ok());

        let allow = KubeAllow {
            namespaces: vec!["shop".into()],
            resources: vec![
                "deployments.apps".parse().unwrap(),
                "configmaps".parse().unwrap(),
                "namespaces".parse().unwrap(),
                "*.example.com".parse().unwrap(),
            ],
        };
        // (target, allowed)
        let table = [
            (
                target("apps", "deployments", true, Some("shop"), Some("web")),
                true,
            ),
            (
                target("apps", "deployments", true, Some("kube-system"), Some("x")),
                false,
            ),
            (target("apps", "deployments", true, None, None), false),
            (target("", "configmaps", true, Some("shop"), None), true),
            (target("", "secrets", true, Some("shop"), Some("s")), false),
            (
                target("apps", "statefulsets", true, Some("shop"), Some("s")),
                false,
            ),
            (
                target("example.com", "widgets", true, Some("shop"), Some("w")),
                true,
            ),
            (target("", "namespaces", false, None, Some("shop")), true),
            (target("", "namespaces", false, None, Some("other")), false),
            (target("", "namespaces", false, None, None), true),
            (target("", "nodes", false, None, None), false),
        ];
        for (t, want) in table {
            assert_eq!(allow.check(t).is_ok(), want, "{t:?}");
        }
        // Cluster-scoped resources named explicitly are allowed despite the namespace list.
        let crd = KubeAllow {
            namespaces: vec!["shop".into()],
            resources: vec!["customresourcedefinitions.apiextensions.k8s.io"
                .parse()
                .unwrap()],
        };
        assert!(crd
            .check(target(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                false,
                None,
                Some("widgets.example.com")
            ))
            .is_ok());
    }
}
