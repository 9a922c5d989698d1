//! The agent's one error type: a stable [`ErrorCode`] (which carries the HTTP status) and a
//! message that says what failed and what to do. `http` turns it into the response, in the one
//! place that does (`Error::into_response`).

use hvnode_api::error::ErrorCode;
use hvnode_api::routes::Route;
use hyper::StatusCode;

/// An API error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The stable code; it decides the status.
    pub code: ErrorCode,
    /// What failed and what to do.
    pub message: String,
}

impl Error {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }

    /// No route at this path.
    pub fn not_found() -> Self {
        Error::new(
            ErrorCode::NotFound,
            "No such route: see docs/api.md for the routes the agent serves",
        )
    }

    /// The route exists but does not serve this method.
    pub fn method_not_allowed(route: &Route, method: &str) -> Self {
        Error::new(
            ErrorCode::MethodNotAllowed,
            format!(
                "{} does not serve {method}: use {}",
                route.template(),
                route.methods().join(", ")
            ),
        )
    }

    /// Something failed inside the agent.
    pub fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        Error::new(ErrorCode::Internal, format!("{what}: {e}"))
    }

    /// The HTTP status the code is answered with.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl From<crate::guests::vmms::GuestError> for Error {
    fn from(e: crate::guests::vmms::GuestError) -> Self {
        use crate::guests::vmms::GuestError as G;
        let code = match &e {
            G::Path(..) => ErrorCode::InvalidGuestPath,
            G::NoBridge(_) => ErrorCode::BridgeNotFound,
            G::TapInUse { .. } => ErrorCode::TapInUse,
            G::State { .. } => ErrorCode::InvalidGuestState,
            G::Spawn(_) | G::Cgroup(..) | G::NoSlot(_) => ErrorCode::VmmStartFailed,
            G::Unreachable(..) => ErrorCode::VmmUnreachable,
            // The VMM saw the guest in another state than the agent did (a race with the
            // guest itself): the caller's request was fine, the moment was not.
            G::Refused { code, .. } if code == "invalid_state" => ErrorCode::VmmInvalidState,
            G::Refused { .. } => ErrorCode::VmmError,
        };
        Error::new(code, e.to_string())
    }
}

/// Runs blocking work (files, init's socket, a VMM's socket) off the async threads.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(what, e))?
}
