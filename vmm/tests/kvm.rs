//! Host KVM integration tests: tiny 64-bit payloads assembled here, run by the real
//! `hvnode-vmm` binary on /dev/kvm. Where /dev/kvm is missing or unusable they say so and pass.

use std::io::{BufRead, BufReader, Read, Write};
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

use hvnode_vmm::payload::{
    elf64 as elf, serial_print as print, COUNTER, RESET, SCANCODE_ECHO, SPIN,
};

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
    let unknown = ask(r#"{"op":"frobnicate"}"#);
    assert_eq!(unknown["code"], "bad_request");
    assert!(
        unknown["message"].as_str().unwrap().contains("frobnicate"),
        "{unknown}"
    );
    assert_eq!(ask(r#"{"op":"resume"}"#)["code"], "invalid_state");
    // A line over 64 KiB is refused and that connection closed; the next client is served.
    let mut big = UnixStream::connect(dir.join("control.sock")).unwrap();
    let mut line = vec![b' '; 70 << 10];
    line.push(b'\n');
    let _ = big.write_all(&line);
    let mut answer = String::new();
    BufReader::new(&big).read_to_string(&mut answer).unwrap();
    let answer: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(answer["code"], "bad_request", "{answer}");
    let mut next = Control::connect(&dir);
    assert_eq!(next.ask(r#"{"op":"describe"}"#)["state"], "running");
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

/// A client of a VMM's control socket.
struct Control {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Control {
    fn connect(dir: &Path) -> Control {
        let deadline = Instant::now() + Duration::from_secs(20);
        let sock = loop {
            if let Ok(s) = UnixStream::connect(dir.join("control.sock")) {
                break s;
            }
            assert!(Instant::now() < deadline, "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        };
        Control {
            w: sock.try_clone().unwrap(),
            r: BufReader::new(sock),
        }
    }

    fn ask(&mut self, req: &str) -> serde_json::Value {
        writeln!(self.w, "{req}").unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

/// Starts the VMM on `code` with the test config plus an exit file, on `vcpus` vCPUs (each
/// runs `code`).
fn start(dir: &Path, code: &[u8], vcpus: u32) -> std::process::Child {
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(code)).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&config(dir, &kernel)).unwrap();
    cfg["exit_file"] = dir.join("exit.json").to_str().unwrap().into();
    cfg["vcpus"] = vcpus.into();
    Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
        .args(["--config-json", &cfg.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("console.log"))
        .map(|m| m.len())
        .unwrap_or(0)
}

fn wait_for_log(dir: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log =
            String::from_utf8_lossy(&std::fs::read(dir.join("console.log")).unwrap_or_default())
                .into_owned();
        if done(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "{what}: console log is {log:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to `limit` for the VMM to exit; its exit code and the exit file.
fn wait_exit(
    child: &mut std::process::Child,
    dir: &Path,
    limit: Duration,
) -> (i32, serde_json::Value) {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the VMM did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let exit = std::fs::read(dir.join("exit.json")).expect("exit file");
    (
        status.code().unwrap_or(-1),
        serde_json::from_slice(&exit).unwrap(),
    )
}

#[test]
fn pause_parks_the_vcpus_and_resume_lets_them_run_again() {
    if !kvm_usable("pause_parks_the_vcpus_and_resume_lets_them_run_again") {
        return;
    }
    let dir = scratch("pause");
    let mut child = start(&dir, &COUNTER, 2);
    let mut ctl = Control::connect(&dir);
    wait_for_log(&dir, "counter started", |l| l.len() >= 2);
    assert_eq!(ctl.ask(r#"{"op":"pause"}"#)["result"], "ok");
    assert_eq!(ctl.ask(r#"{"op":"describe"}"#)["state"], "paused");
    let paused_at = log_len(&dir);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(log_len(&dir), paused_at, "the guest ran while paused");
    assert_eq!(ctl.ask(r#"{"op":"pause"}"#)["code"], "invalid_state");
    let stats = ctl.ask(r#"{"op":"stats"}"#);
    for vcpu in 0..2 {
        let kicks = &stats["stats"]["vcpu_exits"][vcpu]["interrupted"];
        assert!(kicks.as_u64().unwrap() >= 1, "{stats}");
    }
    assert_eq!(ctl.ask(r#"{"op":"resume"}"#)["result"], "ok");
    assert_eq!(ctl.ask(r#"{"op":"describe"}"#)["state"], "running");
    wait_for_log(&dir, "counter resumed", |l| l.len() as u64 > paused_at + 2);
    assert_eq!(ctl.ask(r#"{"op":"resume"}"#)["code"], "invalid_state");
    assert_eq!(ctl.ask(r#"{"op":"stop"}"#)["result"], "ok");
    let (code, exit) = wait_exit(&mut child, &dir, Duration::from_secs(10));
    assert_eq!(code, 0);
    assert_eq!(exit["code"], 0);
    assert_eq!(exit["reason"], "stopped by a control request");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_presses_ctrl_alt_del_and_the_reset_after_it_is_a_power_off() {
    if !kvm_usable("shutdown_presses_ctrl_alt_del_and_the_reset_after_it_is_a_power_off") {
        return;
    }
    let dir = scratch("shutdown");
    let mut child = start(&dir, &SCANCODE_ECHO, 1);
    let mut ctl = Control::connect(&dir);
    // The controller self test answered: the guest is polling the keyboard now.
    wait_for_log(&dir, "self test", |l| l == "55 ");
    assert_eq!(ctl.ask(r#"{"op":"shutdown"}"#)["result"], "ok");
    let (code, exit) = wait_exit(&mut child, &dir, Duration::from_secs(10));
    assert_eq!(
        std::fs::read_to_string(dir.join("console.log")).unwrap(),
        "55 1D 38 53 "
    );
    assert_eq!(code, 0, "a reset after shutdown must not be a reboot");
    assert_eq!(
        exit,
        serde_json::json!({"code": 0, "reason": "guest powered off"})
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_timeout_stops_a_guest_that_ignores_ctrl_alt_del() {
    if !kvm_usable("shutdown_timeout_stops_a_guest_that_ignores_ctrl_alt_del") {
        return;
    }
    let dir = scratch("shutdown-timeout");
    let mut code = print("up\n");
    code.extend_from_slice(&SPIN);
    let mut child = start(&dir, &code, 1);
    let mut ctl = Control::connect(&dir);
    let asked = Instant::now();
    let ok = ctl.ask(r#"{"op":"shutdown","timeout_secs":1}"#);
    assert_eq!(ok["result"], "ok");
    assert_eq!(ctl.ask(r#"{"op":"describe"}"#)["state"], "stopping");
    assert_eq!(ctl.ask(r#"{"op":"pause"}"#)["code"], "invalid_state");
    let (code, exit) = wait_exit(&mut child, &dir, Duration::from_secs(10));
    assert!(asked.elapsed() >= Duration::from_secs(1));
    assert_eq!(code, 0);
    assert_eq!(
        exit["reason"],
        "stopped: the guest did not shut down within 1 s"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_shuts_the_guest_down_and_sigint_stops_it() {
    if !kvm_usable("sigterm_shuts_the_guest_down_and_sigint_stops_it") {
        return;
    }
    let dir = scratch("sigterm");
    let mut child = start(&dir, &SCANCODE_ECHO, 1);
    wait_for_log(&dir, "self test", |l| l == "55 ");
    // SAFETY: kill has no memory preconditions; the pid is our child's, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let (code, exit) = wait_exit(&mut child, &dir, Duration::from_secs(10));
    assert_eq!((code, &exit["reason"]), (0, &"guest powered off".into()));
    assert!(std::fs::read_to_string(dir.join("console.log"))
        .unwrap()
        .ends_with("53 "));

    let dir = scratch("sigint");
    let mut child = start(&dir, &SPIN, 1);
    let _ctl = Control::connect(&dir);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let (code, exit) = wait_exit(&mut child, &dir, Duration::from_secs(10));
    assert_eq!((code, &exit["reason"]), (0, &"stopped by SIGINT".into()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exit_file_reports_setup_errors_with_code_1() {
    let dir = scratch("exit-setup");
    let exit_file = dir.join("exit.json");
    for cfg in [
        // Valid, but the kernel is missing: fails during setup.
        serde_json::json!({"name": "x", "vcpus": 1, "memory_mib": 64,
            "kernel": dir.join("missing.elf"), "exit_file": exit_file}),
        // Not a valid VmConfig at all, yet it names the exit file.
        serde_json::json!({"name": "x", "vcpus": "many", "exit_file": exit_file}),
    ] {
        let _ = std::fs::remove_file(&exit_file);
        let out = Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
            .args(["--config-json", &cfg.to_string()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let exit: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&exit_file).unwrap()).unwrap();
        assert_eq!(exit["code"], 1, "{exit}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(exit["reason"].as_str().unwrap()),
            "{stderr} vs {exit}"
        );
    }
    assert!(!std::fs::read_dir(&dir).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));
    let _ = std::fs::remove_dir_all(&dir);
}
