//! Delete: one object, with the caller's propagation policy, never one of the agent's own
//! Secrets or a ServiceAccount token.

use kube::api::{DeleteParams, PropagationPolicy};
use serde_json::{json, Value};

use super::apply::changes_discovery;
use super::{bad_request, from_kube, guard, KubeExecutor, KubeFailure};
use crate::proto::kube::ObjectRef;

/// The propagation policy a caller named, case-insensitively, or a 400 naming the choices.
fn propagation_policy(given: Option<&str>) -> Result<Option<PropagationPolicy>, KubeFailure> {
    match given {
        None => Ok(None),
        Some(p) if p.eq_ignore_ascii_case("foreground") => Ok(Some(PropagationPolicy::Foreground)),
        Some(p) if p.eq_ignore_ascii_case("background") => Ok(Some(PropagationPolicy::Background)),
        Some(p) if p.eq_ignore_ascii_case("orphan") => Ok(Some(PropagationPolicy::Orphan)),
        Some(p) => Err(bad_request(format!(
            "propagation policy {p:?}: expected Foreground, Background or Orphan"
        ))),
    }
}

impl KubeExecutor {
    /// Deletes one object; the answer says whether it is gone or still held by finalizers.
    pub(super) async fn delete(
        &self,
        target: &ObjectRef,
        propagation: Option<&str>,
        dry_run: bool,
    ) -> Result<String, KubeFailure> {
        if target.name.is_empty() {
            return Err(bad_request("delete needs an object name"));
        }
        let propagation_policy = propagation_policy(propagation)?;
        let resolved = self.resolve(&target.api_version, &target.kind).await?;
        let ns = self.namespace_for(&resolved, target.namespace.as_deref());
        self.check(&resolved, ns.as_deref(), Some(&target.name))?;
        self.guard_secret(&resolved, ns.as_deref(), &target.name, None)?;
        if guard::is_secrets(&resolved.resource.group, &resolved.resource.plural) {
            // A ServiceAccount token is told by its type; when the role cannot read Secrets
            // the type is unknown and only the name list applies.
            let existing = self
                .api(&resolved, ns.as_deref())
                .get_opt(&target.name)
                .await;
            if let Ok(Some(o)) = existing {
                let value = serde_json::to_value(&o).unwrap_or(Value::Null);
                self.guard_secret(&resolved, ns.as_deref(), &target.name, Some(&value))?;
            }
        }
        let params = DeleteParams {
            dry_run,
            propagation_policy,
            ..Default::default()
        };
        let answer = self
            .api(&resolved, ns.as_deref())
            .delete(&target.name, &params)
            .await
            .map_err(from_kube)?;
        // The server answers with the object while finalizers still hold it, else a Status.
        let state = match answer.left() {
            Some(obj) if obj.metadata.deletion_timestamp.is_some() => "deleting",
            _ => "deleted",
        };
        let kind = resolved.resource.kind.as_str();
        if !dry_run && changes_discovery(kind) {
            self.discovery_changed();
        }
        Ok(json!({
            "apiVersion": resolved.resource.api_version,
            "kind": kind,
            "namespace": ns,
            "name": target.name,
            "state": state,
            "dryRun": dry_run,
        })
        .to_string())
    }
}
