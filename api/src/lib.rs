//! Types shared by the hvnode processes: the node configuration file, guest definitions,
//! the bodies of the agent's HTTP API, and the small JSON control protocols between
//! the agent and init and between the agent and each VMM process; and the wire contract of the
//! API: typed routes ([`routes`]), error codes with their statuses ([`error::ErrorCode`]), the
//! certificate fingerprint format, event-stream framing and the units sizes are shown in.
//!
//! This crate does no I/O. Validation lives next to the types so that every front end
//! (agent, console, manager CLI, init) rejects bad input with the same message.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod config;
pub mod error;
pub mod event;
pub mod fingerprint;
pub mod guest;
pub mod init;
pub mod install;
pub mod migration;
pub mod node;
pub mod paths;
pub mod registration;
pub mod routes;
pub mod sse;
pub mod units;
pub mod update;
pub mod vmm;

/// Version of hvnode, shared by every binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
