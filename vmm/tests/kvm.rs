//! Host KVM integration tests: tiny 64-bit payloads assembled here, run by the real
//! `hvnode-vmm` binary on /dev/kvm. Where /dev/kvm is missing or unusable they say so and pass.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;
use common::{kvm_usable, scratch, Vmm};

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

/// How long a VMM that should end by itself may take, on a loaded machine too.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// Reads all of `pipe` on a thread of its own, so that a VMM writing more than a pipe holds
/// never blocks.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Runs the VMM to its end as [`Command::output`] does, except that one still running after
/// [`RUN_LIMIT`] fails the test (and is killed) instead of hanging it.
fn run_to_end(cmd: &mut Command) -> Output {
    let mut vmm = Vmm::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let stdout = drain(vmm.stdout.take().expect("stdout piped"));
    let stderr = drain(vmm.stderr.take().expect("stderr piped"));
    let status = wait_status(&mut vmm, RUN_LIMIT);
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
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
    let out = run_to_end(
        Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
            .args(["--config-json", &config(&dir, &kernel)]),
    );
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
    let mut child = Vmm::spawn(
        Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
            .args(["--config-json", &config(&dir, &kernel)])
            .stderr(Stdio::piped()),
    );
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
    // The socket answers as soon as the VMM is up, possibly before the vCPU has run the
    // payload's three OUTs: wait for their output, and for them to be counted.
    wait_for_log(&dir, "payload output", |l| l == "up\n");
    let io_exits = |s: &serde_json::Value| s["stats"]["vcpu_exits"][0]["io"].as_u64().unwrap();
    let deadline = Instant::now() + RUN_LIMIT;
    let s = loop {
        let s = ask(r#"{"op":"stats"}"#);
        if io_exits(&s) >= 3 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(io_exits(&s) >= 3, "{s}");
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
    let status = wait_status(&mut child, RUN_LIMIT);
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
    let out =
        run_to_end(Command::new(env!("CARGO_BIN_EXE_hvnode-vmm")).args(["--config-json", &cfg]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vcpus 0"));
    let out =
        run_to_end(Command::new(env!("CARGO_BIN_EXE_hvnode-vmm")).args(["--config-json", "{"]));
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
fn start(dir: &Path, code: &[u8], vcpus: u32) -> Vmm {
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(code)).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&config(dir, &kernel)).unwrap();
    cfg["exit_file"] = dir.join("exit.json").to_str().unwrap().into();
    cfg["vcpus"] = vcpus.into();
    Vmm::spawn(
        Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
            .args(["--config-json", &cfg.to_string()])
            .stderr(Stdio::piped()),
    )
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

/// Waits up to `limit` for the VMM to exit; its status. The caller's [`Vmm`] kills one that
/// did not.
fn wait_status(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the VMM did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to `limit` for the VMM to exit; its exit code and the exit file.
fn wait_exit(child: &mut Child, dir: &Path, limit: Duration) -> (i32, serde_json::Value) {
    let status = wait_status(child, limit);
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
    // The second vCPU never leaves KVM_RUN by itself (it waits in the kernel), so only the
    // kick can have parked it. The first one exits for every character it prints and may meet
    // the pause at the gate between two runs, without a kick: the log standing still says it
    // is parked.
    let kicks = &stats["stats"]["vcpu_exits"][1]["interrupted"];
    assert!(kicks.as_u64().unwrap() >= 1, "{stats}");
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
fn shutdown_of_a_paused_guest_resumes_it_first() {
    if !kvm_usable("shutdown_of_a_paused_guest_resumes_it_first") {
        return;
    }
    let dir = scratch("shutdown-paused");
    let mut child = start(&dir, &SCANCODE_ECHO, 1);
    let mut ctl = Control::connect(&dir);
    wait_for_log(&dir, "self test", |l| l == "55 ");
    assert_eq!(ctl.ask(r#"{"op":"pause"}"#)["result"], "ok");
    assert_eq!(ctl.ask(r#"{"op":"shutdown"}"#)["result"], "ok");
    let (code, exit) = wait_exit(&mut child, &dir, Duration::from_secs(10));
    assert_eq!((code, &exit["reason"]), (0, &"guest powered off".into()));
    assert_eq!(
        std::fs::read_to_string(dir.join("console.log")).unwrap(),
        "55 1D 38 53 "
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
        let out = run_to_end(
            Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
                .args(["--config-json", &cfg.to_string()]),
        );
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

/// Base of the first virtio-mmio window (`hvnode_vmm::devices::bus::MMIO_BASE`).
const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;

/// Code that prints, for the virtio-mmio window at `base`, the four bytes of its MagicValue
/// register as characters ("virt"), then '0' + Version and '0' + DeviceID, then a newline.
fn print_virtio_window(base: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xbe]; // mov rsi, imm64
    code.extend_from_slice(&base.to_le_bytes());
    code.extend_from_slice(&[
        0x8b, 0x06, // mov eax, [rsi]          MagicValue
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al                     byte 0
        0xc1, 0xe8, 0x08, // shr eax, 8
        0xee, // out dx, al                     byte 1
        0xc1, 0xe8, 0x08, // shr eax, 8
        0xee, // out dx, al                     byte 2
        0xc1, 0xe8, 0x08, // shr eax, 8
        0xee, // out dx, al                     byte 3
        0x8b, 0x46, 0x04, // mov eax, [rsi+4]   Version
        0x04, 0x30, // add al, '0'
        0xee, // out dx, al
        0x8b, 0x46, 0x08, // mov eax, [rsi+8]   DeviceID
        0x04, 0x30, // add al, '0'
        0xee, // out dx, al
        0xb0, 0x0a, // mov al, '\n'
        0xee, // out dx, al
    ]);
    code
}

/// A tap for the test, if this process may create one (root and /dev/net/tun present).
fn throwaway_tap() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/net/tun").exists() {
        eprintln!("virtio-net window not tested: needs root and /dev/net/tun");
        return None;
    }
    // The VMM creates it; it goes away with the VMM's fd (not persistent). Tests run in parallel
    // threads of one process, so the pid alone does not make the name unique.
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Some(format!("hvt{}x{n}", std::process::id() % 1_000_000))
}

#[test]
fn payload_reads_the_virtio_mmio_identity_of_every_device() {
    if !kvm_usable("payload_reads_the_virtio_mmio_identity_of_every_device") {
        return;
    }
    let dir = scratch("virtio-ids");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let tap = throwaway_tap();
    let mut expected = vec!["virt22"];
    let mut nets = vec![];
    if let Some(tap) = &tap {
        expected.push("virt21");
        nets.push(serde_json::json!({"tap": tap, "mac": "52:54:00:12:34:56"}));
    }
    expected.push("virt24");
    let mut code = Vec::new();
    for i in 0..expected.len() as u64 {
        code.extend(print_virtio_window(VIRTIO_MMIO_BASE + i * 0x1000));
    }
    code.extend_from_slice(&RESET);
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(&code)).unwrap();
    let cfg = serde_json::json!({
        "name": "virtio-ids",
        "vcpus": 1,
        "memory_mib": 64,
        "kernel": kernel,
        "serial_log": dir.join("console.log"),
        "disks": [{"path": disk, "read_only": true}],
        "nets": nets,
        "rng": true,
    })
    .to_string();
    let out =
        run_to_end(Command::new(env!("CARGO_BIN_EXE_hvnode-vmm")).args(["--config-json", &cfg]));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(dir.join("console.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines, expected,
        "magic 0x74726976 (\"virt\"), version 2, device id"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_a_disk_image_of_partial_sectors_naming_it() {
    let dir = scratch("oddisk");
    let disk = dir.join("odd-size.img");
    std::fs::write(&disk, vec![0u8; 1000]).unwrap();
    let cfg = serde_json::json!({
        "name": "x", "vcpus": 1, "memory_mib": 64, "kernel": "/nonexistent",
        "disks": [{"path": disk}],
    })
    .to_string();
    let out =
        run_to_end(Command::new(env!("CARGO_BIN_EXE_hvnode-vmm")).args(["--config-json", &cfg]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("odd-size.img") && err.contains("multiple of 512"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hand-assembled driver steps for [`payload_drives_virtio_rng_and_blk_queues_and_stats_count_them`]. Guest RAM
/// addresses stay below 2 GiB so that an absolute disp32 reaches them; device registers are
/// addressed through `rsi`, which holds the window base (a disp32 of 0xd000_0000 would be
/// sign-extended).
mod asm {
    /// `mov rsi, base`.
    pub fn window(base: u64) -> Vec<u8> {
        let mut c = vec![0x48, 0xbe];
        c.extend_from_slice(&base.to_le_bytes());
        c
    }

    /// `mov dword [rsi + reg], value`: a device register write.
    pub fn reg_write(reg: u32, value: u32) -> Vec<u8> {
        let mut c = vec![0xc7, 0x86];
        c.extend_from_slice(&reg.to_le_bytes());
        c.extend_from_slice(&value.to_le_bytes());
        c
    }

    /// `mov dword [addr], value`: a guest RAM write.
    pub fn store32(addr: u32, value: u32) -> Vec<u8> {
        let mut c = vec![0xc7, 0x04, 0x25];
        c.extend_from_slice(&addr.to_le_bytes());
        c.extend_from_slice(&value.to_le_bytes());
        c
    }

    /// `mov word [addr], value`.
    pub fn store16(addr: u32, value: u16) -> Vec<u8> {
        let mut c = vec![0x66, 0xc7, 0x04, 0x25];
        c.extend_from_slice(&addr.to_le_bytes());
        c.extend_from_slice(&value.to_le_bytes());
        c
    }

    /// `pause; cmp word [addr], 0; je <back to pause>`: spins until the word is non-zero.
    pub fn wait_nonzero16(addr: u32) -> Vec<u8> {
        let mut c = vec![0xf3, 0x90, 0x66, 0x83, 0x3c, 0x25];
        c.extend_from_slice(&addr.to_le_bytes());
        // imm8 0, then je rel8 back over the 2 + 9 + 2 bytes of the loop.
        c.extend_from_slice(&[0x00, 0x74, 0xf3]);
        c
    }

    /// `mov al, [addr]; add al, offset; mov dx, 0x3f8; out dx, al`: prints a guest byte.
    pub fn print_byte(addr: u32, offset: u8) -> Vec<u8> {
        let mut c = vec![0x8a, 0x04, 0x25];
        c.extend_from_slice(&addr.to_le_bytes());
        c.extend_from_slice(&[0x04, offset, 0x66, 0xba, 0xf8, 0x03, 0xee]);
        c
    }

    /// A split-queue descriptor at `table + 16 * index`.
    pub fn descriptor(
        table: u32,
        index: u32,
        addr: u32,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Vec<u8> {
        let d = table + 16 * index;
        let mut c = store32(d, addr);
        c.extend(store32(d + 4, 0));
        c.extend(store32(d + 8, len));
        c.extend(store32(d + 12, u32::from(flags) | (u32::from(next) << 16)));
        c
    }

    /// The virtio 1.x driver start-up with queue `i` of 4 entries at `queues[i]` (descriptor
    /// table, available ring, used ring), ending with DRIVER_OK.
    pub fn start_device(base: u64, queues: &[(u32, u32, u32)]) -> Vec<u8> {
        let mut c = window(base);
        for (reg, value) in [
            (0x70, 1),   // Status: ACKNOWLEDGE
            (0x70, 3),   // Status: DRIVER
            (0x24, 1),   // DriverFeaturesSel: bits 32-63
            (0x20, 1),   // DriverFeatures: VIRTIO_F_VERSION_1
            (0x70, 0xb), // Status: FEATURES_OK
        ] {
            c.extend(reg_write(reg, value));
        }
        for (i, &(desc, avail, used)) in queues.iter().enumerate() {
            for (reg, value) in [
                (0x30, i as u32), // QueueSel
                (0x38, 4),        // QueueNum
                (0x80, desc),
                (0x84, 0),
                (0x90, avail),
                (0x94, 0),
                (0xa0, used),
                (0xa4, 0),
                (0x44, 1), // QueueReady
            ] {
                c.extend(reg_write(reg, value));
            }
        }
        c.extend(reg_write(0x70, 0xf)); // Status: DRIVER_OK
        c
    }

    /// Sends descriptor 0 on the transmit queue (1, rings at 0x23_1000 and 0x23_2000) forever,
    /// with `rsi` at the device window:
    ///
    /// ```text
    /// 1:  inc word [0x231002]             ; avail idx: one more chain (every ring entry is 0)
    ///     mov dword [rsi + 0x50], 1       ; QueueNotify 1
    /// 2:  pause
    ///     mov ax, [0x232002]              ; used idx
    ///     cmp ax, [0x231002]
    ///     jne 2b                          ; until the device returned it
    ///     mov ecx, 0x10000
    /// 3:  dec ecx                         ; tens of milliseconds on the nested KVM here
    ///     jnz 3b
    ///     jmp 1b
    /// ```
    pub const RESEND_FOREVER: [u8; 46] = [
        0x66, 0xff, 0x04, 0x25, 0x02, 0x10, 0x23, 0x00, // inc word [0x231002]
        0xc7, 0x46, 0x50, 0x01, 0x00, 0x00, 0x00, // mov dword [rsi + 0x50], 1
        0xf3, 0x90, // pause
        0x66, 0x8b, 0x04, 0x25, 0x02, 0x20, 0x23, 0x00, // mov ax, [0x232002]
        0x66, 0x3b, 0x04, 0x25, 0x02, 0x10, 0x23, 0x00, // cmp ax, [0x231002]
        0x75, 0xec, // jne 2b (-20)
        0xb9, 0x00, 0x00, 0x01, 0x00, // mov ecx, 0x10000
        0xff, 0xc9, // dec ecx
        0x75, 0xfc, // jnz 3b (-4)
        0xeb, 0xd2, // jmp 1b (-46)
    ];
}

#[test]
fn payload_drives_virtio_rng_and_blk_queues_and_stats_count_them() {
    if !kvm_usable("payload_drives_virtio_rng_and_blk_queues_and_stats_count_them") {
        return;
    }
    const WRITE: u16 = 2;
    const NEXT: u16 = 1;
    let dir = scratch("virtio-queues");
    let disk = dir.join("disk.img");
    let mut image = b"hv".to_vec();
    image.resize(1 << 20, 0);
    std::fs::write(&disk, image).unwrap();
    let (blk, rng) = (VIRTIO_MMIO_BASE, VIRTIO_MMIO_BASE + 0x1000);
    let mut code = Vec::new();
    // rng: one 8-byte device-writable buffer.
    code.extend(asm::start_device(rng, &[(0x20_0000, 0x20_1000, 0x20_2000)]));
    code.extend(asm::descriptor(0x20_0000, 0, 0x20_3000, 8, WRITE, 0));
    code.extend(asm::store16(0x20_1002, 1)); // avail idx (ring[0] = 0 already)
    code.extend(asm::reg_write(0x50, 0)); // QueueNotify
    code.extend(asm::wait_nonzero16(0x20_2002)); // used idx
    code.extend(print("rng "));
    code.extend(asm::print_byte(0x20_2008, b'0')); // used len: '0' + 8
    code.extend(print("\n"));
    // blk: read sector 0 (header type 0 = IN, sector 0: zero memory) into 512 bytes.
    code.extend(asm::start_device(blk, &[(0x21_0000, 0x21_1000, 0x21_2000)]));
    code.extend(asm::descriptor(0x21_0000, 0, 0x21_3000, 16, NEXT, 1));
    code.extend(asm::descriptor(
        0x21_0000,
        1,
        0x21_4000,
        512,
        WRITE | NEXT,
        2,
    ));
    code.extend(asm::descriptor(0x21_0000, 2, 0x21_5000, 1, WRITE, 0));
    code.extend(asm::store32(0x21_5000, 0xff)); // status, until the device writes it
    code.extend(asm::store16(0x21_1002, 1));
    code.extend(asm::window(blk));
    code.extend(asm::reg_write(0x50, 0));
    code.extend(asm::wait_nonzero16(0x21_2002));
    code.extend(print("blk "));
    code.extend(asm::print_byte(0x21_5000, b'0')); // status: '0' + VIRTIO_BLK_S_OK
    code.extend(asm::print_byte(0x21_4000, 0)); // the image's first two bytes
    code.extend(asm::print_byte(0x21_4001, 0));
    code.extend(print("\n"));
    code.extend_from_slice(&SPIN);
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(&code)).unwrap();
    let cfg = serde_json::json!({
        "name": "virtio-queues",
        "vcpus": 1,
        "memory_mib": 64,
        "kernel": kernel,
        "serial_log": dir.join("console.log"),
        "control_socket": dir.join("control.sock"),
        "disks": [{"path": disk}],
        "rng": true,
    })
    .to_string();
    let child = Vmm::spawn(
        Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
            .args(["--config-json", &cfg])
            .stderr(Stdio::piped()),
    );
    // A device that never answers leaves the payload spinning before its last line.
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        if log.ends_with("blk 0hv\n") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stats = UnixStream::connect(dir.join("control.sock")).map(|sock| {
        let mut w = sock.try_clone().unwrap();
        writeln!(w, r#"{{"op":"stats"}}"#).unwrap();
        let mut line = String::new();
        BufReader::new(sock).read_line(&mut line).unwrap();
        writeln!(w, r#"{{"op":"stop"}}"#).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    });
    drop(child);
    assert_eq!(log, "rng 8\nblk 0hv\n");
    let devices = &stats.unwrap()["stats"]["devices"];
    assert_eq!(devices["virtio-rng"]["bytes"], 8, "{devices}");
    assert_eq!(devices["virtio-rng"]["requests"], 1, "{devices}");
    assert_eq!(devices["virtio-blk0"]["read_bytes"], 512, "{devices}");
    assert_eq!(devices["virtio-blk0"]["errors"], 0, "{devices}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw packet socket on interface `ifindex`, seeing every frame in both directions.
fn packet_socket(ifindex: u32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is valid before the fields are set.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = ifindex as i32;
    use std::os::fd::AsRawFd;
    // SAFETY: bind reads a sockaddr_ll of the given length from `addr`, which outlives it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval of the given length from `timeout`.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(r, 0);
    fd
}

#[test]
fn payload_transmits_a_frame_through_a_real_tap() {
    if !kvm_usable("payload_transmits_a_frame_through_a_real_tap") {
        return;
    }
    let Some(tap) = throwaway_tap() else { return };
    let dir = scratch("virtio-tap");
    // Broadcast, from the guest's MAC, an ethertype for local experiments, then a payload.
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x88, 0xb5]);
    frame.extend_from_slice(b"hvnode virtio-net tx test");
    frame.resize(60, 0);
    // The virtio_net_hdr_v1 (all zero: no offloads) and the frame, in one buffer.
    let mut buffer = vec![0u8; 12];
    buffer.extend_from_slice(&frame);
    let mut code = asm::start_device(
        VIRTIO_MMIO_BASE,
        &[
            (0x22_0000, 0x22_1000, 0x22_2000), // receive: no buffers offered
            (0x23_0000, 0x23_1000, 0x23_2000), // transmit
        ],
    );
    for (i, word) in buffer.chunks(4).enumerate() {
        let v = u32::from_le_bytes(word.try_into().unwrap());
        code.extend(asm::store32(0x23_3000 + 4 * i as u32, v));
    }
    let len = buffer.len() as u32;
    code.extend(asm::descriptor(0x23_0000, 0, 0x23_3000, len, 0, 0));
    // The test can only listen on the tap once the VMM has created it, so the guest sends the
    // frame again and again (rsi still holds the window base).
    code.extend_from_slice(&asm::RESEND_FOREVER);
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(&code)).unwrap();
    let cfg = serde_json::json!({
        "name": "virtio-tap",
        "vcpus": 1,
        "memory_mib": 64,
        "kernel": kernel,
        "serial_log": dir.join("console.log"),
        "control_socket": dir.join("control.sock"),
        "nets": [{"tap": tap, "mac": "52:54:00:12:34:56"}],
    })
    .to_string();
    let child =
        Vmm::spawn(Command::new(env!("CARGO_BIN_EXE_hvnode-vmm")).args(["--config-json", &cfg]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let name = std::ffi::CString::new(tap.clone()).unwrap();
    let index = loop {
        // SAFETY: if_nametoindex reads the NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index != 0 || Instant::now() > deadline {
            break index;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut captured = Vec::new();
    if index != 0 {
        let mut sock = std::fs::File::from(packet_socket(index));
        while Instant::now() < deadline {
            let mut buf = [0u8; 2048];
            if let Ok(n) = std::io::Read::read(&mut sock, &mut buf) {
                if n >= 14 && buf[12..14] == [0x88, 0xb5] {
                    captured = buf[..n].to_vec();
                    break;
                }
            }
        }
    }
    let stats = UnixStream::connect(dir.join("control.sock")).map(|sock| {
        let mut w = sock.try_clone().unwrap();
        writeln!(w, r#"{{"op":"stats"}}"#).unwrap();
        let mut line = String::new();
        BufReader::new(sock).read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    });
    drop(child);
    assert_ne!(index, 0, "the VMM created no tap {tap}");
    let stats = stats.unwrap();
    assert_eq!(
        captured, frame,
        "the frame as the host sees it, header stripped; {stats}"
    );
    let net = &stats["stats"]["devices"]["virtio-net0"];
    assert!(net["tx_packets"].as_u64().unwrap() >= 1, "{net}");
    assert_eq!(net["errors"], 0, "{net}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_5_gib_guest_reaches_ram_above_4_gib_from_vcpu_and_virtio_blk() {
    if !kvm_usable("a_5_gib_guest_reaches_ram_above_4_gib_from_vcpu_and_virtio_blk") {
        return;
    }
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    // The last page of a 5 GiB guest: its RAM above the hole is [4 GiB, 6 GiB).
    const HIGH: u64 = (6 << 30) - 0x1000;
    const PATTERN: u64 = 0x2167_6968_2065_646f; // "ode high!"
    let dir = scratch("high-ram");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut code = Vec::new();
    // mov rdi, HIGH; mov rax, PATTERN; mov ecx, 64; rep stosq: 512 bytes of the pattern.
    code.extend_from_slice(&[0x48, 0xbf]);
    code.extend_from_slice(&HIGH.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xb8]);
    code.extend_from_slice(&PATTERN.to_le_bytes());
    code.extend_from_slice(&[0xb9, 0x40, 0x00, 0x00, 0x00, 0xf3, 0x48, 0xab]);
    // mov rdi, HIGH; mov ecx, 64; repe scasq: read them back (ZF clear at the first mismatch).
    code.extend_from_slice(&[0x48, 0xbf]);
    code.extend_from_slice(&HIGH.to_le_bytes());
    code.extend_from_slice(&[0xb9, 0x40, 0x00, 0x00, 0x00, 0xf3, 0x48, 0xaf]);
    // The device side: virtio-blk writes those 512 bytes from above 4 GiB to sector 1.
    let mut ok = print("OK\n");
    ok.extend(asm::start_device(
        VIRTIO_MMIO_BASE,
        &[(0x21_0000, 0x21_1000, 0x21_2000)],
    ));
    ok.extend(asm::store32(0x21_3000, 1)); // VIRTIO_BLK_T_OUT
    ok.extend(asm::store32(0x21_3008, 1)); // sector 1
    ok.extend(asm::descriptor(0x21_0000, 0, 0x21_3000, 16, NEXT, 1));
    ok.extend(asm::descriptor(0x21_0000, 1, HIGH as u32, 512, NEXT, 2));
    ok.extend(asm::store32(0x21_0000 + 16 + 4, (HIGH >> 32) as u32));
    ok.extend(asm::descriptor(0x21_0000, 2, 0x21_5000, 1, WRITE, 0));
    ok.extend(asm::store32(0x21_5000, 0xff));
    ok.extend(asm::store16(0x21_1002, 1));
    ok.extend(asm::reg_write(0x50, 0)); // rsi still holds the window
    ok.extend(asm::wait_nonzero16(0x21_2002));
    ok.extend(print("blk "));
    ok.extend(asm::print_byte(0x21_5000, b'0'));
    ok.extend(print("\n"));
    ok.extend_from_slice(&RESET);
    // jne rel32 over the OK branch.
    code.extend_from_slice(&[0x0f, 0x85]);
    code.extend_from_slice(&(ok.len() as u32).to_le_bytes());
    code.extend(ok);
    code.extend(print("BAD\n"));
    code.extend_from_slice(&RESET);
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(&code)).unwrap();
    let cfg = serde_json::json!({
        "name": "high-ram",
        "vcpus": 1,
        "memory_mib": 5 << 10,
        "kernel": kernel,
        "serial_log": dir.join("console.log"),
        "exit_file": dir.join("exit.json"),
        "disks": [{"path": disk}],
    })
    .to_string();
    let mut child = Vmm::spawn(
        Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
            .args(["--config-json", &cfg])
            .stderr(Stdio::piped()),
    );
    let (code, exit) = wait_exit(&mut child, &dir, Duration::from_secs(20));
    let log = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    assert_eq!(log, "OK\nblk 0\n", "exit {code}: {exit}");
    assert_eq!(code, 3, "the payload resets: {exit}");
    let image = std::fs::read(&disk).unwrap();
    let expected: Vec<u8> = std::iter::repeat_n(PATTERN.to_le_bytes(), 64)
        .flatten()
        .collect();
    assert!(
        image[512..1024] == expected[..],
        "sector 1 holds the pattern"
    );
    assert!(image[..512].iter().all(|&b| b == 0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_a_guest_larger_than_the_host_can_map() {
    if !kvm_usable("refuses_a_guest_larger_than_the_host_can_map") {
        return;
    }
    // 128 TiB: the whole 47-bit user address space, never mappable (or, on a host whose vCPUs
    // address less, beyond their physical address bits); refused before anything is touched.
    let cfg = serde_json::json!({
        "name": "huge", "vcpus": 1, "memory_mib": 128u64 << 20, "kernel": "/nonexistent",
    })
    .to_string();
    let out =
        run_to_end(Command::new(env!("CARGO_BIN_EXE_hvnode-vmm")).args(["--config-json", &cfg]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("memory_mib 134217728"), "{err}");
}

#[test]
fn a_paused_guest_receives_no_frame_until_resumed() {
    if !kvm_usable("a_paused_guest_receives_no_frame_until_resumed") {
        return;
    }
    let Some(tap) = throwaway_tap() else { return };
    let dir = scratch("pause-rx");
    let mut code = asm::start_device(
        VIRTIO_MMIO_BASE,
        &[
            (0x22_0000, 0x22_1000, 0x22_2000), // receive
            (0x23_0000, 0x23_1000, 0x23_2000), // transmit: unused
        ],
    );
    // Four receive buffers, so that a frame of the host's own link-up chatter still leaves the
    // device one; "up" once they are offered, so that a pause after it finds them there.
    for i in 0..4 {
        code.extend(asm::descriptor(
            0x22_0000,
            i,
            0x22_3000 + i * 0x1000,
            0x1000,
            2,
            0,
        ));
        code.extend(asm::store16(0x22_1004 + 2 * i, i as u16));
    }
    code.extend(asm::store16(0x22_1002, 4));
    code.extend(asm::reg_write(0x50, 0));
    code.extend(print("up\n"));
    code.extend_from_slice(&SPIN);
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, elf(&code)).unwrap();
    let cfg = serde_json::json!({
        "name": "pause-rx",
        "vcpus": 1,
        "memory_mib": 64,
        "kernel": kernel,
        "serial_log": dir.join("console.log"),
        "control_socket": dir.join("control.sock"),
        "exit_file": dir.join("exit.json"),
        "nets": [{"tap": tap, "mac": "52:54:00:12:34:56"}],
    })
    .to_string();
    let mut child = Vmm::spawn(
        Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
            .args(["--config-json", &cfg])
            .stderr(Stdio::piped()),
    );
    let mut ctl = Control::connect(&dir);
    // The host's own IPv6 chatter on a new link would only add frames; keep it off.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    wait_for_log(&dir, "payload up", |l| l == "up\n");
    let name = std::ffi::CString::new(tap.clone()).unwrap();
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no tap {tap}");
    let mut host = std::fs::File::from(packet_socket(index));
    // To the guest's MAC, an ethertype for local experiments, 1000 bytes of payload.
    let mut frame = vec![
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5,
    ];
    frame.resize(14 + 1000, 0x5a);
    let rx = |ctl: &mut Control| {
        let s = ctl.ask(r#"{"op":"stats"}"#);
        let net = &s["stats"]["devices"]["virtio-net0"];
        (
            net["rx_packets"].as_u64().unwrap(),
            net["rx_bytes"].as_u64().unwrap(),
        )
    };
    assert_eq!(ctl.ask(r#"{"op":"pause"}"#)["result"], "ok");
    assert_eq!(ctl.ask(r#"{"op":"describe"}"#)["state"], "paused");
    let before = rx(&mut ctl);
    assert_eq!(Write::write(&mut host, &frame).unwrap(), frame.len());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx(&mut ctl), before, "the device received while paused");
    assert_eq!(ctl.ask(r#"{"op":"resume"}"#)["result"], "ok");
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = rx(&mut ctl);
        if now.1 >= before.1 + frame.len() as u64 || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        after.0 > before.0 && after.1 >= before.1 + frame.len() as u64,
        "the frame that waited in the tap reached the guest after resume: {before:?} -> {after:?}"
    );
    assert_eq!(ctl.ask(r#"{"op":"stop"}"#)["result"], "ok");
    let (code, _) = wait_exit(&mut child, &dir, Duration::from_secs(10));
    assert_eq!(code, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
