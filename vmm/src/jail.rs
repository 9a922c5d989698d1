//! The jail a VMM started as root enters once it has opened everything it needs, before the
//! guest runs or a migration stream is read (docs/vmm.md#the-jail): a mount namespace and an
//! IPC namespace of its own, whose root is an empty read-only tmpfs holding nothing but, when
//! the VMM may write snapshots, the guest's snapshot directory bound at its own path. Then
//! [`crate::seccomp`] drops root to the guest's own uid and gid and installs the filter.
//!
//! Everything else the VMM uses is a descriptor opened before: /dev/kvm and the VM, the disk
//! images, the taps (through /dev/net/tun), /dev/urandom, the kernel and initrd, the serial log,
//! the exit file, /proc/self/statm, the bound sockets (clients reach them by their path outside
//! the jail). No directory descriptor of the host's tree is kept, so `..` leads nowhere: the
//! snapshot directory is bound, not held open, because `openat(fd, "../..")` from a held
//! directory would walk out of any root.
//!
//! The PID namespace and the cgroup cannot be entered by a running process (threads cannot be
//! created after `unshare(CLONE_NEWPID)`, and a cgroup is the parent's to choose): whoever
//! starts the VMM clones it into both (`hvnode_base::spawn`), as the agent does.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use hvnode_api::vmm::VmJail;

/// Where the jail's tmpfs is mounted while it is built. Any existing directory would do: the
/// jail needs nothing of the tree it hides (the snapshot directory is cloned first), and the
/// mount exists only in the VMM's own mount namespace.
const BUILD_AT: &str = "/tmp";
/// `move_mount` flag: the source is the descriptor itself (not in the libc crate).
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Why the jail could not be entered; each fails the start.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The VMM is not root: only root can build a jail.
    #[error("A jailed VMM must be started as root")]
    NotRoot,
    /// The snapshot directory is not an absolute, plain path.
    #[error("Snapshot directory {0:?}: use an absolute path without ..")]
    BadPath(String),
    /// A system call failed.
    #[error("{0}: {1}")]
    Sys(String, std::io::Error),
}

fn sys(rc: libc::c_long, what: impl FnOnce() -> String) -> Result<libc::c_long, JailError> {
    if rc < 0 {
        Err(JailError::Sys(what(), std::io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(p.display().to_string()))
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let c = |s: Option<&str>| s.map(|s| CString::new(s).expect("no NUL in constants"));
    let (source, fstype, data) = (c(source), c(fstype), c(data));
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    let target_c = cstr(target)?;
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    sys(rc.into(), || format!("mounting {}", target.display())).map(drop)
}

/// A plain absolute path: no `..` (a bind target is made of its components).
fn plain_absolute(dir: &str) -> Result<PathBuf, JailError> {
    let p = PathBuf::from(dir);
    let plain = p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if plain {
        Ok(p)
    } else {
        Err(JailError::BadPath(dir.to_owned()))
    }
}

/// A detached copy of the mount tree at `dir` (`open_tree(OPEN_TREE_CLONE)`), to be attached
/// inside the jail.
fn clone_tree(dir: &Path) -> Result<OwnedFd, JailError> {
    let c = cstr(dir)?;
    // SAFETY: open_tree reads the NUL-terminated path; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    let fd = sys(fd, || format!("cloning the mount of {}", dir.display()))?;
    // SAFETY: open_tree returned a descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn attach(tree: &OwnedFd, target: &Path) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    let target_c = cstr(target)?;
    // SAFETY: move_mount reads the two NUL-terminated paths; `tree` is an open_tree descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    sys(rc, || format!("binding {}", target.display())).map(drop)
}

/// Enters the jail: namespaces, the new root, the old one gone. Call as root, once every
/// descriptor the VM needs is open and before any thread starts (a thread started before would
/// keep the old root: mount namespace and root are per thread until shared by `clone`).
pub fn enter(jail: &VmJail) -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!(
            "hvnode-vmm: not PID 1 of a PID namespace of its own: whoever started it did not \
             clone it into one (hvnode_base::spawn); the rest of the jail goes on"
        );
    }
    let snapshot_dir = jail
        .snapshot_dir
        .as_deref()
        .map(plain_absolute)
        .transpose()?;
    // SAFETY: unshare takes flags only.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC) };
    sys(rc.into(), || {
        "unsharing the mount and IPC namespaces".into()
    })?;
    // Nothing mounted or unmounted from here on reaches the host's namespace, nor the other way.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let snapshots = snapshot_dir
        .as_deref()
        .map(|d| clone_tree(d).map(|t| (d, t)))
        .transpose()?;
    let root = Path::new(BUILD_AT);
    let fixed = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some("hvnode-jail"),
        root,
        Some("tmpfs"),
        fixed,
        Some("mode=0755,size=64k,nr_inodes=256"),
    )?;
    if let Some((dir, tree)) = &snapshots {
        let target = root.join(dir.strip_prefix("/").unwrap_or(dir));
        std::fs::create_dir_all(&target)
            .map_err(|e| JailError::Sys(format!("creating {}", target.display()), e))?;
        attach(tree, &target)?;
        mount(
            None,
            &target,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | fixed,
            None,
        )?;
    }
    std::env::set_current_dir(root)
        .map_err(|e| JailError::Sys(format!("entering {BUILD_AT}"), e))?;
    // pivot_root(".", "."): the old root is stacked under the new one and unmounted at once.
    // SAFETY: two NUL-terminated string constants.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    sys(rc, || "pivot_root".into())?;
    // SAFETY: a NUL-terminated string constant.
    let rc = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
    sys(rc.into(), || "unmounting the old root".into())?;
    std::env::set_current_dir("/").map_err(|e| JailError::Sys("entering /".into(), e))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | fixed,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_directory_must_be_a_plain_absolute_path() {
        assert_eq!(
            plain_absolute("/var/lib/hvnode/snapshots/web").unwrap(),
            Path::new("/var/lib/hvnode/snapshots/web")
        );
        for bad in ["snapshots", "/a/../etc", "/a/..", ""] {
            assert!(plain_absolute(bad).is_err(), "{bad}");
        }
    }
}
