//! Reads: get one object, or list a kind, within the allow list and never handing out the
//! agent's own Secrets or ServiceAccount tokens.

use kube::api::ListParams;
use serde_json::{json, Value};

use super::{bad_request, from_kube, typed, KubeExecutor, KubeFailure};
use crate::proto::kube::ObjectRef;

impl KubeExecutor {
    /// Gets one object, with apiVersion and kind filled in.
    pub(super) async fn get(&self, target: &ObjectRef) -> Result<String, KubeFailure> {
        if target.name.is_empty() {
            return Err(bad_request("get needs an object name"));
        }
        let resolved = self.resolve(&target.api_version, &target.kind).await?;
        let ns = self.namespace_for(&resolved, target.namespace.as_deref());
        self.check(&resolved, ns.as_deref(), Some(&target.name))?;
        self.guard_secret(&resolved, ns.as_deref(), &target.name, None)?;
        let object = self
            .api(&resolved, ns.as_deref())
            .get(&target.name)
            .await
            .map_err(from_kube)?;
        let value = typed(object, &resolved);
        // A ServiceAccount token is known only once read: refuse before it leaves.
        self.guard_secret(&resolved, ns.as_deref(), &target.name, Some(&value))?;
        Ok(value.to_string())
    }

    /// Lists a kind in one namespace or (without one) in all of them.
    pub(super) async fn list(
        &self,
        target: &ObjectRef,
        params: &ListParams,
    ) -> Result<String, KubeFailure> {
        let resolved = self.resolve(&target.api_version, &target.kind).await?;
        // A list without a namespace spans all namespaces.
        let ns = target
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty() && resolved.namespaced);
        self.check(&resolved, ns, None)?;
        let list = self
            .api(&resolved, ns)
            .list(params)
            .await
            .map_err(from_kube)?;
        let is_namespaces =
            resolved.resource.group.is_empty() && resolved.resource.plural == "namespaces";
        let items: Vec<Value> = list
            .items
            .into_iter()
            .filter(|o| {
                !is_namespaces
                    || o.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| self.allow.allows_namespace(n))
            })
            .map(|o| typed(o, &resolved))
            // The agent's own Secrets and ServiceAccount tokens are left out of any list.
            .filter(|o| {
                let meta = |f: &str| {
                    o.get("metadata")
                        .and_then(|m| m.get(f))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                };
                self.guard_secret(&resolved, Some(meta("namespace")), meta("name"), Some(o))
                    .is_ok()
            })
            .collect();
        Ok(json!({
            "apiVersion": resolved.resource.api_version,
            "kind": format!("{}List", resolved.resource.kind),
            "metadata": {
                "resourceVersion": list.metadata.resource_version,
                "continue": list.metadata.continue_,
            },
            "items": items,
        })
        .to_string())
    }
}
