//! The `email` query parameter (guard step 4 in ARCHITECTURE.md, "The request's path"):
//! exactly once, percent-decoded.

use std::borrow::Cow;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::rejection::Rejection;

/// The decoded value of the one `email` parameter.
///
/// Only `%XX` is decoded: a literal `+` stays a plus (`bob+tag@x.io` is what users type),
/// and names are decoded too, so `%65mail` cannot smuggle a second `email` past the count.
pub fn email_param(query: Option<&str>) -> Result<Cow<'_, str>, Rejection> {
    let mut found = None;
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !is_email_name(name) {
            continue;
        }
        if found.replace(value).is_some() {
            return Err(Rejection::EmailRepeated);
        }
    }
    let raw = found.ok_or(Rejection::EmailMissing)?;
    if raw.is_empty() {
        return Err(Rejection::EmailMissing);
    }
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    // Decoded into one buffer of the right size rather than grown a byte at a time.
    let mut decoded = Vec::with_capacity(raw.len());
    decoded.extend(percent_decode_str(raw));
    String::from_utf8(decoded)
        .map(Cow::Owned)
        .map_err(|_| Rejection::EmailNotUtf8)
}

fn is_email_name(name: &str) -> bool {
    if name == "email" {
        return true;
    }
    name.contains('%') && percent_decode_str(name).eq(b"email".iter().copied())
}

/// Everything but RFC 3986 unreserved characters and `@` is escaped, so a `+` reaches
/// QuickBlox as `%2B` and is never read as a space.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@');

/// Percent-encodes an address for the upstream query string: display it, or append its
/// pieces to a string.
pub fn encode_query_value(value: &str) -> impl std::fmt::Display + Iterator<Item = &str> {
    utf8_percent_encode(value, QUERY_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::email::{Email, EmailPolicy};
    use proptest::prelude::*;

    #[test]
    fn finds_the_one_email() {
        assert_eq!(email_param(Some("email=a%40b.io")).as_deref(), Ok("a@b.io"));
        assert_eq!(
            email_param(Some("x=1&email=a@b.io&y")).as_deref(),
            Ok("a@b.io")
        );
        assert_eq!(
            email_param(Some("email=a+b@c.io")).as_deref(),
            Ok("a+b@c.io")
        );
        assert_eq!(
            email_param(Some("email=a%252540b")).as_deref(),
            Ok("a%2540b")
        );
    }

    #[test]
    fn counts_every_spelling_of_the_name() {
        assert_eq!(email_param(None), Err(Rejection::EmailMissing));
        assert_eq!(
            email_param(Some("Email=a@b.io")),
            Err(Rejection::EmailMissing)
        );
        assert_eq!(email_param(Some("email=")), Err(Rejection::EmailMissing));
        assert_eq!(email_param(Some("email")), Err(Rejection::EmailMissing));
        assert_eq!(
            email_param(Some("email=a@b.io&email=c@d.io")),
            Err(Rejection::EmailRepeated)
        );
        assert_eq!(
            email_param(Some("email=a@b.io&%65mail=c@d.io")),
            Err(Rejection::EmailRepeated)
        );
        assert_eq!(
            email_param(Some("email=%FF@b.io")),
            Err(Rejection::EmailNotUtf8)
        );
    }

    #[test]
    fn encoding_escapes_plus_and_unicode() {
        assert_eq!(
            encode_query_value("b+x@bü.io").to_string(),
            "b%2Bx@b%C3%BC.io"
        );
    }

    proptest! {
        #[test]
        fn never_panics(query in any::<String>()) {
            let _ = email_param(Some(&query));
        }

        #[test]
        fn accepted_addresses_re_encode_to_themselves(address in any::<String>()) {
            let policy = EmailPolicy { allow_utf8_local: true };
            if let Ok(email) = Email::parse(&address, policy) {
                let query = format!("email={}", encode_query_value(email.as_str()));
                let decoded = email_param(Some(&query)).unwrap();
                prop_assert_eq!(Email::parse(&decoded, policy).unwrap(), email);
            }
        }

        #[test]
        fn valid_shapes_re_encode_to_themselves(
            local in "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,30}",
            domain in "[a-z0-9]{1,10}\\.(com|io|example|xn--bcher-kva)",
        ) {
            let address = format!("{local}@{domain}");
            let email = Email::parse(&address, EmailPolicy::default()).unwrap();
            let query = format!("email={}", encode_query_value(email.as_str()));
            prop_assert_eq!(email_param(Some(&query)).unwrap(), address.as_str());
        }
    }
}
