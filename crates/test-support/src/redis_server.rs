//! A real `redis-server` on a free loopback port, owned by one test and stopped with it:
//! standalone, a replica of another, or a sentinel watching one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    options: RedisOptions,
    child: Option<Child>,
    /// A sentinel's directory (its config file, which it rewrites), removed on drop.
    dir: Option<PathBuf>,
}

/// The name sentinels started by [`RedisServer::sentinel`] know their master by.
pub const SENTINEL_MASTER: &str = "mymaster";

/// How a server is set up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `requirepass`: clients must `AUTH` with it; a replica (or a cluster node's
    /// replica) authenticates to its master with it too (`masterauth`).
    pub password: Option<String>,
    /// TLS on a second port: (port, certificate file, key file, CA file). A replica then
    /// reaches its master over TLS (`replica_of` names the master's TLS port) and announces
    /// its TLS port. A cluster node with TLS also speaks it on its cluster bus (at that
    /// port + 10000), and tells TLS clients its TLS port in `CLUSTER SLOTS` and
    /// redirections.
    pub tls: Option<(u16, PathBuf, PathBuf, PathBuf)>,
    /// `replicaof 127.0.0.1 <port>`: a replica of the server on that port.
    pub replica_of: Option<u16>,
    /// Cluster mode, with its `nodes-<port>.conf` in this directory.
    pub cluster_dir: Option<PathBuf>,
}

/// How a sentinel is set up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct SentinelOptions {
    /// `sentinel auth-pass`: the password of the master and its replicas.
    pub auth_pass: Option<String>,
    /// `requirepass`: the sentinel's own password, for its clients and the other
    /// sentinels (which must share it).
    pub password: Option<String>,
    /// ACL users of the sentinel's own, each a `user` line of its config without the
    /// word `user` (`watcher on >secret -@all +sentinel|get-master-addr-by-name`).
    pub users: Vec<String>,
    /// TLS on a second port, as [`RedisOptions::tls`], and to the master, its replicas and
    /// the other sentinels (`tls-replication yes`: the monitored port is a TLS one).
    pub tls: Option<(u16, PathBuf, PathBuf, PathBuf)>,
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts a server on a free port; panics with the reason if it cannot.
    pub fn start() -> RedisServer {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server on a free port, set up as `options` says.
    pub fn start_with(options: RedisOptions) -> RedisServer {
        Self::start_on_with(free_port(), options)
    }

    /// Starts a server on `port` (used to bring one back after `stop`).
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_on_with(port, RedisOptions::default())
    }

    /// Starts a server on `port`, set up as `options` says (a cluster node brought back).
    pub fn start_on_with(port: u16, options: RedisOptions) -> RedisServer {
        let mut extra: Vec<String> = Vec::new();
        if let Some(password) = &options.password {
            extra.extend(["--requirepass".to_owned(), password.clone()]);
            extra.extend(["--masterauth".to_owned(), password.clone()]);
        }
        if let Some((tls_port, cert, key, ca)) = &options.tls {
            extra.extend(["--tls-port".to_owned(), tls_port.to_string()]);
            for (flag, path) in [
                ("--tls-cert-file", cert),
                ("--tls-key-file", key),
                ("--tls-ca-cert-file", ca),
            ] {
                extra.extend([flag.to_owned(), path.display().to_string()]);
            }
            extra.extend(["--tls-auth-clients".to_owned(), "no".to_owned()]);
            extra.extend(["--tls-replication".to_owned(), "yes".to_owned()]);
            if options.cluster_dir.is_some() {
                extra.extend(["--tls-cluster".to_owned(), "yes".to_owned()]);
            }
        }
        if let Some(master) = options.replica_of {
            extra.extend([
                "--replicaof".to_owned(),
                "127.0.0.1".to_owned(),
                master.to_string(),
            ]);
        }
        if let Some(dir) = &options.cluster_dir {
            extra.extend([
                "--cluster-enabled".to_owned(),
                "yes".to_owned(),
                "--cluster-config-file".to_owned(),
                dir.join(format!("nodes-{port}.conf")).display().to_string(),
                "--cluster-node-timeout".to_owned(),
                "2000".to_owned(),
                "--dir".to_owned(),
                dir.display().to_string(),
            ]);
        }
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args([
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            // Replication straight over the socket, at once, never through a file in the
            // working directory.
            .args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
                "--repl-diskless-load",
                "on-empty-db",
            ])
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let server = RedisServer {
            port,
            options,
            child: Some(child),
            dir: None,
        };
        server.wait_ready();
        server
    }

    /// Starts a sentinel on a free port watching the master on `master_port` as
    /// [`SENTINEL_MASTER`] (quorum 2, down after 500ms, failover timeout 5s), from a
    /// config file in a directory of its own.
    pub fn sentinel(master_port: u16) -> RedisServer {
        Self::sentinel_with(master_port, SentinelOptions::default())
    }

    /// [`sentinel`](Self::sentinel) for a master (and replicas) that want `password`
    /// (`sentinel auth-pass`); the sentinel itself wants none.
    pub fn sentinel_with_auth(master_port: u16, password: Option<&str>) -> RedisServer {
        Self::sentinel_with(
            master_port,
            SentinelOptions {
                auth_pass: password.map(str::to_owned),
                ..Default::default()
            },
        )
    }

    /// [`sentinel`](Self::sentinel), set up as `options` says.
    pub fn sentinel_with(master_port: u16, options: SentinelOptions) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "test-support-sentinel-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("sentinel.conf");
        let mut extra = String::new();
        if let Some(password) = &options.auth_pass {
            extra += &format!("sentinel auth-pass {SENTINEL_MASTER} {password}\n");
        }
        if let Some(password) = &options.password {
            extra += &format!("requirepass {password}\n");
        }
        for user in &options.users {
            extra += &format!("user {user}\n");
        }
        if let Some((tls_port, cert, key, ca)) = &options.tls {
            extra += &format!(
                "tls-port {tls_port}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
                cert.display(),
                key.display(),
                ca.display()
            );
        }
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n\
                 loglevel warning\ndir {dir}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 500\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n{extra}",
                dir = dir.display(),
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let server = RedisServer {
            port,
            options: RedisOptions {
                password: options.password,
                tls: options.tls,
                ..Default::default()
            },
            child: Some(child),
            dir: Some(dir),
        };
        server.wait_ready();
        server
    }

    /// A sentinel's view of [`SENTINEL_MASTER`]: the port it names as the master now.
    pub fn sentinel_master_port(&self) -> Option<u16> {
        let reply = self.command(&format!(
            "SENTINEL get-master-addr-by-name {SENTINEL_MASTER}"
        ))?;
        bulk_strings(&reply).get(1)?.parse().ok()
    }

    /// A field of a sentinel's `SENTINEL master` reply (`num-other-sentinels`,
    /// `num-slaves`, `flags`…).
    pub fn sentinel_field(&self, name: &str) -> Option<String> {
        let reply = self.command(&format!("SENTINEL master {SENTINEL_MASTER}"))?;
        let fields = bulk_strings(&reply);
        let at = fields.iter().position(|f| f == name)?;
        fields.get(at + 1).cloned()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.command("PING").is_some_and(|r| r.starts_with("+PONG")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// The options it was started with.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends the process signal `name` (`STOP`, `CONT`): a Redis stopped by a stall of its
    /// host, as a fork or a swapped page stalls it, runs on from where it was.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name}");
    }

    /// The plain-TCP URL, without the password.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TLS URL for `host` (the name the certificate carries), when TLS is on.
    pub fn tls_url(&self, host: &str) -> Option<String> {
        let (port, ..) = self.options.tls.as_ref()?;
        Some(format!("rediss://{host}:{port}"))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Script calls (`EVAL`/`EVALSHA`) this server has run so far without an error: a call
    /// refused `NOSCRIPT` (sent again once the client has loaded the script) is not one.
    pub fn script_calls(&self) -> u64 {
        let info = self.command("INFO commandstats").unwrap_or_default();
        let field = |line: &str, name: &str| -> u64 {
            line.split(&format!(",{name}="))
                .nth(1)
                .or_else(|| line.split(&format!(":{name}=")).nth(1))
                .and_then(|rest| rest.split(',').next()?.trim().parse().ok())
                .unwrap_or(0)
        };
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .map(|l| field(l, "calls").saturating_sub(field(l, "failed_calls")))
            .sum()
    }

    /// Connections to this server, the one asking included (`INFO clients`).
    pub fn connected_clients(&self) -> usize {
        self.info_number("clients", "connected_clients") as usize
    }

    /// Connections this server has accepted since it started, the one asking included
    /// (`INFO stats`).
    pub fn connections_received(&self) -> u64 {
        self.info_number("stats", "total_connections_received")
    }

    /// The number `field` of `INFO section` (0 when the server does not say).
    fn info_number(&self, section: &str, field: &str) -> u64 {
        let info = self.command(&format!("INFO {section}")).unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends one inline command and returns the raw reply (enough for tests).
    pub fn command(&self, line: &str) -> Option<String> {
        let mut stream =
            TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        if let Some(password) = &self.options.password {
            stream
                .write_all(format!("AUTH {password}\r\n").as_bytes())
                .ok()?;
            let mut ok = [0u8; 5];
            stream.read_exact(&mut ok).ok()?;
            if &ok != b"+OK\r\n" {
                return None;
            }
        }
        stream.write_all(format!("{line}\r\n").as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let n = stream.read(&mut buf).ok()?;
            reply.extend_from_slice(&buf[..n]);
            if n == 0 || complete(&reply) {
                break;
            }
        }
        Some(String::from_utf8_lossy(&reply).into_owned())
    }

    /// Every key and its value: as it is when it is text, a limit key's state as
    /// `interval_us.capacity_us=tat` per quota (see [`quota_states`](Self::quota_states)).
    pub fn dump(&self) -> Vec<(String, String)> {
        let script = "local v = redis.call('GET', KEYS[1]) if not v then return '' end \
            if v:match('^[%w.:]*$') then return v end \
            if #v % 24 ~= 0 then return '<' .. #v .. ' bytes>' end \
            local n = {struct.unpack('<' .. string.rep('d', #v / 8), v)} local out = {} \
            for i = 1, #v / 8, 3 do \
            out[#out + 1] = string.format('%d.%d=%d', n[i], n[i + 1], n[i + 2]) end \
            return table.concat(out, ' ')";
        let keys = self.command("KEYS *").unwrap_or_default();
        bulk_strings(&keys)
            .into_iter()
            .map(|key| {
                let value = self
                    .command(&format!("EVAL \"{script}\" 1 {key}"))
                    .unwrap_or_default();
                let value = bulk_strings(&format!("*1\r\n{value}"))
                    .pop()
                    .unwrap_or_default();
                (key, value)
            })
            .collect()
    }

    /// A key's remaining time to live in milliseconds (-1: none; -2: no such key; -3: no
    /// answer).
    pub fn pttl(&self, key: &str) -> i64 {
        self.command(&format!("PTTL {key}"))
            .unwrap_or_default()
            .trim_start_matches(':')
            .trim()
            .parse()
            .unwrap_or(-3)
    }

    /// The state a limit key holds, read by the server itself (the value is binary): per
    /// quota of its group, interval_us, capacity_us and TAT (microseconds of the server's
    /// clock), or nothing for a key that is absent.
    pub fn quota_states(&self, key: &str) -> Vec<[i64; 3]> {
        let script = "local v = redis.call('GET', KEYS[1]) if not v then return {} end \
            local n = {struct.unpack('<' .. string.rep('d', #v / 8), v)} local out = {} \
            for i = 1, #v / 8 do out[i] = string.format('%d', n[i]) end return out";
        let reply = self
            .command(&format!("EVAL \"{script}\" 1 {key}"))
            .unwrap_or_default();
        let numbers: Vec<i64> = bulk_strings(&reply)
            .iter()
            .map(|n| n.parse().unwrap_or(-1))
            .collect();
        assert_eq!(numbers.len() % 3, 0, "{key} holds {reply:?}");
        numbers
            .chunks_exact(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect()
    }

    /// Writes `key` as a limit key holding `numbers` (Lua expressions, three per quota:
    /// interval_us, capacity_us, TAT; `1/0` is infinity), without an expiry: a value the
    /// gateway did not write. `now` in an expression is the server's clock in microseconds.
    pub fn plant_quota_states(&self, key: &str, numbers: &str) {
        let script = format!(
            "local t = redis.call('TIME') local now = t[1] * 1000000 + t[2] \
             local n = {{{numbers}}} \
             return redis.call('SET', KEYS[1], struct.pack('<' .. string.rep('d', #n), unpack(n)))"
        );
        let reply = self
            .command(&format!("EVAL \"{script}\" 1 {key}"))
            .unwrap_or_default();
        assert_eq!(reply.trim(), "+OK", "{key}: {reply}");
    }

    /// Kills the server (SIGKILL: the worst case for its clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The count or length after a RESP reply's type byte (0 until it has arrived).
fn leading_number<T: std::str::FromStr + Default>(reply: &str) -> T {
    reply[1..]
        .split("\r\n")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_default()
}

/// Whether a RESP reply has fully arrived (simple replies and flat arrays of bulk strings).
fn complete(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    match text.chars().next() {
        Some('*') => bulk_strings(&text).len() >= leading_number::<usize>(&text),
        Some('$') => leading_number::<i64>(&text) < 0 || text.split("\r\n").count() >= 3,
        Some(_) => text.ends_with("\r\n"),
        None => false,
    }
}

fn bulk_strings(reply: &str) -> Vec<String> {
    let mut lines = reply.split("\r\n");
    let mut out = Vec::new();
    lines.next();
    while let Some(line) = lines.next() {
        if line.starts_with('$') {
            if let Some(value) = lines.next() {
                if !line.starts_with("$-1") {
                    out.push(value.to_owned());
                }
            }
        }
    }
    out
}
