//! `rna kube …`: Kubernetes commands through the hub's admin API and an agent's command
//! channel. Exit codes: 0 success, 1 Kubernetes refused (message printed), 2 usage,
//! 3 agent unavailable.

use std::path::PathBuf;

use bytes::Bytes;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use rna::admin_client::{
    encode, resolve_type, ApiClient, ApiResponse, Refusal, ResolvedType, EXIT_OK, EXIT_UNAVAILABLE,
    EXIT_USAGE,
};
use rna::auth::read_secret_file;
use rna::proto::kube::ResourceInfo;

use super::kube_output::{apply_line, object_name, print_inventory_summary, print_objects, Output};

/// Flags shared by every `rna kube` command.
#[derive(Args, Debug)]
pub struct KubeArgs {
    /// The hub's admin API.
    #[arg(long, env = "RNA_HUB_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// File holding the API token (scope read:infra:data; exec:infra:op for apply and delete).
    #[arg(long, env = "RNA_API_TOKEN_FILE")]
    token_file: PathBuf,
    /// The agent whose cluster to act on.
    #[arg(long, env = "RNA_AGENT")]
    agent: String,
    /// The agent's tenant (only for admin tokens, when the name is ambiguous).
    #[arg(long, env = "RNA_TENANT")]
    tenant: Option<String>,
    #[command(subcommand)]
    command: KubeCommand,
}

#[derive(Subcommand, Debug)]
enum KubeCommand {
    /// Server-side apply (field manager `rna`) of YAML or JSON documents.
    Apply {
        /// File of one or more documents; `-` reads standard input; repeat.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Namespace for namespaced objects that name none.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Validate on the server without persisting.
        #[arg(long)]
        dry_run: bool,
        /// Take over fields that other field managers own instead of failing with a conflict.
        #[arg(long)]
        force: bool,
        /// Print the API's JSON answer instead of one line per object.
        #[arg(short = 'o', long, value_parser = ["json"])]
        output: Option<String>,
    },
    /// Show one object: TYPE/NAME or TYPE NAME.
    Get {
        /// `deployments/web`, `deployment.apps/web`, `cm/app`, or a TYPE followed by NAME.
        target: String,
        /// The name, when not given as TYPE/NAME.
        name: Option<String>,
        /// Namespace [default: the agent's default namespace].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        /// API version, to name a kind that is not in the agent's inventory.
        #[arg(long)]
        api_version: Option<String>,
    },
    /// List objects of a type.
    List {
        /// `pods`, `deployments.apps`, `widgets`…
        type_: String,
        /// Namespace [default: all namespaces].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Label selector (`app=web`, `tier in (a,b)`).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Field selector (`metadata.name=web`).
        #[arg(long)]
        field_selector: Option<String>,
        /// Page size.
        #[arg(long)]
        limit: Option<u32>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        /// API version, to name a kind that is not in the agent's inventory.
        #[arg(long)]
        api_version: Option<String>,
    },
    /// Delete one object.
    Delete {
        /// TYPE/NAME or TYPE.
        target: String,
        /// The name, when not given as TYPE/NAME.
        name: Option<String>,
        /// Namespace [default: the agent's default namespace].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Propagation to dependents: background, foreground or orphan.
        #[arg(long, value_parser = ["background", "foreground", "orphan"])]
        cascade: Option<String>,
        /// Validate on the server without deleting.
        #[arg(long)]
        dry_run: bool,
        /// API version, to name a kind that is not in the agent's inventory.
        #[arg(long)]
        api_version: Option<String>,
    },
    /// Wait for a rollout, a condition or a deletion, printing progress.
    Wait {
        /// TYPE/NAME or TYPE.
        target: String,
        /// The name, when not given as TYPE/NAME.
        name: Option<String>,
        /// Namespace [default: the agent's default namespace].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// `rollout`, `delete`, `condition=TYPE` or `condition=TYPE=STATUS`.
        #[arg(long = "for")]
        for_: String,
        /// Give up after this long (e.g. 90s, 5m; at most 1h).
        #[arg(long, default_value = "5m")]
        timeout: String,
        /// API version, to name a kind that is not in the agent's inventory.
        #[arg(long)]
        api_version: Option<String>,
    },
    /// Show the agent's inventory: server version, nodes, namespaces, API resources.
    Inventory {
        /// Output format (table prints a summary).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// A failure already printed, carrying its exit code.
struct Exit(u8);

fn usage(message: impl std::fmt::Display) -> Exit {
    eprintln!("rna kube: {message}");
    Exit(EXIT_USAGE)
}

fn refused(r: &ApiResponse) -> Exit {
    let refusal = Refusal::from_response(r);
    eprintln!("rna kube: {refusal}");
    Exit(refusal.exit_code())
}

struct Ctx {
    client: ApiClient,
    agent: String,
    tenant: Option<String>,
}

impl Ctx {
    fn agent_path(&self, rest: &str) -> String {
        format!("/api/v1/agents/{}/{rest}", encode(&self.agent))
    }

    /// `key=value&…` with the tenant added for admin tokens.
    fn query(&self, pairs: &[(&str, Option<String>)]) -> String {
        let mut parts: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
            .collect();
        if let Some(t) = &self.tenant {
            parts.push(format!("tenant={}", encode(t)));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<ApiResponse, Exit> {
        self.client.request(method, path, body).await.map_err(|e| {
            eprintln!("rna kube: {e}");
            Exit(e.exit_code())
        })
    }

    async fn inventory(&self) -> Result<Value, Exit> {
        let path = self.agent_path("inventory") + &self.query(&[]);
        let r = self.send(http::Method::GET, &path, None).await?;
        if !r.ok() {
            return Err(refused(&r));
        }
        Ok(r.json())
    }

    /// TYPE → apiVersion and kind, through `--api-version` or the agent's inventory.
    async fn resolve(&self, type_: &str, api_version: Option<&str>) -> Result<ResolvedType, Exit> {
        if let Some(v) = api_version {
            return Ok(ResolvedType {
                api_version: v.to_string(),
                kind: type_.to_string(),
                namespaced: None,
            });
        }
        let inv = self.inventory().await?;
        if inv.get("kubernetes") == Some(&Value::Bool(false)) {
            eprintln!(
                "rna kube: agent {:?} has no Kubernetes capability (start it with --kubernetes or --kubeconfig)",
                self.agent
            );
            return Err(Exit(EXIT_UNAVAILABLE));
        }
        let resources: Vec<ResourceInfo> = match inv.pointer("/inventory/resources") {
            Some(r) => serde_json::from_value(r.clone()).unwrap_or_default(),
            None => {
                return Err(usage(format!(
                    "agent {:?} has not reported its inventory yet; give --api-version to name the kind",
                    self.agent
                )))
            }
        };
        resolve_type(&resources, type_).map_err(usage)
    }
}

/// `deployments/web` or (`deployments`, `web`).
fn split_target(target: &str, name: Option<String>) -> Result<(String, String), Exit> {
    match (target.split_once('/'), name) {
        (Some((t, n)), None) if !t.is_empty() && !n.is_empty() => {
            Ok((t.to_string(), n.to_string()))
        }
        (None, Some(n)) if !n.is_empty() => Ok((target.to_string(), n)),
        _ => Err(usage(format!(
            "{target:?}: give TYPE/NAME (deployments/web) or TYPE NAME"
        ))),
    }
}

/// Runs one `rna kube` command; returns the exit code.
pub async fn run(args: KubeArgs) -> u8 {
    match run_inner(args).await {
        Ok(()) => EXIT_OK,
        Err(Exit(code)) => code,
    }
}

async fn run_inner(args: KubeArgs) -> Result<(), Exit> {
    let token = read_secret_file(&args.token_file).map_err(usage)?;
    let client = ApiClient::new(&args.api, token).map_err(usage)?;
    let ctx = Ctx {
        client,
        agent: args.agent,
        tenant: args.tenant,
    };
    match args.command {
        KubeCommand::Apply {
            files,
            namespace,
            dry_run,
            force,
            output,
        } => {
            // Each file is parsed here, so an error names its file and the line within it;
            // the hub gets the objects as one JSON array.
            let mut objects = Vec::new();
            for f in &files {
                let text = if f.as_os_str() == "-" {
                    rna::fsutil::read_stream_text(
                        std::io::stdin(),
                        "standard input",
                        rna::fsutil::MAX_MANIFEST,
                    )
                    .map_err(usage)?
                } else {
                    rna::fsutil::read_text(f, rna::fsutil::MAX_MANIFEST)
                        .map_err(|e| usage(e.to_string()))?
                };
                let shown = if f.as_os_str() == "-" {
                    "standard input".to_string()
                } else {
                    f.display().to_string()
                };
                // The parser's snippet calls its text `<input>`: name the file there too.
                let docs = rna::hub::kube_api::split_documents(&text)
                    .map_err(|e| usage(format!("{shown}: {}", e.replace("<input>", &shown))))?;
                objects.extend(docs);
            }
            if objects.is_empty() {
                return Err(usage("no objects in the given files"));
            }
            let body = Value::Array(objects).to_string();
            let path = ctx.agent_path("kube/apply")
                + &ctx.query(&[
                    ("namespace", namespace),
                    ("dryRun", dry_run.then(|| "true".to_string())),
                    ("force", force.then(|| "true".to_string())),
                ]);
            let r = ctx
                .send(
                    http::Method::POST,
                    &path,
                    Some(("application/json", Bytes::from(body))),
                )
                .await?;
            if !r.ok() {
                // Say what was applied before the refusal.
                if let Some(applied) = r.json().get("applied").and_then(Value::as_array) {
                    for a in applied {
                        out!("{}", apply_line(a, dry_run));
                    }
                }
                return Err(refused(&r));
            }
            let answer = r.json();
            if output.is_some() {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&answer).unwrap_or_default()
                );
            } else {
                for a in answer
                    .get("results")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out!("{}", apply_line(a, dry_run));
                }
            }
            Ok(())
        }
        KubeCommand::Get {
            target,
            name,
            namespace,
            output,
            api_version,
        } => {
            let (type_, name) = split_target(&target, name)?;
            let t = ctx.resolve(&type_, api_version.as_deref()).await?;
            let path = ctx.agent_path(&format!(
                "kube/{}/{}/{}",
                t.api_version,
                encode(&t.kind),
                encode(&name)
            )) + &ctx.query(&[("namespace", namespace)]);
            let r = ctx.send(http::Method::GET, &path, None).await?;
            if !r.ok() {
                return Err(refused(&r));
            }
            let object = r.json();
            print_objects(std::slice::from_ref(&object), &object, output).map_err(usage)
        }
        KubeCommand::List {
            type_,
            namespace,
            selector,
            field_selector,
            limit,
            output,
            api_version,
        } => {
            let t = ctx.resolve(&type_, api_version.as_deref()).await?;
            let path = ctx.agent_path(&format!("kube/{}/{}", t.api_version, encode(&t.kind)))
                + &ctx.query(&[
                    ("namespace", namespace),
                    ("labelSelector", selector),
                    ("fieldSelector", field_selector),
                    ("limit", limit.map(|l| l.to_string())),
                ]);
            let r = ctx.send(http::Method::GET, &path, None).await?;
            if !r.ok() {
                return Err(refused(&r));
            }
            let list = r.json();
            let items: Vec<Value> = list
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if items.is_empty() && output == Output::Table {
                eprintln!("No resources found.");
                return Ok(());
            }
            print_objects(&items, &list, output).map_err(usage)
        }
        KubeCommand::Delete {
            target,
            name,
            namespace,
            cascade,
            dry_run,
            api_version,
        } => {
            let (type_, name) = split_target(&target, name)?;
            let t = ctx.resolve(&type_, api_version.as_deref()).await?;
            let propagation = cascade.map(|c| {
                let mut s = c;
                s[..1].make_ascii_uppercase();
                s
            });
            let path = ctx.agent_path(&format!(
                "kube/{}/{}/{}",
                t.api_version,
                encode(&t.kind),
                encode(&name)
            )) + &ctx.query(&[
                ("namespace", namespace),
                ("propagationPolicy", propagation),
                ("dryRun", dry_run.then(|| "true".to_string())),
            ]);
            let r = ctx.send(http::Method::DELETE, &path, None).await?;
            if !r.ok() {
                return Err(refused(&r));
            }
            let a = r.json();
            let state = a.get("state").and_then(Value::as_str).unwrap_or("deleted");
            let shown = json!({"apiVersion": a["apiVersion"], "kind": a["kind"], "metadata": {"name": a["name"]}});
            let dry = if dry_run { " (dry run)" } else { "" };
            out!("{} {state}{dry}", object_name(&shown));
            Ok(())
        }
        KubeCommand::Wait {
            target,
            name,
            namespace,
            for_,
            timeout,
            api_version,
        } => {
            let (type_, name) = split_target(&target, name)?;
            if let Err(e) = for_.parse::<rna::proto::kube::WaitFor>() {
                return Err(usage(e));
            }
            if let Err(e) = rna::duration::parse_duration(&timeout) {
                return Err(usage(format!("--timeout: {e}")));
            }
            let t = ctx.resolve(&type_, api_version.as_deref()).await?;
            let body = json!({
                "apiVersion": t.api_version,
                "kind": t.kind,
                "namespace": namespace,
                "name": name,
                "for": for_,
                "timeout": timeout,
                "tenant": ctx.tenant,
            });
            let path = ctx.agent_path("kube/wait");
            let mut last: Option<Value> = None;
            let mut printed: Option<String> = None;
            let r = ctx
                .client
                .stream_lines(
                    http::Method::POST,
                    &path,
                    Some(("application/json", Bytes::from(body.to_string()))),
                    |line| {
                        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
                        if v.get("type").and_then(Value::as_str) == Some("progress") {
                            if let Some(m) = v.get("message").and_then(Value::as_str) {
                                out!("{m}");
                                printed = Some(m.to_string());
                            }
                        }
                        last = Some(v);
                    },
                )
                .await
                .map_err(|e| {
                    eprintln!("rna kube: {e}");
                    Exit(e.exit_code())
                })?;
            if !r.ok() {
                return Err(refused(&r));
            }
            let last = last.unwrap_or(Value::Null);
            match last.get("type").and_then(Value::as_str) {
                Some("done") => {
                    // An agent that also sent the final state as progress has said it already.
                    if let Some(m) = last.get("message").and_then(Value::as_str) {
                        if printed.as_deref() != Some(m) {
                            out!("{m}");
                        }
                    }
                    Ok(())
                }
                Some("error") => {
                    let refusal = Refusal {
                        status: last.get("code").and_then(Value::as_u64).unwrap_or(500) as u16,
                        reason: last
                            .get("reason")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        kind: String::new(),
                        message: last
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    };
                    eprintln!("rna kube: {refusal}");
                    Err(Exit(refusal.exit_code()))
                }
                _ => {
                    eprintln!("rna kube: the wait ended without an outcome");
                    Err(Exit(EXIT_UNAVAILABLE))
                }
            }
        }
        KubeCommand::Inventory { output } => {
            let inv = ctx.inventory().await?;
            match output {
                Output::Json | Output::Yaml | Output::Name => print_objects(
                    &[],
                    &inv,
                    if output == Output::Name {
                        Output::Json
                    } else {
                        output
                    },
                )
                .map_err(usage),
                Output::Table => {
                    print_inventory_summary(&inv);
                    Ok(())
                }
            }
        }
    }
}
