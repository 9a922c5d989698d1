//! Fixtures of the console's tests: a node as the agent reports it, an App holding it, keys,
//! and the screen rendered to text on ratatui's TestBackend at 80x24, the serial console's size.

use std::time::Instant;

use hvnode_api::config::NetworkConfig;
use hvnode_api::guest::{GuestSpec, GuestState, GuestStatus};
use hvnode_api::node::{
    AddressSource, NetworkStatus, NetworkView, NicStatus, NodeInfo, NodeStats, StorageStatus,
    StorageView,
};
use hvnode_api::registration::{RegistrationState, RegistrationStatus};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

use crate::app::{self, App};
use crate::state::Snapshot;

pub(crate) fn key(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

pub(crate) fn ctrl(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
}

pub(crate) fn typed(a: &mut App, text: &str) {
    for c in text.chars() {
        a.on_key(key(KeyCode::Char(c)));
    }
}

pub(crate) fn snapshot() -> Snapshot {
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
        cluster: false,
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
        cluster: hvnode_api::cluster::ClusterView::not_joined(),
        install_disks: vec![],
        install: hvnode_api::install::InstallState::Idle,
    }
}

pub(crate) fn render(app: &App) -> String {
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

pub(crate) fn app() -> App {
    let mut a = App::new("/run/hvnode/agent.sock");
    a.data = Some(snapshot());
    a
}

/// The banner, the screen's second row.
pub(crate) fn banner(a: &App) -> String {
    render(a)
        .lines()
        .nth(1)
        .unwrap_or_default()
        .trim_end()
        .to_owned()
}

/// The screen row holding `label`.
pub(crate) fn row<'a>(screen: &'a str, label: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no {label:?} row:\n{screen}"))
}

pub(crate) fn nic(name: &str, addresses: &[&str], source: AddressSource) -> NicStatus {
    NicStatus {
        name: name.into(),
        mac: "52:54:00:12:34:56".into(),
        carrier: true,
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        source,
    }
}

/// The node as QEMU's user network leaves it: br0 over eth0 on DHCP, eth1 unused.
pub(crate) fn network_view() -> NetworkView {
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

pub(crate) fn net_app() -> App {
    let mut a = app();
    a.set_network(network_view(), Instant::now());
    a.on_key(key(KeyCode::Char('2')));
    a
}
