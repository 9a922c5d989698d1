//! The Logs screen: the node log (read with every refresh while shown) or a guest's console
//! log (opened from the Guests screen), scrolled with the arrows, PgUp/PgDn, Home and End.

use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::text::Line;

use super::Reaction;

/// The title while the node log is shown.
pub const NODE_LOG: &str = "Node log";
/// Lines shown at once.
const ROWS: usize = 16;
/// Characters shown of each line.
const COLS: usize = 78;

/// The screen's state.
#[derive(Debug, Clone)]
pub struct LogsScreen {
    /// The text shown (node log or a guest console).
    pub text: String,
    /// Its title.
    pub title: String,
    /// Lines scrolled up from the end.
    pub scroll: usize,
}

impl Default for LogsScreen {
    fn default() -> Self {
        LogsScreen {
            text: String::new(),
            title: NODE_LOG.into(),
            scroll: 0,
        }
    }
}

impl LogsScreen {
    /// Whether the node log is shown (and so read with every refresh).
    pub fn shows_node_log(&self) -> bool {
        self.title == NODE_LOG
    }

    /// Back to the node log (on switching to the screen).
    pub fn node_log(&mut self) {
        self.title = NODE_LOG.into();
    }

    /// Shows a text under a title, scrolled to its end.
    pub fn show(&mut self, title: String, text: String) {
        self.title = title;
        self.text = text;
        self.scroll = 0;
    }

    /// The screen's keys.
    pub fn on_key(&mut self, key: KeyEvent) -> Reaction {
        match key.code {
            KeyCode::Up => self.scroll += 1,
            KeyCode::Down => self.scroll = self.scroll.saturating_sub(1),
            KeyCode::PageUp => self.scroll += 20,
            KeyCode::PageDown => self.scroll = self.scroll.saturating_sub(20),
            KeyCode::Home => self.scroll = usize::MAX / 2,
            KeyCode::End => self.scroll = 0,
            _ => {}
        }
        Reaction::Nothing
    }

    /// The screen's lines.
    pub fn lines(&self) -> Vec<Line<'static>> {
        let lines: Vec<&str> = self.text.lines().collect();
        let end = lines.len().saturating_sub(self.scroll.min(lines.len()));
        let start = end.saturating_sub(ROWS);
        lines[start..end]
            .iter()
            .map(|s| Line::raw(s.chars().take(COLS).collect::<String>()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

    use super::*;

    fn shown(l: &LogsScreen) -> Vec<String> {
        l.lines().iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn shows_the_end_and_scrolls_back_from_it() {
        let mut l = LogsScreen::default();
        let text: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        l.show("Console of web-1".into(), text);
        assert!(!l.shows_node_log());
        let s = shown(&l);
        assert_eq!(
            (s.len(), s[0].as_str(), s[15].as_str()),
            (ROWS, "line 25", "line 40")
        );
        let press = |l: &mut LogsScreen, c| l.on_key(KeyEvent::new(c, KeyModifiers::NONE));
        press(&mut l, KeyCode::Up);
        assert_eq!(shown(&l).last().map(String::as_str), Some("line 39"));
        press(&mut l, KeyCode::PageUp);
        assert_eq!(shown(&l).last().map(String::as_str), Some("line 19"));
        press(&mut l, KeyCode::End);
        assert_eq!(shown(&l).last().map(String::as_str), Some("line 40"));
        l.node_log();
        assert!(l.shows_node_log());
    }
}
