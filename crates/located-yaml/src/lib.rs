//! YAML configuration read through serde, with errors that say where: every
//! [`ConfigError`] names its key path (`store.redis.url`, `guard.clients[1].id`) and, when
//! that key is written in the file, the line it is on, whether the error was found while
//! parsing or by checks after.
//!
//! Values come from yaml_serde; the line of each key path from saphyr-parser's events
//! (yaml_serde reports one location per error, which for a bad value inside a block
//! mapping is often the mapping's first line, not the key's).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use saphyr_parser::{Event, Parser};
use serde::de::DeserializeOwned;

/// A configuration error that names the key path and, where known, the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", key_path(.path), at_line(.line))]
pub struct ConfigError {
    /// Dotted key path, such as `guard.clients[0].token_sha256`.
    pub path: String,
    /// 1-based line in the YAML file.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about a key path without a known line.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            line: None,
            message: message.into(),
        }
    }

    /// Prefixes the key path, for a section nested in a larger file.
    pub fn within(mut self, section: &str) -> Self {
        self.path = if self.path.is_empty() {
            section.to_owned()
        } else {
            format!("{section}.{}", self.path)
        };
        self
    }

    /// Places an error found after parsing at the line its key path is written on in
    /// `yaml`; for a key not written (a required one left out, a default that does not
    /// fit), the line of the nearest section around it that is.
    pub fn located(mut self, yaml: &str) -> ConfigError {
        if self.line.is_none() {
            let lines = KeyLines::of(yaml);
            let mut path = self.path.as_str();
            while !path.is_empty() && self.line.is_none() {
                self.line = lines.line(path);
                path = &path[..path.rfind(['.', '[']).unwrap_or(0)];
            }
        }
        self
    }
}

/// How an error names its key: the dotted path, or the file as a whole.
fn key_path(path: &str) -> &str {
    if path.is_empty() {
        "(top level)"
    } else {
        path
    }
}

/// ` (line N)` where the line is known.
fn at_line(line: &Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// Deserializes YAML, turning any error into a [`ConfigError`] with path and line.
pub fn from_yaml<T: DeserializeOwned>(yaml: &str) -> Result<T, ConfigError> {
    let deserializer = yaml_serde::Deserializer::from_str(yaml);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        // `.` is the document; `?` a place the parser never reached a key in (malformed YAML).
        let path = match path.as_str() {
            "." | "?" => String::new(),
            _ => path,
        };
        let inner = error.into_inner();
        let parsed_at = inner.location().map(|l| l.line());
        if let Some(line) = parsed_at.filter(|&l| indented_with_tab(yaml, l)) {
            return ConfigError {
                path,
                line: Some(line),
                message: "indented with a tab; YAML indents with spaces only".to_owned(),
            };
        }
        let message = without_string_value(&without_location(&inner.to_string()));
        // A key written twice: the error is its section's; the line is the second one's.
        let repeated = message
            .strip_prefix("duplicate field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(key, _)| match path.as_str() {
                "" => key.to_owned(),
                section => format!("{section}.{key}"),
            });
        let lines = KeyLines::of(yaml);
        let line = repeated.and_then(|key| lines.line_again(&key));
        ConfigError {
            line: line.or_else(|| lines.line(&path)).or(parsed_at),
            path,
            message,
        }
    })
}

/// Whether `yaml` is well-formed YAML (whatever it holds) to the parser that reads key
/// paths ([`key_paths_in_order`]), which refuses a little that the deserializer takes (a
/// tab after a key's colon).
pub fn parses(yaml: &str) -> bool {
    Parser::new_from_str(yaml).all(|item| item.is_ok())
}

/// Whether the deserializer ([`from_yaml`]) reads `yaml` as YAML (whatever it holds).
pub fn loads(yaml: &str) -> bool {
    yaml_serde::from_str::<yaml_serde::Value>(yaml).is_ok()
}

/// Every key path written in `yaml` (`store`, `store.redis.url`, `guard.clients[1].id`), in
/// the order they are written (by line; those on one line, a flow mapping's, by name); what
/// follows a syntax error is left out.
pub fn key_paths_in_order(yaml: &str) -> Vec<String> {
    let mut paths: Vec<(usize, String)> = KeyLines::of(yaml)
        .first
        .into_iter()
        .map(|(path, line)| (line, path))
        .collect();
    paths.sort();
    paths.into_iter().map(|(_, path)| path).collect()
}

/// The line of every key path written in a document: `store.redis.url`,
/// `guard.clients[1].id`. A sequence item's line is the line it starts on.
struct KeyLines {
    /// The line each path is first written on.
    first: HashMap<String, usize>,
    /// The line a key is written on again in the same mapping (an error).
    again: HashMap<String, usize>,
}

/// Where the parser is in the document's tree.
enum Frame {
    /// In a mapping at `path`; `key` is set between a key and its value.
    Map { path: String, key: Option<String> },
    /// In a sequence at `path`, before item `next`.
    Seq { path: String, next: usize },
}

impl KeyLines {
    /// Reads the first document of `yaml`; what follows a syntax error is left out (the
    /// deserializer reports the error itself).
    fn of(yaml: &str) -> KeyLines {
        let mut lines = HashMap::new();
        let mut again = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(yaml) {
            let Ok((event, span)) = item else { break };
            let line = span.start.line();
            let opens = matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
            match event {
                Event::DocumentEnd => break,
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    continue;
                }
                Event::Scalar(..)
                | Event::Alias(_)
                | Event::MappingStart(..)
                | Event::SequenceStart(..) => {}
                _ => continue,
            }
            // The path of this node, unless it is a mapping's key.
            let path = match stack.last_mut() {
                None => String::new(),
                Some(Frame::Map { path, key }) => match key.take() {
                    Some(key) => join(path, &key),
                    None => {
                        let name = match &event {
                            Event::Scalar(text, ..) => text.to_string(),
                            _ => "?".to_owned(),
                        };
                        let full = join(path, &name);
                        match lines.entry(full) {
                            Entry::Occupied(first) => {
                                again.entry(first.key().clone()).or_insert(line);
                            }
                            Entry::Vacant(first) => {
                                first.insert(line);
                            }
                        }
                        *key = Some(name);
                        if opens {
                            // A complex key: nothing inside it is a key path.
                            stack.push(Frame::Map {
                                path: "?".to_owned(),
                                key: None,
                            });
                        }
                        continue;
                    }
                },
                Some(Frame::Seq { path, next }) => {
                    let item = format!("{path}[{next}]");
                    *next += 1;
                    lines.entry(item.clone()).or_insert(line);
                    item
                }
            };
            match event {
                Event::MappingStart(..) => stack.push(Frame::Map { path, key: None }),
                Event::SequenceStart(..) => stack.push(Frame::Seq { path, next: 0 }),
                _ => {}
            }
        }
        KeyLines {
            first: lines,
            again,
        }
    }

    fn line(&self, path: &str) -> Option<usize> {
        self.first.get(path).copied()
    }

    /// The line `path` is written on a second time, if it is.
    fn line_again(&self, path: &str) -> Option<usize> {
        self.again.get(path).copied()
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Whether the indentation of 1-based `line` holds a tab.
fn indented_with_tab(yaml: &str, line: usize) -> bool {
    yaml.lines()
        .nth(line.saturating_sub(1))
        .is_some_and(|text| {
            text.chars()
                .take_while(|c| c.is_whitespace())
                .any(|c| c == '\t')
        })
}

/// The YAML error's own message without the location and path it appends and prefixes:
/// the error carries both as fields.
fn without_location(message: &str) -> String {
    let message = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    match message.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') => rest.to_owned(),
        _ => message.to_owned(),
    }
}

/// serde names a value of the wrong type by quoting it (`invalid type: string "…", expected
/// a sequence`). A value in the wrong place may be a secret (a URL with a password written
/// where a list of them belongs), so the message keeps its type and the line, not the value.
fn without_string_value(message: &str) -> String {
    // `unknown variant `X`, expected one of ...`: a typo of a word is worth echoing
    // (`standalon`); anything else may be a secret written in the wrong place.
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((value, expected)) = rest.split_once('`') {
            let word = value.len() <= 32
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !word {
                return format!("unknown value (not shown){expected}");
            }
        }
    }
    for lead in ["invalid type: string ", "invalid value: string "] {
        let Some(start) = message.find(lead) else {
            continue;
        };
        let quoted = start + lead.len();
        if let Some(end) = message[quoted..].rfind(", expected ") {
            return format!(
                "{}a string{}",
                &message[..quoted - "string ".len()],
                &message[quoted + end..]
            );
        }
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_path_has_the_line_it_is_written_on() {
        let yaml = "\
upstream:
  url: http://a
store:
  kind: redis
  redis:
    url: redis://b
guard:
  clients:
    - id: ios
      token_sha256: x
    - { id: web, token_sha256: y }
  limits:
    per_ip: [{ requests: 1, per: 1m }]
";
        let lines = KeyLines::of(yaml);
        for (path, line) in [
            ("upstream.url", 2),
            ("store.redis", 5),
            ("store.redis.url", 6),
            ("guard.clients[0]", 9),
            ("guard.clients[0].token_sha256", 10),
            ("guard.clients[1].id", 11),
            ("guard.limits.per_ip[0].per", 13),
        ] {
            assert_eq!(lines.line(path), Some(line), "{path}");
        }
        assert_eq!(lines.line("store.redis.timeout"), None);
    }

    #[test]
    fn a_key_not_written_is_placed_at_its_section_and_a_repeated_key_at_its_repeat() {
        let yaml = "store:\n  kind: redis\n  redis:\n    mode: cluster\n";
        let missing = ConfigError::new("store.redis.nodes", "needs seed nodes").located(yaml);
        assert_eq!(missing.line, Some(3));
        assert_eq!(ConfigError::new("log.level", "x").located(yaml).line, None);

        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Server {
            listen: String,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct File {
            server: Server,
        }
        let error = from_yaml::<File>("server:\n  listen: a\n  listen: b\n").unwrap_err();
        assert_eq!(
            (error.path.as_str(), error.line),
            ("server", Some(3)),
            "{error}"
        );
    }

    #[test]
    fn yaml_that_does_not_parse_is_an_error_of_the_file_at_its_line() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct File {
            clients: Vec<String>,
        }
        let error = from_yaml::<File>("{ clients: [a] ]\n").unwrap_err();
        assert_eq!(error.path, "", "{error}");
        assert!(error.line.is_some(), "{error}");
        assert!(
            error.to_string().starts_with("(top level) (line "),
            "{error}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_type_only() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct File {
            nodes: Vec<String>,
        }
        let error = from_yaml::<File>("nodes: 'redis://:hunter2@10.0.0.1:6379'\n").unwrap_err();
        assert_eq!(error.message, "invalid type: a string, expected a sequence");
        assert_eq!(
            without_string_value("invalid value: string \"s3cret, expected x\", expected a URL"),
            "invalid value: a string, expected a URL"
        );
        assert_eq!(
            without_string_value("unknown field `x`"),
            "unknown field `x`"
        );
        // An enum's value: a typo of a word is shown, anything else (a password pasted
        // into `mode:`) is not.
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        #[serde(rename_all = "lowercase")]
        enum Mode {
            Standalone,
            Cluster,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Store {
            mode: Mode,
        }
        let typo = from_yaml::<Store>("mode: standalon\n").unwrap_err();
        assert!(typo.message.contains("`standalon`"), "{}", typo.message);
        let secret = from_yaml::<Store>("mode: p@ssw0rd-Secret!\n").unwrap_err();
        assert!(!secret.message.contains("ssw0rd"), "{}", secret.message);
        assert!(
            secret
                .message
                .contains("expected `standalone` or `cluster`"),
            "{}",
            secret.message
        );
    }
}
