//! Running guests: one `hvnode-vmm` process each, in its own process group so that it outlives
//! the agent, with its files under `<run>/vms/<name>/`. The agent drives each VMM over its control
//! socket, watches it (as its child, or through a pidfd once a restarted agent reattached to it)
//! and reads its exit file to learn how it ended.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hvnode_api::guest::{GuestSpec, GuestState};
use hvnode_api::vmm::{
    SnapshotInfo, VmConfig, VmDisk, VmExit, VmJail, VmNet, VmRunState, VmStats, VmmRequest,
    VmmResponse, JAIL_ID_BASE, JAIL_ID_SLOTS,
};
use hvnode_base::cgroup::{Cgroup, Limits, CPU_PERIOD_US};
use hvnode_base::spawn::{Spawn, Stdio as SpawnStdio};
use sha2::{Digest, Sha256};

use crate::events::EventLog;
use crate::Paths;

/// How long a VMM has to answer one control request.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a control request waits for the socket of a VMM that has just started.
const CONNECT_GRACE: Duration = Duration::from_secs(1);
/// How long a snapshot may take: it writes the guest's whole memory.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a stop waits for the VMM to exit before it kills it.
pub const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a reboot waits for the guest to go down before it stops it.
pub const REBOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the kernel lists network interfaces; a bridge has a `bridge/` directory there.
const SYS_CLASS_NET: &str = "/sys/class/net";
/// Created in the run directory (a tmpfs) by the agent's first start after boot.
pub const AUTOSTART_MARKER: &str = "autostart.done";
/// What a guest's cgroup allows its VMM beyond the guest's memory: the VMM's own code, heap
/// and thread stacks (3 MiB at rest), a migration's stream buffers (a memory frame is up to
/// 32 MiB) and the page cache of a snapshot or of disk I/O in flight.
pub const VMM_MEMORY_OVERHEAD: u64 = 128 << 20;
/// What a guest's cgroup allows its VMM beyond one CPU per vCPU, for the device workers and
/// the control threads: half a CPU.
pub const VMM_CPU_OVERHEAD_US: u64 = CPU_PERIOD_US / 2;
/// How many threads a guest's VMM may have beyond one per vCPU: main, signals, control,
/// console, up to 19 device workers and the control and console clients.
pub const VMM_PIDS_OVERHEAD: u64 = 64;

/// The limits of a guest's cgroup (docs/vmm.md#the-jail).
pub fn guest_limits(spec: &GuestSpec) -> Limits {
    Limits {
        memory_bytes: (spec.memory_mib << 20).saturating_add(VMM_MEMORY_OVERHEAD),
        cpu_quota_us: u64::from(spec.vcpus) * CPU_PERIOD_US + VMM_CPU_OVERHEAD_US,
        pids: u64::from(spec.vcpus) + VMM_PIDS_OVERHEAD,
    }
}

/// Where a guest's snapshots go (each in a directory of its own): bound into its VMM's jail.
pub fn snapshot_root(data: &Path, guest: &str) -> PathBuf {
    data.join("snapshots").join(guest)
}

/// Whether the agent runs as root, and so jails the VMMs it starts.
fn jails() -> bool {
    nix::unistd::geteuid().is_root()
}

/// What the agent asked of a running guest; it decides what the VMM's exit means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    /// Nothing: exit 0 is a power-off, 3 a reboot to carry out, anything else a crash.
    None,
    /// `stop`: stopped, however the VMM ended.
    Stop,
    /// `shutdown`: stopped once the guest goes down, whether it powered off or rebooted.
    Shutdown,
    /// `reboot`: started again once the VMM exits.
    Reboot,
    /// Waiting for a guest migrating here: an exit is a failed migration, not a crash.
    Incoming,
}

/// Where a VMM's guest comes from.
#[derive(Debug, Clone, Copy)]
pub enum StartFrom<'a> {
    /// Booted afresh.
    Boot,
    /// Resumed from the snapshot in this directory.
    Snapshot(&'a Path),
    /// Received from a migrating VMM through this socket (the VMM's `--incoming`).
    Incoming(&'a Path),
}

#[derive(Debug, Clone)]
struct Running {
    /// Tells incarnations of one guest apart, so that a late watcher or timer cannot act on
    /// the next one.
    id: u64,
    pid: u32,
    /// Signals go through it when there is one: a pidfd never names a recycled pid.
    pidfd: Option<Arc<OwnedFd>>,
    started: Instant,
    state: GuestState,
    intent: Intent,
    taps: Vec<String>,
    spec: GuestSpec,
    /// The jail's uid and gid are `JAIL_ID_BASE` + this slot, unique among running guests.
    slot: Option<u32>,
    /// The guest's cgroup, removed once the VMM has ended.
    cgroup: Option<Arc<Cgroup>>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    running: HashMap<String, Running>,
    crashed: HashMap<String, String>,
}

impl Table {
    /// The lowest jail slot no running guest holds.
    fn free_slot(&self) -> Option<u32> {
        let taken: std::collections::HashSet<u32> =
            self.running.values().filter_map(|r| r.slot).collect();
        (0..JAIL_ID_SLOTS).find(|s| !taken.contains(s))
    }

    fn state(&self, name: &str) -> GuestState {
        match self.running.get(name) {
            Some(r) => r.state,
            None if self.crashed.contains_key(name) => GuestState::Crashed,
            None => GuestState::Stopped,
        }
    }
}

/// What the agent knows of a guest at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// Its state.
    pub state: GuestState,
    /// The VMM's pid, while one runs.
    pub pid: Option<u32>,
    /// Seconds since its VMM started.
    pub uptime_secs: Option<u64>,
    /// Why it crashed, when it is `crashed`.
    pub crash_reason: Option<String>,
}

/// How a watched VMM ended.
#[derive(Debug, Clone, Copy)]
enum Ended {
    Code(i32),
    Signal(i32),
    /// Not our child: only its exit file can tell.
    Unknown,
}

/// Errors of guest operations.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A path does not name an existing file inside the image directory.
    #[error("{0} {1:?} is not an existing file inside the image directory {2}: upload it first")]
    Path(&'static str, String, String),
    /// A NIC names a bridge the node does not have.
    #[error("Bridge {0:?} does not exist on this node: create it in the node's network configuration or give the NIC another bridge")]
    NoBridge(String),
    /// Two guests would share a tap device.
    #[error("Tap device {tap} of guest {guest:?} is in use by running guest {other:?}: rename one of them")]
    TapInUse {
        /// The tap device.
        tap: String,
        /// The guest being started.
        guest: String,
        /// The guest holding it.
        other: String,
    },
    /// The operation does not apply in the guest's state.
    #[error("Cannot {op} guest {name:?}: it is {state}")]
    State {
        /// Guest name.
        name: String,
        /// Its state.
        state: &'static str,
        /// The operation.
        op: &'static str,
    },
    /// Spawning or preparing the VMM failed.
    #[error("Starting the VMM: {0}")]
    Spawn(String),
    /// The guest's cgroup could not be made: it would run without its limits.
    #[error("Guest {0:?} cannot be held to its limits, so it is not started: {1}")]
    Cgroup(String, String),
    /// Every jail uid is taken.
    #[error("No jail uid is free: {0} guests run already")]
    NoSlot(u32),
    /// The VMM did not answer on its control socket.
    #[error("The VMM of guest {0:?} does not answer on its control socket ({1}): stop the guest")]
    Unreachable(String, String),
    /// The VMM answered with an error.
    #[error("The VMM refused {op} ({code}): {message}")]
    Refused {
        /// The operation.
        op: &'static str,
        /// The VMM's stable code.
        code: String,
        /// The VMM's message.
        message: String,
    },
}

/// Errors of one control request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting, sending or receiving failed (a timeout included).
    #[error("Control socket {0}")]
    Io(String, #[source] std::io::Error),
    /// The answer is not a `VmmResponse`.
    #[error("Invalid answer")]
    Answer(#[source] serde_json::Error),
    /// The connection closed before an answer.
    #[error("The connection closed without an answer")]
    Closed,
}

/// Sends one request to a VMM's control socket and reads its answer, each within `timeout`,
/// so that a stuck VMM cannot hold the caller.
pub fn control(
    socket: &Path,
    request: &VmmRequest,
    timeout: Duration,
) -> Result<VmmResponse, ControlError> {
    let io = |e| ControlError::Io(socket.display().to_string(), e);
    let deadline = Instant::now() + CONNECT_GRACE.min(timeout);
    let mut s = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            // A VMM that has just started may not listen yet.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io(e)),
        }
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(ControlError::Answer)?;
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    // A description carries the whole VM config: 1 MiB is far above it and bounds a runaway.
    BufReader::new(s.take(1 << 20))
        .read_line(&mut answer)
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ControlError::Closed);
    }
    serde_json::from_str(&answer).map_err(ControlError::Answer)
}

/// Resolves a spec path against the image directory, refusing anything outside it (symlinks
/// included).
/// A guest's file: `DOMAIN:path` below that storage domain's mount point, anything else below
/// the image directory (see [`resolve`]).
pub fn resolve_file(paths: &Paths, what: &'static str, rel: &str) -> Result<PathBuf, GuestError> {
    match hvnode_api::cluster::domain_path(rel) {
        Some((domain, rest)) => {
            resolve(&crate::domains::mount_point(&paths.run, domain), what, rest)
        }
        None => resolve(&paths.images, what, rel),
    }
}

pub fn resolve(images: &Path, what: &'static str, rel: &str) -> Result<PathBuf, GuestError> {
    let err = || GuestError::Path(what, rel.to_owned(), images.display().to_string());
    hvnode_api::guest::validate_image_path(rel).map_err(|_| err())?;
    let root = images.canonicalize().map_err(|_| err())?;
    let full = root.join(rel).canonicalize().map_err(|_| err())?;
    if !full.starts_with(&root) || !full.is_file() {
        return Err(err());
    }
    Ok(full)
}

/// The tap device of NIC `index` of a guest: `hv`, 8 hex digits of a hash of the name, `n`,
/// the index. At most 12 characters (the kernel allows 15), the same every time the guest
/// starts, and distinct between guests unless their names collide in 32 bits, which
/// [`Guests::start`] checks.
pub fn tap_name(guest: &str, index: usize) -> String {
    let h = Sha256::digest(guest.as_bytes());
    format!("hv{:02x}{:02x}{:02x}{:02x}n{index}", h[0], h[1], h[2], h[3])
}

/// The VMM's network devices for a spec; every bridge must exist under `sys_class_net`.
pub fn vm_nets(spec: &GuestSpec, sys_class_net: &Path) -> Result<Vec<VmNet>, GuestError> {
    spec.nics
        .iter()
        .enumerate()
        .map(|(i, nic)| {
            if !sys_class_net.join(&nic.bridge).join("bridge").is_dir() {
                return Err(GuestError::NoBridge(nic.bridge.clone()));
            }
            Ok(VmNet {
                tap: tap_name(&spec.name, i),
                mac: nic.mac_for(&spec.name, i),
                bridge: Some(nic.bridge.clone()),
            })
        })
        .collect()
}

/// Whether this is the agent's first start since the node booted (the run directory is a
/// tmpfs); records that later starts are not.
pub fn first_start_since_boot(run: &Path) -> std::io::Result<bool> {
    std::fs::create_dir_all(run)?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(run.join(AUTOSTART_MARKER))
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// A VMM process found alive under a guest's run directory.
#[derive(Debug)]
struct Live {
    pid: u32,
    pidfd: OwnedFd,
}

/// Finds the VMM a previous agent started in `dir`: its pid file names a live process whose
/// executable is `hvnode-vmm` and whose command line names this directory's `vm.json`.
fn live_vmm(dir: &Path) -> Result<Live, String> {
    let text = std::fs::read_to_string(dir.join("pid")).map_err(|_| "no pid file".to_owned())?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("pid file holds {:?}", text.trim()))?;
    let raw = rustix::process::Pid::from_raw(pid as i32)
        .filter(|_| pid <= i32::MAX as u32)
        .ok_or_else(|| format!("pid file holds {pid}"))?;
    // Opened before the checks, so that the process checked is the one watched.
    let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
        .map_err(|e| format!("process {pid} is gone ({e})"))?;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let exe =
        std::fs::read_link(proc_dir.join("exe")).map_err(|e| format!("process {pid}: {e}"))?;
    let exe_name = exe.file_name().unwrap_or_default().to_string_lossy();
    // An upgraded binary shows as "hvnode-vmm (deleted)".
    if exe_name.trim_end_matches(" (deleted)") != "hvnode-vmm" {
        return Err(format!("process {pid} is {}, not a VMM", exe.display()));
    }
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    let config = dir.join("vm.json");
    if !cmdline
        .split(|b| *b == 0)
        .any(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)) == config)
    {
        return Err(format!(
            "process {pid} is a VMM for another configuration than {}",
            config.display()
        ));
    }
    Ok(Live { pid, pidfd })
}

/// Blocks until the process behind `pidfd` has ended.
fn wait_pidfd(pidfd: &OwnedFd) {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match poll(&mut fds, -1) {
            Ok(n) if n > 0 => return,
            Ok(_) | Err(rustix::io::Errno::INTR) => continue,
            // A pidfd that cannot be polled cannot be waited on either: treat it as ended
            // rather than spin; the exit file (or its absence) says the rest.
            Err(_) => return,
        }
    }
}

/// What the agent knows about guest processes.
#[derive(Debug)]
pub struct Guests {
    table: Mutex<Table>,
    events: Arc<EventLog>,
    paths: Paths,
}

impl Guests {
    /// No guests yet; VMMs are found and started under `paths`; state changes go to `events`.
    pub fn new(events: Arc<EventLog>, paths: Paths) -> Self {
        Guests {
            table: Mutex::new(Table::default()),
            events,
            paths,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.paths.run.join("vms").join(name)
    }

    fn state_error(&self, t: &Table, name: &str, op: &'static str) -> GuestError {
        GuestError::State {
            name: name.to_owned(),
            state: t.state(name).as_str(),
            op,
        }
    }

    fn emit(&self, name: &str, message: String) {
        eprintln!("agent: guest {name} {message}");
        self.events.emit("guest_state", Some(name), message);
    }

    /// The state, VMM pid and uptime of a guest.
    pub fn state(&self, name: &str) -> Runtime {
        let t = self.lock();
        match t.running.get(name) {
            Some(r) => Runtime {
                state: r.state,
                pid: Some(r.pid),
                uptime_secs: Some(r.started.elapsed().as_secs()),
                crash_reason: None,
            },
            None => Runtime {
                state: t.state(name),
                pid: None,
                uptime_secs: None,
                crash_reason: t.crashed.get(name).cloned(),
            },
        }
    }

    /// Whether a VMM runs for the guest (running, paused or shutting down).
    pub fn is_active(&self, name: &str) -> bool {
        self.lock().running.contains_key(name)
    }

    /// The uid a running guest's VMM writes its snapshots as: its jail's, `nobody` for an
    /// unjailed VMM of a root agent, `None` for a VMM that keeps the agent's uid.
    pub fn vmm_uid(&self, name: &str) -> Option<u32> {
        if !jails() {
            return None;
        }
        let t = self.lock();
        let slot = t.running.get(name).and_then(|r| r.slot);
        Some(slot.map_or(hvnode_api::vmm::VMM_RUN_AS, |s| JAIL_ID_BASE + s))
    }

    /// Drops what is remembered of a deleted guest (its crash), so that a new guest of the same
    /// name starts out stopped.
    pub fn forget(&self, name: &str) {
        self.lock().crashed.remove(name);
    }

    /// Number of guests with a VMM.
    pub fn running_count(&self) -> usize {
        self.lock().running.len()
    }

    /// Starts the VMM for `spec`; a thread watches it until it exits.
    pub fn start(self: &Arc<Self>, spec: &GuestSpec) -> Result<u32, GuestError> {
        self.start_from(spec, StartFrom::Boot)
    }

    /// The VM configuration a start of `spec` uses (paths resolved below the image directory,
    /// taps named, this run's files under the guest's run directory).
    pub fn vm_config(&self, spec: &GuestSpec) -> Result<VmConfig, GuestError> {
        let paths = &self.paths;
        let dir = self.dir(&spec.name);
        let path_str = |p: PathBuf| p.to_string_lossy().into_owned();
        let disks = spec
            .disks
            .iter()
            .map(|d| {
                Ok(VmDisk {
                    path: path_str(resolve_file(paths, "disk", &d.path)?),
                    read_only: d.read_only,
                })
            })
            .collect::<Result<Vec<_>, GuestError>>()?;
        let nets = vm_nets(spec, Path::new(SYS_CLASS_NET))?;
        let config = VmConfig {
            name: spec.name.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: path_str(resolve_file(paths, "kernel", &spec.kernel)?),
            initrd: spec
                .initrd
                .as_deref()
                .map(|i| resolve_file(paths, "initrd", i).map(path_str))
                .transpose()?,
            cmdline: spec.cmdline.clone(),
            disks,
            nets,
            rng: spec.rng,
            serial_log: Some(path_str(dir.join("console.log"))),
            serial_socket: Some(path_str(dir.join("console.sock"))),
            control_socket: Some(path_str(dir.join("control.sock"))),
            exit_file: Some(path_str(dir.join("exit.json"))),
            // Set by the start, which gives the jail its uid.
            jail: None,
        };
        Ok(config)
    }

    /// Starts a VMM for `spec`: booted, from a snapshot (the VMM checks that the snapshot fits
    /// the configuration and resumes the guest where it was) or waiting for a migrating guest.
    pub fn start_from(
        self: &Arc<Self>,
        spec: &GuestSpec,
        from: StartFrom<'_>,
    ) -> Result<u32, GuestError> {
        let config = self.vm_config(spec)?;
        let dir = self.dir(&spec.name);
        let taps: Vec<String> = config.nets.iter().map(|n| n.tap.clone()).collect();
        // Held from the checks to the table entry, so that two starts cannot both pass them.
        let mut t = self.lock();
        if t.running.contains_key(&spec.name) {
            return Err(self.state_error(&t, &spec.name, "start"));
        }
        for (other, r) in &t.running {
            if let Some(tap) = taps.iter().find(|tap| r.taps.contains(tap)) {
                return Err(GuestError::TapInUse {
                    tap: tap.clone(),
                    guest: spec.name.clone(),
                    other: other.clone(),
                });
            }
        }
        let spawn_err =
            |what: &Path, e: std::io::Error| GuestError::Spawn(format!("{}: {e}", what.display()));
        std::fs::create_dir_all(&dir).map_err(|e| spawn_err(&dir, e))?;
        // A root agent jails the VMM: its own uid, namespaces, root and cgroup. An agent that
        // is not root (a developer's) cannot, and its VMMs keep its uid as before.
        let mut config = config;
        let (slot, cgroup) = if jails() {
            let slot = t.free_slot().ok_or(GuestError::NoSlot(JAIL_ID_SLOTS))?;
            let id = JAIL_ID_BASE + slot;
            let snapshots = snapshot_root(&self.paths.data, &spec.name);
            give_dir(&snapshots, id).map_err(|e| spawn_err(&snapshots, e))?;
            config.jail = Some(VmJail {
                uid: id,
                gid: id,
                snapshot_dir: Some(snapshots.to_string_lossy().into_owned()),
            });
            let group = self.paths.cgroup_group();
            let cgroup = Cgroup::create(&group, &spec.name, &guest_limits(spec))
                .map_err(|e| GuestError::Cgroup(spec.name.clone(), e.to_string()))?;
            (Some(slot), Some(Arc::new(cgroup)))
        } else {
            (None, None)
        };
        let remove_cgroup = |e: GuestError| {
            if let Some(c) = &cgroup {
                let _ = c.remove();
            }
            e
        };
        let cfg_path = dir.join("vm.json");
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| remove_cgroup(GuestError::Spawn(e.to_string())))?;
        hvnode_base::fs::write_atomic(&cfg_path, &json, 0o600)
            .map_err(|e| remove_cgroup(spawn_err(&cfg_path, e)))?;
        for stale in ["console.log", "exit.json"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let log_path = dir.join("vmm.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| remove_cgroup(spawn_err(&log_path, e)))?;
        let log2 = log
            .try_clone()
            .map_err(|e| remove_cgroup(spawn_err(&log_path, e)))?;
        // Its own process group: signals to the agent's group do not reach it, and it outlives
        // an agent restart; its output goes to a file, never a pipe to the agent. Jailed, it
        // is PID 1 of a PID namespace of its own, in its cgroup from its first instruction.
        let mut cmd = Spawn::new(&self.paths.vmm);
        cmd.arg("--config").arg(&cfg_path);
        match from {
            StartFrom::Boot => {}
            StartFrom::Snapshot(dir) => {
                cmd.arg("--restore").arg(dir);
            }
            StartFrom::Incoming(socket) => {
                let _ = std::fs::remove_file(socket);
                cmd.arg("--incoming").arg(socket);
            }
        }
        if let Some(c) = &cgroup {
            cmd.new_pid_namespace().cgroup(c);
        }
        let mut child = cmd
            .stdin(SpawnStdio::Null)
            .stdout(log)
            .stderr(log2)
            .process_group()
            .spawn()
            .map_err(|e| remove_cgroup(spawn_err(&self.paths.vmm, e)))?;
        let pid = child.id();
        let _ = std::fs::write(dir.join("pid"), pid.to_string());
        let pidfd = child.pidfd().try_clone().ok().map(Arc::new);
        t.next_id += 1;
        let id = t.next_id;
        t.crashed.remove(&spec.name);
        t.running.insert(
            spec.name.clone(),
            Running {
                id,
                pid,
                pidfd,
                started: Instant::now(),
                state: match from {
                    StartFrom::Incoming(_) => GuestState::Migrating,
                    _ => GuestState::Running,
                },
                intent: match from {
                    StartFrom::Incoming(_) => Intent::Incoming,
                    _ => Intent::None,
                },
                taps,
                spec: spec.clone(),
                slot,
                cgroup,
            },
        );
        drop(t);
        match from {
            StartFrom::Snapshot(dir) => self.emit(
                &spec.name,
                format!("running (vmm pid {pid}), restored from {}", dir.display()),
            ),
            StartFrom::Incoming(_) => self.emit(
                &spec.name,
                format!("migrating here (vmm pid {pid} waits for the guest)"),
            ),
            StartFrom::Boot => self.emit(&spec.name, format!("running (vmm pid {pid})")),
        }
        let me = Arc::clone(self);
        let name = spec.name.clone();
        std::thread::spawn(move || {
            let ended = match child.wait() {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => Ended::Code(c),
                    (None, Some(sig)) => Ended::Signal(sig),
                    (None, None) => Ended::Unknown,
                },
                Err(_) => Ended::Unknown,
            };
            me.finished(&name, id, ended);
        });
        Ok(pid)
    }

    /// Applies the end of the VMM incarnation `id` of guest `name`.
    fn finished(self: &Arc<Self>, name: &str, id: u64, ended: Ended) {
        let dir = self.dir(name);
        let exit: Option<VmExit> = std::fs::read(dir.join("exit.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        // The cgroup goes while the guest still counts as running, so that no new start of
        // it can take the directory over meanwhile.
        let cgroup = match self.lock().running.get(name) {
            Some(r) if r.id == id => r.cgroup.clone(),
            _ => None,
        };
        if let Some(c) = cgroup {
            if let Err(e) = c.remove() {
                eprintln!("agent: guest {name}: removing its cgroup: {e}");
            }
        }
        let entry = {
            let mut t = self.lock();
            match t.running.get(name) {
                Some(r) if r.id == id => t.running.remove(name),
                _ => None,
            }
        };
        let Some(r) = entry else {
            return;
        };
        let _ = std::fs::remove_file(dir.join("pid"));
        let code = match ended {
            Ended::Code(c) => Some(c),
            Ended::Signal(_) | Ended::Unknown => exit.as_ref().map(|e| e.code),
        };
        let reason = exit
            .map(|e| e.reason)
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| match ended {
                Ended::Signal(31) => "the VMM was killed by SIGSYS (seccomp)".to_owned(),
                Ended::Signal(sig) => format!("the VMM was killed by signal {sig}"),
                Ended::Code(c) => {
                    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
                    match log.lines().last() {
                        Some(l) if !l.trim().is_empty() => l.to_owned(),
                        _ => format!("the VMM exited with code {c}"),
                    }
                }
                Ended::Unknown => "the VMM ended without writing its exit file".to_owned(),
            });
        match (r.intent, code) {
            (Intent::Incoming, _) => {
                self.emit(
                    name,
                    format!("stopped: the incoming migration failed: {reason}"),
                );
            }
            (Intent::Stop, _) | (Intent::Shutdown, Some(0 | 3)) | (Intent::None, Some(0)) => {
                self.emit(name, "stopped".to_owned());
            }
            (Intent::Reboot, _) | (Intent::None, Some(3)) => self.restart(&r.spec),
            _ => self.crashed(name, &reason),
        }
    }

    fn crashed(&self, name: &str, reason: &str) {
        self.lock()
            .crashed
            .insert(name.to_owned(), reason.to_owned());
        self.emit(name, format!("crashed: {reason}"));
    }

    fn restart(self: &Arc<Self>, spec: &GuestSpec) {
        self.emit(&spec.name, "rebooting: starting it again".to_owned());
        if let Err(e) = self.start(spec) {
            self.crashed(&spec.name, &format!("restarting after a reboot: {e}"));
        }
    }

    /// Moves the guest's VMM from state `from` to `to` (a migration's steps); `false` if it is
    /// not in `from`. `settled` ends a migration's special exit handling: from then on the VMM's
    /// exit counts as any guest's.
    pub fn set_state(&self, name: &str, from: GuestState, to: GuestState, settled: bool) -> bool {
        let mut t = self.lock();
        match t.running.get_mut(name) {
            Some(r) if r.state == from => {
                r.state = to;
                if settled {
                    r.intent = Intent::None;
                }
                drop(t);
                self.emit(name, to.as_str().to_owned());
                true
            }
            _ => false,
        }
    }

    /// Sends `request` to the guest's VMM; an error answer becomes [`GuestError::Refused`].
    pub fn ask(
        &self,
        name: &str,
        op: &'static str,
        request: &VmmRequest,
    ) -> Result<VmmResponse, GuestError> {
        let socket = self.dir(name).join("control.sock");
        match control(&socket, request, CONTROL_TIMEOUT) {
            Ok(VmmResponse::Error { code, message }) => {
                Err(GuestError::Refused { op, code, message })
            }
            Ok(answer) => Ok(answer),
            Err(e) => Err(GuestError::Unreachable(
                name.to_owned(),
                hvnode_api::error::chain(&e),
            )),
        }
    }

    /// The current incarnation of a guest in one of `states`, or the error for `op`.
    fn current(
        &self,
        name: &str,
        states: &[GuestState],
        op: &'static str,
    ) -> Result<u64, GuestError> {
        let t = self.lock();
        match t.running.get(name) {
            Some(r) if states.contains(&r.state) => Ok(r.id),
            _ => Err(self.state_error(&t, name, op)),
        }
    }

    /// Updates incarnation `id` of a guest, if it is still the current one.
    fn update(&self, name: &str, id: u64, f: impl FnOnce(&mut Running)) {
        if let Some(r) = self.lock().running.get_mut(name).filter(|r| r.id == id) {
            f(r);
        }
    }

    fn gone(&self, name: &str, id: u64) -> bool {
        self.lock().running.get(name).is_none_or(|r| r.id != id)
    }

    fn wait_gone(&self, name: &str, id: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.gone(name, id) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&self, name: &str, id: u64) {
        let target = {
            let t = self.lock();
            t.running
                .get(name)
                .filter(|r| r.id == id)
                .map(|r| (r.pid, r.pidfd.clone()))
        };
        match target {
            Some((_, Some(fd))) => {
                let _ = rustix::process::pidfd_send_signal(&*fd, rustix::process::Signal::Kill);
            }
            Some((pid, None)) => {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            None => {}
        }
    }

    /// Ends incarnation `id` now: the VMM's `stop`, or SIGKILL when it does not answer or does
    /// not exit within [`STOP_WAIT`]. Returns once it is gone (or given up on after a kill).
    fn force(&self, name: &str, id: u64) {
        let (wait, why) = match self.ask(name, "stop", &VmmRequest::Stop) {
            Ok(VmmResponse::Ok) => (
                STOP_WAIT,
                format!("it did not exit within {} s", STOP_WAIT.as_secs()),
            ),
            Ok(other) => (Duration::ZERO, format!("it answered {other:?}")),
            // Also what a VMM that exits before its answer is written looks like.
            Err(e) => (Duration::from_millis(500), e.to_string()),
        };
        if self.wait_gone(name, id, wait) {
            return;
        }
        eprintln!("agent: guest {name}: the VMM did not stop ({why}); killing it");
        self.kill(name, id);
        self.wait_gone(name, id, Duration::from_secs(5));
    }

    /// Runs [`Guests::force`] on incarnation `id` after `delay` unless it is gone by then.
    fn force_after(self: &Arc<Self>, name: &str, id: u64, delay: Duration, intent: Intent) {
        let me = Arc::clone(self);
        let name = name.to_owned();
        std::thread::spawn(move || {
            if me.wait_gone(&name, id, delay) {
                return;
            }
            eprintln!(
                "agent: guest {name} did not go down within {} s; stopping it",
                delay.as_secs()
            );
            me.update(&name, id, |r| r.intent = intent);
            me.force(&name, id);
        });
    }

    /// Kills the guest's VMM with SIGKILL, without asking it first (fencing: the node must be
    /// certain it is gone, and quickly), and waits up to 5 s for it to go. Whether it went.
    pub fn kill_now(&self, name: &str) -> bool {
        let id = {
            let t = self.lock();
            match t.running.get(name) {
                Some(r) => r.id,
                None => return true,
            }
        };
        self.update(name, id, |r| r.intent = Intent::Stop);
        self.kill(name, id);
        self.wait_gone(name, id, Duration::from_secs(5))
    }

    /// Stops the guest at once (the VMM's `stop`, SIGKILL if it does not comply) and waits
    /// until its VMM has exited.
    pub fn stop(&self, name: &str) -> Result<(), GuestError> {
        let active = [
            GuestState::Running,
            GuestState::Paused,
            GuestState::ShuttingDown,
            GuestState::Migrating,
        ];
        let id = self.current(name, &active, "stop")?;
        self.update(name, id, |r| r.intent = Intent::Stop);
        self.force(name, id);
        Ok(())
    }

    fn switch(
        &self,
        name: &str,
        op: &'static str,
        from: GuestState,
        request: VmmRequest,
        to: GuestState,
    ) -> Result<(), GuestError> {
        let id = self.current(name, &[from], op)?;
        self.ask(name, op, &request)?;
        self.update(name, id, |r| r.state = to);
        self.emit(name, to.as_str().to_owned());
        Ok(())
    }

    /// Pauses the guest's vCPUs.
    pub fn pause(&self, name: &str) -> Result<(), GuestError> {
        self.switch(
            name,
            "pause",
            GuestState::Running,
            VmmRequest::Pause,
            GuestState::Paused,
        )
    }

    /// Resumes a paused guest.
    pub fn resume(&self, name: &str) -> Result<(), GuestError> {
        self.switch(
            name,
            "resume",
            GuestState::Paused,
            VmmRequest::Resume,
            GuestState::Running,
        )
    }

    /// Asks the guest to shut down (ctrl-alt-del); it is `shutting_down` until the VMM exits.
    /// With `timeout`, a guest still up after it is stopped (and for a reboot, started again).
    fn graceful(
        self: &Arc<Self>,
        name: &str,
        op: &'static str,
        intent: Intent,
        timeout: Option<Duration>,
    ) -> Result<(), GuestError> {
        // The VMM resumes a paused guest before it presses the keys.
        let id = self.current(name, &[GuestState::Running, GuestState::Paused], op)?;
        let before = self.state(name).state;
        // Set before asking: the VMM may exit before the answer is read.
        self.update(name, id, |r| {
            r.state = GuestState::ShuttingDown;
            r.intent = intent;
        });
        if let Err(e) = self.ask(name, op, &shutdown_request()) {
            self.update(name, id, |r| {
                r.state = before;
                r.intent = Intent::None;
            });
            return Err(e);
        }
        self.emit(name, GuestState::ShuttingDown.as_str().to_owned());
        if let Some(t) = timeout {
            let forced = if intent == Intent::Reboot {
                Intent::Reboot
            } else {
                Intent::Stop
            };
            self.force_after(name, id, t, forced);
        }
        Ok(())
    }

    /// Asks the guest to shut down; see [`Guests::graceful`].
    pub fn shutdown(
        self: &Arc<Self>,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<(), GuestError> {
        self.graceful(name, "shut down", Intent::Shutdown, timeout)
    }

    /// Reboots the guest: a graceful shutdown, a stop if it is not down within `timeout`, then
    /// a start.
    pub fn reboot(self: &Arc<Self>, name: &str, timeout: Duration) -> Result<(), GuestError> {
        self.graceful(name, "reboot", Intent::Reboot, Some(timeout))
    }

    /// The VMM's counters.
    pub fn stats(&self, name: &str) -> Result<VmStats, GuestError> {
        let active = [
            GuestState::Running,
            GuestState::Paused,
            GuestState::ShuttingDown,
        ];
        self.current(name, &active, "read the counters of")?;
        match self.ask(name, "stats", &VmmRequest::Stats)? {
            VmmResponse::Stats { stats } => Ok(stats),
            other => Err(GuestError::Refused {
                op: "stats",
                code: "unexpected_answer".into(),
                message: format!("{other:?}"),
            }),
        }
    }

    /// Writes the guest into the snapshot directory `dir` (see `VmmRequest::Snapshot`): a
    /// running guest is paused for it and runs on afterwards.
    pub fn snapshot(&self, name: &str, dir: &Path) -> Result<SnapshotInfo, GuestError> {
        self.current(name, &[GuestState::Running, GuestState::Paused], "snapshot")?;
        let request = VmmRequest::Snapshot {
            dir: dir.to_string_lossy().into_owned(),
        };
        let socket = self.dir(name).join("control.sock");
        match control(&socket, &request, SNAPSHOT_TIMEOUT) {
            Ok(VmmResponse::Snapshot { snapshot }) => Ok(snapshot),
            Ok(VmmResponse::Error { code, message }) => Err(GuestError::Refused {
                op: "snapshot",
                code,
                message,
            }),
            Ok(other) => Err(GuestError::Refused {
                op: "snapshot",
                code: "unexpected_answer".into(),
                message: format!("{other:?}"),
            }),
            Err(e) => Err(GuestError::Unreachable(
                name.to_owned(),
                hvnode_api::error::chain(&e),
            )),
        }
    }

    /// After an agent restart: takes over the VMMs a previous agent started (they are not our
    /// children, so a pidfd tells when they end), and cleans up after those that ended while
    /// no agent was watching.
    pub fn reattach(self: &Arc<Self>, specs: &[GuestSpec]) {
        let Ok(entries) = std::fs::read_dir(self.paths.run.join("vms")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = e.path();
            let spec = specs.iter().find(|s| s.name == name);
            match (live_vmm(&dir), spec) {
                (Ok(live), Some(spec)) => self.adopt(spec, &dir, live),
                (Ok(live), None) => eprintln!(
                    "agent: VMM pid {} runs for {name:?}, which has no definition; leaving it alone",
                    live.pid
                ),
                (Err(why), spec) => self.clean_stale(&name, &dir, spec, &why),
            }
        }
    }

    fn adopt(self: &Arc<Self>, spec: &GuestSpec, dir: &Path, live: Live) {
        let name = &spec.name;
        let (state, uptime) = match self.ask(name, "describe", &VmmRequest::Describe) {
            Ok(VmmResponse::Description {
                state, uptime_secs, ..
            }) => (
                match state {
                    VmRunState::Running => GuestState::Running,
                    VmRunState::Paused => GuestState::Paused,
                    VmRunState::Stopping => GuestState::ShuttingDown,
                    VmRunState::Migrated => GuestState::Migrating,
                },
                uptime_secs,
            ),
            other => {
                // Still a live VMM of this guest: watched and stoppable, even if it is wedged.
                eprintln!("agent: guest {name}: the VMM does not describe itself ({other:?}); taking it over as running");
                (GuestState::Running, 0)
            }
        };
        let config = std::fs::read(dir.join("vm.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<VmConfig>(&b).ok());
        let taps = config
            .as_ref()
            .map(|c| c.nets.iter().map(|n| n.tap.clone()).collect())
            .unwrap_or_default();
        // A jailed VMM keeps its uid's slot and its cgroup.
        let slot = config
            .and_then(|c| c.jail)
            .and_then(|j| j.uid.checked_sub(JAIL_ID_BASE))
            .filter(|s| *s < JAIL_ID_SLOTS);
        let cgroup = slot
            .and_then(|_| Cgroup::existing(&self.paths.cgroup_group(), name).ok())
            .map(Arc::new);
        let pidfd = Arc::new(live.pidfd);
        let id = {
            let mut t = self.lock();
            t.next_id += 1;
            let id = t.next_id;
            t.running.insert(
                name.clone(),
                Running {
                    id,
                    pid: live.pid,
                    pidfd: Some(Arc::clone(&pidfd)),
                    started: Instant::now()
                        .checked_sub(Duration::from_secs(uptime))
                        .unwrap_or_else(Instant::now),
                    state,
                    // A shutdown the previous agent asked for still means stopped.
                    intent: if state == GuestState::ShuttingDown {
                        Intent::Shutdown
                    } else {
                        Intent::None
                    },
                    taps,
                    spec: spec.clone(),
                    slot,
                    cgroup,
                },
            );
            id
        };
        self.emit(
            name,
            format!("{} (reattached to vmm pid {})", state.as_str(), live.pid),
        );
        let me = Arc::clone(self);
        let name = name.clone();
        std::thread::spawn(move || {
            wait_pidfd(&pidfd);
            me.finished(&name, id, Ended::Unknown);
        });
    }

    fn clean_stale(self: &Arc<Self>, name: &str, dir: &Path, spec: Option<&GuestSpec>, why: &str) {
        let had_pid = dir.join("pid").exists();
        let exit: Option<VmExit> = std::fs::read(dir.join("exit.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(spec) = spec else {
            let _ = std::fs::remove_dir_all(dir);
            return;
        };
        // The logs and the exit file stay for the admin to read; what names a process goes.
        for f in ["pid", "control.sock", "console.sock", "vm.json"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        if jails() {
            if let Ok(c) = Cgroup::existing(&self.paths.cgroup_group(), name) {
                let _ = c.remove();
            }
        }
        match exit {
            Some(VmExit { code: 3, .. }) => {
                eprintln!("agent: guest {name} asked for a reboot while no agent ran");
                self.restart(spec);
            }
            Some(VmExit { code: 0, .. }) => {}
            Some(VmExit { reason, .. }) if had_pid => self.crashed(name, &reason),
            None if had_pid => self.crashed(
                name,
                &format!("the VMM ended while no agent ran, without an exit file ({why})"),
            ),
            _ => {}
        }
    }

    /// Starts every `autostart` guest that is not already running; one failing does not stop
    /// the others. Returns how many failed.
    pub fn autostart(self: &Arc<Self>, specs: &[GuestSpec]) -> usize {
        let mut failed = 0;
        for spec in specs.iter().filter(|s| s.autostart) {
            if self.is_active(&spec.name) {
                continue;
            }
            if let Err(e) = self.start(spec) {
                failed += 1;
                eprintln!("agent: autostart of guest {}: {e}", spec.name);
                self.events.emit(
                    "guest_autostart",
                    Some(&spec.name),
                    format!("autostart failed: {e}"),
                );
            } else {
                self.events
                    .emit("guest_autostart", Some(&spec.name), "started at boot");
            }
        }
        failed
    }
}

/// Makes `dir` (and its parents) and gives it to `id` alone (mode 0700): the directory a jailed
/// VMM writes its snapshots into.
fn give_dir(dir: &Path, id: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(id), Some(id))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The VMM's graceful shutdown request (the VMM sends the guest ctrl-alt-del).
fn shutdown_request() -> VmmRequest {
    VmmRequest::Shutdown { timeout_secs: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hvnode-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn resolve_refuses_escapes_and_missing_files() {
        let root = scratch("img");
        let images = root.join("images");
        std::fs::create_dir_all(images.join("k")).unwrap();
        std::fs::write(images.join("k/vmlinuz"), b"x").unwrap();
        std::fs::write(root.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("secret"), images.join("link")).unwrap();
        assert!(resolve(&images, "kernel", "k/vmlinuz").is_ok());
        for bad in ["../secret", "link", "k/missing", "/etc/passwd", "k"] {
            assert!(resolve(&images, "kernel", bad).is_err(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_differ_per_guest_and_index() {
        let long = "g".repeat(63);
        let mut seen = std::collections::HashSet::new();
        for guest in ["web-1", "web-2", long.as_str()] {
            for i in 0..8 {
                let tap = tap_name(guest, i);
                assert!(tap.len() <= 15, "{tap}");
                assert!(tap.starts_with("hv"), "{tap}");
                assert_eq!(tap, tap_name(guest, i), "stable");
                assert!(seen.insert(tap), "{guest} {i} collides");
            }
        }
    }

    fn spec_with_nics(nics: &[(Option<&str>, &str)]) -> GuestSpec {
        GuestSpec {
            name: "web-1".into(),
            vcpus: 1,
            memory_mib: 64,
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: Vec::new(),
            nics: nics
                .iter()
                .map(|(mac, bridge)| hvnode_api::guest::NicSpec {
                    mac: mac.map(str::to_owned),
                    bridge: (*bridge).to_owned(),
                })
                .collect(),
            rng: false,
            autostart: false,
        }
    }

    #[test]
    fn nics_become_taps_on_existing_bridges_with_given_or_derived_macs() {
        let sys = scratch("sysnet");
        std::fs::create_dir_all(sys.join("br0/bridge")).unwrap();
        std::fs::create_dir_all(sys.join("eth0")).unwrap();
        let spec = spec_with_nics(&[(None, "br0"), (Some("52:54:00:aa:bb:cc"), "br0")]);
        let nets = vm_nets(&spec, &sys).unwrap();
        assert_eq!(
            nets,
            vec![
                VmNet {
                    tap: tap_name("web-1", 0),
                    mac: hvnode_api::guest::derived_mac("web-1", 0),
                    bridge: Some("br0".into()),
                },
                VmNet {
                    tap: tap_name("web-1", 1),
                    mac: "52:54:00:aa:bb:cc".into(),
                    bridge: Some("br0".into()),
                },
            ]
        );
        for missing in ["eth0", "br9"] {
            let spec = spec_with_nics(&[(None, "br0"), (None, missing)]);
            match vm_nets(&spec, &sys) {
                Err(GuestError::NoBridge(b)) => assert_eq!(b, missing),
                other => panic!("{missing}: {other:?}"),
            }
        }
        let _ = std::fs::remove_dir_all(&sys);
    }

    #[test]
    fn autostart_is_due_on_the_first_start_after_boot_only() {
        let run = scratch("autostart").join("run");
        assert!(first_start_since_boot(&run).unwrap());
        assert!(run.join(AUTOSTART_MARKER).is_file());
        assert!(!first_start_since_boot(&run).unwrap(), "agent restart");
        assert!(!first_start_since_boot(&run).unwrap());
        // A reboot empties the tmpfs.
        std::fs::remove_dir_all(&run).unwrap();
        assert!(first_start_since_boot(&run).unwrap());
        let _ = std::fs::remove_dir_all(run.parent().unwrap());
    }

    /// A fake control socket: answers each connection's first line with `answer` (or never,
    /// holding the connection open, when it is `None`); returns the lines it received.
    fn fake_vmm(sock: &Path, answer: Option<&'static str>) -> std::sync::mpsc::Receiver<String> {
        let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().flatten() {
                let mut line = String::new();
                let _ = BufReader::new(&conn).read_line(&mut line);
                let _ = tx.send(line);
                match answer {
                    Some(a) => {
                        let _ = (&conn).write_all(a.as_bytes());
                    }
                    None => held.push(conn),
                }
            }
        });
        rx
    }

    #[test]
    fn agent_protocol_sends_one_json_line_and_reads_an_error_answer() {
        let dir = scratch("ctl-error");
        let sock = dir.join("control.sock");
        let seen = fake_vmm(
            &sock,
            Some("{\"result\":\"error\",\"code\":\"invalid_state\",\"message\":\"The guest is shutting down\"}\n"),
        );
        let answer = control(&sock, &VmmRequest::Pause, CONTROL_TIMEOUT).unwrap();
        assert_eq!(seen.recv().unwrap(), "{\"op\":\"pause\"}\n");
        assert_eq!(
            answer,
            VmmResponse::Error {
                code: "invalid_state".into(),
                message: "The guest is shutting down".into()
            }
        );
        control(&sock, &shutdown_request(), CONTROL_TIMEOUT).unwrap();
        assert_eq!(
            seen.recv().unwrap(),
            "{\"op\":\"shutdown\"}\n",
            "a plain shutdown, the agent keeps the timeout"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn agent_protocol_gives_up_on_a_vmm_that_never_answers() {
        let dir = scratch("ctl-stuck");
        let sock = dir.join("control.sock");
        let _seen = fake_vmm(&sock, None);
        let start = Instant::now();
        let e = control(&sock, &VmmRequest::Describe, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ControlError::Io(..)), "{e:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
        // No socket at all: refused after the grace for a VMM that is starting.
        let e = control(
            &dir.join("none.sock"),
            &VmmRequest::Describe,
            CONTROL_TIMEOUT,
        )
        .unwrap_err();
        assert!(matches!(e, ControlError::Io(..)), "{e:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dead_pid_is_not_a_live_vmm() {
        let dir = scratch("stale");
        assert!(live_vmm(&dir).unwrap_err().contains("no pid file"));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        std::fs::write(dir.join("pid"), pid.to_string()).unwrap();
        assert!(live_vmm(&dir).is_err());
        // A live process that is not a VMM.
        std::fs::write(dir.join("pid"), std::process::id().to_string()).unwrap();
        assert!(live_vmm(&dir).unwrap_err().contains("not a VMM"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
