//! The Power screen: `r` reboots and `o` powers off the node, each after a confirmation that
//! says how many guests are running (they are shut down first).

use hvnode_api::node::PowerAction;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::text::Line;

use super::Reaction;
use crate::state::{Action, Confirm};

/// The screen's keys; `running` guests are named in the question.
pub fn on_key(key: KeyEvent, running: usize) -> Reaction {
    let (what, action) = match key.code {
        KeyCode::Char('r') => ("Reboot", PowerAction::Reboot),
        KeyCode::Char('o') => ("Power off", PowerAction::Poweroff),
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

/// The screen's lines.
pub fn lines(running: usize) -> Vec<Line<'static>> {
    vec![
        Line::raw(format!("{running} guest(s) running.")),
        Line::raw(""),
        Line::raw("r: reboot the node   o: power off the node"),
        Line::raw("Guests are shut down first; both ask for confirmation."),
    ]
}

#[cfg(test)]
mod tests {
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
}
