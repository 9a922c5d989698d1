//! Updating an installed node: `PUT /v1/node/update` takes a signed update bundle as its body
//! and writes it into the slot the node does not run from, `GET /v1/node/update` says where the
//! slots stand, `POST /v1/node/rollback` boots the other slot next. See docs/update.md.

use serde::{Deserialize, Serialize};

use crate::install::FailedUpdate;

/// `GET /v1/node/update`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateView {
    /// The release the node runs.
    pub running_version: String,
    /// The slot the node runs from (`A` or `B`); absent when it runs from its boot medium,
    /// which cannot be updated (install it first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_slot: Option<String>,
    /// The booted slot passed the health gate and is marked good.
    pub confirmed: bool,
    /// An update the node fell back from, until the next update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_update: Option<FailedUpdate>,
    /// Both slots, A first; empty on the boot medium.
    pub slots: Vec<SlotView>,
    /// The slot the next boot starts, if one is bootable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_boot: Option<String>,
    /// The update being received, or the last one since the agent started.
    pub progress: UpdateProgress,
}

/// One slot of an installed node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotView {
    /// `A` or `B`.
    pub name: String,
    /// The boot loader may start it.
    pub bootable: bool,
    /// The node runs from it.
    pub booted: bool,
    /// An update was written to it and has not confirmed itself yet.
    pub pending: bool,
    /// The release in it, when the node knows (the running one, or the last bundle written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Where an update stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum UpdateProgress {
    /// No update since the agent started.
    Idle,
    /// A bundle is being checked and written into `slot`.
    Writing {
        slot: String,
        /// The bundle's release, once its signed manifest was read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        /// Payload bytes written so far.
        written_bytes: u64,
        /// Payload bytes in all, once the manifest was read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_bytes: Option<u64>,
    },
    /// Written and checked: `slot` boots once at the next boot.
    Installed { slot: String, version: String },
    /// Refused or failed; the slot was marked not bootable and the running one is untouched.
    Failed { slot: String, error: String },
}

/// Answer to `PUT /v1/node/update`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateInstalled {
    /// The release written.
    pub version: String,
    /// The slot it went to, tried once at the next boot.
    pub slot: String,
    /// The node is rebooting into it now (`?reboot=true`).
    pub rebooting: bool,
}

/// Answer to `POST /v1/node/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackDone {
    /// The slot the next boot starts.
    pub next_boot: String,
}

/// What a slot held when the node last wrote it, kept on the data partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotRecord {
    /// The release.
    pub version: String,
    /// Its dm-verity root hash.
    pub root_hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_tagged_by_state_and_round_trips() {
        let p = UpdateProgress::Writing {
            slot: "B".into(),
            version: Some("0.2.0".into()),
            written_bytes: 10,
            total_bytes: Some(100),
        };
        let j = serde_json::to_value(&p).expect("json");
        assert_eq!(j["state"], "writing");
        assert_eq!(
            serde_json::from_value::<UpdateProgress>(j).expect("back"),
            p
        );
        let idle = serde_json::to_value(UpdateProgress::Idle).expect("json");
        assert_eq!(idle, serde_json::json!({"state": "idle"}));
    }
}
