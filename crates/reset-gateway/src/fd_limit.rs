//! The open-file limit: raised at start as far as `server.max_connections` needs, up to
//! the hard limit (as Go's runtime raises its own: systemd's default soft limit is 1024),
//! and a warning when even that cannot hold them, before a busy hour finds out with
//! `accept failed: Too many open files`.

/// File descriptors the process needs beyond its connections' sockets: the listeners, the
/// admin listener's connections, Redis, the log and the configuration files.
const HEADROOM: u64 = 256;

/// Raises the open-file limit as far as `max_connections` may need (and the hard limit
/// allows): a client connection takes a descriptor, and one more while its request waits
/// on QuickBlox. Warns when the limit cannot hold even one each.
pub fn raise_for(max_connections: usize) {
    let connections = max_connections as u64;
    let wanted = connections.saturating_mul(2).saturating_add(HEADROOM);
    let needed = connections.saturating_add(HEADROOM);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < needed => tracing::warn!(
            open_files = limit,
            needed,
            max_connections,
            "the process may open fewer files than server.max_connections client connections \
             take (one each, and one more while a request waits on QuickBlox, which this limit \
             leaves no room for): raise the limit (ulimit -n, systemd LimitNOFILE, docker \
             --ulimit nofile) or lower server.max_connections"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open-file limit"),
    }
}
