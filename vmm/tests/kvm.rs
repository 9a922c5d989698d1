//! Host KVM integration tests: tiny 64-bit payloads assembled here, run by the real
//! `hvnode-vmm` binary on /dev/kvm. Where /dev/kvm is missing or unusable they say so and pass.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kvm_usable(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("skipping {test}: /dev/kvm not available");
    }
    ok
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvnode-vmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

use hvnode_vmm::payload::{elf64 as elf, serial_print as print, RESET, SPIN};

fn config(dir: &Path, kernel: &Path) -> String {
    serde_json::json!({
        "name": "payload",
        "vcpus": 1,
        "memory_mib": 64,
        "kernel": kernel,
        "serial_log": dir.join("console.log"),
        "control_socket": dir.join("control.sock"),
    })
    .to_string()
}

#[test]
fn payload_prints_to_the_serial_port_and_resets_through_the_i8042() {
    if !kvm_usable("payload_prints_to_the_serial_port_and_resets_through_the_i8042") {
        return;
    }
    let dir = scratch("hello");
    let mut code = print("hello from hvnode\n");
    code.extend_from_slice(&RESET);
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(&code)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
        .args(["--config-json", &config(&dir, &kernel)])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert_eq!(log, "hello from hvnode\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn control_socket_describes_counts_refuses_bad_requests_and_stops() {
    if !kvm_usable("control_socket_describes_counts_refuses_bad_requests_and_stops") {
        return;
    }
    let dir = scratch("control");
    let mut code = print("up\n");
    code.extend_from_slice(&SPIN);
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(&code)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
        .args(["--config-json", &config(&dir, &kernel)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let sock = loop {
        if let Ok(s) = UnixStream::connect(dir.join("control.sock")) {
            break s;
        }
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut w = sock.try_clone().unwrap();
    let mut r = BufReader::new(sock);
    let mut ask = |req: &str| {
        writeln!(w, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let d = ask(r#"{"op":"describe"}"#);
    assert_eq!(
        (d["result"].as_str(), d["state"].as_str()),
        (Some("description"), Some("running"))
    );
    let s = ask(r#"{"op":"stats"}"#);
    assert!(
        s["stats"]["vcpu_exits"][0]["io"].as_u64().unwrap() >= 3,
        "{s}"
    );
    assert_eq!(s["stats"]["memory_bytes"], 64 << 20);
    assert_eq!(ask("nonsense")["code"], "bad_request");
    assert_eq!(ask(r#"{"op":"pause"}"#)["code"], "unsupported");
    assert_eq!(ask(r#"{"op":"stop"}"#)["result"], "ok");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(dir.join("console.log")).unwrap(),
        "up\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_bad_configurations_with_exit_code_1() {
    let dir = scratch("badcfg");
    let cfg =
        serde_json::json!({"name": "x", "vcpus": 0, "memory_mib": 64, "kernel": "/nonexistent"})
            .to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
        .args(["--config-json", &cfg])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vcpus 0"));
    let out = Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
        .args(["--config-json", "{"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}
