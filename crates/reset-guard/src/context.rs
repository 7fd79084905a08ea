//! What the guard learned about a request, left in its extensions for the services after it.

use http::StatusCode;

use crate::auth::ClientId;
use crate::client_ip::ClientIp;
use crate::email::Email;

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
    /// The configured client the token belongs to.
    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    /// The address the request is attributed to.
    pub fn client_ip(&self) -> ClientIp {
        self.client_ip
    }

    /// The validated address, as the user gave it.
    pub fn email(&self) -> &Email {
        &self.email
    }

    /// The keyed hash of the canonical address ([`EmailKey`](crate::EmailKey)): the
    /// per-email limit key, and a safe handle for logs.
    pub fn email_hash(&self) -> u64 {
        self.email_hash
    }
}

/// Inserted into the response extensions when a uniform answer replaced what QuickBlox
/// said, so logs and metrics can still see the true status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamStatus(pub StatusCode);
