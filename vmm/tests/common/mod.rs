//! Helpers shared by the VMM's integration tests (each test file is its own crate).

use std::path::PathBuf;

/// Whether /dev/kvm can be opened; says why `test` is skipped when it cannot.
pub fn kvm_usable(test: &str) -> bool {
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

/// A fresh, empty scratch directory for `name` in this test process.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvnode-vmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
