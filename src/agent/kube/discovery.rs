//! Kind → resource mapping through the API server's discovery documents, cached per API
//! version and fetched again on a miss, so custom resources work as soon as their CRD is
//! served, with no code change.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList;
use kube::api::ApiResource;
use kube::core::GroupVersionKind;
use kube::Client;

/// A resolved resource: what kube needs to build requests, and what the allow list checks.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Group, version, kind and plural.
    pub resource: ApiResource,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Verbs the server supports.
    pub verbs: Vec<String>,
}

/// Why a kind could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The server does not serve this API version.
    #[error("the server does not serve API version {0:?}")]
    NoVersion(String),
    /// The API version exists but has no such kind or resource name.
    #[error("API version {api_version:?} has no kind or resource named {kind:?}")]
    NoKind {
        /// The API version searched.
        api_version: String,
        /// The name asked for.
        kind: String,
    },
    /// The API version is malformed.
    #[error("invalid apiVersion {0:?}")]
    BadVersion(String),
    /// The discovery request failed.
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// Discovery documents by API version.
#[derive(Debug, Default)]
pub struct DiscoveryCache {
    lists: Mutex<HashMap<String, APIResourceList>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Splits `apps/v1` into (`apps`, `v1`) and `v1` into (`""`, `v1`).
pub fn split_api_version(api_version: &str) -> Result<(&str, &str), DiscoveryError> {
    let bad = || DiscoveryError::BadVersion(api_version.to_string());
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) if !g.is_empty() => (g, v),
        Some(_) => return Err(bad()),
        None => ("", api_version),
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    if !ok(version) || (!group.is_empty() && !ok(group)) {
        return Err(bad());
    }
    Ok((group, version))
}

/// Finds `name` in a discovery list: the kind exactly, else the kind, plural, singular or a
/// short name without regard to case. Subresources (`deployments/scale`) never match.
pub fn find(list: &APIResourceList, name: &str) -> Option<usize> {
    let main =
        |r: &&k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResource| !r.name.contains('/');
    let exact = list
        .resources
        .iter()
        .position(|r| main(&r) && r.kind == name);
    exact.or_else(|| {
        list.resources.iter().position(|r| {
            main(&r)
                && (r.kind.eq_ignore_ascii_case(name)
                    || r.name.eq_ignore_ascii_case(name)
                    || r.singular_name.eq_ignore_ascii_case(name)
                    || r.short_names
                        .as_ref()
                        .is_some_and(|s| s.iter().any(|n| n.eq_ignore_ascii_case(name))))
        })
    })
}

impl DiscoveryCache {
    /// Resolves `kind` (or a resource name) in `api_version`, fetching the version's discovery
    /// document when it is not cached or does not know the name (a CRD created since).
    pub async fn resolve(
        &self,
        client: &Client,
        api_version: &str,
        kind: &str,
    ) -> Result<Resolved, DiscoveryError> {
        let (group, version) = split_api_version(api_version)?;
        if let Some(hit) = self.lookup(api_version, group, version, kind) {
            return Ok(hit);
        }
        let list = fetch(client, group, api_version, version).await?;
        lock(&self.lists).insert(api_version.to_string(), list);
        self.lookup(api_version, group, version, kind)
            .ok_or_else(|| DiscoveryError::NoKind {
                api_version: api_version.to_string(),
                kind: kind.to_string(),
            })
    }

    /// Forgets everything (after a CRD change, discovery is read again on next use).
    pub fn clear(&self) {
        lock(&self.lists).clear();
    }

    fn lookup(
        &self,
        api_version: &str,
        group: &str,
        version: &str,
        kind: &str,
    ) -> Option<Resolved> {
        let lists = lock(&self.lists);
        let list = lists.get(api_version)?;
        let r = &list.resources[find(list, kind)?];
        let gvk = GroupVersionKind::gvk(group, version, &r.kind);
        Some(Resolved {
            resource: ApiResource::from_gvk_with_plural(&gvk, &r.name),
            namespaced: r.namespaced,
            verbs: r.verbs.clone(),
        })
    }
}

/// Reads the discovery document of one API version; a 404 means the server does not serve it.
async fn fetch(
    client: &Client,
    group: &str,
    api_version: &str,
    version: &str,
) -> Result<APIResourceList, DiscoveryError> {
    let fetched = if group.is_empty() {
        client.list_core_api_resources(version).await
    } else {
        client.list_api_group_resources(api_version).await
    };
    match fetched {
        Ok(list) => Ok(list),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            Err(DiscoveryError::NoVersion(api_version.to_string()))
        }
        Err(e) => Err(DiscoveryError::Api(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResource;

    fn resource(name: &str, kind: &str, short: &[&str]) -> APIResource {
        APIResource {
            name: name.into(),
            singular_name: kind.to_lowercase(),
            kind: kind.into(),
            namespaced: true,
            verbs: vec!["get".into()],
            short_names: Some(short.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn names_resolve_like_kubectl() {
        let list = APIResourceList {
            group_version: "apps/v1".into(),
            resources: vec![
                resource("deployments", "Deployment", &["deploy"]),
                resource("deployments/scale", "Scale", &[]),
                resource("statefulsets", "StatefulSet", &["sts"]),
            ],
        };
        let table = [
            ("Deployment", Some(0)),
            ("deployment", Some(0)),
            ("deployments", Some(0)),
            ("deploy", Some(0)),
            ("sts", Some(2)),
            ("Scale", None),
            ("pods", None),
        ];
        for (name, want) in table {
            assert_eq!(find(&list, name), want, "{name}");
        }
    }

    #[test]
    fn api_versions_split() {
        assert_eq!(split_api_version("v1").unwrap(), ("", "v1"));
        assert_eq!(split_api_version("apps/v1").unwrap(), ("apps", "v1"));
        for bad in ["", "/v1", "apps/", "a b/v1", "apps/v1/x"] {
            assert!(split_api_version(bad).is_err(), "{bad}");
        }
    }
}
