//! Server-side apply: each document of a command is applied with the agent's field manager,
//! and the answer says per object whether it was created, changed or left unchanged.

use kube::api::{DynamicObject, Patch, PatchParams};
use serde_json::{json, Value};

use super::{bad_request, from_kube, guard, KubeExecutor, KubeFailure};

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "rna";

/// What one document names: its apiVersion, kind and metadata.name, each required.
pub(super) fn identify(doc: &Value) -> Result<(String, String, String), KubeFailure> {
    let field = |f: &str| doc.get(f).and_then(Value::as_str).map(str::to_string);
    let api_version =
        field("apiVersion").ok_or_else(|| bad_request("a document has no apiVersion"))?;
    let kind = field("kind").ok_or_else(|| bad_request("a document has no kind"))?;
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .ok_or_else(|| bad_request(format!("a {kind} document has no metadata.name")))?;
    Ok((api_version, kind, name))
}

/// The namespace a document itself names, if any.
pub(super) fn own_namespace(doc: &Value) -> Option<String> {
    doc.get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Puts a document in the namespace it is applied to (`None`: cluster-scoped, so none) and
/// drops `managedFields`, which server-side apply refuses in the request.
pub(super) fn place(doc: &mut Value, namespace: Option<&str>) {
    if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        match namespace {
            Some(ns) => {
                meta.insert("namespace".into(), Value::String(ns.to_string()));
            }
            None => {
                meta.remove("namespace");
            }
        }
    }
}

/// The parameters of every apply: the agent's field manager, taking over fields other
/// managers own only when the caller asked to force.
pub(super) fn apply_params(force: bool, dry_run: bool) -> PatchParams {
    let mut params = PatchParams::apply(FIELD_MANAGER);
    params.force = force;
    params.dry_run = dry_run;
    params
}

/// An object without status and the fields every write changes, to tell whether an apply
/// changed it.
pub(super) fn comparable(object: &DynamicObject) -> Value {
    let mut v = serde_json::to_value(object).unwrap_or(Value::Null);
    if let Some(map) = v.as_object_mut() {
        map.remove("status");
    }
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in ["resourceVersion", "managedFields", "generation"] {
            meta.remove(f);
        }
    }
    v
}

/// What an apply reports for one object, from what was read before it: `None` when the
/// object could not be read (the role may write Secrets without reading them), `Some(None)`
/// when it did not exist.
pub(super) fn outcome(
    before: Option<Option<&DynamicObject>>,
    after: &DynamicObject,
) -> &'static str {
    // Compared without status and bookkeeping: a controller updating status between the
    // read and the apply must not make an unchanged apply look changed.
    match before {
        None => "applied",
        Some(None) => "created",
        Some(Some(b)) if comparable(b) == comparable(after) => "unchanged",
        Some(Some(_)) => "changed",
    }
}

/// Whether applying or deleting an object of `kind` changes discovery (a CRD) or the
/// inventory (a namespace).
pub(super) fn changes_discovery(kind: &str) -> bool {
    kind == "CustomResourceDefinition" || kind == "Namespace"
}

/// The details of a failed apply: what was applied before the failure, which document
/// failed, and the failure's own Kubernetes Status if it had one.
pub(super) fn failed_details(applied: &[Value], index: usize, status: Option<&str>) -> String {
    json!({
        "applied": applied,
        "failedIndex": index,
        "status": status.and_then(|d| serde_json::from_str::<Value>(d).ok()),
    })
    .to_string()
}

impl KubeExecutor {
    /// Applies every document of `objects` (a JSON array) in order, stopping at the first
    /// failure.
    pub(super) async fn apply(
        &self,
        objects: &str,
        namespace: Option<&str>,
        dry_run: bool,
        force: bool,
    ) -> Result<String, KubeFailure> {
        let docs: Vec<Value> = serde_json::from_str(objects)
            .map_err(|e| bad_request(format!("objects are not a JSON array: {e}")))?;
        let mut results: Vec<Value> = Vec::new();
        let mut touched_discovery = false;
        for (index, doc) in docs.into_iter().enumerate() {
            match self.apply_one(doc, namespace, dry_run, force).await {
                Ok((result, kind)) => {
                    touched_discovery |= changes_discovery(&kind);
                    results.push(result);
                }
                Err(mut f) => {
                    // Say what was applied before the failure and which document failed.
                    f.details = Some(failed_details(&results, index, f.details.as_deref()));
                    if touched_discovery && !dry_run {
                        self.discovery_changed();
                    }
                    return Err(f);
                }
            }
        }
        if touched_discovery && !dry_run {
            // A new CRD changes discovery; a new namespace changes the inventory.
            self.discovery_changed();
        }
        Ok(json!({ "dryRun": dry_run, "results": results }).to_string())
    }

    async fn apply_one(
        &self,
        mut doc: Value,
        namespace: Option<&str>,
        dry_run: bool,
        force: bool,
    ) -> Result<(Value, String), KubeFailure> {
        let (api_version, kind, name) = identify(&doc)?;
        let resolved = self.resolve(&api_version, &kind).await?;
        let given_ns = own_namespace(&doc);
        let ns = self.namespace_for(&resolved, given_ns.as_deref().or(namespace));
        place(&mut doc, ns.as_deref());
        self.check(&resolved, ns.as_deref(), Some(&name))?;
        // Names the agent's own Secret, or would mint a ServiceAccount token.
        self.guard_secret(&resolved, ns.as_deref(), &name, Some(&doc))?;
        let object: DynamicObject =
            serde_json::from_value(doc).map_err(|e| bad_request(format!("{kind} {name}: {e}")))?;
        let api = self.api(&resolved, ns.as_deref());
        let secret = guard::is_secrets(&resolved.resource.group, &resolved.resource.plural);
        let before = match api.get_opt(&name).await {
            Ok(b) => Some(b),
            // The shipped role may create and patch Secrets but not read them: server-side
            // apply needs no read, only the created/changed outcome is then unknown.
            Err(kube::Error::Api(status)) if secret && status.code == 403 => None,
            Err(e) => return Err(from_kube(e)),
        };
        if let Some(Some(existing)) = before.as_ref().filter(|_| secret) {
            let value = serde_json::to_value(existing).unwrap_or(Value::Null);
            self.guard_secret(&resolved, ns.as_deref(), &name, Some(&value))?;
        }
        let after = api
            .patch(&name, &apply_params(force, dry_run), &Patch::Apply(&object))
            .await
            .map_err(from_kube)?;
        let result = json!({
            "apiVersion": resolved.resource.api_version,
            "kind": resolved.resource.kind,
            "namespace": ns,
            "name": name,
            "resourceVersion": after.metadata.resource_version,
            "outcome": outcome(before.as_ref().map(Option::as_ref), &after),
        });
        Ok((result, resolved.resource.kind.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    fn config_map(data: &str, resource_version: &str, generation: i64) -> DynamicObject {
        object(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "app",
                "namespace": "shop",
                "resourceVersion": resource_version,
                "generation": generation,
                "managedFields": [{"manager": resource_version}],
            },
            "data": {"a": data},
            "status": {"seen": resource_version},
        }))
    }

    #[test]
    fn outcomes_follow_what_was_read_before() {
        let after = config_map("1", "20", 2);
        let same_but_bookkeeping = config_map("1", "10", 1);
        let different = config_map("0", "10", 1);
        let cases: [(Option<Option<&DynamicObject>>, &str); 4] = [
            (None, "applied"),
            (Some(None), "created"),
            (Some(Some(&same_but_bookkeeping)), "unchanged"),
            (Some(Some(&different)), "changed"),
        ];
        for (before, want) in cases {
            assert_eq!(outcome(before, &after), want, "{before:?}");
        }
    }

    #[test]
    fn comparable_drops_status_and_bookkeeping_only() {
        let v = comparable(&config_map("1", "20", 2));
        assert!(v.get("status").is_none(), "{v}");
        let meta = &v["metadata"];
        for gone in ["resourceVersion", "managedFields", "generation"] {
            assert!(meta.get(gone).is_none(), "{gone}: {v}");
        }
        assert_eq!(meta["name"], "app");
        assert_eq!(meta["namespace"], "shop");
        assert_eq!(v["data"]["a"], "1");
        // An object with no metadata at all still compares.
        let bare = comparable(&object(
            json!({"apiVersion": "v1", "kind": "X", "metadata": {}}),
        ));
        assert_eq!(bare["kind"], "X");
    }

    #[test]
    fn documents_name_what_they_apply() {
        let ok =
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}});
        assert_eq!(
            identify(&ok).unwrap(),
            ("apps/v1".into(), "Deployment".into(), "web".into())
        );
        let cases = [
            (
                json!({"kind": "Pod", "metadata": {"name": "p"}}),
                "a document has no apiVersion",
            ),
            (
                json!({"apiVersion": "v1", "metadata": {"name": "p"}}),
                "a document has no kind",
            ),
            (
                json!({"apiVersion": "v1", "kind": "Pod"}),
                "a Pod document has no metadata.name",
            ),
            (
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": ""}}),
                "a Pod document has no metadata.name",
            ),
            (
                json!({"apiVersion": 1, "kind": "Pod", "metadata": {"name": "p"}}),
                "a document has no apiVersion",
            ),
        ];
        for (doc, message) in cases {
            let f = identify(&doc).unwrap_err();
            assert_eq!((f.code, f.message.as_str()), (400, message), "{doc}");
        }
    }

    #[test]
    fn documents_are_placed_in_their_namespace() {
        let doc = || {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "c", "namespace": "given", "managedFields": [{}]}})
        };
        assert_eq!(own_namespace(&doc()).as_deref(), Some("given"));
        assert_eq!(own_namespace(&json!({"metadata": {}})), None);
        let mut namespaced = doc();
        place(&mut namespaced, Some("shop"));
        assert_eq!(
            namespaced["metadata"],
            json!({"name": "c", "namespace": "shop"})
        );
        let mut cluster = doc();
        place(&mut cluster, None);
        assert_eq!(cluster["metadata"], json!({"name": "c"}));
        // A document without metadata is left for the API server to refuse.
        let mut bare = json!({"kind": "X"});
        place(&mut bare, Some("shop"));
        assert_eq!(bare, json!({"kind": "X"}));
    }

    #[test]
    fn every_apply_uses_the_agents_field_manager() {
        for (force, dry_run) in [(false, false), (true, false), (false, true), (true, true)] {
            let p = apply_params(force, dry_run);
            assert_eq!(p.field_manager.as_deref(), Some(FIELD_MANAGER));
            assert_eq!((p.force, p.dry_run), (force, dry_run));
        }
        assert_eq!(FIELD_MANAGER, "rna");
    }

    #[test]
    fn crds_and_namespaces_change_discovery() {
        for (kind, want) in [
            ("CustomResourceDefinition", true),
            ("Namespace", true),
            ("ConfigMap", false),
            ("namespace", false),
        ] {
            assert_eq!(changes_discovery(kind), want, "{kind}");
        }
    }

    #[test]
    fn a_failed_apply_says_what_came_before() {
        let applied = [json!({"name": "a", "outcome": "created"})];
        let status = r#"{"kind":"Status","code":422}"#;
        let d: Value = serde_json::from_str(&failed_details(&applied, 1, Some(status))).unwrap();
        assert_eq!(d["failedIndex"], 1);
        assert_eq!(d["applied"][0]["outcome"], "created");
        assert_eq!(d["status"]["code"], 422);
        let d: Value = serde_json::from_str(&failed_details(&[], 0, Some("not json"))).unwrap();
        assert_eq!(d["status"], Value::Null);
        assert_eq!(d["applied"], json!([]));
    }
}
