//! Events the agent emits (`GET /v1/events`, server-sent events).

use serde::{Deserialize, Serialize};

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic sequence number since the agent started.
    pub seq: u64,
    /// Unix time in seconds.
    pub timestamp: u64,
    /// Kind: `guest_state`, `guest_defined`, `guest_deleted`, `registration`, `network`,
    /// `storage`, `power`.
    pub kind: String,
    /// The guest concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// Human-readable description.
    pub message: String,
}
