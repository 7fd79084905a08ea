//! The gateway through real sockets, in front of qb-mock.

mod checks;
mod common;
mod emails;
mod limits;
mod process;
mod upstream;
