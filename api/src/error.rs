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
    #[test]
    fn chain_joins_every_source() {
        let inner = std::io::Error::other("disk gone");
        let outer = std::io::Error::other(Wrapped(inner));
        assert_eq!(super::chain(&outer), "reading the image: disk gone");
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
