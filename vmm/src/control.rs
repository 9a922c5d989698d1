//! The control socket: one JSON request per line in, one response per line out.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use hvnode_api::vmm::{VmConfig, VmRunState, VmStats, VmmRequest, VmmResponse};

use crate::vcpu::Counters;
use crate::vm::ExitReason;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

pub(crate) fn control_loop(
    listener: UnixListener,
    config: VmConfig,
    started: Instant,
    counters: Arc<Counters>,
    exit: mpsc::Sender<ExitReason>,
) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(mut w) = conn.try_clone() else {
            continue;
        };
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            let resp = match serde_json::from_str::<VmmRequest>(&line) {
                Err(e) => VmmResponse::Error {
                    code: "bad_request".into(),
                    message: format!("Invalid request: {e}"),
                },
                Ok(VmmRequest::Describe) => VmmResponse::Description {
                    config: config.clone(),
                    state: VmRunState::Running,
                    uptime_secs: started.elapsed().as_secs(),
                },
                Ok(VmmRequest::Stats) => {
                    let mut exits = std::collections::BTreeMap::new();
                    exits.insert("io".to_owned(), counters.io.load(Ordering::Relaxed));
                    exits.insert("mmio".to_owned(), counters.mmio.load(Ordering::Relaxed));
                    let mut serial = std::collections::BTreeMap::new();
                    serial.insert("tx_bytes".to_owned(), counters.serial_bytes.load(Ordering::Relaxed));
                    let mut devices = std::collections::BTreeMap::new();
                    devices.insert("serial".to_owned(), serial);
                    VmmResponse::Stats {
                        stats: VmStats {
                            vcpu_exits: vec![exits],
                            devices,
                            memory_bytes: config.memory_mib << 20,
                            rss_bytes: rss_bytes(),
                        },
                    }
                }
                Ok(VmmRequest::Stop) => {
                    let _ = writeln!(w, "{}", serde_json::to_string(&VmmResponse::Ok).unwrap_or_default());
                    let _ = exit.send(ExitReason::PowerOff);
                    return;
                }
                Ok(op @ (VmmRequest::Pause | VmmRequest::Resume | VmmRequest::Shutdown)) => VmmResponse::Error {
                    code: "unsupported".into(),
                    message: format!("{op:?} is not supported by this VMM yet (no vCPU parking, no i8042 keyboard); use stop"),
                },
            };
            if writeln!(w, "{}", serde_json::to_string(&resp).unwrap_or_default()).is_err() {
                break;
            }
        }
    }
}
