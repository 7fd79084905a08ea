//! Live reload: on SIGHUP and when the file changes, the file is read and
//! checked in full; only then is anything applied. A bad file is logged and counted and
//! the running configuration stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::admin::AdminState;
use crate::config::{load, Settings};
use crate::tls::CertStore;
use crate::upstream::Forwarder;

/// How often the file is looked at for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Reloads one running gateway from its file.
pub struct Reloader {
    path: PathBuf,
    state: Arc<AdminState>,
    forwarders: Vec<Forwarder>,
    certs: Option<Arc<CertStore>>,
    /// What needs a restart to change, as the process started with it.
    fixed: Fixed,
}

/// What only a restart changes, as one configuration has it: each setting's key and its
/// value, written out to compare (the key secret and Redis password hashed, never kept).
/// The listeners, each worker's HTTP settings and request timer, the CORS layer and the
/// store are built once at start; logging is set up once.
#[derive(Debug, PartialEq)]
struct Fixed(Vec<(&'static str, String)>);

impl Fixed {
    fn of(settings: &Settings) -> Self {
        let server = &settings.server;
        Fixed(vec![
            ("server.listen", server.listen.to_string()),
            ("admin.listen", server.admin_listen.to_string()),
            ("server.tls (on or off)", server.tls.is_some().to_string()),
            (
                "server.proxy_protocol",
                format!("{:?}", server.proxy_protocol),
            ),
            ("server.max_connections", server.max_connections.to_string()),
            ("server.workers", server.workers.to_string()),
            (
                "server.header_read_timeout",
                format!("{:?}", server.header_read_timeout),
            ),
            (
                "server.request_timeout",
                format!("{:?}", server.request_timeout),
            ),
            (
                "server.shutdown_grace",
                format!("{:?}", server.shutdown_grace),
            ),
            (
                "server.max_header_bytes",
                server.max_header_bytes.to_string(),
            ),
            ("server.max_uri_bytes", server.max_uri_bytes.to_string()),
            (
                "server.cors",
                format!("{:?} {:?}", server.cors_origins, server.cors_max_age),
            ),
            ("store", store_fingerprint(settings).to_string()),
            ("log", format!("{:?}", settings.log)),
        ])
    }

    /// The keys whose values differ in `other`.
    fn changed_in(&self, other: &Fixed) -> Vec<&'static str> {
        self.0
            .iter()
            .zip(&other.0)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| a.0)
            .collect()
    }
}

/// A hash of what `store` holds beyond its kind, to tell a changed store section on reload.
fn store_fingerprint(settings: &Settings) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let store = &settings.store;
    store.limits.max_keys.hash(&mut hasher);
    store.key_secret.as_deref().hash(&mut hasher);
    if let Some(redis) = &store.limits.redis {
        redis.url.hash(&mut hasher);
        redis.username.hash(&mut hasher);
        redis.password.as_deref().hash(&mut hasher);
        redis.ca_pem.hash(&mut hasher);
        redis.key_prefix.hash(&mut hasher);
        redis.timeout.hash(&mut hasher);
        format!("{:?}", redis.on_error).hash(&mut hasher);
    }
    hasher.finish()
}

impl Reloader {
    pub(crate) fn new(
        path: PathBuf,
        state: Arc<AdminState>,
        forwarders: Vec<Forwarder>,
        certs: Option<Arc<CertStore>>,
        settings: &Settings,
    ) -> Self {
        Reloader {
            path,
            state,
            forwarders,
            certs,
            fixed: Fixed::of(settings),
        }
    }

    /// Reads, checks and applies the file: guard settings and limits (state kept for
    /// unchanged quotas), the API key (re-read: key rotation), the upstream client and the
    /// TLS certificate. The rest of `server` and `admin`, the store section and logging
    /// need a restart.
    pub fn reload(&self) -> anyhow::Result<()> {
        let result = self.try_reload();
        self.state.metrics.reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!(path = %self.path.display(), "configuration reloaded"),
            Err(error) => tracing::error!(
                path = %self.path.display(),
                error = %error,
                "configuration reload rejected; the running configuration stays"
            ),
        }
        result
    }

    fn try_reload(&self) -> anyhow::Result<()> {
        let settings = load(&self.path)?;
        let changed = self.fixed.changed_in(&Fixed::of(&settings));
        if !changed.is_empty() {
            tracing::warn!(
                keys = %changed.join(", "),
                "these settings change only on restart; the running ones stay"
            );
        }
        // Everything that can fail is prepared first; nothing is applied until all of it worked.
        let upstreams = self
            .forwarders
            .iter()
            .map(|_| Forwarder::prepare(settings.upstream.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let (Some(certs), Some(files)) = (&self.certs, &settings.server.tls) {
            certs.reload(files)?;
        }
        for (forwarder, upstream) in self.forwarders.iter().zip(upstreams) {
            forwarder.apply(upstream);
        }
        self.state.guard.update(settings.guard, settings.api_key);
        Ok(())
    }

    /// Reloads on each of `hangups` (SIGHUP, see [`crate::signal::hangups`]) and whenever
    /// the file's contents change, until the process ends.
    pub async fn watch(self, hangups: std::io::Result<tokio::signal::unix::Signal>) {
        let mut hangup = match hangups {
            Ok(hangup) => hangup,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; reloading on file change only");
                return self.poll_only().await;
            }
        };
        let mut seen = self.fingerprint();
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP received");
                    seen = self.fingerprint();
                    let _ = self.reload();
                }
                _ = tick.tick() => {
                    let now = self.fingerprint();
                    if now.is_some() && now != seen {
                        seen = now;
                        let _ = self.reload();
                    }
                }
            }
        }
    }

    async fn poll_only(self) {
        let mut seen = self.fingerprint();
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            let now = self.fingerprint();
            if now.is_some() && now != seen {
                seen = now;
                let _ = self.reload();
            }
        }
    }

    /// A digest of the file's contents (not its timestamp: ConfigMaps swap symlinks, and
    /// editors rewrite files, without the contents always changing).
    fn fingerprint(&self) -> Option<[u8; 32]> {
        std::fs::read(&self.path)
            .ok()
            .map(|bytes| Sha256::digest(bytes).into())
    }
}
