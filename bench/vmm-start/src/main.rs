//! Runs the release `hvnode-vmm` with a tiny 64-bit payload on the host's /dev/kvm and prints:
//! - `vmm_start_median_ms` (and p90, min): process spawn to the guest's first serial byte, over
//!   25 runs;
//! - `vmm_overhead_kib`: the VMM's resident memory minus the guest pages it touched;
//! - run as root, the same for a jailed VMM, started as the agent starts it (its cgroup made,
//!   cloned into it and into a PID namespace of its own, a `jail` in its config: mount and IPC
//!   namespaces, pivot_root, its own uid), runs alternating with the unjailed ones:
//!   `vmm_start_jailed_median_ms` (p90, min), `jail_cost_median_ms` (the difference of the
//!   medians) and `cgroup_create_median_ms` (making the cgroup, inside the jailed figure).
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvnode_base::cgroup::{Cgroup, Limits};
use hvnode_base::spawn::{Spawn, Stdio as SpawnStdio};
use hvnode_vmm::payload::{elf64, serial_print, SPIN};

const RUNS: usize = 25;
const GUEST_MIB: u64 = 256;
/// The jailed VMM's uid: a slot far above what a node's agent hands out first.
const BENCH_ID: u32 = hvnode_api::vmm::JAIL_ID_BASE + 65_000;

fn config(dir: &Path, kernel: &Path, log: &Path, jailed: bool) -> String {
    let mut c = serde_json::json!({
        "name": "bench", "vcpus": 1, "memory_mib": GUEST_MIB,
        "kernel": kernel, "serial_log": log,
        "control_socket": dir.join("control.sock"),
    });
    if jailed {
        c["jail"] = serde_json::json!({"uid": BENCH_ID, "gid": BENCH_ID});
    }
    c.to_string()
}

/// A started VMM, killed and reaped (and its cgroup removed) when dropped.
enum Started {
    Plain(std::process::Child),
    Jailed(hvnode_base::spawn::Child, Cgroup),
}

impl Started {
    fn id(&self) -> u32 {
        match self {
            Started::Plain(c) => c.id(),
            Started::Jailed(c, _) => c.id(),
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        match self {
            Started::Plain(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Started::Jailed(c, cgroup) => {
                let _ = c.kill();
                let _ = c.wait();
                let _ = cgroup.remove();
            }
        }
    }
}

/// Starts the VMM, jailed or not; for a jailed one also returns how long its cgroup took.
fn start(vmm: &Path, config: &str, jailed: bool) -> (Started, Duration) {
    if !jailed {
        let child = Command::new(vmm)
            .args(["--config-json", config])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn hvnode-vmm");
        return (Started::Plain(child), Duration::ZERO);
    }
    let t = Instant::now();
    let limits = Limits {
        memory_bytes: (GUEST_MIB + 128) << 20,
        cpu_quota_us: 150_000,
        pids: 65,
    };
    let cgroup = Cgroup::create("hvnode-bench", "vmm-start", &limits).expect("the guest's cgroup");
    let made = t.elapsed();
    let child = Spawn::new(vmm)
        .args(["--config-json", config])
        .stderr(SpawnStdio::Null)
        .new_pid_namespace()
        .cgroup(&cgroup)
        .spawn()
        .expect("spawn the jailed hvnode-vmm");
    (Started::Jailed(child, cgroup), made)
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
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root {
        eprintln!("note: not root: the jailed figures need root and are left out");
    }
    let mut times = Vec::new();
    let mut overhead = Vec::new();
    let mut jailed_times = Vec::new();
    let mut jailed_overhead = Vec::new();
    let mut cgroup_times = Vec::new();
    // Alternating, so that both see the same host.
    let order = (0..RUNS).flat_map(|i| [(i, false), (i, true)]);
    for (i, jailed) in order.filter(|&(_, j)| root || !j) {
        let log = dir.join(format!("console-{i}-{jailed}.log"));
        let cfg = config(&dir, &kernel, &log, jailed);
        let began = Instant::now();
        let (child, cgroup_time) = start(&vmm, &cfg, jailed);
        let (times, overhead) = if jailed {
            cgroup_times.push(cgroup_time);
            (&mut jailed_times, &mut jailed_overhead)
        } else {
            (&mut times, &mut overhead)
        };
        loop {
            if std::fs::metadata(&log)
                .map(|m| m.len() > 0)
                .unwrap_or(false)
            {
                times.push(began.elapsed());
                break;
            }
            assert!(
                began.elapsed() < Duration::from_secs(10),
                "no serial output within 10 s"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        if let Some((total, guest)) = smaps_guest_rss_kib(child.id()) {
            overhead.push(total.saturating_sub(guest));
        }
        drop(child);
    }
    times.sort();
    overhead.sort();
    jailed_times.sort();
    jailed_overhead.sort();
    cgroup_times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("vmm_start_runs: {RUNS}");
    println!("vmm_start_median_ms: {:.2}", ms(times[RUNS / 2]));
    println!("vmm_start_p90_ms: {:.2}", ms(times[RUNS * 9 / 10]));
    println!("vmm_start_min_ms: {:.2}", ms(times[0]));
    if let Some(o) = overhead.get(overhead.len() / 2) {
        println!("vmm_overhead_kib: {o}");
    }
    if root {
        let median = ms(jailed_times[RUNS / 2]);
        println!("vmm_start_jailed_median_ms: {median:.2}");
        println!(
            "vmm_start_jailed_p90_ms: {:.2}",
            ms(jailed_times[RUNS * 9 / 10])
        );
        println!("vmm_start_jailed_min_ms: {:.2}", ms(jailed_times[0]));
        println!("jail_cost_median_ms: {:.2}", median - ms(times[RUNS / 2]));
        println!("cgroup_create_median_ms: {:.2}", ms(cgroup_times[RUNS / 2]));
        if let Some(o) = jailed_overhead.get(jailed_overhead.len() / 2) {
            println!("vmm_jailed_overhead_kib: {o}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
