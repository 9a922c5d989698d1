//! Where init's messages go: the consoles (until the console TUI owns them), `/dev/kmsg`
//! for the few lines that matter to the kernel log, and the node log, which is also shown live
//! on the second virtual terminal (Alt-F2 on the server's screen).
//!
//! Once [`hand_consoles_to_tui`] has run, nothing of init's reaches tty1 or ttyS0 but a fatal
//! problem ([`announce`]): the TUI's screen is not written over.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::nodelog::{timestamp_now, NodeLog};

/// Lines kept in memory until the node log can be opened (the early part of the boot).
const PENDING_LIMIT: usize = 2000;

struct State {
    /// After `hvnode: ready` the consoles belong to the console TUI.
    consoles_quiet: bool,
    /// Also write ordinary messages to /dev/kmsg (the early stage has no node log).
    kmsg_all: bool,
    log: Option<NodeLog>,
    /// The node log's live view on [`LOG_VT`], once the node log is open.
    log_vt: Option<std::fs::File>,
    pending: Vec<String>,
}

/// The virtual terminal that shows the node log live.
pub const LOG_VT: &str = "/dev/tty2";

static STATE: Mutex<State> = Mutex::new(State {
    consoles_quiet: false,
    kmsg_all: false,
    log: None,
    log_vt: None,
    pending: Vec::new(),
});

fn state() -> MutexGuard<'static, State> {
    // A panic while holding the lock must not silence init for the rest of its life.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends ordinary messages also to /dev/kmsg (early stage: the main stage reads them back
/// into the node log).
pub fn set_kmsg_all(on: bool) {
    state().kmsg_all = on;
}

/// From now on the console TUI owns tty1 and ttyS0: ordinary messages go to the node log (and
/// its view on [`LOG_VT`]) only, and the kernel prints nothing below an emergency on the consoles
/// unless `verbose_kernel` (the `hvnode.debug` boot entry) keeps its messages there.
pub fn hand_consoles_to_tui(verbose_kernel: bool) {
    state().consoles_quiet = true;
    if !verbose_kernel && !cfg!(test) {
        crate::sys::set_console_loglevel(1);
    }
}

/// Init writes on the consoles again: the TUI is stopping (shutdown) or gone (recovery).
pub fn take_consoles_back() {
    state().consoles_quiet = false;
}

/// Whether the console TUI owns the consoles.
pub fn consoles_owned_by_tui() -> bool {
    state().consoles_quiet
}

/// Opens the node log and flushes the lines logged so far into it and onto [`LOG_VT`].
pub fn open_node_log(path: &Path, limit: u64) -> Result<(), crate::nodelog::LogError> {
    let mut log = NodeLog::open(path, limit)?;
    let mut vt = open_log_vt();
    let mut st = state();
    for line in st.pending.drain(..) {
        log.write_line(&line);
        if let Some(vt) = vt.as_mut() {
            write_vt(vt, &line);
        }
    }
    st.log = Some(log);
    st.log_vt = vt;
    Ok(())
}

/// The log terminal, opened without blocking: a terminal stopped with Scroll Lock makes writes
/// fail instead of stalling PID 1.
fn open_log_vt() -> Option<std::fs::File> {
    if cfg!(test) {
        return None;
    }
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(LOG_VT)
        .ok()
}

fn write_vt(vt: &mut std::fs::File, line: &str) {
    let _ = vt.write_all(format!("{line}\n").as_bytes());
}

/// Writes a line (already attributed, e.g. `kernel: ...`) to the node log only.
pub fn log_only(line: &str) {
    let stamped = format!("{} {line}", timestamp_now());
    let mut st = state();
    if let Some(vt) = st.log_vt.as_mut() {
        write_vt(vt, &stamped);
    }
    match st.log.as_mut() {
        Some(log) => log.write_line(&stamped),
        None => {
            if st.pending.len() < PENDING_LIMIT {
                st.pending.push(stamped);
            }
        }
    }
}

/// A milestone of the boot (`ready`, the boot times): on the consoles unless the TUI owns them
/// already, in the kernel log at notice level, and in the node log.
pub fn milestone(msg: &str) {
    let line = format!("hvnode: {msg}");
    if !consoles_owned_by_tui() {
        write_consoles(&line, false);
    }
    write_kmsg(5, &line);
    log_only(&format!("init: {msg}"));
}

/// Copies lines from a pipe (a service's or a helper program's output) into the node log as
/// `<name>: line` until EOF.
pub fn copy_lines(fd: std::os::fd::OwnedFd, name: &str) {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(std::fs::File::from(fd));
    for line in reader.split(b'\n').map_while(Result::ok) {
        let text = String::from_utf8_lossy(&line);
        log_only(&format!("{name}: {}", text.trim_end()));
    }
}

/// A progress message: `hvnode: <msg>` on the consoles (until ready) and in the node log.
pub fn say(msg: &str) {
    let line = format!("hvnode: {msg}");
    let (quiet, kmsg) = {
        let st = state();
        (st.consoles_quiet, st.kmsg_all)
    };
    if !quiet {
        write_consoles(&line, false);
    }
    if kmsg {
        write_kmsg(5, &line);
    }
    log_only(&format!("init: {msg}"));
}

/// An important message: on every console even after ready, in the kernel log at
/// `level`, and in the node log. `drain` waits until serial output has left the port.
pub fn announce(level: u8, msg: &str, drain: bool) {
    let line = format!("hvnode: {msg}");
    write_consoles(&line, drain);
    write_kmsg(level, &line);
    log_only(&format!("init: {msg}"));
}

/// The console devices: the kernel's active consoles, plus tty1 and a real ttyS0.
pub fn console_paths() -> Vec<PathBuf> {
    let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
    let mut paths = console_paths_from(
        &active,
        Path::new("/dev/tty1").exists(),
        serial_present("ttyS0"),
    );
    paths.retain(|p| p.exists());
    if paths.is_empty() {
        paths.push(PathBuf::from("/dev/console"));
    }
    paths
}

/// Decides the consoles from the kernel's `active` list and which devices exist.
/// `tty0` (the foreground VT) is written as `tty1`, where the console TUI lives.
pub fn console_paths_from(active: &str, tty1: bool, ttys0: bool) -> Vec<PathBuf> {
    let mut names: Vec<String> = Vec::new();
    for name in active.split_whitespace() {
        let name = if name == "tty0" { "tty1" } else { name };
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    if tty1 && !names.iter().any(|n| n == "tty1") {
        names.push("tty1".to_owned());
    }
    if ttys0 && !names.iter().any(|n| n == "ttyS0") {
        names.push("ttyS0".to_owned());
    }
    names
        .into_iter()
        .map(|n| PathBuf::from("/dev").join(n))
        .collect()
}

/// Whether a serial port has a UART behind it (an 8250 port without one reports type 0).
pub fn serial_present(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/tty/{name}/type"))
        .map(|t| t.trim() != "0")
        .unwrap_or(false)
}

fn write_consoles(line: &str, drain: bool) {
    // Unit tests run on a developer's machine: its consoles are not ours.
    if cfg!(test) {
        return;
    }
    let text = format!("{line}\n");
    for path in console_paths() {
        let Ok(mut f) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
        else {
            continue;
        };
        let _ = f.write_all(text.as_bytes());
        if drain {
            let _ = nix::sys::termios::tcdrain(&f);
        }
    }
}

/// Writes one record to the kernel log with a syslog level (0-7).
pub fn write_kmsg(level: u8, line: &str) {
    if cfg!(test) {
        return;
    }
    if let Ok(mut f) = OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(format!("<{}>{line}\n", level.min(7)).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tty0_and_tty1_are_one_console_and_serial_is_added_once() {
        let paths = console_paths_from("tty0 ttyS0\n", true, true);
        assert_eq!(
            paths,
            vec![PathBuf::from("/dev/tty1"), PathBuf::from("/dev/ttyS0")]
        );
    }

    #[test]
    fn missing_serial_is_not_written() {
        let paths = console_paths_from("tty0", true, false);
        assert_eq!(paths, vec![PathBuf::from("/dev/tty1")]);
    }

    #[test]
    fn serial_only_kernel_console_still_gets_tty1() {
        let paths = console_paths_from("ttyS0", true, true);
        assert_eq!(
            paths,
            vec![PathBuf::from("/dev/ttyS0"), PathBuf::from("/dev/tty1")]
        );
    }
}
