//! README against the program: the quick start must not publish the dev state folder, and
//! every default in the settings table must be the program's own (from `--check-config`, which
//! prints the hub's and agent's configuration in force, and from each command's `--help`,
//! which clap builds from the flag definitions).

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::Rna;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md")
}

/// The text of README's section `## {title}`, up to the next `## `.
fn section(text: &str, title: &str) -> String {
    let start = text
        .find(&format!("\n## {title}\n"))
        .unwrap_or_else(|| panic!("README has no section {title}"));
    let rest = &text[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    rest[..end].to_string()
}

/// The lines of the `sh` code blocks of `text`.
fn shell_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        match line.trim() {
            "```sh" => inside = true,
            "```" => inside = false,
            l if inside => lines.push(l.to_string()),
            _ => {}
        }
    }
    lines
}

#[test]
fn the_quick_start_serves_a_folder_of_its_own_on_loopback() {
    let run = section(&readme(), "Run and test");
    // The state folder `rna dev` creates, relative to where it runs.
    assert!(
        run.contains("creates the state folder `./rna-dev`"),
        "{run}"
    );
    let servers: Vec<String> = shell_lines(&run)
        .into_iter()
        .filter(|l| l.contains("http.server"))
        .collect();
    assert!(!servers.is_empty(), "no web server in the quick start");
    for line in servers {
        let words: Vec<&str> = line.split_whitespace().collect();
        let value = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        assert_eq!(value("--bind"), Some("127.0.0.1"), "{line}");
        let served = value("--directory").unwrap_or_else(|| panic!("serves its cwd: {line}"));
        // Not the folder `rna dev` ran in, nor one above it, nor the state folder itself.
        let path = Path::new(served);
        assert!(path.is_absolute(), "{line}");
        assert!(path.components().count() > 2, "too close to /: {line}");
        assert!(!served.contains("rna-dev"), "{line}");
        // And the folder exists before the server starts.
        assert!(
            shell_lines(&run)
                .iter()
                .any(|l| l.starts_with(&format!("mkdir -p {served}"))),
            "{served} is not created"
        );
    }
}

/// One row of the settings table: its variables and the default column.
struct Row {
    variables: Vec<String>,
    default: String,
}

fn settings_rows(text: &str) -> Vec<Row> {
    let table = text
        .split("| variable | flag | default |")
        .nth(1)
        .expect("README has the settings table");
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            // `\|` inside a cell is a literal bar.
            let cells: Vec<String> = line
                .replace("\\|", "\u{1}")
                .split('|')
                .map(|c| c.trim().replace('\u{1}', "|"))
                .collect();
            let variables = cells[1]
                .split(',')
                .map(|v| v.trim().trim_matches('`').to_string())
                .collect();
            Row {
                variables,
                default: cells[3].clone(),
            }
        })
        .collect()
}

/// `Some(values)` for a cell that is only backticked values (`` `10s`, `30s` ``), `None` for
/// prose or an empty cell.
fn values(cell: &str) -> Option<Vec<String>> {
    if cell.is_empty() {
        return None;
    }
    let parts: Vec<&str> = cell.split(", ").collect();
    let plain = parts.iter().all(|p| {
        p.len() > 2 && p.starts_with('`') && p.ends_with('`') && p.matches('`').count() == 2
    });
    plain.then(|| {
        parts
            .iter()
            .map(|p| p.trim_matches('`').to_string())
            .collect()
    })
}

fn run(args: &[&str]) -> String {
    let out = Rna::new(args).run();
    assert!(out.status.success(), "{args:?}: {}", out.stderr);
    out.stdout
}

/// Every `[default: …]` that `--help` shows for an argument with `[env: VAR=]`, by variable.
fn help_defaults(help: &str, into: &mut BTreeMap<String, Vec<String>>, seen: &mut Vec<String>) {
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if (2..=6).contains(&indent) && t.starts_with('-') {
            blocks.push(String::new());
        }
        if let Some(block) = blocks.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    for block in blocks {
        let Some(env) = block
            .split("[env: ")
            .nth(1)
            .and_then(|r| r.split(['=', ']']).next())
        else {
            continue;
        };
        seen.push(env.to_string());
        for part in block.split("[default: ").skip(1) {
            if let Some(value) = part.split(']').next() {
                into.entry(env.to_string())
                    .or_default()
                    .push(value.to_string());
            }
        }
    }
}

/// Equal as settings: the same text, or the same duration written two ways (`60s`, `1m`).
fn same(readme: &str, program: &str) -> bool {
    readme == program
        || matches!(
            (
                rna::config::parse_duration(readme),
                rna::config::parse_duration(program)
            ),
            (Ok(a), Ok(b)) if a == b
        )
}

/// Rows whose default is prose, not one value: the program's default there depends on the
/// machine, the environment or another setting.
const PROSE: &[&str] = &[
    "RNA_PROXY",
    "RNA_BIND_ADDRESS",
    "RNA_OIDC_TOKEN_URL",
    "RNA_OIDC_ISSUER",
    "RNA_OIDC_CLIENT_ID",
    "RNA_OIDC_CLIENT_SECRET_FILE",
    "RNA_OIDC_AUDIENCE",
    "RNA_OIDC_CA",
    "RNA_CA",
    "RNA_CERT",
    "RNA_KEY",
    "RNA_TOKENS",
    "RNA_SOCKS_NO_AUTH",
    "RNA_HUB",
    "RNA_SERVER_NAME",
    "RNA_NAME",
    "RNA_TOKEN_FILE",
    "RNA_ALLOW",
    "RNA_DENY",
    "RNA_KUBERNETES",
    "RNA_KUBECONFIG",
    "RNA_KUBE_CONTEXT",
    "RNA_KUBE_NAMESPACE",
    "RNA_KUBE_RESOURCE",
    "RNA_API_TOKEN_FILE",
    "RNA_AGENT",
    "RNA_HUB_NAMES",
    "RNA_HUB_NAME",
    "RNA_JOIN",
    "RNA_TENANT",
    "RNA_SCOPES",
    "RNA_TTL",
    "RNA_LABEL",
    "RNA_LOG_FORMAT",
    "RNA_LOG_LEVEL",
    "RNA_CONFIG",
    "RNA_WORKER_THREADS",
    "RNA_STATE_DIR",
    "RNA_OIDC_ISSUERS_FILE",
];

#[test]
fn every_default_in_the_settings_table_is_the_programs_own() {
    // The program's defaults, source 1: the configuration in force with nothing but the
    // required settings, as `--check-config` prints it.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |f: &str| dir.path().join(f).display().to_string();
    rna::certs::init_dir(dir.path(), &["127.0.0.1".to_string()], false).expect("certs");
    rna::certs::issue_agent_files(dir.path(), "edge", false).expect("agent cert");
    std::fs::write(dir.path().join("tokens.toml"), "").expect("tokens");
    std::fs::write(dir.path().join("token.txt"), "rna_x\n").expect("token");
    let (ca, key) = (d("ca.pem"), d("hub-key.pem"));
    let hub = run(&[
        "hub",
        "--ca",
        &ca,
        "--cert",
        &d("hub.pem"),
        "--key",
        &key,
        "--tokens",
        &d("tokens.toml"),
        "--check-config",
    ]);
    let agent = run(&[
        "agent",
        "--hub",
        "hub.example",
        "--name",
        "edge",
        "--ca",
        &ca,
        "--cert",
        &d("agent-edge.pem"),
        "--key",
        &d("agent-edge-key.pem"),
        "--token-file",
        &d("token.txt"),
        "--check-config",
    ]);
    let mut program: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for out in [hub, agent] {
        let table: toml::Table = out.parse().expect("check-config prints TOML");
        for (key, value) in table {
            let text = match value {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            program
                .entry(format!("RNA_{}", key.to_uppercase()))
                .or_default()
                .push(text);
        }
    }
    // Source 2: the defaults clap shows for each command's flags.
    let mut seen = Vec::new();
    for command in [
        &[][..],
        &["hub"],
        &["agent"],
        &["dev"],
        &["certs", "init"],
        &["certs", "agent"],
        &["token", "create"],
        &["token", "list"],
        &["token", "revoke"],
        &["kube"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        help_defaults(&run(&args), &mut program, &mut seen);
    }

    let rows = settings_rows(&readme());
    assert!(rows.len() > 30, "{} rows", rows.len());
    let mut checked = 0;
    for row in &rows {
        for variable in &row.variables {
            assert!(
                seen.contains(variable),
                "{variable}: no flag has this variable"
            );
        }
        let Some(defaults) = values(&row.default) else {
            for variable in &row.variables {
                assert!(
                    PROSE.contains(&variable.as_str()),
                    "{variable}: default {:?} is neither one value per variable nor a known \
                     prose default",
                    row.default
                );
            }
            continue;
        };
        assert!(
            defaults.len() == row.variables.len() || defaults.len() == 1,
            "{:?}: {} defaults",
            row.variables,
            defaults.len()
        );
        for (i, variable) in row.variables.iter().enumerate() {
            assert!(
                !PROSE.contains(&variable.as_str()),
                "{variable} has a value now"
            );
            let readme = &defaults[if defaults.len() == 1 { 0 } else { i }];
            let found = program.get(variable).unwrap_or_else(|| {
                panic!("{variable}: README says {readme}, the program has no default")
            });
            for value in found {
                assert!(
                    same(readme, value),
                    "{variable}: README says `{readme}`, the program `{value}`"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 25, "{checked} defaults checked");
}

/// Shell commands of a document's `sh` blocks, continuation lines joined.
fn commands(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut open = false;
    for line in shell_lines(text) {
        if open {
            if let Some(last) = out.last_mut() {
                last.push(' ');
                last.push_str(line.trim_end_matches('\\').trim());
            }
        } else {
            out.push(line.trim_end_matches('\\').trim().to_string());
        }
        open = line.ends_with('\\');
    }
    out
}

#[test]
fn token_files_are_written_under_umask_077() {
    for doc in ["README.md", "docs/operations.md", "docs/kubernetes.md"] {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc))
            .expect("read doc");
        let writes: Vec<String> = commands(&text)
            .into_iter()
            .filter(|c| c.contains("rna token create") && c.contains(" > "))
            .collect();
        // The Kubernetes guide enrolls with a join token and writes no token file.
        assert!(
            !writes.is_empty() || doc == "docs/kubernetes.md",
            "{doc}: no token written to a file"
        );
        for command in writes {
            assert!(
                command.starts_with("(umask 077 && ") && command.ends_with(')'),
                "{doc}: a token file is written with the default umask: {command}"
            );
        }
    }
}
