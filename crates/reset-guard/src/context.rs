//! What the guard learned about a request, left in its extensions for the services after it.

use std::net::IpAddr;

use http::StatusCode;

use crate::auth::ClientId;
use crate::client_ip::ClientIp;
use crate::email::Email;
use crate::query::encode_query_value;

/// Inserted into the request extensions of every request the guard lets through on the
/// guarded path. Its presence tells the forwarder to build the upstream request from it.
#[derive(Debug, Clone)]
pub struct GuardedRequest {
    pub(crate) client_id: ClientId,
    pub(crate) client_ip: ClientIp,
    pub(crate) email: Email,
    pub(crate) email_hash: u64,
}

impl GuardedRequest {
    /// The id of the configured client the token belongs to.
    pub fn client_id(&self) -> &str {
        self.client_id.as_str()
    }

    /// The address the request is attributed to: the peer, or the client a trusted proxy
    /// named.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip.ip()
    }

    /// The validated address, as the user gave it.
    pub fn email(&self) -> &str {
        self.email.as_str()
    }

    /// Appends `email=` and the address percent-encoded for a query string: the one query
    /// QuickBlox is sent.
    pub fn write_email_query(&self, target: &mut String) {
        target.push_str("email=");
        target.extend(encode_query_value(self.email.as_str()));
    }

    /// The keyed hash of the canonical address (`Bob.Smith+x@GoogleMail.com` and
    /// `bobsmith@gmail.com` have the same): the per-email limit key, and a safe handle
    /// for logs.
    pub fn email_hash(&self) -> u64 {
        self.email_hash
    }
}

/// Inserted into the response extensions when a uniform answer replaced what QuickBlox
/// said, so logs and metrics can still see the true status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamStatus(pub StatusCode);
