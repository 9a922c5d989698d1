//! The console's screens, one module each with its own state, keys and drawing. A screen
//! reads the agent's last [`Snapshot`] and answers a key with a [`Reaction`]: what the App
//! should do (send a request, ask a question, open a field); it never talks to the agent.
//!
//! - [`status`]: node status at a glance.
//! - [`network`]: host name, the network configuration and its pending change; the form.
//! - [`manager`]: registration: pairing code, fingerprint, node-initiated registration.
//! - [`guests`]: the guest list, the selected guest, its operations.
//! - [`storage`]: the data partition and blank disks.
//! - [`logs`]: the node log or a guest's console log, scrolled.
//! - [`power`]: reboot, power off and maintenance mode.

pub mod guests;
pub mod logs;
pub mod manager;
pub mod network;
pub mod power;
pub mod status;
pub mod storage;

use hvnode_api::guest::GuestState;
use hvnode_api::registration::{RegistrationState, RegistrationStatus};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};

use crate::state::{Action, Confirm, Field, Snapshot};

/// The screens, in tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    /// Node status.
    Status,
    /// Host name and network.
    Network,
    /// Manager registration.
    Manager,
    /// Guests.
    Guests,
    /// Data partition.
    Storage,
    /// Node log.
    Logs,
    /// Reboot and power off.
    Power,
}

/// The screens in tab order with their names (the tab bar, digits and F-keys follow it).
pub const SCREENS: [(Screen, &str); 7] = [
    (Screen::Status, "Status"),
    (Screen::Network, "Network"),
    (Screen::Manager, "Manager"),
    (Screen::Guests, "Guests"),
    (Screen::Storage, "Storage"),
    (Screen::Logs, "Logs"),
    (Screen::Power, "Power"),
];

/// What a screen asks of the App after a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Reaction {
    /// Nothing beyond the screen's own state.
    Nothing,
    /// Send a request to the agent.
    Send(Action),
    /// Ask a yes/no question first.
    Ask(Confirm),
    /// Open a text field.
    Edit(Field),
    /// Replace the banner's message (`None` clears it).
    Say(Option<String>),
}

/// Guests with a VMM that runs them (running, paused, or moving to or from another node).
pub fn running_guests(data: Option<&Snapshot>) -> usize {
    data.map_or(0, |d| {
        d.guests
            .iter()
            .filter(|g| {
                matches!(
                    g.state,
                    GuestState::Running | GuestState::Paused | GuestState::Migrating
                )
            })
            .count()
    })
}

/// A fingerprint in two halves of 16 pairs (47 characters each): readable on an 80-column
/// screen beside its label, where the whole 95 characters would be cut.
pub fn fingerprint_halves(fp: &str) -> (String, String) {
    (fp.chars().take(47).collect(), fp.chars().skip(48).collect())
}

/// A bold label and its value.
pub fn kv(k: &str, v: impl Into<String>) -> Line<'static> {
    Line::from(vec![
        Span::styled(
            format!("{k:<18}"),
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::raw(v.into()),
    ])
}

/// The registration as one line.
pub fn reg_state(r: &RegistrationStatus) -> String {
    match r.state {
        RegistrationState::Unregistered => "Unregistered".into(),
        RegistrationState::Pending => format!(
            "Pending approval by {}",
            r.manager_name.as_deref().unwrap_or("the manager")
        ),
        RegistrationState::Registered => format!(
            "Registered with {}",
            r.manager_name.as_deref().unwrap_or("a manager")
        ),
    }
}
