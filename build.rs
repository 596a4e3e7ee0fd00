//! Stamps the binary with what `rna --version` reports beyond the crate version: the git
//! commit, the build date and the target triple.
//!
//! It must work from a source tarball (no `.git`: the commit is "unknown") and must not make
//! cargo rerun it on every build, so it watches only git's HEAD and the ref HEAD names, and
//! the variables that override its answers.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Set by image and package builds made from a tree without `.git`.
    println!("cargo:rerun-if-env-changed=RNA_GIT_COMMIT");
    // The reproducible-builds convention: a fixed build date for identical outputs.
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");

    let commit = std::env::var("RNA_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_string());
    let date = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        })
        .map_or_else(|| "unknown".to_string(), civil_date);
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());

    println!("cargo:rustc-env=RNA_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=RNA_BUILD_DATE={date}");
    println!("cargo:rustc-env=RNA_BUILD_TARGET={target}");
}

/// The abbreviated commit of HEAD; `None` outside a git checkout or without git. Registers
/// HEAD and the ref it names for rerun, so a new commit restamps the binary.
fn git_commit() -> Option<String> {
    // A source tarball unpacked inside another checkout must not take that checkout's commit.
    let top = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    if top.canonicalize().ok()? != manifest.canonicalize().ok()? {
        return None;
    }
    let head = git(&["rev-parse", "--short=12", "HEAD"])?;
    // HEAD and its ref file change on checkout and commit; the reflog of HEAD and packed-refs
    // cover a ref that is packed (no file of its own) when it moves.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        head_ref_path(),
        git(&["rev-parse", "--git-path", "logs/HEAD"]),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ]
    .into_iter()
    .flatten()
    {
        // A path that does not exist would make cargo rerun this script every time.
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(head)
}

/// The file of the branch HEAD points to (absent when the ref is packed or HEAD detached).
fn head_ref_path() -> Option<String> {
    let name = git(&["symbolic-ref", "-q", "HEAD"])?;
    let path = PathBuf::from(git(&["rev-parse", "--git-path", &name])?);
    Some(path.display().to_string())
}

/// Runs git in the package folder; its trimmed stdout when it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// `YYYY-MM-DD` (UTC) of a Unix time, by the days-from-civil inverse (H. Hinnant), so the
/// build needs no date crate.
fn civil_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
