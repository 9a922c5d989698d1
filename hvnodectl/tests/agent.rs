//! Integration tests against the real node agent, run unprivileged on loopback.
//!
//! The agent binary comes from `HVNODE_AGENT_BIN`, or is the newest `hvnode-agent` in the
//! `debug` directory of this test's target dir, of the workspace's `target/`, or of a
//! `target/<dir>/` whose `--help` lists the flags used here. When there is none the tests
//! print why and pass without running (build it with `cargo build -p hvnode-agent`).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hvnode_api::routes::Route;

fn agent_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("HVNODE_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // <target>/debug/deps/<test> → <target>/debug/hvnode-agent
        if let Some(debug) = exe.parent().and_then(Path::parent) {
            candidates.push(debug.join("hvnode-agent"));
        }
    }
    // The workspace target dir and the per-helper ones below it (target/<crate>/debug).
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    candidates.push(target.join("debug/hvnode-agent"));
    if let Ok(entries) = std::fs::read_dir(&target) {
        for e in entries.flatten() {
            candidates.push(e.path().join("debug/hvnode-agent"));
        }
    }
    // The newest build that implements the flags these tests use.
    let mut usable: Vec<(std::time::SystemTime, PathBuf)> = candidates
        .into_iter()
        .filter(|p| p.is_file())
        .filter(|p| {
            Command::new(p)
                .arg("--help")
                .output()
                // The agent prints its usage on stderr.
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout).contains("--init-socket")
                        || String::from_utf8_lossy(&o.stderr).contains("--init-socket")
                })
                .unwrap_or(false)
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    usable.sort();
    usable
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| "no hvnode-agent binary implementing --init-socket was found".to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvnodectl-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running agent, killed on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Agent {
    fn start(bin: &Path, tag: &str) -> Agent {
        Agent::start_with(bin, tag, &[])
    }

    /// Started with `extra` flags after the usual ones.
    fn start_with(bin: &Path, tag: &str, extra: &[&std::ffi::OsStr]) -> Agent {
        let dir = temp_dir(tag);
        for sub in ["data", "run", "images"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Agent::spawn(bin, dir, free_port(), extra)
    }

    /// Kills the agent and starts it again on the same directories and port (its guests' VMMs
    /// keep running, as after an agent restart on a node).
    fn restart(&mut self, bin: &Path, extra: &[&std::ffi::OsStr]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let fresh = Agent::spawn(bin, self.dir.clone(), self.port, extra);
        let old = std::mem::replace(self, fresh);
        // The old value's directory is the new one's: not removed.
        std::mem::forget(old);
    }

    fn spawn(bin: &Path, dir: PathBuf, port: u16, extra: &[&std::ffi::OsStr]) -> Agent {
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(bin)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--socket")
            .arg(dir.join("agent.sock"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--images-dir")
            .arg(dir.join("images"))
            .arg("--init-socket")
            .arg(dir.join("init.sock"))
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the agent");
        let mut agent = Agent { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if agent.dir.join("agent.sock").exists()
                && agent
                    .local("GET", &Route::Registration.path(), None)
                    .is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                break;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited with {status}: {}", agent.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready: {}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A request on the agent's unix socket; returns (status, body).
    fn local(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        let mut s = UnixStream::connect(self.dir.join("agent.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Ok((
            status,
            if chunked {
                dechunk(rest)
            } else {
                rest.to_owned()
            },
        ))
    }

    fn local_json(&self, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
        let (status, text) = self.local(method, path, body).unwrap();
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {text}"
        );
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    fn pairing_code(&self) -> String {
        let v = self.local_json("GET", &Route::Registration.path(), None);
        v["pairing_code"]
            .as_str()
            .unwrap_or_else(|| panic!("no pairing_code in {v}"))
            .to_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn ctl(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvnodectl"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hvnodectl")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "hvnodectl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected failure, got: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

macro_rules! agent_or_skip {
    () => {
        match agent_binary() {
            Ok(b) => b,
            Err(why) => {
                hvnode_base::testing::cannot_run(
                    "an agent test",
                    &format!("{why} (set HVNODE_AGENT_BIN or run `cargo build -p hvnode-agent`)"),
                );
                return;
            }
        }
    };
}

#[test]
fn manager_initiated_registration_guests_and_revocation() {
    let bin = agent_or_skip!();
    let agent = Agent::start(&bin, "pair");
    let work = temp_dir("pair-mgr");
    let a = work.join("a");
    let b = work.join("b");
    ok(&ctl(&a, &["init", "--name", "manager-a"]));
    ok(&ctl(&b, &["init", "--name", "manager-b"]));
    let url = agent.url();

    // Without --yes and no terminal answer, registration is not confirmed.
    let code = agent.pairing_code();
    fails_with(
        &ctl(&a, &["register", "n1", "--url", &url, "--code", &code]),
        "not confirmed",
    );
    // A wrong expected fingerprint is refused before the code is sent.
    let wrong_fp = ["00"; 32].join(":");
    fails_with(
        &ctl(
            &a,
            &[
                "register",
                "n1",
                "--url",
                &url,
                "--code",
                &code,
                "--fingerprint",
                &wrong_fp,
            ],
        ),
        &format!("expected {wrong_fp}"),
    );
    // A wrong code is the agent's wrong_pairing_code.
    let bad = if code == "000000" { "111111" } else { "000000" };
    fails_with(
        &ctl(
            &a,
            &["register", "n1", "--url", &url, "--code", bad, "--yes"],
        ),
        "wrong_pairing_code",
    );

    let code = agent.pairing_code();
    let node_fp = agent.local_json("GET", &Route::Registration.path(), None)["node_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(&ctl(
        &a,
        &[
            "register",
            "n1",
            "--url",
            &url,
            "--code",
            &code,
            "--fingerprint",
            &node_fp.to_lowercase(),
        ],
    ));
    let nodes = std::fs::read_to_string(a.join("nodes.toml")).unwrap();
    assert!(nodes.contains(&node_fp), "{nodes}");

    let info = ok(&ctl(&a, &["node", "info", "n1"]));
    assert!(info.contains("hostname:"), "{info}");
    let listed = ok(&ctl(&a, &["--json", "nodes"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["state"], "registered", "{listed}");
    assert_eq!(listed[0]["reachable"], true);

    std::fs::write(agent.dir.join("images/vmlinuz"), b"not a real kernel").unwrap();
    let spec = work.join("web.toml");
    std::fs::write(
        &spec,
        "name = \"web\"\nkernel = \"vmlinuz\"\nmemory_mib = 64\n",
    )
    .unwrap();
    ok(&ctl(&a, &["guest", "define", "n1", spec.to_str().unwrap()]));
    let guests = ok(&ctl(&a, &["--json", "guest", "list", "n1"]));
    let guests: serde_json::Value = serde_json::from_str(&guests).unwrap();
    assert_eq!(guests[0]["spec"]["name"], "web", "{guests}");
    assert_eq!(guests[0]["state"], "stopped");
    fails_with(
        &ctl(&a, &["guest", "define", "n1", spec.to_str().unwrap()]),
        "(",
    );
    // Operations that need a running guest say why they cannot apply.
    for op in ["pause", "resume", "shutdown", "reboot", "stop"] {
        fails_with(
            &ctl(&a, &["guest", op, "n1", "web"]),
            "guest \"web\": it is stopped",
        );
    }
    fails_with(
        &ctl(&a, &["guest", "shutdown", "n1", "web", "--timeout", "5"]),
        "Cannot shut down guest \"web\": it is stopped",
    );
    let bad_spec = work.join("bad.toml");
    std::fs::write(&bad_spec, "name = \"Bad Name\"\nkernel = \"vmlinuz\"\n").unwrap();
    fails_with(
        &ctl(&a, &["guest", "define", "n1", bad_spec.to_str().unwrap()]),
        "Invalid guest name",
    );
    ok(&ctl(&a, &["guest", "delete", "n1", "web"]));

    // A second manager is refused while the node is registered.
    let code = agent.pairing_code();
    fails_with(
        &ctl(
            &b,
            &["register", "n1", "--url", &url, "--code", &code, "--yes"],
        ),
        "already_registered",
    );

    // The node's admin unregisters locally: the manager is told to re-register.
    agent.local_json("DELETE", &Route::Registration.path(), None);
    fails_with(
        &ctl(&a, &["node", "info", "n1"]),
        "no longer trusts this manager: re-register it",
    );

    // Re-register, then unregister from the manager side.
    let code = agent.pairing_code();
    fails_with(
        &ctl(
            &a,
            &["register", "n1", "--url", &url, "--code", &code, "--yes"],
        ),
        "already registered here",
    );
    ok(&ctl(
        &a,
        &[
            "register",
            "n1",
            "--url",
            &url,
            "--code",
            &code,
            "--yes",
            "--replace",
        ],
    ));
    ok(&ctl(&a, &["unregister", "n1"]));
    let state = agent.local_json("GET", &Route::Registration.path(), None);
    assert_eq!(state["state"], "unregistered", "{state}");
    assert!(!std::fs::read_to_string(a.join("nodes.toml"))
        .unwrap()
        .contains("n1"));
    fails_with(&ctl(&a, &["node", "info", "n1"]), "Unknown node");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn unreachable_node_is_reported_with_its_url() {
    let work = temp_dir("unreach");
    let s = work.join("s");
    ok(&ctl(&s, &["init", "--name", "m"]));
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    fails_with(
        &ctl(
            &s,
            &["register", "n1", "--url", &url, "--code", "1", "--yes"],
        ),
        &format!("cannot reach node n1 at {url}"),
    );
    fails_with(
        &ctl(&s, &["init", "--name", "again"]),
        "refusing to overwrite",
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// A running `hvnodectl serve`, killed on drop.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn node_initiated_registration_through_serve_and_approve() {
    let bin = agent_or_skip!();
    let agent = Agent::start(&bin, "join");
    let work = temp_dir("join-mgr");
    let m = work.join("m");
    ok(&ctl(&m, &["init", "--name", "central"]));
    let port = free_port();
    let _serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_hvnodectl"))
            .arg("--state-dir")
            .arg(&m)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("HVNODECTL_RENEW_CHECK_SECS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }

    let ca: serde_json::Value = serde_json::from_str(&ok(&ctl(&m, &["--json", "ca"]))).unwrap();
    let body = format!("{{\"url\":\"https://127.0.0.1:{port}\"}}");
    let candidate = agent.local_json("POST", &Route::RegistrationManager.path(), Some(&body));
    assert_eq!(candidate["manager_name"], "central", "{candidate}");
    assert_eq!(candidate["ca_fingerprint"], ca["ca_fingerprint"]);
    let accept = format!("{{\"ca_fingerprint\":{}}}", candidate["ca_fingerprint"]);
    agent.local_json(
        "POST",
        &Route::RegistrationManagerAccept.path(),
        Some(&accept),
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let hostname = loop {
        let list: serde_json::Value =
            serde_json::from_str(&ok(&ctl(&m, &["--json", "requests"]))).unwrap();
        if let Some(r) = list.as_array().and_then(|l| l.first()) {
            assert_eq!(r["state"], "pending");
            break r["hostname"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no join request arrived: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    ok(&ctl(
        &m,
        &["approve", &hostname, "--name", "n2", "--url", &agent.url()],
    ));
    fails_with(
        &ctl(&m, &["approve", &hostname, "--name", "n3"]),
        "already approved",
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = agent.local_json("GET", &Route::Registration.path(), None);
        if s["state"] == "registered" {
            assert_eq!(s["manager_name"], "central");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node did not register: {s} {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let info = ok(&ctl(&m, &["node", "info", "n2"]));
    assert!(info.contains("hostname:"), "{info}");
    // The manager never talked to this node on its own: `serve` signs its node certificate.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = agent.local_json("GET", &Route::NodeCertificate.path(), None);
        if c["signed"]["not_after_unix"]
            .as_i64()
            .is_some_and(|t| t > 0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve never signed the node's certificate: {c}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// Kills the VMMs still running under an agent's run directory when dropped: the agent leaves
/// them running when it is killed, and a failed assertion would leave them up.
struct Vmms(PathBuf);

impl Drop for Vmms {
    fn drop(&mut self) {
        for e in std::fs::read_dir(self.0.join("run/vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

/// Reads `from` on a thread until `want` appears in it, for at most 20 s; returns what it read.
fn read_until(from: impl Read + Send + 'static, want: &str) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut from = from;
        let mut buf = [0u8; 256];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.extend_from_slice(&chunk),
            Err(_) => panic!("{want:?} never came: {:?}", String::from_utf8_lossy(&seen)),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// An agent whose guests run on the real VMM, a manager state directory `m` registered with
/// it as node `n1`, and a scratch directory `work`; the VMMs die with `_vmms`.
struct RealGuests {
    agent: Agent,
    _vmms: Vmms,
    work: PathBuf,
    m: PathBuf,
}

/// [`RealGuests`] for `test`, or `None` (after `cannot_run`) without KVM, the agent or the VMM.
fn real_guests(test: &str, tag: &str) -> Option<RealGuests> {
    let bin = match agent_binary() {
        Ok(b) => b,
        Err(why) => {
            hvnode_base::testing::cannot_run(
                test,
                &format!("{why} (set HVNODE_AGENT_BIN or run `cargo build -p hvnode-agent`)"),
            );
            return None;
        }
    };
    let vmm = bin.with_file_name("hvnode-vmm");
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm || !vmm.is_file() {
        hvnode_base::testing::cannot_run(
            test,
            &format!(
                "needs /dev/kvm and {} (cargo build -p hvnode-vmm)",
                vmm.display()
            ),
        );
        return None;
    }
    let agent = Agent::start_with(&bin, tag, &["--vmm-binary".as_ref(), vmm.as_os_str()]);
    let vmms = Vmms(agent.dir.clone());
    let work = temp_dir(&format!("{tag}-mgr"));
    let m = work.join("m");
    ok(&ctl(&m, &["init", "--name", "manager"]));
    let code = agent.pairing_code();
    ok(&ctl(
        &m,
        &[
            "register",
            "n1",
            "--url",
            &agent.url(),
            "--code",
            &code,
            "--yes",
        ],
    ));
    Some(RealGuests {
        agent,
        _vmms: vmms,
        work,
        m,
    })
}

#[test]
fn console_attach_sends_piped_input_to_a_real_guest_and_prints_its_echo() {
    let Some(RealGuests {
        agent,
        _vmms,
        work,
        m,
    }) = real_guests(
        "console_attach_sends_piped_input_to_a_real_guest_and_prints_its_echo",
        "attach",
    )
    else {
        return;
    };

    // After `ready`: poll LSR.DR (0x3fd bit 0), read 0x3f8, write it back, loop.
    let mut code = hvnode_vmm::payload::serial_print("ready\n");
    code.extend_from_slice(&[
        0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7, 0x66, 0xba, 0xf8, 0x03, 0xec, 0xee,
        0xeb, 0xef,
    ]);
    std::fs::write(
        agent.dir.join("images/echo.elf"),
        hvnode_vmm::payload::elf64(&code),
    )
    .unwrap();
    let spec = work.join("echo.toml");
    std::fs::write(
        &spec,
        "name = \"echo\"\nkernel = \"echo.elf\"\nmemory_mib = 64\nrng = false\n",
    )
    .unwrap();
    ok(&ctl(&m, &["guest", "define", "n1", spec.to_str().unwrap()]));
    fails_with(
        &ctl(&m, &["guest", "console", "n1", "echo", "--attach"]),
        "invalid_guest_state",
    );
    ok(&ctl(&m, &["guest", "start", "n1", "echo"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok(&ctl(&m, &["guest", "console", "n1", "echo"])).contains("ready") {
        assert!(Instant::now() < deadline, "the guest never printed ready");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut child = Command::new(env!("CARGO_BIN_EXE_hvnodectl"))
        .arg("--state-dir")
        .arg(&m)
        .args(["guest", "console", "n1", "echo", "--attach"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    stdin.write_all(b"hello").unwrap();
    stdin.flush().unwrap();
    // The replayed log, then the guest's echo of what went in on stdin.
    let out = read_until(stdout, "ready\nhello");
    assert_eq!(out.matches("hello").count(), 1, "{out:?}");

    // Stopping the guest ends the session; hvnodectl says so and exits cleanly.
    ok(&ctl(&m, &["guest", "stop", "n1", "echo"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("hvnodectl stayed attached after the guest stopped");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("Connected to echo; Ctrl-] detaches"), "{err}");
    assert!(err.contains("The console of echo closed"), "{err}");
    drop(stdin);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn guest_snapshot_commands_take_list_restore_and_delete_a_snapshot_of_a_real_guest() {
    let Some(RealGuests {
        agent,
        _vmms,
        work,
        m,
    }) = real_guests(
        "guest_snapshot_commands_take_list_restore_and_delete_a_snapshot_of_a_real_guest",
        "snap",
    )
    else {
        return;
    };
    std::fs::write(
        agent.dir.join("images/count.elf"),
        hvnode_vmm::payload::elf64(&hvnode_vmm::payload::MEMORY_COUNTER),
    )
    .unwrap();
    let spec = work.join("count.toml");
    std::fs::write(
        &spec,
        "name = \"count\"\nkernel = \"count.elf\"\nmemory_mib = 64\nrng = false\n",
    )
    .unwrap();
    ok(&ctl(&m, &["guest", "define", "n1", spec.to_str().unwrap()]));
    fails_with(
        &ctl(&m, &["guest", "snapshot", "n1", "count", "s1"]),
        "invalid_guest_state",
    );
    ok(&ctl(&m, &["guest", "start", "n1", "count"]));
    let taken = ok(&ctl(&m, &["guest", "snapshot", "n1", "count", "s1"]));
    assert!(
        taken.contains("snapshot s1 of guest count taken"),
        "{taken}"
    );
    let list = ok(&ctl(&m, &["guest", "snapshots", "n1", "count"]));
    assert!(list.contains("s1") && list.contains("64.0 MiB"), "{list}");
    assert!(ok(&ctl(&m, &["guest", "show", "n1", "count"])).contains("snapshots: s1"));
    fails_with(
        &ctl(&m, &["guest", "restore", "n1", "count", "s1"]),
        "guest_running",
    );
    ok(&ctl(&m, &["guest", "stop", "n1", "count"]));
    let restored = ok(&ctl(&m, &["guest", "restore", "n1", "count", "s1"]));
    assert!(
        restored.contains("restored from snapshot s1: running"),
        "{restored}"
    );
    ok(&ctl(&m, &["guest", "stop", "n1", "count"]));
    ok(&ctl(&m, &["guest", "snapshot-delete", "n1", "count", "s1"]));
    assert!(ok(&ctl(&m, &["guest", "snapshots", "n1", "count"])).contains("no snapshots"));
    fails_with(
        &ctl(&m, &["guest", "snapshot-delete", "n1", "count", "s1"]),
        "snapshot_not_found",
    );
}

/// The counter values of the complete lines of a guest's console log on a node.
/// Waits (`limit` at most) until `guest` has counted twice on `agent`'s console; the counts.
fn counts_twice(agent: &Agent, guest: &str, limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let c = console_counts(agent, guest);
        if c.len() >= 2 {
            return c;
        }
        assert!(Instant::now() < deadline, "{guest} does not count twice");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn console_counts(agent: &Agent, guest: &str) -> Vec<u32> {
    let log = std::fs::read_to_string(agent.dir.join(format!("run/vms/{guest}/console.log")))
        .unwrap_or_default();
    hvnode_vmm::payload::counter_lines(&log)
}

#[test]
fn guest_migrate_moves_a_running_guest_to_another_node_where_it_counts_on() {
    let test = "guest_migrate_moves_a_running_guest_to_another_node_where_it_counts_on";
    let Some(RealGuests {
        agent: a,
        _vmms,
        work,
        m,
    }) = real_guests(test, "mig-a")
    else {
        return;
    };
    let bin = agent_binary().unwrap();
    let vmm = bin.with_file_name("hvnode-vmm");
    let b = Agent::start_with(&bin, "mig-b", &["--vmm-binary".as_ref(), vmm.as_os_str()]);
    let _vmms_b = Vmms(b.dir.clone());
    let code = b.pairing_code();
    let registered = ok(&ctl(
        &m,
        &[
            "register",
            "n2",
            "--url",
            &b.url(),
            "--code",
            &code,
            "--yes",
        ],
    ));
    assert!(registered.contains("registered"), "{registered}");
    let payload = hvnode_vmm::payload::elf64(&hvnode_vmm::payload::MEMORY_COUNTER);
    std::fs::write(a.dir.join("images/count.elf"), &payload).unwrap();
    let spec = work.join("count.toml");
    std::fs::write(
        &spec,
        "name = \"count\"\nkernel = \"count.elf\"\nmemory_mib = 64\nrng = false\n",
    )
    .unwrap();
    ok(&ctl(&m, &["guest", "define", "n1", spec.to_str().unwrap()]));
    ok(&ctl(&m, &["guest", "start", "n1", "count"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while console_counts(&a, "count").len() < 3 {
        assert!(Instant::now() < deadline, "the guest never counted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Refused before anything moves: the kernel image is not on n2; the guest runs on n1.
    let refused = ctl(&m, &["guest", "migrate", "n1", "count", "--to", "n2"]);
    fails_with(&refused, "peer_refused");
    fails_with(&refused, "count.elf");
    assert!(ok(&ctl(&m, &["guest", "show", "n1", "count"])).contains("running"));
    fails_with(
        &ctl(&m, &["guest", "show", "n2", "count"]),
        "guest_not_found",
    );

    std::fs::write(b.dir.join("images/count.elf"), &payload).unwrap();
    let moved = ok(&ctl(
        &m,
        &[
            "guest",
            "migrate",
            "n1",
            "count",
            "--to",
            "n2",
            "--verify-memory",
        ],
    ));
    assert!(
        moved.contains("guest count migrated from n1 to n2: downtime"),
        "{moved}"
    );
    let last_on_a = *console_counts(&a, "count").last().unwrap();
    assert!(ok(&ctl(&m, &["guest", "list", "n1"])).contains("no guests"));
    assert!(ok(&ctl(&m, &["guest", "show", "n2", "count"])).contains("running"));
    let on_b = counts_twice(&b, "count", Duration::from_secs(30));
    assert!(
        on_b[0] == last_on_a + 1 || on_b[0] == last_on_a + 2,
        "n2 counts on from n1's {last_on_a}: {on_b:?}"
    );
    let arrival = b.local_json("GET", &Route::GuestMigration("count".into()).path(), None);
    assert_eq!(arrival["direction"], "incoming", "{arrival}");
    assert_eq!(arrival["status"]["phase"], "completed", "{arrival}");
    ok(&ctl(&m, &["guest", "stop", "n2", "count"]));

    // Disks: a writable one is on the node's own storage and does not migrate; a read-only one
    // must be the same image on the destination.
    std::fs::write(a.dir.join("images/rw.raw"), vec![0u8; 4096]).unwrap();
    std::fs::write(a.dir.join("images/ro.raw"), vec![0u8; 4096]).unwrap();
    std::fs::write(b.dir.join("images/ro.raw"), vec![0u8; 8192]).unwrap();
    for (guest, read_only) in [("rw", false), ("ro", true)] {
        let spec = work.join(format!("{guest}.toml"));
        std::fs::write(
            &spec,
            format!(
                "name = \"{guest}\"\nkernel = \"count.elf\"\nmemory_mib = 64\nrng = false\n\
                 [[disks]]\npath = \"{guest}.raw\"\nread_only = {read_only}\n"
            ),
        )
        .unwrap();
        ok(&ctl(&m, &["guest", "define", "n1", spec.to_str().unwrap()]));
        ok(&ctl(&m, &["guest", "start", "n1", guest]));
    }
    let refused = ctl(&m, &["guest", "migrate", "n1", "rw", "--to", "n2"]);
    fails_with(&refused, "disk_not_shared");
    fails_with(&refused, "rw.raw");
    let refused = ctl(&m, &["guest", "migrate", "n1", "ro", "--to", "n2"]);
    fails_with(&refused, "peer_refused");
    fails_with(&refused, "not the same image");
    for guest in ["rw", "ro"] {
        assert!(ok(&ctl(&m, &["guest", "show", "n1", guest])).contains("running"));
        ok(&ctl(&m, &["guest", "stop", "n1", guest]));
    }
    fails_with(&ctl(&m, &["guest", "show", "n2", "ro"]), "guest_not_found");
    let _ = std::fs::remove_dir_all(&work);
}

/// A `cluster status --json` of the manager at `m`.
fn cluster_status(m: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&ctl(m, &["--json", "cluster", "status"]))).expect("status JSON")
}

/// Waits (30 s at most) until the manager's `cluster status` satisfies `done`.
fn wait_status(
    m: &Path,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster_status(m);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// For a cluster test: the etcd binary, a runtime, and [`RealGuests`]; `None` (after
/// `cannot_run`) without them.
fn etcd_and_guests(
    test: &str,
    tag: &str,
) -> Option<(PathBuf, tokio::runtime::Runtime, RealGuests)> {
    let Some(etcd_bin) = hvnode_cluster::local_etcd::etcd_binary() else {
        hvnode_base::testing::cannot_run(
            test,
            "no etcd (Debian's etcd-server; image/setup-host.sh)",
        );
        return None;
    };
    let guests = real_guests(test, tag)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    Some((etcd_bin, rt, guests))
}

/// A real etcd that speaks TLS only and admits clients by certificate: its server certificate
/// and the client certificates (the manager's, the nodes') are all the manager's (state `m`)
/// CA's.
fn tls_etcd(
    rt: &tokio::runtime::Runtime,
    etcd_bin: &Path,
    m: &Path,
    work: &Path,
) -> hvnode_cluster::local_etcd::LocalEtcd {
    let certs = work.join("etcd-tls");
    ok(&ctl(
        m,
        &[
            "cluster",
            "etcd-certificate",
            "--san",
            "127.0.0.1",
            "--out",
            certs.to_str().unwrap(),
        ],
    ));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let server = hvnode_cluster::local_etcd::ServerTls {
        cert_pem: read(&certs.join("server.pem")),
        key_pem: read(&certs.join("server.key")),
        client_ca_pem: read(&certs.join("ca.pem")),
    };
    let manager = hvnode_cluster::Tls {
        ca_pem: read(&m.join("ca.pem")),
        cert_pem: read(&m.join("client.pem")),
        key_pem: read(&m.join("client.key")),
    };
    rt.block_on(hvnode_cluster::local_etcd::LocalEtcd::start_tls(
        etcd_bin,
        Duration::from_secs(20),
        &server,
        &manager,
    ))
    .expect("etcd starts")
}

#[test]
fn two_agents_form_a_cluster_on_a_real_etcd_over_tls_and_run_a_cluster_guest_on_either_node() {
    let test =
        "two_agents_form_a_cluster_on_a_real_etcd_over_tls_and_run_a_cluster_guest_on_either_node";
    let Some((
        etcd_bin,
        rt,
        RealGuests {
            agent: a,
            _vmms,
            work,
            m,
        },
    )) = etcd_and_guests(test, "cl-a")
    else {
        return;
    };
    let mut etcd = tls_etcd(&rt, &etcd_bin, &m, &work);
    let bin = agent_binary().unwrap();
    let vmm = bin.with_file_name("hvnode-vmm");
    let mut b = Agent::start_with(&bin, "cl-b", &["--vmm-binary".as_ref(), vmm.as_os_str()]);
    let _vmms_b = Vmms(b.dir.clone());

    // Bad endpoints are refused before anything is saved; a good one sets the cluster up and
    // the registered node joins it; a node registered after joins at registration.
    fails_with(
        &ctl(&m, &["cluster", "init", "--etcd", "127.0.0.1:2379"]),
        "not an http:// or https:// URL",
    );
    fails_with(&ctl(&m, &["cluster", "status"]), "No cluster is set up");
    fails_with(
        &ctl(
            &m,
            &[
                "cluster",
                "init",
                "--etcd",
                &format!("http://{}", etcd.endpoint()),
            ],
        ),
        "etcd unreachable",
    );
    let endpoint = etcd.url();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let init = ok(&ctl(&m, &["cluster", "init", "--etcd", &endpoint]));
    assert!(init.contains("nodes joining: n1"), "{init}");
    let code = b.pairing_code();
    ok(&ctl(
        &m,
        &[
            "register",
            "n2",
            "--url",
            &b.url(),
            "--code",
            &code,
            "--yes",
        ],
    ));
    let s = wait_status(&m, "both nodes are members with a leader", |s| {
        s["members"].as_object().is_some_and(|m| m.len() == 2) && s["leader"].is_string()
    });
    let leader = s["leader"].as_str().unwrap().to_owned();
    assert!(leader == "n1" || leader == "n2", "{s:#}");
    let nodes = ok(&ctl(&m, &["nodes"]));
    assert!(
        nodes.contains("CLUSTER") && nodes.contains(" leader") && nodes.contains(" member"),
        "{nodes}"
    );
    // Each agent shows the same cluster.
    for agent in [&a, &b] {
        let (_, view) = agent.local("GET", &Route::Cluster.path(), None).unwrap();
        assert!(view.contains("\"connection\":\"member\""), "{view}");
    }

    // A storage domain: every member tries to mount it and says how it went. This host's
    // kernel has no NFS client, so the mount fails, and each member shows why (the QEMU boot
    // test mounts a real export); a guest on an unknown domain, or bigger than any member, is
    // refused at definition.
    fails_with(
        &ctl(
            &m,
            &[
                "cluster",
                "domain",
                "add",
                "Bad",
                "--server",
                "127.0.0.1",
                "--export",
                "/x",
            ],
        ),
        "name:",
    );
    ok(&ctl(
        &m,
        &[
            "cluster",
            "domain",
            "add",
            "shared",
            "--server",
            "127.0.0.1",
            "--export",
            "/export",
            "--options",
            "port=1",
        ],
    ));
    let s = wait_status(&m, "both members report the domain", |s| {
        s["domains"]["shared"]["members"]
            .as_object()
            .is_some_and(|m| m.len() == 2 && m.values().all(|h| h["error"].is_string()))
    });
    assert_eq!(
        s["domains"]["shared"]["source"], "127.0.0.1:/export",
        "{s:#}"
    );
    // An upload to a domain that is not mounted is refused, not written under the mount point.
    let blank = work.join("blank.raw");
    std::fs::write(&blank, vec![0u8; 4096]).unwrap();
    fails_with(
        &ctl(
            &m,
            &[
                "image",
                "upload",
                "n1",
                blank.to_str().unwrap(),
                "shared:x/blank.raw",
            ],
        ),
        "Storage domain \"shared\" is not mounted",
    );
    let (_, view) = a.local("GET", &Route::Cluster.path(), None).unwrap();
    assert!(
        view.contains("\"name\":\"shared\"") && view.contains("mounting 127.0.0.1:/export"),
        "{view}"
    );
    let on_domain = work.join("on-domain.toml");
    std::fs::write(
        &on_domain,
        "name = \"od\"\nkernel = \"count.elf\"\nmemory_mib = 64\n[[disks]]\npath = \"elsewhere:d.raw\"\n",
    )
    .unwrap();
    fails_with(
        &ctl(
            &m,
            &["cluster", "guest", "define", on_domain.to_str().unwrap()],
        ),
        "which the cluster does not have",
    );
    let huge = work.join("huge.toml");
    std::fs::write(
        &huge,
        "name = \"huge\"\nkernel = \"count.elf\"\nmemory_mib = 1048576\n",
    )
    .unwrap();
    fails_with(
        &ctl(&m, &["cluster", "guest", "define", huge.to_str().unwrap()]),
        "the largest member has",
    );
    ok(&ctl(&m, &["cluster", "domain", "remove", "shared"]));
    assert!(ok(&ctl(&m, &["cluster", "domain", "list"])).contains("no storage domains"));

    // A cluster guest, the same image on both nodes (shared storage comes with NFS domains).
    let payload = hvnode_vmm::payload::elf64(&hvnode_vmm::payload::MEMORY_COUNTER);
    for agent in [&a, &b] {
        std::fs::write(agent.dir.join("images/count.elf"), &payload).unwrap();
    }
    let spec = work.join("cg.toml");
    std::fs::write(
        &spec,
        "name = \"cg\"\nkernel = \"count.elf\"\nmemory_mib = 64\nrng = false\n",
    )
    .unwrap();
    let spec = spec.to_str().unwrap();
    ok(&ctl(&m, &["cluster", "guest", "define", spec, "--stopped"]));
    fails_with(
        &ctl(&m, &["cluster", "guest", "define", spec]),
        "A cluster guest named \"cg\" exists",
    );
    let started = ok(&ctl(&m, &["cluster", "guest", "start", "cg", "--on", "n1"]));
    assert!(started.contains("cluster guest cg runs on n1"), "{started}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while console_counts(&a, "cg").len() < 2 {
        assert!(Instant::now() < deadline, "cg does not count on n1");
        std::thread::sleep(Duration::from_millis(50));
    }
    // On n1 it is a guest like another, but the cluster's: not changed through the node.
    let shown = ok(&ctl(&m, &["--json", "guest", "show", "n1", "cg"]));
    assert!(shown.contains("\"cluster\":true"), "{shown}");
    fails_with(&ctl(&m, &["guest", "delete", "n1", "cg"]), "cluster_guest");
    fails_with(&ctl(&m, &["cluster", "leave", "n1"]), "guest_running");
    fails_with(
        &ctl(&m, &["cluster", "guest", "delete", "cg"]),
        "is not stopped",
    );

    // Stopped through the cluster, then started on the other node.
    let stopped = ok(&ctl(&m, &["cluster", "guest", "stop", "cg"]));
    assert!(stopped.contains("cluster guest cg stopped"), "{stopped}");
    // Unplaced, the guest leaves n1 at n1's next look at the cluster.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(&ctl(&m, &["guest", "list", "n1"])).contains("no guests") {
        assert!(
            Instant::now() < deadline,
            "n1 keeps the stopped cluster guest"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = ok(&ctl(&m, &["cluster", "guest", "start", "cg", "--on", "n2"]));
    assert!(started.contains("cluster guest cg runs on n2"), "{started}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while console_counts(&b, "cg").len() < 2 {
        assert!(Instant::now() < deadline, "cg does not count on n2");
        std::thread::sleep(Duration::from_millis(50));
    }
    let list = ok(&ctl(&m, &["cluster", "guest", "list"]));
    assert!(
        list.contains("cg") && list.contains("n2") && list.contains("yes"),
        "{list}"
    );

    // n2's agent dies: its lease lapses and everyone sees it gone within the TTL; its guest
    // stays placed there (not HA): nothing starts it twice.
    let _ = b.child.kill();
    let _ = b.child.wait();
    let s = wait_status(&m, "n2 is lost", |s| {
        s["members"].as_object().is_some_and(|m| m.len() == 1)
            && s["not_members"].as_array().is_some_and(|n| n.len() == 1)
    });
    assert_eq!(s["leader"], "n1", "{s:#}");
    assert_eq!(s["guests"]["cg"]["node"], "n2", "{s:#}");
    let nodes = ok(&ctl(&m, &["--json", "nodes"]));
    assert!(nodes.contains("\"cluster\":\"lost\""), "{nodes}");
    assert!(ok(&ctl(&m, &["guest", "list", "n1"])).contains("no guests"));

    // etcd goes away: n1 says so and keeps what it runs.
    let name = "local";
    let local = work.join("local.toml");
    std::fs::write(
        &local,
        format!("name = \"{name}\"\nkernel = \"count.elf\"\nmemory_mib = 64\nrng = false\n"),
    )
    .unwrap();
    ok(&ctl(
        &m,
        &["guest", "define", "n1", local.to_str().unwrap()],
    ));
    ok(&ctl(&m, &["guest", "start", "n1", name]));
    etcd.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, view) = a.local("GET", &Route::Cluster.path(), None).unwrap();
        if view.contains("\"connection\":\"unreachable\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n1 does not see etcd gone: {view}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ok(&ctl(&m, &["guest", "show", "n1", name])).contains("running"));
    fails_with(&ctl(&m, &["cluster", "status"]), "etcd unreachable");
}

/// A TCP link from a loopback port to `to` that the test cuts and mends: cut, its connections
/// close and new ones close at once (the node behind it loses etcd, nothing else).
struct Link {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Link {
    fn new(to: &str) -> Link {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, o, to) = (cut.clone(), open.clone(), to.to_owned());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(up) = std::net::TcpStream::connect(&to) else {
                    continue;
                };
                let mut list = o.lock().unwrap();
                for s in [&conn, &up] {
                    list.push(s.try_clone().unwrap());
                }
                for (mut from, mut into) in [
                    (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, conn),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Link { port, cut, open }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn mend(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The node's view of the cluster (its local API).
fn view(agent: &Agent) -> serde_json::Value {
    agent.local_json("GET", &Route::Cluster.path(), None)
}

/// Waits (60 s at most) until `agent`'s cluster view satisfies `done`.
fn wait_view(agent: &Agent, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = view(agent);
        if done(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a VMM runs `guest` on the node.
fn runs(agent: &Agent, guest: &str) -> bool {
    let (status, body) = agent
        .local("GET", &Route::Guest(guest.into()).path(), None)
        .unwrap();
    status == 200
        && serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["state"] == "running")
}

#[test]
fn ha_a_node_cut_from_etcd_kills_its_ha_guest_before_its_lease_ends_and_a_quorum_loss_kills_nothing(
) {
    let test = "ha_a_node_cut_from_etcd_kills_its_ha_guest_before_its_lease_ends_and_a_quorum_loss_kills_nothing";
    let Some((
        etcd_bin,
        rt,
        RealGuests {
            agent: mut a,
            _vmms,
            work,
            m,
        },
    )) = etcd_and_guests(test, "ha-a")
    else {
        return;
    };
    let etcd = tls_etcd(&rt, &etcd_bin, &m, &work);
    // Each node reaches etcd through a link of its own; the manager directly.
    let (link_a, link_b) = (Link::new(etcd.endpoint()), Link::new(etcd.endpoint()));
    ok(&ctl(&m, &["cluster", "init", "--etcd", &etcd.url()]));
    let bin = agent_binary().unwrap();
    let vmm = bin.with_file_name("hvnode-vmm");
    let extra = ["--vmm-binary".as_ref(), vmm.as_os_str()];
    let b = Agent::start_with(&bin, "ha-b", &extra);
    let _vmms_b = Vmms(b.dir.clone());
    let code = b.pairing_code();
    ok(&ctl(
        &m,
        &[
            "register",
            "n2",
            "--url",
            &b.url(),
            "--code",
            &code,
            "--yes",
        ],
    ));
    // Each node certified by the manager (it asks its peers with that certificate), then
    // joined through its link.
    for (agent, node, link) in [(&a, "n1", &link_a), (&b, "n2", &link_b)] {
        let mut join: serde_json::Value = toml::from_str::<serde_json::Value>(
            &std::fs::read_to_string(agent.dir.join("data/cluster.toml")).unwrap(),
        )
        .unwrap();
        join["endpoints"] = serde_json::json!([link.url()]);
        agent.local_json("PUT", &Route::Cluster.path(), Some(&join.to_string()));
        wait_view(agent, &format!("{node} joins through its link"), |v| {
            v["connection"] == "member" && v["fencing"]["state"] == "guarding"
        });
    }
    wait_status(&m, "both nodes are members with a leader", |s| {
        s["members"].as_object().is_some_and(|m| m.len() == 2) && s["leader"].is_string()
    });
    // Without init (this test runs the agent alone) there is no watchdog, and each node says
    // so: should it be lost, its HA guests stay where they are.
    let v = view(&a);
    assert!(
        v["fencing"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no watchdog")),
        "{v:#}"
    );

    let payload = hvnode_vmm::payload::elf64(&hvnode_vmm::payload::MEMORY_COUNTER);
    for agent in [&a, &b] {
        std::fs::write(agent.dir.join("images/count.elf"), &payload).unwrap();
    }
    let spec = work.join("hg.toml");
    std::fs::write(
        &spec,
        "name = \"hg\"\nkernel = \"count.elf\"\nmemory_mib = 64\nrng = false\n",
    )
    .unwrap();
    let spec = spec.to_str().unwrap();
    ok(&ctl(
        &m,
        &["cluster", "guest", "define", spec, "--ha", "--stopped"],
    ));
    ok(&ctl(&m, &["cluster", "guest", "start", "hg", "--on", "n1"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !runs(&a, "hg") {
        assert!(Instant::now() < deadline, "hg does not run on n1");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A quorum loss: no node reaches etcd. n1 (with an HA guest) asks n2, which has lost it
    // too: nobody fences, the HA guest runs on.
    link_a.cut();
    link_b.cut();
    wait_view(&a, "n1 sees a quorum loss", |v| {
        v["fencing"]["state"] == "quorum_lost"
    });
    wait_view(&b, "n2 is in doubt", |v| v["fencing"]["state"] == "doubt");
    assert!(runs(&a, "hg"), "a quorum loss killed the HA guest");
    link_a.mend();
    link_b.mend();
    for agent in [&a, &b] {
        wait_view(agent, "the node is a member again", |v| {
            v["connection"] == "member" && v["fencing"]["state"] == "guarding"
        });
    }
    assert!(runs(&a, "hg"), "the HA guest stopped over the quorum loss");

    // A partition: n1 alone loses etcd. n2 holds its lease, so n1 kills its HA guest itself,
    // before the others can see its lease gone.
    wait_status(&m, "both nodes are members again", |s| {
        s["members"].as_object().is_some_and(|m| m.len() == 2)
    });
    link_a.cut();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut killed_first = None;
    loop {
        let lost = cluster_status(&m)["members"]
            .as_object()
            .is_some_and(|m| !m.contains_key("n1"));
        let alive = runs(&a, "hg");
        if !alive && killed_first.is_none() {
            killed_first = Some(!lost);
        }
        if lost {
            break;
        }
        assert!(Instant::now() < deadline, "n1 is never lost");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        killed_first,
        Some(true),
        "n1 still ran its HA guest when its lease ended"
    );
    let v = view(&a);
    assert_eq!(v["fencing"]["state"], "fenced", "{v:#}");
    assert!(
        v["fencing"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("n2 holds its own")),
        "{v:#}"
    );
    // n1 had no watchdog: the leader does not restart its guest elsewhere, and says why.
    wait_view(&b, "n2 says why hg waits", |v| {
        v["guests"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["name"] == "hg"))
            .and_then(|g| g["reason"].as_str())
            .is_some_and(|r| r.contains("no watchdog armed"))
    });
    assert!(!runs(&b, "hg"));

    // The admin moves it (stop, start again: n2 is the only member); n1, fenced, stays out
    // of the cluster until its reset (here an agent restart), then gives the guest up.
    ok(&ctl(&m, &["cluster", "guest", "stop", "hg"]));
    wait_status(&m, "hg is unplaced", |s| {
        s["guests"]["hg"]["node"].is_null()
    });
    ok(&ctl(&m, &["cluster", "guest", "start", "hg"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !runs(&b, "hg") {
        assert!(Instant::now() < deadline, "hg does not run on n2");
        std::thread::sleep(Duration::from_millis(50));
    }
    link_a.mend();
    wait_view(&a, "n1 stays out, fenced", |v| {
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("fenced itself"))
    });
    a.restart(&bin, &extra);
    wait_view(&a, "n1 is a member again", |v| v["connection"] == "member");
    let deadline = Instant::now() + Duration::from_secs(20);
    while a
        .local("GET", &Route::Guest("hg".into()).path(), None)
        .unwrap()
        .0
        != 404
    {
        assert!(Instant::now() < deadline, "n1 keeps hg's definition");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(runs(&b, "hg") && !runs(&a, "hg"));

    // An HA guest that crashes is started again on its node (after 4, 8, 16 s); at its fourth
    // crash it goes to the other node.
    let pid = |agent: &Agent| {
        std::fs::read_to_string(agent.dir.join("run/vms/hg/pid"))
            .map(|p| p.trim().to_owned())
            .unwrap_or_default()
    };
    for crash in 1..=4 {
        let before = pid(&b);
        assert!(!before.is_empty(), "no VMM pid for hg on n2");
        let _ = Command::new("kill").args(["-9", &before]).status();
        if crash == 4 {
            break;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(runs(&b, "hg") && pid(&b) != before) {
            assert!(
                Instant::now() < deadline,
                "hg is not started again on n2 after crash {crash}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !runs(&a, "hg") {
        assert!(
            Instant::now() < deadline,
            "hg does not move to n1 after crashing too often on n2: {:#}",
            cluster_status(&m)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!runs(&b, "hg"));
}

/// The `maintenance` object of an agent's `GET /v1/cluster`.
fn maintenance_of(agent: &Agent) -> serde_json::Value {
    agent.local_json("GET", &Route::Cluster.path(), None)["maintenance"].clone()
}

#[test]
fn maintenance_mode_drains_a_node_by_live_migration_survives_a_restart_and_stops_by_policy() {
    let test =
        "maintenance_mode_drains_a_node_by_live_migration_survives_a_restart_and_stops_by_policy";
    let Some((
        etcd_bin,
        rt,
        RealGuests {
            agent: mut a,
            _vmms,
            work,
            m,
        },
    )) = etcd_and_guests(test, "mt-a")
    else {
        return;
    };
    let etcd = rt
        .block_on(hvnode_cluster::local_etcd::LocalEtcd::start(
            &etcd_bin,
            Duration::from_secs(20),
        ))
        .expect("etcd starts");
    let bin = agent_binary().unwrap();
    let vmm = bin.with_file_name("hvnode-vmm");
    let extra = ["--vmm-binary".as_ref(), vmm.as_os_str()];
    let b = Agent::start_with(&bin, "mt-b", &extra);
    let _vmms_b = Vmms(b.dir.clone());

    // Maintenance mode needs a cluster.
    fails_with(
        &ctl(&m, &["node", "maintenance", "n1", "on"]),
        "not_in_cluster",
    );
    ok(&ctl(&m, &["cluster", "init", "--etcd", &etcd.url()]));
    let code = b.pairing_code();
    ok(&ctl(
        &m,
        &[
            "register",
            "n2",
            "--url",
            &b.url(),
            "--code",
            &code,
            "--yes",
        ],
    ));
    wait_status(&m, "both nodes are members", |s| {
        s["members"].as_object().is_some_and(|m| m.len() == 2)
    });
    let payload = hvnode_vmm::payload::elf64(&hvnode_vmm::payload::MEMORY_COUNTER);
    for agent in [&a, &b] {
        std::fs::write(agent.dir.join("images/count.elf"), &payload).unwrap();
        std::fs::write(agent.dir.join("images/rw.raw"), vec![0u8; 4096]).unwrap();
    }

    // n2 in maintenance takes nothing: the guest goes to n1; then n2 takes guests again.
    let set = ok(&ctl(&m, &["node", "maintenance", "n2", "on", "--no-wait"]));
    assert!(
        set.contains("maintenance mode on (policy restart)"),
        "{set}"
    );
    wait_status(&m, "n2's record says maintenance", |s| {
        s["members"]["n2"]["state"] == "maintenance"
    });
    let spec = work.join("cg.toml");
    std::fs::write(
        &spec,
        "name = \"cg\"\nkernel = \"count.elf\"\nmemory_mib = 64\nrng = false\n",
    )
    .unwrap();
    ok(&ctl(
        &m,
        &["cluster", "guest", "define", spec.to_str().unwrap()],
    ));
    let s = wait_status(&m, "cg runs on n1", |s| {
        s["guests"]["cg"]["running"] == true
    });
    assert_eq!(s["guests"]["cg"]["node"], "n1", "{s:#}");
    let off = ok(&ctl(&m, &["node", "maintenance", "n2", "off"]));
    assert!(off.contains("maintenance mode off"), "{off}");
    wait_status(&m, "n2 is active again", |s| {
        s["members"]["n2"]["state"] == "active"
    });
    assert_eq!(maintenance_of(&b)["state"], "off");
    let deadline = Instant::now() + Duration::from_secs(20);
    while console_counts(&a, "cg").len() < 3 {
        assert!(Instant::now() < deadline, "cg does not count on n1");
        std::thread::sleep(Duration::from_millis(50));
    }

    // n1 in maintenance: cg live-migrates to n2, counting on, and its placement follows it.
    let out = ctl(&m, &["node", "maintenance", "n1", "on"]);
    let drained = ok(&out);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(drained.contains("node n1 is drained"), "{drained}");
    assert!(
        progress.contains("node n1: draining, 1 left (cg)"),
        "{progress}"
    );
    let moved = a.local_json("GET", &Route::GuestMigration("cg".into()).path(), None);
    assert_eq!(
        (&moved["direction"], &moved["status"]["phase"]),
        (&"outgoing".into(), &"completed".into()),
        "{moved}"
    );
    let s = wait_status(&m, "cg runs on n2, placed there", |s| {
        s["guests"]["cg"]["node"] == "n2" && s["guests"]["cg"]["running"] == true
    });
    assert_eq!(s["members"]["n1"]["state"], "maintenance", "{s:#}");
    let last_on_a = *console_counts(&a, "cg").last().unwrap();
    let on_b = counts_twice(&b, "cg", Duration::from_secs(20));
    assert!(
        on_b[0] == last_on_a + 1 || on_b[0] == last_on_a + 2,
        "n2 counts on from n1's {last_on_a}: {on_b:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(&ctl(&m, &["guest", "list", "n1"])).contains("no guests") {
        assert!(Instant::now() < deadline, "cg is still defined on n1");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok(&ctl(&m, &["--json", "guest", "show", "n2", "cg"])).contains("\"cluster\":true"));
    let nodes = ok(&ctl(&m, &["nodes"]));
    assert!(nodes.contains("(maintenance)"), "{nodes}");

    // The mode survives a restart of n1's agent: still in maintenance, drained again.
    a.restart(&bin, &extra);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = maintenance_of(&a);
        assert_eq!(v["on"], true, "{v}");
        if v["state"] == "drained" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n1 is not drained after its restart: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = cluster_status(&m);
    assert_eq!(s["members"]["n1"]["state"], "maintenance", "{s:#}");

    // Policy stop: a guest with a writable disk cannot live-migrate; the drain stops at it
    // (priority first) and says why, and the guest keeps running.
    let rw = work.join("rw.toml");
    std::fs::write(
        &rw,
        "name = \"rw\"\nkernel = \"count.elf\"\nmemory_mib = 64\nrng = false\n\
         [[disks]]\npath = \"rw.raw\"\n",
    )
    .unwrap();
    ok(&ctl(
        &m,
        &[
            "cluster",
            "guest",
            "define",
            rw.to_str().unwrap(),
            "--priority",
            "5",
        ],
    ));
    wait_status(&m, "rw runs on n2", |s| {
        s["guests"]["rw"]["running"] == true && s["guests"]["rw"]["node"] == "n2"
    });
    ok(&ctl(&m, &["node", "maintenance", "n1", "off"]));
    wait_status(&m, "n1 is active again", |s| {
        s["members"]["n1"]["state"] == "active"
    });
    let refused = ctl(&m, &["node", "maintenance", "n2", "on", "--policy", "stop"]);
    fails_with(&refused, "the drain stopped: rw cannot live-migrate");
    fails_with(&refused, "writable disk");
    let v = maintenance_of(&b);
    assert_eq!(
        (&v["state"], &v["policy"]),
        (&"stopped".into(), &"stop".into()),
        "{v}"
    );
    let s = cluster_status(&m);
    assert!(
        s["guests"]["rw"]["running"] == true && s["guests"]["rw"]["node"] == "n2",
        "{s:#}"
    );

    // Off: n2 is an active node again.
    ok(&ctl(&m, &["node", "maintenance", "n2", "off"]));
    wait_status(&m, "n2 is active again", |s| {
        s["members"]["n2"]["state"] == "active"
    });
    let v = maintenance_of(&b);
    assert_eq!(
        (&v["on"], &v["state"]),
        (&false.into(), &"off".into()),
        "{v}"
    );
    drop(etcd);
    let _ = std::fs::remove_dir_all(&work);
}
