//! Layers point one way: every file under `src/` imports only from modules in layers below its
//! own, as listed in `src/lib.rs`'s doc (`# Layers`). A back-edge (a leaf importing `hub`,
//! `agent` importing `hub`, `proto` importing `auth`) fails here, naming the file, the line
//! and the forbidden edge.
//!
//! The scanner reads Rust source without a parser crate: it drops comments, strings and
//! character literals, then follows `crate::…` and `super::…` paths (in `use` lines, use
//! groups over several lines and paths inside code) to the top-level module they name.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// One import of a top-level module, where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edge {
    line: usize,
    target: String,
}

/// The layer of each library module, from the numbered list in `lib.rs`'s `# Layers` doc.
fn layers_from_lib_doc(lib: &str) -> BTreeMap<String, usize> {
    let mut layers = BTreeMap::new();
    let mut in_section = false;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            continue;
        };
        let doc = doc.trim();
        if doc.starts_with('#') {
            in_section = doc == "# Layers";
            continue;
        }
        if !in_section {
            continue;
        }
        // "N. `a`, `b`: what they are"
        let Some((number, rest)) = doc.split_once(". ") else {
            continue;
        };
        let Ok(rank) = number.parse::<usize>() else {
            continue;
        };
        let names = rest.split_once(':').map_or(rest, |(names, _)| names);
        for name in names.split(',') {
            let name = name.trim().trim_matches('`');
            if !name.is_empty() {
                assert!(
                    layers.insert(name.to_string(), rank).is_none(),
                    "lib.rs lists module {name} in more than one layer"
                );
            }
        }
    }
    layers
}

/// The `pub mod` / `mod` names declared at the top of a crate root file.
fn declared_modules(root: &str) -> Vec<String> {
    root.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_string())
        })
        .collect()
}

/// A token of the source with comments, strings and character literals removed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// Splits Rust source into identifiers, `::` and single punctuation, each with its line.
/// Comments (nested block comments too), string literals (plain, byte, raw) and character
/// literals are dropped, so a `crate::hub` in a doc comment or a message is not an import.
fn tokenize(src: &str) -> Vec<(usize, Tok)> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if c == '"' || ((c == 'b' || c == 'c') && at(i + 1) == '"') {
            i += if c == '"' { 1 } else { 2 };
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if at(i) == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 1;
        } else if (c == 'r'
            && (at(i + 1) == '"' || (at(i + 1) == '#' && matches!(at(i + 2), '"' | '#'))))
            || (c == 'b' && at(i + 1) == 'r' && matches!(at(i + 2), '"' | '#'))
        {
            // Raw string: r"…", r#"…"#, br"…".
            i += if c == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1; // the opening quote
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    i += 1 + hashes;
                    break;
                }
                if chars[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
        } else if c == '\'' || (c == 'b' && at(i + 1) == '\'') {
            let start = if c == 'b' { i + 1 } else { i };
            if at(start + 1) == '\\' {
                // An escaped character literal: '\n', '\'', '\u{..}'.
                i = start + 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(start + 2) == '\'' {
                i = start + 3;
            } else {
                // A lifetime or label: skip the quote, the name follows as an identifier.
                i = start + 1;
            }
        } else if c.is_alphanumeric() || c == '_' {
            if c == 'r' && at(i + 1) == '#' {
                i += 2; // raw identifier r#name
            }
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((line, Tok::Ident(chars[start..i].iter().collect())));
        } else if c == ':' && at(i + 1) == ':' {
            out.push((line, Tok::PathSep));
            i += 2;
        } else {
            out.push((line, Tok::Punct(c)));
            i += 1;
        }
    }
    out
}

/// Every top-level module a file at module path `module` (e.g. `["hub", "kube_api"]`)
/// reaches through `crate::` or `super::`, with the line of each mention. Paths inside an
/// inline `mod name { … }` resolve `super` from that inline module.
fn imports(src: &str, module: &[String]) -> Vec<Edge> {
    let toks = tokenize(src);
    let mut edges = Vec::new();
    // Inline modules open at the moment, with the brace depth their body starts at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut pending_mod: Option<String> = None;
    let ident = |k: usize| match toks.get(k) {
        Some((_, Tok::Ident(s))) => Some(s.as_str()),
        _ => None,
    };
    let is = |k: usize, t: &Tok| toks.get(k).map(|(_, x)| x) == Some(t);
    let mut k = 0;
    while k < toks.len() {
        let (line, tok) = &toks[k];
        match tok {
            Tok::Punct('{') => {
                depth += 1;
                if let Some(name) = pending_mod.take() {
                    inline.push((name, depth));
                }
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Punct(';') => pending_mod = None,
            Tok::Ident(word) if word == "mod" => {
                pending_mod = ident(k + 1).map(str::to_string);
            }
            Tok::Ident(word)
                if (word == "crate" || word == "super")
                    && is(k + 1, &Tok::PathSep)
                    && !(k > 0 && is(k - 1, &Tok::Punct('$')))
                    && !(k > 0 && is(k - 1, &Tok::PathSep)) =>
            {
                // Where the path starts: the crate root, or this file's module (plus its
                // open inline modules) climbed once per `super`.
                let mut next = k;
                let mut base: Vec<String> = Vec::new();
                if word == "super" {
                    base.extend(module.iter().cloned());
                    base.extend(inline.iter().map(|(n, _)| n.clone()));
                    while ident(next) == Some("super") && is(next + 1, &Tok::PathSep) {
                        base.pop();
                        next += 2;
                    }
                } else {
                    next += 2;
                }
                if let Some(top) = base.first() {
                    edges.push(Edge {
                        line: *line,
                        target: top.clone(),
                    });
                } else if let Some(name) = ident(next) {
                    edges.push(Edge {
                        line: *line,
                        target: name.to_string(),
                    });
                } else if is(next, &Tok::Punct('{')) {
                    // `use crate::{a::X, b}`: every name at the group's first level.
                    let mut level = 0;
                    let mut j = next;
                    let mut expect_name = true;
                    while j < toks.len() {
                        match &toks[j].1 {
                            Tok::Punct('{') => {
                                level += 1;
                                expect_name = level == 1;
                            }
                            Tok::Punct('}') => {
                                level -= 1;
                                if level == 0 {
                                    break;
                                }
                            }
                            Tok::Punct(',') if level == 1 => expect_name = true,
                            Tok::Ident(name) if expect_name && level == 1 => {
                                if name != "self" {
                                    edges.push(Edge {
                                        line: toks[j].0,
                                        target: name.clone(),
                                    });
                                }
                                expect_name = false;
                            }
                            _ => {}
                        }
                        j += 1;
                    }
                }
                k = next;
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    edges
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file below `src/`: `hub/kube_api.rs` → `[hub, kube_api]`,
/// `hub/mod.rs` → `[hub]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Every forbidden edge in the tree, one readable line each.
fn violations(src_dir: &Path) -> Vec<String> {
    let lib = fs::read_to_string(src_dir.join("lib.rs")).unwrap();
    let main = fs::read_to_string(src_dir.join("main.rs")).unwrap();
    let layers = layers_from_lib_doc(&lib);
    let library = declared_modules(&lib);
    let binary = declared_modules(&main);
    let mut problems = Vec::new();
    for m in &library {
        if !layers.contains_key(m) {
            problems.push(format!(
                "src/lib.rs: module {m} has no layer in lib.rs's `# Layers` doc"
            ));
        }
    }
    for m in layers.keys() {
        if !library.contains(m) {
            problems.push(format!(
                "src/lib.rs: the `# Layers` doc lists {m}, which is not a module"
            ));
        }
    }
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    files.sort();
    for file in files {
        let rel = file.strip_prefix(src_dir).unwrap();
        let module = module_path(rel);
        let shown = format!("src/{}", rel.display());
        let Some(top) = module.first() else { continue };
        if top == "lib" || top == "main" || binary.contains(top) {
            continue; // The binary sits above every layer.
        }
        let Some(&own) = layers.get(top) else {
            problems.push(format!("{shown}: module {top} has no layer"));
            continue;
        };
        let text = fs::read_to_string(&file).unwrap();
        for edge in imports(&text, &module) {
            if edge.target == *top {
                continue;
            }
            let Some(&theirs) = layers.get(&edge.target) else {
                continue; // Not a top-level module (e.g. a re-exported item of the root).
            };
            if theirs < own {
                continue;
            }
            let why = if theirs == own {
                "a module of the same layer"
            } else {
                "a higher layer"
            };
            let source = text.lines().nth(edge.line - 1).unwrap_or("").trim();
            problems.push(format!(
                "{shown}:{}: {top} (layer {own}) imports {} (layer {theirs}), {why}: {source}",
                edge.line, edge.target
            ));
        }
    }
    problems
}

#[test]
fn every_module_imports_only_from_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&src);
    assert!(
        problems.is_empty(),
        "{} forbidden import(s); the order is in src/lib.rs (# Layers):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn lib_doc_lists_the_layers_in_order() {
    let lib = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let layers = layers_from_lib_doc(&lib);
    for (lower, upper) in [
        ("proto", "transport"),
        ("transport", "hub"),
        ("transport", "agent"),
    ] {
        assert!(
            layers[lower] < layers[upper],
            "{lower} must sit below {upper}: {layers:?}"
        );
    }
    assert_eq!(layers["hub"], layers["agent"], "hub and agent are peers");
}

fn names(edges: &[Edge]) -> Vec<(usize, &str)> {
    edges.iter().map(|e| (e.line, e.target.as_str())).collect()
}

#[test]
fn scanner_finds_crate_paths_use_groups_and_super() {
    let module = vec!["agent".to_string(), "admin".to_string()];
    let src = r##"
use crate::listen::Acceptor;
use crate::{
    certs::{self, CertError},
    proto,
};
fn f() { let r = crate::hub::metrics::registry(); }
use super::super::config::X;
"##;
    assert_eq!(
        names(&imports(src, &module)),
        vec![
            (2, "listen"),
            (4, "certs"),
            (5, "proto"),
            (7, "hub"),
            (8, "config")
        ]
    );
    // `super::` from a file of a folder stays in its top module.
    assert_eq!(
        names(&imports("use super::policy::Rule;", &module)),
        vec![(1, "agent")]
    );
}

#[test]
fn scanner_ignores_comments_strings_and_macro_crate() {
    let module = vec!["proto".to_string()];
    let src = r##"
// use crate::hub::X;
/* crate::agent /* nested */ crate::hub */
/// See [`crate::hub::Hub`].
const A: &str = "crate::hub::Hub";
const B: &str = r#"crate::agent "quoted" "#;
const C: char = '"';
fn g<'a>(x: &'a str) -> &'a str { x }
macro_rules! m { () => { $crate::hub::X } }
use crate::auth::Secret;
"##;
    assert_eq!(names(&imports(src, &module)), vec![(10, "auth")]);
}

#[test]
fn scanner_resolves_super_inside_inline_modules() {
    // In src/certs.rs, `mod tests { use super::*; }` means certs itself, not the crate root.
    let module = vec!["certs".to_string()];
    let src = "mod tests {\n    use super::*;\n    use super::super::hub;\n}\nuse super::agent;\n";
    assert_eq!(
        names(&imports(src, &module)),
        vec![(2, "certs"), (3, "hub"), (5, "agent")]
    );
}

#[test]
fn a_back_edge_is_reported_with_file_line_and_edge() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    fs::write(
        src.join("lib.rs"),
        "//! # Layers\n//!\n//! 1. `low`: a leaf\n//! 2. `hub`, `agent`: roles\n\
         pub mod agent;\npub mod hub;\npub mod low;\n",
    )
    .unwrap();
    fs::write(src.join("main.rs"), "fn main() {}\n").unwrap();
    fs::write(src.join("low.rs"), "use crate::hub::Thing;\n").unwrap();
    fs::create_dir(src.join("agent")).unwrap();
    fs::write(
        src.join("agent/mod.rs"),
        "use crate::low;\nfn f() {\n    crate::hub::go();\n}\n",
    )
    .unwrap();
    fs::write(src.join("hub.rs"), "use crate::low::X;\n").unwrap();
    let problems = violations(src);
    assert_eq!(
        problems,
        vec![
            "src/agent/mod.rs:3: agent (layer 2) imports hub (layer 2), a module of the same \
             layer: crate::hub::go();"
                .to_string(),
            "src/low.rs:1: low (layer 1) imports hub (layer 2), a higher layer: use \
             crate::hub::Thing;"
                .to_string(),
        ]
    );
    // A module missing from the list is named too.
    fs::write(
        src.join("lib.rs"),
        "//! # Layers\n//!\n//! 1. `low`: a leaf\npub mod low;\npub mod extra;\n",
    )
    .unwrap();
    assert!(violations(src)
        .iter()
        .any(|p| p.contains("module extra has no layer")));
}
