//! The Guests screen through the App: the list and the selected guest's detail, the operations
//! and their confirmations, and how an answer or an error shows.

use std::time::Instant;

use hvnode_api::guest::{DiskSpec, GuestState, NicSpec};
use hvnode_api::routes::GuestAction;
use ratatui::crossterm::event::KeyCode;

use crate::app::{Action, Answer, App, Done, Screen};
use crate::client::ClientError;
use crate::testing::{app, banner, key, render, snapshot};

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

#[test]
fn a_migrating_guest_shows_as_such_and_counts_as_running() {
    let mut a = app();
    set_state(&mut a, 1, GuestState::Migrating);
    a.on_key(key(KeyCode::Char('4')));
    let s = render(&a);
    assert!(s.contains("migrating"), "{s}");
    assert_eq!(super::super::running_guests(a.data.as_ref()), 2);
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
fn guests_screen_takes_a_named_snapshot_and_restores_the_newest_after_confirmation() {
    let mut a = guests_app();
    a.on_key(key(KeyCode::Char('R')));
    assert!(a.confirm.is_none(), "nothing to restore without a snapshot");
    assert_eq!(a.message.as_deref(), Some("Guest web-1 has no snapshot."));

    a.on_key(key(KeyCode::Char('S')));
    for c in "Bad Name".chars() {
        a.on_key(key(KeyCode::Char(c)));
    }
    assert!(
        a.on_key(key(KeyCode::Enter)).is_empty(),
        "an invalid name is refused"
    );
    for _ in 0.."Bad Name".len() {
        a.on_key(key(KeyCode::Backspace));
    }
    for c in "before-upgrade".chars() {
        a.on_key(key(KeyCode::Char(c)));
    }
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
