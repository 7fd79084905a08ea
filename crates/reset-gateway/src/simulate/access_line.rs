//! The fields of an access line a replay reads, and how they are read: first by a scanner
//! for the flat objects the gateway writes (json_line.rs: one level, no whitespace, keys
//! and most strings with nothing to unescape), and by `serde_json` for any line the
//! scanner does not take. The scanner takes a line only when every byte of it is one it
//! understands exactly; it hands back nothing (and serde_json reads the line) at the first
//! escape, nested value, space, unusual number, type serde would refuse or repeated field.
//! So both read every line alike; the scanner took reading a million lines from 1.0 s to
//! 0.4 s (ARCHITECTURE.md, "The access-line scanner").

use std::borrow::Cow;

use serde::Deserialize;

/// The fields of an access line the replay reads; the others are ignored.
#[derive(Debug, Default, PartialEq, Deserialize)]
pub(crate) struct AccessLine<'a> {
    #[serde(borrow)]
    pub(crate) target: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) received_at: Option<Cow<'a, str>>,
    pub(crate) guarded: Option<bool>,
    #[serde(borrow)]
    pub(crate) client_ip: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) client_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) email_hash: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) outcome: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) limit: Option<Cow<'a, str>>,
    /// A summary line's (summary.rs).
    pub(crate) count: Option<u64>,
    #[serde(borrow)]
    pub(crate) last_received_at: Option<Cow<'a, str>>,
}

impl<'a> AccessLine<'a> {
    /// Reads one JSON object (no trailing whitespace).
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, serde_json::Error> {
        match scan(bytes) {
            Some(line) => Ok(line),
            // serde_json checks the UTF-8 of what it reads; reading the bytes spares a pass.
            None => serde_json::from_slice(bytes),
        }
    }
}

/// A value the scanner reads.
enum Value<'a> {
    Str(&'a str),
    Bool(bool),
    Null,
    /// A number, as written (JSON number syntax checked).
    Number(&'a [u8]),
}

/// The line as serde_json would read it, if it is a flat object the scanner reads exactly.
pub(crate) fn scan(bytes: &[u8]) -> Option<AccessLine<'_>> {
    // A backslash (an escape) or a control character (raw in a string, which serde_json
    // refuses) anywhere: serde_json's line. Looked for in one pass that never branches, and
    // the UTF-8 checked once for the whole line rather than string by string.
    if bytes
        .iter()
        .fold(false, |found, &b| found | (b < 0x20) | (b == b'\\'))
    {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let mut line = AccessLine::default();
    let mut seen = 0;
    let mut at = 1;
    if bytes.first() != Some(&b'{') {
        return None;
    }
    if bytes.get(at) == Some(&b'}') {
        return (bytes.len() == 2).then_some(line);
    }
    loop {
        if bytes.get(at) != Some(&b'"') {
            return None;
        }
        let key = string(text, &mut at)?;
        if bytes.get(at) != Some(&b':') {
            return None;
        }
        at += 1;
        let value = value(text, &mut at)?;
        set(&mut line, &mut seen, key, value)?;
        match bytes.get(at) {
            Some(b',') => at += 1,
            Some(b'}') if at + 1 == bytes.len() => return Some(line),
            _ => return None,
        }
    }
}

/// Stores a field the replay reads; `None` when serde_json would refuse it (a repeated
/// field, even one given as null; a value of the wrong type) or the scanner might read
/// it otherwise (a number other than a plain integer for `count`). `seen` has a bit per
/// field stored.
fn set<'a>(line: &mut AccessLine<'a>, seen: &mut u16, key: &str, value: Value<'a>) -> Option<()> {
    let (bit, text) = match key {
        "target" => (0, &mut line.target),
        "received_at" => (1, &mut line.received_at),
        "client_ip" => (2, &mut line.client_ip),
        "client_id" => (3, &mut line.client_id),
        "email_hash" => (4, &mut line.email_hash),
        "outcome" => (5, &mut line.outcome),
        "limit" => (6, &mut line.limit),
        "last_received_at" => (7, &mut line.last_received_at),
        "guarded" | "count" => {
            let bit = if key == "guarded" { 8 } else { 9 };
            once(seen, bit)?;
            match (key, value) {
                (_, Value::Null) => {}
                ("guarded", Value::Bool(b)) => line.guarded = Some(b),
                ("count", Value::Number(digits)) => line.count = Some(plain_u64(digits)?),
                _ => return None,
            }
            return Some(());
        }
        _ => return Some(()),
    };
    once(seen, bit)?;
    match value {
        Value::Str(s) => *text = Some(Cow::Borrowed(s)),
        Value::Null => {}
        _ => return None,
    }
    Some(())
}

/// Marks field `bit` seen; `None` if it was already.
fn once(seen: &mut u16, bit: u16) -> Option<()> {
    let mask = 1 << bit;
    (*seen & mask == 0).then(|| *seen |= mask)
}

/// The string starting at the `"` at `at` (the line has nothing to unescape); `at` is
/// left after its closing `"`.
fn string<'a>(text: &'a str, at: &mut usize) -> Option<&'a str> {
    let start = *at + 1;
    let len = memchr::memchr(b'"', text.as_bytes().get(start..)?)?;
    *at = start + len + 1;
    // Both ends are ASCII quotes, so the slice is on character boundaries.
    text.get(start..start + len)
}

/// The value at `at`; `at` is left after it.
fn value<'a>(text: &'a str, at: &mut usize) -> Option<Value<'a>> {
    let bytes = text.as_bytes();
    let literal = |word: &[u8], value: Value<'a>, at: &mut usize| {
        let end = *at + word.len();
        (bytes.get(*at..end)? == word).then(|| {
            *at = end;
            value
        })
    };
    match bytes.get(*at)? {
        b'"' => string(text, at).map(Value::Str),
        b't' => literal(b"true", Value::Bool(true), at),
        b'f' => literal(b"false", Value::Bool(false), at),
        b'n' => literal(b"null", Value::Null, at),
        b'-' | b'0'..=b'9' => {
            let start = *at;
            *at = number_end(bytes, start)?;
            Some(Value::Number(&bytes[start..*at]))
        }
        _ => None,
    }
}

/// Where the JSON number starting at `at` ends: `-? (0 | [1-9][0-9]*) (. [0-9]+)?
/// ([eE] [+-]? [0-9]+)?`.
fn number_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    let digits = |at: &mut usize| {
        let start = *at;
        while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        *at > start
    };
    if bytes.get(at) == Some(&b'-') {
        at += 1;
    }
    match bytes.get(at)? {
        b'0' => at += 1,
        b'1'..=b'9' => {
            digits(&mut at);
        }
        _ => return None,
    }
    if bytes.get(at) == Some(&b'.') {
        at += 1;
        if !digits(&mut at) {
            return None;
        }
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        if !digits(&mut at) {
            return None;
        }
    }
    Some(at)
}

/// A non-negative integer of at most 19 digits (so it fits), without a leading zero.
fn plain_u64(digits: &[u8]) -> Option<u64> {
    let plain = matches!(digits, [b'0'] | [b'1'..=b'9', ..])
        && digits.len() <= 19
        && digits.iter().all(u8::is_ascii_digit);
    plain.then(|| {
        digits
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests;
