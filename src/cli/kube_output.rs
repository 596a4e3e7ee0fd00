//! How `rna kube` prints objects: a table, kubectl's `-o name`, JSON or YAML, the one-line
//! outcome of an apply, and the inventory summary. The admin API client
//! (`rna::admin_client`) only fetches; what a person reads is decided here.

use clap::ValueEnum;
use serde_json::{json, Value};

/// Output formats of objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table: namespace, name, creation time.
    Table,
    /// `kind[.group]/name` per object.
    Name,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Prints `objects` (a table or names) or `whole` (JSON or YAML) to stdout. The error is the
/// YAML writer's message, printed by the caller as a usage error.
pub fn print_objects(objects: &[Value], whole: &Value, output: Output) -> Result<(), String> {
    match output {
        Output::Table => out!("{}", table(objects).trim_end_matches('\n')),
        Output::Name => {
            for o in objects {
                out!("{}", object_name(o));
            }
        }
        Output::Json => out!(
            "{}",
            serde_json::to_string_pretty(whole).unwrap_or_else(|_| whole.to_string())
        ),
        Output::Yaml => out!("{}", to_yaml(whole)?.trim_end_matches('\n')),
    }
    Ok(())
}

/// Prints the table form of `rna kube inventory`: a summary, one field a line.
pub fn print_inventory_summary(inv: &Value) {
    let text = |p: &str| {
        inv.pointer(p)
            .map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| "-".into())
    };
    out!("agent:          {}", text("/agent"));
    out!("tenant:         {}", text("/tenant"));
    out!("kubernetes:     {}", text("/kubernetes"));
    out!("server version: {}", text("/inventory/server_version"));
    out!("nodes:          {}", text("/inventory/node_count"));
    let namespaces = inv
        .pointer("/inventory/namespaces")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|| "-".into());
    out!("namespaces:     {namespaces}");
    let count = inv
        .pointer("/inventory/resources")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    out!("resources:      {count}");
    out!("age:            {}s", text("/ageSeconds"));
}

/// `deployment.apps/web created` (` (dry run)`).
pub fn apply_line(a: &Value, dry_run: bool) -> String {
    let shown =
        json!({"apiVersion": a["apiVersion"], "kind": a["kind"], "metadata": {"name": a["name"]}});
    let outcome = a
        .get("outcome")
        .and_then(Value::as_str)
        .unwrap_or("applied");
    let dry = if dry_run { " (dry run)" } else { "" };
    format!("{} {outcome}{dry}", object_name(&shown))
}

/// `deployment.apps/web`, `configmap/app`: kubectl's `-o name`.
pub fn object_name(object: &Value) -> String {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let group = api_version.split_once('/').map(|(g, _)| g);
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    match group {
        Some(g) => format!("{kind}.{g}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// A plain table of objects: NAMESPACE (when any object has one), NAME, CREATED.
pub fn table(objects: &[Value]) -> String {
    let text = |o: &Value, p: &str| {
        o.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let with_ns = objects
        .iter()
        .any(|o| !text(o, "/metadata/namespace").is_empty());
    let rows: Vec<Vec<String>> = objects
        .iter()
        .map(|o| {
            let mut row = Vec::new();
            if with_ns {
                row.push(text(o, "/metadata/namespace"));
            }
            row.push(text(o, "/metadata/name"));
            row.push(text(o, "/metadata/creationTimestamp"));
            row
        })
        .collect();
    let mut header = Vec::new();
    if with_ns {
        header.push("NAMESPACE".to_string());
    }
    header.push("NAME".to_string());
    header.push("CREATED".to_string());
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows.iter()) {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == row.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(&cells.join("   "));
        out.push('\n');
    }
    out
}

/// JSON as YAML text.
pub fn to_yaml(v: &Value) -> Result<String, String> {
    serde_saphyr::to_string(v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tables() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "creationTimestamp": "2026-01-02T03:04:05Z"}});
        let c = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "app-config-long", "namespace": "shop", "creationTimestamp": "2026-01-02T03:04:06Z"}});
        assert_eq!(object_name(&d), "deployment.apps/web");
        assert_eq!(object_name(&c), "configmap/app-config-long");
        assert_eq!(
            table(&[d, c]),
            "NAMESPACE   NAME              CREATED\n\
             shop        web               2026-01-02T03:04:05Z\n\
             shop        app-config-long   2026-01-02T03:04:06Z\n"
        );
    }
}
