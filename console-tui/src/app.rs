//! The console's shared state and its frame: the current screen, the agent's last answers, the
//! dialogs (a text field, a yes/no question), the requests in flight and the refresh timing. Each
//! screen's own state, keys, lines and field checks are in [`crate::screens`]. Pure: no I/O here,
//! so tests drive it with key events and render it into ratatui's TestBackend.
//!
//! Keys and the clock produce [`Action`]s, which the caller hands to the worker that talks to the
//! agent; the worker's [`Done`] comes back through [`App::apply`]. The App never waits for the
//! agent, so the screen keeps answering keys whatever the agent does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hvnode_api::node::NetworkView;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::symbols::border;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};
use ratatui::Frame;

use crate::client::ClientError;
use crate::screens::guests::GuestsScreen;
use crate::screens::logs::LogsScreen;
use crate::screens::manager::ManagerScreen;
use crate::screens::network::NetworkScreen;
pub use crate::screens::Screen;
use crate::screens::{self, Reaction, SCREENS};
pub use crate::state::{Action, Answer, Confirm, Done, Field, FieldKind, Refreshed, Snapshot};

/// How long after the last refresh's answer the next one is sent.
const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// ASCII borders: readable on a plain serial terminal and on the Linux console alike.
const ASCII: border::Set = border::Set {
    top_left: "+",
    top_right: "+",
    bottom_left: "+",
    bottom_right: "+",
    vertical_left: "|",
    vertical_right: "|",
    horizontal_top: "-",
    horizontal_bottom: "-",
};

/// The whole console state.
#[derive(Debug, Clone)]
pub struct App {
    /// The current screen.
    pub screen: Screen,
    /// Last data from the agent.
    pub data: Option<Snapshot>,
    /// Why the agent is unreachable, while it is.
    pub unreachable: Option<String>,
    /// Result of the last action.
    pub message: Option<String>,
    /// The field being edited.
    pub field: Option<Field>,
    /// The question being asked.
    pub confirm: Option<Confirm>,
    /// Socket path, for the banner.
    pub socket: String,
    /// The Network screen.
    pub network: NetworkScreen,
    /// The Manager screen.
    pub manager: ManagerScreen,
    /// The Guests screen.
    pub guests: GuestsScreen,
    /// The Logs screen.
    pub logs: LogsScreen,
    /// Actions sent to the agent and not answered yet, oldest first.
    pending: VecDeque<Action>,
    /// Whether a refresh is on its way, so that a slow agent never gets a second one.
    refreshing: bool,
    /// When the next refresh is due; `None` is now.
    next_refresh: Option<Instant>,
}

impl App {
    /// A console for the agent on `socket`, before any data arrived.
    pub fn new(socket: &str) -> App {
        App {
            screen: Screen::Status,
            data: None,
            unreachable: None,
            message: None,
            field: None,
            confirm: None,
            socket: socket.to_owned(),
            network: NetworkScreen::default(),
            manager: ManagerScreen::default(),
            guests: GuestsScreen::default(),
            logs: LogsScreen::default(),
            pending: VecDeque::new(),
            refreshing: false,
            next_refresh: None,
        }
    }

    /// What the agent is working on for the user, if anything: the oldest unanswered action.
    pub fn busy(&self) -> Option<&Action> {
        self.pending.front()
    }

    /// The refresh, when one is due and none is on its way. Every action returned here and by
    /// [`App::on_key`] must reach the worker, and its [`Done`] come back to [`App::apply`].
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        if self.refreshing || self.next_refresh.is_some_and(|t| now < t) {
            return Vec::new();
        }
        self.refreshing = true;
        vec![Action::Refresh {
            node_log: self.screen == Screen::Logs && self.logs.shows_node_log(),
        }]
    }

    /// Takes the agent's answer to an action at `now`.
    pub fn apply(&mut self, done: Done, now: Instant) {
        if let Action::Refresh { .. } = done.action {
            self.refreshing = false;
            self.next_refresh = Some(now + REFRESH_EVERY);
            match done.result {
                Ok(Answer::Refreshed(r)) => self.refreshed(*r, now),
                Ok(_) => {}
                Err(e) => self.failed_refresh(e),
            }
            return;
        }
        if let Some(i) = self.pending.iter().position(|a| *a == done.action) {
            self.pending.remove(i);
        }
        // The worker answers in order, so a refresh still on its way was sent after this
        // action and shows its effect; otherwise the next one goes out at once.
        self.next_refresh = None;
        let answer = match done.result {
            Ok(a) => a,
            Err(e) => {
                self.message = Some(format!("Failed: {e}"));
                return;
            }
        };
        let mut text = match &done.action {
            Action::ApplyNetwork(_) => {
                "Applied: it rolls back in 60 s unless you press c to keep it.".to_owned()
            }
            Action::ConfirmNetwork => "Kept: the change is saved in node.toml.".to_owned(),
            Action::RollbackNetwork => "Rolled back to the saved configuration.".to_owned(),
            _ => "Done.".to_owned(),
        };
        match answer {
            Answer::Network(view) => self.set_network(*view, now),
            Answer::Candidate(c) => self.manager.candidate = Some(c),
            Answer::Guest(g) => {
                text = format!("Done: {} is {}.", g.spec.name, g.state.as_str());
                if let Some(old) = self
                    .data
                    .as_mut()
                    .and_then(|d| d.guests.iter_mut().find(|o| o.spec.name == g.spec.name))
                {
                    *old = *g;
                }
            }
            Answer::Text(t) => {
                let title = match &done.action {
                    Action::GuestConsole(name) => format!("Console of {name}"),
                    _ => self.logs.title.clone(),
                };
                self.logs.show(title, t);
                self.screen = Screen::Logs;
            }
            Answer::Done | Answer::Refreshed(_) => {}
        }
        self.message = Some(text);
    }

    fn refreshed(&mut self, r: Refreshed, now: Instant) {
        self.unreachable = None;
        match r.snapshot {
            Ok(s) => {
                self.guests.clamp(s.guests.len());
                self.data = Some(s);
            }
            Err(e) => self.failed_refresh(e),
        }
        match r.network {
            Ok(v) => self.set_network(v, now),
            Err(ClientError::Unreachable(_, why)) => self.unreachable = Some(why),
            Err(e) => self.network.error = Some(e.to_string()),
        }
        // A console log opened meanwhile is not replaced by the node log.
        if let Some(Ok(t)) = r.node_log {
            if self.logs.shows_node_log() {
                self.logs.text = t;
            }
        }
    }

    fn failed_refresh(&mut self, e: ClientError) {
        match e {
            ClientError::Unreachable(_, why) => self.unreachable = Some(why),
            e => self.message = Some(e.to_string()),
        }
    }

    /// Takes a network view the agent returned at `now` (see [`NetworkScreen::set_view`]).
    pub fn set_network(&mut self, view: NetworkView, now: Instant) {
        self.network.set_view(view, now);
    }

    /// Advances the clock-driven parts (the rollback countdown) to `now`.
    pub fn tick(&mut self, now: Instant) {
        self.network.tick(now);
    }

    fn switch(&mut self, screen: Screen) {
        self.screen = screen;
        self.message = None;
        self.next_refresh = None;
        if screen == Screen::Logs {
            self.logs.node_log();
        }
    }

    /// Handles a key; returns the agent requests it causes.
    pub fn on_key(&mut self, key: KeyEvent) -> Vec<Action> {
        let actions = self.key(key);
        self.pending.extend(actions.iter().cloned());
        actions
    }

    /// Dialogs first (a question, the network form, a field), then the keys that switch
    /// screens, then the current screen's own keys.
    fn key(&mut self, key: KeyEvent) -> Vec<Action> {
        if let Some(c) = self.confirm.take() {
            return match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') | KeyCode::Enter => vec![c.action],
                KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => Vec::new(),
                _ => {
                    self.confirm = Some(c);
                    Vec::new()
                }
            };
        }
        if let Some(reaction) = self.network.form_key(key) {
            return self.react(reaction);
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if let Some(mut f) = self.field.take() {
            match key.code {
                KeyCode::Esc => return Vec::new(),
                // Serial terminals send ^H for Backspace; ^U clears the field as in a shell.
                KeyCode::Backspace => {
                    f.value.pop();
                }
                KeyCode::Char('h') if ctrl => {
                    f.value.pop();
                }
                KeyCode::Char('u') if ctrl => f.value.clear(),
                KeyCode::Char(ch) if !ctrl && f.value.len() < 253 => f.value.push(ch),
                KeyCode::Enter => match submit(&f) {
                    Ok(action) => return vec![action],
                    Err(e) => f.error = Some(e),
                },
                _ => {}
            }
            self.field = Some(f);
            return Vec::new();
        }
        let idx = SCREENS
            .iter()
            .position(|(s, _)| *s == self.screen)
            .unwrap_or(0);
        let target = match key.code {
            KeyCode::Char(c @ '1'..='7') => Some((c as u8 - b'1') as usize),
            KeyCode::F(n @ 1..=7) => Some((n - 1) as usize),
            KeyCode::Tab => Some((idx + 1) % SCREENS.len()),
            KeyCode::BackTab => Some((idx + SCREENS.len() - 1) % SCREENS.len()),
            _ => None,
        };
        if let Some(i) = target {
            self.switch(SCREENS[i].0);
            return Vec::new();
        }
        if ctrl {
            return Vec::new();
        }
        let data = self.data.as_ref();
        let reaction = match self.screen {
            Screen::Status => Reaction::Nothing,
            Screen::Network => self.network.on_key(key, data),
            Screen::Manager => self.manager.on_key(key),
            Screen::Guests => self.guests.on_key(key, data),
            Screen::Storage => screens::storage::on_key(key),
            Screen::Logs => self.logs.on_key(key),
            Screen::Power => screens::power::on_key(key, data),
        };
        self.react(reaction)
    }

    fn react(&mut self, reaction: Reaction) -> Vec<Action> {
        match reaction {
            Reaction::Nothing => Vec::new(),
            Reaction::Send(a) => vec![a],
            Reaction::Ask(c) => {
                self.confirm = Some(c);
                Vec::new()
            }
            Reaction::Edit(f) => {
                self.field = Some(f);
                Vec::new()
            }
            Reaction::Say(m) => {
                self.message = m;
                Vec::new()
            }
        }
    }
}

/// The body of the current screen, for a text area of `rows` by `cols`.
fn body_lines(app: &App, rows: usize, cols: usize) -> Vec<Line<'static>> {
    let Some(d) = &app.data else {
        return vec![Line::raw("No data from the agent yet.")];
    };
    match app.screen {
        Screen::Status => screens::status::lines(d),
        Screen::Network => match &app.network.form {
            Some(form) => form.lines(),
            None => app.network.lines(d),
        },
        Screen::Manager => app.manager.lines(d),
        Screen::Guests => app.guests.lines(d, rows, cols),
        Screen::Storage => screens::storage::lines(d),
        Screen::Logs => app.logs.lines(rows, cols),
        Screen::Power => screens::power::lines(d),
    }
}

/// Checks a field with the rules of the screen that opened it: the action to send, or the
/// inline error.
fn submit(f: &Field) -> Result<Action, String> {
    let v = f.value.trim().to_owned();
    match &f.kind {
        FieldKind::Hostname => screens::network::hostname(v),
        FieldKind::ManagerUrl => screens::manager::manager_url(v),
        FieldKind::StorageDevice => screens::storage::device(v),
        FieldKind::InstallDisk => screens::storage::install_disk(v),
        FieldKind::SnapshotName(guest) => screens::guests::snapshot_name(guest, v),
    }
}

/// Draws the whole console.
pub fn draw(frame: &mut Frame, app: &App) {
    let area = frame.area();
    let [tabs, banner, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(2),
    ])
    .areas(area);
    let mut spans = Vec::new();
    for (i, (s, name)) in SCREENS.iter().enumerate() {
        let text = if *s == app.screen {
            format!(">{} {}<", i + 1, name)
        } else {
            format!(" {} {} ", i + 1, name)
        };
        let style = if *s == app.screen {
            Style::default().add_modifier(Modifier::REVERSED)
        } else {
            Style::default()
        };
        spans.push(Span::styled(text, style));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), tabs);
    let banner_text = match (&app.unreachable, app.busy()) {
        (Some(why), _) => format!("Agent unreachable at {}: retrying... ({why})", app.socket),
        (None, Some(action)) => action.label(),
        (None, None) => app.message.clone().unwrap_or_default(),
    };
    let banner_style = if app.unreachable.is_some() {
        Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD)
    } else {
        Style::default()
    };
    frame.render_widget(Paragraph::new(banner_text).style(banner_style), banner);
    let title = SCREENS
        .iter()
        .find(|(s, _)| *s == app.screen)
        .map(|(_, n)| match app.screen {
            Screen::Logs => app.logs.title.clone(),
            Screen::Network => app.network.title().unwrap_or_else(|| (*n).to_owned()),
            _ => (*n).to_owned(),
        })
        .unwrap_or_default();
    let block = Block::default()
        .borders(Borders::ALL)
        .border_set(ASCII)
        .title(format!(" hvnode: {title} "));
    frame.render_widget(
        Paragraph::new(body_lines(
            app,
            usize::from(body.height.saturating_sub(2)),
            usize::from(body.width.saturating_sub(2)),
        ))
        .block(block)
        .wrap(Wrap { trim: false }),
        body,
    );
    let help = if app.network.form.is_some() {
        "Tab/arrows: field  Space: mode  Enter/F10: apply  Esc: cancel"
    } else {
        "1-7/F1-F7/Tab: screens  arrows: select  Enter: open  Esc: cancel"
    };
    frame.render_widget(Paragraph::new(help), foot);
    if let Some(f) = &app.field {
        dialog(
            frame,
            body,
            &format!("{}:", f.label),
            &format!("{}_", f.value),
            f.error.as_deref(),
            "Enter: apply  Esc: cancel",
        );
    } else if let Some(c) = &app.confirm {
        dialog(frame, body, &c.text, "", None, "y/Enter: yes  n/Esc: no");
    }
}

fn dialog(
    frame: &mut Frame,
    area: Rect,
    title: &str,
    value: &str,
    error: Option<&str>,
    help: &str,
) {
    let w = area.width.saturating_sub(4).min(76);
    let r = Rect::new(
        area.x + (area.width - w) / 2,
        area.y + 2,
        w,
        7.min(area.height),
    );
    let mut lines = vec![Line::raw(title.to_owned()), Line::raw(value.to_owned())];
    lines.push(Line::raw(
        error.map(|e| format!("! {e}")).unwrap_or_default(),
    ));
    lines.push(Line::raw(help.to_owned()));
    frame.render_widget(ratatui::widgets::Clear, r);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::default().borders(Borders::ALL).border_set(ASCII)),
        r,
    );
}

#[cfg(test)]
mod tests;
