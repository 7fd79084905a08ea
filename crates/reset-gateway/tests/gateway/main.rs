//! The gateway through real sockets, in front of qb-mock.

mod checks;
mod cluster;
mod common;
mod deploy;
mod deploy_variants;
mod emails;
mod hostile;
mod limits;
mod logging;
mod near_limit;
mod operations;
mod pool;
pub mod process;
mod proxy_boundary;
mod proxy_protocol;
mod redis;
mod sentinel;
mod simulate;
mod upstream;
