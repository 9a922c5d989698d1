//! Facts about block devices and the decisions made on them: which partition is the data
//! partition, and which disk may be turned into one. The decisions are pure functions.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use hvnode_api::paths::DATA_LABEL;

use crate::sys::read_attr;

/// Bytes checked at each end of a disk by [`is_blank`].
pub const BLANK_CHECK_BYTES: u64 = 1 << 20;
/// Smallest disk worth a data partition.
pub const MIN_DATA_DISK: u64 = 256 << 20;

/// Why a disk cannot hold the data partition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// No whole disk with that name.
    #[error("{0} is not a whole disk of this node: name a disk such as /dev/sdb, not a partition")]
    NotADisk(String),
    /// The disk holds the boot medium.
    #[error("{0} is the boot medium")]
    BootMedium(String),
    /// The disk is read-only.
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// Too small.
    #[error("{0} is too small ({1} bytes; at least 256 MiB needed)")]
    TooSmall(String, u64),
    /// Loop, RAM, optical or mapped devices are never used.
    #[error("{0} is not a physical disk")]
    Virtual(String),
    /// The disk has data on it.
    #[error("{0} is not blank (it has a partition table or filesystem): refusing to overwrite it. Wipe it elsewhere first if it really holds nothing you need")]
    NotBlank(String),
    /// `auto` found nothing.
    #[error("No blank, fixed, writable disk found for the data partition")]
    NoneFound,
}

/// What init knows about one whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFacts {
    /// Kernel name, e.g. `sdb`.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Removable media (USB sticks often say so).
    pub removable: bool,
    /// Read-only.
    pub read_only: bool,
    /// Holds the boot medium.
    pub boot_medium: bool,
    /// First and last MiB are all zero.
    pub blank: bool,
}

/// Whether a kernel block device name is a virtual or optical device init never writes.
pub fn is_virtual(name: &str) -> bool {
    ["loop", "ram", "sr", "dm-", "zram", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn check(d: &DiskFacts) -> Result<(), DiskError> {
    let n = format!("/dev/{}", d.name);
    if is_virtual(&d.name) {
        return Err(DiskError::Virtual(n));
    }
    if d.boot_medium {
        return Err(DiskError::BootMedium(n));
    }
    if d.read_only {
        return Err(DiskError::ReadOnly(n));
    }
    if d.size_bytes < MIN_DATA_DISK {
        return Err(DiskError::TooSmall(n, d.size_bytes));
    }
    if !d.blank {
        return Err(DiskError::NotBlank(n));
    }
    Ok(())
}

/// Picks the disk for a new data partition. `device` is `None` for `auto` (the first
/// suitable fixed disk by name) or a `/dev/NAME` the admin chose (removable allowed).
pub fn choose_data_disk<'a>(
    disks: &'a [DiskFacts],
    device: Option<&str>,
) -> Result<&'a DiskFacts, DiskError> {
    match device {
        Some(dev) => {
            let name = dev.strip_prefix("/dev/").unwrap_or(dev);
            let d = disks
                .iter()
                .find(|d| d.name == name)
                .ok_or_else(|| DiskError::NotADisk(dev.to_owned()))?;
            check(d)?;
            Ok(d)
        }
        None => {
            let mut sorted: Vec<&DiskFacts> = disks.iter().collect();
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            sorted
                .into_iter()
                .find(|d| !d.removable && check(d).is_ok())
                .ok_or(DiskError::NoneFound)
        }
    }
}

/// Whether the first and last [`BLANK_CHECK_BYTES`] of a device of `size` bytes are zero:
/// no MBR, no primary or backup GPT, no filesystem superblock.
pub fn is_blank<R: Read + Seek>(dev: &mut R, size: u64) -> std::io::Result<bool> {
    let check = BLANK_CHECK_BYTES.min(size);
    let mut buf = vec![0u8; check as usize];
    dev.seek(SeekFrom::Start(0))?;
    dev.read_exact(&mut buf)?;
    if buf.iter().any(|&b| b != 0) {
        return Ok(false);
    }
    dev.seek(SeekFrom::Start(size - check))?;
    dev.read_exact(&mut buf)?;
    Ok(buf.iter().all(|&b| b == 0))
}

/// The volume label of an ext2/3/4 superblock (the 1024 bytes at byte 1024).
pub fn ext4_label(superblock: &[u8]) -> Option<String> {
    if superblock.len() < 136 || superblock[56..58] != [0x53, 0xEF] {
        return None;
    }
    let raw = &superblock[120..136];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// Reads the ext4 label of a device.
pub fn device_ext4_label(dev: &Path) -> Option<String> {
    let mut f = std::fs::File::open(dev).ok()?;
    f.seek(SeekFrom::Start(1024)).ok()?;
    let mut sb = [0u8; 1024];
    f.read_exact(&mut sb).ok()?;
    ext4_label(&sb)
}

/// A block device as seen when looking for the data partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    /// Kernel name.
    pub name: String,
    /// GPT partition name (`PARTNAME` in uevent).
    pub partname: Option<String>,
    /// ext4 label.
    pub label: Option<String>,
}

/// The data partition: GPT name first, then ext4 label; virtual devices are skipped.
pub fn find_data_partition(entries: &[BlockEntry]) -> Option<&BlockEntry> {
    let usable = || entries.iter().filter(|e| !is_virtual(&e.name));
    usable()
        .find(|e| e.partname.as_deref() == Some(DATA_LABEL))
        .or_else(|| usable().find(|e| e.label.as_deref() == Some(DATA_LABEL)))
}

pub use hvnode_update::sysfs::uevent_partname;

/// Every block device with its partition name and ext4 label.
pub fn scan_block_entries() -> Vec<BlockEntry> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/block") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_virtual(&name) {
            continue;
        }
        let uevent = std::fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
        out.push(BlockEntry {
            partname: uevent_partname(&uevent),
            label: device_ext4_label(&Path::new("/dev").join(&name)),
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Facts about every whole disk. `boot_disk` is the whole disk holding the boot medium.
pub fn scan_disks(boot_disk: Option<&str>) -> Vec<DiskFacts> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_virtual(&name) {
            continue;
        }
        let sys = e.path();
        let size_bytes = read_attr(sys.join("size"))
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            * 512;
        let flag = |f: &str| read_attr(sys.join(f)).as_deref() == Some("1");
        let blank = size_bytes > 0
            && std::fs::File::open(Path::new("/dev").join(&name))
                .and_then(|mut f| is_blank(&mut f, size_bytes))
                .unwrap_or(false);
        out.push(DiskFacts {
            boot_medium: boot_disk == Some(name.as_str()),
            removable: flag("removable"),
            read_only: flag("ro"),
            size_bytes,
            blank,
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The whole disk a block device belongs to (itself when it is one).
pub fn whole_disk_of(name: &str) -> String {
    hvnode_update::sysfs::whole_disk_of(Path::new(hvnode_update::sysfs::SYS_BLOCK), name)
}

/// The kernel name of partition `n` of `disk` (`sdb1`, `nvme0n1p1`, `mmcblk0p1`).
pub fn partition_name(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn disk(name: &str) -> DiskFacts {
        DiskFacts {
            name: name.into(),
            size_bytes: 2 << 30,
            removable: false,
            read_only: false,
            boot_medium: false,
            blank: true,
        }
    }

    #[test]
    fn auto_picks_the_first_blank_fixed_disk_by_name() {
        let mut sda = disk("sda");
        sda.blank = false;
        let mut sdb = disk("sdb");
        sdb.removable = true;
        let disks = vec![disk("vdb"), sda, sdb, disk("sdc")];
        assert_eq!(
            choose_data_disk(&disks, None).map(|d| d.name.as_str()),
            Ok("sdc")
        );
    }

    #[test]
    fn auto_skips_boot_medium_read_only_small_and_virtual_disks() {
        let mut boot = disk("sda");
        boot.boot_medium = true;
        let mut ro = disk("sdb");
        ro.read_only = true;
        let mut small = disk("sdc");
        small.size_bytes = 100 << 20;
        let disks = vec![
            boot,
            ro,
            small,
            disk("loop0"),
            disk("zram0"),
            disk("sr0"),
            disk("dm-0"),
        ];
        assert_eq!(choose_data_disk(&disks, None), Err(DiskError::NoneFound));
    }

    #[test]
    fn explicit_device_must_be_blank() {
        let mut sdb = disk("sdb");
        sdb.blank = false;
        let disks = vec![sdb];
        assert_eq!(
            choose_data_disk(&disks, Some("/dev/sdb")),
            Err(DiskError::NotBlank("/dev/sdb".into()))
        );
    }

    #[test]
    fn explicit_device_may_be_removable_but_not_the_boot_medium_or_a_partition() {
        let mut usb = disk("sdb");
        usb.removable = true;
        let mut boot = disk("sdc");
        boot.boot_medium = true;
        let disks = vec![usb, boot];
        assert_eq!(
            choose_data_disk(&disks, Some("/dev/sdb")).map(|d| d.name.as_str()),
            Ok("sdb")
        );
        assert_eq!(
            choose_data_disk(&disks, Some("/dev/sdc")),
            Err(DiskError::BootMedium("/dev/sdc".into()))
        );
        assert_eq!(
            choose_data_disk(&disks, Some("/dev/sdb1")),
            Err(DiskError::NotADisk("/dev/sdb1".into()))
        );
    }

    #[test]
    fn blank_means_both_ends_zero() {
        let size = 4u64 << 20;
        let zero = vec![0u8; size as usize];
        assert!(is_blank(&mut Cursor::new(zero.clone()), size).expect("read"));
        let mut mbr = zero.clone();
        mbr[510] = 0x55;
        assert!(!is_blank(&mut Cursor::new(mbr), size).expect("read"));
        let mut backup_gpt = zero.clone();
        backup_gpt[size as usize - 512] = b'E';
        assert!(!is_blank(&mut Cursor::new(backup_gpt), size).expect("read"));
        // Data in the middle is not looked at.
        let mut middle = zero;
        middle[2 << 20] = 1;
        assert!(is_blank(&mut Cursor::new(middle), size).expect("read"));
    }

    #[test]
    fn blank_check_reads_a_temp_file() {
        let path = std::env::temp_dir().join(format!("hvnode-init-blank-{}", std::process::id()));
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(3 << 20).expect("size");
        drop(f);
        let mut f = std::fs::File::open(&path).expect("open");
        assert!(is_blank(&mut f, 3 << 20).expect("read"));
        let _ = std::fs::remove_file(&path);
    }

    fn superblock(label: &str, magic: bool) -> Vec<u8> {
        let mut sb = vec![0u8; 1024];
        if magic {
            sb[56] = 0x53;
            sb[57] = 0xEF;
        }
        sb[120..120 + label.len()].copy_from_slice(label.as_bytes());
        sb
    }

    #[test]
    fn reads_the_ext4_label_of_a_crafted_superblock() {
        assert_eq!(
            ext4_label(&superblock("HVNODE-DATA", true)).as_deref(),
            Some("HVNODE-DATA")
        );
        assert_eq!(
            ext4_label(&superblock("exactly16chars!!", true)).as_deref(),
            Some("exactly16chars!!")
        );
        assert_eq!(ext4_label(&superblock("HVNODE-DATA", false)), None);
        assert_eq!(ext4_label(&[0u8; 100]), None);
    }

    #[test]
    fn reads_the_label_from_an_image_file() {
        let path = std::env::temp_dir().join(format!("hvnode-init-ext4-{}", std::process::id()));
        let mut img = vec![0u8; 1024];
        img.extend(superblock("HVNODE-DATA", true));
        std::fs::write(&path, img).expect("write");
        assert_eq!(device_ext4_label(&path).as_deref(), Some("HVNODE-DATA"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn data_partition_by_gpt_name_wins_over_label() {
        let entries = vec![
            BlockEntry {
                name: "sda1".into(),
                partname: None,
                label: Some("HVNODE-DATA".into()),
            },
            BlockEntry {
                name: "sdb1".into(),
                partname: Some("HVNODE-DATA".into()),
                label: None,
            },
            BlockEntry {
                name: "loop0".into(),
                partname: Some("HVNODE-DATA".into()),
                label: None,
            },
        ];
        assert_eq!(
            find_data_partition(&entries).map(|e| e.name.as_str()),
            Some("sdb1")
        );
        assert_eq!(
            find_data_partition(&entries[..1]).map(|e| e.name.as_str()),
            Some("sda1")
        );
        assert_eq!(find_data_partition(&entries[2..]), None);
    }

    #[test]
    fn parses_partname_from_uevent() {
        let u =
            "MAJOR=8\nMINOR=17\nDEVNAME=sdb1\nDEVTYPE=partition\nPARTN=1\nPARTNAME=HVNODE-DATA\n";
        assert_eq!(uevent_partname(u).as_deref(), Some("HVNODE-DATA"));
        assert_eq!(uevent_partname("DEVTYPE=disk\n"), None);
    }

    #[test]
    fn partition_names_follow_kernel_conventions() {
        assert_eq!(partition_name("sdb", 1), "sdb1");
        assert_eq!(partition_name("vda", 1), "vda1");
        assert_eq!(partition_name("nvme0n1", 1), "nvme0n1p1");
        assert_eq!(partition_name("mmcblk0", 1), "mmcblk0p1");
    }
}
