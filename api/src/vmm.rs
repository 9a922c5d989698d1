//! The VMM's launch configuration and its control protocol.
//!
//! The agent writes a [`VmConfig`] as JSON and starts `hvnode-vmm --config <file>`.
//! The VMM then serves [`VmmRequest`]s on `control_socket`: one JSON object per line in,
//! one [`VmmResponse`] per line out, synchronously.

use serde::{Deserialize, Serialize};

/// Everything one VMM process needs to run one guest. Paths are absolute; the agent has
/// already confined them to the image directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest name (for logs).
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// bzImage or ELF vmlinux.
    pub kernel: String,
    /// Optional initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line, passed as it is (the guest finds the virtio-mmio devices in ACPI).
    #[serde(default)]
    pub cmdline: String,
    /// Block devices.
    #[serde(default)]
    pub disks: Vec<VmDisk>,
    /// Network devices.
    #[serde(default)]
    pub nets: Vec<VmNet>,
    /// Attach a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// File the serial console output is appended to (bounded by the VMM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log: Option<String>,
    /// Unix socket a client can attach to for the serial console (read and write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_socket: Option<String>,
    /// Unix socket of the control protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<String>,
    /// File the VMM writes its [`VmExit`] to just before it exits, so that a supervisor that is
    /// not its parent (an agent that restarted) learns how the guest ended. The VMM creates it
    /// empty at start-up and writes it once at the end: a reader sees nothing or the whole of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_file: Option<String>,
    /// The jail a VMM started as root enters once it has opened what it needs (see
    /// [`VmJail`]); `None` keeps the sandbox of old: `nobody` ([`VMM_RUN_AS`]), no namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<VmJail>,
}

/// A VMM's jail (docs/vmm.md#the-jail): before the guest runs, the VMM enters a mount and an
/// IPC namespace of its own whose root is an empty read-only tmpfs (plus `snapshot_dir`, bound
/// at its own path), then runs as `uid`:`gid`, which no other running guest's VMM has. The
/// PID namespace and the cgroup come from whoever starts it (the agent clones it into both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmJail {
    /// The user the VMM runs as once the VM is built.
    pub uid: u32,
    /// Its group (and its only group).
    pub gid: u32,
    /// Absolute path of the directory snapshots of this guest are written into (each into a
    /// new directory of it); bound into the jail, read-write. It must exist and be writable by
    /// `uid`. A snapshot anywhere else fails: the path does not exist in the jail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_dir: Option<String>,
}

/// The first uid and gid of a jailed VMM: the guest in slot *n* of the running guests runs as
/// `JAIL_ID_BASE + n`, so that no two running VMMs share a uid.
pub const JAIL_ID_BASE: u32 = 100_000;
/// How many slots (and so running jailed guests) there are: uids and gids 100000-165535.
pub const JAIL_ID_SLOTS: u32 = 65_536;

/// How a VMM process ended, written to [`VmConfig::exit_file`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmExit {
    /// The process exit code: 0 powered off or stopped, 1 setup error, 2 crashed, 3 reboot.
    pub code: i32,
    /// One line saying why.
    pub reason: String,
}

/// A virtio-blk device backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDisk {
    /// Raw image file.
    pub path: String,
    /// Read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A virtio-net device backed by a tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmNet {
    /// Name of the tap device (created by the VMM if missing).
    pub tap: String,
    /// Guest MAC address.
    pub mac: String,
    /// Bridge the VMM adds the tap device to (and brings it up); `None` leaves it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum VmmRequest {
    /// Describe the VM: config and state.
    Describe,
    /// Pause the guest: every vCPU and every device worker parked (a device finishes the request
    /// it is serving first), so guest memory and device state stay still. Answered once all are.
    Pause,
    /// Resume what `pause` parked; notifications that arrived meanwhile are served then.
    Resume,
    /// Ask the guest to shut down (ctrl-alt-del through the i8042); answered at once. A paused
    /// guest is resumed first. From then on a guest reset counts as powered off.
    Shutdown {
        /// Stop the guest if it is still up this many seconds later; `None` waits for it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Stop the VM at once and exit the VMM.
    Stop,
    /// Counters.
    Stats,
    /// Writes the guest into the directory `dir` (which must not exist yet): a paused guest as
    /// it is; a running one is paused first and resumed afterwards. Disks are flushed first.
    /// See [`SNAPSHOT_CONFIG`], [`SNAPSHOT_STATE`], [`SNAPSHOT_MEMORY`] for what it holds.
    Snapshot {
        /// Absolute path of the snapshot directory to create.
        dir: String,
    },
    /// Sends the running guest to another VMM (live migration, see docs/vmm.md). Answered at
    /// once with `ok`, after which this connection carries the migration stream to the
    /// destination VMM (started with `--incoming`), relayed by the caller; or with an error,
    /// and the connection stays a control connection. The VMM closes the stream when the
    /// migration ends; `migrate_status` then tells how it ended. A guest that arrived on the
    /// destination stays paused here for good (state `migrated`) until it is stopped.
    MigrateSend {
        /// The longest pause the guest may see, in milliseconds: pre-copy passes go on until
        /// what is left to copy fits in it at the measured bandwidth.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_limit_ms: Option<u64>,
        /// Passes over dirty memory before giving up (the guest stays here).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_passes: Option<u32>,
        /// Seconds before giving up (the guest stays here).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
        /// Hash all guest memory on both sides while paused and refuse the switchover if they
        /// differ (costs downtime: for tests and for doubt).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        verify_memory: bool,
    },
    /// How the migration in progress, or the last one, stands.
    MigrateStatus,
    /// Cancels the migration in progress: the guest keeps running here.
    MigrateCancel,
}

/// Migration defaults: the downtime limit (ms), the pass limit and the timeout (s).
pub const MIGRATION_DOWNTIME_LIMIT_MS: u64 = 100;
/// See [`MIGRATION_DOWNTIME_LIMIT_MS`].
pub const MIGRATION_MAX_PASSES: u32 = 30;
/// See [`MIGRATION_DOWNTIME_LIMIT_MS`].
pub const MIGRATION_TIMEOUT_SECS: u64 = 600;

/// Where a migration stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// No migration has run.
    #[default]
    None,
    /// Copying memory while the guest runs.
    Precopy,
    /// Guest paused: the last pass, the device state, the destination resuming.
    Switchover,
    /// The guest runs on the destination; here it stays paused until stopped.
    Completed,
    /// Failed; the guest runs here as before (unless `outcome_unknown`).
    Failed,
    /// Cancelled; the guest runs here as before.
    Cancelled,
}

impl MigrationPhase {
    /// Whether the migration is still under way (pre-copy or switchover).
    pub fn in_progress(self) -> bool {
        matches!(self, MigrationPhase::Precopy | MigrationPhase::Switchover)
    }
}

/// A migration's progress and, once it ended, its outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Where it stands.
    pub phase: MigrationPhase,
    /// The pass under way (0: all memory once).
    pub pass: u32,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Memory bytes sent so far (pages sent twice count twice).
    pub bytes_sent: u64,
    /// Bytes found dirty by the last pass: what is left to send.
    pub bytes_left: u64,
    /// How fast the guest dirties memory (bytes per second): the bytes found dirty at the
    /// start of the last pass over the time since the dirty log was read before (0 after pass 0).
    pub dirty_rate_bytes_per_sec: u64,
    /// Measured transfer bandwidth (bytes per second, last pass).
    pub bandwidth_bytes_per_sec: u64,
    /// Downtime expected if the switchover happened now.
    pub expected_downtime_ms: u64,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The switchover reached the destination but its answer never came: the guest may run
    /// there. It stays paused here; ask the destination before resuming or stopping it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outcome_unknown: bool,
    /// What it cost, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<MigrationResult>,
}

/// What a completed migration cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationResult {
    /// Passes over memory, the first full one included.
    pub passes: u32,
    /// From start to the destination's answer.
    pub total_ms: u64,
    /// The guest's pause: from pausing here to running there (the sum of the four parts
    /// below, measured from here).
    pub downtime_ms: u64,
    /// Downtime part: the last pass over dirty memory.
    pub last_pass_ms: u64,
    /// Downtime part: reading and encoding the device state.
    pub state_ms: u64,
    /// Downtime part: sending the state and waiting for the destination's answer, less its
    /// restore.
    pub transfer_ms: u64,
    /// Downtime part: the destination restoring the state and starting the vCPUs.
    pub resume_ms: u64,
    /// Memory bytes sent in all.
    pub bytes_sent: u64,
    /// Memory bytes sent in the last pass, while paused.
    pub last_pass_bytes: u64,
}

/// The uid and gid (`nobody`, `nogroup`) a VMM started as root runs as once its VM is built:
/// what it writes later (a snapshot) must be writable by them.
pub const VMM_RUN_AS: u32 = 65534;

/// In a snapshot directory: the guest's [`VmConfig`] as it ran (JSON).
pub const SNAPSHOT_CONFIG: &str = "config.json";
/// In a snapshot directory: the VM's state apart from memory (vCPUs, interrupt controllers,
/// clock, devices), in the VMM's versioned, checksummed state format (docs/vmm.md).
pub const SNAPSHOT_STATE: &str = "state.json";
/// In a snapshot directory: guest memory, one sparse file (pages never written are holes), laid
/// out by guest physical address with the MMIO hole left out.
pub const SNAPSHOT_MEMORY: &str = "memory";

/// Run state of the VM as the VMM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    /// vCPUs running.
    Running,
    /// vCPUs and device workers parked.
    Paused,
    /// Shutting down or stopped.
    Stopping,
    /// Migrated away: the guest runs on another node; this VMM only waits to be stopped.
    Migrated,
}

/// Counters of a running VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// vCPU exits by vCPU, then by reason name.
    pub vcpu_exits: Vec<std::collections::BTreeMap<String, u64>>,
    /// Device counters by device name (`virtio-blk0`, `virtio-net0`, `serial`, ...).
    pub devices: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Resident set size of the VMM process in bytes.
    pub rss_bytes: u64,
}

/// What a snapshot wrote and what it cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Guest memory size in bytes (the memory file's length).
    pub memory_bytes: u64,
    /// Bytes of memory actually written (the rest are holes).
    pub memory_written_bytes: u64,
    /// Size of the state file in bytes.
    pub state_bytes: u64,
    /// How long the guest was paused for it, in milliseconds (0 if it was paused already).
    pub paused_ms: u64,
    /// How long writing took, in milliseconds.
    pub write_ms: u64,
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum VmmResponse {
    /// Done, nothing to report.
    Ok,
    /// Answer to `describe`.
    Description {
        /// The launch config (boxed: it dwarfs the other answers).
        config: Box<VmConfig>,
        /// Current state.
        state: VmRunState,
        /// Seconds since the VM started.
        uptime_secs: u64,
    },
    /// Answer to `stats`.
    Stats {
        /// The counters.
        stats: VmStats,
    },
    /// Answer to `snapshot`.
    Snapshot {
        /// What was written.
        snapshot: SnapshotInfo,
    },
    /// Answer to `migrate_status` and `migrate_cancel`.
    Migration {
        /// The migration in progress or the last one.
        migration: MigrationStatus,
    },
    /// The request was refused or failed.
    Error {
        /// Stable code: `bad_request`, `invalid_state`, `busy` (too many clients), `internal`.
        code: String,
        /// What went wrong.
        message: String,
    },
}
