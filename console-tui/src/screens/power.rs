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
