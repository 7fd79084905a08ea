//! Header names the gateway reads or writes that the `http` crate does not define.

use http::HeaderName;

/// The credential header QuickBlox apps send (`QB-Token: <token>`).
pub const QB_TOKEN: HeaderName = HeaderName::from_static("qb-token");
/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers), on 429 answers.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers), on 429 answers.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
