//! The records stored in etcd: JSON, each with a `format` version. A change of a record's fields
//! bumps its `FORMAT`; a build reads its own format and the previous one (new fields carry serde
//! defaults), so a rolling upgrade works, and refuses a newer format with
//! [`Error::NewerFormat`] rather than guessing.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use hvnode_api::guest::GuestSpec;

use crate::error::{Error, Result};

/// A record kept in etcd.
pub trait Record: Serialize + DeserializeOwned {
    /// What the record is, for messages.
    const KIND: &'static str;
    /// The format this build writes.
    const FORMAT: u64;
    /// The oldest format this build reads: the previous one.
    const MIN_FORMAT: u64 = if Self::FORMAT > 1 {
        Self::FORMAT - 1
    } else {
        1
    };
}

/// Encodes a record as JSON with `format` set to the record's current format.
pub fn encode<T: Record>(record: &T) -> Vec<u8> {
    let mut v = serde_json::to_value(record).expect("records serialize to JSON");
    if let Some(o) = v.as_object_mut() {
        o.insert("format".into(), T::FORMAT.into());
    }
    serde_json::to_vec(&v).expect("a JSON value serializes")
}

/// Decodes the record stored at `key` (the key is for messages).
pub fn decode<T: Record>(key: &str, bytes: &[u8]) -> Result<T> {
    decode_formats(key, bytes, T::KIND, T::MIN_FORMAT, T::FORMAT)
}

fn decode_formats<T: DeserializeOwned>(
    key: &str,
    bytes: &[u8],
    kind: &str,
    min: u64,
    current: u64,
) -> Result<T> {
    let bad = |reason: String| Error::BadData {
        key: key.to_string(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("{kind}: not JSON: {e}")))?;
    let format = v
        .get("format")
        .ok_or_else(|| bad(format!("{kind}: no \"format\" field")))?
        .as_u64()
        .ok_or_else(|| bad(format!("{kind}: \"format\" is not a positive integer")))?;
    if format > current {
        return Err(Error::NewerFormat {
            key: key.to_string(),
            found: format,
            supported: current,
        });
    }
    if format < min {
        return Err(bad(format!(
            "{kind}: format {format} is older than this build reads ({min} to {current})"
        )));
    }
    serde_json::from_value(v).map_err(|e| bad(format!("{kind} (format {format}): {e}")))
}

/// A node's state as a member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Takes guests.
    #[default]
    Active,
    /// Takes no new guests (being drained or serviced).
    Maintenance,
}

/// The membership record of a node, at `nodes/<id>`, written by the node itself under its lease
/// (so it disappears when the node stops renewing it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The record format (set to [`Record::FORMAT`] on write).
    pub format: u64,
    /// The node's id (a name, see [`crate::keys::validate_name`]).
    pub id: String,
    /// Where the node's agent answers (host:port).
    pub address: String,
    pub state: NodeState,
    pub mem_total_mib: u64,
    pub mem_free_mib: u64,
    pub vcpus_total: u32,
    pub vcpus_used: u32,
    pub agent_version: String,
    /// When the node last wrote this record (seconds since the Unix epoch).
    pub heartbeat_unix: u64,
    /// The cluster guests whose VMMs run on the node.
    #[serde(default)]
    pub guests_running: Vec<String>,
    /// The storage domains as the node sees them.
    #[serde(default)]
    pub domains: Vec<hvnode_api::cluster::DomainHealth>,
    /// The SHA-256 fingerprint of the node's TLS certificate: how another node pins it (live
    /// migration, the fencing peer check).
    #[serde(default)]
    pub fingerprint: String,
    /// The watchdog that resets the node should it lose the cluster while running HA guests
    /// (e.g. "i6300esb", "iTCO_wdt", "softdog"); `None` when it has none armed, so nothing
    /// guarantees that a lost node's guests are gone and the leader restarts none of them
    /// elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<String>,
    /// Cluster guests placed on the node that crashed more often than it restarts them in
    /// place: the leader places them on another node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guests_failed: Vec<String>,
}

impl Record for NodeRecord {
    const KIND: &'static str = "node record";
    const FORMAT: u64 = 1;
}

/// Whether a guest should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Stopped,
}

/// A guest of the cluster, at `guests/<name>`: its definition as a node runs it, and what the
/// cluster does with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterGuest {
    /// The record format (set to [`Record::FORMAT`] on write).
    pub format: u64,
    /// The definition (name, memory, vCPUs, kernel, disks, NICs), as on a node.
    pub spec: GuestSpec,
    /// Restarted elsewhere when its node is lost.
    #[serde(default)]
    pub ha: bool,
    /// Higher first when there is not room for all.
    #[serde(default)]
    pub priority: i32,
    pub desired: Desired,
    /// The node it must run on, when pinned (`hvnodectl guest start --cluster --on NODE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
}

impl ClusterGuest {
    /// A guest that should run, anywhere, not HA.
    pub fn new(spec: GuestSpec) -> Self {
        ClusterGuest {
            format: Self::FORMAT,
            spec,
            ha: false,
            priority: 0,
            desired: Desired::Running,
            pinned: None,
        }
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The guest's memory, MiB.
    pub fn memory_mib(&self) -> u64 {
        self.spec.memory_mib
    }

    /// The guest's vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.spec.vcpus
    }
}

impl Record for ClusterGuest {
    const KIND: &'static str = "guest";
    const FORMAT: u64 = 1;
}

/// Where a guest runs, at `placement/<guest>`, written by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The record format (set to [`Record::FORMAT`] on write).
    pub format: u64,
    pub guest: String,
    pub node: String,
    /// The revision of the cluster state the decision was made on (the guest record was
    /// unchanged since).
    pub placed_at_revision: i64,
    /// Why (e.g. "most free memory", "node n3 lost").
    pub reason: String,
}

impl Placement {
    /// `guest` placed on `node`, decided on `revision`, for `reason`.
    pub fn new(guest: &str, node: &str, revision: i64, reason: &str) -> Self {
        Placement {
            format: Self::FORMAT,
            guest: guest.to_owned(),
            node: node.to_owned(),
            placed_at_revision: revision,
            reason: reason.to_owned(),
        }
    }
}

impl Record for Placement {
    const KIND: &'static str = "placement";
    const FORMAT: u64 = 1;
}

/// An NFS storage domain, at `domains/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageDomain {
    /// The record format (set to [`Record::FORMAT`] on write).
    pub format: u64,
    pub name: String,
    pub server: String,
    pub export: String,
    /// e.g. "4.2".
    pub nfs_version: String,
    /// Extra mount options, e.g. "hard,timeo=600".
    pub options: String,
}

impl Record for StorageDomain {
    const KIND: &'static str = "storage domain";
    const FORMAT: u64 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> ClusterGuest {
        let mut g = ClusterGuest::new(GuestSpec {
            vcpus: 2,
            memory_mib: 2048,
            ..GuestSpec::minimal("web-1", "vmlinuz")
        });
        g.format = 0;
        g.ha = true;
        g.priority = 10;
        g
    }

    #[test]
    fn round_trip_sets_format() {
        let bytes = encode(&guest());
        let back: ClusterGuest = decode("k", &bytes).unwrap();
        assert_eq!(back.format, ClusterGuest::FORMAT);
        assert_eq!(
            back,
            ClusterGuest {
                format: 1,
                ..guest()
            }
        );
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["desired"], "running");
    }

    #[test]
    fn newer_format_refused_clearly() {
        let mut v: serde_json::Value = serde_json::from_slice(&encode(&guest())).unwrap();
        v["format"] = 2.into();
        let e = decode::<ClusterGuest>("/hvnode/guests/web-1", &serde_json::to_vec(&v).unwrap())
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::NewerFormat {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("newer than this build reads"), "{e}");
    }

    #[test]
    fn bad_data_refused_clearly() {
        for (bytes, why) in [
            (&b"not json"[..], "not JSON"),
            (&br#"{"name":"x"}"#[..], "no \"format\""),
            (&br#"{"format":"1"}"#[..], "not a positive integer"),
            (&br#"{"format":1,"name":"x"}"#[..], "missing field"),
            (&br#"{"format":0}"#[..], "older than"),
        ] {
            let e = decode::<ClusterGuest>("k", bytes).unwrap_err();
            assert!(matches!(e, Error::BadData { .. }), "{e:?}");
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    /// The rule for a format bump: format 2 adds a field with a default, and format 1 records
    /// still read.
    #[test]
    fn previous_format_reads() {
        #[derive(Debug, Deserialize)]
        struct V2 {
            name: String,
            #[serde(default)]
            added: u32,
        }
        let v1 = br#"{"format":1,"name":"x"}"#;
        let r: V2 = decode_formats("k", v1, "test", 1, 2).unwrap();
        assert_eq!((r.name.as_str(), r.added), ("x", 0));
        let v3 = br#"{"format":3,"name":"x"}"#;
        assert!(matches!(
            decode_formats::<V2>("k", v3, "test", 1, 2),
            Err(Error::NewerFormat {
                found: 3,
                supported: 2,
                ..
            })
        ));
        let v0 = br#"{"format":0,"name":"x"}"#;
        assert!(matches!(
            decode_formats::<V2>("k", v0, "test", 1, 2),
            Err(Error::BadData { .. })
        ));
    }
}
