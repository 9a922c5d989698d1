//! The error contract of the API: every stable error code with its HTTP status, and the JSON
//! body every error carries.

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = ($status:literal, $code:literal), )*) => {
        /// Every stable error code the agent (and the manager side, `hvnodectl serve`) answers
        /// with, each with its HTTP status. The wire form is the snake_case string; a code this
        /// build does not know (a newer peer) reads as [`ErrorCode::Unknown`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $( $(#[$doc])* #[serde(rename = $code)] $variant, )*
            /// A code this build does not know.
            #[serde(other)]
            Unknown,
        }

        impl ErrorCode {
            /// Every known code, for tests and documentation.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The HTTP status this code is answered with.
            pub fn status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $status,)*
                    ErrorCode::Unknown => 500,
                }
            }

            /// The stable string on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                    ErrorCode::Unknown => "unknown",
                }
            }
        }
    };
}

error_codes! {
    /// The body is not valid JSON for the route's type.
    InvalidJson = (400, "invalid_json"),
    /// The body could not be read.
    BadBody = (400, "bad_body"),
    /// The request needs a body and has none.
    BodyRequired = (400, "body_required"),
    /// A query parameter is not what the route takes.
    InvalidQuery = (400, "invalid_query"),
    /// A typed confirmation does not match what it confirms.
    ConfirmationMismatch = (400, "confirmation_mismatch"),
    /// The install request is not valid JSON of the right shape or names no disk.
    InvalidInstallRequest = (400, "invalid_install_request"),
    /// A fingerprint does not match the certificate it names.
    FingerprintMismatch = (400, "fingerprint_mismatch"),
    /// A fingerprint is not 32 hex bytes.
    InvalidFingerprint = (400, "invalid_fingerprint"),
    /// A CA certificate cannot be parsed.
    InvalidCa = (400, "invalid_ca"),
    /// Not a valid guest name.
    InvalidGuestName = (400, "invalid_guest_name"),
    /// A guest's disk or kernel path is not usable.
    InvalidGuestPath = (400, "invalid_guest_path"),
    /// The guest definition is invalid.
    InvalidGuestSpec = (400, "invalid_guest_spec"),
    /// Not a valid host name.
    InvalidHostname = (400, "invalid_hostname"),
    /// The network configuration is invalid.
    InvalidNetwork = (400, "invalid_network"),
    /// Not a valid manager name.
    InvalidManagerName = (400, "invalid_manager_name"),
    /// Not a valid manager URL.
    InvalidManagerUrl = (400, "invalid_manager_url"),
    /// An image path leaves the image directory or is malformed.
    InvalidPath = (400, "invalid_path"),
    /// A timeout parameter is out of range.
    InvalidTimeout = (400, "invalid_timeout"),
    /// Not a valid snapshot name.
    InvalidSnapshotName = (400, "invalid_snapshot_name"),
    /// A name in the body does not match the name in the path.
    NameMismatch = (400, "name_mismatch"),
    /// The route needs an HTTP upgrade.
    UpgradeRequired = (400, "upgrade_required"),
    /// A join request is malformed.
    InvalidJoinRequest = (400, "invalid_join_request"),
    /// A certificate to install is not the node's, not a node certificate, or not signed by
    /// the registered manager.
    InvalidCertificate = (400, "invalid_certificate"),
    /// A migration's destination URL or fingerprint is malformed.
    InvalidMigration = (400, "invalid_migration"),
    /// A cluster join request is malformed.
    InvalidCluster = (400, "invalid_cluster"),
    /// A client certificate is needed and none was presented.
    ClientCertificateRequired = (401, "client_certificate_required"),
    /// The node is not registered with a manager.
    NotRegistered = (403, "not_registered"),
    /// Too many wrong pairing codes: a new one must be shown.
    PairingLocked = (403, "pairing_locked"),
    /// The client certificate is not signed by the manager trusted now.
    UntrustedClientCertificate = (403, "untrusted_client_certificate"),
    /// The pairing code is wrong.
    WrongPairingCode = (403, "wrong_pairing_code"),
    /// The certificate presented is not the one in the request.
    CertificateMismatch = (403, "certificate_mismatch"),
    /// A node-to-node route was called without a node certificate, or a node's certificate
    /// was presented for any other route.
    NodeCertificateRequired = (403, "node_certificate_required"),
    /// No such route.
    NotFound = (404, "not_found"),
    /// No such guest.
    GuestNotFound = (404, "guest_not_found"),
    /// No such image.
    ImageNotFound = (404, "image_not_found"),
    /// The node is in no cluster.
    NotInCluster = (404, "not_in_cluster"),
    /// No such snapshot.
    SnapshotNotFound = (404, "snapshot_not_found"),
    /// No such join request (manager side).
    JoinRequestNotFound = (404, "join_request_not_found"),
    /// No migration of that guest is known here.
    MigrationNotFound = (404, "migration_not_found"),
    /// The route exists but does not serve this method.
    MethodNotAllowed = (405, "method_not_allowed"),
    /// The node is registered already.
    AlreadyRegistered = (409, "already_registered"),
    /// A guest of that name exists.
    GuestExists = (409, "guest_exists"),
    /// The guest has a VMM.
    GuestRunning = (409, "guest_running"),
    /// The operation does not apply to the guest's state.
    InvalidGuestState = (409, "invalid_guest_state"),
    /// The VMM saw the guest in another state.
    VmmInvalidState = (409, "vmm_invalid_state"),
    /// A snapshot of that name exists.
    SnapshotExists = (409, "snapshot_exists"),
    /// The guest's definition no longer matches the snapshot (memory, vCPUs, disks, NICs).
    SnapshotMismatch = (409, "snapshot_mismatch"),
    /// A guest NIC's bridge does not exist.
    BridgeNotFound = (409, "bridge_not_found"),
    /// A guest NIC's tap is in use.
    TapInUse = (409, "tap_in_use"),
    /// A guest with a writable disk on this node's own storage cannot migrate.
    DiskNotShared = (409, "disk_not_shared"),
    /// The guest belongs to the cluster: change it through the cluster (etcd), not this node.
    ClusterGuest = (409, "cluster_guest"),
    /// Init refused the request.
    InitRefused = (409, "init_refused"),
    /// No manager candidate to accept.
    NoCandidate = (409, "no_candidate"),
    /// No network change pending.
    NoPendingChange = (409, "no_pending_change"),
    /// This node has no certificate signed by the manager, which node-to-node connections
    /// need.
    NodeCertificateMissing = (409, "node_certificate_missing"),
    /// The guest is migrating already.
    MigrationInProgress = (409, "migration_in_progress"),
    /// The body is larger than the route accepts.
    BodyTooLarge = (413, "body_too_large"),
    /// The image is larger than the limit.
    ImageTooLarge = (413, "image_too_large"),
    /// The body is not JSON.
    UnsupportedMediaType = (415, "unsupported_media_type"),
    /// The node runs from its boot medium: only an installed node has slots to update.
    NotInstalled = (409, "not_installed"),
    /// An update is being written.
    UpdateInProgress = (409, "update_in_progress"),
    /// The other slot holds no system that booted: nothing to roll back to.
    NoRollback = (409, "no_rollback"),
    /// The update bundle is not one this node accepts (unsigned, signed by a key it does not
    /// trust, damaged, truncated, older than the running release); the message says which.
    BundleRefused = (422, "bundle_refused"),
    /// No such disk to install onto.
    DiskNotFound = (404, "disk_not_found"),
    /// The disk holds foreign data or the boot medium: confirm with the disk's name.
    ConfirmationRequired = (409, "confirmation_required"),
    /// An install is running.
    InstallInProgress = (409, "install_in_progress"),
    /// The node does not run from its live medium, or the image lacks the boot loader files.
    NoInstallSource = (409, "no_install_source"),
    /// The disk can never take the install (too small, read-only) or the confirmation is wrong.
    InvalidInstallTarget = (422, "invalid_install_target"),
    /// Something failed inside the agent.
    Internal = (500, "internal"),
    /// Something failed inside the manager.
    InternalError = (500, "internal_error"),
    /// The guest's VMM could not be started.
    VmmStartFailed = (500, "vmm_start_failed"),
    /// The manager's CA is not valid.
    InvalidManagerCa = (502, "invalid_manager_ca"),
    /// The manager refused the request.
    ManagerRefused = (502, "manager_refused"),
    /// The manager cannot be reached.
    ManagerUnreachable = (502, "manager_unreachable"),
    /// The guest's VMM does not answer.
    VmmUnreachable = (502, "vmm_unreachable"),
    /// The guest's VMM refused the request.
    VmmError = (502, "vmm_error"),
    /// The other node of a migration cannot be reached.
    PeerUnreachable = (502, "peer_unreachable"),
    /// The other node of a migration refused it.
    PeerRefused = (502, "peer_refused"),
    /// Init does not answer.
    InitUnavailable = (503, "init_unavailable"),
    /// The agent has as many connections as it serves (in all, or from this address).
    TooManyConnections = (503, "too_many_connections"),
}

impl std::str::FromStr for ErrorCode {
    type Err = std::convert::Infallible;

    /// Never fails: see [`ErrorCode::from_wire`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ErrorCode::from_wire(s))
    }
}

impl ErrorCode {
    /// The code a wire string names; a code this build does not know is [`ErrorCode::Unknown`].
    pub fn from_wire(s: &str) -> ErrorCode {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .unwrap_or(ErrorCode::Unknown)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of every non-2xx response of the agent: a stable machine-readable code and a
/// message that says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable code, e.g. `invalid_guest_spec`, `not_registered`, `guest_not_found`.
    pub code: ErrorCode,
    /// Human-readable message saying what failed and what to do.
    pub message: String,
}

impl ApiError {
    /// An error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// An error and all its sources on one line, `outer: inner: innermost`, for logs and exit files.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_every_source() {
        let inner = std::io::Error::other("disk gone");
        let outer = std::io::Error::other(Wrapped(inner));
        assert_eq!(super::chain(&outer), "reading the image: disk gone");
    }

    #[test]
    fn codes_round_trip_and_carry_error_statuses() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), *code);
            assert!((400..600).contains(&code.status()), "{code}");
        }
    }

    #[test]
    fn unknown_code_from_a_newer_peer_still_parses() {
        let e: ApiError =
            serde_json::from_str(r#"{"code":"quota_exceeded","message":"later"}"#).unwrap();
        assert_eq!(e.code, ErrorCode::Unknown);
        assert_eq!(e.message, "later");
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("reading the image")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
