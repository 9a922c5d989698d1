//! Guest (virtual machine) definitions and their runtime status.

use serde::{Deserialize, Serialize};

/// Errors found while validating a guest definition.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestSpecError {
    /// Bad guest name.
    #[error("Invalid guest name {0:?}: use 1-63 characters from a-z, 0-9, '-' and '_', starting with a letter or digit")]
    Name(String),
    /// vCPU count out of range.
    #[error("Invalid vcpus {0}: use 1-{MAX_VCPUS}")]
    Vcpus(u32),
    /// Memory size out of range.
    #[error("Invalid memory_mib {0}: use {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB}")]
    Memory(u64),
    /// A path is not a plain relative path inside the image directory.
    #[error("Invalid path {0:?}: give a file name relative to the node's image directory, without '..' or a leading '/'")]
    Path(String),
    /// Bad MAC address.
    #[error("Invalid MAC address {0:?}: expected six hex bytes like 52:54:00:12:34:56, unicast")]
    Mac(String),
    /// Bad bridge name.
    #[error("Invalid bridge name {0:?}")]
    Bridge(String),
    /// Kernel command line too long.
    #[error("Kernel command line is {0} bytes long; the limit is 2047")]
    Cmdline(usize),
    /// Too many devices.
    #[error("Too many {0}: at most 8")]
    TooMany(&'static str),
}

/// Largest number of vCPUs a guest may have.
pub const MAX_VCPUS: u32 = 64;
/// Smallest guest memory.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest memory.
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;

/// A guest definition, as stored in `guests/<name>.toml` and sent over the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    /// Unique name of the guest on this node.
    pub name: String,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Kernel (bzImage or ELF vmlinux), relative to the image directory.
    pub kernel: String,
    /// Initrd, relative to the image directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line; the VMM appends its device parameters.
    #[serde(default)]
    pub cmdline: String,
    /// Block devices, in order (`vda`, `vdb`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// Whether a virtio-rng device is given to the guest.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// Start the guest when the node boots.
    #[serde(default)]
    pub autostart: bool,
}

/// A disk of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Raw image file, relative to the image directory.
    pub path: String,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A network interface of a guest: a tap device on a bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// MAC address; absent means one derived from the guest name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Bridge the tap device joins.
    #[serde(default = "default_bridge")]
    pub bridge: String,
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_true() -> bool {
    true
}
fn default_bridge() -> String {
    "br0".to_owned()
}

/// Checks a guest name.
pub fn validate_name(name: &str) -> Result<(), GuestSpecError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(GuestSpecError::Name(name.to_owned()))
    }
}

/// Checks that a path is a plain relative path that stays inside the image directory.
pub fn validate_image_path(path: &str) -> Result<(), GuestSpecError> {
    let bad = || GuestSpecError::Path(path.to_owned());
    // Characters, not bytes, as agent/openapi.yaml's maxLength counts them.
    if path.is_empty() || path.chars().count() > 255 || path.starts_with('/') || path.contains('\0')
    {
        return Err(bad());
    }
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err(bad());
        }
    }
    Ok(())
}

/// The MAC address of NIC `index` of a guest whose spec names none: `52:54:00` (locally
/// administered, unicast) and three bytes of a hash of the name and index, so that it stays the
/// same across restarts and DHCP leases follow the guest. Here, not in the agent, so that every
/// front end shows the address the guest really gets.
pub fn derived_mac(guest: &str, index: usize) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{guest}/{index}").as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

impl NicSpec {
    /// The MAC the guest's NIC number `index` gets: the spec's, or [`derived_mac`].
    pub fn mac_for(&self, guest: &str, index: usize) -> String {
        self.mac
            .clone()
            .unwrap_or_else(|| derived_mac(guest, index))
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`, refusing multicast addresses.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], GuestSpecError> {
    let bad = || GuestSpecError::Mac(mac.to_owned());
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || out[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(out)
}

impl GuestSpec {
    /// A guest of the default size booting `kernel`, nothing else attached (a start for
    /// tests and tools; `..GuestSpec::minimal(..)` fills the rest).
    pub fn minimal(name: &str, kernel: &str) -> Self {
        GuestSpec {
            name: name.to_owned(),
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
            kernel: kernel.to_owned(),
            initrd: None,
            cmdline: String::new(),
            disks: Vec::new(),
            nics: Vec::new(),
            rng: true,
            autostart: false,
        }
    }

    /// Validates every field.
    pub fn validate(&self) -> Result<(), GuestSpecError> {
        validate_name(&self.name)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(GuestSpecError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(GuestSpecError::Memory(self.memory_mib));
        }
        validate_image_path(&self.kernel)?;
        if let Some(i) = &self.initrd {
            validate_image_path(i)?;
        }
        if self.cmdline.len() > 2047 {
            return Err(GuestSpecError::Cmdline(self.cmdline.len()));
        }
        if self.disks.len() > 8 {
            return Err(GuestSpecError::TooMany("disks"));
        }
        if self.nics.len() > 8 {
            return Err(GuestSpecError::TooMany("nics"));
        }
        for d in &self.disks {
            validate_image_path(&d.path)?;
        }
        for n in &self.nics {
            if let Some(m) = &n.mac {
                parse_mac(m)?;
            }
            crate::config::validate_ifname(&n.bridge)
                .map_err(|_| GuestSpecError::Bridge(n.bridge.clone()))?;
        }
        Ok(())
    }
}

/// Runtime state of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestState {
    /// Defined, no VMM process.
    Stopped,
    /// VMM process starting.
    Starting,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// Graceful shutdown requested, waiting for the guest.
    ShuttingDown,
    /// The VMM process died unexpectedly.
    Crashed,
    /// Moving to or from another node (live migration): on the source it runs until the
    /// switchover, on the destination it runs from then on.
    Migrating,
}

impl GuestState {
    /// The name the API spells it with (snake_case, as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            GuestState::Stopped => "stopped",
            GuestState::Starting => "starting",
            GuestState::Running => "running",
            GuestState::Paused => "paused",
            GuestState::ShuttingDown => "shutting_down",
            GuestState::Crashed => "crashed",
            GuestState::Migrating => "migrating",
        }
    }
}

/// A guest with its runtime status, as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// The definition.
    pub spec: GuestSpec,
    /// Current state.
    pub state: GuestState,
    /// PID of the VMM process, when running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Seconds since the guest was started, when running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
    /// Why the guest is `crashed`: the VMM's last word (its exit file or log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_reason: Option<String>,
    /// The guest belongs to the cluster (placed on this node by it): it is changed through the
    /// cluster, not through this node's definition routes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// Names of the guest's snapshots, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
}

/// `POST /v1/guests/{name}/snapshots`: take a snapshot of a guest that has a VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// The snapshot's name, unique per guest; the same rules as a guest name.
    pub name: String,
}

/// One snapshot of a guest: its memory, its state and the definition it ran with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStatus {
    /// The snapshot's name.
    pub name: String,
    /// The guest it belongs to.
    pub guest: String,
    /// Unix time it was taken, in seconds.
    pub created: u64,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Space it takes on the data partition in bytes (memory holes take none).
    pub disk_bytes: u64,
    /// How long the guest was paused for it, in milliseconds.
    #[serde(default)]
    pub paused_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestSpec {
        GuestSpec {
            name: "web-1".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "vmlinuz".into(),
            initrd: Some("initrd.img".into()),
            cmdline: "console=ttyS0".into(),
            disks: vec![DiskSpec {
                path: "disks/web-1.raw".into(),
                read_only: false,
            }],
            nics: vec![NicSpec {
                mac: Some("52:54:00:00:00:01".into()),
                bridge: "br0".into(),
            }],
            rng: true,
            autostart: false,
        }
    }

    #[test]
    fn derived_macs_are_stable_locally_administered_unicast() {
        let a = derived_mac("web-1", 0);
        assert_eq!(a, derived_mac("web-1", 0));
        assert_ne!(a, derived_mac("web-1", 1));
        assert_ne!(a, derived_mac("web-2", 0));
        let bytes = parse_mac(&a).unwrap();
        assert_eq!(&bytes[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(bytes[0] & 0b11, 0b10, "locally administered, unicast");
    }

    #[test]
    fn a_nic_gets_its_own_mac_or_the_derived_one() {
        let given = NicSpec {
            mac: Some("52:54:00:aa:bb:cc".into()),
            bridge: "br0".into(),
        };
        assert_eq!(given.mac_for("web-1", 0), "52:54:00:aa:bb:cc");
        let derived = NicSpec {
            mac: None,
            bridge: "br0".into(),
        };
        assert_eq!(derived.mac_for("web-1", 1), derived_mac("web-1", 1));
    }

    #[test]
    fn state_names_are_the_serialised_names() {
        for st in [
            GuestState::Stopped,
            GuestState::Starting,
            GuestState::Running,
            GuestState::Paused,
            GuestState::ShuttingDown,
            GuestState::Crashed,
        ] {
            assert_eq!(
                serde_json::to_value(st).unwrap(),
                serde_json::Value::from(st.as_str())
            );
        }
    }

    #[test]
    fn accepts_valid_spec_and_round_trips_toml() {
        let s = spec();
        s.validate().unwrap();
        let text = toml::to_string(&s).unwrap();
        assert_eq!(toml::from_str::<GuestSpec>(&text).unwrap(), s);
    }

    #[test]
    fn rejects_paths_escaping_the_image_directory() {
        for p in [
            "../etc/shadow",
            "/etc/shadow",
            "a/../../b",
            "",
            "a//b",
            "./a",
        ] {
            assert_eq!(
                validate_image_path(p),
                Err(GuestSpecError::Path(p.into())),
                "{p}"
            );
        }
        validate_image_path("kernels/vmlinuz-6.1").unwrap();
    }

    #[test]
    fn rejects_bad_names_sizes_and_macs() {
        assert!(validate_name("Web").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(s.validate(), Err(GuestSpecError::Vcpus(0)));
        let mut s = spec();
        s.memory_mib = 1;
        assert_eq!(s.validate(), Err(GuestSpecError::Memory(1)));
        assert!(parse_mac("01:00:5e:00:00:01").is_err(), "multicast");
        assert!(parse_mac("52:54:00:00:00").is_err());
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
    }
}
