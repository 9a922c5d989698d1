//! The published network state ([`hvnode_api::node::NetworkStatus`]).

use std::net::IpAddr;

use hvnode_api::node::{AddressSource, NetworkStatus, NicStatus};

use crate::netlink::{Addr, DefaultRoute, Link};
use crate::plan::{Addressing, Plan};

/// Formats a MAC address as `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Everything the status is computed from.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Current host name.
    pub hostname: &'a str,
    /// Names of the physical NICs.
    pub nics: &'a [String],
    /// The plan in force.
    pub plan: &'a Plan,
    /// Devices holding a DHCP lease.
    pub leased: &'a [String],
    /// Links from the kernel.
    pub links: &'a [Link],
    /// Addresses from the kernel.
    pub addrs: &'a [Addr],
    /// Default routes from the kernel.
    pub routes: &'a [DefaultRoute],
    /// DNS servers written to resolv.conf.
    pub dns: &'a [IpAddr],
}

/// Builds the status: planned devices first (the bridge leads), then the other NICs.
pub fn build(i: &Inputs<'_>) -> NetworkStatus {
    let mut names: Vec<&str> = i.plan.devices.iter().map(|d| d.name.as_str()).collect();
    if let Some(b) = &i.plan.bridge {
        names.retain(|n| *n != b.name);
        names.insert(0, &b.name);
    }
    for n in i.nics {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    let mut interfaces = Vec::new();
    for name in names {
        let Some(link) = i.links.iter().find(|l| l.name == name) else {
            continue;
        };
        let addresses: Vec<String> = i
            .addrs
            .iter()
            .filter(|a| a.index == link.index && !a.local_scope)
            .map(|a| a.cidr.to_string())
            .collect();
        let source = if addresses.is_empty() {
            AddressSource::None
        } else if i.leased.iter().any(|l| l == name) {
            AddressSource::Dhcp
        } else {
            match i.plan.device(name).map(|d| &d.addressing) {
                Some(Addressing::Dhcp) => AddressSource::Dhcp,
                _ => AddressSource::Static,
            }
        };
        interfaces.push(NicStatus {
            name: name.to_owned(),
            mac: link.mac.as_ref().map(format_mac).unwrap_or_default(),
            carrier: link.carrier,
            addresses,
            source,
        });
    }
    let mut gateways: Vec<String> = Vec::new();
    for r in i.routes {
        let g = r.gateway.to_string();
        if !gateways.contains(&g) {
            gateways.push(g);
        }
    }
    NetworkStatus {
        hostname: i.hostname.to_owned(),
        interfaces,
        gateways,
        dns: i.dns.iter().map(|d| d.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{BridgePlan, DevicePlan};

    #[test]
    fn bridge_carries_addresses_and_nics_are_listed_with_mac_and_carrier() {
        let plan = Plan {
            bridge: Some(BridgePlan {
                name: "br0".into(),
                port: "eth0".into(),
            }),
            devices: vec![
                DevicePlan {
                    name: "eth0".into(),
                    addressing: Addressing::Manual,
                    mtu: None,
                },
                DevicePlan {
                    name: "br0".into(),
                    addressing: Addressing::Dhcp,
                    mtu: None,
                },
            ],
            ..Plan::default()
        };
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let links = vec![
            Link {
                index: 2,
                name: "eth0".into(),
                mac: Some(mac),
                up: true,
                carrier: true,
                master: Some(3),
            },
            Link {
                index: 3,
                name: "br0".into(),
                mac: Some(mac),
                up: true,
                carrier: true,
                master: None,
            },
            Link {
                index: 4,
                name: "eth1".into(),
                mac: Some([2, 0, 0, 0, 0, 1]),
                up: true,
                carrier: false,
                master: None,
            },
        ];
        let addrs = vec![
            Addr {
                index: 3,
                cidr: "10.0.2.15/24".parse().unwrap(),
                local_scope: false,
            },
            Addr {
                index: 3,
                cidr: "fe80::1/64".parse().unwrap(),
                local_scope: true,
            },
        ];
        let routes = vec![DefaultRoute {
            oif: Some(3),
            gateway: "10.0.2.2".parse().unwrap(),
        }];
        let dns = vec!["10.0.2.3".parse().unwrap()];
        let status = build(&Inputs {
            hostname: "node-1",
            nics: &["eth0".into(), "eth1".into()],
            plan: &plan,
            leased: &["br0".into()],
            links: &links,
            addrs: &addrs,
            routes: &routes,
            dns: &dns,
        });
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "hostname": "node-1",
                "interfaces": [
                    {"name": "br0", "mac": "52:54:00:12:34:56", "carrier": true,
                     "addresses": ["10.0.2.15/24"], "source": "dhcp"},
                    {"name": "eth0", "mac": "52:54:00:12:34:56", "carrier": true,
                     "addresses": [], "source": "none"},
                    {"name": "eth1", "mac": "02:00:00:00:00:01", "carrier": false,
                     "addresses": [], "source": "none"},
                ],
                "gateways": ["10.0.2.2"],
                "dns": ["10.0.2.3"],
            })
        );
    }
}
