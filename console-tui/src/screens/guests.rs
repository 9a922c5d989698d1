//! The Guests screen: the guest list with states, the selected guest's vCPUs, memory, uptime,
//! disks and NICs (and why it crashed); `s` start, `t` stop, `d` shut down and `r` reboot (the last
//! three confirmed), `p` pause or resume, Enter its console log.

use hvnode_api::guest::{GuestState, GuestStatus};
use hvnode_api::routes::GuestAction;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};

use super::Reaction;
use crate::state::{Action, Confirm, Field, FieldKind, Snapshot};

/// The screen's state.
#[derive(Debug, Clone, Default)]
pub struct GuestsScreen {
    /// The selected guest's index in the list.
    pub selected: usize,
}

impl GuestsScreen {
    /// Keeps the selection inside a list of `n` guests.
    pub fn clamp(&mut self, n: usize) {
        self.selected = self.selected.min(n.saturating_sub(1));
    }

    fn selected_guest<'a>(&self, data: Option<&'a Snapshot>) -> Option<&'a GuestStatus> {
        data.and_then(|d| d.guests.get(self.selected))
    }

    /// The screen's keys.
    pub fn on_key(&mut self, key: KeyEvent, data: Option<&Snapshot>) -> Reaction {
        let name = self.selected_guest(data).map(|g| g.spec.name.clone());
        match (key.code, name) {
            (KeyCode::Up, _) => self.selected = self.selected.saturating_sub(1),
            (KeyCode::Down, _) => {
                let n = data.map_or(0, |d| d.guests.len());
                if self.selected + 1 < n {
                    self.selected += 1;
                }
            }
            (KeyCode::Char('s'), Some(g)) => {
                return Reaction::Send(Action::Guest(g, GuestAction::Start))
            }
            (KeyCode::Char(c @ ('t' | 'd' | 'r')), Some(g)) => {
                let (op, text) = match c {
                    't' => (
                        GuestAction::Stop,
                        format!("Stop (power off at once) guest {g}?"),
                    ),
                    'd' => (GuestAction::Shutdown, format!("Shut down guest {g}?")),
                    _ => (
                        GuestAction::Reboot,
                        format!("Reboot guest {g}? It shuts down and starts again."),
                    ),
                };
                return Reaction::Ask(Confirm {
                    text,
                    action: Action::Guest(g, op),
                });
            }
            (KeyCode::Char('p'), Some(g)) => {
                // Anything but a paused guest is asked to pause: the agent says why a stopped
                // one cannot.
                let paused = self
                    .selected_guest(data)
                    .is_some_and(|s| s.state == GuestState::Paused);
                let op = if paused {
                    GuestAction::Resume
                } else {
                    GuestAction::Pause
                };
                return Reaction::Send(Action::Guest(g, op));
            }
            (KeyCode::Enter, Some(g)) => return Reaction::Send(Action::GuestConsole(g)),
            (KeyCode::Char('S'), Some(g)) => {
                return Reaction::Edit(Field::new(
                    FieldKind::SnapshotName(g),
                    "Snapshot name",
                    String::new(),
                ))
            }
            (KeyCode::Char('R'), Some(g)) => {
                let newest = self
                    .selected_guest(data)
                    .and_then(|s| s.snapshots.last().cloned());
                return match newest {
                    Some(snap) => Reaction::Ask(Confirm {
                        text: format!(
                            "Restore guest {g} from snapshot {snap}? It resumes where it was then."
                        ),
                        action: Action::Restore(g, snap),
                    }),
                    None => Reaction::Say(Some(format!("Guest {g} has no snapshot."))),
                };
            }
            _ => {}
        }
        Reaction::Nothing
    }

    /// The guest list, the selected guest's detail and the keys, in `rows` by `cols`: a list
    /// longer than what the detail leaves shows a window that keeps the selected guest in view.
    pub fn lines(&self, d: &Snapshot, rows: usize, cols: usize) -> Vec<Line<'static>> {
        let help = Line::raw(
            "s: start  t: stop  d: shut down  r: reboot  p: pause/resume  Enter: console",
        );
        let snap_help = Line::raw("S: take a snapshot  R: restore the newest snapshot");
        let detail = d
            .guests
            .get(self.selected)
            .map(guest_detail)
            .unwrap_or_default();
        let tall = |l: &Line| l.width().div_ceil(cols.max(1)).max(1);
        // The column heads, the blank line and the two lines of keys.
        let fixed: usize =
            4 + usize::from(!detail.is_empty()) + detail.iter().map(tall).sum::<usize>();
        let room = rows.saturating_sub(fixed).max(1);
        let first = (self.selected + 1).saturating_sub(room);
        let mut l = vec![Line::raw(format!(
            "  {:<24} {:<13} {:>5} {:>9}",
            "NAME", "STATE", "VCPUS", "MEMORY"
        ))];
        for (i, g) in d.guests.iter().enumerate().skip(first).take(room) {
            let text = format!(
                "{} {:<24} {:<13} {:>5} {:>6} MiB",
                if i == self.selected { '>' } else { ' ' },
                g.spec.name,
                g.state.as_str(),
                g.spec.vcpus,
                g.spec.memory_mib
            );
            let style = if i == self.selected {
                Style::default().add_modifier(Modifier::REVERSED)
            } else {
                Style::default()
            };
            l.push(Line::styled(text, style));
        }
        if d.guests.is_empty() {
            l.push(Line::raw("  No guests defined."));
        }
        if !detail.is_empty() {
            l.push(Line::raw(""));
            l.extend(detail);
        }
        l.push(Line::raw(""));
        l.push(help);
        l.push(snap_help);
        l
    }
}

/// The snapshot name field's text checked for `guest`: a snapshot is named as a guest is.
pub fn snapshot_name(guest: &str, v: String) -> Result<Action, String> {
    hvnode_api::guest::validate_name(&v)
        .map(|_| Action::Snapshot(guest.to_owned(), v))
        .map_err(|_| "Use lower-case letters, digits, - and _ (up to 63)".to_owned())
}

/// The selected guest's definition and runtime facts, below the list.
fn guest_detail(g: &GuestStatus) -> Vec<Line<'static>> {
    let label = |k: &str| {
        Span::styled(
            format!("  {k:<8}"),
            Style::default().add_modifier(Modifier::BOLD),
        )
    };
    let uptime = match g.uptime_secs {
        Some(s) if s >= 86400 => format!(
            "up {}d {:02}:{:02}:{:02}",
            s / 86400,
            s / 3600 % 24,
            s / 60 % 60,
            s % 60
        ),
        Some(s) => format!("up {:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60),
        None => "not running".into(),
    };
    let disks: Vec<String> = g
        .spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            // The VMM names them in order, as the guest sees them.
            let dev = char::from(b'a' + (i % 26) as u8);
            let ro = if d.read_only { " (read-only)" } else { "" };
            format!("vd{dev} {}{ro}", d.path)
        })
        .collect();
    let nics: Vec<String> = g
        .spec
        .nics
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{} {}", n.bridge, n.mac_for(&g.spec.name, i)))
        .collect();
    let none = |v: Vec<String>| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    let mut l = vec![
        Line::from(vec![
            label(&g.spec.name),
            Span::raw(format!(
                " {} vCPU(s), {} MiB, {uptime}",
                g.spec.vcpus, g.spec.memory_mib
            )),
        ]),
        Line::from(vec![label("Disks"), Span::raw(none(disks))]),
        Line::from(vec![label("NICs"), Span::raw(none(nics))]),
    ];
    if !g.snapshots.is_empty() {
        l.push(Line::from(vec![
            label("Snapshots"),
            Span::raw(format!(" {}", g.snapshots.join(", "))),
        ]));
    }
    if let Some(why) = &g.crash_reason {
        l.push(Line::raw(format!("  Crashed: {why}")));
    }
    l
}

#[cfg(test)]
mod tests;
