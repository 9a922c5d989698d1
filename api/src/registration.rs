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

/// `POST /v1/registration`: manager-initiated registration with the pairing code the
/// console shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairRequest {
    /// The one-time pairing code shown on the node's console.
    pub code: String,
    /// Name of the manager, shown on the console.
    pub manager_name: String,
    /// PEM of the manager's CA; client certificates it signs are trusted from now on.
    pub ca_pem: String,
}

/// `POST /v1/registration/manager` (local socket only): start node-initiated registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerUrl {
    /// Base URL of the manager, e.g. `https://manager.example:9443`.
    pub url: String,
}

/// The manager the node fetched for the admin to accept or reject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerCandidate {
    /// Base URL of the manager.
    pub url: String,
    /// Name the manager gave.
    pub manager_name: String,
    /// SHA-256 fingerprint of the manager's CA certificate, `AB:CD:...`.
    pub ca_fingerprint: String,
}

/// `POST /v1/registration/manager/accept` (local socket only): the admin accepts the
/// candidate whose CA has this fingerprint; the node sends its join request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptManager {
    /// Must equal the candidate's CA fingerprint.
    pub ca_fingerprint: String,
}

/// Manager side, `GET /v1/manager` (no client certificate needed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerHello {
    /// Manager name.
    pub name: String,
    /// PEM of the manager CA.
    pub ca_pem: String,
}

/// Manager side, `POST /v1/nodes`: a node asks to join. Sent over TLS verified against
/// the accepted CA, with the node certificate as the client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeJoinRequest {
    /// The node's host name.
    pub hostname: String,
    /// PEM of the node certificate (the one its API serves).
    pub node_cert_pem: String,
    /// TCP port of the node API.
    pub api_port: u16,
}

/// Decision of the manager on a join request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinState {
    /// Waiting for the manager's admin.
    Pending,
    /// Approved: the node trusts the manager CA from now on.
    Approved,
    /// Rejected.
    Rejected,
}

/// Manager side, answer to `POST /v1/nodes` and `GET /v1/nodes/{fingerprint}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeJoinStatus {
    /// The decision so far.
    pub state: JoinState,
}
