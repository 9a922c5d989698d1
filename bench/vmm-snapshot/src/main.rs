//! Snapshot and restore of a running payload guest (it counts in memory and prints the count) on
//! the host's /dev/kvm with the release `hvnode-vmm`, for guests of 256 MiB, 1 GiB and 4 GiB
//! (two memory slots). Prints, per size, medians over RUNS:
//! - `snapshot_<size>_paused_ms`: how long the guest was paused for the snapshot;
//! - `snapshot_<size>_write_ms`: how long writing the snapshot took;
//! - `snapshot_<size>_written_kib` and `_file_mib`: what the sparse memory file holds and its size;
//! - `restore_<size>_ms`: `hvnode-vmm --restore` started → its control socket answers with the
//!   guest running (memory mapped lazily, state restored).
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvnode_bench_common::{ask, median, vmm_binary, wait, Vmm};

use hvnode_api::vmm::{SnapshotInfo, VmmRequest, VmmResponse};
use hvnode_vmm::payload::{elf64, MEMORY_COUNTER};

const RUNS: usize = 5;
/// How long a step may take.
const LIMIT: Duration = Duration::from_secs(60);
const SIZES_MIB: [u64; 3] = [256, 1024, 4096];

fn start(vmm: &Path, config: &Path, restore: Option<&Path>) -> Vmm {
    let mut cmd = Command::new(vmm);
    cmd.arg("--config").arg(config);
    if let Some(dir) = restore {
        cmd.arg("--restore").arg(dir);
    }
    Vmm(cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hvnode-vmm"))
}

fn main() {
    let vmm = vmm_binary();
    let root = std::env::temp_dir().join(format!("hvnode-bench-snapshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("scratch directory");
    // The VMM writes the snapshot after it dropped root.
    std::process::Command::new("chmod")
        .arg("0777")
        .arg(&root)
        .status()
        .ok();
    let kernel = root.join("counter.elf");
    std::fs::write(&kernel, elf64(&MEMORY_COUNTER)).expect("payload");
    for mib in SIZES_MIB {
        let (mut paused, mut write, mut restore) = (Vec::new(), Vec::new(), Vec::new());
        let mut info = SnapshotInfo::default();
        for run in 0..RUNS {
            let dir = root.join(format!("{mib}-{run}"));
            std::fs::create_dir_all(&dir).expect("run directory");
            std::process::Command::new("chmod")
                .arg("0777")
                .arg(&dir)
                .status()
                .ok();
            let log = dir.join("console.log");
            let socket = dir.join("control.sock");
            let config = dir.join("vm.json");
            let json = serde_json::json!({
                "name": "bench", "vcpus": 1, "memory_mib": mib, "kernel": kernel,
                "serial_log": log, "control_socket": socket,
            });
            std::fs::write(&config, json.to_string()).expect("config");
            let snap = dir.join("snap");
            {
                let _guest = start(&vmm, &config, None);
                wait("the first count", LIMIT, || {
                    std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 2)
                });
                let req = VmmRequest::Snapshot {
                    dir: snap.to_string_lossy().into_owned(),
                };
                match ask(&socket, &req) {
                    Some(VmmResponse::Snapshot { snapshot }) => info = snapshot,
                    other => panic!("snapshot answered {other:?}"),
                }
                paused.push(info.paused_ms as f64);
                write.push(info.write_ms as f64);
            }
            let _ = std::fs::remove_file(&socket);
            let started = Instant::now();
            let _restored = start(&vmm, &config, Some(&snap));
            wait("the restored VMM's answer", LIMIT, || {
                matches!(
                    ask(&socket, &VmmRequest::Describe),
                    Some(VmmResponse::Description { .. })
                )
            });
            restore.push(started.elapsed().as_secs_f64() * 1000.0);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let size = if mib >= 1024 {
            format!("{}gib", mib / 1024)
        } else {
            format!("{mib}mib")
        };
        println!("snapshot_{size}_paused_ms: {:.0}", median(paused));
        println!("snapshot_{size}_write_ms: {:.0}", median(write));
        println!(
            "snapshot_{size}_written_kib: {}",
            info.memory_written_bytes / 1024
        );
        println!("snapshot_{size}_file_mib: {}", info.memory_bytes >> 20);
        println!("restore_{size}_ms: {:.1}", median(restore));
    }
    let _ = std::fs::remove_dir_all(&root);
}
