//! What to build from a configuration: pure, so it is unit-tested without a kernel.

use std::net::IpAddr;

use hvnode_api::config::{AddressMode, Cidr, ConfigError, NetworkConfig};
use netlink_packet_route::link::BondMode;

use crate::iparg::IpArg;

/// Errors computing a plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The configuration does not validate.
    #[error("Invalid network configuration")]
    Config(#[from] ConfigError),
    /// A bond mode is unknown.
    #[error("Unknown bond mode {mode:?} for {bond}: use balance-rr, active-backup, balance-xor, broadcast, 802.3ad, balance-tlb or balance-alb")]
    BondMode {
        /// The bond.
        bond: String,
        /// The mode given.
        mode: String,
    },
}

/// A physical NIC as found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Interface name.
    pub name: String,
    /// Hardware address.
    pub mac: [u8; 6],
    /// Carrier present.
    pub carrier: bool,
}

/// The management bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePlan {
    /// Bridge name.
    pub name: String,
    /// The enslaved management device (a NIC or a bond).
    pub port: String,
}

/// A bond to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BondPlan {
    /// Bond name.
    pub name: String,
    /// Mode.
    pub mode: BondMode,
    /// Member NICs.
    pub members: Vec<String>,
}

/// A VLAN device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanPlan {
    /// Device name, `<parent>.<id>`.
    pub name: String,
    /// Parent device (after bridge substitution).
    pub parent: String,
    /// VLAN id.
    pub id: u16,
}

/// How a device gets addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    /// DHCPv4 client.
    Dhcp,
    /// Fixed addresses and gateways.
    Static {
        /// Addresses.
        addresses: Vec<Cidr>,
        /// IPv4 default gateway.
        gateway4: Option<IpAddr>,
        /// IPv6 default gateway.
        gateway6: Option<IpAddr>,
    },
    /// Up, no addresses.
    Manual,
}

/// Settings of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    /// Device name.
    pub name: String,
    /// Addressing.
    pub addressing: Addressing,
    /// MTU to set.
    pub mtu: Option<u32>,
}

/// Everything to build, in order: bonds, bridge, VLANs, then device settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Bonds.
    pub bonds: Vec<BondPlan>,
    /// The management bridge.
    pub bridge: Option<BridgePlan>,
    /// VLAN devices.
    pub vlans: Vec<VlanPlan>,
    /// Per-device settings (NICs, bonds, the bridge, VLANs).
    pub devices: Vec<DevicePlan>,
    /// Static DNS servers (config, else `ip=`); empty means "learn from DHCP".
    pub dns: Vec<IpAddr>,
    /// Search domains from the config.
    pub search: Vec<String>,
}

impl Plan {
    /// The settings of `name`, if planned.
    pub fn device(&self, name: &str) -> Option<&DevicePlan> {
        self.devices.iter().find(|d| d.name == name)
    }
}

/// The management device: the configured one, else the first NIC with carrier,
/// else the first NIC (NICs sorted by name).
pub fn management(config: &NetworkConfig, nics: &[Nic]) -> Option<String> {
    if let Some(m) = &config.management {
        return Some(m.clone());
    }
    let mut sorted: Vec<&Nic> = nics.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted
        .iter()
        .find(|n| n.carrier)
        .or(sorted.first())
        .map(|n| n.name.clone())
}

/// Computes the plan for a validated configuration, the `ip=` argument and the NICs found.
pub fn compute(config: &NetworkConfig, ip: Option<&IpArg>, nics: &[Nic]) -> Result<Plan, Error> {
    config.validate()?;
    let mut plan = Plan {
        search: config.search.clone(),
        ..Plan::default()
    };

    let mut members: Vec<&str> = Vec::new();
    for b in &config.bonds {
        let mode = b.mode.parse::<BondMode>().map_err(|_| Error::BondMode {
            bond: b.name.clone(),
            mode: b.mode.clone(),
        })?;
        members.extend(b.members.iter().map(String::as_str));
        plan.bonds.push(BondPlan {
            name: b.name.clone(),
            mode,
            members: b.members.clone(),
        });
    }

    let mgmt = management(config, nics);
    if let (false, Some(port)) = (config.bridge.is_empty(), &mgmt) {
        plan.bridge = Some(BridgePlan {
            name: config.bridge.clone(),
            port: port.clone(),
        });
    }
    // Settings given for the management device apply to the bridge.
    let subst = |name: &str| -> String {
        match (&plan.bridge, &mgmt) {
            (Some(b), Some(m)) if m == name => b.name.clone(),
            _ => name.to_owned(),
        }
    };

    let mut configured: Vec<DevicePlan> = Vec::new();
    for i in &config.interfaces {
        let parent = subst(&i.name);
        let name = match i.vlan {
            Some(id) => {
                let name = format!("{parent}.{id}");
                hvnode_api::config::validate_ifname(&name)?;
                plan.vlans.push(VlanPlan {
                    name: name.clone(),
                    parent,
                    id,
                });
                name
            }
            None => parent,
        };
        let addressing = match i.mode {
            AddressMode::Dhcp => Addressing::Dhcp,
            AddressMode::Manual => Addressing::Manual,
            AddressMode::Static => Addressing::Static {
                addresses: i.cidrs()?,
                gateway4: i.gateway4,
                gateway6: i.gateway6,
            },
        };
        configured.push(DevicePlan {
            name,
            addressing,
            mtu: i.mtu,
        });
    }

    // The `ip=` argument, for a device the config does not mention.
    let ip_device = ip.map(|arg| subst(arg.device().or(mgmt.as_deref()).unwrap_or("")));
    let from_ip = |name: &str| -> Option<Addressing> {
        let arg = ip?;
        match arg {
            IpArg::Off => Some(Addressing::Manual),
            IpArg::Dhcp { device: None, .. } => Some(Addressing::Dhcp),
            IpArg::Dhcp { .. } => (ip_device.as_deref() == Some(name)).then_some(Addressing::Dhcp),
            IpArg::Static {
                address, gateway, ..
            } => (ip_device.as_deref() == Some(name)).then(|| Addressing::Static {
                addresses: vec![*address],
                gateway4: gateway.map(IpAddr::V4),
                gateway6: None,
            }),
        }
    };
    let default_for = |name: &str, carrier: bool| -> Addressing {
        from_ip(name).unwrap_or(if carrier {
            Addressing::Dhcp
        } else {
            Addressing::Manual
        })
    };

    let mut devices: Vec<DevicePlan> = Vec::new();
    let push = |d: DevicePlan, devices: &mut Vec<DevicePlan>| {
        if !devices.iter().any(|x| x.name == d.name) {
            devices.push(d);
        }
    };
    let take = |name: &str, configured: &[DevicePlan]| -> Option<DevicePlan> {
        configured.iter().find(|d| d.name == name).cloned()
    };
    let mut sorted: Vec<&Nic> = nics.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));

    if let Some(b) = &plan.bridge {
        // The management device gets DHCP by default even without carrier: nothing
        // else would ever give the node an address.
        let d = take(&b.name, &configured).unwrap_or_else(|| DevicePlan {
            name: b.name.clone(),
            addressing: default_for(&b.name, true),
            mtu: None,
        });
        push(d, &mut devices);
        let port_mtu = d_mtu(&devices, &b.name);
        push(
            DevicePlan {
                name: b.port.clone(),
                addressing: Addressing::Manual,
                mtu: port_mtu,
            },
            &mut devices,
        );
    }
    for b in &plan.bonds {
        for m in &b.members {
            push(
                DevicePlan {
                    name: m.clone(),
                    addressing: Addressing::Manual,
                    mtu: None,
                },
                &mut devices,
            );
        }
        let d = take(&b.name, &configured).unwrap_or_else(|| DevicePlan {
            name: b.name.clone(),
            addressing: default_for(&b.name, true),
            mtu: None,
        });
        push(d, &mut devices);
    }
    for n in &sorted {
        if members.contains(&n.name.as_str()) {
            continue;
        }
        let d = take(&n.name, &configured).unwrap_or_else(|| DevicePlan {
            name: n.name.clone(),
            addressing: default_for(&n.name, n.carrier),
            mtu: None,
        });
        push(d, &mut devices);
    }
    // VLANs and anything else the config names (e.g. a NIC that is not present yet).
    for d in configured {
        push(d, &mut devices);
    }
    plan.devices = devices;

    plan.dns = if config.dns.is_empty() {
        ip.map(|a| a.dns().to_vec()).unwrap_or_default()
    } else {
        config.dns.clone()
    };
    Ok(plan)
}

/// A bridge port must carry frames as large as the bridge's MTU.
fn d_mtu(devices: &[DevicePlan], bridge: &str) -> Option<u32> {
    devices
        .iter()
        .find(|d| d.name == bridge)
        .and_then(|d| d.mtu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnode_api::config::{BondConfig, InterfaceConfig};

    fn nic(name: &str, carrier: bool) -> Nic {
        Nic {
            name: name.into(),
            mac: [2, 0, 0, 0, 0, name.len() as u8],
            carrier,
        }
    }

    fn addressing<'a>(plan: &'a Plan, name: &str) -> &'a Addressing {
        &plan.device(name).expect(name).addressing
    }

    #[test]
    fn default_bridges_first_nic_with_carrier_and_runs_dhcp_on_it() {
        let nics = [nic("eth1", true), nic("eth0", false), nic("eth2", true)];
        let plan = compute(&NetworkConfig::default(), None, &nics).unwrap();
        assert_eq!(
            plan.bridge,
            Some(BridgePlan {
                name: "br0".into(),
                port: "eth1".into()
            })
        );
        assert_eq!(addressing(&plan, "br0"), &Addressing::Dhcp);
        assert_eq!(addressing(&plan, "eth1"), &Addressing::Manual);
        assert_eq!(addressing(&plan, "eth0"), &Addressing::Manual);
        assert_eq!(addressing(&plan, "eth2"), &Addressing::Dhcp);
    }

    #[test]
    fn falls_back_to_first_nic_without_carrier() {
        let nics = [nic("eth1", false), nic("eth0", false)];
        let plan = compute(&NetworkConfig::default(), None, &nics).unwrap();
        assert_eq!(plan.bridge.unwrap().port, "eth0");
    }

    #[test]
    fn settings_for_management_nic_apply_to_bridge_and_its_vlans() {
        let config = NetworkConfig {
            management: Some("eth0".into()),
            interfaces: vec![
                InterfaceConfig {
                    name: "eth0".into(),
                    mode: AddressMode::Static,
                    addresses: vec!["192.0.2.10/24".into()],
                    gateway4: Some("192.0.2.1".parse().unwrap()),
                    mtu: Some(9000),
                    ..Default::default()
                },
                InterfaceConfig {
                    name: "eth0".into(),
                    vlan: Some(100),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let plan = compute(&config, None, &[nic("eth0", true)]).unwrap();
        assert_eq!(
            addressing(&plan, "br0"),
            &Addressing::Static {
                addresses: vec!["192.0.2.10/24".parse().unwrap()],
                gateway4: Some("192.0.2.1".parse().unwrap()),
                gateway6: None,
            }
        );
        assert_eq!(plan.device("eth0").unwrap().mtu, Some(9000));
        assert_eq!(
            plan.vlans,
            vec![VlanPlan {
                name: "br0.100".into(),
                parent: "br0".into(),
                id: 100
            }]
        );
        assert_eq!(addressing(&plan, "br0.100"), &Addressing::Dhcp);
    }

    #[test]
    fn bond_members_are_manual_and_bond_can_be_the_bridge_port() {
        let config = NetworkConfig {
            management: Some("bond0".into()),
            bonds: vec![BondConfig {
                name: "bond0".into(),
                mode: "802.3ad".into(),
                members: vec!["eth0".into(), "eth1".into()],
            }],
            ..Default::default()
        };
        let nics = [nic("eth0", true), nic("eth1", true), nic("eth2", false)];
        let plan = compute(&config, None, &nics).unwrap();
        assert_eq!(plan.bonds[0].mode, BondMode::Ieee8023Ad);
        assert_eq!(plan.bridge.as_ref().unwrap().port, "bond0");
        assert_eq!(addressing(&plan, "eth0"), &Addressing::Manual);
        assert_eq!(addressing(&plan, "eth1"), &Addressing::Manual);
        assert_eq!(addressing(&plan, "bond0"), &Addressing::Manual);
        assert_eq!(addressing(&plan, "br0"), &Addressing::Dhcp);
    }

    #[test]
    fn rejects_unknown_bond_mode() {
        let config = NetworkConfig {
            bonds: vec![BondConfig {
                name: "bond0".into(),
                mode: "fastest".into(),
                members: vec!["eth0".into()],
            }],
            ..Default::default()
        };
        assert!(matches!(
            compute(&config, None, &[]),
            Err(Error::BondMode { .. })
        ));
    }

    #[test]
    fn no_bridge_when_name_is_empty() {
        let config = NetworkConfig {
            bridge: String::new(),
            ..Default::default()
        };
        let plan = compute(&config, None, &[nic("eth0", true)]).unwrap();
        assert_eq!(plan.bridge, None);
        assert_eq!(addressing(&plan, "eth0"), &Addressing::Dhcp);
    }

    #[test]
    fn ip_static_applies_to_named_device_unless_configured() {
        let arg =
            crate::iparg::parse("10.0.0.5::10.0.0.1:255.255.255.0::eth1:off:10.0.0.53").unwrap();
        let config = NetworkConfig {
            bridge: String::new(),
            ..Default::default()
        };
        let nics = [nic("eth0", true), nic("eth1", false)];
        let plan = compute(&config, Some(&arg), &nics).unwrap();
        assert_eq!(
            addressing(&plan, "eth1"),
            &Addressing::Static {
                addresses: vec!["10.0.0.5/24".parse().unwrap()],
                gateway4: Some("10.0.0.1".parse().unwrap()),
                gateway6: None,
            }
        );
        assert_eq!(addressing(&plan, "eth0"), &Addressing::Dhcp);
        assert_eq!(plan.dns, vec!["10.0.0.53".parse::<IpAddr>().unwrap()]);

        let config = NetworkConfig {
            bridge: String::new(),
            dns: vec!["192.0.2.53".parse().unwrap()],
            interfaces: vec![InterfaceConfig {
                name: "eth1".into(),
                mode: AddressMode::Manual,
                ..Default::default()
            }],
            ..Default::default()
        };
        let plan = compute(&config, Some(&arg), &nics).unwrap();
        assert_eq!(addressing(&plan, "eth1"), &Addressing::Manual);
        assert_eq!(plan.dns, vec!["192.0.2.53".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn ip_static_without_device_goes_to_bridge() {
        let arg = crate::iparg::parse("10.0.0.5:::255.255.255.0").unwrap();
        let plan = compute(&NetworkConfig::default(), Some(&arg), &[nic("eth0", true)]).unwrap();
        assert!(matches!(
            addressing(&plan, "br0"),
            Addressing::Static { .. }
        ));
        assert_eq!(addressing(&plan, "eth0"), &Addressing::Manual);
    }

    #[test]
    fn ip_off_disables_default_dhcp_and_ip_dhcp_forces_it() {
        let nics = [nic("eth0", true), nic("eth1", false)];
        let plan = compute(&NetworkConfig::default(), Some(&IpArg::Off), &nics).unwrap();
        assert_eq!(addressing(&plan, "br0"), &Addressing::Manual);
        assert_eq!(addressing(&plan, "eth1"), &Addressing::Manual);
        let dhcp = crate::iparg::parse("dhcp").unwrap();
        let plan = compute(&NetworkConfig::default(), Some(&dhcp), &nics).unwrap();
        assert_eq!(addressing(&plan, "eth1"), &Addressing::Dhcp);
    }
}
