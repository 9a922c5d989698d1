//! hvnodectl: the minimal central manager of hvnode nodes and their test client.
//!
//! The binary is a thin shell over this library, which the agent-load benchmark reuses
//! for the state directory and the pinned mutual-TLS client.
#![forbid(unsafe_code)]

pub mod attach;
pub mod cli;
pub mod client;
pub mod commands;
pub mod pki;
pub mod serve;
pub mod state;
pub mod tls;

/// The fingerprint format, re-exported for the agent-load benchmark, which reads node
/// fingerprints through this crate.
pub use hvnode_api::fingerprint;
