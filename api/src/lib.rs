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

/// The release a node runs: `HVNODE_VERSION=` of the image's `/etc/hvnode-release` (the image
/// build writes it; a release may carry a version of its own), else the binaries' [`VERSION`]
/// (a developer's machine).
pub fn release_version() -> String {
    release_version_from(&std::fs::read_to_string(paths::RELEASE_FILE).unwrap_or_default())
}

/// [`release_version`] from the text of a release file.
pub fn release_version_from(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("HVNODE_VERSION="))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or(VERSION)
        .to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_release_version_comes_from_the_release_file_else_the_binaries() {
        assert_eq!(
            super::release_version_from("HVNODE_VERSION=0.2.0\nHVNODE_BUILD=abc\n"),
            "0.2.0"
        );
        assert_eq!(super::release_version_from(""), super::VERSION);
        assert_eq!(
            super::release_version_from("HVNODE_VERSION=\n"),
            super::VERSION
        );
    }
}
