//! What the VMM benchmarks share. Failures panic rather than exit: the panic unwinds through
//! the benchmark's frames, so every [`Vmm`] they hold is killed and reaped on the way out.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use hvnode_api::vmm::{VmmRequest, VmmResponse};

/// The release VMM: the first argument, or `target/release/hvnode-vmm`; exits saying how to
/// build it when it is missing (before anything runs).
pub fn vmm_binary() -> PathBuf {
    let vmm = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/hvnode-vmm"));
    if !vmm.is_file() {
        eprintln!(
            "error: {} missing: cargo build --release -p hvnode-vmm",
            vmm.display()
        );
        std::process::exit(1);
    }
    vmm
}

/// A VMM process, killed and reaped when dropped.
#[derive(Debug)]
pub struct Vmm(pub Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One control request on the VMM's socket and its answer (`None`: no answer).
pub fn ask(socket: &Path, req: &VmmRequest) -> Option<VmmResponse> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    writeln!(s, "{}", serde_json::to_string(req).ok()?).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// Polls until `f` holds; panics saying `what` after `limit`.
pub fn wait(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {} s",
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
