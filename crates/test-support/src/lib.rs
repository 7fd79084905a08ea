//! Real servers the workspace's test suites start for themselves (Redis, HAProxy), on free
//! loopback ports, and stop when the test is done with them.

mod haproxy;
mod redis_cluster;
mod redis_server;

pub use haproxy::Haproxy;
pub use redis_cluster::{ClusterOptions, RedisCluster};
pub use redis_server::{free_port, RedisOptions, RedisServer, SENTINEL_MASTER};
