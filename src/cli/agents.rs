//! `rna agents`: the agents connected to a hub, read page by page from its admin API
//! (`GET /api/v1/agents`), so a fleet of any size lists whole. Exit codes: 0 listed, 1 the
//! hub refused (token, scope), 2 usage, 3 the hub is unreachable.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use rna::admin_client::{ApiClient, Refusal, EXIT_OK, EXIT_USAGE};
use rna::auth::read_secret_file;

/// Flags of `rna agents`.
#[derive(Args, Debug)]
pub struct AgentsArgs {
    /// The hub's admin API.
    #[arg(long, env = "RNA_HUB_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// File holding the API token (scope read:infra:data; admin sees every tenant).
    #[arg(long, env = "RNA_API_TOKEN_FILE")]
    token_file: PathBuf,
    /// Agent connections asked for per request (1 to 5000); every page is read.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=5000))]
    page_size: u32,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: AgentsOutput,
}

/// How `rna agents` prints.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum AgentsOutput {
    /// One line per connection: name, tenant, session, transport, address, version, RTT.
    Table,
    /// `{"agents": [...]}`, every page joined, as the API's objects.
    Json,
}

/// Runs `rna agents`; returns the exit code.
pub async fn run(args: AgentsArgs) -> u8 {
    let fail = |message: String, code: u8| {
        eprintln!("rna agents: {message}");
        code
    };
    let token = match read_secret_file(&args.token_file) {
        Ok(t) => t,
        Err(e) => return fail(e.to_string(), EXIT_USAGE),
    };
    let client = match ApiClient::new(&args.api, token) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string(), e.exit_code()),
    };
    let agents = match client.list_agents(args.page_size).await {
        Ok(Ok(agents)) => agents,
        Ok(Err(answer)) => {
            let refusal = Refusal::from_response(&answer);
            return fail(refusal.to_string(), refusal.exit_code());
        }
        Err(e) => return fail(e.to_string(), e.exit_code()),
    };
    match args.output {
        AgentsOutput::Json => out!("{}", json!({ "agents": agents })),
        AgentsOutput::Table => print_table(&agents),
    }
    EXIT_OK
}

fn print_table(agents: &[Value]) {
    let text = |a: &Value, k: &str| match &a[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let rows: Vec<[String; 7]> = agents
        .iter()
        .map(|a| {
            [
                text(a, "name"),
                text(a, "tenant"),
                text(a, "session_id"),
                text(a, "transport"),
                text(a, "remote_address"),
                text(a, "version"),
                a["rtt_ms"]
                    .as_f64()
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms")),
            ]
        })
        .collect();
    let head = [
        "NAME",
        "TENANT",
        "SESSION",
        "TRANSPORT",
        "ADDRESS",
        "VERSION",
        "RTT",
    ];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    out!("{}", line(&head));
    for row in &rows {
        out!("{}", line(&row.each_ref().map(String::as_str)));
    }
    if rows.is_empty() {
        eprintln!("rna agents: no agent is connected");
    }
}
