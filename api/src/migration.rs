//! Live migration between nodes: what the manager asks the source node, what the source node
//! asks the destination, and how a migration is reported.
//!
//! 1. The manager: `POST /v1/guests/{name}/migration` on the source ([`MigrateRequest`]: the
//!    destination's URL and certificate fingerprint, from the manager's node list).
//! 2. The source node, over mutual TLS with its manager-signed certificate: `POST
//!    /v1/migrations` on the destination ([`IncomingMigration`]): it checks the guest fits
//!    (name free, images and disks there, taps free) and starts a VMM waiting for it.
//! 3. The source node: `GET /v1/migrations/{name}/stream` with `Upgrade: hvnode-migration`
//!    ([`crate::routes::MIGRATION_PROTOCOL`]): the connection becomes the VMM-to-VMM migration
//!    stream, relayed on both nodes.
//! 4. The manager follows `GET /v1/guests/{name}/migration` ([`MigrationView`]) or the events.

use serde::{Deserialize, Serialize};

use crate::guest::GuestSpec;
use crate::vmm::MigrationStatus;

/// `POST /v1/guests/{name}/migration`: move the running guest to another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination agent's base URL (`https://host:8443`).
    pub to: String,
    /// The destination's certificate fingerprint (SHA-256, as `hvnodectl nodes` lists it):
    /// the source connects to that node and no other.
    pub to_fingerprint: String,
    /// Longest pause the guest may see (default 100 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
    /// Passes over dirty memory before giving up (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_passes: Option<u32>,
    /// Seconds before giving up (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Hash all guest memory on both sides at the switchover and refuse it if they differ.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verify_memory: bool,
}

/// `POST /v1/migrations` (node to node): get ready to receive this guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingMigration {
    /// The guest's definition on the source; the destination defines it as its own.
    pub guest: GuestSpec,
    /// The source node's name, for the destination's events.
    pub source: String,
    /// The size in bytes of each of the guest's disks on the source, in order: the destination
    /// refuses a disk whose file differs (not the same image).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_bytes: Vec<u64>,
}

/// Which end of a migration a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The guest leaves this node.
    Outgoing,
    /// The guest arrives on this node.
    Incoming,
}

/// `GET /v1/guests/{name}/migration`: the migration in progress or the last one of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationView {
    /// The guest.
    pub guest: String,
    /// Which end this node is.
    pub direction: Direction,
    /// The other node (URL on the source, node name on the destination).
    pub peer: String,
    /// When it started (Unix seconds).
    pub started_unix: u64,
    /// Progress and outcome, as the source's VMM reports them.
    pub status: MigrationStatus,
}
