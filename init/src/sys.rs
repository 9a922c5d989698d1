//! Small system helpers: mounts, the mount table, atomic files, signals, standard fds.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Errors of the system helpers.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A mount failed.
    #[error("Cannot mount {fstype} on {target}: {source}")]
    Mount {
        /// Filesystem type.
        fstype: String,
        /// Mount point.
        target: String,
        /// The cause.
        source: nix::Error,
    },
    /// A file could not be written.
    #[error("Cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub target: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (device), as the kernel shows it.
    pub source: String,
}

/// Parses `/proc/self/mountinfo` text, in mount order.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let target = unescape_octal(left.split_whitespace().nth(4)?);
            let mut r = right.split_whitespace();
            let fstype = r.next()?.to_owned();
            let source = unescape_octal(r.next().unwrap_or(""));
            Some(MountEntry {
                target,
                fstype,
                source,
            })
        })
        .collect()
}

/// The kernel escapes space, tab, newline and backslash in mountinfo as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The current mount table.
pub fn mounts() -> Vec<MountEntry> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// Whether `target` is a mount point now.
pub fn is_mounted(target: &str) -> bool {
    mounts().iter().any(|m| m.target == target)
}

/// Mounts `fstype` at `target` (created if missing) unless something is mounted there.
pub fn ensure_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SysError> {
    if is_mounted(target) {
        return Ok(());
    }
    let _ = std::fs::create_dir_all(target);
    do_mount(source, target, fstype, flags, data)
}

/// Mounts unconditionally.
pub fn do_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SysError> {
    mount(Some(source), target, Some(fstype), flags, data).map_err(|source| SysError::Mount {
        fstype: fstype.to_owned(),
        target: target.to_owned(),
        source,
    })
}

/// Moves the mount at `from` to `to`.
pub fn move_mount(from: &str, to: &str) -> Result<(), SysError> {
    let _ = std::fs::create_dir_all(to);
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| {
        SysError::Mount {
            fstype: format!("(move from {from})"),
            target: to.to_owned(),
            source,
        }
    })
}

/// Unmounts, falling back to a lazy unmount when busy.
pub fn unmount(target: &str) -> Result<(), nix::Error> {
    match umount2(target, MntFlags::empty()) {
        Err(nix::Error::EBUSY) => umount2(target, MntFlags::MNT_DETACH),
        other => other,
    }
}

/// Writes a file atomically (see [`hvnode_base::fs::write_atomic`]), mode 0644.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), SysError> {
    hvnode_base::fs::write_atomic(path, data, 0o644).map_err(|source| SysError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The signals init handles through its signalfd.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGPWR,
    ] {
        set.add(s);
    }
    set
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Blocks init's signals in this thread (and so in every thread spawned later) and gives
/// them a handler: the kernel drops signals to PID 1 that have the default disposition.
pub fn block_signals() {
    let set = handled_signals();
    let _ = set.thread_block();
    let action = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in set.iter() {
        // SAFETY: the handler does nothing, so it is async-signal-safe; the signals are
        // blocked in every thread and consumed through a signalfd.
        let _ = unsafe { sigaction(s, &action) };
    }
}

/// Makes sure fds 0, 1 and 2 are open (the kernel leaves them closed when the initramfs
/// has no /dev/console), so files opened later never land on them.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        let path = if fd == 0 {
            c"/dev/null"
        } else {
            c"/dev/console"
        };
        // SAFETY: open with a valid NUL-terminated path; the result is checked.
        let mut new = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if new < 0 {
            // SAFETY: as above.
            new = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
        if new >= 0 && new != fd {
            // SAFETY: both descriptors are valid; dup2 replaces the closed `fd`.
            unsafe {
                libc::dup2(new, fd);
                libc::close(new);
            }
        }
    }
}

/// Sets the kernel console log level (`klogctl(SYSLOG_ACTION_CONSOLE_LEVEL)`).
pub fn set_console_loglevel(level: i32) {
    // SAFETY: action 8 takes no buffer; the pointer is unused and may be null.
    unsafe {
        libc::klogctl(8, std::ptr::null_mut(), level);
    }
}

/// Reads a sysfs attribute, trimmed.
pub fn read_attr(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Clock ticks per second of `/proc` times (USER_HZ).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a constant of the C library; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    35 24 7:0 / /new\\040root ro,relatime shared:1 master:2 - squashfs /dev/loop0 ro\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0],
            MountEntry {
                target: "/proc".into(),
                fstype: "proc".into(),
                source: "proc".into()
            }
        );
        assert_eq!(m[1].target, "/new root");
        assert_eq!(m[1].fstype, "squashfs");
        assert_eq!(m[1].source, "/dev/loop0");
    }
}
