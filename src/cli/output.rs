//! Standard output of the commands: one line at a time, ending the process quietly when the
//! reader went away.

/// Writes one line to stdout. A reader that went away (`rna hub --check-config | head -1`)
/// ends the process quietly with success, as SIGPIPE ends a C filter: nobody is left to read
/// an error, and a panic would only add noise on stderr.
pub(crate) fn emit(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("rna: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// `println!` through [`emit`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::output::emit(format_args!($($arg)*)) };
}
