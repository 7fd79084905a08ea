//! Real servers the workspace's test suites start for themselves (Redis, HAProxy), and a
//! stand-in sentinel, on free loopback ports, and stop when the test is done with them.

mod delay_proxy;
mod fake_sentinel;
mod haproxy;
mod redis_cluster;
mod redis_server;
mod script_proxy;
mod tcp_pairs;

pub use delay_proxy::DelayProxy;
pub use fake_sentinel::FakeSentinel;
pub use haproxy::Haproxy;
pub use redis_cluster::{lone_cluster_node, ClusterOptions, RedisCluster};
pub use redis_server::{free_port, RedisOptions, RedisServer, SentinelOptions, SENTINEL_MASTER};
pub use script_proxy::{Refuse, ScriptProxy};
