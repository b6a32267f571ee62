//! The commands' standard output (see `outln!`).

use std::io::Write;

/// Writes one line to standard output; exits quietly if nobody reads it any more.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("secondsite: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }
}
