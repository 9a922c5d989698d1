//! The frame and the shared state through keys and answers: switching screens, the
//! unreachable-agent banner over every screen, and the refresh timing.

use std::time::{Duration, Instant};

use ratatui::crossterm::event::KeyCode;

use super::{Action, Answer, App, Done, Refreshed, Screen};
use crate::client::ClientError;
use crate::testing::{app, banner, key, net_app, network_view, render, snapshot};

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
