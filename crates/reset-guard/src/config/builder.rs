//! Writing a [`GuardConfig`] in code instead of YAML, in the style of tower-http's
//! `CorsLayer::new().allow_origin(..)`: start from the defaults, change what differs.

use std::time::Duration;

use super::{Cidr, ClientConfig, GuardConfig, OtherRoutes};
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
            .validate()
            .unwrap();
        let from_yaml = GuardConfig::from_yaml(&format!(
            "clients: [{{ id: app, token_sha256: {} }}]\nother_routes: forward\n\
             responses: {{ uniform: false, min_latency: 50ms }}\n\
             limits: {{ per_email: [{{ requests: 5, per: 1h, burst: 2 }}], global: [] }}\n\
             client_ip: {{ trusted_proxies: [10.0.0.0/8] }}\n",
            digest.to_hex()
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(format!("{from_code:?}"), format!("{from_yaml:?}"));
    }
}
