//! Runs the release `hvnode-vmm` with a tiny 64-bit payload on the host's /dev/kvm and prints:
//! - `vmm_start_median_ms` (and p90, min): process spawn to the guest's first serial byte, over
//!   25 runs;
//! - `vmm_overhead_kib`: the VMM's resident memory minus the guest pages it touched.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvnode_vmm::payload::{elf64, serial_print, SPIN};

const RUNS: usize = 25;
const GUEST_MIB: u64 = 256;

fn config(dir: &Path, kernel: &Path, log: &Path) -> String {
    serde_json::json!({
        "name": "bench", "vcpus": 1, "memory_mib": GUEST_MIB,
        "kernel": kernel, "serial_log": log,
        "control_socket": dir.join("control.sock"),
    })
    .to_string()
}

fn smaps_guest_rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest, mut in_guest) = (0u64, 0u64, false);
    for line in text.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            let kib: u64 = size.trim().trim_end_matches(" kB").trim().parse().ok()?;
            in_guest = kib == GUEST_MIB * 1024;
        } else if let Some(rss) = line.strip_prefix("Rss:") {
            let kib: u64 = rss.trim().trim_end_matches(" kB").trim().parse().ok()?;
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    Some((total, guest))
}

fn main() {
    let vmm = hvnode_bench_common::vmm_binary();
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("error: /dev/kvm is not available");
        std::process::exit(1);
    }
    let dir = std::env::temp_dir().join(format!("hvnode-bench-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let kernel = dir.join("payload.elf");
    let mut code = serial_print("!");
    code.extend_from_slice(&SPIN);
    std::fs::write(&kernel, elf64(&code)).expect("payload");
    let mut times = Vec::new();
    let mut overhead = Vec::new();
    for i in 0..RUNS {
        let log = dir.join(format!("console-{i}.log"));
        let start = Instant::now();
        let mut child = Command::new(&vmm)
            .args(["--config-json", &config(&dir, &kernel, &log)])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn hvnode-vmm");
        loop {
            if std::fs::metadata(&log)
                .map(|m| m.len() > 0)
                .unwrap_or(false)
            {
                times.push(start.elapsed());
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no serial output within 10 s"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        if let Some((total, guest)) = smaps_guest_rss_kib(child.id()) {
            overhead.push(total.saturating_sub(guest));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    times.sort();
    overhead.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("vmm_start_runs: {RUNS}");
    println!("vmm_start_median_ms: {:.2}", ms(times[RUNS / 2]));
    println!("vmm_start_p90_ms: {:.2}", ms(times[RUNS * 9 / 10]));
    println!("vmm_start_min_ms: {:.2}", ms(times[0]));
    if let Some(o) = overhead.get(overhead.len() / 2) {
        println!("vmm_overhead_kib: {o}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
