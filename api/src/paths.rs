//! Well-known paths on a running node. One place, so every process agrees.

/// Mount point of the persistent data partition.
pub const DATA_DIR: &str = "/var/lib/hvnode";
/// GPT partition name and filesystem label of the data partition.
pub const DATA_LABEL: &str = "HVNODE-DATA";
/// Node configuration (TOML), on the data partition.
pub const NODE_CONFIG: &str = "/var/lib/hvnode/node.toml";
/// TLS material of the node (key, certificate, manager CA), on the data partition.
pub const TLS_DIR: &str = "/var/lib/hvnode/tls";
/// Registration state of the node, on the data partition.
pub const REGISTRATION_FILE: &str = "/var/lib/hvnode/registration.toml";
/// Guest definitions, one `<name>.toml` each, on the data partition.
pub const GUESTS_DIR: &str = "/var/lib/hvnode/guests";
/// The node's image directory: guest kernels, initrds and disks must live below it.
pub const IMAGES_DIR: &str = "/var/lib/hvnode/images";
/// Runtime directory (tmpfs).
pub const RUN_DIR: &str = "/run/hvnode";
/// The agent's local API socket (plain HTTP).
pub const AGENT_SOCKET: &str = "/run/hvnode/agent.sock";
/// Init's control socket (line-delimited JSON, see [`crate::init`]).
pub const INIT_SOCKET: &str = "/run/hvnode/init.sock";
/// Per-guest runtime directories: `/run/hvnode/vms/<name>/`.
pub const VMS_RUN_DIR: &str = "/run/hvnode/vms";
/// The node log, bounded, written by init; the console shows it.
pub const NODE_LOG: &str = "/var/log/hvnode/node.log";
/// Where init records the current network state for the agent and console (JSON,
/// [`crate::node::NetworkStatus`]).
pub const NETWORK_STATE: &str = "/run/hvnode/network.json";
/// Where init records storage state (JSON, [`crate::node::StorageStatus`]).
pub const STORAGE_STATE: &str = "/run/hvnode/storage.json";
/// The VMM binary the agent starts, one process per guest.
pub const VMM_BINARY: &str = "/usr/bin/hvnode-vmm";
/// The agent binary init supervises.
pub const AGENT_BINARY: &str = "/usr/bin/hvnode-agent";
/// The console binary init supervises (on tty1 and ttyS0).
pub const CONSOLE_BINARY: &str = "/usr/bin/hvnode-console";
/// Where init records which slot the node booted, whether it confirmed it, and a failed update
/// (JSON, [`crate::install::SlotStatus`]). Absent when the node runs from its live medium.
pub const SLOT_STATUS: &str = "/run/hvnode/slot.json";
/// Where the live medium is mounted (init moves it into the root); the installer's source.
pub const MEDIA_DIR: &str = "/run/hvnode/media";
/// The release keys an installed node trusts for update bundles (`*.pub`, 64 hex digits each),
/// in the verified root.
pub const RELEASE_KEYS_DIR: &str = "/usr/lib/hvnode/release-keys";
/// The image's release (`HVNODE_VERSION=`, `HVNODE_BUILD=`), written by the image build.
pub const RELEASE_FILE: &str = "/etc/hvnode-release";
