//! Real servers the workspace's test suites start for themselves, on free loopback ports,
//! and stop when the test is done with them.

mod redis_cluster;
mod redis_server;

pub use redis_cluster::{ClusterOptions, RedisCluster};
pub use redis_server::{free_port, RedisOptions, RedisServer, SENTINEL_MASTER};
