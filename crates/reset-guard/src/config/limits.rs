//! `guard.limits` as written: quotas per group and how keys are formed, checked into the
//! limiter's [`LimitSettings`] and the guard's email key policy.

use serde::Deserialize;

use crate::config::{Cidr, ConfigError};
use crate::duration::ConfigDuration;
use crate::email::EmailKeyPolicy;
use crate::limit::{LimitGroup, LimitSettings, Quota, MAX_QUOTAS_PER_GROUP};

/// A quota as written in YAML: `{ requests: 3, per: 1h, burst: 5, shadow: false }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct QuotaConfig {
    /// Requests allowed per `per`.
    pub requests: u32,
    /// The window.
    pub per: ConfigDuration,
    /// Requests allowed at once (default: `requests`).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Only log and count what it would deny.
    #[serde(default)]
    pub shadow: bool,
}

/// `guard.limits`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Per client IP (every guarded request, valid or not).
    pub per_ip: Vec<QuotaConfig>,
    /// Per client id.
    pub per_client: Vec<QuotaConfig>,
    /// Per canonical email address.
    pub per_email: Vec<QuotaConfig>,
    /// All valid requests together.
    pub global: Vec<QuotaConfig>,
    /// IPv4 clients are grouped by this prefix length.
    pub ipv4_prefix: u8,
    /// IPv6 clients are grouped by this prefix length (one /64 is usually one host).
    pub ipv6_prefix: u8,
    /// Clients (CIDRs) that skip the per-IP limit.
    pub exempt_ips: Vec<Cidr>,
    /// Send `RateLimit-Policy`/`RateLimit` on allowed answers too.
    pub response_headers: bool,
    /// How addresses fold into one per-email key.
    pub email_key: EmailKeyConfig,
}

fn quota(requests: u32, per_secs: u64, burst: Option<u32>) -> QuotaConfig {
    QuotaConfig {
        requests,
        per: crate::duration::ConfigDuration::from_secs(per_secs),
        burst,
        shadow: false,
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            per_ip: vec![quota(20, 60, None)],
            per_client: vec![quota(200, 1, Some(400))],
            per_email: vec![quota(3, 3600, None), quota(10, 86_400, None)],
            global: vec![quota(100, 1, None)],
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            exempt_ips: Vec::new(),
            response_headers: false,
            email_key: EmailKeyConfig::default(),
        }
    }
}

/// `guard.limits.email_key`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct EmailKeyConfig {
    /// `bob+tag@x.io` counts as `bob@x.io`.
    pub strip_plus_tag: bool,
    /// Dots in gmail.com local parts are ignored; googlemail.com is gmail.com.
    pub fold_gmail_dots: bool,
    /// Other providers' aliases of one mailbox count as one (iCloud, Proton, Yahoo's `-`
    /// tags, Fastmail's subdomains).
    pub fold_provider_aliases: bool,
}

impl Default for EmailKeyConfig {
    fn default() -> Self {
        EmailKeyConfig {
            strip_plus_tag: true,
            fold_gmail_dots: true,
            fold_provider_aliases: true,
        }
    }
}

impl QuotaConfig {
    /// A quota of `requests` per `per`, as many at once, enforced.
    pub fn new(requests: u32, per: std::time::Duration) -> Self {
        QuotaConfig {
            requests,
            per: ConfigDuration(per),
            burst: None,
            shadow: false,
        }
    }

    /// Allows `burst` requests at once.
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    /// Only counts and logs what it would deny.
    pub fn shadow(mut self) -> Self {
        self.shadow = true;
        self
    }

    /// Checks the numbers; the error says which rule failed.
    pub(crate) fn validate(&self) -> Result<Quota, String> {
        Quota::new(self.requests, self.per.0, self.burst, self.shadow)
    }
}

impl LimitsConfig {
    /// Checks every quota; error paths are relative to `limits`.
    pub(crate) fn validate(&self) -> Result<(LimitSettings, EmailKeyPolicy), ConfigError> {
        let mut groups: [Vec<Quota>; 4] = Default::default();
        for group in LimitGroup::ALL {
            let configs = match group {
                LimitGroup::PerIp => &self.per_ip,
                LimitGroup::PerClient => &self.per_client,
                LimitGroup::PerEmail => &self.per_email,
                LimitGroup::Global => &self.global,
            };
            if configs.len() > MAX_QUOTAS_PER_GROUP {
                return Err(ConfigError::new(
                    format!("limits.{}", group.name()),
                    format!("at most {MAX_QUOTAS_PER_GROUP} quotas per group"),
                ));
            }
            for (i, config) in configs.iter().enumerate() {
                let path = format!("limits.{}[{i}]", group.name());
                let quota = config
                    .validate()
                    .map_err(|message| ConfigError::new(path.clone(), message))?;
                // Two alike would be one quota charged twice, counted under one name.
                let quotas = &groups[group.index()];
                if let Some(same) = quotas.iter().position(|other| *other == quota) {
                    return Err(ConfigError::new(
                        path,
                        format!(
                            "is the same quota as limits.{}[{same}] (the same requests, per, \
                             burst and shadow): keep one",
                            group.name()
                        ),
                    ));
                }
                groups[group.index()].push(quota);
            }
        }
        if self.ipv4_prefix > 32 {
            return Err(ConfigError::new("limits.ipv4_prefix", "must be 0 to 32"));
        }
        if self.ipv6_prefix > 128 {
            return Err(ConfigError::new("limits.ipv6_prefix", "must be 0 to 128"));
        }
        let limits = LimitSettings {
            groups,
            ipv4_prefix: self.ipv4_prefix,
            ipv6_prefix: self.ipv6_prefix,
            exempt: self.exempt_ips.iter().map(|c| c.0).collect(),
            response_headers: self.response_headers,
        };
        let email_key = EmailKeyPolicy {
            strip_plus_tag: self.email_key.strip_plus_tag,
            fold_gmail_dots: self.email_key.fold_gmail_dots,
            fold_provider_aliases: self.email_key.fold_provider_aliases,
        };
        Ok((limits, email_key))
    }
}
