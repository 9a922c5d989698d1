//! The Status screen: host name, version, registration, guests, CPU and memory, uptime, the
//! API's URL, the node certificate's fingerprint and each NIC. No state and no keys of its own.

use hvnode_api::units::bytes;
use ratatui::text::Line;

use hvnode_api::cluster::{ClusterConnection, ClusterView, FenceState, FencingView};

use super::{fingerprint_halves, kv, reg_state};
use crate::state::Snapshot;

/// The screen's lines.
pub fn lines(d: &Snapshot) -> Vec<Line<'static>> {
    let mut l = vec![
        kv("Host name", d.info.hostname.clone()),
        kv(
            "Version",
            format!("hvnode {} (kernel {})", d.info.version, d.info.kernel),
        ),
        kv("Manager", reg_state(&d.registration)),
        kv("Cluster", cluster_state(&d.cluster)),
    ];
    if d.cluster.connection != ClusterConnection::NotJoined {
        l.push(kv("Fencing", fencing_state(&d.cluster.fencing)));
    }
    let running = super::running_guests(Some(d));
    l.push(kv(
        "Guests",
        format!("{running} running / {} defined", d.guests.len()),
    ));
    l.push(kv(
        "CPU / memory",
        format!(
            "{:.0}% of {} CPUs, {} / {}",
            d.stats.cpu_percent,
            d.info.cpus,
            bytes(d.stats.memory_used_bytes),
            bytes(d.stats.memory_total_bytes)
        ),
    ));
    let up = d.stats.uptime_secs;
    l.push(kv(
        "Uptime",
        format!("{}d {:02}:{:02}", up / 86400, up / 3600 % 24, up / 60 % 60),
    ));
    let first_addr = d
        .info
        .nics
        .iter()
        .flat_map(|n| n.addresses.iter())
        .find(|a| !a.contains(':'))
        .and_then(|a| a.split('/').next())
        .map(str::to_owned);
    l.push(kv(
        "API",
        first_addr
            .map(|a| format!("https://{a}:8443"))
            .unwrap_or_else(|| "no address yet".into()),
    ));
    let (first, second) = fingerprint_halves(&d.registration.node_fingerprint);
    l.push(kv("Fingerprint", first));
    l.push(kv("", second));
    l.push(Line::raw(""));
    for n in &d.info.nics {
        l.push(Line::raw(format!(
            "{:<10} {:<17} {:<5} {}",
            n.name,
            n.mac,
            if n.carrier { "up" } else { "down" },
            n.addresses.join(" ")
        )));
    }
    l
}

/// One line on the node's place in the cluster.
fn cluster_state(c: &ClusterView) -> String {
    let me = c.node_id.as_deref().unwrap_or("?");
    match c.connection {
        ClusterConnection::NotJoined => match &c.error {
            Some(e) => format!("not in a cluster ({e})"),
            None => "not in a cluster".into(),
        },
        ClusterConnection::Connecting => format!("joining as {me}"),
        ClusterConnection::Member => {
            let leader = match c.leader.as_deref() {
                Some(l) if l == me => "this node leads".to_owned(),
                Some(l) => format!("leader {l}"),
                None => "no leader yet".to_owned(),
            };
            let here = c
                .guests
                .iter()
                .filter(|g| g.node.as_deref() == Some(me))
                .count();
            let maintenance = if c.maintenance.on {
                format!(
                    ", maintenance ({})",
                    super::power::drain_summary(&c.maintenance)
                )
            } else {
                String::new()
            };
            format!(
                "{me}, one of {} nodes alive, {leader}, {here} cluster guest(s) here{maintenance}",
                c.members.len()
            )
        }
        ClusterConnection::Unreachable => format!(
            "etcd unreachable, guests keep running: {}",
            c.error.as_deref().unwrap_or("no answer")
        ),
    }
}

/// One line on the node's watchdog and guard (docs/ha.md).
fn fencing_state(f: &FencingView) -> String {
    let dog = match &f.watchdog {
        Some(w) if w.to_ascii_lowercase().contains("software") => {
            format!("watchdog {w} (softdog: no hardware watchdog found)")
        }
        Some(w) => format!("watchdog {w}"),
        None => "no watchdog".to_owned(),
    };
    let state = match f.state {
        FenceState::Unarmed => "unarmed",
        FenceState::Guarding => "guarding",
        FenceState::Doubt => "lease in doubt",
        FenceState::QuorumLost => "etcd lost by every node",
        FenceState::Fenced => "FENCED: waiting for the reset",
    };
    match &f.message {
        Some(m) => format!("{dog}, {state}: {m}"),
        None => format!("{dog}, {state}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{app, render};

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
            "not in a cluster",
        ] {
            assert!(s.contains(want), "{want:?} missing:\n{s}");
        }
    }

    #[test]
    fn the_cluster_line_says_how_the_node_stands() {
        use hvnode_api::cluster::{ClusterConnection, ClusterGuestView, ClusterView};
        let mut c = ClusterView::not_joined();
        assert_eq!(super::cluster_state(&c), "not in a cluster");
        c.connection = ClusterConnection::Member;
        c.node_id = Some("n1".into());
        c.leader = Some("n1".into());
        c.guests.push(ClusterGuestView {
            name: "web".into(),
            memory_mib: 64,
            vcpus: 1,
            desired: "running".into(),
            ha: false,
            priority: 0,
            pinned: None,
            node: Some("n1".into()),
            reason: None,
            running: true,
        });
        let line = super::cluster_state(&c);
        assert!(
            line.contains("this node leads") && line.contains("1 cluster guest(s) here"),
            "{line}"
        );
        c.leader = Some("n2".into());
        assert!(super::cluster_state(&c).contains("leader n2"));
        c.maintenance.on = true;
        c.maintenance.state = hvnode_api::cluster::MaintenanceState::Draining;
        c.maintenance.guests_left = vec!["web".into(), "db".into()];
        let line = super::cluster_state(&c);
        assert!(line.ends_with("maintenance (draining, 2 left)"), "{line}");
        c.fencing.watchdog = Some("Software Watchdog".into());
        c.fencing.state = hvnode_api::cluster::FenceState::Guarding;
        let line = super::fencing_state(&c.fencing);
        assert_eq!(
            line,
            "watchdog Software Watchdog (softdog: no hardware watchdog found), guarding"
        );
        c.fencing.watchdog = None;
        c.fencing.state = hvnode_api::cluster::FenceState::Fenced;
        c.fencing.message = Some("node n2 holds its own".into());
        let line = super::fencing_state(&c.fencing);
        assert!(
            line.starts_with("no watchdog, FENCED") && line.ends_with("n2 holds its own"),
            "{line}"
        );
        c.connection = ClusterConnection::Unreachable;
        c.error = Some("etcd unreachable: connection refused".into());
        let line = super::cluster_state(&c);
        assert!(
            line.contains("guests keep running") && line.contains("connection refused"),
            "{line}"
        );
    }
}
