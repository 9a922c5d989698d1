//! Render and key-flow tests on ratatui's TestBackend at 80x24.

use std::time::{Duration, Instant};

use crate::app::{self, Action, App, Screen, Snapshot};
use hvnode_api::config::{AddressMode, InterfaceConfig, NetworkConfig};
use hvnode_api::guest::{GuestSpec, GuestState, GuestStatus};
use hvnode_api::node::{
    AddressSource, NetworkStatus, NetworkView, NicStatus, NodeInfo, NodeStats, PowerAction,
    StorageStatus, StorageView,
};
use hvnode_api::registration::{RegistrationState, RegistrationStatus};
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
        vec![Action::Guest("web-1".into(), "stop")]
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
        assert!(a.net_form.is_some(), "the form stays open");
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
    assert!(a.net_form.is_none());
}

#[test]
fn esc_closes_the_network_form_without_sending_anything() {
    let mut a = static_form_app();
    assert!(a.on_key(key(KeyCode::Esc)).is_empty());
    assert!(a.net_form.is_none());
    assert_eq!(a.screen, Screen::Network);
    let s = render(&a);
    assert!(s.contains("e/Enter: edit the management network"), "{s}");
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
    assert!(a.net_form.is_none());
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
