//! Render and key-flow tests on ratatui's TestBackend at 80x24.

use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::app::{self, Action, Answer, App, Done, Refreshed, Screen, Snapshot};
use crate::client::{Client, ClientError};
use crate::worker::Worker;
use hvnode_api::config::{AddressMode, InterfaceConfig, NetworkConfig};
use hvnode_api::guest::{DiskSpec, GuestSpec, GuestState, GuestStatus, NicSpec};
use hvnode_api::node::{
    AddressSource, NetworkStatus, NetworkView, NicStatus, NodeInfo, NodeStats, PowerAction,
    StorageStatus, StorageView,
};
use hvnode_api::registration::{RegistrationState, RegistrationStatus};
use hvnode_api::routes::GuestAction;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

fn key(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

fn snapshot() -> Snapshot {
    let guest = |name: &str, state| GuestStatus {
        spec: GuestSpec {
            name: name.into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "vmlinuz".into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![],
            nics: vec![],
            rng: true,
            autostart: false,
        },
        state,
        pid: None,
        uptime_secs: None,
        crash_reason: None,
        snapshots: vec![],
    };
    Snapshot {
        registration: RegistrationStatus {
            state: RegistrationState::Unregistered,
            manager_name: None,
            node_fingerprint: "AB:".repeat(31) + "CD",
            pairing_code: Some("K7PQ2M9X".into()),
        },
        info: NodeInfo {
            hostname: "rack7-node1".into(),
            version: "0.1.0".into(),
            kernel: "6.1.0".into(),
            cpu_model: "QEMU".into(),
            cpus: 2,
            memory_bytes: 2 << 30,
            kvm: true,
            nics: vec![NicStatus {
                name: "br0".into(),
                mac: "52:54:00:12:34:56".into(),
                carrier: true,
                addresses: vec!["10.0.2.15/24".into()],
                source: AddressSource::Dhcp,
            }],
            disks: vec![],
            uptime_secs: 3723,
        },
        stats: NodeStats {
            cpu_percent: 12.0,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 2 << 30,
            load: [0.1, 0.2, 0.3],
            guests_total: 2,
            guests_running: 1,
            uptime_secs: 3723,
        },
        guests: vec![
            guest("web-1", GuestState::Running),
            guest("db-1", GuestState::Stopped),
        ],
        storage: StorageView {
            status: StorageStatus {
                persistent: false,
                note: None,
                ..StorageStatus::default()
            },
            blank_disks: vec![],
        },
    }
}

fn render(app: &App) -> String {
    let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
    t.draw(|f| app::draw(f, app)).unwrap();
    let buf = t.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..24 {
        for x in 0..80 {
            out.push_str(buf[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

fn app() -> App {
    let mut a = App::new("/run/hvnode/agent.sock");
    a.data = Some(snapshot());
    a
}

#[test]
fn status_screen_shows_identity_address_and_registration() {
    let s = render(&app());
    for want in [
        "rack7-node1",
        "10.0.2.15",
        "Unregistered",
        "https://10.0.2.15:8443",
        "AB:AB",
        "1 running / 2 defined",
        "52:54:00:12:34:56",
    ] {
        assert!(s.contains(want), "{want:?} missing:\n{s}");
    }
}

#[test]
fn digits_and_f_keys_switch_screens() {
    let mut a = app();
    a.on_key(key(KeyCode::Char('3')));
    assert_eq!(a.screen, Screen::Manager);
    let s = render(&a);
    assert!(s.contains("Pairing code: K7PQ2M9X"), "{s}");
    a.on_key(key(KeyCode::F(4)));
    assert_eq!(a.screen, Screen::Guests);
    assert!(render(&a).contains("web-1"));
    a.on_key(key(KeyCode::Tab));
    assert_eq!(a.screen, Screen::Storage);
    assert!(render(&a).contains("state is volatile"));
}

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

#[test]
fn manager_url_must_be_https() {
    let mut a = app();
    a.on_key(key(KeyCode::Char('3')));
    a.on_key(key(KeyCode::Char('m')));
    for _ in 0..8 {
        a.on_key(key(KeyCode::Backspace));
    }
    for c in "http://x".chars() {
        a.on_key(key(KeyCode::Char(c)));
    }
    assert!(a.on_key(key(KeyCode::Enter)).is_empty());
    assert!(render(&a).contains("https://"));
}

#[test]
fn stopping_a_guest_and_powering_off_need_confirmation() {
    let mut a = app();
    a.on_key(key(KeyCode::Char('4')));
    assert!(a.on_key(key(KeyCode::Char('t'))).is_empty());
    assert!(render(&a).contains("Stop (power off at once) guest web-1?"));
    assert_eq!(
        a.on_key(key(KeyCode::Char('y'))),
        vec![Action::Guest("web-1".into(), GuestAction::Stop)]
    );
    a.on_key(key(KeyCode::Char('7')));
    a.on_key(key(KeyCode::Char('o')));
    assert!(render(&a).contains("1 guest(s) are running"));
    assert!(a.on_key(key(KeyCode::Esc)).is_empty());
    a.on_key(key(KeyCode::Char('o')));
    assert_eq!(
        a.on_key(key(KeyCode::Enter)),
        vec![Action::Power(PowerAction::Poweroff)]
    );
}

#[test]
fn unreachable_agent_shows_a_banner_and_never_quits_on_esc() {
    let mut a = App::new("/run/hvnode/agent.sock");
    a.unreachable = Some("No such file or directory".into());
    let s = render(&a);
    assert!(
        s.contains("Agent unreachable at /run/hvnode/agent.sock: retrying"),
        "{s}"
    );
    assert!(s.contains("No data from the agent yet"));
    a.on_key(key(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Status);
}

fn nic(name: &str, addresses: &[&str], source: AddressSource) -> NicStatus {
    NicStatus {
        name: name.into(),
        mac: "52:54:00:12:34:56".into(),
        carrier: true,
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        source,
    }
}

/// The node as QEMU's user network leaves it: br0 over eth0 on DHCP, eth1 unused.
fn network_view() -> NetworkView {
    NetworkView {
        config: NetworkConfig::default(),
        status: NetworkStatus {
            hostname: "rack7-node1".into(),
            interfaces: vec![
                nic("br0", &["10.0.2.15/24"], AddressSource::Dhcp),
                nic("eth0", &[], AddressSource::None),
                nic("eth1", &[], AddressSource::None),
            ],
            gateways: vec!["10.0.2.2".into()],
            dns: vec!["10.0.2.3".into()],
        },
        rollback_in_secs: None,
        pending: None,
    }
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

fn net_app() -> App {
    let mut a = app();
    a.set_network(network_view(), Instant::now());
    a.on_key(key(KeyCode::Char('2')));
    a
}

fn typed(a: &mut App, text: &str) {
    for c in text.chars() {
        a.on_key(key(KeyCode::Char(c)));
    }
}

fn ctrl(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
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

/// The screen row holding `label`.
fn row<'a>(screen: &'a str, label: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no {label:?} row:\n{screen}"))
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
fn unreachable_banner_stays_on_every_screen_over_stale_data() {
    let mut a = net_app();
    a.unreachable = Some("Connection refused".into());
    for k in '1'..='7' {
        a.on_key(key(KeyCode::Char(k)));
        let s = render(&a);
        assert!(
            s.lines().nth(1).unwrap_or_default().contains(
                "Agent unreachable at /run/hvnode/agent.sock: retrying... (Connection refused)"
            ),
            "screen {k}:\n{s}"
        );
    }
    a.on_key(key(KeyCode::Char('2')));
    a.on_key(key(KeyCode::Char('e')));
    assert!(
        render(&a).contains("Agent unreachable"),
        "over the form too"
    );
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

#[test]
fn guests_screen_shows_why_the_selected_guest_crashed() {
    let mut a = app();
    if let Some(d) = a.data.as_mut() {
        d.guests[1].state = GuestState::Crashed;
        d.guests[1].crash_reason = Some("vCPU 0: KVM_EXIT_INTERNAL_ERROR".into());
    }
    a.on_key(key(KeyCode::Char('4')));
    let s = render(&a);
    assert!(s.contains("crashed"), "{s}");
    assert!(
        !s.contains("KVM_EXIT_INTERNAL_ERROR"),
        "shown for an unselected guest:\n{s}"
    );
    a.on_key(key(KeyCode::Down));
    let s = render(&a);
    assert!(
        s.contains("Crashed: vCPU 0: KVM_EXIT_INTERNAL_ERROR"),
        "{s}"
    );
}

/// The banner, the screen's second row.
fn banner(a: &App) -> String {
    render(a)
        .lines()
        .nth(1)
        .unwrap_or_default()
        .trim_end()
        .to_owned()
}

fn guests_app() -> App {
    let mut a = app();
    a.on_key(key(KeyCode::Char('4')));
    a
}

fn set_state(a: &mut App, i: usize, state: GuestState) {
    if let Some(d) = a.data.as_mut() {
        d.guests[i].state = state;
    }
}

#[test]
fn p_pauses_a_running_guest_and_resumes_a_paused_one() {
    let mut a = guests_app();
    assert_eq!(
        a.on_key(key(KeyCode::Char('p'))),
        vec![Action::Guest("web-1".into(), GuestAction::Pause)]
    );
    set_state(&mut a, 0, GuestState::Paused);
    assert_eq!(
        a.on_key(key(KeyCode::Char('p'))),
        vec![Action::Guest("web-1".into(), GuestAction::Resume)]
    );
    assert!(
        render(&a).contains("p: pause/resume"),
        "key help:\n{}",
        render(&a)
    );
}

#[test]
fn rebooting_a_guest_needs_confirmation() {
    let mut a = guests_app();
    a.on_key(key(KeyCode::Down));
    assert!(a.on_key(key(KeyCode::Char('r'))).is_empty());
    let s = render(&a);
    assert!(
        s.contains("Reboot guest db-1? It shuts down and starts again."),
        "{s}"
    );
    assert!(a.on_key(key(KeyCode::Char('n'))).is_empty());
    assert!(a.confirm.is_none());
    a.on_key(key(KeyCode::Char('r')));
    assert_eq!(
        a.on_key(key(KeyCode::Char('y'))),
        vec![Action::Guest("db-1".into(), GuestAction::Reboot)]
    );
    assert!(
        render(&a).contains("s: start  t: stop  d: shut down  r: reboot"),
        "{}",
        render(&a)
    );
}

#[test]
fn guests_screen_shows_the_selected_guests_devices_and_uptime() {
    let mut a = guests_app();
    if let Some(d) = a.data.as_mut() {
        let web = &mut d.guests[0];
        web.uptime_secs = Some(90_061);
        web.spec.disks = vec![
            DiskSpec {
                path: "disks/web-1.raw".into(),
                read_only: false,
            },
            DiskSpec {
                path: "iso/tools.iso".into(),
                read_only: true,
            },
        ];
        web.spec.nics = vec![
            NicSpec {
                mac: Some("52:54:00:00:00:01".into()),
                bridge: "br0".into(),
            },
            NicSpec {
                mac: None,
                bridge: "br-storage".into(),
            },
        ];
    }
    let s = render(&a);
    // The address the agent gives a NIC without one, not a placeholder.
    let derived = format!(
        "NICs    br0 52:54:00:00:00:01, br-storage {}",
        hvnode_api::guest::derived_mac("web-1", 1)
    );
    for want in [
        "web-1    2 vCPU(s), 512 MiB, up 1d 01:01:01",
        "Disks   vda disks/web-1.raw, vdb iso/tools.iso (read-only)",
        derived.as_str(),
    ] {
        assert!(s.contains(want), "{want:?} missing:\n{s}");
    }
    a.on_key(key(KeyCode::Down));
    let s = render(&a);
    for want in [
        "db-1     2 vCPU(s), 512 MiB, not running",
        "Disks   none",
        "NICs    none",
    ] {
        assert!(s.contains(want), "{want:?} missing:\n{s}");
    }
    assert!(
        !s.contains("disks/web-1.raw"),
        "only the selected guest:\n{s}"
    );
}

#[test]
fn an_action_shows_while_it_runs_and_its_answer_updates_the_guest() {
    let mut a = guests_app();
    let sent = a.on_key(key(KeyCode::Char('s')));
    assert_eq!(
        sent,
        vec![Action::Guest("web-1".into(), GuestAction::Start)]
    );
    assert_eq!(banner(&a), "Starting web-1...");
    // Keys keep working: another screen and back, and the banner stays.
    a.on_key(key(KeyCode::Char('1')));
    assert_eq!(banner(&a), "Starting web-1...");
    a.on_key(key(KeyCode::Char('4')));
    let mut g = snapshot().guests[0].clone();
    g.uptime_secs = Some(1);
    a.apply(
        Done {
            action: sent[0].clone(),
            result: Ok(Answer::Guest(Box::new(g))),
        },
        Instant::now(),
    );
    assert_eq!(banner(&a), "Done: web-1 is running.");
    assert!(a.busy().is_none());
    assert!(render(&a).contains("up 00:00:01"), "{}", render(&a));
}

#[test]
fn an_invalid_state_answer_shows_as_a_message_line() {
    let mut a = guests_app();
    a.on_key(key(KeyCode::Down));
    let sent = a.on_key(key(KeyCode::Char('p')));
    assert_eq!(sent, vec![Action::Guest("db-1".into(), GuestAction::Pause)]);
    a.apply(
        Done {
            action: sent[0].clone(),
            result: Err(ClientError::Api {
                code: hvnode_api::error::ErrorCode::InvalidGuestState,
                message: "Guest db-1 is stopped; pause needs running".into(),
            }),
        },
        Instant::now(),
    );
    assert_eq!(
        banner(&a),
        "Failed: Guest db-1 is stopped; pause needs running (invalid_guest_state)"
    );
    assert!(a.unreachable.is_none());
    assert_eq!(a.screen, Screen::Guests);
    assert!(render(&a).contains("> db-1"), "{}", render(&a));
}

#[test]
fn only_one_refresh_is_on_its_way_and_the_next_follows_its_answer() {
    let mut a = App::new("/run/hvnode/agent.sock");
    let t = Instant::now();
    assert_eq!(a.poll(t), vec![Action::Refresh { node_log: false }]);
    assert!(
        a.poll(t + Duration::from_secs(30)).is_empty(),
        "a second refresh"
    );
    a.on_key(key(KeyCode::Char('6')));
    assert!(a.poll(t).is_empty(), "a switch does not add one either");
    a.apply(
        Done {
            action: Action::Refresh { node_log: false },
            result: Err(ClientError::Unreachable(
                "/run/hvnode/agent.sock".into(),
                "no answer within 5 s".into(),
            )),
        },
        t,
    );
    assert!(banner(&a).contains("retrying... (no answer within 5 s)"));
    assert!(a.poll(t + Duration::from_millis(1900)).is_empty());
    assert_eq!(
        a.poll(t + Duration::from_secs(2)),
        vec![Action::Refresh { node_log: true }],
        "the Logs screen reads the node log"
    );
    a.apply(
        Done {
            action: Action::Refresh { node_log: true },
            result: Ok(Answer::Refreshed(Box::new(Refreshed {
                snapshot: Ok(snapshot()),
                network: Ok(network_view()),
                node_log: Some(Ok("init: started agent\n".into())),
            }))),
        },
        t + Duration::from_secs(3),
    );
    assert!(a.unreachable.is_none());
    assert!(render(&a).contains("init: started agent"));
    a.on_key(key(KeyCode::Char('1')));
    assert_eq!(
        a.poll(t + Duration::from_secs(3)),
        vec![Action::Refresh { node_log: false }],
        "a screen switch refreshes at once"
    );
}

/// A scripted agent on a unix socket: answers the refresh's GETs from `snapshot()`, and a start
/// of web-1 after `delay`, as a slow VMM would.
struct FakeAgent {
    path: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeAgent {
    fn start(name: &str, delay: Duration) -> FakeAgent {
        let dir =
            std::env::temp_dir().join(format!("hvnode-console-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        std::thread::spawn(move || {
            let mut snap = snapshot();
            set_guest(&mut snap, GuestState::Stopped, None);
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().unwrap().push(line.clone());
                let json = |v: serde_json::Result<String>| (200, v.unwrap());
                let (status, body) = match line.split(' ').take(2).collect::<Vec<_>>()[..] {
                    ["GET", "/v1/registration"] => json(serde_json::to_string(&snap.registration)),
                    ["GET", "/v1/node"] => json(serde_json::to_string(&snap.info)),
                    ["GET", "/v1/stats"] => json(serde_json::to_string(&snap.stats)),
                    ["GET", "/v1/guests"] => json(serde_json::to_string(&snap.guests)),
                    ["GET", "/v1/storage"] => json(serde_json::to_string(&snap.storage)),
                    ["GET", "/v1/network"] => json(serde_json::to_string(&network_view())),
                    ["POST", "/v1/guests/web-1/start"] => {
                        std::thread::sleep(delay);
                        set_guest(&mut snap, GuestState::Running, Some(5));
                        json(serde_json::to_string(&snap.guests[0]))
                    }
                    _ => (
                        404,
                        r#"{"code":"not_found","message":"No such route"}"#.to_owned(),
                    ),
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeAgent { path, requests }
    }

    fn seen(&self, line: &str) -> usize {
        let r = self.requests.lock().unwrap();
        r.iter().filter(|l| l.starts_with(line)).count()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn set_guest(s: &mut Snapshot, state: GuestState, uptime: Option<u64>) {
    s.guests[0].state = state;
    s.guests[0].uptime_secs = uptime;
}

/// Runs loop turns without keys until `done` holds, for at most `limit`.
fn turns_until(a: &mut App, w: &Worker, limit: Duration, done: impl Fn(&App) -> bool) {
    let start = Instant::now();
    while !done(a) {
        assert!(
            start.elapsed() < limit,
            "not within {limit:?}:\n{}",
            render(a)
        );
        crate::turn(a, w, None, Instant::now()).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn keys_keep_working_while_the_agent_takes_two_seconds_to_answer() {
    let agent = FakeAgent::start("slow", Duration::from_secs(2));
    let worker = Worker::spawn(Client::new(&agent.path)).unwrap();
    let mut a = App::new(&agent.path.display().to_string());
    turns_until(&mut a, &worker, Duration::from_secs(5), |a| {
        a.data.is_some()
    });
    crate::turn(
        &mut a,
        &worker,
        Some(key(KeyCode::Char('4'))),
        Instant::now(),
    )
    .unwrap();
    assert!(render(&a).contains("stopped"), "{}", render(&a));
    let sent = Instant::now();
    crate::turn(
        &mut a,
        &worker,
        Some(key(KeyCode::Char('s'))),
        Instant::now(),
    )
    .unwrap();
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "sending waited {:?} for the agent",
        sent.elapsed()
    );

    // For most of the agent's two seconds: every key is handled at once (the bound leaves room
    // for a loaded machine, far below the agent's delay), the screen says what the agent is
    // doing, and nothing has been applied yet.
    let keys = [
        key(KeyCode::Char('1')),
        key(KeyCode::Char('4')),
        key(KeyCode::Char('t')),
        key(KeyCode::Esc),
    ];
    let mut turns = 0;
    while sent.elapsed() < Duration::from_millis(1700) {
        let k = keys[turns % keys.len()];
        let before = Instant::now();
        crate::turn(&mut a, &worker, Some(k), Instant::now()).unwrap();
        assert!(
            before.elapsed() < Duration::from_millis(500),
            "a turn waited {:?} for the agent",
            before.elapsed()
        );
        let s = render(&a);
        assert_eq!(banner(&a), "Starting web-1...", "{s}");
        match k.code {
            KeyCode::Char('1') => {
                assert_eq!(a.screen, Screen::Status);
                assert!(s.contains("rack7-node1"), "{s}");
            }
            KeyCode::Char('t') => assert!(s.contains("Stop (power off at once) guest web-1?")),
            KeyCode::Esc => assert!(a.confirm.is_none() && a.screen == Screen::Guests),
            _ => assert_eq!(a.screen, Screen::Guests),
        }
        turns += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(turns > 10, "only {turns} turns in 1.7 s");
    // The loop may have ended on `t`, with its confirmation still open: close it first.
    for k in [KeyCode::Esc, KeyCode::Char('4')] {
        crate::turn(&mut a, &worker, Some(key(k)), Instant::now()).unwrap();
    }
    assert!(a.confirm.is_none());
    assert!(render(&a).contains("> web-1"), "{}", render(&a));
    assert!(render(&a).contains("not running"), "{}", render(&a));

    turns_until(&mut a, &worker, Duration::from_secs(5), |a| {
        a.busy().is_none()
    });
    assert!(sent.elapsed() >= Duration::from_secs(2));
    assert_eq!(banner(&a), "Done: web-1 is running.");
    let s = render(&a);
    assert!(s.contains("running") && s.contains("up 00:00:05"), "{s}");
    assert_eq!(agent.seen("POST /v1/guests/web-1/start "), 1);
    // The refresh that fell due meanwhile waited behind the start: one, not one per 2 s.
    turns_until(&mut a, &worker, Duration::from_secs(5), |_| {
        agent.seen("GET /v1/registration ") >= 2
    });
    assert!(agent.seen("GET /v1/registration ") <= 3);
}

#[test]
fn a_long_guest_list_scrolls_to_keep_the_selection_detail_and_keys_on_screen() {
    let mut a = guests_app();
    if let Some(d) = a.data.as_mut() {
        let one = d.guests[0].clone();
        d.guests = (0..20)
            .map(|i| {
                let mut g = one.clone();
                g.spec.name = format!("vm-{i:02}");
                g
            })
            .collect();
    }
    let s = render(&a);
    assert!(s.contains("> vm-00") && !s.contains("vm-19"), "{s}");
    for _ in 0..19 {
        a.on_key(key(KeyCode::Down));
    }
    let s = render(&a);
    for want in [
        "> vm-19",
        "vm-19    2 vCPU(s)",
        "p: pause/resume  Enter: console",
    ] {
        assert!(s.contains(want), "{want:?} missing:\n{s}");
    }
    assert!(!s.contains("vm-00"), "{s}");
}

#[test]
fn ctrl_l_repaints_and_a_plain_l_does_not() {
    let ctrl_l = KeyEvent::new(KeyCode::Char('l'), KeyModifiers::CONTROL);
    assert!(crate::is_repaint_key(&ctrl_l));
    assert!(!crate::is_repaint_key(&key(KeyCode::Char('l'))));
}

#[test]
fn guests_screen_takes_a_named_snapshot_and_restores_the_newest_after_confirmation() {
    let mut a = app();
    a.on_key(key(KeyCode::Char('4')));
    a.on_key(key(KeyCode::Char('R')));
    assert!(a.confirm.is_none(), "nothing to restore without a snapshot");
    assert_eq!(a.message.as_deref(), Some("Guest web-1 has no snapshot."));

    a.on_key(key(KeyCode::Char('S')));
    typed(&mut a, "Bad Name");
    assert!(
        a.on_key(key(KeyCode::Enter)).is_empty(),
        "an invalid name is refused"
    );
    for _ in 0.."Bad Name".len() {
        a.on_key(key(KeyCode::Backspace));
    }
    typed(&mut a, "before-upgrade");
    assert_eq!(
        a.on_key(key(KeyCode::Enter)),
        vec![Action::Snapshot("web-1".into(), "before-upgrade".into())]
    );

    if let Some(d) = a.data.as_mut() {
        d.guests[0].snapshots = vec!["first".into(), "before-upgrade".into()];
    }
    assert!(render(&a).contains("Snapshots first, before-upgrade"));
    a.on_key(key(KeyCode::Char('R')));
    assert!(a
        .confirm
        .as_ref()
        .unwrap()
        .text
        .contains("snapshot before-upgrade"));
    assert_eq!(
        a.on_key(key(KeyCode::Char('y'))),
        vec![Action::Restore("web-1".into(), "before-upgrade".into())]
    );
}
