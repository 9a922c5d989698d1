//! `hvnode-vmm --config FILE.json` (or `--config-json JSON`): runs one guest.
//!
//! Exit codes: 0 the guest powered off or was stopped, 1 configuration or setup error, 2 the
//! guest crashed, 3 the guest asked for a reboot (the agent starts it again). With
//! `exit_file` in the configuration, the code and reason are also written there as a
//! [`VmExit`], for a supervisor that is not the VMM's parent.

use std::path::Path;

use hvnode_api::vmm::{VmConfig, VmExit};
use hvnode_vmm::ExitReason;

/// The configuration, or why there is none (with the exit file, if the text names one).
fn config() -> Result<VmConfig, (String, Option<String>)> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = match args.as_slice() {
        [flag, path] if flag == "--config" => {
            std::fs::read_to_string(path).map_err(|e| (format!("reading {path}: {e}"), None))?
        }
        [flag, json] if flag == "--config-json" => json.clone(),
        _ => {
            let usage = "usage: hvnode-vmm --config FILE.json | --config-json JSON";
            return Err((usage.into(), None));
        }
    };
    serde_json::from_str(&text).map_err(|e| {
        // A config that is JSON but not a valid VmConfig may still say where to report.
        let exit_file = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("exit_file")?.as_str().map(str::to_owned));
        (format!("invalid VM config: {e}"), exit_file)
    })
}

/// Writes `exit` to `path` through a temporary file and a rename, so that a reader never sees
/// half of it.
fn write_exit_file(path: &Path, exit: &VmExit) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let text = serde_json::to_vec(exit).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

fn finish(name: &str, exit_file: Option<&str>, code: i32, reason: String) -> ! {
    eprintln!("hvnode-vmm: {name}: {reason}");
    if let Some(path) = exit_file {
        if let Err(e) = write_exit_file(Path::new(path), &VmExit { code, reason }) {
            eprintln!("hvnode-vmm: {name}: writing the exit file {path}: {e}");
        }
    }
    std::process::exit(code);
}

fn main() {
    let config = match config() {
        Ok(c) => c,
        Err((msg, exit_file)) => finish("-", exit_file.as_deref(), 1, msg),
    };
    // A panic on the main thread is a VMM bug; it still ends with an exit file.
    let run = std::panic::catch_unwind(|| hvnode_vmm::run(&config));
    let (code, reason) = match run {
        Ok(Ok(ExitReason::PowerOff)) => (0, "guest powered off".to_owned()),
        Ok(Ok(ExitReason::Stopped(why))) => (0, why),
        Ok(Ok(ExitReason::Reboot)) => (3, "guest asked for a reboot".to_owned()),
        Ok(Ok(ExitReason::Crash(why))) => (2, format!("guest crashed: {why}")),
        Ok(Err(e)) => (1, error_chain(&e)),
        Err(_) => (2, "the VMM panicked".to_owned()),
    };
    finish(&config.name, config.exit_file.as_deref(), code, reason);
}
