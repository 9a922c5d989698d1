//! hvnode-init: PID 1 of an hvnode node.
//!
//! As `/init` in the initrd (recognised by `/etc/hvnode-initrd`) it finds the boot
//! medium, mounts the squashfs root and execs itself from there; as
//! `/usr/bin/hvnode-init` on the root it runs the node (see `mainstage`). It never exits
//! and never lets a panic escape: fatal errors end in a recovery state that keeps reaping
//! children and still reboots on ctrl-alt-del.

mod assess;
mod cmdline;
mod control;
mod dm;
mod early;
mod hostname;
mod kmod;
mod kmsg;
mod loopdev;
mod mainstage;
mod network;
mod nodelog;
mod out;
mod power;
mod ready;
mod spawn;
mod storage;
mod supervisor;
mod sys;
mod watchdog;

use std::os::fd::AsFd;
use std::path::Path;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Present only in the initrd.
const INITRD_MARKER: &str = "/etc/hvnode-initrd";

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        let _ = std::io::Write::write_all(
            &mut std::io::stdout(),
            format!("hvnode-init {}\n", hvnode_api::VERSION).as_bytes(),
        );
        return;
    }
    if nix::unistd::getpid().as_raw() != 1 {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"hvnode-init: this is the node's PID 1 and runs only as init (boot the hvnode image)\n",
        );
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| {
        out::log_only(&format!("init: panic: {info}"));
    }));
    let result = std::panic::catch_unwind(|| {
        if Path::new(INITRD_MARKER).exists() {
            early::run().to_string()
        } else {
            mainstage::run()
        }
    });
    let reason = match result {
        Ok(reason) => reason,
        Err(payload) => format!("internal error: {}", panic_text(payload.as_ref())),
    };
    // An update on trial that cannot come up goes back to the slot it came from by itself.
    let stage = if Path::new(INITRD_MARKER).exists() {
        "early boot"
    } else {
        "start-up"
    };
    assess::fall_back_if_on_trial(stage, &reason);
    recovery(&reason)
}

/// The state init falls into on a fatal error: say why on every console, keep reaping,
/// reboot on ctrl-alt-del (SIGINT), power off on SIGTERM. Never returns.
pub fn recovery(reason: &str) -> ! {
    sys::block_signals();
    let _ = nix::sys::reboot::set_cad_enabled(false);
    out::take_consoles_back();
    out::announce(3, &format!("fatal: {reason}"), true);
    out::announce(
        3,
        "the node stopped in recovery: press ctrl-alt-del to reboot",
        true,
    );
    loop {
        let r = std::panic::catch_unwind(recovery_loop);
        if let Err(payload) = r {
            out::log_only(&format!("init: recovery: {}", panic_text(payload.as_ref())));
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

fn recovery_loop() {
    let sfd = SignalFd::with_flags(
        &sys::handled_signals(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )
    .ok();
    loop {
        match &sfd {
            Some(sfd) => {
                let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(1000u16));
                while let Ok(Some(info)) = sfd.read_signal() {
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGINT) => final_reboot(RebootMode::RB_AUTOBOOT),
                        Ok(Signal::SIGTERM) | Ok(Signal::SIGPWR) => {
                            final_reboot(RebootMode::RB_POWER_OFF)
                        }
                        _ => {}
                    }
                }
            }
            None => std::thread::sleep(std::time::Duration::from_secs(1)),
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// Last resort reboot/power-off from recovery: sync and go; on failure stay in recovery.
fn final_reboot(mode: RebootMode) {
    nix::unistd::sync();
    out::announce(
        5,
        if mode == RebootMode::RB_AUTOBOOT {
            "reboot"
        } else {
            "power off"
        },
        true,
    );
    let Err(e) = reboot(mode);
    out::announce(3, &format!("reboot failed: {e}"), false);
}
