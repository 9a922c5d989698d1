//! hvnodectl: the minimal central manager of hvnode nodes and their test client.
//!
//! The binary is a thin shell over this library, which the agent-load benchmark reuses
//! for the state directory and the pinned mutual-TLS client. The wire contract (routes, error
//! codes, fingerprints, event framing) is `hvnode_api`'s, the certificate verifiers are
//! `hvnode_tls`'s.
//!
//! Modules:
//! - [`cli`]: the command-line syntax (clap).
//! - [`commands`]: the run context, errors and dispatch; one submodule per command group.
//! - [`output`]: how answers look: human text or raw JSON, tables, upload progress.
//! - [`client`]: the HTTPS client of one node: pinning, client certificate, timeouts, errors.
//! - [`attach`]: the terminal side of `guest console --attach` (raw mode, Ctrl-] detach).
//! - [`serve`]: `hvnodectl serve`, the manager endpoint of node-initiated registration.
//! - [`state`]: the state directory: certificates, nodes.toml, join requests.
//! - [`pki`]: the manager CA and the certificates it issues.
//! - [`tls`]: the client and server TLS configurations built from the state's identities.
#![forbid(unsafe_code)]

pub mod attach;
pub mod cli;
pub mod client;
pub mod commands;
pub mod output;
pub mod pki;
pub mod serve;
pub mod state;
pub mod tls;
