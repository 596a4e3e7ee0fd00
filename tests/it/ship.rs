//! What packages install beside the binary: `rna --version` names the commit, build date and
//! target; `rna completions` and the man pages come from the same clap definitions the binary
//! parses, so every subcommand and flag the binary takes appears in them.

use std::path::Path;
use std::process::Command;

use crate::common::{Ran, Rna};

/// `rna ARGS` with the default log format.
fn rna(args: &[&str]) -> Ran {
    Rna::new(args).env_remove("RNA_LOG_FORMAT").run()
}

fn stdout(out: &Ran) -> String {
    assert!(out.status.success(), "rna failed: {}", out.stderr);
    out.stdout.clone()
}

/// The subcommands `rna help` lists (the visible ones), without `help` itself.
fn subcommands(path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let text = stdout(&rna(&args));
    let mut names = Vec::new();
    let mut in_commands = false;
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            // Entries are indented two spaces; descriptions wrapped below are indented more.
            match line.strip_prefix("  ") {
                Some(rest) if !rest.starts_with(' ') => {
                    let name = rest.split_whitespace().next().unwrap_or("");
                    if !name.is_empty() && name != "help" {
                        names.push(name.to_string());
                    }
                }
                Some(_) => {}
                None => in_commands = false,
            }
        }
    }
    names
}

/// The long flags `rna PATH --help` lists as its own options (the usage line also names
/// required flags of parent commands, which belong to the parent's page).
fn long_flags(path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let text = stdout(&rna(&args));
    let mut flags: Vec<String> = text
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == ',' || c == '='))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.to_string())
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

#[test]
fn version_names_the_commit_build_date_and_target() {
    let text = stdout(&rna(&["--version"]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(concat!("rna ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let field = |name: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no `{name}:` line in {text}"))
            .to_string()
    };
    let commit = field("commit");
    // In a git checkout the commit is HEAD's; from a tarball it is "unknown".
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(head) if std::env::var_os("RNA_GIT_COMMIT").is_none() => {
            assert_eq!(commit, head, "{text}")
        }
        _ => assert!(!commit.is_empty(), "{text}"),
    }
    let date = field("built");
    let digits: Vec<&str> = date.split('-').collect();
    assert!(
        digits.len() == 3
            && digits[0].len() == 4
            && digits[1].len() == 2
            && digits[2].len() == 2
            && digits.iter().all(|d| d.chars().all(|c| c.is_ascii_digit())),
        "build date {date:?} is not YYYY-MM-DD"
    );
    let target = field("target");
    assert!(
        target.starts_with(std::env::consts::ARCH) && target.contains(std::env::consts::OS),
        "target {target:?} is not this machine's"
    );
    // The short form stays one line, for scripts.
    let short = stdout(&rna(&["-V"]));
    assert_eq!(short.trim_end(), lines[0]);
}

#[test]
fn completions_name_every_subcommand_and_flag() {
    let top = subcommands(&[]);
    for want in [
        "dev",
        "hub",
        "agent",
        "certs",
        "token",
        "kube",
        "completions",
    ] {
        assert!(top.iter().any(|s| s == want), "{want} not in {top:?}");
    }
    assert!(!top.iter().any(|s| s == "manpages"), "manpages is hidden");
    let hub_flags = long_flags(&["hub"]);
    assert!(
        hub_flags.iter().any(|f| f == "--check-config"),
        "{hub_flags:?}"
    );
    for (shell, marker) in [
        ("bash", "complete -F _rna"),
        ("zsh", "#compdef rna"),
        ("fish", "complete -c rna"),
    ] {
        let script = stdout(&rna(&["completions", shell]));
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        for sub in &top {
            assert!(
                script.contains(sub.as_str()),
                "{shell}: no subcommand {sub}"
            );
        }
        for flag in &hub_flags {
            // fish names long flags without their dashes (`-l check-config`).
            assert!(
                script.contains(flag.trim_start_matches('-')),
                "{shell}: no hub flag {flag}"
            );
        }
    }
}

#[test]
fn bash_completion_completes_subcommands_and_flags() {
    // The script is loaded into a real bash and its function called with the arguments bash
    // passes (command, current word, previous word): `rna hu<TAB>` and `rna hub --check-<TAB>`.
    let script = stdout(&rna(&["completions", "bash"]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rna.bash");
    std::fs::write(&file, script).unwrap();
    let ask = |words: &str| -> String {
        let out = Command::new("bash")
            .arg("--norc")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
                 COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; \
                 _rna rna \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                file.display()
            ))
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "bash: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(ask("rna hu").trim(), "hub");
    assert_eq!(ask("rna hub --check-").trim(), "--check-config");
}

#[test]
fn completions_refuse_an_unknown_shell() {
    let out = rna(&["completions", "pwsh"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = &out.stderr;
    assert!(
        stderr.contains("invalid value 'pwsh'") && stderr.contains("bash, zsh, fish"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// Every page `rna manpages` writes, and that each lists the flags of its command.
#[test]
fn man_pages_are_generated_for_every_command_with_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man1");
    let out = rna(&["manpages", "--dir", out_dir.to_str().unwrap()]);
    stdout(&out);
    // Every visible command, recursively: rna.1, rna-hub.1, rna-certs-init.1, …
    let mut want = vec![Vec::<String>::new()];
    let mut stack = vec![Vec::<String>::new()];
    while let Some(path) = stack.pop() {
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        for sub in subcommands(&refs) {
            let mut child = path.clone();
            child.push(sub);
            want.push(child.clone());
            stack.push(child);
        }
    }
    assert!(want.len() > 10, "{want:?}");
    let mut written: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    let mut expected: Vec<String> = want
        .iter()
        .map(|p| {
            let mut name = String::from("rna");
            for part in p {
                name.push('-');
                name.push_str(part);
            }
            format!("{name}.1")
        })
        .collect();
    expected.sort();
    assert_eq!(written, expected);
    for path in &want {
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        let page_name = if path.is_empty() {
            "rna.1".to_string()
        } else {
            format!("rna-{}.1", path.join("-"))
        };
        let page = std::fs::read_to_string(out_dir.join(&page_name)).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains(".TH"),
            "{page_name}"
        );
        for flag in long_flags(&refs) {
            // roff escapes each dash.
            let escaped = flag.replace('-', "\\-");
            assert!(page.contains(&escaped), "{page_name}: no {flag}");
        }
    }
    check_renders(&out_dir.join("rna-hub.1"));
}

/// groff renders the page without a warning (what lintian checks), when groff is installed.
fn check_renders(page: &Path) {
    let Ok(out) = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(page)
        .output()
    else {
        return;
    };
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}: {}",
        page.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn man_pages_into_an_unwritable_place_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let target = file.join("man1");
    let out = rna(&["manpages", "--dir", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = &out.stderr;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("rna: cannot write the man pages into ")
            && stderr.contains(&target.display().to_string()),
        "{stderr}"
    );
}

/// The kustomize base renders (with the kubectl the tests already need), every workload in
/// it runs the image the Dockerfile builds at this version, and no manifest names an image of
/// its own; the Dockerfile's runtime stage is non-root with `rna` as entrypoint.
#[test]
fn the_kustomize_base_runs_the_image_the_dockerfile_builds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let version = env!("CARGO_PKG_VERSION");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let runtime = dockerfile
        .split("FROM scratch AS runtime")
        .nth(1)
        .expect("a runtime stage FROM scratch");
    for line in [
        format!("ARG VERSION={version}"),
        "USER 65532:65532".to_string(),
        "ENTRYPOINT [\"/usr/bin/rna\"]".to_string(),
    ] {
        assert!(runtime.lines().any(|l| l.trim() == line), "no `{line}`");
    }
    for label in ["version", "source", "licenses"] {
        assert!(
            runtime.contains(&format!("org.opencontainers.image.{label}=")),
            "no {label} label"
        );
    }

    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root.join("deploy/kubernetes"))
        .output()
        .expect("run kubectl (Debian: kubernetes-client; .ci/run installs it)");
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    let images: Vec<&str> = rendered
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert_eq!(images.len(), 2, "{rendered}");
    for image in images {
        assert_eq!(image, format!("localhost/rna:{version}"));
    }
    for file in ["agent.yaml", "hub.yaml"] {
        let text = std::fs::read_to_string(root.join("deploy/kubernetes").join(file)).unwrap();
        for line in text.lines().filter(|l| l.trim().starts_with("image:")) {
            assert!(
                line.trim().starts_with("image: rna "),
                "{file} names an image the base does not set: {line}"
            );
        }
    }
}
