//! Installing the node to disk (`/v1/node/disks`, `/v1/node/install`) and the booted slot's
//! status that init publishes at [`crate::paths::SLOT_STATUS`]. See docs/install.md.

use serde::{Deserialize, Serialize};

/// What a disk holds, as far as an install is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskContent {
    /// No partition table, no filesystem signature at either end.
    Blank,
    /// An installed hvnode disk (its data partition is kept by a new install).
    Hvnode,
    /// An hvnode data partition that an install cannot keep (a new install erases it).
    HvnodeData,
    /// Anything else: an install erases it.
    Foreign,
}

/// One whole disk the node could be installed onto (`GET /v1/node/disks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallDisk {
    /// The device, `/dev/vdb`: what `POST /v1/node/install` takes, and the word that confirms.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Model string, empty if the kernel knows none.
    pub model: String,
    /// What is on it.
    pub content: DiskContent,
    /// It holds the medium the node runs from.
    pub boot_medium: bool,
    /// Big enough and writable.
    pub usable: bool,
    /// Whether installing needs `confirm` equal to `name` (foreign data or the boot medium).
    pub needs_confirm: bool,
    /// What an install would erase or keep, in words.
    pub note: String,
}

/// `POST /v1/node/install`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallRequest {
    /// The disk, `/dev/vdb` or `vdb`.
    pub disk: String,
    /// The disk's name again, required when the disk holds data that is not hvnode's or is the
    /// boot medium.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<String>,
}

impl InstallRequest {
    /// Checks the shape of the fields (the agent checks the disk itself).
    pub fn validate(&self) -> Result<(), String> {
        let ok = |s: &str| {
            let n = s.strip_prefix("/dev/").unwrap_or(s);
            !n.is_empty() && n.len() <= 32 && n.bytes().all(|b| b.is_ascii_alphanumeric())
        };
        if !ok(&self.disk) {
            return Err(format!(
                "disk {:?} is not a disk name such as /dev/sdb",
                self.disk
            ));
        }
        if let Some(c) = &self.confirm {
            if c.len() > 64 {
                return Err("confirm is longer than 64 characters".into());
            }
        }
        Ok(())
    }
}

/// Where an install stands (`GET /v1/node/install`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase", deny_unknown_fields)]
pub enum InstallState {
    /// No install was started since the agent started.
    Idle,
    /// Writing: the stage and the overall percentage.
    Writing {
        disk: String,
        stage: String,
        percent: u8,
    },
    /// Installed: power off, remove the medium, boot from the disk.
    Done { disk: String },
    /// Failed; the message says why and what to do.
    Failed { disk: String, error: String },
}

/// A failed update, seen from the slot the node fell back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedUpdate {
    /// The slot the update went to (`A` or `B`).
    pub slot: String,
    /// What the node says: `update to slot B failed, running slot A`.
    pub message: String,
}

/// The booted slot (init writes it once the boot is assessed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotStatus {
    /// The slot the node runs from (`A` or `B`).
    pub booted: String,
    /// The slot passed the health gate and was marked good in the boot loader's state.
    pub confirmed: bool,
    /// Why it was not confirmed (a failed check of the health gate, an unreadable ESP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_confirmed: Option<String>,
    /// An update the node fell back from, until the next update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_update: Option<FailedUpdate>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_state_is_tagged_by_state() {
        let s = InstallState::Writing {
            disk: "/dev/vdb".into(),
            stage: "root".into(),
            percent: 40,
        };
        let j = serde_json::to_value(&s).expect("json");
        assert_eq!(j["state"], "writing");
        assert_eq!(j["percent"], 40);
        assert_eq!(
            serde_json::to_value(InstallState::Idle).expect("json"),
            serde_json::json!({"state": "idle"})
        );
    }

    #[test]
    fn install_request_checks_the_disk_name() {
        let r = |d: &str| InstallRequest {
            disk: d.into(),
            confirm: None,
        };
        assert!(r("/dev/vdb").validate().is_ok());
        assert!(r("nvme0n1").validate().is_ok());
        assert!(r("/dev/../etc").validate().is_err());
        assert!(r("").validate().is_err());
    }

    #[test]
    fn slot_status_round_trips() {
        let s = SlotStatus {
            booted: "A".into(),
            confirmed: true,
            not_confirmed: None,
            failed_update: Some(FailedUpdate {
                slot: "B".into(),
                message: "update to slot B failed, running slot A".into(),
            }),
        };
        let text = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<SlotStatus>(&text).expect("back"), s);
    }
}
