//! Read-only loop devices: `LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE`, falling back to
//! `LOOP_SET_FD` + `LOOP_SET_STATUS64` on kernels without `LOOP_CONFIGURE`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Errors of loop device setup.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// A file or device could not be opened.
    #[error("Cannot open {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An ioctl failed.
    #[error("Loop device {op} failed: {source}")]
    Ioctl {
        /// Which request.
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

fn info_for(backing: &Path) -> LoopInfo64 {
    let mut info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        // No autoclear: it would detach the device as soon as this function closes its fd,
        // before the squashfs is mounted; the root stays attached for the node's life.
        lo_flags: LO_FLAGS_READ_ONLY,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    let name = backing.as_os_str().as_encoded_bytes();
    let n = name.len().min(63);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    info
}

fn ioctl_err(op: &'static str) -> LoopError {
    LoopError::Ioctl {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Attaches `backing` read-only to a free loop device and returns the device path.
/// Another process may take the same free device first (EBUSY): then try the next one.
pub fn attach_read_only(backing: &Path) -> Result<PathBuf, LoopError> {
    let mut attempt = 0;
    loop {
        match attach_once(backing) {
            Err(LoopError::Ioctl { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && attempt < 20 =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn attach_once(backing: &Path) -> Result<PathBuf, LoopError> {
    let open = |p: &Path, write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(p)
            .map_err(|source| LoopError::Open {
                path: p.to_path_buf(),
                source,
            })
    };
    let file = open(backing, false)?;
    let ctl = open(Path::new("/dev/loop-control"), true)?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
    let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if n < 0 {
        return Err(ioctl_err("LOOP_CTL_GET_FREE"));
    }
    let dev_path = PathBuf::from(format!("/dev/loop{n}"));
    let dev = wait_open(&dev_path)?;
    let info = info_for(backing);
    let config = LoopConfig {
        fd: file.as_raw_fd() as u32,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // SAFETY: `config` is a properly laid out `struct loop_config` that outlives the call;
    // the kernel only reads it.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_CONFIGURE,
            &config as *const LoopConfig,
        )
    };
    if rc == 0 {
        return Ok(dev_path);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOTTY) {
        return Err(LoopError::Ioctl {
            op: "LOOP_CONFIGURE",
            source: err,
        });
    }
    // SAFETY: LOOP_SET_FD takes the backing file descriptor, which stays open for the call.
    if unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_SET_FD,
            file.as_raw_fd() as libc::c_ulong,
        )
    } != 0
    {
        return Err(ioctl_err("LOOP_SET_FD"));
    }
    // SAFETY: `info` is a properly laid out `struct loop_info64` that outlives the call.
    if unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_SET_STATUS64,
            &info as *const LoopInfo64,
        )
    } != 0
    {
        let e = ioctl_err("LOOP_SET_STATUS64");
        // SAFETY: LOOP_CLR_FD takes no argument; it undoes LOOP_SET_FD above.
        unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD) };
        return Err(e);
    }
    Ok(dev_path)
}

/// devtmpfs creates the node asynchronously after LOOP_CTL_GET_FREE: wait briefly.
fn wait_open(path: &Path) -> Result<File, LoopError> {
    let mut last = None;
    for _ in 0..50 {
        match OpenOptions::new().read(true).open(path) {
            Ok(f) => return Ok(f),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(LoopError::Open {
        path: path.to_path_buf(),
        source: last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernel_abi_sizes() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn info_carries_read_only_flag_and_truncated_name() {
        let long = "/run/hvnode/media/".to_owned() + &"x".repeat(100);
        let info = info_for(Path::new(&long));
        assert_eq!(info.lo_flags & LO_FLAGS_READ_ONLY, LO_FLAGS_READ_ONLY);
        assert_eq!(info.lo_file_name[63], 0);
        assert_eq!(&info.lo_file_name[..18], b"/run/hvnode/media/");
    }
}

/// Root-only: attach a real squashfs image and mount it.
#[cfg(test)]
mod root_tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn attaches_a_squashfs_image_read_only_and_mounts_it() {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
            hvnode_base::testing::cannot_run(
                "attaches_a_squashfs_image_read_only_and_mounts_it",
                "needs root and loop devices",
            );
            return;
        }
        let Ok(which) = Command::new("mksquashfs").arg("-version").output() else {
            hvnode_base::testing::cannot_run(
                "attaches_a_squashfs_image_read_only_and_mounts_it",
                "mksquashfs is missing (image/setup-host.sh installs it)",
            );
            return;
        };
        assert!(which.status.success() || !which.stdout.is_empty());
        let base = std::env::temp_dir().join(format!("hvnode-init-sq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (src, mnt, img) = (
            base.join("src"),
            base.join("mnt"),
            base.join("root.squashfs"),
        );
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        std::fs::write(src.join("marker"), "hvnode").expect("write");
        let ok = Command::new("mksquashfs")
            .arg(&src)
            .arg(&img)
            .args(["-quiet", "-noappend"])
            .status()
            .expect("mksquashfs");
        assert!(ok.success());
        let dev = attach_read_only(&img).expect("attach");
        let ro = std::fs::read_to_string(format!(
            "/sys/block/{}/ro",
            dev.file_name().unwrap_or_default().to_string_lossy()
        ))
        .expect("ro attr");
        assert_eq!(ro.trim(), "1", "loop device is read-only");
        nix::mount::mount(
            Some(dev.as_path()),
            mnt.as_path(),
            Some("squashfs"),
            nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .expect("mount squashfs");
        let text = std::fs::read_to_string(mnt.join("marker"));
        let _ = nix::mount::umount(mnt.as_path());
        let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(text.expect("read marker"), "hvnode");
    }
}
