//! Finding an installed system's partitions by their GPT names in sysfs (`PARTNAME=` of each
//! block device's uevent), as init does at boot and the agent does for an update.

use std::path::{Path, PathBuf};

use crate::disk::Part;
use crate::slots::Slot;

/// Where the kernel lists block devices.
pub const SYS_BLOCK: &str = "/sys/class/block";

/// A partition with a GPT name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPartition {
    /// Its kernel name (`vda2`).
    pub kernel: String,
    /// The whole disk it is on (`vda`).
    pub disk: String,
    /// Its GPT partition name (`hvnode-root-a`).
    pub name: String,
}

/// `PARTNAME=` from a sysfs uevent file's text.
pub fn uevent_partname(uevent: &str) -> Option<String> {
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("PARTNAME="))
        .map(str::to_owned)
}

/// The whole disk a block device belongs to (itself when it is not a partition).
pub fn whole_disk_of(sys_block: &Path, name: &str) -> String {
    let sys = sys_block.join(name);
    if sys.join("partition").exists() {
        if let Some(n) = std::fs::canonicalize(&sys)
            .ok()
            .and_then(|p| p.parent().and_then(|d| d.file_name().map(|n| n.to_owned())))
        {
            return n.to_string_lossy().into_owned();
        }
    }
    name.to_owned()
}

/// Every partition with a GPT name under `sys_block`, sorted.
pub fn named_partitions(sys_block: &Path) -> Vec<NamedPartition> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(sys_block) else {
        return out;
    };
    for e in dir.flatten() {
        let kernel = e.file_name().to_string_lossy().into_owned();
        let uevent = std::fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
        if let Some(name) = uevent_partname(&uevent) {
            let disk = whole_disk_of(sys_block, &kernel);
            out.push(NamedPartition { kernel, disk, name });
        }
    }
    out.sort();
    out
}

/// The root and verity partitions of `slot` (kernel names), both on one disk: the first such
/// disk in name order.
pub fn slot_partitions(parts: &[NamedPartition], slot: Slot) -> Option<(String, String)> {
    let root = Part::Root(slot).name();
    let verity = Part::Verity(slot).name();
    parts.iter().filter(|p| p.name == root).find_map(|r| {
        parts
            .iter()
            .find(|v| v.disk == r.disk && v.name == verity)
            .map(|v| (r.kernel.clone(), v.kernel.clone()))
    })
}

/// The device of the whole disk that holds `slot` (`/dev/vda`).
pub fn system_disk(parts: &[NamedPartition], slot: Slot) -> Option<PathBuf> {
    let (root, _) = slot_partitions(parts, slot)?;
    let disk = &parts.iter().find(|p| p.kernel == root)?.disk;
    Some(Path::new("/dev").join(disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kernel: &str, disk: &str, name: &str) -> NamedPartition {
        NamedPartition {
            kernel: kernel.into(),
            disk: disk.into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_slot_is_found_on_the_disk_that_has_both_of_its_partitions() {
        let parts = vec![
            p("sda3", "sda", "hvnode-root-a"),
            p("vda3", "vda", "hvnode-root-a"),
            p("vda4", "vda", "hvnode-verity-a"),
            p("vda5", "vda", "hvnode-root-b"),
        ];
        assert_eq!(
            slot_partitions(&parts, Slot::A),
            Some(("vda3".into(), "vda4".into()))
        );
        assert_eq!(system_disk(&parts, Slot::A), Some("/dev/vda".into()));
        assert_eq!(slot_partitions(&parts, Slot::B), None);
        assert_eq!(system_disk(&parts, Slot::B), None);
    }

    #[test]
    fn partname_comes_from_the_uevent() {
        assert_eq!(
            uevent_partname("MAJOR=8\nPARTN=3\nPARTNAME=hvnode-esp\n").as_deref(),
            Some("hvnode-esp")
        );
        assert_eq!(uevent_partname("MAJOR=8\n"), None);
    }
}
