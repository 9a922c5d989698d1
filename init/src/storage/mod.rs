//! The data partition: find it (GPT name or ext4 label `HVNODE-DATA`), check and mount it
//! at `/var/lib/hvnode`, or create it on a blank disk; otherwise run volatile on a tmpfs.
//! The state is published as [`StorageStatus`] at `paths::STORAGE_STATE`.

pub mod disk;
pub use hvnode_update::gpt;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hvnode_api::node::StorageStatus;
use hvnode_api::paths::{DATA_DIR, DATA_LABEL, STORAGE_STATE};
use nix::mount::MsFlags;

use crate::cmdline::DataArg;
use crate::spawn::Reaper;
use crate::{out, sys};

use disk::DiskError;

const E2FSCK: &str = "/usr/sbin/e2fsck";
const MKFS: &str = "/usr/sbin/mkfs.ext4";
/// Staging mount point when a volatile node gets a data partition.
const STAGING: &str = "/run/hvnode/newdata";
const BLKRRPART: libc::c_ulong = 0x125F;
const VOLATILE_NOTE: &str =
    "no data partition: state is volatile (boot with hvnode.data=auto or initialise a disk from the console)";

/// Errors of storage setup.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The chosen disk is not acceptable.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A data partition is mounted already.
    #[error("A data partition is already mounted ({0}); nothing to do")]
    AlreadyPersistent(String),
    /// Writing the partition table failed.
    #[error("Cannot write the partition table on {dev}: {source}")]
    Gpt {
        /// The disk.
        dev: String,
        /// The cause.
        source: gpt::GptError,
    },
    /// Opening or re-reading the disk failed.
    #[error("Cannot use {dev}: {source}")]
    Io {
        /// The device.
        dev: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The partition device did not appear.
    #[error(
        "Partition {0} did not appear after re-reading the partition table; reboot and try again"
    )]
    NoPartition(String),
    /// A helper program failed.
    #[error("{program} {dev} failed with exit code {code}")]
    Tool {
        /// The program.
        program: &'static str,
        /// The device.
        dev: String,
        /// Its exit code.
        code: i32,
    },
    /// Starting a helper program failed.
    #[error(transparent)]
    Spawn(#[from] crate::spawn::SpawnError),
    /// fsck found errors it could not fix.
    #[error("e2fsck found uncorrectable errors on {0} (exit code {1}); not mounting it: repair it from another system")]
    Fsck(String, i32),
    /// Mounting failed.
    #[error(transparent)]
    Mount(#[from] sys::SysError),
}

/// Owns the data partition state.
#[derive(Debug)]
pub struct Storage {
    status: Mutex<StorageStatus>,
    boot_disk: Option<String>,
}

impl Storage {
    /// Creates the handle; `boot_disk` is the whole disk holding the boot medium.
    pub fn new(boot_disk: Option<String>) -> Self {
        Self {
            status: Mutex::new(StorageStatus::default()),
            boot_disk,
        }
    }

    /// The current status.
    pub fn status(&self) -> StorageStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_status(&self, status: StorageStatus) {
        publish(&status);
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// Boot-time setup. Never fails: without a usable data partition the node runs volatile
    /// and says why.
    pub fn setup_at_boot(&self, data: Option<&DataArg>, reaper: &Reaper) {
        let _ = std::fs::create_dir_all(DATA_DIR);
        let found = disk::scan_block_entries();
        if let Some(entry) = disk::find_data_partition(&found) {
            let dev = format!("/dev/{}", entry.name);
            match check_and_mount(&dev, reaper) {
                Ok(()) => {
                    out::say(&format!("storage: mounted {dev} at {DATA_DIR}"));
                    self.set_status(mounted_status(&dev));
                }
                Err(e) => {
                    out::say(&format!("storage: {e}"));
                    self.go_volatile(Some(format!("{e}; state is volatile")));
                }
            }
            return;
        }
        let Some(data) = data else {
            self.go_volatile(None);
            return;
        };
        let device = match data {
            DataArg::Auto => None,
            DataArg::Device(d) => Some(d.as_str()),
        };
        match self.create(device, reaper) {
            Ok(dev) => {
                out::say(&format!(
                    "storage: created {DATA_LABEL} on {dev}, mounted at {DATA_DIR}"
                ));
                self.set_status(mounted_status(&dev));
            }
            Err(e) => {
                out::say(&format!("storage: cannot create the data partition: {e}"));
                self.go_volatile(None);
            }
        }
    }

    /// The control socket's `InitStorage`: create the data partition on `device` (which
    /// must be blank) and mount it, keeping what the volatile tmpfs held.
    pub fn init_storage(
        &self,
        device: &str,
        reaper: &Reaper,
    ) -> Result<StorageStatus, StorageError> {
        let current = self.status();
        if current.persistent {
            return Err(StorageError::AlreadyPersistent(
                current.device.unwrap_or_default(),
            ));
        }
        let dev = self.create(Some(device), reaper)?;
        out::say(&format!(
            "storage: created {DATA_LABEL} on {dev}, mounted at {DATA_DIR}"
        ));
        let status = mounted_status(&dev);
        self.set_status(status.clone());
        Ok(status)
    }

    fn go_volatile(&self, note: Option<String>) {
        if !sys::is_mounted(DATA_DIR) {
            if let Err(e) = sys::do_mount(
                "tmpfs",
                DATA_DIR,
                "tmpfs",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=0755"),
            ) {
                out::say(&format!("storage: {e}"));
            }
        }
        out::announce(4, VOLATILE_NOTE, false);
        let mut status = StorageStatus {
            note: Some(note.unwrap_or_else(|| VOLATILE_NOTE.to_owned())),
            ..Default::default()
        };
        fill_sizes(&mut status);
        self.set_status(status);
    }

    /// Picks the disk, writes the GPT, makes the filesystem, and mounts it at DATA_DIR.
    fn create(&self, device: Option<&str>, reaper: &Reaper) -> Result<String, StorageError> {
        let disks = disk::scan_disks(self.boot_disk.as_deref());
        let chosen = disk::choose_data_disk(&disks, device)?.clone();
        let dev = format!("/dev/{}", chosen.name);
        out::say(&format!(
            "storage: creating {DATA_LABEL} on blank disk {dev}"
        ));
        write_table(&chosen, &dev)?;
        let part_name = disk::partition_name(&chosen.name, 1);
        let part = format!("/dev/{part_name}");
        wait_for_partition(&part_name)?;
        let code = reaper.run(
            Path::new(MKFS),
            &["-q", "-L", DATA_LABEL, &part],
            Duration::from_secs(1800),
        )?;
        if code != 0 {
            return Err(StorageError::Tool {
                program: "mkfs.ext4",
                dev: part,
                code,
            });
        }
        mount_data(&part)?;
        Ok(part)
    }
}

fn write_table(chosen: &disk::DiskFacts, dev: &str) -> Result<(), StorageError> {
    let io = |source| StorageError::Io {
        dev: dev.to_owned(),
        source,
    };
    let sector = sys::read_attr(format!(
        "/sys/block/{}/queue/logical_block_size",
        chosen.name
    ))
    .and_then(|s| s.parse().ok())
    .unwrap_or(512);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(io)?;
    // Re-check right before writing: never destroy data.
    if !disk::is_blank(&mut f, chosen.size_bytes).map_err(io)? {
        return Err(DiskError::NotBlank(dev.to_owned()).into());
    }
    let type_guid = gpt::guid_bytes(gpt::LINUX_FS_TYPE).unwrap_or_default();
    gpt::write_single(
        &mut f,
        chosen.size_bytes,
        sector,
        DATA_LABEL,
        &type_guid,
        &gpt::random_guid(),
        &gpt::random_guid(),
    )
    .map_err(|source| StorageError::Gpt {
        dev: dev.to_owned(),
        source,
    })?;
    f.sync_all().map_err(io)?;
    // Read the table back through the device before the kernel parses it.
    let parts =
        gpt::read(&mut f, chosen.size_bytes, sector).map_err(|source| StorageError::Gpt {
            dev: dev.to_owned(),
            source,
        })?;
    if parts.len() != 1 || parts[0].name != DATA_LABEL {
        return Err(StorageError::Gpt {
            dev: dev.to_owned(),
            source: gpt::GptError::Invalid("table did not read back"),
        });
    }
    // SAFETY: BLKRRPART takes no argument; the fd is an open block device.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn wait_for_partition(part_name: &str) -> Result<(), StorageError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let node = Path::new("/dev").join(part_name);
    while Instant::now() < deadline {
        if node.exists() && Path::new("/sys/class/block").join(part_name).exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(StorageError::NoPartition(node.display().to_string()))
}

/// e2fsck -p, then mount. Exit code 2 (reboot advised) is logged and the mount goes on.
fn check_and_mount(dev: &str, reaper: &Reaper) -> Result<(), StorageError> {
    let code = reaper.run(Path::new(E2FSCK), &["-p", dev], Duration::from_secs(3600))?;
    match code {
        0 | 1 => {}
        2 | 3 => out::say(&format!(
            "storage: e2fsck repaired {dev} and advises a reboot"
        )),
        _ => return Err(StorageError::Fsck(dev.to_owned(), code)),
    }
    mount_data(dev)
}

/// Mounts an ext4 device at DATA_DIR. When DATA_DIR is a volatile tmpfs, its content is
/// copied onto the new filesystem first and the tmpfs is detached.
fn mount_data(dev: &str) -> Result<(), StorageError> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
    let tmpfs_there = sys::mounts()
        .iter()
        .any(|m| m.target == DATA_DIR && m.fstype == "tmpfs");
    if !tmpfs_there {
        let _ = std::fs::create_dir_all(DATA_DIR);
        sys::do_mount(dev, DATA_DIR, "ext4", flags, None)?;
        return Ok(());
    }
    let _ = std::fs::create_dir_all(STAGING);
    sys::do_mount(dev, STAGING, "ext4", flags, None)?;
    if let Err(e) = copy_tree(Path::new(DATA_DIR), Path::new(STAGING)) {
        out::say(&format!("storage: copying the volatile state failed: {e}"));
    }
    let _ = sys::unmount(DATA_DIR);
    let _ = nix::mount::umount2(DATA_DIR, nix::mount::MntFlags::MNT_DETACH);
    sys::move_mount(STAGING, DATA_DIR)?;
    Ok(())
}

/// Copies a directory tree (files, directories, symlinks; permissions kept).
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let src = e.path();
        let dst: PathBuf = to.join(e.file_name());
        let md = std::fs::symlink_metadata(&src)?;
        if md.is_dir() {
            std::fs::create_dir_all(&dst)?;
            std::fs::set_permissions(&dst, md.permissions())?;
            copy_tree(&src, &dst)?;
        } else if md.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if md.is_file() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

fn mounted_status(dev: &str) -> StorageStatus {
    let mut s = StorageStatus {
        persistent: true,
        device: Some(dev.to_owned()),
        ..Default::default()
    };
    fill_sizes(&mut s);
    s
}

fn fill_sizes(s: &mut StorageStatus) {
    if let Ok(v) = nix::sys::statvfs::statvfs(DATA_DIR) {
        let frag = v.fragment_size();
        s.size_bytes = v.blocks() * frag;
        s.free_bytes = v.blocks_available() * frag;
    }
}

/// Writes the status JSON atomically.
fn publish(status: &StorageStatus) {
    let _ = std::fs::create_dir_all(hvnode_api::paths::RUN_DIR);
    let json = serde_json::to_vec_pretty(status).unwrap_or_default();
    if let Err(e) = sys::write_atomic(Path::new(STORAGE_STATE), &json) {
        out::log_only(&format!("init: {e}"));
    }
}

/// The whole disk that holds the mounted boot medium, if any.
pub fn boot_disk() -> Option<String> {
    let m = sys::mounts()
        .into_iter()
        .find(|m| m.target == crate::early::MEDIA_DIR)?;
    let name = m.source.strip_prefix("/dev/")?;
    Some(disk::whole_disk_of(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_tree_keeps_files_directories_and_links() {
        let base = std::env::temp_dir().join(format!("hvnode-init-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(a.join("tls")).expect("mkdir");
        std::fs::create_dir_all(&b).expect("mkdir");
        std::fs::write(a.join("node.toml"), "hostname = \"n1\"\n").expect("write");
        std::fs::write(a.join("tls/key.pem"), "KEY").expect("write");
        std::os::unix::fs::symlink("node.toml", a.join("link")).expect("symlink");
        copy_tree(&a, &b).expect("copy");
        assert_eq!(
            std::fs::read_to_string(b.join("tls/key.pem")).expect("read"),
            "KEY"
        );
        assert_eq!(
            std::fs::read_link(b.join("link")).expect("link"),
            PathBuf::from("node.toml")
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn init_storage_is_refused_when_already_persistent() {
        let s = Storage::new(None);
        *s.status.lock().expect("lock") = StorageStatus {
            persistent: true,
            device: Some("/dev/sda1".into()),
            ..Default::default()
        };
        let err = s
            .init_storage("/dev/sdb", &Reaper::default())
            .expect_err("refused");
        assert!(matches!(err, StorageError::AlreadyPersistent(d) if d == "/dev/sda1"));
    }
}

/// Root-only tests on loop devices: the kernel must parse the GPT we write. They skip
/// (saying so) without root, without loop devices or without e2fsprogs.
#[cfg(test)]
mod root_tests {
    use super::*;
    use std::process::Command;

    fn skip_reason() -> Option<&'static str> {
        if !nix::unistd::geteuid().is_root() {
            return Some("not root");
        }
        if !Path::new("/dev/loop-control").exists() {
            return Some("no loop devices");
        }
        if !Path::new(MKFS).exists()
            || !Path::new("/usr/sbin/losetup").exists()
            || !Path::new("/usr/bin/partx").exists()
        {
            return Some("mkfs.ext4, losetup or partx missing");
        }
        None
    }

    struct LoopDisk {
        dev: String,
        file: PathBuf,
    }

    impl Drop for LoopDisk {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.dev]).status();
            if !self.file.as_os_str().is_empty() {
                let _ = std::fs::remove_file(&self.file);
            }
        }
    }

    fn loop_disk(size: u64) -> LoopDisk {
        let file =
            std::env::temp_dir().join(format!("hvnode-init-disk-{}.raw", std::process::id()));
        let f = std::fs::File::create(&file).expect("create image");
        f.set_len(size).expect("size image");
        drop(f);
        let out = Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(&file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDisk {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            file,
        }
    }

    #[test]
    fn kernel_reads_our_gpt_and_mkfs_label_is_found() {
        if let Some(why) = skip_reason() {
            hvnode_base::testing::cannot_run("kernel_reads_our_gpt_and_mkfs_label_is_found", why);
            return;
        }
        let size = 64 << 20;
        let disk = loop_disk(size);
        let name = disk.dev.trim_start_matches("/dev/").to_owned();
        let facts = disk::DiskFacts {
            name: name.clone(),
            size_bytes: size,
            removable: false,
            read_only: false,
            boot_medium: false,
            blank: true,
        };
        write_table(&facts, &disk.dev).expect("write GPT");
        // libblkid (through partx) parses the table independently of our reader.
        let shown = Command::new("partx")
            .args(["--show", "--noheadings", "-o", "START,END,NAME,TYPE"])
            .arg(&disk.dev)
            .output()
            .expect("partx");
        let shown = String::from_utf8_lossy(&shown.stdout).to_string();
        let fields: Vec<&str> = shown.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "one partition expected: {shown:?}");
        assert_eq!(fields[0], "2048");
        assert_eq!(fields[2], DATA_LABEL);
        assert_eq!(fields[3].to_ascii_uppercase(), gpt::LINUX_FS_TYPE);
        let part = disk::partition_name(&name, 1);
        // Without kernel GPT support (some CI kernels), an offset loop device stands in
        // for the partition so mkfs and the label reader still run on real devices.
        let mut offset_loop: Option<LoopDisk> = None;
        let part_dev = if wait_for_partition(&part).is_ok() {
            let uevent =
                std::fs::read_to_string(format!("/sys/class/block/{part}/uevent")).expect("uevent");
            assert_eq!(disk::uevent_partname(&uevent).as_deref(), Some(DATA_LABEL));
            format!("/dev/{part}")
        } else {
            eprintln!("kernel_reads_our_gpt_and_mkfs_label_is_found: no kernel GPT support; using an offset loop device");
            let out = Command::new("losetup")
                .args(["-f", "--show", "-o", &(1u64 << 20).to_string()])
                .arg(&disk.file)
                .output()
                .expect("losetup offset");
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            offset_loop = Some(LoopDisk {
                dev: dev.clone(),
                file: PathBuf::new(),
            });
            dev
        };
        let status = Command::new(MKFS)
            .args(["-q", "-L", DATA_LABEL, &part_dev])
            .status()
            .expect("mkfs");
        assert!(status.success());
        assert_eq!(
            disk::device_ext4_label(Path::new(&part_dev)).as_deref(),
            Some(DATA_LABEL)
        );
        drop(offset_loop);
        // The disk is no longer blank: a second initialisation must be refused.
        let mut f = std::fs::File::open(&disk.dev).expect("open disk");
        assert!(!disk::is_blank(&mut f, size).expect("read"));
        let err = write_table(&facts, &disk.dev).expect_err("refused");
        assert!(
            matches!(err, StorageError::Disk(DiskError::NotBlank(_))),
            "{err}"
        );
    }
}
