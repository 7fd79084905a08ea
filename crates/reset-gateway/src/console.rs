//! Writing to the terminal without `println!`'s panic: a command's output piped into a
//! reader that has already gone (`| head`, a closed log pipe) must not turn an error
//! report into a crash with Rust's panic exit code.

use std::fmt;
use std::io::Write;

/// Writes to stdout; false when it cannot be written (the caller decides if that fails
/// the command: for `hash-token`, whose output is the point, it does).
pub fn out(text: fmt::Arguments) -> bool {
    let mut stdout = std::io::stdout().lock();
    stdout.write_fmt(text).and_then(|()| stdout.flush()).is_ok()
}

/// Writes a line to stderr, if anyone is reading it.
pub fn err(text: fmt::Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}
