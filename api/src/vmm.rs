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
}

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
    /// The request was refused or failed.
    Error {
        /// Stable code: `bad_request`, `invalid_state`, `busy` (too many clients), `internal`.
        code: String,
        /// What went wrong.
        message: String,
    },
}
