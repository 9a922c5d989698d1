//! Node information, statistics, and the state files init publishes under `/run/hvnode`.

use serde::{Deserialize, Serialize};

/// Static facts about the node (`GET /v1/node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Current host name.
    pub hostname: String,
    /// hvnode version.
    pub version: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU model name.
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Whether /dev/kvm is usable.
    pub kvm: bool,
    /// Network interfaces.
    pub nics: Vec<NicStatus>,
    /// Block devices.
    pub disks: Vec<DiskInfo>,
    /// Seconds since boot.
    pub uptime_secs: u64,
}

/// A block device of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Kernel name, e.g. `sda`, `nvme0n1`.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Model string, if the kernel knows it.
    #[serde(default)]
    pub model: String,
    /// Whether the device is removable or read-only media.
    #[serde(default)]
    pub removable: bool,
    /// Whether the disk has no partition table and no filesystem signature.
    #[serde(default)]
    pub blank: bool,
}

/// Runtime statistics (`GET /v1/stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// CPU use over the last sampling interval, 0.0-100.0.
    pub cpu_percent: f64,
    /// Memory in use, bytes.
    pub memory_used_bytes: u64,
    /// Memory total, bytes.
    pub memory_total_bytes: u64,
    /// 1/5/15-minute load averages.
    pub load: [f64; 3],
    /// Guests defined.
    pub guests_total: u32,
    /// Guests running (or paused).
    pub guests_running: u32,
    /// Seconds since boot.
    pub uptime_secs: u64,
}

/// How an interface got its addresses, as init reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressSource {
    /// From a DHCP lease.
    Dhcp,
    /// From the node config or the `ip=` kernel argument.
    Static,
    /// No addresses.
    None,
}

/// State of one network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStatus {
    /// Interface name.
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// Carrier present.
    pub carrier: bool,
    /// Addresses as `ADDRESS/PREFIX`.
    pub addresses: Vec<String>,
    /// Where the addresses came from.
    pub source: AddressSource,
}

/// The network state init publishes at [`crate::paths::NETWORK_STATE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    /// Current host name.
    pub hostname: String,
    /// Interfaces (loopback excluded).
    pub interfaces: Vec<NicStatus>,
    /// Default gateways.
    pub gateways: Vec<String>,
    /// DNS servers in resolv.conf.
    pub dns: Vec<String>,
}

/// The storage state init publishes at [`crate::paths::STORAGE_STATE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageStatus {
    /// Whether a persistent data partition is mounted at [`crate::paths::DATA_DIR`].
    pub persistent: bool,
    /// Device of the data partition, e.g. `/dev/sda1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Filesystem size in bytes.
    #[serde(default)]
    pub size_bytes: u64,
    /// Free bytes.
    #[serde(default)]
    pub free_bytes: u64,
    /// Why there is no persistent storage, when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `GET /v1/network`: the saved configuration, the live state, and a pending change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// The configuration saved in `node.toml`.
    pub config: crate::config::NetworkConfig,
    /// What init reports now.
    pub status: NetworkStatus,
    /// Seconds until an unconfirmed change rolls back, if one is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_in_secs: Option<u64>,
    /// The applied configuration awaiting confirmation, if a change is pending; `config` is
    /// what a rollback returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<crate::config::NetworkConfig>,
}

/// `PUT /v1/node/hostname`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hostname {
    /// The new host name; applied now and saved.
    pub hostname: String,
}

/// `GET /v1/storage`: the data partition and the disks that could hold one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageView {
    /// The data partition state.
    pub status: StorageStatus,
    /// Disks with no partition table and no filesystem signature.
    pub blank_disks: Vec<DiskInfo>,
}

/// `POST /v1/storage/init`: create the data partition on a blank disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageInit {
    /// Whole-disk device, e.g. `/dev/sdb`.
    pub device: String,
    /// The admin types the device name again to confirm; must equal `device`.
    pub confirm: String,
}

/// `POST /v1/power`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum PowerAction {
    /// Stop guests and services, reboot.
    Reboot,
    /// Stop guests and services, power off.
    Poweroff,
}

/// A file of the node's image directory: `GET /v1/images` lists them, `PUT /v1/images/{path}`
/// answers with the one written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    /// Path below the image directory.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// `GET /v1/node/certificate`: what the manager needs to sign the node's certificate for
/// node-to-node connections (live migration), and the one it signed last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertificate {
    /// A PKCS#10 request (PEM) for the node's own key: the manager signs it with its CA.
    pub csr_pem: String,
    /// The certificate the manager signed, if one is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<SignedCertificate>,
}

/// A manager-signed node certificate, as the node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCertificate {
    /// Its SHA-256 fingerprint.
    pub fingerprint: String,
    /// When it expires (Unix seconds).
    pub not_after_unix: i64,
}

/// `PUT /v1/node/certificate`: the certificate the manager signed for the node's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallCertificate {
    /// The certificate, PEM; it must be for the node's key and signed by the manager's CA.
    pub cert_pem: String,
}
