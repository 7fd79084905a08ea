//! qb-reset-gateway: an edge gateway in front of the QuickBlox password-reset endpoint.
//!
//! [`build`] binds the listener and wires the stack from checked [`Settings`]; tests call it
//! in-process, `main` only parses arguments and calls it.

pub mod accept;
pub mod admin;
pub mod cli;
pub mod config;
pub mod console;
#[cfg(feature = "demo")]
pub mod demo;
pub mod explain;
pub mod fd_limit;
pub mod header_names;
pub mod health;
pub mod hop_by_hop;
pub mod metrics;
pub mod preface;
pub mod proxy_protocol;
pub mod refusal;
pub mod reload;
pub mod request_id;
pub mod server;
pub mod signal;
pub mod simulate;
pub mod telemetry;
pub mod tls;
pub mod upstream;

pub use config::{load, GatewayConfig, Settings};
pub use server::{build, App};

/// Exit status for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
