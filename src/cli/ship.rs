//! What packagers install beside the binary: shell completions and man pages, both generated
//! from the clap definitions `rna` parses its own command line with, so they never drift
//! from the flags the binary really takes.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use clap_complete::Shell;

/// `rna --version`: the crate version, then the git commit, build date and target triple
/// that build.rs stamped in ("unknown" when built from a tree without git).
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("RNA_GIT_COMMIT"),
    "\nbuilt: ",
    env!("RNA_BUILD_DATE"),
    "\ntarget: ",
    env!("RNA_BUILD_TARGET"),
);

/// The shells `rna completions` writes a script for.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CompletionShell {
    /// Bash (bash-completion): source it, or install it as
    /// /usr/share/bash-completion/completions/rna.
    Bash,
    /// Zsh: install as `_rna` in a folder of $fpath (/usr/share/zsh/vendor-completions).
    Zsh,
    /// Fish: install as /usr/share/fish/vendor_completions.d/rna.fish.
    Fish,
}

/// `rna completions SHELL`.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write the completion script for.
    #[arg(value_enum)]
    shell: CompletionShell,
}

/// `rna manpages --dir DIR` (hidden: a packaging step, not a daily command).
#[derive(Args, Debug)]
pub struct ManpagesArgs {
    /// Folder to write rna.1 and one page per subcommand (rna-hub.1, rna-certs-init.1, …)
    /// into; created when missing.
    #[arg(long)]
    pub dir: PathBuf,
}

/// The completion script for `args.shell`, for the command line `cmd` describes.
pub fn completions(args: &CompletionsArgs, cmd: &mut clap::Command) -> Vec<u8> {
    let shell = match args.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut script = Vec::new();
    // Written to memory so that a closed stdout is handled once, by the caller, instead of
    // panicking inside the generator.
    clap_complete::generate(shell, cmd, "rna", &mut script);
    script
}

/// Writes the man pages of `cmd` and of each visible subcommand into `args.dir`.
pub fn manpages(args: &ManpagesArgs, cmd: clap::Command) -> std::io::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    clap_mangen::generate_to(cmd, &args.dir)
}
