//! The Network screen's form: the management interface's settings (NIC or bond, VLAN,
//! DHCP or static IPv4/IPv6 with gateways, DNS, the bridge), or those of one other NIC
//! (VLAN, DHCP, static or off, gateways, MTU), edited as text fields and turned into a
//! whole [`NetworkConfig`] for `PUT /v1/network`.
//!
//! Checking is pure and runs after every key, so each field carries its error beside it and
//! the form refuses to produce a configuration while any field is invalid. The rules are the
//! agent's (`hvnode_api::config`); the form adds what only it knows: which NICs exist.

use std::net::IpAddr;

use hvnode_api::config::{
    validate_gateway, validate_ifname, validate_mtu, validate_vlan, AddressMode, BondConfig, Cidr,
    ConfigError, InterfaceConfig, NetworkConfig,
};
use hvnode_api::node::NetworkView;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};

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

/// Longest text a field takes.
const MAX_LEN: usize = 64;
/// Columns for a field's value; the error goes beside it.
const VALUE_WIDTH: usize = 30;
/// Columns left for the inline error on an 80-column screen.
const ERROR_WIDTH: usize = 31;

/// The form's answer to a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Still editing.
    Editing,
    /// Esc: close the form, send nothing.
    Cancel,
    /// Enter/F10 with every field valid: the configuration to apply.
    Submit(NetworkConfig),
}

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

fn example(v4: bool) -> &'static str {
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

/// The settings fields' values: VLAN, addresses and gateways.
struct Settings {
    vlan: Option<u16>,
    addresses: Vec<String>,
    gateway4: Option<IpAddr>,
    gateway6: Option<IpAddr>,
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
    fn shows(&self, f: FieldId) -> bool {
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

    /// The next mode: DHCP and static, and for an interface form also off.
    fn cycle_mode(&mut self, forward: bool) {
        let modes: &[AddressMode] = match self.nic {
            Some(_) => &[AddressMode::Dhcp, AddressMode::Static, AddressMode::Manual],
            None => &[AddressMode::Dhcp, AddressMode::Static],
        };
        let n = modes.len();
        let i = modes.iter().position(|m| *m == self.mode).unwrap_or(0);
        self.mode = modes[if forward {
            (i + 1) % n
        } else {
            (i + n - 1) % n
        }];
    }

    /// The error beside a field, if it has one.
    pub fn error(&self, f: FieldId) -> Option<&str> {
        self.errors
            .iter()
            .find(|e| e.field == f)
            .map(|e| e.message.as_str())
    }

    fn move_focus(&mut self, forward: bool) {
        let n = FIELDS.len();
        let mut i = index(self.focus);
        for _ in 0..n {
            i = if forward {
                (i + 1) % n
            } else {
                (i + n - 1) % n
            };
            if self.active(FIELDS[i].0) {
                self.focus = FIELDS[i].0;
                return;
            }
        }
    }

    fn cycle_nic(&mut self, forward: bool) {
        if self.nics.is_empty() {
            return;
        }
        let cur = self.text(FieldId::Management).trim().to_owned();
        let n = self.nics.len();
        let next = match self.nics.iter().position(|x| *x == cur) {
            Some(i) if forward => (i + 1) % n,
            Some(i) => (i + n - 1) % n,
            None => 0,
        };
        self.text[index(FieldId::Management)] = self.nics[next].clone();
    }

    /// Handles a key.
    pub fn on_key(&mut self, key: KeyEvent) -> Outcome {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let i = index(self.focus);
        match key.code {
            KeyCode::Esc => return Outcome::Cancel,
            KeyCode::Enter | KeyCode::F(10) => match self.check() {
                Ok(config) => return Outcome::Submit(config),
                Err(errors) => {
                    if let Some(first) = errors.first() {
                        self.focus = first.field;
                    }
                    self.errors = errors;
                    self.refused = true;
                    return Outcome::Editing;
                }
            },
            KeyCode::Tab | KeyCode::Down => self.move_focus(true),
            KeyCode::BackTab | KeyCode::Up => self.move_focus(false),
            KeyCode::Left | KeyCode::Right | KeyCode::Char(' ') if self.focus == FieldId::Mode => {
                self.cycle_mode(key.code != KeyCode::Left)
            }
            KeyCode::Left | KeyCode::Right if self.focus == FieldId::Management => {
                self.cycle_nic(key.code == KeyCode::Right)
            }
            KeyCode::Char('d' | 'D') if self.focus == FieldId::Mode => {
                self.mode = AddressMode::Dhcp
            }
            KeyCode::Char('s' | 'S') if self.focus == FieldId::Mode => {
                self.mode = AddressMode::Static
            }
            KeyCode::Char('o' | 'O') if self.focus == FieldId::Mode && self.nic.is_some() => {
                self.mode = AddressMode::Manual
            }
            KeyCode::Backspace => {
                self.text[i].pop();
            }
            // Serial terminals send ^H for Backspace; ^U clears the field as in a shell.
            KeyCode::Char('h') if ctrl => {
                self.text[i].pop();
            }
            KeyCode::Char('u') if ctrl => self.text[i].clear(),
            KeyCode::Char(c)
                if !ctrl
                    && !key.modifiers.contains(KeyModifiers::ALT)
                    && self.focus != FieldId::Mode
                    && self.text[i].len() < MAX_LEN =>
            {
                self.text[i].push(c)
            }
            _ => return Outcome::Editing,
        }
        self.refused = false;
        self.errors = self.check().err().unwrap_or_default();
        Outcome::Editing
    }

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
    fn device(&self) -> String {
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

    fn hint(&self) -> String {
        match self.focus {
            FieldId::Management => {
                let nics = if self.nics.is_empty() {
                    "none reported".to_owned()
                } else {
                    self.nics.join(" ")
                };
                format!("A NIC (Left/Right cycles), or a bond's name. NICs: {nics}")
            }
            FieldId::Bond => "NICs to bond, e.g. eth1 eth2; empty: no bond".into(),
            FieldId::Vlan if self.nic.is_some() => {
                "802.1Q id 1-4094; the NIC itself then gets no address".into()
            }
            FieldId::Vlan => "802.1Q id 1-4094 of the management network; empty: untagged".into(),
            FieldId::Mode if self.nic.is_some() => {
                "Space or Left/Right: DHCP, static or off (link up, no address)".into()
            }
            FieldId::Mode => "Space or Left/Right: DHCP or static".into(),
            FieldId::Ipv4 => format!("ADDRESS/PREFIX, e.g. {}", example(true)),
            FieldId::Ipv6 => format!("ADDRESS/PREFIX, e.g. {}; empty: none", example(false)),
            FieldId::Gateway4 | FieldId::Gateway6 if self.nic.is_some() => {
                "Optional, in the address's subnet; a storage network needs none".into()
            }
            FieldId::Gateway4 | FieldId::Gateway6 => {
                "Default gateway, in the address's subnet; empty: none".into()
            }
            FieldId::Dns => "Comma-separated; empty: use DNS from DHCP".into(),
            FieldId::Bridge => "Guests' taps join it; empty: no bridge".into(),
            FieldId::Mtu => "68-9216, e.g. 9000 for jumbo frames; empty: the kernel's".into(),
        }
    }

    /// The form's lines for the body of the Network screen (at most 17).
    pub fn lines(&self) -> Vec<Line<'static>> {
        let what = match &self.nic {
            Some(nic) => format!("Interface {nic}"),
            None => "Management network".to_owned(),
        };
        let mut l = vec![
            Line::raw(format!("{what}: these settings apply to {}", self.device())),
            Line::raw(""),
        ];
        for (f, label) in FIELDS.into_iter().filter(|(f, _)| self.shows(*f)) {
            let focused = self.focus == f;
            let value = if f == FieldId::Mode {
                match self.mode {
                    AddressMode::Dhcp => "< DHCP >",
                    AddressMode::Static => "< static >",
                    AddressMode::Manual => "< off >",
                }
                .to_owned()
            } else if !self.active(f) {
                if self.mode == AddressMode::Manual {
                    "(none)".to_owned()
                } else {
                    "(from DHCP)".to_owned()
                }
            } else {
                // The focused field shows its end, where the cursor is; others their start.
                let mut v = self.text(f).to_owned();
                if focused {
                    v.push('_');
                    let skip = v.chars().count().saturating_sub(VALUE_WIDTH);
                    v.chars().skip(skip).collect()
                } else {
                    v.chars().take(VALUE_WIDTH).collect()
                }
            };
            let value_style = if focused {
                Style::default().add_modifier(Modifier::REVERSED)
            } else if !self.active(f) {
                Style::default().add_modifier(Modifier::DIM)
            } else {
                Style::default()
            };
            let mut spans = vec![
                Span::raw(format!("{}{label:<14} ", if focused { '>' } else { ' ' })),
                Span::styled(format!("{value:<VALUE_WIDTH$}"), value_style),
            ];
            if let Some(e) = self.error(f).filter(|_| self.active(f)) {
                spans.push(Span::styled(
                    format!(" ! {e}"),
                    Style::default().add_modifier(Modifier::BOLD),
                ));
            }
            l.push(Line::from(spans));
        }
        l.push(Line::raw(""));
        l.push(Line::raw(if self.refused {
            format!(
                "Not sent: {} field(s) invalid. Fix the fields marked !",
                self.errors.len()
            )
        } else {
            self.hint()
        }));
        l.push(Line::raw(
            "An applied change rolls back after 60 s unless you press c to keep it.",
        ));
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnode_api::node::{AddressSource, NetworkStatus, NicStatus};

    fn nic(name: &str, carrier: bool) -> NicStatus {
        NicStatus {
            name: name.into(),
            mac: "52:54:00:12:34:56".into(),
            carrier,
            addresses: vec![],
            source: AddressSource::None,
        }
    }

    fn view(config: NetworkConfig) -> NetworkView {
        NetworkView {
            config,
            status: NetworkStatus {
                hostname: "n".into(),
                interfaces: vec![nic("br0", true), nic("eth0", true), nic("eth1", false)],
                gateways: vec![],
                dns: vec![],
            },
            rollback_in_secs: None,
            pending: None,
        }
    }

    fn form() -> NetForm {
        NetForm::new(&view(NetworkConfig::default()))
    }

    fn set(f: &mut NetForm, field: FieldId, text: &str) {
        f.text[index(field)] = text.to_owned();
        f.errors = f.check().err().unwrap_or_default();
    }

    fn static_form() -> NetForm {
        let mut f = form();
        f.mode = AddressMode::Static;
        set(&mut f, FieldId::Ipv4, "192.0.2.10/24");
        set(&mut f, FieldId::Gateway4, "192.0.2.1");
        f
    }

    #[test]
    fn defaults_to_the_first_nic_with_carrier_on_dhcp() {
        let f = form();
        assert_eq!(f.nics, ["eth0", "eth1"]);
        assert_eq!(f.text(FieldId::Management), "eth0");
        assert_eq!(f.mode, AddressMode::Dhcp);
        assert_eq!(f.errors, vec![]);
        let c = f.check().unwrap();
        assert_eq!(c.management.as_deref(), Some("eth0"));
        assert_eq!(c.interfaces[0].mode, AddressMode::Dhcp);
        assert_eq!(c.bridge, "br0");
    }

    #[test]
    fn static_ipv4_with_gateway_and_dns_builds_the_config() {
        let mut f = static_form();
        set(&mut f, FieldId::Dns, "192.0.2.53, 2001:db8::53");
        let c = f.check().unwrap();
        let i = &c.interfaces[0];
        assert_eq!(
            (i.name.as_str(), i.mode, i.addresses.clone()),
            (
                "eth0",
                AddressMode::Static,
                vec!["192.0.2.10/24".to_owned()]
            )
        );
        assert_eq!(i.gateway4, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(c.dns.len(), 2);
        // What the form builds, the form reads back.
        let mut v = view(NetworkConfig::default());
        v.config = c.clone();
        assert_eq!(NetForm::new(&v).check().unwrap(), c);
    }

    #[test]
    fn each_bad_field_gets_its_own_short_error() {
        let cases = [
            (FieldId::Ipv4, "192.0.2.300/24", "not an IPv4 address"),
            (FieldId::Ipv4, "192.0.2.10/33", "prefix must be 0-32"),
            (FieldId::Ipv4, "192.0.2.10", "needs /PREFIX, e.g. /24"),
            (FieldId::Gateway4, "2001:db8::1", "not an IPv4 address"),
            (FieldId::Ipv4, "2001:db8::1/64", "not an IPv4 address"),
            (FieldId::Gateway4, "198.51.100.1", "not in 192.0.2.0/24"),
            (FieldId::Gateway4, "192.0.2.10", "is the node's own address"),
            (FieldId::Gateway4, "192.0.2", "not an IPv4 address"),
            (FieldId::Ipv6, "2001:db8::10/129", "prefix must be 0-128"),
            (
                FieldId::Dns,
                "192.0.2.53, 8.8.8",
                "not an IP address: 8.8.8",
            ),
            (FieldId::Vlan, "4095", "VLAN id must be 1-4094"),
            (FieldId::Vlan, "0", "VLAN id must be 1-4094"),
            (FieldId::Vlan, "x", "VLAN id must be 1-4094"),
            (FieldId::Management, "eth9", "unknown NIC eth9"),
            (FieldId::Management, "br0", "same name as the bridge"),
            (FieldId::Bridge, "eth1", "eth1 is a NIC"),
        ];
        for (field, text, want) in cases {
            let mut f = static_form();
            set(&mut f, field, text);
            assert_eq!(f.error(field), Some(want), "{field:?} = {text:?}");
            assert_eq!(f.errors.len(), 1, "{field:?} = {text:?}: {:?}", f.errors);
            assert!(f.check().is_err());
        }
    }

    #[test]
    fn static_mode_needs_an_address_and_a_gateway_needs_its_family() {
        let mut f = static_form();
        set(&mut f, FieldId::Ipv4, "");
        assert_eq!(f.error(FieldId::Ipv4), Some("static needs an address"));
        assert_eq!(
            f.error(FieldId::Gateway4),
            Some("needs an IPv4 address"),
            "{:?}",
            f.errors
        );
        set(&mut f, FieldId::Gateway4, "");
        set(&mut f, FieldId::Ipv6, "2001:db8::10/64");
        set(&mut f, FieldId::Gateway6, "fe80::1");
        assert_eq!(f.errors, vec![], "IPv6 only, link-local gateway");
    }

    #[test]
    fn dhcp_ignores_the_static_fields_even_when_invalid() {
        let mut f = static_form();
        set(&mut f, FieldId::Ipv4, "nonsense");
        f.mode = AddressMode::Dhcp;
        let c = f.check().unwrap();
        assert!(c.interfaces[0].addresses.is_empty());
        assert_eq!(c.interfaces[0].gateway4, None);
    }

    #[test]
    fn vlan_puts_the_settings_on_the_tagged_bridge_and_none_on_the_untagged() {
        let mut f = static_form();
        set(&mut f, FieldId::Vlan, "100");
        assert!(f.lines()[0].to_string().ends_with("apply to br0.100"));
        let c = f.check().unwrap();
        assert_eq!(c.interfaces[0].mode, AddressMode::Manual);
        assert_eq!(c.interfaces[1].device_name(), "eth0.100");
        assert_eq!(c.interfaces[1].mode, AddressMode::Static);
        let mut v = view(NetworkConfig::default());
        v.config = c.clone();
        let back = NetForm::new(&v);
        assert_eq!(back.text(FieldId::Vlan), "100");
        assert_eq!(back.check().unwrap(), c);
    }

    #[test]
    fn bond_members_make_the_management_device_a_bond() {
        let mut f = form();
        set(&mut f, FieldId::Bond, "eth0, eth1");
        assert_eq!(
            f.error(FieldId::Management),
            Some("a NIC: name the bond (bond0)")
        );
        set(&mut f, FieldId::Management, "bond0");
        let c = f.check().unwrap();
        assert_eq!(c.bonds[0].name, "bond0");
        assert_eq!(c.bonds[0].members, ["eth0", "eth1"]);
        assert_eq!(c.bonds[0].mode, "active-backup");
        assert_eq!(c.interfaces[0].name, "bond0");
        set(&mut f, FieldId::Bond, "eth1 eth7");
        assert_eq!(f.error(FieldId::Bond), Some("unknown NIC eth7"));
        set(&mut f, FieldId::Bond, "eth0 eth0");
        assert_eq!(f.error(FieldId::Bond), Some("eth0 listed twice"));
    }

    #[test]
    fn settings_of_other_interfaces_are_kept() {
        let other = InterfaceConfig {
            name: "eth1".into(),
            mode: AddressMode::Static,
            addresses: vec!["198.51.100.5/24".into()],
            ..Default::default()
        };
        let saved = NetworkConfig {
            management: Some("eth0".into()),
            search: vec!["example.net".into()],
            interfaces: vec![other.clone()],
            ..Default::default()
        };
        let c = NetForm::new(&view(saved)).check().unwrap();
        assert_eq!(c.interfaces.len(), 2);
        assert_eq!(c.interfaces[1], other);
        assert_eq!(c.search, ["example.net"]);
    }

    #[test]
    fn tab_skips_the_address_fields_in_dhcp_mode() {
        let mut f = form();
        let tab = KeyEvent::new(KeyCode::Tab, KeyModifiers::NONE);
        let mut seen = vec![f.focus];
        for _ in 0..6 {
            f.on_key(tab);
            seen.push(f.focus);
        }
        assert_eq!(
            seen,
            [
                FieldId::Management,
                FieldId::Bond,
                FieldId::Vlan,
                FieldId::Mode,
                FieldId::Dns,
                FieldId::Bridge,
                FieldId::Management
            ]
        );
        f.focus = FieldId::Mode;
        f.on_key(KeyEvent::new(KeyCode::Char(' '), KeyModifiers::NONE));
        assert_eq!(f.mode, AddressMode::Static);
        f.on_key(tab);
        assert_eq!(f.focus, FieldId::Ipv4);
    }

    fn eth1_form(saved: NetworkConfig) -> NetForm {
        NetForm::for_interface(&view(saved), "eth1")
    }

    #[test]
    fn only_nics_outside_the_management_device_are_selectable() {
        assert_eq!(selectable_nics(&view(NetworkConfig::default())), ["eth1"]);
        let mut v = view(NetworkConfig::default());
        v.pending = Some(NetworkConfig {
            management: Some("eth1".into()),
            ..Default::default()
        });
        assert!(selectable_nics(&v).is_empty(), "eth0 saved, eth1 pending");
    }

    #[test]
    fn interface_vlan_puts_the_settings_on_the_tagged_nic_and_reads_back() {
        let mut f = eth1_form(NetworkConfig::default());
        f.mode = AddressMode::Static;
        set(&mut f, FieldId::Vlan, "30");
        set(&mut f, FieldId::Ipv4, "198.51.100.5/24");
        set(&mut f, FieldId::Mtu, "9000");
        assert!(f.lines()[0].to_string().ends_with("apply to eth1.30"));
        let c = f.check().unwrap();
        assert_eq!(c.interfaces.len(), 2);
        assert_eq!(
            (c.interfaces[0].device_name(), c.interfaces[0].mode),
            ("eth1".to_owned(), AddressMode::Manual)
        );
        assert_eq!(
            c.interfaces[0].mtu,
            Some(9000),
            "the VLAN's MTU fits its NIC"
        );
        assert_eq!(c.interfaces[1].device_name(), "eth1.30");
        assert_eq!(c.interfaces[1].gateway4, None);
        let back = eth1_form(c.clone());
        assert_eq!(back.text(FieldId::Vlan), "30");
        assert_eq!(back.check().unwrap(), c);
        // Dropping the VLAN drops both entries' old forms.
        let mut f = back;
        set(&mut f, FieldId::Vlan, "");
        let c = f.check().unwrap();
        assert_eq!(c.interfaces.len(), 1);
        assert_eq!(c.interfaces[0].device_name(), "eth1");
    }

    #[test]
    fn interface_off_keeps_the_link_up_without_addresses() {
        let mut f = eth1_form(NetworkConfig::default());
        f.focus = FieldId::Mode;
        let right = KeyEvent::new(KeyCode::Right, KeyModifiers::NONE);
        f.on_key(right);
        assert_eq!(f.mode, AddressMode::Static);
        f.on_key(right);
        assert_eq!(f.mode, AddressMode::Manual);
        assert!(!f.active(FieldId::Ipv4));
        assert!(f.lines()[5].to_string().contains("(none)"));
        let c = f.check().unwrap();
        assert_eq!(c.interfaces[0].mode, AddressMode::Manual);
        assert!(c.interfaces[0].addresses.is_empty());
        f.on_key(right);
        assert_eq!(f.mode, AddressMode::Dhcp, "wraps around");
        assert_eq!(
            f.check().unwrap().interfaces,
            vec![],
            "plain DHCP is unlisted"
        );
    }

    #[test]
    fn interface_form_keeps_the_other_interfaces_and_their_order() {
        let eth0 = InterfaceConfig {
            name: "eth0".into(),
            mode: AddressMode::Static,
            addresses: vec!["192.0.2.10/24".into()],
            gateway4: Some("192.0.2.1".parse().unwrap()),
            ..Default::default()
        };
        let eth1_vlan = |id: u16| InterfaceConfig {
            name: "eth1".into(),
            vlan: Some(id),
            mode: AddressMode::Static,
            addresses: vec![format!("198.51.{id}.5/24")],
            ..Default::default()
        };
        let saved = NetworkConfig {
            management: Some("eth0".into()),
            dns: vec!["192.0.2.53".parse().unwrap()],
            interfaces: vec![eth1_vlan(40), eth0.clone(), eth1_vlan(100)],
            ..Default::default()
        };
        let mut f = eth1_form(saved.clone());
        assert_eq!(f.text(FieldId::Vlan), "40", "the first tagged entry");
        set(&mut f, FieldId::Mtu, "1400");
        let c = f.check().unwrap();
        let mut want = saved;
        want.interfaces[0].mtu = Some(1400);
        // The NIC under the VLAN now says it carries no address, rather than DHCP by default.
        want.interfaces.insert(
            0,
            InterfaceConfig {
                name: "eth1".into(),
                mode: AddressMode::Manual,
                mtu: Some(1400),
                ..Default::default()
            },
        );
        assert_eq!(c, want, "only eth1 and eth1.40 changed, in place");
    }

    #[test]
    fn control_keys_edit_and_never_type_letters() {
        let mut f = form();
        f.on_key(KeyEvent::new(KeyCode::Char('h'), KeyModifiers::CONTROL));
        assert_eq!(f.text(FieldId::Management), "eth");
        f.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert_eq!(f.text(FieldId::Management), "eth");
        f.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
        assert_eq!(f.text(FieldId::Management), "");
        f.on_key(KeyEvent::new(KeyCode::Right, KeyModifiers::NONE));
        assert_eq!(f.text(FieldId::Management), "eth0");
        f.on_key(KeyEvent::new(KeyCode::Right, KeyModifiers::NONE));
        assert_eq!(f.text(FieldId::Management), "eth1");
    }
}
