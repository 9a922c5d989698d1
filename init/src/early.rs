//! Early stage, `/init` in the initrd: API filesystems, the initrd's modules, the boot
//! medium (ISO9660 volume `HVNODE`), the squashfs root verified by dm-verity (image and hash
//! tree on two loop devices, the expected root hash from the initrd), switch root, and exec
//! of the main stage.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::MsFlags;

use hvnode_update::slots::{booted_from_cmdline, Slot};
use hvnode_update::sysfs;

use crate::cmdline::Cmdline;
use crate::{dm, kmod, loopdev, out, sys};

/// Volume id of the hvnode ISO.
pub const VOLUME_ID: &str = "HVNODE";
/// Where the boot medium is mounted (moved with /run into the real root).
pub const MEDIA_DIR: &str = hvnode_api::paths::MEDIA_DIR;
/// The squashfs root image on the boot medium.
const ROOT_IMAGE: &str = "live/root.squashfs";
/// Its dm-verity hash tree (`veritysetup format`), next to it.
const ROOT_HASH_TREE: &str = "live/root.verity";
/// The expected root hash and the tree's geometry, written into the initrd by the image build.
/// The initrd, not the command line, is what a signature will cover, and an edit at the boot
/// prompt must not switch verification off: there is no argument that does.
const VERITY_PARAMS: &str = "/etc/hvnode-root.verity";
/// The device-mapper name of the verified root.
const DM_NAME: &str = "hvnode-root";
const NEWROOT: &str = "/newroot";
const MAIN_INIT: &str = "/usr/bin/hvnode-init";
const MODULE_LIST: &str = "/etc/hvnode-initrd-modules";
/// How long USB disks get to appear.
const FIND_TIMEOUT: Duration = Duration::from_secs(30);

const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Errors of the early stage (all fatal: init falls into recovery).
#[derive(Debug, thiserror::Error)]
pub enum EarlyError {
    /// An API filesystem or the root could not be mounted.
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    /// The boot medium was not found.
    #[error("Boot medium not found: no device holds the ISO9660 volume {VOLUME_ID:?} (waited {0} s). Check the boot device, or boot with hvnode.root=/dev/...")]
    NoMedium(u64),
    /// The booted slot's partitions were not found.
    #[error("Slot {0} not found: no disk holds the partitions hvnode-root-{l} and hvnode-verity-{l} (waited {1} s). Boot the ISO and install again", l = .0.to_lowercase())]
    NoSlot(String, u64),
    /// The root image could not be attached.
    #[error("Cannot attach the root image: {0}")]
    Loop(#[from] loopdev::LoopError),
    /// The initrd carries no usable verity parameters.
    #[error(
        "The initrd holds no valid root hash ({VERITY_PARAMS}: {0}): the image build is broken"
    )]
    VerityParams(String),
    /// Device-mapper is not usable.
    #[error("Cannot verify the root image: {0}")]
    DeviceMapper(#[from] dm::DmError),
    /// The verity target is not in the kernel.
    #[error(
        "Cannot verify the root image: the dm-verity module is not loaded (the initrd lacks it)"
    )]
    NoVerityTarget,
    /// The root image or its hash tree does not match the root hash in the initrd.
    #[error("The root image failed verification ({0}): the system is corrupt or was modified. Write the ISO again (an installed node: update or reinstall it).")]
    Verification(String),
    /// Switching root failed.
    #[error("Cannot switch to the new root: {0}")]
    SwitchRoot(nix::Error),
    /// exec of the main stage failed.
    #[error("Cannot start {MAIN_INIT}: {0}")]
    Exec(nix::Error),
}

/// The volume id of an ISO9660 primary volume descriptor (the 2048 bytes at byte 32768).
pub fn iso_volume_id(pvd: &[u8]) -> Option<String> {
    if pvd.len() < 72 || pvd[0] != 1 || &pvd[1..6] != b"CD001" {
        return None;
    }
    let id = String::from_utf8_lossy(&pvd[40..72]);
    Some(id.trim_end_matches([' ', '\0']).to_owned())
}

/// Reads the volume id of the ISO9660 filesystem on `dev`, if any.
fn device_volume_id(dev: &Path) -> Option<String> {
    let mut f = std::fs::File::open(dev).ok()?;
    f.seek(SeekFrom::Start(32768)).ok()?;
    let mut buf = [0u8; 2048];
    f.read_exact(&mut buf).ok()?;
    iso_volume_id(&buf)
}

/// Whether a block device name is one the boot medium can be on.
pub fn is_medium_candidate(name: &str) -> bool {
    ["sr", "sd", "vd", "nvme", "mmcblk"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Candidate devices, whole disks first: a hybrid ISO written to a USB stick has its
/// filesystem at offset 0 of the whole disk.
fn candidates() -> Vec<PathBuf> {
    let mut whole = Vec::new();
    let mut parts = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/class/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_medium_candidate(&name) {
                continue;
            }
            let dev = PathBuf::from("/dev").join(&name);
            if e.path().join("partition").exists() {
                parts.push(dev);
            } else {
                whole.push(dev);
            }
        }
    }
    whole.sort();
    parts.sort();
    whole.extend(parts);
    whole
}

fn find_medium(cmdline: &Cmdline) -> Result<PathBuf, EarlyError> {
    let start = Instant::now();
    let mut said = false;
    loop {
        match &cmdline.root {
            // The admin named the device: any ISO9660 filesystem on it will do.
            Some(root) => {
                let dev = PathBuf::from(root);
                if device_volume_id(&dev).is_some() {
                    return Ok(dev);
                }
            }
            None => {
                for dev in candidates() {
                    if device_volume_id(&dev).as_deref() == Some(VOLUME_ID) {
                        return Ok(dev);
                    }
                }
            }
        }
        if start.elapsed() >= FIND_TIMEOUT {
            return Err(EarlyError::NoMedium(FIND_TIMEOUT.as_secs()));
        }
        if !said && start.elapsed() >= Duration::from_secs(3) {
            out::say("waiting for the boot medium");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn mount_api_filesystems() -> Result<(), EarlyError> {
    let nosuid = MsFlags::MS_NOSUID;
    sys::ensure_mount("devtmpfs", "/dev", "devtmpfs", nosuid, Some("mode=0755"))?;
    sys::ensure_std_fds();
    sys::ensure_mount(
        "proc",
        "/proc",
        "proc",
        nosuid | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    sys::ensure_mount(
        "sysfs",
        "/sys",
        "sysfs",
        nosuid | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    sys::ensure_mount(
        "tmpfs",
        "/run",
        "tmpfs",
        nosuid | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    Ok(())
}

/// Runs the early stage. Returns only on error.
pub fn run() -> EarlyError {
    match run_inner() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn run_inner() -> Result<std::convert::Infallible, EarlyError> {
    mount_api_filesystems()?;
    out::set_kmsg_all(true);
    out::say(&format!("early stage, kernel {}", kmod::kernel_release()));
    let loaded = kmod::load_list(Path::new(MODULE_LIST), &kmod::module_dir());
    out::log_only(&format!("init: {loaded} initrd modules loaded"));
    let cmdline = Cmdline::from_proc();
    let raw_cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (root, medium_s) = match booted_from_cmdline(&raw_cmdline) {
        Some(slot) => {
            let (data, hash) = find_slot_partitions(slot)?;
            let from = format!("slot {slot}");
            (VerifiedRoot::attach_partitions(&data, &hash)?, from)
        }
        None => {
            let medium = find_medium(&cmdline)?;
            let medium_s = medium.to_string_lossy().into_owned();
            std::fs::create_dir_all(MEDIA_DIR).map_err(|source| sys::SysError::Write {
                path: MEDIA_DIR.into(),
                source,
            })?;
            sys::do_mount(&medium_s, MEDIA_DIR, "iso9660", MsFlags::MS_RDONLY, None)?;
            (VerifiedRoot::attach(Path::new(MEDIA_DIR))?, medium_s)
        }
    };
    root.mount(NEWROOT)?;
    out::say(&format!(
        "root: {} (dm-verity, root hash {}) over {} + {} from {medium_s}",
        root.node.display(),
        root.root_hash,
        root.data.display(),
        root.hash.display()
    ));
    for m in ["/dev", "/proc", "/sys", "/run"] {
        sys::move_mount(m, &format!("{NEWROOT}{m}"))?;
    }
    free_initramfs();
    switch_root()?;
    let path = c"/usr/bin/hvnode-init";
    let Err(e) = nix::unistd::execv(path, &[path]);
    Err(EarlyError::Exec(e))
}

/// The root image and its hash tree on two read-only loop devices under a dm-verity device.
struct VerifiedRoot {
    control: dm::Control,
    /// The verity device (`/dev/dm-N`).
    node: PathBuf,
    /// Loop device of the squashfs.
    data: PathBuf,
    /// Loop device of the hash tree.
    hash: PathBuf,
    root_hash: String,
    /// What was verified, for messages: the medium's files or the slot's partitions.
    what: String,
}

impl VerifiedRoot {
    /// Attaches `live/root.squashfs` and `live/root.verity` of the medium mounted at `media`
    /// and creates the verity device over them with the initrd's root hash. The kernel checks
    /// blocks as they are read, so a tampered image or tree shows at the mount, not here; a
    /// table the kernel refuses (geometry it rejects, a device too small) already fails here.
    fn attach(media: &Path) -> Result<Self, EarlyError> {
        let params = verity_params()?;
        let image = media.join(ROOT_IMAGE);
        let tree = media.join(ROOT_HASH_TREE);
        if !tree.is_file() {
            return Err(EarlyError::Verification(format!(
                "{ROOT_HASH_TREE} is missing"
            )));
        }
        // The tree covers the whole image as built: any other size is another image.
        if let Ok(md) = std::fs::metadata(&image) {
            if md.len() != params.data_bytes() {
                return Err(EarlyError::Verification(format!(
                    "{ROOT_IMAGE} has {} bytes, the root hash covers {}",
                    md.len(),
                    params.data_bytes()
                )));
            }
        }
        let data = loopdev::attach_read_only(&image)?;
        let hash = loopdev::attach_read_only(&tree)?;
        let what = format!("{ROOT_IMAGE} does not match {ROOT_HASH_TREE} and the root hash");
        Self::create(params, data, hash, what)
    }

    /// The verity device over an installed slot's partitions (`hvnode-root-<slot>` and
    /// `hvnode-verity-<slot>`), with the initrd's root hash as for the medium. The root
    /// partition is larger than the image: the table covers the image's blocks only.
    fn attach_partitions(data: &Path, hash: &Path) -> Result<Self, EarlyError> {
        let params = verity_params()?;
        let size = partition_bytes(data);
        if size < params.data_bytes() {
            return Err(EarlyError::Verification(format!(
                "{} has {size} bytes, the root hash covers {}",
                data.display(),
                params.data_bytes()
            )));
        }
        let what = format!(
            "{} does not match {} and the root hash",
            data.display(),
            hash.display()
        );
        Self::create(params, data.to_path_buf(), hash.to_path_buf(), what)
    }

    fn create(
        params: dm::VerityParams,
        data: PathBuf,
        hash: PathBuf,
        what: String,
    ) -> Result<Self, EarlyError> {
        let control = dm::Control::open()?;
        if !Path::new("/sys/module/dm_verity").exists() {
            return Err(EarlyError::NoVerityTarget);
        }
        control.create(DM_NAME)?;
        control
            .load_read_only(DM_NAME, &[params.target(&data, &hash)])
            .map_err(|e| {
                EarlyError::Verification(format!("the kernel refused the verity table: {e}"))
            })?;
        let node = control.resume(DM_NAME)?;
        Ok(VerifiedRoot {
            control,
            node,
            data,
            hash,
            root_hash: params.root_hash,
            what,
        })
    }

    /// Mounts the verified squashfs read-only at `target`. A mount that fails because a block
    /// failed its hash (dm-verity's status says `C`) is a verification failure.
    fn mount(&self, target: &str) -> Result<(), EarlyError> {
        let _ = std::fs::create_dir_all(target);
        let node = self.node.to_string_lossy();
        let Err(e) = sys::do_mount(&node, target, "squashfs", MsFlags::MS_RDONLY, None) else {
            return Ok(());
        };
        match self.control.status(DM_NAME) {
            Ok(lines) if lines.iter().any(|l| dm::verity_corrupted(l)) => {
                // The kernel log names the block and whether data or tree was wrong.
                Err(EarlyError::Verification(self.what.clone()))
            }
            _ => Err(e.into()),
        }
    }
}

fn verity_params() -> Result<dm::VerityParams, EarlyError> {
    let text = std::fs::read_to_string(VERITY_PARAMS)
        .map_err(|e| EarlyError::VerityParams(e.to_string()))?;
    dm::VerityParams::parse(&text).map_err(|e| EarlyError::VerityParams(e.to_string()))
}

/// The size of a block device from sysfs (`/dev/vda3` → `/sys/class/block/vda3/size`).
fn partition_bytes(dev: &Path) -> u64 {
    let name = dev.file_name().map(|n| n.to_string_lossy().into_owned());
    name.and_then(|n| sys::read_attr(format!("/sys/class/block/{n}/size")))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        * 512
}

/// Waits for the booted slot's partitions (disks can take a while to appear).
fn find_slot_partitions(slot: Slot) -> Result<(PathBuf, PathBuf), EarlyError> {
    let start = Instant::now();
    let mut said = false;
    loop {
        let parts = sysfs::named_partitions(Path::new(sysfs::SYS_BLOCK));
        if let Some((root, verity)) = sysfs::slot_partitions(&parts, slot) {
            let (root, verity) = (Path::new("/dev").join(root), Path::new("/dev").join(verity));
            if root.exists() && verity.exists() {
                return Ok((root, verity));
            }
        }
        if start.elapsed() >= FIND_TIMEOUT {
            return Err(EarlyError::NoSlot(slot.to_string(), FIND_TIMEOUT.as_secs()));
        }
        if !said && start.elapsed() >= Duration::from_secs(3) {
            out::say(&format!("waiting for the partitions of slot {slot}"));
            said = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Deletes the initramfs files (they would pin memory forever), staying on the rootfs
/// device and only when / really is the initramfs.
fn free_initramfs() {
    let Ok(st) = nix::sys::statfs::statfs("/") else {
        return;
    };
    let magic = st.filesystem_type().0;
    if magic != RAMFS_MAGIC && magic != TMPFS_MAGIC {
        return;
    }
    let Ok(root) = std::fs::symlink_metadata("/") else {
        return;
    };
    remove_tree_on_device(Path::new("/"), root.dev());
}

fn remove_tree_on_device(dir: &Path, dev: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(md) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if md.dev() != dev {
            continue;
        }
        if md.is_dir() {
            remove_tree_on_device(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn switch_root() -> Result<(), EarlyError> {
    nix::unistd::chdir(NEWROOT).map_err(EarlyError::SwitchRoot)?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(EarlyError::SwitchRoot)?;
    nix::unistd::chroot(".").map_err(EarlyError::SwitchRoot)?;
    nix::unistd::chdir("/").map_err(EarlyError::SwitchRoot)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvd(kind: u8, magic: &[u8; 5], id: &str) -> Vec<u8> {
        let mut b = vec![0u8; 2048];
        b[0] = kind;
        b[1..6].copy_from_slice(magic);
        b[6] = 1;
        let mut v = [b' '; 32];
        v[..id.len()].copy_from_slice(id.as_bytes());
        b[40..72].copy_from_slice(&v);
        b
    }

    #[test]
    fn reads_the_padded_volume_id_of_a_primary_descriptor() {
        assert_eq!(
            iso_volume_id(&pvd(1, b"CD001", "HVNODE")).as_deref(),
            Some(VOLUME_ID)
        );
        assert_eq!(
            iso_volume_id(&pvd(1, b"CD001", "OTHER")).as_deref(),
            Some("OTHER")
        );
    }

    #[test]
    fn rejects_other_descriptors_and_non_iso_data() {
        assert_eq!(iso_volume_id(&pvd(2, b"CD001", "HVNODE")), None);
        assert_eq!(iso_volume_id(&pvd(1, b"BEA01", "HVNODE")), None);
        assert_eq!(iso_volume_id(&[0u8; 2048]), None);
        assert_eq!(iso_volume_id(&[1u8; 10]), None);
    }

    #[test]
    fn reads_volume_id_from_an_image_file_at_sector_16() {
        let path = std::env::temp_dir().join(format!("hvnode-init-iso-{}", std::process::id()));
        let mut data = vec![0u8; 32768];
        data.extend(pvd(1, b"CD001", "HVNODE"));
        std::fs::write(&path, data).expect("write image");
        assert_eq!(device_volume_id(&path).as_deref(), Some("HVNODE"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn medium_candidates_are_cd_and_disk_devices() {
        for n in [
            "sr0",
            "sda",
            "sdb1",
            "vda",
            "nvme0n1",
            "nvme0n1p2",
            "mmcblk0",
        ] {
            assert!(is_medium_candidate(n), "{n}");
        }
        for n in ["loop0", "ram0", "dm-0", "zram0", "md0"] {
            assert!(!is_medium_candidate(n), "{n}");
        }
    }
}
