//! Shutdown (stop services, terminate every process, unmount, reboot or power off) and the
//! ACPI power button (an input device reporting KEY_POWER).

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::control::PowerKind;
use crate::supervisor::Supervisor;
use crate::{out, sys};

/// Time processes (VMMs shutting their guests down) get after SIGTERM.
const TERM_GRACE: Duration = Duration::from_secs(30);
/// Time the services get before everything else is signalled.
const SERVICE_GRACE: Duration = Duration::from_secs(10);
/// `KEY_POWER` from `<linux/input-event-codes.h>`.
pub const KEY_POWER: u16 = 116;
const EV_KEY: u16 = 1;
/// `struct input_event` on 64-bit: timeval (16), type, code (2 each), value (4).
const INPUT_EVENT_SIZE: usize = 24;

/// Reaps every exited child without blocking. Returns `false` once there are no children.
fn reap_now() -> bool {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
}

/// Reaps until there are no children or `limit` passes (or `until` says done).
fn reap_for(limit: Duration, until: impl Fn() -> bool) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if !reap_now() || until() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn alive(pid: Pid) -> bool {
    kill(pid, None).is_ok()
}

/// The whole shutdown sequence. Does not return.
pub fn shutdown(kind: PowerKind, sup: &mut Supervisor, stop_network: impl FnOnce()) -> ! {
    let word = match kind {
        PowerKind::Reboot => "reboot",
        PowerKind::PowerOff => "poweroff",
    };
    out::take_consoles_back();
    out::announce(5, &format!("shutting down ({word})"), false);
    let services = sup.stop_all();
    reap_for(SERVICE_GRACE, || services.iter().all(|p| !alive(*p)));
    stop_network();
    // Every remaining process, the VMMs first of all: SIGTERM is their graceful guest
    // shutdown. kill(-1) spares init itself.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let start = Instant::now();
    reap_for(TERM_GRACE, || false);
    if reap_now() {
        out::announce(
            4,
            &format!(
                "processes still running after {} s: killing them",
                start.elapsed().as_secs()
            ),
            false,
        );
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        reap_for(Duration::from_secs(5), || false);
    }
    nix::unistd::sync();
    unmount_all();
    nix::unistd::sync();
    let (msg, mode) = match kind {
        PowerKind::Reboot => ("reboot", RebootMode::RB_AUTOBOOT),
        PowerKind::PowerOff => ("power off", RebootMode::RB_POWER_OFF),
    };
    out::announce(5, msg, true);
    let err = match reboot(mode) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    crate::recovery(&format!("reboot system call failed: {err}"))
}

/// Unmounts everything but the root and the API filesystems, newest first; busy ones
/// lazily. What remains is remounted read-only.
fn unmount_all() {
    let keep = ["/", "/dev", "/proc", "/sys"];
    let data = hvnode_api::paths::DATA_DIR;
    if let Err(e) = sys::unmount(data) {
        if e != Errno::EINVAL && e != Errno::ENOENT {
            out::log_only(&format!("init: unmount {data}: {e}"));
        }
    }
    for m in sys::mounts().iter().rev() {
        if keep.contains(&m.target.as_str()) {
            continue;
        }
        let _ = sys::unmount(&m.target);
    }
    for m in sys::mounts().iter().rev() {
        if m.target == "/" || !keep.contains(&m.target.as_str()) {
            let _ = nix::mount::mount(
                None::<&str>,
                m.target.as_str(),
                None::<&str>,
                nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
                None::<&str>,
            );
        }
    }
}

/// Whether a sysfs `capabilities/key` bitmap (hex words, most significant first, each the
/// size of a C long) has bit `code` set.
pub fn caps_have_key(caps: &str, code: u16) -> bool {
    let words: Vec<&str> = caps.split_whitespace().collect();
    let bits = usize::BITS as usize;
    let idx = code as usize / bits;
    let Some(word) = words.len().checked_sub(idx + 1).and_then(|i| words.get(i)) else {
        return false;
    };
    u64::from_str_radix(word, 16)
        .map(|w| w >> (code as usize % bits) & 1 == 1)
        .unwrap_or(false)
}

/// Whether a raw input event is a KEY_POWER press.
pub fn is_power_press(ev: &[u8]) -> bool {
    if ev.len() < INPUT_EVENT_SIZE {
        return false;
    }
    let ty = u16::from_ne_bytes([ev[16], ev[17]]);
    let code = u16::from_ne_bytes([ev[18], ev[19]]);
    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
    ty == EV_KEY && code == KEY_POWER && value == 1
}

fn power_devices() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/input") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let caps =
            std::fs::read_to_string(e.path().join("device/capabilities/key")).unwrap_or_default();
        if caps_have_key(&caps, KEY_POWER) {
            out.push(Path::new("/dev/input").join(name));
        }
    }
    out.sort();
    out
}

/// Watches the power buttons and asks for a power-off on a press. Runs in its own thread.
pub fn power_button_loop(events: Sender<PowerKind>) {
    let mut said = false;
    loop {
        let files: Vec<std::fs::File> = power_devices()
            .iter()
            .filter_map(|p| std::fs::File::open(p).ok())
            .collect();
        if files.is_empty() {
            // The button driver may load late; look again now and then.
            std::thread::sleep(Duration::from_secs(5));
            continue;
        }
        if !said {
            out::log_only(&format!(
                "init: watching {} power button device(s)",
                files.len()
            ));
            said = true;
        }
        let mut fds: Vec<PollFd> = files
            .iter()
            .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
            .collect();
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
            let ready: Vec<usize> = fds
                .iter()
                .enumerate()
                .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
                .map(|(i, _)| i)
                .collect();
            let mut broken = false;
            for i in ready {
                let mut buf = [0u8; INPUT_EVENT_SIZE * 16];
                match (&files[i]).read(&mut buf) {
                    Ok(n) if n > 0 => {
                        if buf[..n].chunks(INPUT_EVENT_SIZE).any(is_power_press) {
                            out::log_only("init: power button pressed");
                            let _ = events.send(PowerKind::PowerOff);
                        }
                    }
                    _ => broken = true,
                }
            }
            if broken {
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_key_power_in_a_power_button_bitmap() {
        // A typical ACPI power button: only KEY_POWER (116 = word 1, bit 52).
        assert!(caps_have_key("10000000000000 0", KEY_POWER));
        // A keyboard bitmap without it.
        assert!(!caps_have_key("fffffffffffffffe", KEY_POWER));
        assert!(!caps_have_key("", KEY_POWER));
        assert!(!caps_have_key("zz 0", KEY_POWER));
    }

    fn event(ty: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; INPUT_EVENT_SIZE];
        e[16..18].copy_from_slice(&ty.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(0, 0, 0)), "sync");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&[0u8; 10]));
    }
}
