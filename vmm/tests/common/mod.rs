//! Helpers shared by the VMM's integration tests (each test file is its own crate).

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Child, Command};

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
