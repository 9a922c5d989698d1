//! Host KVM tests of snapshots: a guest that counts in memory is snapshotted while it runs,
//! stopped, and restored by a new VMM, whose serial output carries on from the counter in the
//! snapshot; the refusals (an existing or relative directory, a config that does not match, a
//! corrupt state file). Where /dev/kvm is missing or unusable they say so and pass.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

mod common;
use common::{kvm_usable, scratch, spawn_payload, Start, Vmm};

use hvnode_api::vmm::{SNAPSHOT_CONFIG, SNAPSHOT_MEMORY, SNAPSHOT_STATE};
use hvnode_vmm::payload::{MEMORY_COUNTER, MEMORY_COUNTER_ADDR};

/// How long anything the tests wait for may take, on a loaded machine too.
const LIMIT: Duration = Duration::from_secs(30);

/// The counter payload's run `run` in `dir`, booted or restored from `restore`.
fn spawn(dir: &Path, run: &str, memory_mib: u64, restore: Option<&Path>) -> Vmm {
    let start = restore.map_or(Start::Boot, Start::Restore);
    spawn_payload(dir, run, "counter", &MEMORY_COUNTER, memory_mib, start)
}

fn wait_status(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the VMM did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The counter values of the complete lines of a run's serial log.
fn counts(dir: &Path, run: &str) -> Vec<u32> {
    let log = std::fs::read_to_string(dir.join(format!("{run}.log"))).unwrap_or_default();
    hvnode_vmm::payload::counter_lines(&log)
}

/// Polls a run's serial log until `done` holds for its counter values.
fn wait_counts(dir: &Path, run: &str, what: &str, done: impl Fn(&[u32]) -> bool) -> Vec<u32> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let c = counts(dir, run);
        if done(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {run} counted {:?}",
            c.last()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Control {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Control {
    fn connect(dir: &Path, run: &str) -> Control {
        let deadline = Instant::now() + LIMIT;
        let sock = loop {
            if let Ok(s) = UnixStream::connect(dir.join(format!("{run}.sock"))) {
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

    fn ask(&mut self, req: serde_json::Value) -> serde_json::Value {
        writeln!(self.w, "{req}").unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn snapshot(&mut self, dir: &Path) -> serde_json::Value {
        self.ask(serde_json::json!({"op": "snapshot", "dir": dir}))
    }
}

/// A directory the VMM, which drops to nobody once it runs, may create snapshots in.
fn snapshots_dir(dir: &Path) -> PathBuf {
    let snaps = dir.join("snapshots");
    std::fs::create_dir(&snaps).unwrap();
    std::fs::set_permissions(&snaps, std::fs::Permissions::from_mode(0o777)).unwrap();
    snaps
}

/// The counter as the snapshot's memory file holds it.
fn counter_in(snap: &Path) -> u32 {
    let mem = std::fs::read(snap.join(SNAPSHOT_MEMORY)).unwrap();
    let at = MEMORY_COUNTER_ADDR as usize;
    u32::from_le_bytes(mem[at..at + 4].try_into().unwrap())
}

/// Runs the counter, snapshots it once it has counted a little, and stops it; the snapshot
/// directory and the snapshot's answer.
fn counter_snapshot(dir: &Path) -> (PathBuf, serde_json::Value) {
    let snap = snapshots_dir(dir).join("one");
    let mut vmm = spawn(dir, "first", 64, None);
    let mut ctl = Control::connect(dir, "first");
    wait_counts(dir, "first", "the counter to start", |c| c.len() >= 16);
    let answer = ctl.snapshot(&snap);
    assert_eq!(ctl.ask(serde_json::json!({"op": "stop"}))["result"], "ok");
    assert_eq!(wait_status(&mut vmm).code(), Some(0));
    (snap, answer)
}

#[test]
fn a_running_guest_snapshotted_keeps_running_and_a_restore_carries_on_counting() {
    if !kvm_usable("a_running_guest_snapshotted_keeps_running_and_a_restore_carries_on_counting") {
        return;
    }
    let dir = scratch("snap-roundtrip");
    let snap = snapshots_dir(&dir).join("one");
    let mut first = spawn(&dir, "first", 64, None);
    let mut ctl = Control::connect(&dir, "first");
    wait_counts(&dir, "first", "the counter to start", |c| c.len() >= 16);

    let started = Instant::now();
    let answer = ctl.snapshot(&snap);
    let snapshot_took = started.elapsed();
    assert_eq!(answer["result"], "snapshot", "{answer}");
    let info = &answer["snapshot"];
    assert_eq!(info["memory_bytes"], 64 << 20);
    let written = info["memory_written_bytes"].as_u64().unwrap();
    assert!(written > 0 && written < 4 << 20, "{info}");
    eprintln!("snapshot of a running 64 MiB guest: {info} in {snapshot_took:?}");
    for name in [SNAPSHOT_CONFIG, SNAPSHOT_STATE, SNAPSHOT_MEMORY] {
        assert!(snap.join(name).is_file(), "{name} missing");
    }
    let mem = std::fs::metadata(snap.join(SNAPSHOT_MEMORY)).unwrap();
    assert_eq!(mem.len(), 64 << 20);
    let on_disk = std::os::unix::fs::MetadataExt::blocks(&mem) * 512;
    assert!(
        on_disk < 8 << 20,
        "the memory file is not sparse: {on_disk} bytes on disk"
    );
    let at_snapshot = counter_in(&snap);
    assert!(at_snapshot >= 16, "counter {at_snapshot}");

    // The guest runs on after the snapshot, and refusals cost it nothing.
    assert_eq!(
        ctl.ask(serde_json::json!({"op": "describe"}))["state"],
        "running"
    );
    let existing = ctl.snapshot(&snap);
    assert_eq!(existing["code"], "bad_request", "{existing}");
    assert!(
        existing["message"].as_str().unwrap().contains("exists"),
        "{existing}"
    );
    let relative = ctl.snapshot(Path::new("relative/snap"));
    assert_eq!(relative["code"], "bad_request", "{relative}");
    wait_counts(&dir, "first", "the counter to go on", |c| {
        c.last().is_some_and(|&n| n > at_snapshot + 32)
    });
    assert_eq!(
        ctl.ask(serde_json::json!({"op": "describe"}))["state"],
        "running"
    );
    assert_eq!(ctl.ask(serde_json::json!({"op": "stop"}))["result"], "ok");
    assert_eq!(wait_status(&mut first).code(), Some(0));
    let reached = *counts(&dir, "first").last().unwrap();

    let started = Instant::now();
    let mut second = spawn(&dir, "second", 64, Some(&snap));
    wait_counts(&dir, "second", "the restored counter", |c| !c.is_empty());
    let first_line = started.elapsed();
    let after = wait_counts(&dir, "second", "the restored counter", |c| c.len() >= 4);
    eprintln!(
        "restored: first line {first_line:?} after the start, {:08x}.. (snapshot at \
         {at_snapshot:08x}, the first run reached {reached:08x})",
        after[0]
    );
    // Paused between the increment and the end of its line, the guest finishes that line
    // first: the first complete line is the snapshot's value or the one after it.
    assert!(
        after[0] == at_snapshot || after[0] == at_snapshot + 1,
        "restored at {:08x}, snapshot at {at_snapshot:08x}",
        after[0]
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:x?}");
    let mut ctl = Control::connect(&dir, "second");
    assert_eq!(
        ctl.ask(serde_json::json!({"op": "describe"}))["state"],
        "running"
    );
    assert_eq!(ctl.ask(serde_json::json!({"op": "stop"}))["result"], "ok");
    assert_eq!(wait_status(&mut second).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a VMM that should refuse to start; its exit code and stderr.
fn refused(dir: &Path, run: &str, memory_mib: u64, snap: &Path) -> (Option<i32>, String) {
    let mut vmm = spawn(dir, run, memory_mib, Some(snap));
    let status = wait_status(&mut vmm);
    let stderr = std::fs::read_to_string(dir.join(format!("{run}.stderr"))).unwrap();
    (status.code(), stderr)
}

#[test]
fn a_restore_refuses_another_memory_size_and_a_corrupt_state_file_naming_why() {
    if !kvm_usable("a_restore_refuses_another_memory_size_and_a_corrupt_state_file_naming_why") {
        return;
    }
    let dir = scratch("snap-refusals");
    let (snap, answer) = counter_snapshot(&dir);
    assert_eq!(answer["result"], "snapshot", "{answer}");

    let (code, stderr) = refused(&dir, "bigger", 128, &snap);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("memory_mib 64 in the snapshot, 128 now"),
        "{stderr}"
    );
    let exit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("bigger.exit.json")).unwrap()).unwrap();
    assert!(
        exit["reason"].as_str().unwrap().contains("memory_mib"),
        "{exit}"
    );

    // One byte of the body flipped: a digit of the saved instruction pointer.
    let state_path = snap.join(SNAPSHOT_STATE);
    let mut state = std::fs::read(&state_path).unwrap();
    let rip = state.windows(6).position(|w| w == b"\"rip\":").unwrap() + 6;
    state[rip] = if state[rip] == b'1' { b'2' } else { b'1' };
    std::fs::write(&state_path, &state).unwrap();
    let (code, stderr) = refused(&dir, "corrupt", 64, &snap);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(stderr.contains(SNAPSHOT_STATE), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
