//! The form's checks: the fields' text turned into a whole [`NetworkConfig`] (the base
//! configuration with the edited settings replaced), or one short error per invalid field.

use std::net::IpAddr;

use hvnode_api::config::{
    validate_gateway, validate_ifname, validate_mtu, validate_vlan, AddressMode, BondConfig, Cidr,
    ConfigError, InterfaceConfig, NetworkConfig,
};

use super::*;

fn split_list(text: &str) -> Vec<&str> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect()
}

fn bad(errors: &mut Vec<FieldError>, field: FieldId, message: String) {
    errors.push(FieldError {
        field,
        message: fit(message),
    })
}

fn fit(message: String) -> String {
    if message.len() <= ERROR_WIDTH - 2 {
        message
    } else {
        let cut: String = message.chars().take(ERROR_WIDTH - 5).collect();
        format!("{cut}...")
    }
}

/// Parses an `ADDRESS/PREFIX` field of one family, with a short error.
fn parse_cidr(text: &str, v4: bool) -> Result<Cidr, String> {
    let (family, max) = if v4 { ("IPv4", 32) } else { ("IPv6", 128) };
    match text.parse::<Cidr>() {
        Ok(c) if c.addr.is_ipv4() == v4 => Ok(c),
        Ok(_) => Err(format!("not an {family} address")),
        Err(ConfigError::Prefix(_)) => {
            let family_ok = text
                .split('/')
                .next()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .is_some_and(|a| a.is_ipv4() == v4);
            if family_ok {
                Err(format!("prefix must be 0-{max}"))
            } else {
                Err(format!("not an {family} address"))
            }
        }
        Err(_) if text.contains('/') => Err(format!("not an {family} address")),
        Err(_) => Err(format!("needs /PREFIX, e.g. /{}", if v4 { 24 } else { 64 })),
    }
}

pub(super) fn example(v4: bool) -> &'static str {
    if v4 {
        "192.0.2.10/24"
    } else {
        "2001:db8::10/64"
    }
}

/// Parses a gateway field against the field's address, with a short error.
fn parse_gateway(text: &str, v4: bool, address: Option<Cidr>) -> Result<IpAddr, String> {
    let family = if v4 { "IPv4" } else { "IPv6" };
    let g = text
        .parse::<IpAddr>()
        .ok()
        .filter(|g| g.is_ipv4() == v4)
        .ok_or_else(|| format!("not an {family} address"))?;
    let Some(a) = address else {
        return Err(format!("needs an {family} address"));
    };
    validate_gateway(g, &[a]).map_err(|e| match e {
        ConfigError::GatewayIsSelf(_) => "is the node's own address".to_owned(),
        _ => {
            let m = format!("not in {}", a.network());
            if m.len() <= ERROR_WIDTH - 2 {
                m
            } else {
                "not in the address's subnet".to_owned()
            }
        }
    })?;
    Ok(g)
}

/// The settings fields' values: VLAN, addresses and gateways.
struct Settings {
    vlan: Option<u16>,
    addresses: Vec<String>,
    gateway4: Option<IpAddr>,
    gateway6: Option<IpAddr>,
}

impl NetForm {
    /// Checks every field; the configuration to apply, or one error per invalid field.
    pub fn check(&self) -> Result<NetworkConfig, Vec<FieldError>> {
        match &self.nic {
            Some(nic) => self.check_interface(nic),
            None => self.check_management(),
        }
    }

    /// The VLAN field; its error goes in `errors`.
    fn vlan(&self, errors: &mut Vec<FieldError>) -> Option<u16> {
        match self.text(FieldId::Vlan).trim() {
            "" => None,
            v => match v
                .parse::<u16>()
                .map_err(|_| ())
                .and_then(|id| validate_vlan(id).map(|_| id).map_err(|_| ()))
            {
                Ok(id) => Some(id),
                Err(()) => {
                    bad(errors, FieldId::Vlan, "VLAN id must be 1-4094".into());
                    None
                }
            },
        }
    }

    /// The VLAN, address and gateway fields; their errors go in `errors`. DHCP and off take
    /// no addresses, so their fields are not judged.
    fn settings(&self, errors: &mut Vec<FieldError>) -> Settings {
        let t = |f: FieldId| self.text(f).trim();
        let mut s = Settings {
            vlan: self.vlan(errors),
            addresses: Vec::new(),
            gateway4: None,
            gateway6: None,
        };
        if self.mode != AddressMode::Static {
            return s;
        }
        let v4 = match t(FieldId::Ipv4) {
            "" => None,
            a => parse_cidr(a, true)
                .map_err(|e| bad(errors, FieldId::Ipv4, e))
                .ok(),
        };
        let v6 = match t(FieldId::Ipv6) {
            "" => None,
            a => parse_cidr(a, false)
                .map_err(|e| bad(errors, FieldId::Ipv6, e))
                .ok(),
        };
        if t(FieldId::Ipv4).is_empty() && t(FieldId::Ipv6).is_empty() {
            bad(errors, FieldId::Ipv4, "static needs an address".into());
        }
        // An invalid address has its own error and cannot judge its gateway's subnet.
        let judge = |field: FieldId, v4: bool, addr: Option<Cidr>, addr_field: FieldId| {
            let g = t(field);
            if g.is_empty() {
                Ok(None)
            } else if addr.is_none() && !t(addr_field).is_empty() {
                g.parse::<IpAddr>()
                    .ok()
                    .filter(|g| g.is_ipv4() == v4)
                    .map(|_| None)
                    .ok_or_else(|| format!("not an {} address", if v4 { "IPv4" } else { "IPv6" }))
            } else {
                parse_gateway(g, v4, addr).map(Some)
            }
        };
        match judge(FieldId::Gateway4, true, v4, FieldId::Ipv4) {
            Ok(g) => s.gateway4 = g,
            Err(e) => bad(errors, FieldId::Gateway4, e),
        }
        match judge(FieldId::Gateway6, false, v6, FieldId::Ipv6) {
            Ok(g) => s.gateway6 = g,
            Err(e) => bad(errors, FieldId::Gateway6, e),
        }
        s.addresses
            .extend(v4.iter().chain(v6.iter()).map(Cidr::to_string));
        s
    }

    /// The interface form's configuration: the base with `nic`'s settings replaced, and
    /// dropped when they are plain DHCP (what an unlisted NIC gets) so node.toml stays small.
    fn check_interface(&self, nic: &str) -> Result<NetworkConfig, Vec<FieldError>> {
        let mut errors = Vec::new();
        let s = self.settings(&mut errors);
        if let Some(v) = s.vlan {
            if validate_ifname(&format!("{nic}.{v}")).is_err() {
                bad(
                    &mut errors,
                    FieldId::Vlan,
                    format!("{nic}.{v}: name too long"),
                );
            }
        }
        let mtu = match self.text(FieldId::Mtu).trim() {
            "" => None,
            m => match m.parse::<u32>().ok().filter(|m| validate_mtu(*m).is_ok()) {
                Some(m) => Some(m),
                None => {
                    bad(&mut errors, FieldId::Mtu, "MTU must be 68-9216".into());
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut config = self.base.clone();
        let replaced = |i: &InterfaceConfig| {
            i.name == nic && (i.vlan.is_none() || i.vlan == self.old_vlan || i.vlan == s.vlan)
        };
        let at = config
            .interfaces
            .iter()
            .position(replaced)
            .unwrap_or(config.interfaces.len());
        config.interfaces.retain(|i| !replaced(i));
        let settings = InterfaceConfig {
            name: nic.to_owned(),
            vlan: s.vlan,
            mode: self.mode,
            addresses: s.addresses,
            gateway4: s.gateway4,
            gateway6: s.gateway6,
            mtu,
        };
        let mut new = Vec::new();
        // With the settings on a VLAN the untagged device carries no address.
        if s.vlan.is_some() {
            new.push(InterfaceConfig {
                name: nic.to_owned(),
                mode: AddressMode::Manual,
                mtu,
                ..Default::default()
            });
        }
        let plain_dhcp = InterfaceConfig {
            name: nic.to_owned(),
            ..Default::default()
        };
        if settings != plain_dhcp {
            new.push(settings);
        }
        let at = at.min(config.interfaces.len());
        config.interfaces.splice(at..at, new);
        config.validate().map_err(|e| {
            vec![FieldError {
                field: FieldId::Mode,
                message: fit(e.to_string()),
            }]
        })?;
        Ok(config)
    }

    fn check_management(&self) -> Result<NetworkConfig, Vec<FieldError>> {
        let mut errors = Vec::new();
        let t = |f: FieldId| self.text(f).trim();

        let bridge = t(FieldId::Bridge).to_owned();
        if !bridge.is_empty() {
            if validate_ifname(&bridge).is_err() {
                bad(&mut errors, FieldId::Bridge, "not an interface name".into());
            } else if self.nics.contains(&bridge) {
                bad(&mut errors, FieldId::Bridge, format!("{bridge} is a NIC"));
            }
        }

        let members: Vec<String> = split_list(t(FieldId::Bond))
            .into_iter()
            .map(str::to_owned)
            .collect();
        let management = t(FieldId::Management).to_owned();
        let e = &mut errors;
        if management.is_empty() {
            bad(e, FieldId::Management, "required".into());
        } else if validate_ifname(&management).is_err() {
            bad(e, FieldId::Management, "not an interface name".into());
        } else if management == bridge {
            bad(e, FieldId::Management, "same name as the bridge".into());
        } else if members.is_empty() && !self.nics.contains(&management) {
            bad(e, FieldId::Management, format!("unknown NIC {management}"));
        } else if !members.is_empty() && self.nics.contains(&management) {
            bad(
                e,
                FieldId::Management,
                "a NIC: name the bond (bond0)".into(),
            );
        }
        for (n, m) in members.iter().enumerate() {
            if !self.nics.contains(m) {
                bad(e, FieldId::Bond, format!("unknown NIC {m}"));
                break;
            }
            if members[..n].contains(m) {
                bad(e, FieldId::Bond, format!("{m} listed twice"));
                break;
            }
        }

        let Settings {
            vlan,
            addresses,
            gateway4,
            gateway6,
        } = self.settings(&mut errors);
        let mut device_config = self.base.clone();
        device_config.bridge = bridge.clone();
        let device = settings_device(&device_config, &management, vlan);
        if vlan.is_some() && validate_ifname(&device).is_err() {
            bad(
                &mut errors,
                FieldId::Vlan,
                format!("{device}: name too long"),
            );
        }

        let mut dns = Vec::new();
        for d in split_list(t(FieldId::Dns)) {
            match d.parse::<IpAddr>() {
                Ok(a) => dns.push(a),
                Err(_) => {
                    bad(&mut errors, FieldId::Dns, format!("not an IP address: {d}"));
                    break;
                }
            }
        }

        if !errors.is_empty() {
            return Err(errors);
        }

        let mut config = self.base.clone();
        config.bridge = bridge;
        config.management = Some(management.clone());
        config.dns = dns;
        let owned = |name: &str| name == management || self.old_management.as_deref() == Some(name);
        config.bonds.retain(|b| !owned(&b.name));
        if !members.is_empty() {
            config.bonds.push(BondConfig {
                name: management.clone(),
                mode: self.bond_mode.clone(),
                members,
            });
        }
        config.interfaces.retain(|i| !owned(&i.name));
        let settings = InterfaceConfig {
            name: management.clone(),
            vlan,
            mode: self.mode,
            addresses,
            gateway4,
            gateway6,
            mtu: self.mtu,
        };
        // With the management network on a VLAN the untagged device carries no address.
        if vlan.is_some() {
            config.interfaces.insert(
                0,
                InterfaceConfig {
                    name: management,
                    mode: AddressMode::Manual,
                    mtu: self.mtu,
                    ..Default::default()
                },
            );
            config.interfaces.insert(1, settings);
        } else {
            config.interfaces.insert(0, settings);
        }
        config.validate().map_err(|e| {
            vec![FieldError {
                field: FieldId::Management,
                message: fit(e.to_string()),
            }]
        })?;
        Ok(config)
    }

    /// The device the settings being typed apply to.
    pub(super) fn device(&self) -> String {
        let mut c = self.base.clone();
        let vlan = self
            .text(FieldId::Vlan)
            .trim()
            .parse()
            .ok()
            .filter(|v| validate_vlan(*v).is_ok());
        match &self.nic {
            Some(nic) => {
                c.bridge.clear();
                settings_device(&c, nic, vlan)
            }
            None => {
                c.bridge = self.text(FieldId::Bridge).trim().to_owned();
                settings_device(&c, self.text(FieldId::Management).trim(), vlan)
            }
        }
    }
}
