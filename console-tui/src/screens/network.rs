//! The Network screen: the host name, the management settings, gateways, DNS and each
//! interface; Up/Down selects the management network or another NIC and `e`/Enter opens its form
//! ([`crate::netform`]); `h` changes the host name. A change that was applied shows its rollback
//! countdown and what init reports, until `c` keeps it or `r` (or the countdown) rolls it back.

use std::time::{Duration, Instant};

use hvnode_api::config::{AddressMode, NetworkConfig};
use hvnode_api::node::{NetworkStatus, NetworkView};
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};

use super::{kv, Reaction};
use crate::netform::{self, NetForm, Outcome};
use crate::state::{Action, Field, FieldKind, Snapshot};

/// How the last network change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetOutcome {
    /// Confirmed and saved.
    Kept,
    /// Rolled back (on request, or because nobody confirmed it in time).
    RolledBack,
}

/// The screen's state.
#[derive(Debug, Clone, Default)]
pub struct NetworkScreen {
    /// The agent's last network view.
    pub view: Option<NetworkView>,
    /// Why the network view could not be read, if it could not.
    pub error: Option<String>,
    /// The form, while open.
    pub form: Option<NetForm>,
    /// The selected line: 0 is the management network, `n` the n-th of
    /// [`netform::selectable_nics`].
    pub selected: usize,
    /// When the pending change rolls back, by our clock.
    rollback_deadline: Option<Instant>,
    /// Whole seconds left before the pending change rolls back, as of the last tick.
    pub rollback_left: Option<u64>,
    /// The pending change last seen, to tell afterwards whether it was kept.
    watch: Option<NetworkConfig>,
    /// How the last pending change ended.
    pub outcome: Option<NetOutcome>,
}

impl NetworkScreen {
    /// Takes a network view the agent returned at `now`. A pending change that is gone was
    /// kept if the saved configuration is now what was pending, else it was rolled back.
    pub fn set_view(&mut self, view: NetworkView, now: Instant) {
        match &view.pending {
            Some(p) => {
                self.watch = Some(p.clone());
                self.outcome = None;
                self.rollback_deadline =
                    view.rollback_in_secs.map(|s| now + Duration::from_secs(s));
            }
            None => {
                if let Some(p) = self.watch.take() {
                    self.outcome = Some(if view.config == p {
                        NetOutcome::Kept
                    } else {
                        NetOutcome::RolledBack
                    });
                }
                self.rollback_deadline = None;
            }
        }
        self.view = Some(view);
        self.error = None;
        self.tick(now);
    }

    /// Advances the rollback countdown to `now`.
    pub fn tick(&mut self, now: Instant) {
        self.rollback_left = self.rollback_deadline.map(|d| {
            let left = d.saturating_duration_since(now);
            left.as_secs() + u64::from(left.subsec_nanos() > 0)
        });
    }

    /// A key for the open form: `None` when no form is open.
    pub fn form_key(&mut self, key: KeyEvent) -> Option<Reaction> {
        let form = self.form.as_mut()?;
        Some(match form.on_key(key) {
            Outcome::Editing => Reaction::Nothing,
            Outcome::Cancel => {
                self.form = None;
                Reaction::Nothing
            }
            Outcome::Submit(config) => {
                self.form = None;
                Reaction::Send(Action::ApplyNetwork(config))
            }
        })
    }

    /// The screen's keys (the form's go through [`NetworkScreen::form_key`]).
    pub fn on_key(&mut self, key: KeyEvent, data: Option<&Snapshot>) -> Reaction {
        let pending = self.view.as_ref().is_some_and(|n| n.pending.is_some());
        match key.code {
            KeyCode::Up => self.selected = self.selected.saturating_sub(1),
            KeyCode::Down => {
                let n = self
                    .view
                    .as_ref()
                    .map_or(0, |v| netform::selectable_nics(v).len());
                self.selected = (self.selected + 1).min(n);
            }
            KeyCode::Char('e') | KeyCode::Enter => {
                let Some(view) = &self.view else {
                    return Reaction::Say(Some(
                        "The agent has not reported the network configuration yet.".into(),
                    ));
                };
                self.form = Some(match selected_nic(view, self.selected) {
                    Some(nic) => NetForm::for_interface(view, &nic),
                    None => NetForm::new(view),
                });
                return Reaction::Say(None);
            }
            KeyCode::Char('c') if pending => return Reaction::Send(Action::ConfirmNetwork),
            KeyCode::Char('r') if pending => return Reaction::Send(Action::RollbackNetwork),
            KeyCode::Char('h') => {
                let current = data.map(|d| d.info.hostname.clone()).unwrap_or_default();
                return Reaction::Edit(Field::new(FieldKind::Hostname, "Host name", current));
            }
            _ => {}
        }
        Reaction::Nothing
    }

    /// The screen's title: the form's while it is open.
    pub fn title(&self) -> Option<String> {
        self.form.as_ref().map(NetForm::title)
    }

    /// The screen's lines (without the form).
    pub fn lines(&self, d: &Snapshot) -> Vec<Line<'static>> {
        let mut l = vec![kv("Host name", d.info.hostname.clone())];
        let selected = self
            .view
            .as_ref()
            .and_then(|v| selected_nic(v, self.selected));
        let selectable = self
            .view
            .as_ref()
            .map(netform::selectable_nics)
            .unwrap_or_default();
        let marker = |on: bool| if on { "> " } else { "  " };
        let nics = match &self.view {
            Some(v) => {
                l.push(Line::from(vec![
                    Span::raw(marker(selected.is_none())),
                    Span::styled(
                        format!("{:<16}", "Management"),
                        Style::default().add_modifier(Modifier::BOLD),
                    ),
                    Span::raw(summary(&v.config)),
                ]));
                l.push(kv("Gateways", v.status.gateways.join(" ")));
                l.push(kv("DNS", v.status.dns.join(" ")));
                &v.status.interfaces
            }
            None => {
                if let Some(e) = &self.error {
                    l.push(Line::raw(format!("Network configuration unavailable: {e}")));
                }
                &d.info.nics
            }
        };
        l.push(Line::raw(""));
        for n in nics {
            let on = selected.as_deref() == Some(n.name.as_str());
            let edit = if selectable.contains(&n.name) {
                "e"
            } else {
                " "
            };
            l.push(Line::raw(format!(
                "{}{edit} {:<10} {:<5} {:<7} {}",
                marker(on),
                n.name,
                if n.carrier { "up" } else { "down" },
                format!("{:?}", n.source).to_lowercase(),
                n.addresses.join(" ")
            )));
        }
        l.push(Line::raw(""));
        let bold = Style::default().add_modifier(Modifier::BOLD);
        if let Some(v) = &self.view {
            if let Some(p) = &v.pending {
                l.push(kv("Pending change", summary(p)));
                let text = match self.rollback_left {
                    Some(0) | None => "Rolling back now...".to_owned(),
                    Some(n) => format!("Rolls back in {n} s - press c to keep, r to roll back"),
                };
                l.push(Line::styled(text, bold));
                l.push(Line::raw(connectivity(p, &v.status)));
            } else {
                match self.outcome {
                    Some(NetOutcome::Kept) => l.push(Line::styled(
                        "The change was kept and saved in node.toml.",
                        bold,
                    )),
                    Some(NetOutcome::RolledBack) => {
                        l.push(Line::styled(
                            "The change was rolled back: the saved configuration is in force.",
                            bold,
                        ));
                        l.push(Line::raw(connectivity(&v.config, &v.status)));
                    }
                    None => {}
                }
            }
        }
        l.push(Line::raw(""));
        if !selectable.is_empty() {
            l.push(Line::raw(
                "Up/Down: select the management network or a NIC marked e",
            ));
        }
        l.push(Line::raw(match &selected {
            Some(nic) => format!("e/Enter: edit {nic}   h: change the host name"),
            None => "e/Enter: edit the management network   h: change the host name".to_owned(),
        }));
        l
    }
}

/// The host name field's text checked: the request, or the inline error.
pub fn hostname(v: String) -> Result<Action, String> {
    hvnode_api::config::validate_hostname(&v)
        .map(|_| Action::SetHostname(v))
        .map_err(|e| e.to_string())
}

/// The NIC on the Network screen's selected line; `None` for the management line (also
/// when the NIC list shrank under the selection).
fn selected_nic(view: &NetworkView, selected: usize) -> Option<String> {
    selected
        .checked_sub(1)
        .and_then(|i| netform::selectable_nics(view).into_iter().nth(i))
}

/// One line on a network configuration's management settings.
fn summary(c: &NetworkConfig) -> String {
    let Some(m) = c.management.as_deref() else {
        return "first NIC with a link, DHCP".into();
    };
    let entry = netform::management_entry(c, m);
    let device = netform::settings_device(c, m, entry.and_then(|e| e.vlan));
    let mut s = format!("{device}: ");
    match entry {
        Some(e) if e.mode == AddressMode::Static => {
            s.push_str(&format!("static {}", e.addresses.join(" ")));
            let gws: Vec<String> = e
                .gateway4
                .iter()
                .chain(e.gateway6.iter())
                .map(|g| g.to_string())
                .collect();
            if !gws.is_empty() {
                s.push_str(&format!(" via {}", gws.join(" ")));
            }
        }
        _ => s.push_str("DHCP"),
    }
    if let Some(b) = c.bonds.iter().find(|b| b.name == m) {
        s.push_str(&format!(", bond of {}", b.members.join("+")));
    }
    if !c.dns.is_empty() {
        let dns: Vec<String> = c.dns.iter().map(|d| d.to_string()).collect();
        s.push_str(&format!(", DNS {}", dns.join(" ")));
    }
    s
}

/// What init reports about a change: its addresses present and its default routes in place.
fn connectivity(c: &NetworkConfig, status: &NetworkStatus) -> String {
    let Some(m) = c.management.as_deref() else {
        return String::new();
    };
    let entry = netform::management_entry(c, m);
    let device = netform::settings_device(c, m, entry.and_then(|e| e.vlan));
    let mut parts = Vec::new();
    match entry {
        Some(e) if e.mode == AddressMode::Static => {
            for a in &e.addresses {
                let on = status
                    .interfaces
                    .iter()
                    .find(|i| i.addresses.contains(a))
                    .map(|i| i.name.clone());
                parts.push(match on {
                    Some(dev) => format!("{a} is up on {dev}"),
                    None => format!("{a} is on no interface yet"),
                });
            }
            for g in e.gateway4.iter().chain(e.gateway6.iter()) {
                let g = g.to_string();
                parts.push(if status.gateways.contains(&g) {
                    format!("default route via {g} in place")
                } else {
                    format!("no default route via {g}")
                });
            }
        }
        _ => {
            let addrs = status
                .interfaces
                .iter()
                .find(|i| i.name == device)
                .map(|i| i.addresses.join(" "))
                .unwrap_or_default();
            parts.push(if addrs.is_empty() {
                format!("{device} has no address yet (waiting for DHCP)")
            } else {
                format!("{device} has {addrs}")
            });
        }
    }
    format!("Check: {}", parts.join("; "))
}

#[cfg(test)]
mod tests;
