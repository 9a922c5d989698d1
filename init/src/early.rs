//! Early stage, `/init` in the initrd: API filesystems, the initrd's modules, the boot
//! medium (ISO9660 volume `HVNODE`), the squashfs root on a loop device, switch root, and
//! exec of the main stage.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::MsFlags;

use crate::cmdline::Cmdline;
use crate::{kmod, loopdev, out, sys};

/// Volume id of the hvnode ISO.
pub const VOLUME_ID: &str = "HVNODE";
/// Where the boot medium is mounted (moved with /run into the real root).
pub const MEDIA_DIR: &str = "/run/hvnode/media";
/// The squashfs root image on the boot medium.
const ROOT_IMAGE: &str = "live/root.squashfs";
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
    /// The root image could not be attached.
    #[error("Cannot attach the root image: {0}")]
    Loop(#[from] loopdev::LoopError),
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
    let medium = find_medium(&cmdline)?;
    let medium_s = medium.to_string_lossy().into_owned();
    std::fs::create_dir_all(MEDIA_DIR).map_err(|source| sys::SysError::Write {
        path: MEDIA_DIR.into(),
        source,
    })?;
    sys::do_mount(&medium_s, MEDIA_DIR, "iso9660", MsFlags::MS_RDONLY, None)?;
    let image = Path::new(MEDIA_DIR).join(ROOT_IMAGE);
    let loopdev = loopdev::attach_read_only(&image)?;
    let _ = std::fs::create_dir_all(NEWROOT);
    sys::do_mount(
        &loopdev.to_string_lossy(),
        NEWROOT,
        "squashfs",
        MsFlags::MS_RDONLY,
        None,
    )?;
    out::say(&format!("root: {} from {medium_s}", loopdev.display()));
    for m in ["/dev", "/proc", "/sys", "/run"] {
        sys::move_mount(m, &format!("{NEWROOT}{m}"))?;
    }
    free_initramfs();
    switch_root()?;
    let path = c"/usr/bin/hvnode-init";
    let Err(e) = nix::unistd::execv(path, &[path]);
    Err(EarlyError::Exec(e))
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
