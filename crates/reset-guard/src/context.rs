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
    /// `responses.uniform` as the request was checked.
    pub(crate) uniform: bool,
    /// The store could not be asked and `on_error: allow` let the request through.
    pub(crate) limits_skipped: bool,
}

impl GuardedRequest {
    /// Whether the request passed without its limits: the Redis store could not be asked
    /// and `on_error: allow` let it through.
    pub fn limits_skipped(&self) -> bool {
        self.limits_skipped
    }

    /// The id of the configured client the token belongs to.
    pub fn client_id(&self) -> &str {
        self.client_id.as_str()
    }

    /// The address the request is attributed to: the peer, or the client a trusted proxy
    /// named.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip.ip()
    }

    /// Whether the guard will replace an answer with `status` by its uniform bare 200
    /// (`responses.uniform`, and a 200, 401 or 404): nothing of such an answer but its
    /// status reaches the client.
    pub fn answer_replaced(&self, status: http::StatusCode) -> bool {
        self.uniform && uniform_replaces(status)
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

/// Who a request on the guarded path was attributed to, as far as the checks got before
/// answering: the client IP always, the client id once the credential was known, the keyed
/// email hash once the address was valid. Left in the extensions of every answer the guard
/// gives itself to a charged request, so its access-log line says what its limits were
/// keyed on even when no [`GuardedRequest`] was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub(crate) client_ip: IpAddr,
    pub(crate) client_id: Option<ClientId>,
    pub(crate) email_hash: Option<u64>,
}

impl Attribution {
    /// The client IP the per-IP limit was keyed on (before masking).
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }

    /// The client the credential belongs to, once it was checked.
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_ref().map(ClientId::as_str)
    }

    /// The per-email limit key, once the address was valid.
    pub fn email_hash(&self) -> Option<u64> {
        self.email_hash
    }
}

impl From<&GuardedRequest> for Attribution {
    fn from(guarded: &GuardedRequest) -> Self {
        Attribution {
            client_ip: guarded.client_ip(),
            client_id: Some(guarded.client_id.clone()),
            email_hash: Some(guarded.email_hash),
        }
    }
}

/// The statuses uniform answers replace with their bare 200: success, no such account, and
/// QuickBlox's 401.
pub(crate) fn uniform_replaces(status: http::StatusCode) -> bool {
    use http::StatusCode;
    matches!(
        status,
        StatusCode::OK | StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND
    )
}
