//! Boot assessment of an installed node: once the booted slot is healthy, mark it good in the
//! boot loader's environment block on the ESP, so GRUB keeps booting it; say when an update
//! did not take. Published for the agent at `paths::SLOT_STATUS`.
//!
//! The health gate: the root was verified (the early stage does not switch to an unverified
//! root), the data partition is mounted, the network has an address, the agent answers on its
//! socket (the caller waited for that), and KVM works where the CPU can virtualise. A slot that
//! fails the gate is not confirmed: on its next boot GRUB takes it as failed (`TRY` still set)
//! and, for an update, falls back to the other slot.

use std::path::Path;

use hvnode_api::install::{FailedUpdate, SlotStatus};
use hvnode_api::paths;
use hvnode_update::disk::{disk_size, Esp, Extent, Part};
use hvnode_update::slots::{booted_from_cmdline, AbState, Slot, UpdateStatus};
use hvnode_update::sysfs;

use crate::out;

/// What the gate checks besides the agent (which the caller waited for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub data_mounted: bool,
    pub network_configured: bool,
    /// `None`: the CPU has no virtualisation extensions, nothing to check.
    pub kvm_usable: Option<bool>,
}

impl Health {
    /// The checks that failed, in words; empty when the slot may be confirmed.
    pub fn failures(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.data_mounted {
            out.push("the data partition is not mounted");
        }
        if !self.network_configured {
            out.push("the network has no address");
        }
        if self.kvm_usable == Some(false) {
            out.push("/dev/kvm is not usable");
        }
        out
    }
}

/// Whether the CPU flags of /proc/cpuinfo offer VT-x or AMD-V.
pub fn cpu_can_virtualise(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// `None` if the CPU cannot virtualise; otherwise whether /dev/kvm opens read-write.
pub fn kvm_check() -> Option<bool> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpu_can_virtualise(&cpuinfo) {
        return None;
    }
    Some(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
    )
}

/// The message for a failed update, as the console and the API say it.
pub fn failed_message(failed: Slot, running: Slot) -> String {
    format!("update to slot {failed} failed, running slot {running}")
}

/// The ESP on the disk that holds the booted slot.
fn esp_device(slot: Slot) -> Option<String> {
    let parts = sysfs::named_partitions(Path::new(sysfs::SYS_BLOCK));
    let (root, _) = sysfs::slot_partitions(&parts, slot)?;
    let disk = &parts.iter().find(|p| p.kernel == root)?.disk;
    parts
        .iter()
        .find(|p| &p.disk == disk && p.name == Part::Esp.name())
        .map(|p| format!("/dev/{}", p.kernel))
}

/// Where a boot of a slot under trial that failed records why, on the ESP, for the boot of the
/// previous slot to say (`slot A: early boot: ...`).
const FAILURE_NOTE: &str = "boot/grub/hvnode-failure";
/// How long a failed trial boot shows why before it reboots into the previous slot.
const FALLBACK_DELAY: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the ESP of the disk that holds `slot` and runs `f` on it.
fn with_esp<T>(slot: Slot, f: impl FnOnce(&Esp<'_>) -> Result<T, String>) -> Result<T, String> {
    let dev = esp_device(slot).ok_or("the disk has no hvnode-esp partition")?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .map_err(|e| format!("cannot open {dev}: {e}"))?;
    let size = disk_size(&file).map_err(|e| format!("{dev}: {e}"))?;
    let esp = Esp::open(
        &file,
        Extent {
            offset: 0,
            len: size,
        },
    )
    .map_err(|e| chain(&e))?;
    let out = f(&esp)?;
    esp.close().map_err(|e| chain(&e))?;
    file.sync_all().map_err(|e| format!("{dev}: {e}"))?;
    Ok(out)
}

/// Whether the booted `slot` holds an update on trial (written, set to boot once, not confirmed).
fn on_trial(slot: Slot) -> bool {
    with_esp(slot, |esp| {
        let state =
            AbState::from_env(esp.load_env().map_err(|e| chain(&e))?).map_err(|e| chain(&e))?;
        Ok(state.pending().ok().flatten() == Some(slot) && state.tries(slot).unwrap_or(0) > 0)
    })
    .unwrap_or(false)
}

/// A boot of an update on trial failed at `stage` (`reason`): record why on the ESP, say so, and
/// reboot, so that GRUB, which finds the slot started and never confirmed, boots the previous
/// slot. Returns (to the caller's recovery) when the node did not boot a slot on trial, or the
/// reboot failed.
pub fn fall_back_if_on_trial(stage: &str, reason: &str) {
    let raw = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(slot) = booted_from_cmdline(&raw) else {
        return;
    };
    if !on_trial(slot) {
        return;
    }
    let reason = reason.trim_end_matches('.');
    let note = format!("slot {slot}: {stage}: {reason}");
    if let Err(e) = with_esp(slot, |esp| {
        esp.write_file(FAILURE_NOTE, note.as_bytes())
            .map_err(|e| chain(&e))
    }) {
        out::say(&format!("cannot record the failure on the ESP: {e}"));
    }
    out::announce(
        3,
        &format!(
            "the update in slot {slot} failed at {stage}: {reason}; rebooting into the previous \
             slot in {} s",
            FALLBACK_DELAY.as_secs()
        ),
        true,
    );
    std::thread::sleep(FALLBACK_DELAY);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
}

/// What the ESP said: the slot an update failed in, why it failed (its note), and why the booted
/// slot is not confirmed.
type Outcome = (Option<Slot>, Option<String>, Option<String>);

/// Reads the slot state, confirms `slot` if `health` passed, and returns what to publish.
/// Never panics; every failure becomes a message.
pub fn assess(slot: Slot, health: Health) -> SlotStatus {
    let mut status = SlotStatus {
        booted: slot.to_string(),
        confirmed: false,
        not_confirmed: None,
        failed_update: None,
    };
    let result = with_esp(slot, |esp| -> Result<Outcome, String> {
        // A missing block (a power cut during the install's last step) reads as empty.
        let env = esp.load_env().unwrap_or_default();
        let mut state = AbState::from_env(env).map_err(|e| chain(&e))?;
        let failed = match state.update_status(slot).map_err(|e| chain(&e))? {
            UpdateStatus::Failed(other) if other != slot => Some(other),
            _ => None,
        };
        // Why the failed slot failed, if its boot got far enough to say (the note of an older
        // failure goes once the failure is no longer reported).
        let note = esp
            .read_file(FAILURE_NOTE)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
        let note = match (failed, note) {
            (Some(f), Some(n)) if n.starts_with(&format!("slot {f}: ")) => Some(n),
            (None, Some(_)) => {
                let _ = esp.remove(FAILURE_NOTE);
                None
            }
            _ => None,
        };
        let failures = health.failures();
        if !failures.is_empty() {
            return Ok((
                failed,
                note,
                Some(format!("health check failed: {}", failures.join(", "))),
            ));
        }
        state.mark_good(slot).map_err(|e| chain(&e))?;
        esp.store_env(state.env()).map_err(|e| chain(&e))?;
        Ok((failed, note, None))
    });
    match result {
        Ok((failed, note, not_confirmed)) => {
            status.confirmed = not_confirmed.is_none();
            status.not_confirmed = not_confirmed;
            status.failed_update = failed.map(|f| FailedUpdate {
                slot: f.to_string(),
                message: match &note {
                    Some(n) => format!("{} ({n})", failed_message(f, slot)),
                    None => failed_message(f, slot),
                },
            });
        }
        Err(e) => status.not_confirmed = Some(e),
    }
    status
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Assesses the boot if the node booted from a slot (`hvnode.slot=`), says the outcome on the
/// console and publishes it. Nothing on a live-medium boot.
pub fn run(health: Health) {
    let raw = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(slot) = booted_from_cmdline(&raw) else {
        return;
    };
    let status = assess(slot, health);
    if let Some(f) = &status.failed_update {
        out::say(&f.message);
    }
    match &status.not_confirmed {
        None => out::say(&format!("slot {slot} confirmed")),
        Some(why) => {
            out::say(&format!("slot {slot} not confirmed: {why}"));
            fall_back_if_on_trial("the health check", why);
        }
    }
    match serde_json::to_vec_pretty(&status) {
        Ok(json) => {
            if let Err(e) =
                hvnode_base::fs::write_atomic(Path::new(paths::SLOT_STATUS), &json, 0o644)
            {
                out::say(&format!("cannot write {}: {e}", paths::SLOT_STATUS));
            }
        }
        Err(e) => out::say(&format!("cannot record the slot status: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_names_each_failed_check() {
        let ok = Health {
            data_mounted: true,
            network_configured: true,
            kvm_usable: None,
        };
        assert!(ok.failures().is_empty());
        let bad = Health {
            data_mounted: false,
            network_configured: false,
            kvm_usable: Some(false),
        };
        assert_eq!(bad.failures().len(), 3);
        assert!(Health {
            kvm_usable: Some(true),
            ..ok
        }
        .failures()
        .is_empty());
    }

    #[test]
    fn kvm_is_checked_only_where_the_cpu_can_virtualise() {
        assert!(cpu_can_virtualise(
            "processor : 0\nflags : fpu vme vmx sse\n"
        ));
        assert!(cpu_can_virtualise("flags\t\t: fpu svm\n"));
        assert!(!cpu_can_virtualise("flags : fpu vme sse hypervisor\n"));
    }

    #[test]
    fn says_which_update_failed_and_what_runs() {
        assert_eq!(
            failed_message(Slot::B, Slot::A),
            "update to slot B failed, running slot A"
        );
    }

    #[test]
    fn esp_reads_the_same_through_a_partition_device_as_through_the_disk() {
        // The gate opens the ESP partition itself (offset 0); the installer the whole disk.
        let path = std::env::temp_dir().join(format!("hvnode-assess-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        f.set_len(hvnode_update::disk::ESP_SIZE).expect("size");
        let all = Extent {
            offset: 0,
            len: hvnode_update::disk::ESP_SIZE,
        };
        Esp::format(&f, all, 1).expect("format");
        let esp = Esp::open(
            &f,
            Extent {
                offset: 0,
                len: disk_size(&f).expect("size"),
            },
        )
        .expect("esp");
        esp.store_env(AbState::installed(Slot::A).env())
            .expect("store");
        esp.close().expect("close");
        let _ = std::fs::remove_file(path);
    }
}
