//! Boots the hvnode ISO in QEMU (TCG) and drives it: the serial console as a byte stream and as a
//! terminal screen, QMP for the power button, a port forward to the agent's API.
//!
//! The boot tests in `tests/` run only when `HVNODE_ISO` names the image (the README's test
//! command sets it after building the image); without it they say so and return.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub mod screen;

/// Firmware to boot with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// UEFI (OVMF).
    Ovmf,
    /// Legacy BIOS (SeaBIOS).
    SeaBios,
}

/// How the ISO is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    /// As a CD-ROM.
    Cd,
    /// As a USB stick (qemu-xhci + usb-storage), as if written with dd.
    UsbStick,
    /// Not at all: the machine boots from its first disk ([`Options::disks`]), an installed node.
    None,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name for logs (`build/test-logs/<name>.serial.log`).
    pub name: String,
    /// Firmware.
    pub firmware: Firmware,
    /// Boot medium.
    pub medium: Medium,
    /// Extra raw disks (virtio-blk).
    pub disks: Vec<PathBuf>,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Expose SVM + NPT so that KVM loads inside (nested guests).
    pub nested: bool,
    /// An i6300esb watchdog, which resets the machine when it fires.
    pub watchdog: bool,
    /// The host's etcd port, reached by the node at [`NODE_ETCD`] through a link of its own
    /// that [`Qemu::cut_etcd_link`] cuts (its other traffic, storage included, stays).
    pub etcd_link: Option<u16>,
}

/// Where a node started with [`Options::etcd_link`] reaches etcd.
pub const NODE_ETCD: &str = "http://10.0.2.100:2379";

impl Options {
    /// Defaults: 1 GiB, no disk, not nested.
    pub fn new(name: &str, firmware: Firmware, medium: Medium) -> Self {
        Options {
            name: name.to_owned(),
            firmware,
            medium,
            disks: Vec::new(),
            memory_mib: 1024,
            nested: false,
            watchdog: false,
            etcd_link: None,
        }
    }
}

/// The ISO under test, from `HVNODE_ISO`; `None` means boot tests are not requested.
pub fn iso_under_test() -> Option<PathBuf> {
    let iso = PathBuf::from(std::env::var_os("HVNODE_ISO")?);
    assert!(
        iso.is_file(),
        "HVNODE_ISO={} does not exist: build it with image/build.sh",
        iso.display()
    );
    Some(iso)
}

/// Runs hvnodectl (`HVNODECTL`, else target/debug/hvnodectl) with the manager state in `state`:
/// whether it succeeded, and its stdout and stderr.
pub fn hvnodectl(state: &Path, args: &[&str]) -> (bool, String) {
    let bin = std::env::var_os("HVNODECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/hvnodectl"));
    assert!(
        bin.is_file(),
        "{} missing: run cargo build -p hvnodectl",
        bin.display()
    );
    let out = Command::new(&bin)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run hvnodectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs hvnodectl and demands success; its output.
pub fn ok(state: &Path, args: &[&str]) -> String {
    let (success, text) = hvnodectl(state, args);
    assert!(success, "hvnodectl {args:?} failed:\n{text}");
    text
}

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A fresh scratch directory for one test under `build/test-runs/<name>`.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = repo_root().join("build/test-runs").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Creates a sparse blank raw disk.
pub fn blank_disk(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create disk");
    f.set_len(size).expect("size disk");
}

/// The name a node's etcd link processes carry (its directory's, made unique).
fn link_tag(dir: &Path) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&dir, &mut h);
    format!("hvlink-{:x}", std::hash::Hasher::finish(&h))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[derive(Default)]
struct Serial {
    bytes: Vec<u8>,
    /// When each chunk arrived: (offset of its first byte, time).
    arrivals: Vec<(usize, Instant)>,
    closed: bool,
}

/// A running QEMU.
pub struct Qemu {
    child: Child,
    serial: Arc<(Mutex<Serial>, Condvar)>,
    serial_in: UnixStream,
    qmp_path: PathBuf,
    /// Host port forwarded to the node's TCP 8443.
    pub api_port: u16,
    /// Where the serial output is logged.
    pub log_path: PathBuf,
    /// Scratch directory of this run.
    pub dir: PathBuf,
}

impl std::fmt::Debug for Qemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qemu")
            .field("api_port", &self.api_port)
            .field("log", &self.log_path)
            .finish()
    }
}

impl Qemu {
    /// Starts QEMU with the ISO (ignored with [`Medium::None`]); returns once the serial socket is connected (QEMU waits for it,
    /// so no output is lost).
    pub fn start(iso: &Path, opts: &Options, dir: &Path) -> Qemu {
        let serial_path = dir.join("serial.sock");
        let qmp_path = dir.join("qmp.sock");
        let api_port = free_port();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-nographic",
            "-nodefaults",
        ]);
        cmd.args(["-m", &opts.memory_mib.to_string(), "-smp", "1"]);
        cmd.args([
            "-cpu",
            if opts.nested {
                "qemu64,+svm,+npt"
            } else {
                "qemu64"
            },
        ]);
        cmd.arg("-chardev").arg(format!(
            "socket,id=ser0,path={},server=on,wait=on",
            serial_path.display()
        ));
        cmd.args(["-serial", "chardev:ser0"]);
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        // The server's screen, and its keyboards: PS/2 (q35's i8042) and a USB keyboard tied to
        // the screen, so that events sent to "video0" reach it and other events the PS/2 one.
        cmd.args(["-device", "VGA,id=video0"]);
        cmd.args(["-device", "qemu-xhci,id=xhci"]);
        cmd.args(["-device", "usb-kbd,bus=xhci.0,display=video0"]);
        let mut netdev = format!("user,id=n0,hostfwd=tcp:127.0.0.1:{api_port}-:8443");
        if let Some(port) = opts.etcd_link {
            // One socat per connection the node opens (QEMU runs the command for each); the
            // cut marks the link cut and kills the socats by their log name.
            let script = dir.join("etcd-link.sh");
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\n[ -e {cut} ] && exit 0\nexec socat -lp {tag} STDIO TCP:127.0.0.1:{port}\n",
                    cut = dir.join("etcd-link.cut").display(),
                    tag = link_tag(dir),
                ),
            )
            .expect("write the etcd link script");
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod the etcd link script");
            netdev.push_str(&format!(
                ",guestfwd=tcp:10.0.2.100:2379-cmd:{}",
                script.display()
            ));
        }
        cmd.arg("-netdev").arg(netdev);
        cmd.args(["-device", "virtio-net-pci,netdev=n0"]);
        if opts.watchdog {
            cmd.args(["-device", "i6300esb", "-action", "watchdog=reset"]);
        }
        if opts.firmware == Firmware::Ovmf {
            let vars = dir.join("OVMF_VARS.fd");
            std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("copy OVMF vars");
            cmd.args([
                "-drive",
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            ]);
            cmd.arg("-drive").arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
        }
        match opts.medium {
            Medium::Cd => {
                cmd.arg("-drive").arg(format!(
                    "if=none,id=boot,media=cdrom,readonly=on,format=raw,file={}",
                    iso.display()
                ));
                cmd.args(["-device", "ide-cd,drive=boot,bootindex=0"]);
            }
            Medium::UsbStick => {
                cmd.arg("-drive").arg(format!(
                    "if=none,id=boot,format=raw,snapshot=on,file={}",
                    iso.display()
                ));
                cmd.args(["-device", "usb-storage,bus=xhci.0,drive=boot,bootindex=0"]);
            }
            Medium::None => {}
        }
        for (i, d) in opts.disks.iter().enumerate() {
            cmd.arg("-drive").arg(format!(
                "if=none,id=disk{i},format=raw,file={}",
                d.display()
            ));
            let boot = if opts.medium == Medium::None && i == 0 {
                ",bootindex=0"
            } else {
                ""
            };
            cmd.arg("-device").arg(format!(
                "virtio-blk-pci,drive=disk{i},serial=hvtest{i}{boot}"
            ));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("start qemu-system-x86_64 (install it with image/setup-host.sh)");
        let stream = connect_retry(&serial_path, &mut child);
        let log_path = repo_root()
            .join("build/test-logs")
            .join(format!("{}.serial.log", opts.name));
        let _ = std::fs::create_dir_all(log_path.parent().unwrap_or(Path::new(".")));
        let serial = Arc::new((Mutex::new(Serial::default()), Condvar::new()));
        let serial_in = stream.try_clone().expect("clone serial socket");
        {
            let serial = Arc::clone(&serial);
            let mut log = std::fs::File::create(&log_path).expect("create serial log");
            let mut stream = stream;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let n = stream.read(&mut buf).unwrap_or(0);
                    let (lock, cv) = &*serial;
                    let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
                    if n == 0 {
                        s.closed = true;
                        cv.notify_all();
                        return;
                    }
                    let _ = log.write_all(&buf[..n]);
                    let at = s.bytes.len();
                    s.arrivals.push((at, Instant::now()));
                    s.bytes.extend_from_slice(&buf[..n]);
                    cv.notify_all();
                }
            });
        }
        Qemu {
            child,
            serial,
            serial_in,
            qmp_path,
            api_port,
            log_path,
            dir: dir.to_path_buf(),
        }
    }

    /// Everything the serial console printed so far (lossy UTF-8).
    pub fn serial_text(&self) -> String {
        let (lock, _) = &*self.serial;
        let s = lock.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&s.bytes).into_owned()
    }

    /// Number of serial bytes received so far (a mark for [`Qemu::wait_for_after`]).
    pub fn mark(&self) -> usize {
        let (lock, _) = &*self.serial;
        lock.lock().unwrap_or_else(|e| e.into_inner()).bytes.len()
    }

    /// Where `needle` first appears in the serial output (a mark just before it).
    pub fn position_of(&self, needle: &str) -> Option<usize> {
        let (lock, _) = &*self.serial;
        let s = lock.lock().unwrap_or_else(|e| e.into_inner());
        s.bytes
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
    }

    /// Waits until `needle` appears on the serial console, or panics with the log's tail.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_after(0, needle, timeout)
    }

    /// Like [`Qemu::wait_for`], considering only output after `mark`.
    pub fn wait_for_after(&self, mark: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.serial;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let from = mark.min(s.bytes.len());
            let text = String::from_utf8_lossy(&s.bytes[from..]).into_owned();
            if text.contains(needle) {
                return text;
            }
            let now = Instant::now();
            if now >= deadline || s.closed {
                let tail: String = text
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!(
                    "{:?} did not appear on the serial console within {:?}{} (log: {}); last output:\n{}",
                    needle,
                    timeout,
                    if s.closed { " (QEMU exited)" } else { "" },
                    self.log_path.display(),
                    tail
                );
            }
            s = cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends bytes to the serial console (keys).
    pub fn send(&mut self, bytes: &[u8]) {
        self.serial_in.write_all(bytes).expect("write to serial");
    }

    /// Renders the serial output since `mark` as an 80x24 terminal screen.
    pub fn screen_after(&self, mark: usize) -> String {
        let (lock, _) = &*self.serial;
        let s = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut parser = vt100::Parser::new(24, 80, 0);
        parser.process(&s.bytes[mark.min(s.bytes.len())..]);
        parser.screen().contents()
    }

    /// Waits until the screen (output after `mark`) contains `needle`; returns the screen.
    pub fn wait_screen(&self, mark: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen_after(mark);
            if screen.contains(needle) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not on the console screen within {timeout:?}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Sends a QMP command and returns its answer.
    pub fn qmp(&self, command: &str) -> serde_json::Value {
        self.qmp_with(command, serde_json::json!({}))
    }

    /// Sends a QMP command with arguments; panics on a QMP error.
    pub fn qmp_ok(&self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let answer = self.qmp_with(command, arguments);
        assert!(answer.get("error").is_none(), "QMP {command}: {answer}");
        answer
    }

    /// Presses keys together on the emulated keyboard (QEMU key codes: `"2"`, `"h"`, `"ret"`,
    /// `"ctrl"`); `Some("video0")` types on the USB keyboard, `None` on the PS/2 one.
    pub fn press_keys(&self, keys: &[&str], device: Option<&str>) {
        let events = |down: bool| -> Vec<serde_json::Value> {
            keys.iter()
                .map(|k| {
                    serde_json::json!({"type": "key", "data": {
                        "down": down, "key": {"type": "qcode", "data": k}}})
                })
                .collect()
        };
        for down in [true, false] {
            let mut args = serde_json::json!({"events": events(down)});
            if let Some(d) = device {
                args["device"] = serde_json::json!(d);
            }
            self.qmp_ok("input-send-event", args);
        }
    }

    /// The VGA text memory (0xB8000, 32 KiB) as the guest left it.
    pub fn vga_text_memory(&self) -> Vec<u8> {
        let file = self.dir.join("vga-text.bin");
        let _ = std::fs::remove_file(&file);
        self.qmp_ok(
            "pmemsave",
            serde_json::json!({"val": 0xb8000u32, "size": 32768, "filename": file}),
        );
        std::fs::read(&file).expect("read the VGA text dump")
    }

    /// What the display shows, as QEMU renders it.
    pub fn screendump(&self) -> screen::Picture {
        let file = self.dir.join("screen.ppm");
        let _ = std::fs::remove_file(&file);
        self.qmp_ok("screendump", serde_json::json!({"filename": file}));
        let data = std::fs::read(&file).expect("read the screendump");
        screen::parse_ppm(&data).expect("QEMU's screendump is a PPM")
    }

    /// Sends a QMP command with arguments and returns its answer.
    pub fn qmp_with(&self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let stream = UnixStream::connect(&self.qmp_path).expect("connect QMP");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("QMP timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone QMP"));
        let mut w = stream;
        let mut line = String::new();
        reader.read_line(&mut line).expect("QMP greeting");
        writeln!(w, r#"{{"execute":"qmp_capabilities"}}"#).expect("QMP write");
        line.clear();
        reader.read_line(&mut line).expect("QMP capabilities");
        let request = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(w, "{request}").expect("QMP write");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("QMP answer");
            let v: serde_json::Value = serde_json::from_str(&line).expect("QMP JSON");
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }

    /// When `needle` first appeared in the serial output after `mark` (the arrival of the chunk
    /// that completed it).
    pub fn seen_at(&self, mark: usize, needle: &str) -> Option<Instant> {
        let (lock, _) = &*self.serial;
        let s = lock.lock().unwrap_or_else(|e| e.into_inner());
        let from = mark.min(s.bytes.len());
        let pos = s.bytes[from..]
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())?
            + from;
        let end = pos + needle.len() - 1;
        s.arrivals
            .iter()
            .rev()
            .find(|(at, _)| *at <= end)
            .map(|(_, t)| *t)
    }

    /// Cuts the node's link to etcd ([`Options::etcd_link`]): open connections close, new ones
    /// close at once. Its other traffic (the API, NFS) goes on.
    pub fn cut_etcd_link(&self) {
        std::fs::write(self.dir.join("etcd-link.cut"), b"").expect("mark the link cut");
        let _ = Command::new("pkill")
            .args(["-f", &format!("socat -lp {}", link_tag(&self.dir))])
            .status();
    }

    /// Ends QEMU at once, as a node that loses power (no shutdown).
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Presses the ACPI power button and waits for QEMU to exit.
    pub fn power_button_and_wait(&mut self, timeout: Duration) -> ExitStatus {
        self.qmp("system_powerdown");
        self.wait_exit(timeout)
    }

    /// Waits for QEMU to exit, or kills it and panics.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait qemu") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "QEMU did not exit within {timeout:?} (log: {})",
                    self.log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Asserts the console shows no kernel panic, oops or init failure.
    pub fn assert_clean_console(&self) {
        let text = self.serial_text();
        for bad in [
            "Kernel panic",
            "BUG:",
            "Oops",
            "hvnode: fatal",
            "panicked at",
            "Attempted to kill init",
        ] {
            assert!(
                !text.contains(bad),
                "console shows {bad:?} (log: {})",
                self.log_path.display()
            );
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn connect_retry(path: &Path, child: &mut Child) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return s;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("qemu exited at start ({status}): {err}");
        }
        assert!(
            Instant::now() < deadline,
            "QEMU's serial socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process the test started on the host (etcd, an NFS server), killed and reaped on drop.
#[derive(Debug)]
pub struct HostService {
    what: &'static str,
    child: Child,
}

impl Drop for HostService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HostService {
    fn spawn(what: &'static str, cmd: &mut Command, log: &Path) -> HostService {
        let out = std::fs::File::create(log).expect("service log");
        let err = out.try_clone().expect("service log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e} (image/setup-host.sh installs it)"));
        HostService { what, child }
    }

    /// Waits until something listens on 127.0.0.1:`port`, failing with `log` if the service
    /// exits or 30 s pass.
    fn wait_port(&mut self, port: u16, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{} does not listen on {port} ({exited:?}): {}",
                self.what,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A single-member etcd on loopback (Debian's etcd-server), its data in `dir`; returns it and
/// its client port. QEMU nodes on the user network reach it at 10.0.2.2:port.
pub fn host_etcd(dir: &Path) -> (HostService, u16) {
    std::fs::create_dir_all(dir).expect("etcd dir");
    let (client, peer) = (free_port(), free_port());
    let log = dir.join("etcd.log");
    let mut s = HostService::spawn(
        "etcd",
        Command::new("etcd")
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-cluster")
            .arg(format!("test=http://127.0.0.1:{peer}")),
        &log,
    );
    s.wait_port(client, &log);
    (s, client)
}

/// An NFSv4 server (nfs-ganesha, with rpcbind if none runs) exporting `export` as `/export`
/// on 127.0.0.1; returns what it started and the NFS port. QEMU nodes mount
/// 10.0.2.2:/export with `port=<port>`.
pub fn host_nfs(dir: &Path, export: &Path) -> (Vec<HostService>, u16) {
    std::fs::create_dir_all(dir).expect("nfs dir");
    std::fs::create_dir_all(export).expect("export dir");
    let mut started = Vec::new();
    if std::net::TcpStream::connect(("127.0.0.1", 111)).is_err() {
        let log = dir.join("rpcbind.log");
        let mut r = HostService::spawn("rpcbind", Command::new("rpcbind").args(["-w", "-f"]), &log);
        r.wait_port(111, &log);
        started.push(r);
    }
    let port = free_port();
    let conf = dir.join("ganesha.conf");
    std::fs::write(
        &conf,
        format!(
            "NFS_CORE_PARAM {{ Protocols = 4; Enable_RQUOTA = false; Enable_NLM = false; \
             NFS_Port = {port}; Bind_addr = 127.0.0.1; }}\n\
             NFSV4 {{ Graceless = true; Lease_Lifetime = 10; }}\n\
             EXPORT {{ Export_Id = 1; Path = {}; Pseudo = /export; Access_Type = RW; \
             Squash = No_Root_Squash; Protocols = 4; Transports = TCP; SecType = sys; \
             FSAL {{ Name = VFS; }} }}\n",
            export.display()
        ),
    )
    .expect("ganesha.conf");
    let log = dir.join("ganesha.log");
    let mut g = HostService::spawn(
        "nfs-ganesha",
        Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(&conf)
            .arg("-L")
            .arg(&log)
            .arg("-p")
            .arg(dir.join("ganesha.pid")),
        &dir.join("ganesha.out"),
    );
    g.wait_port(port, &log);
    started.push(g);
    (started, port)
}
