//! The Power screen: `r` reboots and `o` powers off the node, each after a confirmation that
//! says how many guests are running (they are shut down first); `m` turns maintenance mode on
//! or off (a confirmation too), and the screen shows the drain's progress (docs/maintenance.md).

use hvnode_api::cluster::{ClusterConnection, DrainAction, MaintenanceState, MaintenanceView};
use hvnode_api::node::PowerAction;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::text::Line;

use super::{kv, running_guests, Reaction};
use crate::state::{Action, Confirm, Snapshot};

/// The screen's keys.
pub fn on_key(key: KeyEvent, data: Option<&Snapshot>) -> Reaction {
    let running = running_guests(data);
    let (what, action) = match key.code {
        KeyCode::Char('r') => ("Reboot", PowerAction::Reboot),
        KeyCode::Char('o') => ("Power off", PowerAction::Poweroff),
        KeyCode::Char('m') => return maintenance_key(data),
        _ => return Reaction::Nothing,
    };
    let warn = if running > 0 {
        format!(" {running} guest(s) are running and will be shut down.")
    } else {
        String::new()
    };
    Reaction::Ask(Confirm {
        text: format!("{what} the node?{warn}"),
        action: Action::Power(action),
    })
}

fn maintenance_key(data: Option<&Snapshot>) -> Reaction {
    let Some(d) = data else {
        return Reaction::Nothing;
    };
    let m = &d.cluster.maintenance;
    if m.on {
        return Reaction::Ask(Confirm {
            text: "Turn maintenance mode off? The node takes guests again.".into(),
            action: Action::Maintenance(false),
        });
    }
    if d.cluster.connection == ClusterConnection::NotJoined {
        return Reaction::Say(Some(
            "Not in a cluster: maintenance mode moves cluster guests to other nodes".into(),
        ));
    }
    let me = d.cluster.node_id.as_deref();
    let here = d
        .cluster
        .guests
        .iter()
        .filter(|g| g.node.is_some() && g.node.as_deref() == me)
        .count();
    Reaction::Ask(Confirm {
        text: format!(
            "Turn maintenance mode on? The node takes no new guests; its {here} cluster \
             guest(s) live-migrate to other nodes (one that cannot is restarted elsewhere)."
        ),
        action: Action::Maintenance(true),
    })
}

/// The drain as a few words: "off", "draining, 2 left", "drained", "stopped".
pub fn drain_summary(m: &MaintenanceView) -> String {
    match m.state {
        MaintenanceState::Draining => format!("draining, {} left", m.guests_left.len()),
        state => state.as_str().to_owned(),
    }
}

/// The screen's lines.
pub fn lines(d: &Snapshot) -> Vec<Line<'static>> {
    let running = running_guests(Some(d));
    let m = &d.cluster.maintenance;
    let mut l = vec![
        Line::raw(format!("{running} guest(s) running.")),
        Line::raw(""),
        kv(
            "Maintenance mode",
            if m.on {
                format!("on ({}, policy {})", drain_summary(m), m.policy.as_str())
            } else {
                "off".to_owned()
            },
        ),
    ];
    if m.on && !m.guests_left.is_empty() {
        l.push(kv("Guests left", m.guests_left.join(", ")));
    }
    if let Some(c) = &m.current {
        let what = match c.action {
            DrainAction::Migrating => "migrating",
            DrainAction::RestartingElsewhere => "restarting elsewhere",
        };
        l.push(kv("Now", format!("{what} {} to {}", c.guest, c.to)));
    }
    if let Some(msg) = &m.message {
        l.push(kv("", msg.clone()));
    }
    if m.state == MaintenanceState::Drained {
        l.push(kv("", "no cluster guest left: the node can be rebooted"));
    }
    l.extend([
        Line::raw(""),
        Line::raw("r: reboot the node   o: power off the node   m: maintenance mode on/off"),
        Line::raw("Guests are shut down first; each asks for confirmation."),
    ]);
    l
}

#[cfg(test)]
mod tests {
    use hvnode_api::cluster::{
        ClusterConnection, DrainAction, DrainStep, MaintenanceState, MaintenanceView,
    };
    use hvnode_api::node::PowerAction;
    use hvnode_api::routes::GuestAction;
    use ratatui::crossterm::event::KeyCode;

    use crate::state::Action;
    use crate::testing::{app, key, render};

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
    fn maintenance_mode_toggles_after_confirmation_and_shows_the_drain() {
        let mut a = app();
        a.on_key(key(KeyCode::Char('7')));
        assert!(render(&a).contains("Maintenance mode  off"));
        // Not in a cluster: nothing to drain, and the console says why.
        assert!(a.on_key(key(KeyCode::Char('m'))).is_empty());
        assert!(render(&a).contains("Not in a cluster"), "{}", render(&a));

        let d = a.data.as_mut().unwrap();
        d.cluster.connection = ClusterConnection::Member;
        d.cluster.node_id = Some("n1".into());
        a.on_key(key(KeyCode::Char('m')));
        assert!(render(&a).contains("Turn maintenance mode on?"));
        assert_eq!(
            a.on_key(key(KeyCode::Char('y'))),
            vec![Action::Maintenance(true)]
        );

        a.data.as_mut().unwrap().cluster.maintenance = MaintenanceView {
            on: true,
            state: MaintenanceState::Draining,
            guests_left: vec!["db".into(), "web".into()],
            current: Some(DrainStep {
                guest: "db".into(),
                to: "n2".into(),
                action: DrainAction::Migrating,
            }),
            ..MaintenanceView::default()
        };
        let s = render(&a);
        for want in [
            "on (draining, 2 left, policy restart)",
            "db, web",
            "migrating db to n2",
        ] {
            assert!(s.contains(want), "{want:?} missing:\n{s}");
        }
        a.on_key(key(KeyCode::Char('m')));
        assert!(render(&a).contains("Turn maintenance mode off?"));
        assert_eq!(
            a.on_key(key(KeyCode::Char('y'))),
            vec![Action::Maintenance(false)]
        );
    }
}
