//! The crate's one error type. Callers tell apart what they must: etcd not answering (keep
//! running, change nothing), a lost revision race (re-read and decide again), a missing key, and
//! data this build cannot read.

/// What a cluster operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd did not answer (connection refused or lost, timeout, no quorum). Nothing was changed
    /// by this call as far as this node knows; the caller keeps running and retries later.
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// etcd answered with an error other than unreachability.
    #[error("etcd error: {0}")]
    Etcd(String),
    /// A revision-checked write lost: `key` was at revision `found`, the writer expected
    /// `expected` (0: the key must not exist; `found` 0: it does not exist).
    #[error("conflict on {key}: expected revision {expected}, found {found}")]
    Conflict {
        key: String,
        expected: i64,
        found: i64,
    },
    /// The guest already has a placement (on `node`): a second placement is refused.
    #[error("guest {guest} is already placed on node {node}")]
    AlreadyPlaced { guest: String, node: String },
    /// A leader's write was refused: this node no longer leads (resigned, or its lease is gone).
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// No value at `key`.
    #[error("not found: {key}")]
    NotFound { key: String },
    /// The value at `key` is not a record this build reads (bad JSON, missing fields, too old).
    #[error("bad data at {key}: {reason}")]
    BadData { key: String, reason: String },
    /// The record at `key` has a newer format than this build reads: this node needs the newer
    /// hvnode before it can use that record.
    #[error(
        "{key}: record format {found} is newer than this build reads (up to {supported}); \
         upgrade this node"
    )]
    NewerFormat {
        key: String,
        found: u64,
        supported: u64,
    },
    /// A name (node id, guest, storage domain) or key prefix is not acceptable.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    /// The membership lease is gone (expired or revoked): the node is no longer a member and
    /// must join again.
    #[error("membership lease lost: {0}")]
    LeaseLost(String),
    /// A record does not fit what was asked (e.g. an update of another node's record).
    #[error("{0}")]
    Invalid(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<etcd_client::Error> for Error {
    fn from(e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        match e {
            E::TransportError(t) => Error::Unreachable(t.to_string()),
            E::IoError(io) => Error::Unreachable(io.to_string()),
            E::GRpcStatus(s) => match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled => {
                    Error::Unreachable(format!("{:?}: {}", s.code(), s.message()))
                }
                tonic::Code::Unknown if is_transport_message(s.message()) => {
                    Error::Unreachable(format!("{:?}: {}", s.code(), s.message()))
                }
                c => Error::Etcd(format!("{c:?}: {}", s.message())),
            },
            other => Error::Etcd(other.to_string()),
        }
    }
}

/// tonic reports some transport failures as `Unknown` with the transport's message.
fn is_transport_message(m: &str) -> bool {
    let m = m.to_ascii_lowercase();
    m.contains("transport error") || m.contains("connection") || m.contains("broken pipe")
}

impl Error {
    /// Whether this is etcd not answering (as opposed to an answer that refused something).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unreachable(_))
    }
}
