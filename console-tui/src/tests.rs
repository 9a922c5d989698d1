//! Render and key-flow tests on ratatui's TestBackend at 80x24.

use crate::app::{self, Action, App, Screen, Snapshot};
use hvnode_api::guest::{GuestSpec, GuestState, GuestStatus};
use hvnode_api::node::{
    AddressSource, NicStatus, NodeInfo, NodeStats, PowerAction, StorageStatus, StorageView,
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
