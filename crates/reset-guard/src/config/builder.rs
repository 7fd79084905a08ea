//! Writing a [`GuardConfig`] in code instead of YAML, in the style of tower-http's
//! `CorsLayer::new().allow_origin(..)`: start from the defaults, change what differs.

use std::time::Duration;

use super::{Cidr, ClientConfig, EmailKeyConfig, GuardConfig, OtherRoutes};
use crate::auth::TokenDigest;
use crate::duration::ConfigDuration;
use crate::limit::LimitGroup;

use super::QuotaConfig;

impl GuardConfig {
    /// The defaults, without clients: add at least one with [`client`](Self::client).
    ///
    /// ```
    /// use std::time::Duration;
    /// use reset_guard::{GuardConfig, LimitGroup, OtherRoutes, QuotaConfig, TokenDigest};
    ///
    /// let settings = GuardConfig::new()
    ///     .client("ios-app", TokenDigest::of(b"a random token given to the app"))
    ///     .other_routes(OtherRoutes::Forward)
    ///     .uniform(false)
    ///     .limits(LimitGroup::PerIp, [QuotaConfig::new(20, Duration::from_secs(60))])
    ///     .trust_proxy("10.0.0.0/8".parse().unwrap())
    ///     .validate()
    ///     .unwrap();
    /// assert_eq!(settings.quotas(LimitGroup::PerIp)[0].requests, 20);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an app allowed to ask for resets: its id (for logs and metrics) and the
    /// SHA-256 of its token.
    pub fn client(mut self, id: impl Into<String>, token_sha256: TokenDigest) -> Self {
        self.clients.push(ClientConfig {
            id: id.into(),
            token_sha256,
        });
        self
    }

    /// The guarded path (default `/users/password/reset.json`).
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// What every other path gets: 404 (the default), or passed on to the inner service.
    pub fn other_routes(mut self, other_routes: OtherRoutes) -> Self {
        self.other_routes = other_routes;
        self
    }

    /// Believes `X-Forwarded-For` from peers in this block.
    pub fn trust_proxy(mut self, proxies: Cidr) -> Self {
        self.client_ip.trusted_proxies.push(proxies);
        self
    }

    /// Whether QuickBlox's 200, 401 and 404 become one bare 200 (default `true`).
    pub fn uniform(mut self, uniform: bool) -> Self {
        self.responses.uniform = uniform;
        self
    }

    /// The least time an answer that passed the email check takes (default none).
    pub fn min_latency(mut self, min_latency: Duration) -> Self {
        self.responses.min_latency = ConfigDuration(min_latency);
        self
    }

    /// Replaces the quotas of one limit group (none: the group does not limit).
    pub fn limits(
        mut self,
        group: LimitGroup,
        quotas: impl IntoIterator<Item = QuotaConfig>,
    ) -> Self {
        let limits = &mut self.limits;
        let slot = match group {
            LimitGroup::PerIp => &mut limits.per_ip,
            LimitGroup::PerClient => &mut limits.per_client,
            LimitGroup::PerEmail => &mut limits.per_email,
            LimitGroup::Global => &mut limits.global,
        };
        *slot = quotas.into_iter().collect();
        self
    }

    /// Accepts non-ASCII local parts (default `false`).
    pub fn allow_utf8_local(mut self, allow: bool) -> Self {
        self.email.allow_utf8_local = allow;
        self
    }

    /// Lets clients in this block skip the per-IP limit (your own health checkers).
    pub fn exempt_ip(mut self, block: Cidr) -> Self {
        self.limits.exempt_ips.push(block);
        self
    }

    /// How much of a client address keys the per-IP limit: the leading bits of an IPv4
    /// and of an IPv6 address (defaults 32 and 64).
    pub fn ip_prefixes(mut self, ipv4: u8, ipv6: u8) -> Self {
        self.limits.ipv4_prefix = ipv4;
        self.limits.ipv6_prefix = ipv6;
        self
    }

    /// Sends `RateLimit-Policy` and `RateLimit` on allowed answers too (default `false`;
    /// refused with uniform answers while `per_email` has an enforced quota).
    pub fn response_headers(mut self, on: bool) -> Self {
        self.limits.response_headers = on;
        self
    }

    /// How addresses fold into one per-email key (default: every folding on).
    pub fn email_key(mut self, email_key: EmailKeyConfig) -> Self {
        self.limits.email_key = email_key;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_and_yaml_give_the_same_settings() {
        let digest = TokenDigest::of(b"foo");
        let from_code = GuardConfig::new()
            .client("app", digest)
            .other_routes(OtherRoutes::Forward)
            .uniform(false)
            .min_latency(Duration::from_millis(50))
            .limits(
                LimitGroup::PerEmail,
                [QuotaConfig::new(5, Duration::from_secs(3600)).burst(2)],
            )
            .limits(LimitGroup::Global, [])
            .trust_proxy("10.0.0.0/8".parse().unwrap())
            .exempt_ip("192.0.2.7".parse().unwrap())
            .ip_prefixes(24, 48)
            .email_key(EmailKeyConfig {
                fold_gmail_dots: false,
                ..EmailKeyConfig::default()
            })
            .validate()
            .unwrap();
        let from_yaml = GuardConfig::from_yaml(&format!(
            "clients: [{{ id: app, token_sha256: {} }}]\nother_routes: forward\n\
             responses: {{ uniform: false, min_latency: 50ms }}\n\
             limits: {{ per_email: [{{ requests: 5, per: 1h, burst: 2 }}], global: [], \
             exempt_ips: [192.0.2.7], ipv4_prefix: 24, ipv6_prefix: 48, \
             email_key: {{ fold_gmail_dots: false }} }}\n\
             client_ip: {{ trusted_proxies: [10.0.0.0/8] }}\n",
            digest.to_hex()
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(format!("{from_code:?}"), format!("{from_yaml:?}"));
    }
}
