//! Helpers shared by the VMM's integration tests (each test file is its own crate).

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Whether /dev/kvm can be opened; says why `test` is skipped when it cannot.
pub fn kvm_usable(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        hvnode_base::testing::cannot_run(test, "/dev/kvm not available");
    }
    ok
}

/// A fresh, empty scratch directory for `name` in this test process.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvnode-vmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A VMM under test, killed and reaped when dropped: however the test ends (a failed assert
/// included), no spinning or paused guest outlives it or holds its pipes open.
#[derive(Debug)]
pub struct Vmm(Child);

impl Vmm {
    /// Starts `cmd`, the VMM.
    pub fn spawn(cmd: &mut Command) -> Vmm {
        Vmm(cmd.spawn().expect("starting hvnode-vmm"))
    }
}

impl Deref for Vmm {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Vmm {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        // Both fail only for a VMM that was already reaped, which is what they are for.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a payload's VMM starts.
#[allow(dead_code)] // Each test crate uses the helpers it needs.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Booted.
    Boot,
    /// Restored from the snapshot in this directory.
    Restore(&'a Path),
    /// Waiting for a migrating guest on this socket.
    Incoming(&'a Path),
}

/// Starts the VMM on the payload `code` (written to `dir/payload.elf` once) as run `run` of
/// guest `name`: one vCPU, `memory_mib`, and the run's own serial log (`run.log`), control
/// socket (`run.sock`), exit file (`run.exit.json`) and stderr (`run.stderr`) in `dir`.
#[allow(dead_code)]
pub fn spawn_payload(
    dir: &Path,
    run: &str,
    name: &str,
    code: &[u8],
    memory_mib: u64,
    start: Start<'_>,
) -> Vmm {
    let kernel = dir.join("payload.elf");
    if !kernel.exists() {
        std::fs::write(&kernel, hvnode_vmm::payload::elf64(code)).unwrap();
    }
    let config = serde_json::json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": memory_mib,
        "kernel": kernel,
        "serial_log": dir.join(format!("{run}.log")),
        "control_socket": dir.join(format!("{run}.sock")),
        "exit_file": dir.join(format!("{run}.exit.json")),
    })
    .to_string();
    let stderr = std::fs::File::create(dir.join(format!("{run}.stderr"))).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hvnode-vmm"));
    cmd.args(["--config-json", &config]);
    match start {
        Start::Boot => {}
        Start::Restore(snap) => {
            cmd.arg("--restore").arg(snap);
        }
        Start::Incoming(sock) => {
            cmd.arg("--incoming").arg(sock);
        }
    }
    Vmm::spawn(cmd.stderr(Stdio::from(stderr)))
}
