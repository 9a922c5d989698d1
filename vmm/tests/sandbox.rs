//! The run-phase sandbox of a real `hvnode-vmm` on /dev/kvm, seen from outside through
//! /proc: every thread filtered, no_new_privs, and (when started as root) nobody with no
//! capabilities. The KVM tests in kvm.rs run the whole VMM inside it. Where /dev/kvm is
//! missing they say so and pass.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvnode_vmm::payload::{elf64, serial_print, SPIN};
use hvnode_vmm::seccomp::{DISABLE_ENV, UNPRIVILEGED_ID};

mod common;
use common::{kvm_usable, scratch, Vmm};

/// Starts a 2-vCPU guest that prints "up" and spins, with `env` set for the VMM.
fn start(dir: &Path, env: &[(&str, &str)]) -> Vmm {
    let mut code = serial_print("up\n");
    code.extend_from_slice(&SPIN);
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf64(&code)).unwrap();
    let cfg = serde_json::json!({
        "name": "sandboxed",
        "vcpus": 2,
        "memory_mib": 64,
        "kernel": kernel,
        "serial_log": dir.join("console.log"),
        "control_socket": dir.join("control.sock"),
        "exit_file": dir.join("exit.json"),
    });
    Vmm::spawn(
        Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
            .args(["--config-json", &cfg.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
}

fn wait_for_up(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(dir.join("console.log")).unwrap_or_default() != "up\n" {
        assert!(Instant::now() < deadline, "the guest never printed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ask(dir: &Path, req: &str) -> serde_json::Value {
    let sock = UnixStream::connect(dir.join("control.sock")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    writeln!(&sock, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(&sock).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// The `Name:\tvalue` lines of /proc/PID/task/TID/status, for every thread of `pid`. A thread
/// that ends during the scan (a control client's, say) is left out.
fn thread_status(pid: u32) -> Vec<Vec<(String, String)>> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
                .collect()
        })
        .collect()
}

fn field<'a>(status: &'a [(String, String)], name: &str) -> &'a str {
    status
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {status:?}"))
}

fn stop(mut vmm: Vmm, dir: &Path) -> String {
    assert_eq!(ask(dir, r#"{"op":"stop"}"#)["result"], "ok");
    let mut stderr = Vec::new();
    let mut pipe = vmm.stderr.take().expect("stderr piped");
    pipe.read_to_end(&mut stderr).unwrap();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    assert_eq!(vmm.wait().unwrap().code(), Some(0), "{stderr}");
    let exit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("exit.json")).unwrap()).unwrap();
    assert_eq!(exit["code"], 0, "{exit}");
    stderr
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered_unprivileged_and_without_capabilities() {
    if !kvm_usable(
        "every_thread_of_a_running_vmm_is_filtered_unprivileged_and_without_capabilities",
    ) {
        return;
    }
    let dir = scratch("on");
    let child = start(&dir, &[]);
    wait_for_up(&dir);
    // A control client thread, started after the filter, and /proc/self/statm read through
    // the descriptor opened at set-up.
    let stats = ask(&dir, r#"{"op":"stats"}"#);
    assert!(stats["stats"]["rss_bytes"].as_u64().unwrap() > 0, "{stats}");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let threads = thread_status(child.id());
    // main, the control and signal threads, two vCPUs.
    assert!(threads.len() >= 5, "{} threads", threads.len());
    for t in &threads {
        let name = field(t, "Name");
        assert_eq!(field(t, "Seccomp"), "2", "{name}: not in filter mode");
        assert_eq!(field(t, "Seccomp_filters"), "2", "{name}");
        assert_eq!(field(t, "NoNewPrivs"), "1", "{name}");
        if root {
            let id = UNPRIVILEGED_ID.to_string();
            let ids = [id.as_str(); 4].join("\t");
            assert_eq!(field(t, "Uid"), ids, "{name}");
            assert_eq!(field(t, "Gid"), ids, "{name}");
            assert_eq!(field(t, "Groups"), "", "{name}");
            for caps in ["CapEff", "CapPrm", "CapAmb", "CapBnd"] {
                assert_eq!(field(t, caps), "0000000000000000", "{name}: {caps}");
            }
        }
    }
    if root {
        // Undumpable since it changed uid: its /proc files stay root's, no core file of guest
        // memory, no ptrace by another process of uid 65534.
        let owner = std::fs::metadata(format!("/proc/{}/status", child.id()))
            .unwrap()
            .uid();
        assert_eq!(owner, 0);
    }
    stop(child, &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hvnode_vmm_seccomp_0_leaves_the_filter_off_and_says_so() {
    if !kvm_usable("hvnode_vmm_seccomp_0_leaves_the_filter_off_and_says_so") {
        return;
    }
    let dir = scratch("off");
    let child = start(&dir, &[(DISABLE_ENV, "0")]);
    wait_for_up(&dir);
    for t in thread_status(child.id()) {
        assert_eq!(field(&t, "Seccomp"), "0", "{}", field(&t, "Name"));
    }
    let stderr = stop(child, &dir);
    assert!(
        stderr.contains("HVNODE_VMM_SECCOMP=0: running without the seccomp filter"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
