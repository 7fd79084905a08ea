//! The `guard:` section of the YAML file: [`GuardConfig`] deserializes it and
//! [`GuardConfig::validate`] turns it into [`GuardSettings`], the only form the guard runs on.

use std::collections::HashSet;
use std::time::Duration;

use ipnet::IpNet;
use serde::de;

pub use located_yaml::ConfigError;
use serde::{Deserialize, Deserializer};

use crate::auth::{ClientId, ClientRegistry, TokenDigest};
use crate::duration::ConfigDuration;
use crate::email::EmailKeyPolicy;
use crate::email::EmailPolicy;
use crate::limit::LimitSettings;

mod builder;
mod limits;

pub use limits::{EmailKeyConfig, LimitsConfig, QuotaConfig};

/// Client tokens that appear in documentation and examples: a client configured with one
/// of them would accept a token anyone can read, so it is refused.
pub(crate) const PLACEHOLDER_TOKENS: [&str; 2] = ["change-me", "changeme"];
/// Whether `path` is written as it travels in a request target, which is what it is
/// compared with: unreserved and sub-delimiter characters, `:`, `@`, `/`, and `%XX`.
fn spelled_as_sent(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            if !bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)) {
            return false;
        }
        i += 1;
    }
    true
}

/// Longest `responses.min_latency`.
const MAX_MIN_LATENCY: Duration = Duration::from_secs(10);

/// The guarded path QuickBlox serves password resets on.
pub const DEFAULT_PATH: &str = "/users/password/reset.json";

/// The `guard:` section. Every field has a default, so `{}` is a valid (if client-less) file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct GuardConfig {
    /// The path that is guarded.
    pub path: String,
    /// What happens to every other path.
    pub other_routes: OtherRoutes,
    /// The apps allowed to ask for resets.
    pub clients: Vec<ClientConfig>,
    /// Where the client address comes from.
    pub client_ip: ClientIpConfig,
    /// How answers are shaped.
    pub responses: ResponsesConfig,
    /// Which addresses are accepted.
    pub email: EmailConfig,
    /// Rate limits.
    pub limits: LimitsConfig,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            path: DEFAULT_PATH.to_owned(),
            other_routes: OtherRoutes::default(),
            clients: Vec::new(),
            client_ip: ClientIpConfig::default(),
            responses: ResponsesConfig::default(),
            email: EmailConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

/// `guard.other_routes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OtherRoutes {
    /// Answer 404.
    #[default]
    Reject,
    /// Pass upstream untouched apart from hop-by-hop hygiene.
    Forward,
}

/// One entry of `guard.clients`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Name used in logs and metrics.
    pub id: String,
    /// SHA-256 of the client token, 64 hex digits ([`TokenDigest::of`] or `reset-gateway
    /// hash-token` makes it).
    pub token_sha256: TokenDigest,
}

impl<'de> Deserialize<'de> for TokenDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// `guard.client_ip`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ClientIpConfig {
    /// Peers whose `X-Forwarded-For` is believed, as CIDRs.
    pub trusted_proxies: Vec<Cidr>,
}

/// A CIDR block; a bare address means a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

/// Why a text is not a [`Cidr`]: the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCidr(String);

impl std::str::FromStr for Cidr {
    type Err = InvalidCidr;

    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address for one host.
    fn from_str(text: &str) -> Result<Cidr, InvalidCidr> {
        Cidr::parse(text).map_err(InvalidCidr)
    }
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        if net.trunc() != net {
            // `10.0.0.1/8` is most likely a typo for a host or for `10.0.0.0/8`: trusting
            // a whole block by mistake lets its hosts choose their client address.
            return Err(format!(
                "{text} has host bits set: write {} for the block, or {} for the one host",
                net.trunc(),
                net.addr()
            ));
        }
        // Peers and forwarded addresses are compared in IPv4 form (an IPv4 client of a
        // dual-stack listener arrives as `::ffff:a.b.c.d`): a block written in the mapped
        // form is read as the IPv4 block it is, else it would never match.
        if let IpNet::V6(v6) = net {
            if let Some(v4) = v6.addr().to_ipv4_mapped() {
                // At least /96: a shorter one has host bits set (the `ffff`), refused above.
                let prefix = v6.prefix_len().saturating_sub(96);
                let v4 = ipnet::Ipv4Net::new(v4, prefix).map_err(|e| e.to_string())?;
                return Ok(Cidr(IpNet::V4(v4)));
            }
        }
        Ok(Cidr(net))
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(de::Error::custom)
    }
}

/// `guard.responses`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ResponsesConfig {
    /// Upstream 404 and 401 become 200 with an empty body.
    pub uniform: bool,
    /// Every response that passed the email check takes at least this long.
    pub min_latency: ConfigDuration,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        ResponsesConfig {
            uniform: true,
            min_latency: ConfigDuration::default(),
        }
    }
}

/// `guard.email`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct EmailConfig {
    /// Accept non-ASCII local parts.
    pub allow_utf8_local: bool,
}

impl GuardConfig {
    /// Reads a `guard:` section on its own, as an embedding service would.
    pub fn from_yaml(yaml: &str) -> Result<GuardConfig, ConfigError> {
        located_yaml::from_yaml(yaml)
    }

    /// Checks what the types alone cannot and builds the settings the guard runs on.
    /// Paths in errors are relative to the section (`clients[1].id`); an error carries no
    /// line until [`ConfigError::located`] finds it in the YAML the config came from.
    pub fn validate(&self) -> Result<GuardSettings, ConfigError> {
        if !self.path.starts_with('/') || self.path.contains(['?', '#']) {
            return Err(ConfigError::new(
                "path",
                "must start with '/' and hold no query",
            ));
        }
        if !spelled_as_sent(&self.path) {
            return Err(ConfigError::new(
                "path",
                "must be spelled as clients send it: ASCII letters, digits, -._~!$&'()*+,;=:@/ \
                 and %XX escapes (a path written with a character that travels escaped never \
                 matches)",
            ));
        }
        if self.responses.min_latency.0 > MAX_MIN_LATENCY {
            return Err(ConfigError::new(
                "responses.min_latency",
                "must be at most 10s (every answer past the email check waits that long)",
            ));
        }
        if self.clients.is_empty() {
            return Err(ConfigError::new(
                "clients",
                "at least one client is required (id and token_sha256)",
            ));
        }
        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        for (i, client) in self.clients.iter().enumerate() {
            if client.id.trim().is_empty() {
                return Err(ConfigError::new(
                    format!("clients[{i}].id"),
                    "must not be empty",
                ));
            }
            if !ids.insert(client.id.as_str()) {
                return Err(ConfigError::new(
                    format!("clients[{i}].id"),
                    format!("duplicate client id {:?}", client.id),
                ));
            }
            if client.token_sha256 == TokenDigest::of(b"") {
                // What an empty QB-Token or a bare `Authorization: ApiKey` present.
                return Err(ConfigError::new(
                    format!("clients[{i}].token_sha256"),
                    "is SHA-256 of the empty token, which a request without one presents",
                ));
            }
            if let Some(token) = client.token_sha256.placeholder() {
                return Err(ConfigError::new(
                    format!("clients[{i}].token_sha256"),
                    format!(
                        "is SHA-256 of {token:?}, a placeholder from the documentation that anyone \
                         can send: make a random token for this app and write its digest here \
                         (printf %s \"$TOKEN\" | reset-gateway hash-token; in code, \
                         TokenDigest::of)"
                    ),
                ));
            }
            if !digests.insert(client.token_sha256.0) {
                return Err(ConfigError::new(
                    format!("clients[{i}].token_sha256"),
                    "the same token is configured for two clients",
                ));
            }
        }
        let (limits, email_key) = self.limits.validate()?;
        let per_email_denies = limits.groups[crate::LimitGroup::PerEmail.index()]
            .iter()
            .any(|quota| !quota.shadow);
        if limits.response_headers && self.responses.uniform && per_email_denies {
            return Err(ConfigError::new(
                "limits.response_headers",
                "cannot be true with responses.uniform while per_email has an enforced quota: a \
                 per-email denial answers as a bare success, and the RateLimit fields on real \
                 successes would tell the two apart (set responses.uniform: false, or leave the \
                 fields to 429s)",
            ));
        }
        Ok(GuardSettings {
            path: self.path.clone(),
            other_routes: self.other_routes,
            clients: ClientRegistry::new(
                self.clients
                    .iter()
                    .map(|c| (ClientId::new(&c.id), c.token_sha256)),
            ),
            trusted_proxies: self.client_ip.trusted_proxies.iter().map(|c| c.0).collect(),
            uniform: self.responses.uniform,
            min_latency: self.responses.min_latency.0,
            email: EmailPolicy {
                allow_utf8_local: self.email.allow_utf8_local,
            },
            limits,
            email_key,
        })
    }
}

/// Validated settings. Built only by [`GuardConfig::validate`], so every value is checked.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub(crate) path: String,
    pub(crate) other_routes: OtherRoutes,
    pub(crate) clients: ClientRegistry,
    pub(crate) trusted_proxies: Vec<IpNet>,
    pub(crate) uniform: bool,
    pub(crate) min_latency: Duration,
    pub(crate) email: EmailPolicy,
    pub(crate) limits: LimitSettings,
    pub(crate) email_key: EmailKeyPolicy,
}

impl GuardSettings {
    /// Reads and checks a `guard:` section in one step ([`GuardConfig::from_yaml`], then
    /// [`GuardConfig::validate`]), an error of either placed at its line in `yaml`.
    pub fn from_yaml(yaml: &str) -> Result<GuardSettings, ConfigError> {
        GuardConfig::from_yaml(yaml)?
            .validate()
            .map_err(|error| error.located(yaml))
    }

    /// The guarded path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether unguarded paths are forwarded.
    pub fn other_routes(&self) -> OtherRoutes {
        self.other_routes
    }

    /// Trusted proxy networks.
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted_proxies
    }

    /// Whether uniform answers are on.
    pub fn uniform(&self) -> bool {
        self.uniform
    }

    /// The quotas of one limit group, in the order they are checked.
    pub fn quotas(&self, group: crate::limit::LimitGroup) -> &[crate::limit::Quota] {
        self.limits.quotas(group)
    }
}

#[cfg(test)]
mod tests;
