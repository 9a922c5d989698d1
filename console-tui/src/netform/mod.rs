//! The Network screen's form: the management interface's settings (NIC or bond, VLAN,
//! DHCP or static IPv4/IPv6 with gateways, DNS, the bridge), or those of one other NIC
//! (VLAN, DHCP, static or off, gateways, MTU), edited as text fields and turned into a
//! whole [`NetworkConfig`] for `PUT /v1/network`.
//!
//! Checking is pure and runs after every key, so each field carries its error beside it and
//! the form refuses to produce a configuration while any field is invalid. The rules are the
//! agent's (`hvnode_api::config`); the form adds what only it knows: which NICs exist.
//!
//! This module holds the form's model: its fields, state and constructors. [`keys`] edits it,
//! [`check`] turns its text into a configuration or field errors (no drawing), [`view`] draws
//! it (no checking).

mod check;
mod keys;
#[cfg(test)]
mod tests;
mod view;

pub use keys::Outcome;

use std::net::IpAddr;

use hvnode_api::config::{AddressMode, Cidr, InterfaceConfig, NetworkConfig};
use hvnode_api::node::NetworkView;

/// The form's fields, in Tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldId {
    /// The management NIC, or the bond's name when bond members are given.
    Management,
    /// Bond members; empty for a plain NIC.
    Bond,
    /// VLAN id on the management device; empty for untagged.
    Vlan,
    /// DHCP or static.
    Mode,
    /// IPv4 `ADDRESS/PREFIX`.
    Ipv4,
    /// IPv4 default gateway.
    Gateway4,
    /// IPv6 `ADDRESS/PREFIX`.
    Ipv6,
    /// IPv6 default gateway.
    Gateway6,
    /// DNS servers.
    Dns,
    /// Management bridge name; empty for none.
    Bridge,
    /// MTU of another NIC's device; empty keeps the kernel's.
    Mtu,
}

/// Every field with its label, in Tab order.
pub const FIELDS: [(FieldId, &str); 11] = [
    (FieldId::Management, "Management NIC"),
    (FieldId::Bond, "Bond members"),
    (FieldId::Vlan, "VLAN id"),
    (FieldId::Mode, "Mode"),
    (FieldId::Ipv4, "IPv4 address"),
    (FieldId::Gateway4, "IPv4 gateway"),
    (FieldId::Ipv6, "IPv6 address"),
    (FieldId::Gateway6, "IPv6 gateway"),
    (FieldId::Dns, "DNS servers"),
    (FieldId::Bridge, "Bridge"),
    (FieldId::Mtu, "MTU"),
];

/// The fields of the form for a NIC other than the management one.
const INTERFACE_FIELDS: [FieldId; 7] = [
    FieldId::Vlan,
    FieldId::Mode,
    FieldId::Ipv4,
    FieldId::Gateway4,
    FieldId::Ipv6,
    FieldId::Gateway6,
    FieldId::Mtu,
];

/// Columns for a field's value; the error goes beside it.
const VALUE_WIDTH: usize = 30;
/// Columns left for the inline error on an 80-column screen.
const ERROR_WIDTH: usize = 31;

/// An error found in one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field.
    pub field: FieldId,
    /// Short enough to sit beside the field.
    pub message: String,
}

/// The form's state.
#[derive(Debug, Clone, PartialEq)]
pub struct NetForm {
    /// The focused field.
    pub focus: FieldId,
    /// DHCP or static; an interface form also offers manual ("off": link up, no address).
    pub mode: AddressMode,
    /// The NIC an interface form edits; `None` for the management form.
    nic: Option<String>,
    /// The VLAN of the settings the interface form started from, which it replaces.
    old_vlan: Option<u16>,
    text: [String; FIELDS.len()],
    /// The configuration the form started from: what it does not edit is kept.
    base: NetworkConfig,
    /// The management device the form started from, whose settings it replaces.
    old_management: Option<String>,
    /// Physical NICs the node reports.
    nics: Vec<String>,
    /// Mode of the bond the form edits, kept as it was.
    bond_mode: String,
    /// MTU of the management settings, kept as it was.
    mtu: Option<u32>,
    /// Errors of the current text, one per invalid field.
    pub errors: Vec<FieldError>,
    /// Set when Enter was refused, until the next edit.
    pub refused: bool,
}

fn index(f: FieldId) -> usize {
    FIELDS.iter().position(|(x, _)| *x == f).unwrap_or(0)
}

/// Physical NICs in the view: reported interfaces that are not the bridge, a bond or a VLAN.
pub fn physical_nics(view: &NetworkView) -> Vec<String> {
    let configs = std::iter::once(&view.config).chain(view.pending.iter());
    let mut virtual_names: Vec<&str> = Vec::new();
    for c in configs {
        virtual_names.push(&c.bridge);
        virtual_names.extend(c.bonds.iter().map(|b| b.name.as_str()));
    }
    view.status
        .interfaces
        .iter()
        .map(|i| i.name.clone())
        .filter(|n| !n.contains('.') && !virtual_names.contains(&n.as_str()))
        .collect()
}

/// NICs the Network screen lets one select for an interface form: the physical NICs but
/// the management one (it is enslaved to the bridge, or is the management device) and bond
/// members, in the saved or the pending configuration.
pub fn selectable_nics(view: &NetworkView) -> Vec<String> {
    let nics = physical_nics(view);
    let mut taken: Vec<String> = Vec::new();
    for c in std::iter::once(&view.config).chain(view.pending.iter()) {
        taken.push(
            c.management
                .clone()
                .unwrap_or_else(|| default_management(view, &nics)),
        );
        taken.extend(c.bonds.iter().flat_map(|b| b.members.iter().cloned()));
    }
    nics.into_iter().filter(|n| !taken.contains(n)).collect()
}

/// The device the management settings apply to: the bridge when there is one, plus the VLAN.
pub fn settings_device(config: &NetworkConfig, management: &str, vlan: Option<u16>) -> String {
    let dev = if config.bridge.is_empty() {
        management
    } else {
        &config.bridge
    };
    match vlan {
        Some(v) => format!("{dev}.{v}"),
        None => dev.to_owned(),
    }
}

/// The management interface's own settings in `config`: the tagged entry if the management
/// network is a VLAN, else the untagged one.
pub fn management_entry<'a>(
    config: &'a NetworkConfig,
    management: &str,
) -> Option<&'a InterfaceConfig> {
    let all: Vec<&InterfaceConfig> = config
        .interfaces
        .iter()
        .filter(|i| i.name == management)
        .collect();
    all.iter()
        .find(|i| i.vlan.is_some() && i.mode != AddressMode::Manual)
        .or_else(|| all.iter().find(|i| i.vlan.is_none()))
        .or_else(|| all.first())
        .copied()
}

/// The management device init picks when the config names none: the first NIC by name with
/// carrier, else the first NIC (as `hvnode_net::plan::management` does).
fn default_management(view: &NetworkView, nics: &[String]) -> String {
    let mut sorted: Vec<&String> = nics.iter().collect();
    sorted.sort();
    let carrier = |n: &str| {
        view.status
            .interfaces
            .iter()
            .any(|i| i.name == n && i.carrier)
    };
    sorted
        .iter()
        .find(|n| carrier(n))
        .or(sorted.first())
        .map(|n| (*n).clone())
        .unwrap_or_default()
}

/// The text of the VLAN, address and gateway fields for `entry`'s settings.
fn fill_settings(text: &mut [String; FIELDS.len()], entry: Option<&InterfaceConfig>) {
    let cidrs = entry.and_then(|e| e.cidrs().ok()).unwrap_or_default();
    let first = |v4: bool| {
        cidrs
            .iter()
            .find(|c| c.addr.is_ipv4() == v4)
            .map(Cidr::to_string)
            .unwrap_or_default()
    };
    let ip = |g: Option<IpAddr>| g.map(|g| g.to_string()).unwrap_or_default();
    text[index(FieldId::Vlan)] = entry
        .and_then(|e| e.vlan)
        .map(|v| v.to_string())
        .unwrap_or_default();
    text[index(FieldId::Ipv4)] = first(true);
    text[index(FieldId::Gateway4)] = ip(entry.and_then(|e| e.gateway4));
    text[index(FieldId::Ipv6)] = first(false);
    text[index(FieldId::Gateway6)] = ip(entry.and_then(|e| e.gateway6));
}

impl NetForm {
    /// The form for `nic`, a NIC other than the management one, filled from its settings in
    /// the pending change if there is one, else in the saved config; DHCP when it has none.
    pub fn for_interface(view: &NetworkView, nic: &str) -> NetForm {
        let base = view.pending.clone().unwrap_or_else(|| view.config.clone());
        let entry = management_entry(&base, nic).cloned();
        let mut text: [String; FIELDS.len()] = Default::default();
        fill_settings(&mut text, entry.as_ref());
        text[index(FieldId::Mtu)] = entry
            .as_ref()
            .and_then(|e| e.mtu)
            .map(|m| m.to_string())
            .unwrap_or_default();
        let mut form = NetForm {
            focus: FieldId::Mode,
            mode: entry.as_ref().map_or(AddressMode::Dhcp, |e| e.mode),
            nic: Some(nic.to_owned()),
            old_vlan: entry.as_ref().and_then(|e| e.vlan),
            text,
            old_management: None,
            nics: physical_nics(view),
            bond_mode: String::new(),
            mtu: None,
            base,
            errors: Vec::new(),
            refused: false,
        };
        form.errors = form.check().err().unwrap_or_default();
        form
    }

    /// The window title for the form.
    pub fn title(&self) -> String {
        match &self.nic {
            Some(n) => format!("Network: edit {n}"),
            None => "Network: edit the management network".to_owned(),
        }
    }

    /// A form filled from the pending change if there is one, else from the saved config.
    pub fn new(view: &NetworkView) -> NetForm {
        let base = view.pending.clone().unwrap_or_else(|| view.config.clone());
        let nics = physical_nics(view);
        let management = base
            .management
            .clone()
            .unwrap_or_else(|| default_management(view, &nics));
        let entry = management_entry(&base, &management).cloned();
        let bond = base.bonds.iter().find(|b| b.name == management);
        let mut text: [String; FIELDS.len()] = Default::default();
        fill_settings(&mut text, entry.as_ref());
        text[index(FieldId::Management)] = management.clone();
        text[index(FieldId::Bond)] = bond.map(|b| b.members.join(" ")).unwrap_or_default();
        text[index(FieldId::Dns)] = base
            .dns
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        text[index(FieldId::Bridge)] = base.bridge.clone();
        let mut form = NetForm {
            focus: FieldId::Management,
            mode: if entry
                .as_ref()
                .is_some_and(|e| e.mode == AddressMode::Static)
            {
                AddressMode::Static
            } else {
                AddressMode::Dhcp
            },
            nic: None,
            old_vlan: None,
            text,
            old_management: Some(management).filter(|m| !m.is_empty()),
            nics,
            bond_mode: bond
                .map(|b| b.mode.clone())
                .unwrap_or_else(|| "active-backup".to_owned()),
            mtu: entry.as_ref().and_then(|e| e.mtu),
            base,
            errors: Vec::new(),
            refused: false,
        };
        form.errors = form.check().err().unwrap_or_default();
        form
    }

    /// The text of a field.
    pub fn text(&self, f: FieldId) -> &str {
        &self.text[index(f)]
    }

    /// Whether the form has the field: the management form all but the MTU, an interface
    /// form its own settings only.
    pub(super) fn shows(&self, f: FieldId) -> bool {
        match self.nic {
            Some(_) => INTERFACE_FIELDS.contains(&f),
            None => f != FieldId::Mtu,
        }
    }

    /// Whether Tab stops at the field: DHCP and off have no addresses or gateways to type.
    pub fn active(&self, f: FieldId) -> bool {
        self.shows(f)
            && (self.mode == AddressMode::Static
                || !matches!(
                    f,
                    FieldId::Ipv4 | FieldId::Gateway4 | FieldId::Ipv6 | FieldId::Gateway6
                ))
    }

    /// The error beside a field, if it has one.
    pub fn error(&self, f: FieldId) -> Option<&str> {
        self.errors
            .iter()
            .find(|e| e.field == f)
            .map(|e| e.message.as_str())
    }
}
