//! The Network screen through the App: the host name field, the NIC selection, the management
//! and interface forms (rendered at 80x24 with their errors), and a pending change's countdown
//! and outcome. The form's checks alone are tested in `netform`.

use std::time::{Duration, Instant};

use hvnode_api::config::{AddressMode, InterfaceConfig, NetworkConfig};
use ratatui::crossterm::event::KeyCode;

use crate::app::{Action, App, Screen};
use crate::testing::{app, ctrl, key, net_app, network_view, render, row, typed};

#[test]
fn hostname_edit_validates_inline_and_sends_one_request() {
    let mut a = app();
    a.on_key(key(KeyCode::Char('2')));
    a.on_key(key(KeyCode::Char('h')));
    for _ in 0.."rack7-node1".len() {
        a.on_key(key(KeyCode::Backspace));
    }
    a.on_key(key(KeyCode::Char('-')));
    assert!(
        a.on_key(key(KeyCode::Enter)).is_empty(),
        "invalid name must not be sent"
    );
    assert!(render(&a).contains("! Invalid hostname"), "{}", render(&a));
    a.on_key(key(KeyCode::Backspace));
    for c in "node9".chars() {
        a.on_key(key(KeyCode::Char(c)));
    }
    assert_eq!(
        a.on_key(key(KeyCode::Enter)),
        vec![Action::SetHostname("node9".into())]
    );
}

/// A static configuration of eth0 (through br0) as the form builds it.
fn static_config() -> NetworkConfig {
    NetworkConfig {
        management: Some("eth0".into()),
        dns: vec!["192.0.2.53".parse().unwrap()],
        interfaces: vec![InterfaceConfig {
            name: "eth0".into(),
            mode: AddressMode::Static,
            addresses: vec!["192.0.2.10/24".into()],
            gateway4: Some("192.0.2.1".parse().unwrap()),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Opens the form and fills in a static address on eth0 (focus ends on the gateway).
fn static_form_app() -> App {
    let mut a = net_app();
    assert!(a.on_key(key(KeyCode::Char('e'))).is_empty());
    for _ in 0..3 {
        a.on_key(key(KeyCode::Tab));
    }
    a.on_key(key(KeyCode::Char(' ')));
    a.on_key(key(KeyCode::Tab));
    typed(&mut a, "192.0.2.10/24");
    a.on_key(key(KeyCode::Tab));
    typed(&mut a, "192.0.2.1");
    a
}

/// Tabs through the form until `label` has the focus.
fn focus(a: &mut App, label: &str) {
    for _ in 0..10 {
        if row(&render(a), label).contains(&format!(">{label}")) {
            return;
        }
        a.on_key(key(KeyCode::Tab));
    }
    panic!("Tab never reached {label}");
}

#[test]
fn network_form_renders_every_field_at_80x24() {
    let a = static_form_app();
    let s = render(&a);
    for (label, value) in [
        ("Management NIC", "eth0"),
        ("Mode", "< static >"),
        ("IPv4 address", "192.0.2.10/24"),
        ("IPv4 gateway", "192.0.2.1_"),
        ("Bridge", "br0"),
        ("VLAN id", ""),
        ("Bond members", ""),
        ("IPv6 address", ""),
        ("DNS servers", ""),
    ] {
        assert!(row(&s, label).contains(value), "{label}: {value:?}\n{s}");
    }
    assert!(
        row(&s, "IPv4 gateway").contains(">IPv4 gateway"),
        "focus marker\n{s}"
    );
    assert!(!s.contains(" ! "), "a valid form shows no error:\n{s}");
    assert!(s.contains("these settings apply to br0"), "{s}");
    assert!(s.contains("Enter/F10: apply  Esc: cancel"), "{s}");
}

#[test]
fn network_form_shows_each_error_beside_its_field() {
    let cases = [
        ("IPv4 address", "192.0.2.300/24", "! not an IPv4 address"),
        ("IPv4 address", "192.0.2.10/40", "! prefix must be 0-32"),
        ("IPv4 gateway", "203.0.113.1", "! not in 192.0.2.0/24"),
        (
            "DNS servers",
            "192.0.2.53, 192.0.2.",
            "! not an IP address: 192.0.2.",
        ),
        ("VLAN id", "4095", "! VLAN id must be 1-4094"),
        ("Management NIC", "eth9", "! unknown NIC eth9"),
    ];
    for (label, text, error) in cases {
        let mut a = static_form_app();
        focus(&mut a, label);
        a.on_key(ctrl('u'));
        typed(&mut a, text);
        let s = render(&a);
        let r = row(&s, label);
        assert!(
            r.contains(text) && r.contains(error),
            "{label}: {error}\n{s}"
        );
        assert_eq!(s.matches(" ! ").count(), 1, "only {label} is wrong:\n{s}");
        assert!(a.on_key(key(KeyCode::Enter)).is_empty(), "{label}: sent");
        let s = render(&a);
        assert!(s.contains("Not sent: 1 field(s) invalid"), "{s}");
        assert!(a.network.form.is_some(), "the form stays open");
    }
}

#[test]
fn tab_moves_between_fields_and_enter_applies_a_valid_form() {
    let mut a = net_app();
    a.on_key(key(KeyCode::Enter));
    assert!(row(&render(&a), "Management NIC").contains(">Management NIC"));
    a.on_key(key(KeyCode::Tab));
    assert!(row(&render(&a), "Bond members").contains(">Bond members"));
    a.on_key(key(KeyCode::BackTab));
    a.on_key(key(KeyCode::BackTab));
    let s = render(&a);
    assert!(row(&s, "Bridge").contains(">Bridge"), "wraps around:\n{s}");
    assert!(row(&s, "IPv4 address").contains("(from DHCP)"), "{s}");

    let mut a = static_form_app();
    a.on_key(key(KeyCode::Tab));
    a.on_key(key(KeyCode::Tab));
    a.on_key(key(KeyCode::Tab));
    typed(&mut a, "192.0.2.53");
    assert_eq!(
        a.on_key(key(KeyCode::F(10))),
        vec![Action::ApplyNetwork(static_config())]
    );
    assert!(a.network.form.is_none());
}

#[test]
fn esc_closes_the_network_form_without_sending_anything() {
    let mut a = static_form_app();
    assert!(a.on_key(key(KeyCode::Esc)).is_empty());
    assert!(a.network.form.is_none());
    assert_eq!(a.screen, Screen::Network);
    let s = render(&a);
    assert!(s.contains("e/Enter: edit the management network"), "{s}");
    assert!(!s.contains("Pending change"), "{s}");
}

/// eth1 on a storage network: static, no gateway, jumbo frames.
fn storage_eth1() -> InterfaceConfig {
    InterfaceConfig {
        name: "eth1".into(),
        mode: AddressMode::Static,
        addresses: vec!["198.51.100.5/24".into()],
        mtu: Some(9000),
        ..Default::default()
    }
}

/// The Network screen with `config` saved, eth1 selected and its form open.
fn eth1_form_app(config: NetworkConfig) -> App {
    let mut a = app();
    let mut v = network_view();
    v.config = config;
    a.set_network(v, Instant::now());
    a.on_key(key(KeyCode::Char('2')));
    a.on_key(key(KeyCode::Down));
    assert!(a.on_key(key(KeyCode::Char('e'))).is_empty());
    a
}

#[test]
fn up_and_down_move_the_marker_over_the_nics_but_the_management_one() {
    let mut a = net_app();
    let s = render(&a);
    assert!(row(&s, "Management").contains("> Management"), "{s}");
    assert!(row(&s, " eth1 ").contains("  e eth1"), "{s}");
    assert!(
        !row(&s, " eth0 ").contains("e eth0"),
        "enslaved to br0:\n{s}"
    );
    assert!(!row(&s, " br0 ").contains("e br0"), "the bridge:\n{s}");
    assert!(s.contains("e/Enter: edit the management network"), "{s}");

    a.on_key(key(KeyCode::Down));
    let s = render(&a);
    assert!(row(&s, " eth1 ").contains("> e eth1"), "{s}");
    assert!(!row(&s, "Management").contains("> Management"), "{s}");
    assert!(
        s.contains("e/Enter: edit eth1   h: change the host name"),
        "{s}"
    );
    a.on_key(key(KeyCode::Down));
    assert!(
        row(&render(&a), " eth1 ").contains("> e eth1"),
        "stops at the last"
    );
    a.on_key(key(KeyCode::Up));
    a.on_key(key(KeyCode::Up));
    assert!(row(&render(&a), "Management").contains("> Management"));
    a.on_key(key(KeyCode::Enter));
    assert!(render(&a).contains("Management NIC"), "the management form");
}

#[test]
fn bond_members_are_not_selectable() {
    let mut a = app();
    let mut v = network_view();
    v.config.management = Some("bond0".into());
    v.config.bonds = vec![hvnode_api::config::BondConfig {
        name: "bond0".into(),
        mode: "active-backup".into(),
        members: vec!["eth0".into(), "eth1".into()],
    }];
    a.set_network(v, Instant::now());
    a.on_key(key(KeyCode::Char('2')));
    a.on_key(key(KeyCode::Down));
    let s = render(&a);
    assert!(row(&s, "Management").contains("> Management"), "{s}");
    assert!(!s.contains("e eth"), "{s}");
    assert!(!s.contains("Up/Down: select"), "{s}");
}

#[test]
fn interface_form_is_prefilled_from_the_saved_settings_of_its_nic() {
    let mut saved = static_config();
    saved.interfaces.push(storage_eth1());
    let a = eth1_form_app(saved);
    let s = render(&a);
    assert!(s.contains("hvnode: Network: edit eth1"), "{s}");
    assert!(
        s.contains("Interface eth1: these settings apply to eth1"),
        "{s}"
    );
    for (label, value) in [
        ("Mode", "< static >"),
        ("IPv4 address", "198.51.100.5/24"),
        ("MTU", "9000"),
    ] {
        assert!(row(&s, label).contains(value), "{label}: {value:?}\n{s}");
    }
    assert!(
        row(&s, "Mode").contains(">Mode"),
        "focus starts on the mode\n{s}"
    );
    for absent in ["Management NIC", "Bond members", "DNS servers", "Bridge"] {
        assert!(!s.contains(absent), "{absent}\n{s}");
    }
    assert!(!s.contains(" ! "), "a valid form shows no error:\n{s}");
}

#[test]
fn interface_form_without_settings_starts_on_dhcp() {
    let s = render(&eth1_form_app(NetworkConfig::default()));
    assert!(row(&s, "Mode").contains("< DHCP >"), "{s}");
    assert!(row(&s, "IPv4 address").contains("(from DHCP)"), "{s}");
    for empty in ["MTU", "VLAN id"] {
        let r = row(&s, empty).trim_end_matches(['|', ' ']);
        assert!(r.ends_with(empty), "{empty} is empty:\n{s}");
    }
}

#[test]
fn interface_form_shows_each_error_beside_its_field_and_sends_nothing() {
    let mut saved = static_config();
    saved.interfaces.push(storage_eth1());
    let cases = [
        ("IPv4 gateway", "192.0.2.1", "! not in 198.51.100.0/24"),
        ("MTU", "10000", "! MTU must be 68-9216"),
        ("MTU", "jumbo", "! MTU must be 68-9216"),
        ("VLAN id", "4095", "! VLAN id must be 1-4094"),
        ("IPv4 address", "198.51.100.5", "! needs /PREFIX, e.g. /24"),
    ];
    for (label, text, error) in cases {
        let mut a = eth1_form_app(saved.clone());
        focus(&mut a, label);
        a.on_key(ctrl('u'));
        typed(&mut a, text);
        let s = render(&a);
        let r = row(&s, label);
        assert!(
            r.contains(text) && r.contains(error),
            "{label}: {error}\n{s}"
        );
        assert_eq!(s.matches(" ! ").count(), 1, "only {label} is wrong:\n{s}");
        assert!(a.on_key(key(KeyCode::Enter)).is_empty(), "{label}: sent");
        assert!(render(&a).contains("Not sent: 1 field(s) invalid"));
        assert!(a.network.form.is_some(), "the form stays open");
    }
}

#[test]
fn editing_a_second_nic_to_static_changes_only_that_interface() {
    let mut a = eth1_form_app(static_config());
    a.on_key(key(KeyCode::Char(' ')));
    a.on_key(key(KeyCode::Tab));
    typed(&mut a, "198.51.100.5/24");
    focus(&mut a, "MTU");
    typed(&mut a, "9000");
    let mut want = static_config();
    want.interfaces.push(storage_eth1());
    assert_eq!(
        a.on_key(key(KeyCode::Enter)),
        vec![Action::ApplyNetwork(want)]
    );
    assert!(a.network.form.is_none());
    assert_eq!(a.screen, Screen::Network);
}

#[test]
fn interface_form_edits_the_pending_change_rather_than_the_saved_config() {
    let mut a = app();
    let mut v = network_view();
    let mut pending = static_config();
    pending.interfaces.push(storage_eth1());
    v.pending = Some(pending.clone());
    v.rollback_in_secs = Some(50);
    a.set_network(v, Instant::now());
    a.on_key(key(KeyCode::Char('2')));
    a.on_key(key(KeyCode::Down));
    a.on_key(key(KeyCode::Enter));
    assert!(row(&render(&a), "IPv4 address").contains("198.51.100.5/24"));
    // Back to plain DHCP: the entry goes, the management settings stay.
    a.on_key(key(KeyCode::Char('d')));
    focus(&mut a, "MTU");
    a.on_key(ctrl('u'));
    assert_eq!(
        a.on_key(key(KeyCode::Enter)),
        vec![Action::ApplyNetwork(static_config())]
    );
}

#[test]
fn esc_closes_the_interface_form_without_sending_anything() {
    let mut a = eth1_form_app(NetworkConfig::default());
    a.on_key(key(KeyCode::Char('s')));
    a.on_key(key(KeyCode::Tab));
    typed(&mut a, "198.51.100.5/24");
    assert!(a.on_key(key(KeyCode::Esc)).is_empty());
    assert!(a.network.form.is_none());
    let s = render(&a);
    assert!(
        s.contains("e/Enter: edit eth1"),
        "the selection stays:\n{s}"
    );
    assert!(!s.contains("Pending change"), "{s}");
}

#[test]
fn pending_change_counts_down_and_checks_the_new_addresses() {
    let mut a = net_app();
    let start = Instant::now();
    let mut v = network_view();
    v.pending = Some(static_config());
    v.rollback_in_secs = Some(57);
    v.status.interfaces[0].addresses = vec!["192.0.2.10/24".into()];
    v.status.gateways = vec!["192.0.2.1".into()];
    a.set_network(v, start);
    let s = render(&a);
    assert!(
        s.contains("Rolls back in 57 s - press c to keep, r to roll back"),
        "{s}"
    );
    assert!(
        s.contains("br0: static 192.0.2.10/24 via 192.0.2.1, DNS 192.0.2.53"),
        "{s}"
    );
    assert!(
        s.contains("Check: 192.0.2.10/24 is up on br0; default route via 192.0.2.1 in place"),
        "{s}"
    );
    a.tick(start + Duration::from_secs(10));
    assert!(render(&a).contains("Rolls back in 47 s"));
    a.tick(start + Duration::from_secs(60));
    assert!(render(&a).contains("Rolling back now..."));
    assert_eq!(
        a.on_key(key(KeyCode::Char('c'))),
        vec![Action::ConfirmNetwork]
    );
    assert_eq!(
        a.on_key(key(KeyCode::Char('r'))),
        vec![Action::RollbackNetwork]
    );
}

#[test]
fn pending_change_reports_addresses_that_did_not_come_up() {
    let mut a = net_app();
    let mut v = network_view();
    v.pending = Some(static_config());
    v.rollback_in_secs = Some(60);
    a.set_network(v, Instant::now());
    assert!(render(&a)
        .contains("Check: 192.0.2.10/24 is on no interface yet; no default route via 192.0.2.1"));
}

#[test]
fn change_nobody_kept_shows_as_rolled_back_and_a_kept_one_as_saved() {
    let mut a = net_app();
    let now = Instant::now();
    let mut v = network_view();
    v.pending = Some(static_config());
    v.rollback_in_secs = Some(3);
    a.set_network(v, now);
    a.set_network(network_view(), now + Duration::from_secs(61));
    let s = render(&a);
    assert!(
        s.contains("The change was rolled back: the saved configuration is in force."),
        "{s}"
    );
    assert!(!s.contains("Rolls back in"), "{s}");
    assert!(
        a.on_key(key(KeyCode::Char('c'))).is_empty(),
        "nothing left to keep"
    );

    let mut v = network_view();
    v.pending = Some(static_config());
    v.rollback_in_secs = Some(50);
    a.set_network(v, now);
    let mut kept = network_view();
    kept.config = static_config();
    a.set_network(kept, now);
    let s = render(&a);
    assert!(
        s.contains("The change was kept and saved in node.toml."),
        "{s}"
    );
    assert!(s.contains("br0: static 192.0.2.10/24"), "{s}");
}

#[test]
fn network_form_needs_the_agents_network_view() {
    let mut a = app();
    a.on_key(key(KeyCode::Char('2')));
    assert!(a.on_key(key(KeyCode::Enter)).is_empty());
    assert!(a.network.form.is_none());
    assert!(render(&a).contains("has not reported the network configuration"));
}

#[test]
fn hostname_field_clears_with_ctrl_u_and_ignores_other_control_keys() {
    let mut a = app();
    a.on_key(key(KeyCode::Char('2')));
    a.on_key(key(KeyCode::Char('h')));
    a.on_key(ctrl('u'));
    a.on_key(ctrl('c'));
    typed(&mut a, "node7x");
    a.on_key(ctrl('h'));
    assert_eq!(
        a.on_key(key(KeyCode::Enter)),
        vec![Action::SetHostname("node7".into())]
    );
}
