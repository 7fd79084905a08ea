//! Why an exchange with QuickBlox failed, in a few words for the log.

use std::error::Error;

/// Why an exchange with QuickBlox failed, in a few words for the log ("connect refused",
/// "tls: invalid peer certificate: UnknownIssuer", "connection reset"): the innermost
/// cause that says something. Built from error messages only; hyper, I/O and rustls
/// errors carry no header value, so no key or token.
pub fn upstream_error<'a>(chain: impl Iterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut causes: Vec<&(dyn Error + 'static)> = Vec::new();
    for cause in chain {
        with_wrapped(&mut causes, cause);
    }
    for &cause in causes.iter().rev() {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return format!("tls: {tls}");
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            let said = match io.kind() {
                ConnectionRefused => "connect refused",
                TimedOut => "timed out",
                ConnectionReset => "connection reset",
                ConnectionAborted => "connection aborted",
                BrokenPipe => "broken pipe",
                UnexpectedEof => "connection closed",
                _ => continue,
            };
            return said.to_owned();
        }
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            let said = if hyper.is_timeout() {
                "timed out"
            } else if hyper.is_incomplete_message() {
                "connection closed before the answer"
            } else if hyper.is_parse_too_large() {
                "answer head over 16 KiB"
            } else if hyper.is_parse() || hyper.is_parse_status() {
                "invalid answer"
            } else if hyper.is_closed() || hyper.is_canceled() {
                "connection closed"
            } else {
                continue;
            };
            return said.to_owned();
        }
    }
    // Nothing known (a failed name lookup, say): the innermost message.
    causes.last().map_or_else(String::new, ToString::to_string)
}

/// Adds `cause` to `causes`, and what it wraps: an I/O error's `source` skips the error it
/// wraps (rustls's, say), which may be an I/O error wrapping another in turn (hyper-rustls
/// wraps tokio-rustls's, which wraps rustls's), each with its own sources.
fn with_wrapped<'a>(causes: &mut Vec<&'a (dyn Error + 'static)>, cause: &'a (dyn Error + 'static)) {
    causes.push(cause);
    if let Some(inner) = cause
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        let inner: &(dyn Error + 'static) = inner;
        for next in std::iter::successors(Some(inner), |&e| e.source()) {
            with_wrapped(causes, next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_name_their_innermost_known_cause() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let wrapped = std::io::Error::other(refused);
        assert_eq!(
            upstream_error(std::iter::once(&wrapped as &(dyn Error + 'static))),
            "connect refused"
        );
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(
            upstream_error(std::iter::once(&tls as &(dyn Error + 'static))),
            "tls: invalid peer certificate: UnknownIssuer"
        );
        // Wrapped twice, as hyper-rustls hands on tokio-rustls's error.
        let twice = std::io::Error::other(tls);
        assert_eq!(
            upstream_error(std::iter::once(&twice as &(dyn Error + 'static))),
            "tls: invalid peer certificate: UnknownIssuer"
        );
        let dns = std::io::Error::other("failed to lookup address information");
        assert_eq!(
            upstream_error(std::iter::once(&dns as &(dyn Error + 'static))),
            "failed to lookup address information"
        );
    }
}
