//! The key layout under a prefix (default `/hvnode/`):
//!
//! | key | value | written by |
//! |---|---|---|
//! | `<prefix>nodes/<id>` | [`NodeRecord`](crate::model::NodeRecord) | the node itself, under its lease |
//! | `<prefix>guests/<name>` | [`ClusterGuest`](crate::model::ClusterGuest) | any client, revision-checked |
//! | `<prefix>placement/<name>` | [`Placement`](crate::model::Placement) | the leader, revision-checked |
//! | `<prefix>domains/<name>` | [`StorageDomain`](crate::model::StorageDomain) | any client, revision-checked |
//! | `<prefix>leader` | election name (etcd's election API keys under it) | campaigning nodes |

use crate::error::{Error, Result};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/hvnode/";
/// Longest name (node id, guest, storage domain): a DNS label's length.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a name (node id, guest name, storage domain name): 1 to 63 characters of
/// `[a-z0-9-_]` (so no '/', no "..", nothing that changes the key layout).
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            what,
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 63 characters");
    }
    if name.contains('/') {
        return bad("contains '/'");
    }
    if name.contains("..") {
        return bad("contains \"..\"");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return bad("only a-z, 0-9, '-' and '_' are allowed");
    }
    Ok(())
}

/// The keys of one cluster (one prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            prefix: DEFAULT_PREFIX.to_string(),
        }
    }
}

impl Keys {
    /// Keys under `prefix`, which starts and ends with '/' (e.g. `/hvnode/`, `/lab/hvnode/`).
    pub fn new(prefix: &str) -> Result<Self> {
        let bad = |reason| {
            Err(Error::InvalidName {
                what: "key prefix",
                name: prefix.to_string(),
                reason,
            })
        };
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return bad("must start and end with '/'");
        }
        if prefix.contains("..") || prefix.contains("//") {
            return bad("contains \"..\" or \"//\"");
        }
        Ok(Keys {
            prefix: prefix.to_string(),
        })
    }

    /// The prefix, e.g. `/hvnode/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// `<prefix>nodes/`: all membership records.
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }
    /// `<prefix>nodes/<id>`.
    pub fn node(&self, id: &str) -> Result<String> {
        validate_name("node id", id)?;
        Ok(format!("{}{id}", self.nodes()))
    }
    /// `<prefix>guests/`.
    pub fn guests(&self) -> String {
        format!("{}guests/", self.prefix)
    }
    /// `<prefix>guests/<name>`.
    pub fn guest(&self, name: &str) -> Result<String> {
        validate_name("guest name", name)?;
        Ok(format!("{}{name}", self.guests()))
    }
    /// `<prefix>placement/`.
    pub fn placements(&self) -> String {
        format!("{}placement/", self.prefix)
    }
    /// `<prefix>placement/<guest name>`.
    pub fn placement(&self, guest: &str) -> Result<String> {
        validate_name("guest name", guest)?;
        Ok(format!("{}{guest}", self.placements()))
    }
    /// `<prefix>domains/`.
    pub fn domains(&self) -> String {
        format!("{}domains/", self.prefix)
    }
    /// `<prefix>domains/<name>`.
    pub fn domain(&self, name: &str) -> Result<String> {
        validate_name("storage domain name", name)?;
        Ok(format!("{}{name}", self.domains()))
    }
    /// `<prefix>leader`: the election's name.
    pub fn election(&self) -> String {
        format!("{}leader", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::default();
        assert_eq!(k.node("n1").unwrap(), "/hvnode/nodes/n1");
        assert_eq!(k.guest("web-1").unwrap(), "/hvnode/guests/web-1");
        assert_eq!(k.placement("web-1").unwrap(), "/hvnode/placement/web-1");
        assert_eq!(k.domain("nfs_a").unwrap(), "/hvnode/domains/nfs_a");
        assert_eq!(k.election(), "/hvnode/leader");
        let lab = Keys::new("/lab/x/").unwrap();
        assert_eq!(lab.node("a").unwrap(), "/lab/x/nodes/a");
    }

    #[test]
    fn names_refused_clearly() {
        let k = Keys::default();
        for (name, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("a..b", "\"..\""),
            ("Web", "a-z"),
            ("web 1", "a-z"),
            ("é", "a-z"),
        ] {
            let e = k.guest(name).unwrap_err().to_string();
            assert!(
                e.contains("invalid guest name") && e.contains(why),
                "{name:?}: {e}"
            );
        }
        assert!(k.guest(&"a".repeat(63)).is_ok());
        let e = k.node(&"a".repeat(64)).unwrap_err().to_string();
        assert!(e.contains("longer than 63"), "{e}");
        assert!(Keys::new("hvnode/").is_err());
        assert!(Keys::new("/hvnode").is_err());
        assert!(Keys::new("/a/../b/").is_err());
    }
}
