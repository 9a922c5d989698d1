//! The node configuration file, `node.toml` on the data partition.
//!
//! Init reads it at boot (hostname, network); the agent rewrites it atomically when the
//! admin changes a setting through the console or the API.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Errors found while validating a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The TOML could not be parsed.
    #[error("Invalid TOML: {0}")]
    Toml(String),
    /// A hostname is not a valid RFC 1123 host name.
    #[error(
        "Invalid hostname {0:?}: use 1-63 letters, digits and '-', not starting or ending with '-'"
    )]
    Hostname(String),
    /// An address is not `ADDRESS/PREFIX`.
    #[error(
        "Invalid address {0:?}: expected ADDRESS/PREFIX, e.g. 192.0.2.10/24 or 2001:db8::10/64"
    )]
    Address(String),
    /// A prefix length is out of range for its family.
    #[error("Invalid prefix length in {0:?}: 0-32 for IPv4, 0-128 for IPv6")]
    Prefix(String),
    /// A VLAN id is out of range.
    #[error("Invalid VLAN id {0}: use 1-4094")]
    Vlan(u16),
    /// An interface name is not a valid Linux interface name.
    #[error("Invalid interface name {0:?}: 1-15 characters, no '/', ':' or whitespace")]
    Interface(String),
    /// A static interface lacks an address.
    #[error("Interface {0:?} is static but has no address")]
    NoAddress(String),
    /// A gateway is of the wrong family.
    #[error("Gateway {0} is not an address of the right family")]
    Gateway(IpAddr),
    /// A static interface's gateway is outside every subnet of its addresses, so the kernel
    /// would refuse the route.
    #[error("Gateway {0} is not inside the subnet of any of the interface's static addresses")]
    GatewaySubnet(IpAddr),
    /// A gateway is one of the interface's own addresses.
    #[error("Gateway {0} is the interface's own address")]
    GatewayIsSelf(IpAddr),
    /// An interface is configured twice.
    #[error("Interface {0:?} is configured twice")]
    Duplicate(String),
    /// A bond has no members.
    #[error("Bond {0:?} has no member interfaces")]
    EmptyBond(String),
    /// An MTU outside what Ethernet devices take.
    #[error("Invalid MTU {0}: use 68-9216")]
    Mtu(u32),
}

/// The whole node configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Host name; absent means `hvnode-<last 3 bytes of the first MAC>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Network configuration; empty means DHCP on every NIC with carrier.
    #[serde(default)]
    pub network: NetworkConfig,
}

/// Network configuration of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Name of the management bridge. The management NIC is enslaved to it and the
    /// bridge carries that NIC's addresses (settings given for the NIC apply to the
    /// bridge); guests' tap devices join it. Empty disables the bridge.
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// The management NIC; absent means the first NIC (by name) with carrier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management: Option<String>,
    /// DNS servers; when empty, those learnt from DHCP are used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    /// Search domains for resolv.conf.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Bonds to create before interfaces are configured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bonds: Vec<BondConfig>,
    /// Per-interface settings. NICs not listed get DHCP when they have carrier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceConfig>,
}

/// A Linux bond of several NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BondConfig {
    /// Bond interface name, e.g. `bond0`.
    pub name: String,
    /// Bonding mode as the kernel names it: `active-backup`, `802.3ad`, `balance-rr`, ...
    #[serde(default = "default_bond_mode")]
    pub mode: String,
    /// Member NIC names.
    pub members: Vec<String>,
}

fn default_bridge() -> String {
    "br0".to_owned()
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: default_bridge(),
            management: None,
            dns: Vec::new(),
            search: Vec::new(),
            bonds: Vec::new(),
            interfaces: Vec::new(),
        }
    }
}

fn default_bond_mode() -> String {
    "active-backup".to_owned()
}

/// How an interface gets its addresses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressMode {
    /// DHCPv4 (and IPv6 router advertisements, as the kernel does them).
    #[default]
    Dhcp,
    /// Addresses from `addresses`.
    Static,
    /// Link up, no addresses (e.g. a bond member or a bridge port).
    Manual,
}

/// Settings of one interface (a NIC, a bond, or a VLAN on one of them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Interface name, e.g. `eth0`, `enp1s0` or `bond0`.
    pub name: String,
    /// When set, the settings apply to a VLAN device `<name>.<vlan>` on top of `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// DHCP, static or manual.
    #[serde(default)]
    pub mode: AddressMode,
    /// Static addresses as `ADDRESS/PREFIX`, IPv4 and IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// IPv4 default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway4: Option<IpAddr>,
    /// IPv6 default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<IpAddr>,
    /// MTU; absent keeps the kernel's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// An address with its prefix length, parsed from `ADDRESS/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| ConfigError::Address(s.to_owned()))?;
        let addr: IpAddr = a.parse().map_err(|_| ConfigError::Address(s.to_owned()))?;
        let prefix: u8 = p.parse().map_err(|_| ConfigError::Prefix(s.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(ConfigError::Prefix(s.to_owned()));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` lies in this address's subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && Cidr {
                addr: ip,
                prefix: self.prefix,
            }
            .network()
                == self.network()
    }

    /// The subnet itself: the address with the host bits cleared.
    pub fn network(&self) -> Cidr {
        let host_bits = |width: u32| width - u32::from(self.prefix).min(width);
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(host_bits(32)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(host_bits(128)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Checks an RFC 1123 host name (a single label or a dotted name).
pub fn validate_hostname(name: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::Hostname(name.to_owned());
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// Checks a Linux interface name: 1 to 15 printable ASCII characters (the kernel counts bytes;
/// agent/openapi.yaml's pattern counts characters, so both mean the same), not `/` or `:`,
/// not `.` or `..`.
pub fn validate_ifname(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Interface(name.to_owned()))
    }
}

/// Checks a VLAN id (802.1Q: 0 and 4095 are reserved).
pub fn validate_vlan(id: u16) -> Result<(), ConfigError> {
    if (1..=4094).contains(&id) {
        Ok(())
    } else {
        Err(ConfigError::Vlan(id))
    }
}

/// Checks an MTU: 68 is the IPv4 minimum (RFC 791), 9216 the largest jumbo frame common
/// NICs and switches take.
pub fn validate_mtu(mtu: u32) -> Result<(), ConfigError> {
    if (68..=9216).contains(&mtu) {
        Ok(())
    } else {
        Err(ConfigError::Mtu(mtu))
    }
}

/// Checks that a static interface can route through `gateway`: it must lie in the subnet of
/// one of `addresses` of its family, and not be one of them. An IPv6 link-local gateway
/// (`fe80::/10`, what routers advertise) is reachable on any link.
pub fn validate_gateway(gateway: IpAddr, addresses: &[Cidr]) -> Result<(), ConfigError> {
    if addresses.iter().any(|c| c.addr == gateway) {
        return Err(ConfigError::GatewayIsSelf(gateway));
    }
    let link_local = match gateway {
        IpAddr::V6(g) => g.segments()[0] & 0xffc0 == 0xfe80,
        IpAddr::V4(_) => false,
    };
    if link_local || addresses.iter().any(|c| c.contains(gateway)) {
        Ok(())
    } else {
        Err(ConfigError::GatewaySubnet(gateway))
    }
}

impl InterfaceConfig {
    /// Name of the device these settings apply to (`eth0` or `eth0.100`).
    pub fn device_name(&self) -> String {
        match self.vlan {
            Some(v) => format!("{}.{}", self.name, v),
            None => self.name.clone(),
        }
    }

    /// Parsed static addresses.
    pub fn cidrs(&self) -> Result<Vec<Cidr>, ConfigError> {
        self.addresses.iter().map(|a| a.parse()).collect()
    }

    /// Validates this interface's settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_ifname(&self.name)?;
        if let Some(v) = self.vlan {
            validate_vlan(v)?;
            validate_ifname(&self.device_name())?;
        }
        if let Some(m) = self.mtu {
            validate_mtu(m)?;
        }
        let cidrs = self.cidrs()?;
        if self.mode == AddressMode::Static && cidrs.is_empty() {
            return Err(ConfigError::NoAddress(self.device_name()));
        }
        if let Some(g) = self.gateway4 {
            if !g.is_ipv4() {
                return Err(ConfigError::Gateway(g));
            }
        }
        if let Some(g) = self.gateway6 {
            if !g.is_ipv6() {
                return Err(ConfigError::Gateway(g));
            }
        }
        // DHCP and manual interfaces ignore the gateways; only a static one routes through them.
        if self.mode == AddressMode::Static {
            for g in self.gateway4.iter().chain(self.gateway6.iter()) {
                validate_gateway(*g, &cidrs)?;
            }
        }
        Ok(())
    }
}

impl NetworkConfig {
    /// Validates the whole network configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        if !self.bridge.is_empty() {
            validate_ifname(&self.bridge)?;
        }
        if let Some(m) = &self.management {
            validate_ifname(m)?;
        }
        for b in &self.bonds {
            validate_ifname(&b.name)?;
            if b.members.is_empty() {
                return Err(ConfigError::EmptyBond(b.name.clone()));
            }
            for m in &b.members {
                validate_ifname(m)?;
            }
        }
        for i in &self.interfaces {
            i.validate()?;
            if !seen.insert(i.device_name()) {
                return Err(ConfigError::Duplicate(i.device_name()));
            }
        }
        Ok(())
    }
}

impl NodeConfig {
    /// Parses and validates `node.toml`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serialises to TOML.
    pub fn to_toml(&self) -> String {
        // Serialising these plain structs cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Validates every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(h) = &self.hostname {
            validate_hostname(h)?;
        }
        self.network.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_config() {
        let text = r#"
hostname = "node-7"
[network]
dns = ["192.0.2.53"]
[[network.bonds]]
name = "bond0"
members = ["eth1", "eth2"]
[[network.interfaces]]
name = "eth0"
mode = "static"
addresses = ["192.0.2.10/24", "2001:db8::10/64"]
gateway4 = "192.0.2.1"
[[network.interfaces]]
name = "bond0"
vlan = 100
"#;
        let cfg = NodeConfig::from_toml(text).unwrap();
        assert_eq!(cfg.hostname.as_deref(), Some("node-7"));
        assert_eq!(cfg.network.interfaces[1].device_name(), "bond0.100");
        assert_eq!(NodeConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
    }

    #[test]
    fn rejects_bad_values_with_clear_errors() {
        assert_eq!(
            validate_hostname("-bad"),
            Err(ConfigError::Hostname("-bad".into()))
        );
        assert!(matches!(
            "10.0.0.1/33".parse::<Cidr>(),
            Err(ConfigError::Prefix(_))
        ));
        assert!(matches!(
            "10.0.0.1".parse::<Cidr>(),
            Err(ConfigError::Address(_))
        ));
        let vlan = InterfaceConfig {
            name: "eth0".into(),
            vlan: Some(4095),
            ..Default::default()
        };
        assert_eq!(vlan.validate(), Err(ConfigError::Vlan(4095)));
        let stat = InterfaceConfig {
            name: "eth0".into(),
            mode: AddressMode::Static,
            ..Default::default()
        };
        assert!(matches!(stat.validate(), Err(ConfigError::NoAddress(_))));
        assert!(matches!(
            NodeConfig::from_toml("bogus = 1"),
            Err(ConfigError::Toml(_))
        ));
    }

    #[test]
    fn subnet_membership_follows_the_prefix() {
        let c: Cidr = "192.0.2.10/24".parse().unwrap();
        assert!(c.contains("192.0.2.254".parse().unwrap()));
        assert!(!c.contains("192.0.3.1".parse().unwrap()));
        assert!(!c.contains("2001:db8::1".parse().unwrap()));
        assert_eq!(c.network().to_string(), "192.0.2.0/24");
        let all: Cidr = "10.1.2.3/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        assert_eq!(all.network().to_string(), "0.0.0.0/0");
        let host: Cidr = "10.1.2.3/32".parse().unwrap();
        assert!(!host.contains("10.1.2.4".parse().unwrap()));
        let v6: Cidr = "2001:db8:1::10/64".parse().unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("2001:db8:2::1".parse().unwrap()));
        assert_eq!(v6.network().to_string(), "2001:db8:1::/64");
    }

    #[test]
    fn static_gateway_must_be_in_a_subnet_and_not_the_node_itself() {
        let mut i = InterfaceConfig {
            name: "eth0".into(),
            mode: AddressMode::Static,
            addresses: vec!["192.0.2.10/24".into(), "2001:db8::10/64".into()],
            gateway4: Some("192.0.2.1".parse().unwrap()),
            gateway6: Some("fe80::1".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(i.validate(), Ok(()));
        i.gateway4 = Some("198.51.100.1".parse().unwrap());
        assert_eq!(
            i.validate(),
            Err(ConfigError::GatewaySubnet("198.51.100.1".parse().unwrap()))
        );
        i.gateway4 = Some("192.0.2.10".parse().unwrap());
        assert_eq!(
            i.validate(),
            Err(ConfigError::GatewayIsSelf("192.0.2.10".parse().unwrap()))
        );
        i.gateway4 = None;
        i.gateway6 = Some("2001:db9::1".parse().unwrap());
        assert_eq!(
            i.validate(),
            Err(ConfigError::GatewaySubnet("2001:db9::1".parse().unwrap()))
        );
        i.addresses = vec!["2001:db8::10/64".into()];
        i.gateway4 = Some("192.0.2.1".parse().unwrap());
        i.gateway6 = None;
        assert_eq!(
            i.validate(),
            Err(ConfigError::GatewaySubnet("192.0.2.1".parse().unwrap())),
            "an IPv4 gateway needs an IPv4 address"
        );
        i.mode = AddressMode::Dhcp;
        assert_eq!(i.validate(), Ok(()), "DHCP ignores the static gateway");
    }

    #[test]
    fn vlan_ids_zero_and_4095_are_reserved() {
        assert_eq!(validate_vlan(0), Err(ConfigError::Vlan(0)));
        assert_eq!(validate_vlan(1), Ok(()));
        assert_eq!(validate_vlan(4094), Ok(()));
        assert_eq!(validate_vlan(4095), Err(ConfigError::Vlan(4095)));
    }

    #[test]
    fn mtu_outside_68_to_9216_is_rejected() {
        assert_eq!(validate_mtu(67), Err(ConfigError::Mtu(67)));
        assert_eq!(validate_mtu(68), Ok(()));
        assert_eq!(validate_mtu(9216), Ok(()));
        let i = InterfaceConfig {
            name: "eth1".into(),
            mtu: Some(65536),
            ..Default::default()
        };
        assert_eq!(i.validate(), Err(ConfigError::Mtu(65536)));
    }
}
