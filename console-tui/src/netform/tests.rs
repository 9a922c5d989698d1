//! The form's checks and keys, without rendering.

use super::*;
use hvnode_api::node::{AddressSource, NetworkStatus, NicStatus};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

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
