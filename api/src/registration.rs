//! Registration of the node with a central manager.

use serde::{Deserialize, Serialize};

/// Where the node stands with its manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationState {
    /// No manager; the TCP API serves only the registration routes.
    Unregistered,
    /// Node-initiated: the admin accepted the manager's CA and the node sent its request;
    /// waiting for the manager to approve.
    Pending,
    /// A manager is registered; the TCP API requires its client certificates.
    Registered,
}

/// `GET /v1/registration`: always readable, even without a client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationStatus {
    /// Current state.
    pub state: RegistrationState,
    /// Name of the registered (or pending) manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager_name: Option<String>,
    /// SHA-256 fingerprint of the node certificate, `AB:CD:...`.
    pub node_fingerprint: String,
    /// The one-time pairing code; shown only on the local socket, never over TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairing_code: Option<String>,
}
