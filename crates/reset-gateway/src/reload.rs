//! Live reload: on SIGHUP and when the file changes, the file is read and
//! checked in full; only then is anything applied. A bad file is logged and counted and
//! the running configuration stays.
//!
//! "Changes" covers the files the configuration names and a reload reads again (the API
//! key file, the TLS pair, `upstream.ca_file`): a Secret rotated in place is picked up
//! like an edited file. A change is applied once the contents have stood still for one
//! poll, so a file caught half-written (a writer that truncates, then writes) is not
//! applied with defaults filling its missing sections; one that lacks the running file's
//! last key or list item (what a writer pausing longer mid-file leaves, whatever it edited
//! before the pause) waits until it has stood still for [`HOLD`]. A key removed from the
//! middle (an edit: `shadow: true` taken off a quota) or a file reordered is applied at
//! once; one that is not YAML at all is not held either: its reload is refused at once,
//! saying why. A cut inside the last value itself (`requests: 1` of `requests: 10`) cannot
//! be told from an edit: write the file in one go.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::admin::AdminState;
use crate::config::{GatewayConfig, Settings};
use crate::metrics::quota_label;
use crate::tls::CertStore;
use crate::upstream::Forwarder;
use reset_guard::{ConfigError, GuardSettings, LimitGroup};

/// How often the files are looked at for changes; a change is applied when two looks in a
/// row see the same new contents.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How long a file lacking the running one's last keys or list items must stand still to
/// be applied by the watch (the last section, quota or client removed on purpose takes
/// this long; `SIGHUP` applies at once).
const HOLD: Duration = Duration::from_secs(5);

/// Reloads one running gateway from its file.
pub struct Reloader {
    path: PathBuf,
    state: Arc<AdminState>,
    forwarders: Vec<Forwarder>,
    certs: Option<Arc<CertStore>>,
    /// What needs a restart to change, as the process started with it.
    fixed: Fixed,
    /// The running store's `global_keys` (read at start): a reload's global bursts must fit
    /// it, whatever the file says now.
    global_keys: u16,
    /// The running store's Redis settings and `server.request_timeout` (read at start): a
    /// reload's `upstream.timeout` must fit beside them (`reloaded_upstream_fits`).
    redis_wait: Option<(reset_guard::RedisSettings, std::time::Duration)>,
    /// The running configuration's [`Settings::reread_files`].
    reread_files: Mutex<Vec<PathBuf>>,
    /// The file last applied: its text's digest, and its sections (every key path and list
    /// item: `guard.limits.per_email[1].per`) in the order written, none where they could
    /// not be read through.
    running: Mutex<([u8; 32], Option<Vec<String>>)>,
    /// SHA-256 of the API key applied last: a reload says when the key it read differs
    /// (a rotation done), without the key.
    api_key_digest: Mutex<[u8; 32]>,
    /// The file could not be read, at the last reload (a SIGHUP while it was away) or at
    /// the watch's looks: tried again at the first look that finds it back as it was (a
    /// changed file is reloaded as any change is), so the reload gauge does not stay at a
    /// failure the file no longer has.
    read_failed: std::sync::atomic::AtomicBool,
}

/// The sections of a configuration file: every key path and list item (`server`,
/// `guard.limits.per_email`, `guard.limits.per_email[1]`, `guard.limits.per_email[1].per`),
/// in the order written, a client named by its id rather than its place
/// (`guard.clients[ios].token_sha256`: one revoked from the middle of the list leaves the
/// others' sections as they were). A file cut between two keys lacks the ones after the
/// cut: a group of limits left out would take its defaults, and a client list cut short
/// would refuse the clients cut off. None where the key-path reader stops before the end
/// of text the loader takes (a tab after a key's colon).
fn sections(yaml: &str) -> Option<Vec<String>> {
    if !located_yaml::parses(yaml) {
        return None;
    }
    let mut sections = located_yaml::key_paths_in_order(yaml);
    let value = yaml_serde::from_str::<yaml_serde::Value>(yaml).ok();
    let clients = value
        .as_ref()
        .and_then(|v| v.get("guard")?.get("clients")?.as_sequence().cloned())
        .unwrap_or_default();
    for (at, client) in clients.iter().enumerate() {
        let Some(id) = client.get("id").and_then(|id| id.as_str()) else {
            continue;
        };
        let placed = format!("guard.clients[{at}]");
        for section in &mut sections {
            if let Some(rest) = section.strip_prefix(&placed) {
                if rest.is_empty() || rest.starts_with('.') {
                    *section = format!("guard.clients[{id}]{rest}");
                }
            }
        }
    }
    Some(sections)
}

/// A text's digest, to tell the running file (or API key) from a changed one.
fn digest(yaml: &str) -> [u8; 32] {
    Sha256::digest(yaml.as_bytes()).into()
}

/// What `now` lacks at the end of `running` (sections in the order written), where it
/// lacks `running`'s last section, as a file cut short does (also one edited before the
/// cut); none where it has it (a key removed from the middle, or a file reordered: an
/// edit, not a cut). List items count by position: an item removed from a list that ends
/// the file looks like its last one cut off.
fn cut_short(running: &[String], now: &[String]) -> Vec<String> {
    let Some(last) = running.last() else {
        return Vec::new();
    };
    if now.contains(last) {
        return Vec::new();
    }
    let kept = running.iter().rposition(|section| now.contains(section));
    running[kept.map_or(0, |at| at + 1)..].to_vec()
}

/// Whether the watch holds a changed file back, or applies it (its text as read).
enum Held {
    Yes,
    No(std::io::Result<String>),
}

/// At most this many of the missing sections are named in the watch's warning.
const MISSING_NAMED: usize = 8;

/// What only a restart changes, as one configuration has it: each setting's key and its
/// value, written out to compare (the key secret and Redis password hashed, never kept).
/// The listeners, each worker's HTTP settings and request timer, the CORS layer and the
/// store are built once at start; logging is set up once.
#[derive(Debug, PartialEq)]
struct Fixed(Vec<(&'static str, String)>);

impl Fixed {
    fn of(settings: &Settings) -> Self {
        let server = &settings.server;
        let mut fixed = Fixed(vec![
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
                format!(
                    "{:?} {:?} {} {:?}",
                    server.cors_origins,
                    server.cors_allow_headers,
                    server.cors_allow_credentials,
                    server.cors_max_age
                ),
            ),
            ("log", format!("{:?}", settings.log)),
        ]);
        fixed.0.extend(store_entries(settings));
        fixed
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

/// What `store` holds, key by key; secrets (the key secret, the Redis password, the client
/// certificate's key) and the CA only as a hash, so that a changed one is named without being kept.
fn store_entries(settings: &Settings) -> Vec<(&'static str, String)> {
    fn hashed<T: std::hash::Hash>(value: T) -> String {
        use std::hash::Hasher;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut hasher);
        hasher.finish().to_string()
    }
    let store = &settings.store;
    let redis = store.limits.redis.as_ref();
    vec![
        (
            "store.kind",
            if redis.is_some() { "redis" } else { "memory" }.to_owned(),
        ),
        ("store.max_keys", store.limits.max_keys.to_string()),
        ("store.key_secret", hashed(store.key_secret.as_deref())),
        (
            "store.redis (url, mode, nodes, sentinel_master)",
            format!("{:?}", redis.map(|r| &r.url)),
        ),
        (
            "store.redis.username",
            format!("{:?}", redis.map(|r| &r.username)),
        ),
        (
            "store.redis.password",
            hashed(redis.map(|r| r.password.as_deref())),
        ),
        (
            "store.redis.sentinel_username, sentinel_password",
            hashed(redis.map(|r| {
                let auth = r.sentinel_auth.as_ref();
                auth.map(|(user, password)| (user, password.as_str()))
            })),
        ),
        ("store.redis.ca_file", hashed(redis.map(|r| &r.ca_pem))),
        (
            "store.redis.cert_file, key_file",
            hashed(redis.map(|r| {
                let certificate = r.client_certificate.as_ref();
                certificate.map(|(cert, key)| (cert, key.as_slice()))
            })),
        ),
        (
            "store.redis.key_prefix",
            format!("{:?}", redis.map(|r| &r.key_prefix)),
        ),
        (
            "store.redis.timeout",
            format!("{:?}", redis.map(|r| r.timeout)),
        ),
        (
            "store.redis.on_error",
            format!("{:?}", redis.map(|r| r.on_error)),
        ),
        (
            "store.redis.global_keys",
            format!("{:?}", redis.map(|r| r.global_keys)),
        ),
    ]
}

impl Reloader {
    pub(crate) fn new(
        path: PathBuf,
        state: Arc<AdminState>,
        forwarders: Vec<Forwarder>,
        certs: Option<Arc<CertStore>>,
        settings: &Settings,
    ) -> Self {
        let running = std::fs::read_to_string(&path)
            .map(|yaml| (digest(&yaml), sections(&yaml)))
            .unwrap_or_default();
        Reloader {
            path,
            state,
            forwarders,
            certs,
            fixed: Fixed::of(settings),
            global_keys: settings
                .store
                .limits
                .redis
                .as_ref()
                .map_or(1, |redis| redis.global_keys),
            redis_wait: settings
                .store
                .limits
                .redis
                .clone()
                .map(|redis| (redis, settings.server.request_timeout)),
            reread_files: Mutex::new(settings.reread_files.clone()),
            running: Mutex::new(running),
            api_key_digest: Mutex::new(digest(settings.api_key.expose())),
            read_failed: Default::default(),
        }
    }

    /// Reads, checks and applies the file: guard settings and limits (state kept for
    /// unchanged quotas), the API key (re-read: key rotation), the upstream client and the
    /// TLS certificate. The rest of `server` and `admin`, the store section and logging
    /// need a restart.
    pub fn reload(&self) -> anyhow::Result<()> {
        self.reload_reading(std::fs::read_to_string(&self.path))
            .0
            .map(drop)
    }

    /// [`reload`](Self::reload), and the file's text as it read it (none if it could
    /// not), so that the watch notes exactly what was tried.
    fn reload_reading(
        &self,
        yaml: std::io::Result<String>,
    ) -> (anyhow::Result<(String, bool)>, Option<String>) {
        let result = match &yaml {
            Ok(yaml) => self.try_reload(yaml),
            Err(error) => Err(ConfigError::new(
                "",
                format!("cannot read {}: {error}", self.path.display()),
            )
            .into()),
        };
        self.state.metrics.reload(result.is_ok());
        self.read_failed
            .store(yaml.is_err(), std::sync::atomic::Ordering::Relaxed);
        match &result {
            Ok((limits, api_key)) => {
                // What a retuned quota was and is, so a mistake shows in the log of the
                // reload; and whether the API key read is a new one (a rotation done).
                let limits_changed = (!limits.is_empty()).then_some(limits.as_str());
                let api_key = api_key.then_some("changed");
                tracing::info!(
                    path = %self.path.display(),
                    limits_changed,
                    api_key,
                    "configuration reloaded"
                )
            }
            Err(error) => tracing::error!(
                path = %self.path.display(),
                error = %error,
                "configuration reload rejected; the running configuration stays"
            ),
        }
        (result, yaml.ok())
    }

    /// Checks and applies `yaml`. A file that parses names the files it reads: those are
    /// watched from now on even if it is rejected, so that the API key file it waits for
    /// reloads it once it appears.
    /// What changed: the limits (as [`limit_changes`] says), and whether the API key did.
    fn try_reload(&self, yaml: &str) -> anyhow::Result<(String, bool)> {
        let config = GatewayConfig::from_yaml(yaml)?;
        *self.reread_files.lock().unwrap() = config.reread_files();
        let settings = config.validate(yaml)?;
        crate::config::global_bursts_fit(
            &settings.guard,
            self.global_keys,
            "store.redis.global_keys of the running gateway, which changes only on restart",
        )
        .map_err(|e| e.located(yaml))?;
        if let Some((redis, request_timeout)) = &self.redis_wait {
            crate::config::reloaded_upstream_fits(
                redis,
                *request_timeout,
                settings.upstream.timeout,
            )
            .map_err(|e| e.located(yaml))?;
        }
        let changed = self.fixed.changed_in(&Fixed::of(&settings));
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
        let limits_changed = limit_changes(&self.state.guard.settings(), &settings.guard);
        let key_digest = digest(settings.api_key.expose());
        let api_key_changed =
            std::mem::replace(&mut *self.api_key_digest.lock().unwrap(), key_digest) != key_digest;
        self.state.guard.update(settings.guard, settings.api_key);
        *self.running.lock().unwrap() = (digest(yaml), sections(yaml));
        // Said once the reload is applied (a reload rejected later changes nothing), and
        // with the gauge set: whoever reads the line then finds the gauge saying so.
        self.state.metrics.restart_pending(!changed.is_empty());
        if !changed.is_empty() {
            tracing::warn!(
                keys = %changed.join(", "),
                "these settings change only on restart; the running ones stay"
            );
        }
        Ok((limits_changed, api_key_changed))
    }

    /// Reloads on each of `hangups` (SIGHUP, see [`crate::signal::hangups`]) and whenever
    /// the files' contents change, until the process ends.
    pub async fn watch(self, hangups: std::io::Result<crate::signal::Hangups>) {
        let mut hangup = match hangups {
            Ok(hangup) => Some(hangup),
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; reloading on file change only");
                None
            }
        };
        let mut watch = Watch::new(self.fingerprint());
        // A settled file lacking sections the running one has: its text and since when.
        let mut held: Option<(String, tokio::time::Instant)> = None;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hangup_received = async {
                match &mut hangup {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hangup_received => {
                    tracing::info!("SIGHUP received");
                    self.reload_and_note(&mut watch);
                }
                _ = tick.tick() => self.look(&mut watch, &mut held),
            }
        }
    }

    /// One look at the file: reloads it once it changed and settled, says once that it
    /// cannot be read, and tries again a file back as it was after it could not be read.
    fn look(&self, watch: &mut Watch, held: &mut Option<(String, tokio::time::Instant)>) {
        let now = self.fingerprint();
        let read_failed = self.read_failed.load(std::sync::atomic::Ordering::Relaxed);
        if read_failed && now.as_ref().is_ok_and(|now| watch.applied == Some(*now)) {
            self.reload_and_note(watch);
            return;
        }
        match watch.look(now) {
            Look::Unchanged => *held = None,
            Look::Changed => match self.holds(held) {
                Held::Yes => watch.defer(),
                // The text checked is the text applied: a writer truncating the file
                // between the two would otherwise have its empty file applied.
                Held::No(yaml) => self.reload_text_and_note(watch, yaml),
            },
            Look::Unreadable(error) => {
                self.state.metrics.reload(false);
                self.read_failed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    path = %self.path.display(),
                    %error,
                    "cannot read the configuration file; the running configuration stays"
                );
            }
        }
    }

    /// Whether the settled file must wait: it lacks the running file's last section, and
    /// has not stood still for [`HOLD`] yet (said once per such file); if not, its text as
    /// read, to be applied.
    fn holds(&self, held: &mut Option<(String, tokio::time::Instant)>) -> Held {
        let yaml = match std::fs::read_to_string(&self.path) {
            Ok(yaml) => yaml,
            Err(error) => return Held::No(Err(error)),
        };
        // Not YAML to the loader: its reload is refused at once, saying why (what follows
        // the error would only look missing).
        if !located_yaml::loads(&yaml) {
            *held = None;
            return Held::No(Ok(yaml));
        }
        let running = self.running.lock().unwrap().clone();
        // The running text itself: only a file it names changed (an API key rotated).
        if running.0 == digest(&yaml) {
            *held = None;
            return Held::No(Ok(yaml));
        }
        // YAML the key-path reader stops in, here or in the running file (a tab after a
        // key's colon, which the loader takes): the sections cannot be compared, so it
        // waits as a cut would.
        let missing = match (running.1, sections(&yaml)) {
            (Some(running), Some(now)) => cut_short(&running, &now),
            _ => vec!["(sections not compared: this file or the running one holds YAML the check cannot read through, such as a tab after a key's colon)".to_owned()],
        };
        if missing.is_empty() {
            *held = None;
            return Held::No(Ok(yaml));
        }
        match held {
            Some((text, since)) if *text == yaml => {
                if since.elapsed() < HOLD {
                    Held::Yes
                } else {
                    Held::No(Ok(yaml))
                }
            }
            _ => {
                let mut named = missing[..missing.len().min(MISSING_NAMED)].join(", ");
                if missing.len() > MISSING_NAMED {
                    named += &format!(" and {} more", missing.len() - MISSING_NAMED);
                }
                tracing::warn!(
                    path = %self.path.display(),
                    missing = %named,
                    "the configuration file lacks the running one's last keys or list items; applied once it has stood still for 5s (a writer still writing?)"
                );
                *held = Some((yaml, tokio::time::Instant::now()));
                Held::Yes
            }
        }
    }

    /// Reloads, and tells `watch` which contents that was: the file's text as the reload
    /// read it, with the named files as they were just before (a change made to either
    /// while it ran is then still new to the next look). When the reload changed which
    /// files are named, nothing is noted: the next looks reload once more.
    fn reload_and_note(&self, watch: &mut Watch) {
        let named = self.reread_files.lock().unwrap().clone();
        let named_before = Self::digest_of_files(&named);
        let yaml = std::fs::read_to_string(&self.path);
        self.noted(watch, named, named_before, yaml);
    }

    /// [`reload_and_note`](Self::reload_and_note) with the file's text as already read.
    fn reload_text_and_note(&self, watch: &mut Watch, yaml: std::io::Result<String>) {
        let named = self.reread_files.lock().unwrap().clone();
        let named_before = Self::digest_of_files(&named);
        self.noted(watch, named, named_before, yaml);
    }

    /// Reloads from `yaml` and notes it in `watch` with the named files as they were
    /// (`named_before`), if the reload did not change which files are named.
    fn noted(
        &self,
        watch: &mut Watch,
        named: Vec<PathBuf>,
        named_before: [u8; 32],
        yaml: std::io::Result<String>,
    ) {
        if let (_, Some(yaml)) = self.reload_reading(yaml) {
            if *self.reread_files.lock().unwrap() == named {
                watch.reloaded(Ok(Self::combined(yaml.as_bytes(), named_before)));
            }
        }
    }

    /// A digest of the file's contents and of the files it names that a reload reads
    /// (contents, not timestamps: ConfigMaps swap symlinks, and editors rewrite files,
    /// without the contents always changing). A named file that cannot be read counts as
    /// contents of its own, so that its reload, and the error saying why, happen.
    fn fingerprint(&self) -> std::io::Result<[u8; 32]> {
        Ok(self.fingerprint_of(&std::fs::read(&self.path)?))
    }

    /// [`fingerprint`](Self::fingerprint) with the file's contents as given.
    fn fingerprint_of(&self, config: &[u8]) -> [u8; 32] {
        let named = Self::digest_of_files(&self.reread_files.lock().unwrap());
        Self::combined(config, named)
    }

    fn combined(config: &[u8], named: [u8; 32]) -> [u8; 32] {
        let mut digest = Sha256::new();
        digest.update(config);
        digest.update(named);
        digest.finalize().into()
    }

    /// A digest of the named files: each path and its contents, or that it cannot be read.
    fn digest_of_files(paths: &[PathBuf]) -> [u8; 32] {
        let mut digest = Sha256::new();
        for path in paths {
            digest.update(path.as_os_str().as_encoded_bytes());
            // The API key and the TLS private key: the buffer read is wiped once hashed.
            match std::fs::read(path).map(zeroize::Zeroizing::new) {
                Ok(bytes) => {
                    digest.update([1]);
                    digest.update(&*bytes);
                }
                Err(_) => digest.update([0]),
            }
        }
        digest.finalize().into()
    }
}

/// What one look at the files found.
#[derive(Debug, PartialEq)]
enum Look {
    Unchanged,
    /// New contents, the same as the look before: time to reload.
    Changed,
    /// The file cannot be read, at two looks in a row (said once, until it can be again):
    /// an editor that moves the file aside and writes a new one leaves it missing for a
    /// moment, which is no failure.
    Unreadable(String),
}

/// The file watch's memory between looks: the contents last applied (or tried), new
/// contents seen once and waiting for a second look, and how many looks in a row found
/// the file unreadable (counted up to two: reported).
struct Watch {
    applied: Option<[u8; 32]>,
    /// What `applied` was before the last `Changed`, for [`defer`](Watch::defer).
    before: Option<[u8; 32]>,
    pending: Option<[u8; 32]>,
    unreadable: u8,
}

impl Watch {
    fn new(start: std::io::Result<[u8; 32]>) -> Self {
        Watch {
            applied: start.ok(),
            before: None,
            pending: None,
            unreadable: 0,
        }
    }

    /// The contents just found `Changed` are not applied yet: every later look at them
    /// finds them changed again, until they are applied or replaced.
    fn defer(&mut self) {
        self.pending = self.applied;
        self.applied = self.before;
    }

    /// A reload happened outside the watch (SIGHUP): these contents are the ones tried.
    fn reloaded(&mut self, now: std::io::Result<[u8; 32]>) {
        if let Ok(now) = now {
            self.applied = Some(now);
            self.pending = None;
        }
    }

    fn look(&mut self, now: std::io::Result<[u8; 32]>) -> Look {
        let now = match now {
            Ok(now) => now,
            Err(error) => {
                self.pending = None;
                self.unreadable = self.unreadable.saturating_add(1).min(3);
                if self.unreadable != 2 {
                    return Look::Unchanged;
                }
                return Look::Unreadable(error.to_string());
            }
        };
        self.unreadable = 0;
        if self.applied == Some(now) {
            self.pending = None;
            Look::Unchanged
        } else if self.pending == Some(now) {
            self.before = self.applied.replace(now);
            self.pending = None;
            Look::Changed
        } else {
            self.pending = Some(now);
            Look::Unchanged
        }
    }
}

/// Each limit group whose quotas differ, as it was and as it is:
/// `per_ip: 20/1m -> 1/1m; global: 100/1s -> none`; empty when none changed.
fn limit_changes(before: &GuardSettings, after: &GuardSettings) -> String {
    let quotas = |settings: &GuardSettings, group| {
        let quotas = settings.quotas(group);
        match quotas.is_empty() {
            true => "none".to_owned(),
            false => quotas
                .iter()
                .map(quota_label)
                .collect::<Vec<_>>()
                .join(", "),
        }
    };
    // As sets: a reload that only reorders a group's quotas changes nothing.
    let sorted = |settings: &GuardSettings, group| {
        let mut quotas = settings.quotas(group).to_vec();
        quotas.sort_by_key(|q| (q.per, q.requests, q.burst, q.shadow));
        quotas
    };
    LimitGroup::ALL
        .into_iter()
        .filter(|&group| sorted(before, group) != sorted(after, group))
        .map(|group| {
            format!(
                "{}: {} -> {}",
                group.name(),
                quotas(before, group),
                quotas(after, group)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::{limit_changes, Look, Watch};

    fn guard(limits: &str) -> reset_guard::GuardSettings {
        let yaml = format!(
            "clients: [{{ id: ios, token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae }}]\nlimits:\n{limits}"
        );
        reset_guard::GuardSettings::from_yaml(&yaml).unwrap()
    }

    /// What a reload's line says of the limits: each group that changed, as it was and is;
    /// nothing for a reordered group or an unchanged one.
    #[test]
    fn limit_changes_name_each_changed_group_and_nothing_else() {
        let before = guard("  per_ip: [{ requests: 20, per: 1m }, { requests: 100, per: 1h }]\n  global: [{ requests: 100, per: 1s }]\n");
        let reordered = guard("  per_ip: [{ requests: 100, per: 1h }, { requests: 20, per: 1m }]\n  global: [{ requests: 100, per: 1s }]\n");
        assert_eq!(limit_changes(&before, &reordered), "");
        assert_eq!(limit_changes(&before, &before), "");
        let changed = guard("  per_ip: [{ requests: 1, per: 1m }, { requests: 100, per: 1h, shadow: true }]\n  global: []\n");
        assert_eq!(
            limit_changes(&before, &changed),
            "per_ip: 20/1m, 100/1h -> 1/1m, 100/1h shadow; global: 100/1s -> none"
        );
    }

    fn contents(byte: u8) -> std::io::Result<[u8; 32]> {
        Ok([byte; 32])
    }

    fn gone() -> std::io::Result<[u8; 32]> {
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    #[test]
    fn a_change_is_applied_once_it_has_stood_still_for_a_look() {
        let mut watch = Watch::new(contents(1));
        assert_eq!(watch.look(contents(1)), Look::Unchanged);
        // Half written, then finished: neither is applied until seen twice.
        assert_eq!(watch.look(contents(2)), Look::Unchanged);
        assert_eq!(watch.look(contents(3)), Look::Unchanged);
        assert_eq!(watch.look(contents(3)), Look::Changed);
        assert_eq!(watch.look(contents(3)), Look::Unchanged);
        // Back to what was applied before the write settled: nothing to do.
        assert_eq!(watch.look(contents(4)), Look::Unchanged);
        assert_eq!(watch.look(contents(3)), Look::Unchanged);
        assert_eq!(watch.look(contents(3)), Look::Unchanged);
    }

    #[test]
    fn an_unreadable_file_is_reported_once_until_it_is_readable_again() {
        let mut watch = Watch::new(contents(1));
        assert_eq!(watch.look(gone()), Look::Unchanged, "gone for a moment");
        assert_eq!(watch.look(contents(1)), Look::Unchanged, "and back");
        assert_eq!(watch.look(gone()), Look::Unchanged);
        assert!(matches!(watch.look(gone()), Look::Unreadable(_)));
        assert_eq!(watch.look(gone()), Look::Unchanged);
        assert_eq!(
            watch.look(contents(1)),
            Look::Unchanged,
            "the same file again (the reloader tries it again: it was reported gone)"
        );
        assert_eq!(watch.look(gone()), Look::Unchanged);
        assert!(matches!(watch.look(gone()), Look::Unreadable(_)));
        assert_eq!(watch.look(contents(2)), Look::Unchanged);
        assert_eq!(
            watch.look(contents(2)),
            Look::Changed,
            "a new file, once settled"
        );
    }

    /// An editor's save (the file moved aside, a new one written) seen missing at one look:
    /// no failure, and the new contents are applied once settled.
    #[test]
    fn a_file_missing_at_one_look_is_no_failure() {
        let mut watch = Watch::new(contents(1));
        assert_eq!(watch.look(gone()), Look::Unchanged);
        assert_eq!(watch.look(contents(2)), Look::Unchanged);
        assert_eq!(watch.look(contents(2)), Look::Changed);
    }

    #[test]
    fn deferred_contents_are_found_changed_at_every_look_until_applied() {
        let mut watch = Watch::new(contents(1));
        assert_eq!(watch.look(contents(2)), Look::Unchanged);
        assert_eq!(watch.look(contents(2)), Look::Changed);
        watch.defer();
        assert_eq!(watch.look(contents(2)), Look::Changed);
        watch.defer();
        // Finished meanwhile: the new contents settle as any change.
        assert_eq!(watch.look(contents(3)), Look::Unchanged);
        assert_eq!(watch.look(contents(3)), Look::Changed);
        assert_eq!(watch.look(contents(3)), Look::Unchanged);
    }

    #[test]
    fn only_the_running_files_last_sections_missing_is_a_cut() {
        let sections = |yaml: &str| super::sections(yaml).unwrap();
        let running = sections("a:\n  b: 1\n  c: 2\nd:\n  - x: 1\n  - x: 2\n");
        let cut = sections("a:\n  b: 1\n  c: 2\nd:\n  - x: 1\n");
        assert_eq!(super::cut_short(&running, &cut), ["d[1]", "d[1].x"]);
        // A key taken out of the middle is an edit.
        let edited = sections("a:\n  b: 1\nd:\n  - x: 1\n  - x: 2\n");
        assert!(super::cut_short(&running, &edited).is_empty());
        assert!(super::cut_short(&running, &running).is_empty());
        // Edited (`c` removed) and cut (after `d`'s first item): a cut.
        let both = sections("a:\n  b: 1\nd:\n  - x: 1\n");
        assert_eq!(super::cut_short(&running, &both), ["d[1]", "d[1].x"]);
        // Reordered whole: an edit.
        let reordered = sections("d:\n  - x: 1\n  - x: 2\na:\n  b: 1\n  c: 2\n");
        assert!(super::cut_short(&running, &reordered).is_empty());
        // Clients by id: one revoked from the middle of a list that ends the file is an
        // edit; one put first and the list cut short after it is a cut.
        let clients = |ids: &[&str]| {
            let items: String = ids
                .iter()
                .map(|id| format!("    - id: {id}\n      token_sha256: x\n"))
                .collect();
            sections(&format!("guard:\n  clients:\n{items}"))
        };
        let abc = clients(&["a", "b", "c"]);
        assert!(super::cut_short(&abc, &clients(&["a", "c"])).is_empty());
        let cut = super::cut_short(&abc, &clients(&["z", "a", "b"]));
        assert_eq!(
            cut,
            [
                "guard.clients[c]",
                "guard.clients[c].id",
                "guard.clients[c].token_sha256"
            ]
        );
        // Not read through (a tab after a colon): none.
        assert_eq!(super::sections("a:\tb\n"), None);
    }

    #[test]
    fn a_files_sections_are_its_key_paths_and_list_items() {
        let yaml = "server:\n  listen: x\n  cors: { allow_origins: [a] }\nguard:\n  clients:\n    - id: a\n  limits:\n    per_ip: []\n    per_email: [{ requests: 3, per: 1h }]\n";
        let sections = super::sections(yaml).unwrap();
        for section in [
            "guard.clients",
            "guard.clients[a]",
            "guard.clients[a].id",
            "guard.limits.per_email",
            "guard.limits.per_email[0].per",
            "server.cors.allow_origins",
        ] {
            assert!(
                sections.iter().any(|s| s == section),
                "{section}: {sections:?}"
            );
        }
    }

    #[test]
    fn a_sighup_reload_is_not_repeated_by_the_watch() {
        let mut watch = Watch::new(contents(1));
        assert_eq!(watch.look(contents(2)), Look::Unchanged);
        watch.reloaded(contents(2));
        assert_eq!(watch.look(contents(2)), Look::Unchanged);
    }
}
