//! What the Kubernetes routes accept, checked before anything is sent to an agent: object
//! paths (`apps/v1/Deployment/web`), apply bodies (YAML or JSON documents) and boolean flags.

use serde_json::Value;

/// A boolean query flag: `true`/`1`/`All` (kubectl's `dryRun=All`) or `false`/`0`/empty.
pub(super) fn truthy(v: &Option<String>) -> Result<bool, String> {
    match v.as_deref() {
        None | Some("false") | Some("0") | Some("") => Ok(false),
        Some("true") | Some("1") | Some("All") => Ok(true),
        Some(other) => Err(format!("{other:?}: expected true or false")),
    }
}

/// Splits a body of YAML or JSON documents into objects: multi-document YAML, a JSON object,
/// a JSON array, and `List` kinds (their items) are all accepted; empty documents are skipped.
/// A body without any object is refused.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    let out = split_documents(text)?;
    if out.is_empty() {
        return Err("no objects in the body".into());
    }
    Ok(out)
}

/// [`parse_documents`] that accepts a text without objects (a file of comments among
/// several). Line numbers in errors are those of `text`.
pub fn split_documents(text: &str) -> Result<Vec<Value>, String> {
    let trimmed = text.trim_start();
    let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Array(items)) => items,
            Ok(v) => vec![v],
            Err(e) => return Err(format!("invalid JSON: {e}")),
        }
    } else {
        serde_saphyr::from_multiple::<Value>(text).map_err(|e| format!("invalid YAML: {e}"))?
    };
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        match doc {
            Value::Null => continue,
            Value::Object(ref map) => {
                let is_list = map
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List"))
                    && map.get("items").is_some_and(Value::is_array);
                if is_list {
                    if let Some(Value::Array(items)) = map.get("items") {
                        out.extend(items.iter().cloned());
                    }
                } else {
                    for field in ["apiVersion", "kind"] {
                        if !map.get(field).is_some_and(Value::is_string) {
                            return Err(format!("document {}: no {field}", i + 1));
                        }
                    }
                    out.push(doc);
                }
            }
            _ => return Err(format!("document {} is not an object", i + 1)),
        }
    }
    Ok(out)
}

/// Whether a path segment is a core API version (`v1`, `v2beta1`) rather than a group.
fn is_core_version(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('v') else {
        return false;
    };
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    if digits == 0 {
        return false;
    }
    let tail = &rest[digits..];
    tail.is_empty()
        || ["alpha", "beta"].iter().any(|p| {
            tail.strip_prefix(p)
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
}

/// `v1/ConfigMap[/name]` or `apps/v1/Deployment[/name]` → (apiVersion, kind, name).
pub fn parse_object_path(path: &str) -> Result<(String, String, Option<String>), String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let bad = || {
        format!(
            "{path:?}: expected {{apiVersion}}/{{kind}}[/{{name}}], e.g. v1/ConfigMap/app or \
             apps/v1/Deployment/web"
        )
    };
    let (api_version, rest) = match parts.first() {
        Some(v) if is_core_version(v) => (v.to_string(), &parts[1..]),
        Some(g) if parts.len() >= 3 => (format!("{g}/{}", parts[1]), &parts[2..]),
        _ => return Err(bad()),
    };
    match rest {
        [kind] => Ok((api_version, kind.to_string(), None)),
        [kind, name] => Ok((api_version, kind.to_string(), Some(name.to_string()))),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_parse() {
        let ok = [
            ("v1/ConfigMap", ("v1", "ConfigMap", None)),
            ("v1/ConfigMap/app", ("v1", "ConfigMap", Some("app"))),
            (
                "apps/v1/Deployment/web",
                ("apps/v1", "Deployment", Some("web")),
            ),
            (
                "example.com/v1alpha1/widgets",
                ("example.com/v1alpha1", "widgets", None),
            ),
            ("v2beta1/X", ("v2beta1", "X", None)),
        ];
        for (path, (v, k, n)) in ok {
            let got = parse_object_path(path).unwrap();
            assert_eq!(
                (got.0.as_str(), got.1.as_str(), got.2.as_deref()),
                (v, k, n),
                "{path}"
            );
        }
        for bad in ["", "v1", "apps/v1", "apps/v1/Deployment/web/x", "v1/a/b/c"] {
            assert!(parse_object_path(bad).is_err(), "{bad}");
        }
        assert!(!is_core_version("version"));
        assert!(!is_core_version("v1beta"));
        assert!(is_core_version("v10"));
    }

    #[test]
    fn documents_parse_from_yaml_and_json() {
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: \"1\"\n";
        let docs = parse_documents(yaml).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["data"]["a"], "1");
        let list = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"}}]}"#;
        assert_eq!(parse_documents(list).unwrap().len(), 1);
        let arr = r#"[{"apiVersion":"v1","kind":"Pod"},{"apiVersion":"v1","kind":"Pod"}]"#;
        assert_eq!(parse_documents(arr).unwrap().len(), 2);
        for bad in [
            "",
            "---\n",
            "kind: Pod\n",
            "- a\n- b\n",
            "{",
            "apiVersion: v1\nkind: [x\n",
        ] {
            assert!(parse_documents(bad).is_err(), "{bad:?}");
        }
    }
}
