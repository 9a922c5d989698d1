//! The Logs screen: the node log (read with every refresh while shown) or a guest's console
//! log (opened from the Guests screen), as many lines as the screen has room for, scrolled with
//! the arrows, PgUp/PgDn (a screenful), Home (the first line) and End (the last).

use std::cell::Cell;

use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::text::Line;

use super::Reaction;

/// The title while the node log is shown.
pub const NODE_LOG: &str = "Node log";
/// Lines shown at once before the first drawing says how many fit.
const ROWS: usize = 16;

/// The screen's state.
#[derive(Debug, Clone)]
pub struct LogsScreen {
    /// The text shown (node log or a guest console).
    pub text: String,
    /// Its title.
    pub title: String,
    /// Lines scrolled up from the end.
    pub scroll: usize,
    /// Lines the last drawing had room for: the keys scroll by it and no further than the top.
    rows: Cell<usize>,
}

impl Default for LogsScreen {
    fn default() -> Self {
        LogsScreen {
            text: String::new(),
            title: NODE_LOG.into(),
            scroll: 0,
            rows: Cell::new(ROWS),
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

    /// The furthest scroll: the first line at the top of the screen.
    fn top(&self) -> usize {
        self.text.lines().count().saturating_sub(self.rows.get())
    }

    /// The screen's keys.
    pub fn on_key(&mut self, key: KeyEvent) -> Reaction {
        let page = self.rows.get().saturating_sub(1).max(1);
        let top = self.top();
        self.scroll = match key.code {
            KeyCode::Up => (self.scroll + 1).min(top),
            KeyCode::Down => self.scroll.saturating_sub(1),
            KeyCode::PageUp => (self.scroll + page).min(top),
            KeyCode::PageDown => self.scroll.saturating_sub(page),
            KeyCode::Home => top,
            KeyCode::End => 0,
            _ => self.scroll,
        };
        Reaction::Nothing
    }

    /// The screen's lines for a text area of `rows` by `cols` (a log shorter than that, or a
    /// scroll past its top after the log shrank, shows from its first line).
    pub fn lines(&self, rows: usize, cols: usize) -> Vec<Line<'static>> {
        self.rows.set(rows.max(1));
        let lines: Vec<&str> = self.text.lines().collect();
        let end = lines.len() - self.scroll.min(self.top());
        let start = end.saturating_sub(self.rows.get());
        lines[start..end]
            .iter()
            .map(|s| Line::raw(s.chars().take(cols).collect::<String>()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

    use super::*;

    fn shown(l: &LogsScreen) -> Vec<String> {
        l.lines(ROWS, 78).iter().map(|l| l.to_string()).collect()
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
        assert_eq!(
            shown(&l).last().map(String::as_str),
            Some("line 24"),
            "a page is a screenful less one line"
        );
        press(&mut l, KeyCode::End);
        assert_eq!(shown(&l).last().map(String::as_str), Some("line 40"));
        l.node_log();
        assert!(l.shows_node_log());
    }

    #[test]
    fn home_shows_the_first_line_and_scrolling_stops_there() {
        let mut l = LogsScreen::default();
        let text: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        l.show("Node log".into(), text);
        let press = |l: &mut LogsScreen, c| l.on_key(KeyEvent::new(c, KeyModifiers::NONE));
        shown(&l);
        press(&mut l, KeyCode::Home);
        let s = shown(&l);
        assert_eq!((s[0].as_str(), s.len()), ("line 1", ROWS));
        // Past the top nothing moves, and one Down moves at once.
        for _ in 0..50 {
            press(&mut l, KeyCode::Up);
        }
        press(&mut l, KeyCode::Down);
        assert_eq!(shown(&l)[0], "line 2");
        // A taller screen shows more lines and pages by its height.
        let tall: Vec<String> = l.lines(30, 78).iter().map(|l| l.to_string()).collect();
        assert_eq!(tall.len(), 30);
        press(&mut l, KeyCode::End);
        press(&mut l, KeyCode::PageUp);
        let s: Vec<String> = l.lines(30, 78).iter().map(|l| l.to_string()).collect();
        assert_eq!(
            (s[0].as_str(), s.last().map(String::as_str)),
            ("line 1", Some("line 30")),
            "29 lines up would pass the top: it stops there"
        );
        assert!(l.shows_node_log());
    }
}
