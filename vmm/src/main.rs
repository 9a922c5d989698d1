//! `hvnode-vmm --config FILE.json` (or `--config-json JSON`): runs one guest. With
//! `--restore DIR` it resumes the guest from the snapshot in DIR instead of booting it; the
//! config then gives this run's sockets, logs, exit file, disk images and taps, and must match
//! the snapshot's in what the guest saw (vCPUs, memory, disks, NICs, rng).
//!
//! Exit codes: 0 the guest powered off or was stopped, 1 configuration or setup error, 2 the
//! guest crashed, 3 the guest asked for a reboot (the agent starts it again). With
//! `--incoming SOCKET` it binds that unix socket, accepts one connection and receives a migrating
//! guest from it (see [`hvnode_vmm::migration`]), which then runs here. With
//! `exit_file` in the configuration, the code and reason are also written there as a
//! [`VmExit`], for a supervisor that is not the VMM's parent.

use std::fs::File;
use std::os::unix::fs::FileExt;

use hvnode_api::vmm::{VmConfig, VmExit};
use hvnode_vmm::ExitReason;

/// The configuration and the snapshot to restore, or why there is none (with the exit file,
/// if the text names one).
fn config() -> Result<(VmConfig, Origin), (String, Option<String>)> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (source, origin) = match args.as_slice() {
        [a, b] => ((a, b), Origin::Boot),
        [a, b, flag, dir] if flag == "--restore" => ((a, b), Origin::Restore(dir.into())),
        [a, b, flag, sock] if flag == "--incoming" => ((a, b), Origin::Incoming(sock.into())),
        _ => return Err((USAGE.into(), None)),
    };
    let text = match source {
        (flag, path) if flag == "--config" => {
            std::fs::read_to_string(path).map_err(|e| (format!("reading {path}: {e}"), None))?
        }
        (flag, json) if flag == "--config-json" => json.clone(),
        _ => return Err((USAGE.into(), None)),
    };
    let config = serde_json::from_str(&text).map_err(|e| {
        // A config that is JSON but not a valid VmConfig may still say where to report.
        let exit_file = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("exit_file")?.as_str().map(str::to_owned));
        (format!("invalid VM config: {e}"), exit_file)
    })?;
    Ok((config, origin))
}

/// Where the guest comes from (see [`hvnode_vmm::vm::Origin`]).
enum Origin {
    Boot,
    Restore(std::path::PathBuf),
    Incoming(std::path::PathBuf),
}

const USAGE: &str = "usage: hvnode-vmm --config FILE.json | --config-json JSON \
                     [--restore DIR | --incoming SOCKET]";

/// The exit file, created (empty) as the VMM starts: once the sandbox is on no file can be
/// opened, so the report goes through this descriptor, which a forbidden syscall's report
/// (see [`hvnode_vmm::seccomp`]) uses too. The whole JSON goes in one write, so a reader sees
/// nothing or all of it; the agent reads it once the process is gone.
struct ExitFile {
    path: String,
    file: std::io::Result<&'static File>,
}

impl ExitFile {
    fn create(path: &str) -> ExitFile {
        // Leaked: the SIGSYS handler may write through it until the process exits.
        let file = File::create(path).map(|f| &*Box::leak(Box::new(f)));
        if let Ok(f) = file {
            hvnode_vmm::seccomp::report_violations_to(f);
        }
        ExitFile {
            path: path.to_owned(),
            file,
        }
    }

    fn write(&self, exit: &VmExit) -> std::io::Result<()> {
        let file = self
            .file
            .as_ref()
            .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
        if !hvnode_vmm::seccomp::claim_exit_file() {
            return Ok(());
        }
        let text = serde_json::to_vec(exit).map_err(std::io::Error::other)?;
        file.set_len(0)?;
        file.write_all_at(&text, 0)
    }
}

fn finish(name: &str, exit_file: Option<&ExitFile>, code: i32, reason: String) -> ! {
    eprintln!("hvnode-vmm: {name}: {reason}");
    if let Some(f) = exit_file {
        if let Err(e) = f.write(&VmExit { code, reason }) {
            eprintln!("hvnode-vmm: {name}: writing the exit file {}: {e}", f.path);
        }
    }
    std::process::exit(code);
}

fn main() {
    let (config, origin) = match config() {
        Ok(c) => c,
        Err((msg, exit_file)) => {
            let exit_file = exit_file.as_deref().map(ExitFile::create);
            finish("-", exit_file.as_ref(), 1, msg)
        }
    };
    let exit_file = config.exit_file.as_deref().map(ExitFile::create);
    // A panic on the main thread is a VMM bug; it still ends with an exit file.
    let origin = match &origin {
        Origin::Boot => hvnode_vmm::vm::Origin::Boot,
        Origin::Restore(dir) => hvnode_vmm::vm::Origin::Restore(dir),
        Origin::Incoming(socket) => hvnode_vmm::vm::Origin::Incoming(socket),
    };
    let run = std::panic::catch_unwind(|| hvnode_vmm::run_from(&config, origin));
    let (code, reason) = match run {
        Ok(Ok(ExitReason::PowerOff)) => (0, "guest powered off".to_owned()),
        Ok(Ok(ExitReason::Stopped(why))) => (0, why),
        Ok(Ok(ExitReason::Reboot)) => (3, "guest asked for a reboot".to_owned()),
        Ok(Ok(ExitReason::Crash(why))) => (2, format!("guest crashed: {why}")),
        Ok(Err(e)) => (1, hvnode_api::error::chain(&e)),
        Err(_) => (2, "the VMM panicked".to_owned()),
    };
    finish(&config.name, exit_file.as_ref(), code, reason);
}
