//! The VMM's jail on /dev/kvm, seen from outside: started as the agent starts it (its own PID
//! namespace and cgroup, `hvnode_base::spawn`) with a `jail` in its config, a VMM runs as its own
//! uid, alone in its PID namespace, in a mount and IPC namespace whose root holds nothing but its
//! snapshot directory (none of another guest's files), in its cgroup with the limits set, and
//! the limits hold it. Needs root and /dev/kvm: without them the tests say so and pass, but
//! fail under `CI=true`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvnode_base::cgroup::{Cgroup, Limits, Version};
use hvnode_base::spawn::{Child, Spawn};
use hvnode_vmm::payload::{elf64, serial_print, touch_pages, SPIN};

mod common;
use common::{kvm_usable, scratch};

/// Root and /dev/kvm, or says why `test` cannot run.
fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        hvnode_base::testing::cannot_run(test, "jails need root");
        return false;
    }
    kvm_usable(test)
}

/// A jailed VMM, killed and reaped and its cgroup removed when dropped, however the test ends.
struct Jailed {
    child: Child,
    cgroup: Cgroup,
    dir: PathBuf,
    name: String,
}

impl Drop for Jailed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.cgroup.remove();
    }
}

impl Jailed {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    fn ask(&self, req: serde_json::Value) -> serde_json::Value {
        let sock = UnixStream::connect(self.dir.join(format!("{}.sock", self.name))).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        writeln!(&sock, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(&sock).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .contains(text)
        {
            assert!(
                Instant::now() < deadline,
                "{} never printed {text:?}; stderr: {}",
                self.name,
                std::fs::read_to_string(self.dir.join(format!("{}.stderr", self.name)))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A uid for this test's guest `index` far from the agent's slots in use by other tests.
fn test_id(index: u32) -> u32 {
    hvnode_api::vmm::JAIL_ID_BASE + 60_000 + (std::process::id() % 1000) * 4 + index
}

/// Starts guest `name` (payload `code`, `vcpus`, `memory_mib`) jailed as `id`, in its own PID
/// namespace and in a cgroup of `limits`, with a snapshot directory of its own when asked.
#[allow(clippy::too_many_arguments)]
fn start(
    dir: &Path,
    name: &str,
    code: &[u8],
    vcpus: u32,
    memory_mib: u64,
    id: u32,
    limits: &Limits,
    snapshots: Option<&Path>,
) -> Jailed {
    let kernel = dir.join(format!("{name}.elf"));
    std::fs::write(&kernel, elf64(code)).unwrap();
    let disk = dir.join(format!("{name}.img"));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = serde_json::json!({
        "name": name,
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "kernel": kernel,
        "disks": [{"path": disk}],
        "serial_log": dir.join(format!("{name}.log")),
        "control_socket": dir.join(format!("{name}.sock")),
        "exit_file": dir.join(format!("{name}.exit.json")),
        "jail": {"uid": id, "gid": id, "snapshot_dir": snapshots},
    })
    .to_string();
    let cgroup_name = format!("hvnode-vmm-test-{}-{name}", std::process::id());
    let cgroup = Cgroup::create("hvnode-vmm-tests", &cgroup_name, limits)
        .expect("creating the guest's cgroup");
    let stderr = std::fs::File::create(dir.join(format!("{name}.stderr"))).unwrap();
    let child = Spawn::new(env!("CARGO_BIN_EXE_hvnode-vmm"))
        .args(["--config-json", &config])
        .stderr(stderr)
        .new_pid_namespace()
        .cgroup(&cgroup)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = cgroup.remove();
            panic!("starting the jailed VMM: {e}");
        }
    };
    Jailed {
        child,
        cgroup,
        dir: dir.to_owned(),
        name: name.to_owned(),
    }
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_owned()
}

fn ns(pid: &str, kind: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

/// Every path under `root`, relative to it.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_owned());
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

fn spin_limits() -> Limits {
    Limits {
        memory_bytes: 256 << 20,
        cpu_quota_us: 200_000,
        pids: 64,
    }
}

#[test]
fn a_jailed_vmm_is_alone_in_its_namespaces_root_and_cgroup_as_its_own_user() {
    let test = "a_jailed_vmm_is_alone_in_its_namespaces_root_and_cgroup_as_its_own_user";
    if !can_run(test) {
        return;
    }
    let dir = scratch("jail");
    // The VMMs must reach their files only as root, before they drop it.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let (id_a, id_b) = (test_id(0), test_id(1));
    let snaps = dir.join("a-snapshots");
    std::fs::create_dir(&snaps).unwrap();
    std::os::unix::fs::chown(&snaps, Some(id_a), Some(id_a)).unwrap();
    let mut code = serial_print("up\n");
    code.extend_from_slice(&SPIN);
    let a = start(&dir, "a", &code, 2, 64, id_a, &spin_limits(), Some(&snaps));
    let b = start(&dir, "b", &code, 1, 64, id_b, &spin_limits(), None);
    a.wait_for("up\n");
    b.wait_for("up\n");

    // Its own uid and gid, no groups.
    let four = |id: u32| vec![id.to_string(); 4].join("\t");
    let ids = four(id_a);
    assert_eq!(status_field(a.pid(), "Uid"), ids);
    assert_eq!(status_field(a.pid(), "Gid"), ids);
    assert_eq!(status_field(a.pid(), "Groups"), "");
    assert_eq!(status_field(b.pid(), "Uid"), four(id_b));

    // PID 1 of a PID namespace that holds it alone; mount and IPC namespaces of its own.
    assert_eq!(status_field(a.pid(), "NSpid"), format!("{}\t1", a.pid()));
    let pid_ns = ns(&a.pid().to_string(), "pid");
    let members: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|p| p.parse::<u32>().is_ok() && ns(p, "pid") == pid_ns)
        .collect();
    assert_eq!(members, [a.pid().to_string()], "the PID namespace of a");
    for kind in ["pid", "mnt", "ipc"] {
        let ours = ns("self", kind);
        assert_ne!(ns(&a.pid().to_string(), kind), ours, "{kind}");
        assert_ne!(
            ns(&a.pid().to_string(), kind),
            ns(&b.pid().to_string(), kind),
            "{kind}"
        );
    }

    // Its root holds its snapshot directory and the directories leading there, nothing else:
    // no /proc, no /dev, none of its own files and none of b's.
    let root_a = PathBuf::from(format!("/proc/{}/root", a.pid()));
    let mut expected: Vec<PathBuf> = snaps
        .ancestors()
        .filter(|p| *p != Path::new("/"))
        .map(|p| p.strip_prefix("/").unwrap().to_owned())
        .collect();
    expected.sort();
    assert_eq!(tree(&root_a), expected);
    assert!(tree(&PathBuf::from(format!("/proc/{}/root", b.pid()))).is_empty());
    for theirs in [
        b.log(),
        dir.join("b.img"),
        dir.join("b.elf"),
        PathBuf::from("/dev/kvm"),
    ] {
        let inside = root_a.join(theirs.strip_prefix("/").unwrap());
        assert!(!inside.exists(), "{} is in a's jail", theirs.display());
    }
    // The root is read-only: not even root can add to it from inside.
    let meta = std::fs::metadata(&root_a).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o755));

    // Its cgroup: it is in it, with the limits set.
    assert_eq!(a.cgroup.procs(), [a.pid()]);
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    match a.cgroup.version() {
        Version::V2 => {
            let d = &a.cgroup.dirs()[0];
            assert_eq!(read(d, "memory.max").trim(), (256u64 << 20).to_string());
            assert_eq!(read(d, "cpu.max").trim(), "200000 100000");
            assert_eq!(read(d, "pids.max").trim(), "64");
        }
        Version::V1 => {
            let [memory, cpu, pids] = a.cgroup.dirs() else {
                panic!("{:?}", a.cgroup.dirs())
            };
            assert_eq!(
                read(memory, "memory.limit_in_bytes").trim(),
                (256u64 << 20).to_string()
            );
            assert_eq!(read(cpu, "cpu.cfs_quota_us").trim(), "200000");
            assert_eq!(read(pids, "pids.max").trim(), "64");
            for d in [memory, cpu, pids] {
                assert!(read(d, "cgroup.procs").contains(&a.pid().to_string()));
            }
        }
    }

    // A snapshot goes into its snapshot directory, owned by its uid; anywhere else there is
    // nothing to write into.
    let snap = snaps.join("s1");
    let answer = a.ask(serde_json::json!({"op": "snapshot", "dir": snap}));
    assert_eq!(answer["result"], "snapshot", "{answer}");
    assert_eq!(std::fs::metadata(snap.join("memory")).unwrap().uid(), id_a);
    let elsewhere = dir.join("s2");
    let answer = a.ask(serde_json::json!({"op": "snapshot", "dir": elsewhere}));
    assert_eq!(answer["result"], "error", "{answer}");
    assert!(!elsewhere.exists());

    let cgroups: Vec<PathBuf> = a.cgroup.dirs().to_vec();
    for vmm in [a, b] {
        assert_eq!(vmm.ask(serde_json::json!({"op": "stop"}))["result"], "ok");
        let mut vmm = vmm;
        assert_eq!(vmm.child.wait().unwrap().code(), Some(0));
    }
    // Dropped: the cgroups are gone.
    for d in cgroups {
        assert!(!d.exists(), "{}", d.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// CPU time (user + system) of `pid` in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn a_jailed_vmm_is_held_to_its_cgroups_memory_and_cpu_limits() {
    let test = "a_jailed_vmm_is_held_to_its_cgroups_memory_and_cpu_limits";
    if !can_run(test) {
        return;
    }
    let dir = scratch("jail-limits");
    // A guest that touches 96 MiB of its memory, then says so.
    let mut code = touch_pages(0x40_0000, 0x40_0000 + (96 << 20));
    code.extend(serial_print("touched\n"));
    code.extend_from_slice(&SPIN);
    let limits = |memory_bytes| Limits {
        memory_bytes,
        cpu_quota_us: 100_000,
        pids: 64,
    };
    // With room for it, it gets there.
    let roomy = start(
        &dir,
        "roomy",
        &code,
        1,
        128,
        test_id(2),
        &limits(256 << 20),
        None,
    );
    roomy.wait_for("touched\n");
    drop(roomy);
    // Held to 48 MiB it cannot: the kernel's OOM killer ends it within its cgroup.
    let mut tight = start(
        &dir,
        "tight",
        &code,
        1,
        128,
        test_id(3),
        &limits(48 << 20),
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = tight.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the tight guest still runs");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(!std::fs::read_to_string(tight.log())
        .unwrap_or_default()
        .contains("touched"));
    drop(tight);

    // Two spinning vCPUs held to a fifth of a CPU use about that much.
    let mut spin = serial_print("up\n");
    spin.extend_from_slice(&SPIN);
    let slow = Limits {
        cpu_quota_us: 20_000,
        ..spin_limits()
    };
    let vmm = start(&dir, "slow", &spin, 2, 64, test_id(2), &slow, None);
    vmm.wait_for("up\n");
    let (t0, c0) = (Instant::now(), cpu_secs(vmm.pid()));
    std::thread::sleep(Duration::from_secs(2));
    let share = (cpu_secs(vmm.pid()) - c0) / t0.elapsed().as_secs_f64();
    assert!(
        share < 0.3,
        "two spinning vCPUs used {share:.2} CPUs under a 0.2 CPU quota"
    );
    assert!(share > 0.05, "the guest barely ran ({share:.2} CPUs)");
    drop(vmm);
    let _ = std::fs::remove_dir_all(&dir);
}
