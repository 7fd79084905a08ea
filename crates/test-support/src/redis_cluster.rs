//! A real Redis Cluster of three masters on free loopback ports (each port + 10000, its
//! cluster bus, free too), joined with `redis-cli --cluster create`, and stopped with the
//! test; optionally with a replica of each master, a password and TLS, and with nodes
//! killed and brought back.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{RedisOptions, RedisServer};

pub struct RedisCluster {
    /// The masters, in the order they were created.
    pub nodes: Vec<RedisServer>,
    /// A replica of each master, in the masters' order, with [`ClusterOptions::replicas`].
    pub replicas: Vec<RedisServer>,
    dir: PathBuf,
    options: ClusterOptions,
}

/// How every node of a [`RedisCluster`] is set up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// `requirepass` and `masterauth` on every node.
    pub password: Option<String>,
    /// TLS for clients and the cluster bus, on a TLS port of each node's own (the plain
    /// port stays open for the test's own commands): (certificate file, key file, CA file).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// A replica for each master (`--cluster-replicas 1`), as most clusters run.
    pub replicas: bool,
}

/// One cluster node on its own, with its `nodes-<port>.conf` in `dir`: `cluster-enabled
/// yes`, no slot assigned, no other node met (a node before `redis-cli --cluster create`).
pub fn lone_cluster_node(dir: &std::path::Path) -> RedisServer {
    RedisServer::start_on_with(
        free_cluster_port(),
        RedisOptions {
            cluster_dir: Some(dir.to_owned()),
            ..RedisOptions::default()
        },
    )
}

/// A free loopback port whose cluster bus port (+10000) is free as well.
fn free_cluster_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts three masters and joins them; returns once every node says
    /// `cluster_state:ok`. Panics with the reason if it cannot.
    pub fn start() -> RedisCluster {
        Self::start_with(ClusterOptions::default())
    }

    /// [`start`](Self::start), every node set up as `options` says. A port picked free can
    /// be taken by another process before a node binds it (and a node needs two: its own
    /// and its bus port): a failed start is tried again on other ports, twice at most.
    pub fn start_with(options: ClusterOptions) -> RedisCluster {
        for _ in 0..2 {
            let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Self::start_once(options.clone())
            }));
            if let Ok(cluster) = attempt {
                return cluster;
            }
        }
        Self::start_once(options)
    }

    fn start_once(options: ClusterOptions) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "test-support-cluster-{}-{}",
            std::process::id(),
            free_cluster_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let count = if options.replicas { 6 } else { 3 };
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                RedisServer::start_on_with(
                    free_cluster_port(),
                    RedisOptions {
                        password: options.password.clone(),
                        tls: options.tls.clone().map(|(cert, key, ca)| {
                            // The bus listens at the TLS port + 10000 then.
                            (free_cluster_port(), cert, key, ca)
                        }),
                        cluster_dir: Some(dir.clone()),
                        ..RedisOptions::default()
                    },
                )
            })
            .collect();
        let replicas = if options.replicas { "1" } else { "0" };
        let mut cluster = RedisCluster {
            nodes,
            replicas: Vec::new(),
            dir,
            options,
        };
        let mut create = cluster.cli();
        create.arg("--cluster").arg("create");
        for i in 0..cluster.nodes.len() {
            create.arg(cluster.cli_address(i));
        }
        let out = create
            .args(["--cluster-replicas", replicas, "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok(Duration::from_secs(20));
        if cluster.options.replicas {
            cluster.sort_replicas(Duration::from_secs(20));
        }
        cluster
    }

    /// Moves the replicas out of `nodes` into `replicas`, each at its master's index, once
    /// each is linked to its master and every master lists it.
    fn sort_replicas(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let role = |node: &RedisServer| node.command("INFO replication").unwrap_or_default();
        let all = std::mem::take(&mut self.nodes);
        let (mut masters, mut replicas) = (Vec::new(), Vec::new());
        for node in all {
            if role(&node).contains("role:master") {
                masters.push(node);
            } else {
                replicas.push(node);
            }
        }
        assert_eq!(
            (masters.len(), replicas.len()),
            (3, 3),
            "three masters, three replicas"
        );
        let port_of = |info: &str| -> Option<u16> {
            info.lines()
                .find_map(|line| line.strip_prefix("master_port:"))
                .and_then(|port| port.trim().parse().ok())
        };
        while Instant::now() < deadline {
            let linked = replicas.iter().all(|r| {
                let info = role(r);
                info.contains("master_link_status:up") && port_of(&info).is_some()
            });
            let listed = masters.iter().all(|m| {
                let slots = m.command("CLUSTER SLOTS").unwrap_or_default();
                replicas
                    .iter()
                    .all(|r| slots.contains(&format!(":{}\r\n", r.port())))
            });
            if linked && listed {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut ordered = Vec::new();
        for master in &masters {
            let at = replicas
                .iter()
                .position(|r| port_of(&role(r)) == Some(master.port()))
                .expect("a replica of each master");
            ordered.push(replicas.remove(at));
        }
        self.nodes = masters;
        self.replicas = ordered;
    }

    /// Waits until every node reports `cluster_state:ok` and agrees on three masters
    /// covering all slots.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.nodes.iter().all(|n| {
                n.command("CLUSTER INFO").is_some_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                })
            }) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the cluster did not reach cluster_state:ok");
    }

    /// `redis-cli` with the password and TLS the nodes want.
    fn cli(&self) -> Command {
        let mut cli = Command::new("redis-cli");
        if let Some(password) = &self.options.password {
            cli.args(["-a", password, "--no-auth-warning"]);
        }
        if let Some((_, _, ca)) = &self.options.tls {
            cli.arg("--tls").arg("--cacert").arg(ca);
        }
        cli
    }

    /// Node `i`'s address for `redis-cli`: its TLS port when TLS is on.
    fn cli_address(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let port = node.options().tls.as_ref().map_or(node.port(), |t| t.0);
        format!("127.0.0.1:{port}")
    }

    /// The seed URLs, `redis://127.0.0.1:port`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The TLS seed URLs, `rediss://{host}:tls-port` (`host`: a name the certificate
    /// carries), when TLS is on.
    pub fn tls_urls(&self, host: &str) -> Vec<String> {
        self.nodes.iter().filter_map(|n| n.tls_url(host)).collect()
    }

    /// Kills node `i` (SIGKILL); its `nodes.conf` stays, for [`restart`](Self::restart).
    /// Nothing is persisted, so it comes back without keys.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Brings node `i` back on its ports, with its `nodes.conf`: the same node id, epoch
    /// and slots. Returns once it answers `PING` (the cluster may still be converging:
    /// see [`wait_ok`](Self::wait_ok)).
    pub fn restart(&mut self, i: usize) {
        let (port, options) = (self.nodes[i].port(), self.nodes[i].options().clone());
        self.nodes[i] = RedisServer::start_on_with(port, options);
    }

    /// Node `i`'s cluster id.
    pub fn node_id(&self, i: usize) -> String {
        let reply = self.nodes[i].command("CLUSTER MYID").unwrap();
        reply
            .split("\r\n")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Moves `slots` slots from node `from` to node `to` with `redis-cli --cluster
    /// reshard` (MIGRATE key by key), blocking until done.
    pub fn reshard(&self, from: usize, to: usize, slots: u32) {
        let out = self
            .cli()
            .args(["--cluster", "reshard"])
            .arg(self.cli_address(0))
            .args(["--cluster-from", &self.node_id(from)])
            .args(["--cluster-to", &self.node_id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster reshard failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// How many slots node `i` serves, as it says itself.
    pub fn slots_of(&self, i: usize) -> usize {
        let id = self.node_id(i);
        let nodes = self.nodes[i].command("CLUSTER NODES").unwrap_or_default();
        nodes
            .lines()
            .find(|line| line.starts_with(&id))
            .map(|line| {
                line.split(' ')
                    .skip(8)
                    .filter_map(|range| {
                        let (a, b) = range.split_once('-').unwrap_or((range, range));
                        Some(b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1)
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Every key of the cluster with its value, and the node (index) holding it.
    pub fn dump(&self) -> Vec<(usize, String, String)> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, node)| {
                node.dump()
                    .into_iter()
                    .map(move |(key, value)| (i, key, value))
            })
            .collect()
    }

    /// Every key of the cluster as [`dump`](Self::dump), without the gateway probe's own
    /// (`{prefix:probe:N}`, one per master).
    pub fn quota_keys(&self) -> Vec<(usize, String, String)> {
        let mut keys = self.dump();
        keys.retain(|(_, key, _)| !key.contains(":probe:"));
        keys
    }

    /// A key's remaining time to live in milliseconds, asked of the node holding it.
    pub fn pttl(&self, node: usize, key: &str) -> i64 {
        self.nodes[node].pttl(key)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().chain(&mut self.replicas) {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
