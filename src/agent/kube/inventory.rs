//! The inventory the agent reports: server version, node count, the namespaces and API
//! resources its allow list lets callers use, and what could not be collected.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIGroup, APIResourceList};
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use tracing::warn;

use super::{from_kube, KubeAllow, KubeExecutor};
use crate::proto::kube::{Inventory, ResourceInfo};

/// How long a collected inventory is handed out again instead of asking the API server,
/// however many hubs ask.
const REUSE: Duration = Duration::from_secs(10);

/// The namespaces to report from the names the API server listed: those the allow list
/// permits, sorted so that reports compare equal when nothing changed.
fn visible_namespaces(
    names: impl IntoIterator<Item = Option<String>>,
    allow: &KubeAllow,
) -> Vec<String> {
    let mut names: Vec<String> = names
        .into_iter()
        .flatten()
        .filter(|n| allow.allows_namespace(n))
        .collect();
    names.sort();
    names
}

/// The namespaces to report when they cannot be listed: the allow list's own, if it names
/// any, since those are all a caller can act in; otherwise unknown.
fn namespaces_unlisted(allow: &KubeAllow) -> Option<Vec<String>> {
    (!allow.namespaces.is_empty()).then(|| allow.namespaces.clone())
}

/// The version of an API group the inventory describes: its preferred one, else the first
/// it serves.
fn preferred_version(group: APIGroup) -> Option<String> {
    group
        .preferred_version
        .map(|p| p.version)
        .or_else(|| group.versions.first().map(|v| v.version.clone()))
}

/// The resources of one group version that the allow list permits, in discovery order;
/// subresources (`deployments/scale`) are not resources of their own.
fn allowed_resources(
    group: &str,
    version: &str,
    list: APIResourceList,
    allow: &KubeAllow,
) -> Vec<ResourceInfo> {
    list.resources
        .into_iter()
        .filter(|r| !r.name.contains('/') && allow.allows_resource(group, &r.name))
        .map(|r| ResourceInfo {
            group: group.to_string(),
            version: version.to_string(),
            kind: r.kind,
            plural: r.name,
            singular: r.singular_name,
            namespaced: r.namespaced,
            verbs: r.verbs,
            short_names: r.short_names.unwrap_or_default(),
        })
        .collect()
}

impl KubeExecutor {
    /// The inventory, collected at most once per ten seconds however many hubs ask.
    pub async fn inventory(&self) -> Inventory {
        let mut cached = self.inventory.lock().await;
        if let Some((at, inv)) = cached.as_ref() {
            if at.elapsed() < REUSE {
                return inv.clone();
            }
        }
        let inv = self.collect_inventory().await;
        *cached = Some((Instant::now(), inv.clone()));
        inv
    }

    /// Forces the next [`inventory`](Self::inventory) to collect anew.
    pub async fn invalidate_inventory(&self) {
        *self.inventory.lock().await = None;
    }

    async fn collect_inventory(&self) -> Inventory {
        let mut inv = Inventory {
            collected_unix: crate::auth::unix_now(std::time::SystemTime::now()),
            ..Default::default()
        };
        match self.client.apiserver_version().await {
            Ok(v) => {
                inv.server_version = Some(v.git_version);
                inv.platform = Some(v.platform);
            }
            Err(e) => inv.errors.push(format!("server version: {e}")),
        }
        // Node count is informative only: RBAC decides whether it can be read.
        let nodes = ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "Node".into(),
            plural: "nodes".into(),
        };
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &nodes);
        match api.list_metadata(&ListParams::default()).await {
            Ok(list) => inv.node_count = Some(list.items.len() as u64),
            Err(e) => inv.errors.push(format!("nodes: {}", from_kube(e).message)),
        }
        let namespaces = ApiResource {
            kind: "Namespace".into(),
            plural: "namespaces".into(),
            ..nodes
        };
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &namespaces);
        match api.list_metadata(&ListParams::default()).await {
            Ok(list) => {
                let names = list.items.into_iter().map(|o| o.metadata.name);
                inv.namespaces = Some(visible_namespaces(names, &self.allow));
            }
            Err(e) => {
                inv.errors
                    .push(format!("namespaces: {}", from_kube(e).message));
                if let Some(names) = namespaces_unlisted(&self.allow) {
                    inv.namespaces = Some(names);
                }
            }
        }
        match self.resources().await {
            Ok(resources) => inv.resources = resources,
            Err(e) => inv.errors.push(format!("discovery: {e}")),
        }
        inv
    }

    /// Every resource of every group's preferred version that the allow list permits.
    async fn resources(&self) -> Result<Vec<ResourceInfo>, kube::Error> {
        let mut versions = Vec::new();
        let core = self.client.list_core_api_versions().await?;
        for v in core.versions {
            versions.push((String::new(), v));
        }
        let groups = self.client.list_api_groups().await?;
        for g in groups.groups {
            let name = g.name.clone();
            if let Some(version) = preferred_version(g) {
                versions.push((name, version));
            }
        }
        let mut out = Vec::new();
        for (group, version) in versions {
            let listed = if group.is_empty() {
                self.client.list_core_api_resources(&version).await
            } else {
                self.client
                    .list_api_group_resources(&format!("{group}/{version}"))
                    .await
            };
            match listed {
                Ok(list) => out.extend(allowed_resources(&group, &version, list, &self.allow)),
                // An aggregated API that is down must not hide every other resource.
                Err(e) => warn!(group = %group, version = %version, "discovery failed: {e}"),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIResource, GroupVersionForDiscovery};

    fn allow(namespaces: &[&str], resources: &[&str]) -> KubeAllow {
        KubeAllow {
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            resources: resources.iter().map(|r| r.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn namespaces_are_filtered_and_sorted() {
        let listed = || {
            ["shop", "default", "kube-system", "audit"]
                .map(|n| Some(n.to_string()))
                .into_iter()
                .chain([None])
        };
        let table: [(&[&str], &[&str]); 3] = [
            (&[], &["audit", "default", "kube-system", "shop"]),
            (&["shop", "audit", "gone"], &["audit", "shop"]),
            (&["elsewhere"], &[]),
        ];
        for (allowed, want) in table {
            assert_eq!(
                visible_namespaces(listed(), &allow(allowed, &[])),
                want,
                "{allowed:?}"
            );
        }
    }

    #[test]
    fn unlistable_namespaces_fall_back_to_the_allow_list() {
        assert_eq!(namespaces_unlisted(&allow(&[], &[])), None);
        assert_eq!(
            namespaces_unlisted(&allow(&["shop", "audit"], &[])),
            Some(vec!["shop".to_string(), "audit".to_string()])
        );
    }

    #[test]
    fn the_preferred_version_wins_else_the_first() {
        let gv = |v: &str| GroupVersionForDiscovery {
            group_version: format!("apps/{v}"),
            version: v.into(),
        };
        let group = |preferred: Option<&str>, versions: &[&str]| APIGroup {
            name: "apps".into(),
            preferred_version: preferred.map(gv),
            versions: versions.iter().map(|v| gv(v)).collect(),
            ..Default::default()
        };
        let table = [
            (group(Some("v1"), &["v1beta1", "v1"]), Some("v1")),
            (group(None, &["v1beta2", "v1"]), Some("v1beta2")),
            (group(None, &[]), None),
        ];
        for (g, want) in table {
            assert_eq!(preferred_version(g).as_deref(), want);
        }
    }

    #[test]
    fn resources_follow_the_allow_list_in_discovery_order() {
        let resource = |name: &str, kind: &str| APIResource {
            name: name.into(),
            singular_name: kind.to_lowercase(),
            kind: kind.into(),
            namespaced: true,
            verbs: vec!["get".into(), "list".into()],
            short_names: (name == "deployments").then(|| vec!["deploy".to_string()]),
            ..Default::default()
        };
        let list = || APIResourceList {
            group_version: "apps/v1".into(),
            resources: vec![
                resource("statefulsets", "StatefulSet"),
                resource("deployments", "Deployment"),
                resource("deployments/scale", "Scale"),
                resource("daemonsets", "DaemonSet"),
            ],
        };
        let plurals = |rules: &[&str], group: &str| -> Vec<String> {
            allowed_resources(group, "v1", list(), &allow(&[], rules))
                .into_iter()
                .map(|r| r.plural)
                .collect()
        };
        let table: [(&[&str], &str, &[&str]); 5] = [
            (&[], "apps", &["statefulsets", "deployments", "daemonsets"]),
            (&["deployments.apps"], "apps", &["deployments"]),
            (&["deployments.apps"], "", &[]),
            (
                &["*.apps", "configmaps"],
                "apps",
                &["statefulsets", "deployments", "daemonsets"],
            ),
            (
                &["daemonsets", "statefulsets"],
                "apps",
                &["statefulsets", "daemonsets"],
            ),
        ];
        for (rules, group, want) in table {
            assert_eq!(plurals(rules, group), want, "{rules:?} in {group:?}");
        }
        let all = allowed_resources("apps", "v1", list(), &allow(&[], &[]));
        let deploy = &all[1];
        assert_eq!(
            (
                deploy.group.as_str(),
                deploy.version.as_str(),
                deploy.kind.as_str()
            ),
            ("apps", "v1", "Deployment")
        );
        assert_eq!(deploy.singular, "deployment");
        assert!(deploy.namespaced);
        assert_eq!(deploy.verbs, ["get", "list"]);
        assert_eq!(deploy.short_names, ["deploy"]);
        assert!(all[0].short_names.is_empty());
    }
}
