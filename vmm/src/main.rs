//! `hvnode-vmm --config FILE.json` (or `--config-json JSON`): runs one guest.
//!
//! Exit codes: 0 the guest powered off or was stopped, 1 configuration or setup error, 2 the
//! guest crashed, 3 the guest asked for a reboot (the agent starts it again).

use hvnode_api::vmm::VmConfig;
use hvnode_vmm::ExitReason;

fn config() -> Result<VmConfig, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = match args.as_slice() {
        [flag, path] if flag == "--config" => {
            std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?
        }
        [flag, json] if flag == "--config-json" => json.clone(),
        _ => return Err("usage: hvnode-vmm --config FILE.json | --config-json JSON".into()),
    };
    serde_json::from_str(&text).map_err(|e| format!("invalid VM config: {e}"))
}

fn main() {
    let config = match config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hvnode-vmm: {e}");
            std::process::exit(1);
        }
    };
    // SIGTERM ends the VMM at once for now (no graceful guest shutdown without an i8042).
    let code = match hvnode_vmm::run(&config) {
        Ok(ExitReason::PowerOff) => {
            eprintln!("hvnode-vmm: {}: guest powered off", config.name);
            0
        }
        Ok(ExitReason::Reboot) => {
            eprintln!("hvnode-vmm: {}: guest asked for a reboot", config.name);
            3
        }
        Ok(ExitReason::Crash(why)) => {
            eprintln!("hvnode-vmm: {}: guest crashed: {why}", config.name);
            2
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("hvnode-vmm: {}: {msg}", config.name);
            1
        }
    };
    std::process::exit(code);
}
