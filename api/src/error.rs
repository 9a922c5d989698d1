//! The JSON error body every API error carries.

use serde::{Deserialize, Serialize};

/// Body of every non-2xx response of the agent: a stable machine-readable code and a
/// message that says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable code, e.g. `invalid_guest_spec`, `not_registered`, `guest_not_found`.
    pub code: String,
    /// Human-readable message saying what failed and what to do.
    pub message: String,
}
