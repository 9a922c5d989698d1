//! The console's state, its key handling and its rendering. Pure: no I/O here, so tests drive
//! it with key events and render it into ratatui's TestBackend.
//!
//! Keys and the clock produce [`Action`]s, which the caller hands to the worker that talks to the
//! agent; the worker's [`Done`] comes back through [`App::apply`]. The App never waits for the
//! agent, so the screen keeps answering keys whatever the agent does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hvnode_api::config::{AddressMode, NetworkConfig};
use hvnode_api::guest::{GuestState, GuestStatus};
use hvnode_api::node::{NetworkStatus, NetworkView, NodeInfo, NodeStats, PowerAction, StorageView};
use hvnode_api::registration::{ManagerCandidate, RegistrationState, RegistrationStatus};
use hvnode_api::routes::GuestAction;
use hvnode_api::units::bytes;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::symbols::border;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};
use ratatui::Frame;

use crate::client::ClientError;
use crate::netform::{self, NetForm, Outcome};

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

const SCREENS: [(Screen, &str); 7] = [
    (Screen::Status, "Status"),
    (Screen::Network, "Network"),
    (Screen::Manager, "Manager"),
    (Screen::Guests, "Guests"),
    (Screen::Storage, "Storage"),
    (Screen::Logs, "Logs"),
    (Screen::Power, "Power"),
];

/// What the agent last told us.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Registration.
    pub registration: RegistrationStatus,
    /// Node facts.
    pub info: NodeInfo,
    /// Statistics.
    pub stats: NodeStats,
    /// Guests.
    pub guests: Vec<GuestStatus>,
    /// Storage.
    pub storage: StorageView,
}

/// A request for the agent, produced by a key or, for [`Action::Refresh`], by the clock.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The periodic GETs behind every screen; with `node_log`, GET /v1/logs too.
    Refresh {
        /// Whether the Logs screen shows the node log, which is then read as well.
        node_log: bool,
    },
    /// PUT /v1/node/hostname.
    SetHostname(String),
    /// POST /v1/power.
    Power(PowerAction),
    /// POST /v1/guests/{name}/{op}.
    Guest(String, GuestAction),
    /// GET /v1/guests/{name}/console.
    GuestConsole(String),
    /// POST /v1/registration/pairing-code.
    NewPairingCode,
    /// DELETE /v1/registration.
    Unregister,
    /// POST /v1/registration/manager.
    FetchManager(String),
    /// POST /v1/registration/manager/accept.
    AcceptManager(String),
    /// POST /v1/registration/manager/reject.
    RejectManager,
    /// POST /v1/storage/init.
    InitStorage(String),
    /// PUT /v1/network.
    ApplyNetwork(NetworkConfig),
    /// POST /v1/network/confirm.
    ConfirmNetwork,
    /// POST /v1/network/rollback.
    RollbackNetwork,
}

impl Action {
    /// What the banner says while the agent works on it.
    pub fn label(&self) -> String {
        match self {
            Action::Refresh { .. } => "Reading the node's state...".into(),
            Action::SetHostname(h) => format!("Setting the host name to {h}..."),
            Action::Power(PowerAction::Reboot) => "Asking the node to reboot...".into(),
            Action::Power(PowerAction::Poweroff) => "Asking the node to power off...".into(),
            Action::Guest(name, op) => {
                let doing = match op {
                    GuestAction::Start => "Starting",
                    GuestAction::Stop => "Stopping",
                    GuestAction::Shutdown => "Shutting down",
                    GuestAction::Pause => "Pausing",
                    GuestAction::Resume => "Resuming",
                    GuestAction::Reboot => "Rebooting",
                };
                format!("{doing} {name}...")
            }
            Action::GuestConsole(name) => format!("Reading the console log of {name}..."),
            Action::NewPairingCode => "Asking for a new pairing code...".into(),
            Action::Unregister => "Unregistering from the manager...".into(),
            Action::FetchManager(url) => format!("Fetching the manager's CA from {url}..."),
            Action::AcceptManager(_) => "Sending the join request to the manager...".into(),
            Action::RejectManager => "Rejecting the manager...".into(),
            Action::InitStorage(dev) => {
                format!("Initialising {dev} as the data partition (this takes a while)...")
            }
            Action::ApplyNetwork(_) => "Applying the network change...".into(),
            Action::ConfirmNetwork => "Keeping the network change...".into(),
            Action::RollbackNetwork => "Rolling back the network change...".into(),
        }
    }
}

/// What a refresh read. After an unreachable agent the worker reads nothing more, so that a
/// hung agent costs one timeout per refresh, not one per GET.
#[derive(Debug)]
pub struct Refreshed {
    /// Registration, node, stats, guests and storage.
    pub snapshot: Result<Snapshot, ClientError>,
    /// The network view.
    pub network: Result<NetworkView, ClientError>,
    /// The node log, when asked for.
    pub node_log: Option<Result<String, ClientError>>,
}

/// The useful part of an answer.
#[derive(Debug)]
pub enum Answer {
    /// Nothing beyond success.
    Done,
    /// The answer to [`Action::Refresh`].
    Refreshed(Box<Refreshed>),
    /// The network view after a change.
    Network(Box<NetworkView>),
    /// The manager fetched for node-initiated registration.
    Candidate(ManagerCandidate),
    /// A guest after an operation.
    Guest(Box<GuestStatus>),
    /// A guest's console log.
    Text(String),
}

/// An action and how the agent answered it.
#[derive(Debug)]
pub struct Done {
    /// The action, as [`App::on_key`] or [`App::poll`] returned it.
    pub action: Action,
    /// The answer, or why there is none.
    pub result: Result<Answer, ClientError>,
}

/// How the last network change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetOutcome {
    /// Confirmed and saved.
    Kept,
    /// Rolled back (on request, or because nobody confirmed it in time).
    RolledBack,
}

/// A text field being edited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// What it is.
    pub label: &'static str,
    /// The text typed so far.
    pub value: String,
    /// The inline validation error, if the last submit was refused.
    pub error: Option<String>,
}

/// A question awaiting y/n.
#[derive(Debug, Clone, PartialEq)]
pub struct Confirm {
    /// The question.
    pub text: String,
    /// What `y` does.
    pub action: Action,
}

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
    /// The manager fetched for node-initiated registration.
    pub candidate: Option<ManagerCandidate>,
    /// Selected guest.
    pub selected: usize,
    /// Text shown on the Logs screen (node log or a guest console).
    pub log_text: String,
    /// Title of the Logs text.
    pub log_title: String,
    /// Lines scrolled up from the end.
    pub scroll: usize,
    /// Socket path, for the banner.
    pub socket: String,
    /// The agent's last network view.
    pub network: Option<NetworkView>,
    /// Why the network view could not be read, if it could not.
    pub network_error: Option<String>,
    /// The network form, while open.
    pub net_form: Option<NetForm>,
    /// The Network screen's selected line: 0 is the management network, `n` the n-th of
    /// [`netform::selectable_nics`].
    pub net_selected: usize,
    /// When the pending change rolls back, by our clock.
    rollback_deadline: Option<Instant>,
    /// Whole seconds left before the pending change rolls back, as of the last tick.
    pub rollback_left: Option<u64>,
    /// The pending change last seen, to tell afterwards whether it was kept.
    net_watch: Option<NetworkConfig>,
    /// How the last pending change ended.
    pub net_outcome: Option<NetOutcome>,
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
            candidate: None,
            selected: 0,
            log_text: String::new(),
            log_title: "Node log".into(),
            scroll: 0,
            socket: socket.to_owned(),
            network: None,
            network_error: None,
            net_form: None,
            net_selected: 0,
            rollback_deadline: None,
            rollback_left: None,
            net_watch: None,
            net_outcome: None,
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
            node_log: self.screen == Screen::Logs && self.log_title == "Node log",
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
            Answer::Candidate(c) => self.candidate = Some(c),
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
                if let Action::GuestConsole(name) = &done.action {
                    self.log_title = format!("Console of {name}");
                }
                self.log_text = t;
                self.scroll = 0;
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
                let n = s.guests.len();
                self.data = Some(s);
                self.selected = self.selected.min(n.saturating_sub(1));
            }
            Err(e) => self.failed_refresh(e),
        }
        match r.network {
            Ok(v) => self.set_network(v, now),
            Err(ClientError::Unreachable(_, why)) => self.unreachable = Some(why),
            Err(e) => self.network_error = Some(e.to_string()),
        }
        // A console log opened meanwhile is not replaced by the node log.
        if let Some(Ok(t)) = r.node_log {
            if self.log_title == "Node log" {
                self.log_text = t;
            }
        }
    }

    fn failed_refresh(&mut self, e: ClientError) {
        match e {
            ClientError::Unreachable(_, why) => self.unreachable = Some(why),
            e => self.message = Some(e.to_string()),
        }
    }

    /// Takes a network view the agent returned at `now`. A pending change that is gone was
    /// kept if the saved configuration is now what was pending, else it was rolled back.
    pub fn set_network(&mut self, view: NetworkView, now: Instant) {
        match &view.pending {
            Some(p) => {
                self.net_watch = Some(p.clone());
                self.net_outcome = None;
                self.rollback_deadline =
                    view.rollback_in_secs.map(|s| now + Duration::from_secs(s));
            }
            None => {
                if let Some(p) = self.net_watch.take() {
                    self.net_outcome = Some(if view.config == p {
                        NetOutcome::Kept
                    } else {
                        NetOutcome::RolledBack
                    });
                }
                self.rollback_deadline = None;
            }
        }
        self.network = Some(view);
        self.network_error = None;
        self.tick(now);
    }

    /// Advances the rollback countdown to `now`.
    pub fn tick(&mut self, now: Instant) {
        self.rollback_left = self.rollback_deadline.map(|d| {
            let left = d.saturating_duration_since(now);
            left.as_secs() + u64::from(left.subsec_nanos() > 0)
        });
    }

    fn running_guests(&self) -> usize {
        self.data.as_ref().map_or(0, |d| {
            d.guests
                .iter()
                .filter(|g| matches!(g.state, GuestState::Running | GuestState::Paused))
                .count()
        })
    }

    fn selected_guest(&self) -> Option<String> {
        self.data
            .as_ref()
            .and_then(|d| d.guests.get(self.selected))
            .map(|g| g.spec.name.clone())
    }

    fn switch(&mut self, screen: Screen) {
        self.screen = screen;
        self.message = None;
        self.next_refresh = None;
        if screen == Screen::Logs {
            self.log_title = "Node log".into();
        }
    }

    /// Handles a key; returns the agent requests it causes.
    pub fn on_key(&mut self, key: KeyEvent) -> Vec<Action> {
        let actions = self.key(key);
        self.pending.extend(actions.iter().cloned());
        actions
    }

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
        if let Some(form) = &mut self.net_form {
            return match form.on_key(key) {
                Outcome::Editing => Vec::new(),
                Outcome::Cancel => {
                    self.net_form = None;
                    Vec::new()
                }
                Outcome::Submit(config) => {
                    self.net_form = None;
                    vec![Action::ApplyNetwork(config)]
                }
            };
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
        match key.code {
            KeyCode::Char(c @ '1'..='7') => {
                self.switch(SCREENS[(c as u8 - b'1') as usize].0);
                return Vec::new();
            }
            KeyCode::F(n @ 1..=7) => {
                self.switch(SCREENS[(n - 1) as usize].0);
                return Vec::new();
            }
            KeyCode::Tab => {
                self.switch(SCREENS[(idx + 1) % SCREENS.len()].0);
                return Vec::new();
            }
            KeyCode::BackTab => {
                self.switch(SCREENS[(idx + SCREENS.len() - 1) % SCREENS.len()].0);
                return Vec::new();
            }
            _ => {}
        }
        if ctrl {
            return Vec::new();
        }
        let pending = self.network.as_ref().is_some_and(|n| n.pending.is_some());
        match (self.screen, key.code) {
            (Screen::Network, KeyCode::Up) => {
                self.net_selected = self.net_selected.saturating_sub(1)
            }
            (Screen::Network, KeyCode::Down) => {
                let n = self
                    .network
                    .as_ref()
                    .map_or(0, |v| netform::selectable_nics(v).len());
                self.net_selected = (self.net_selected + 1).min(n);
            }
            (Screen::Network, KeyCode::Char('e') | KeyCode::Enter) => match &self.network {
                Some(view) => {
                    self.message = None;
                    self.net_form = Some(match selected_nic(view, self.net_selected) {
                        Some(nic) => NetForm::for_interface(view, &nic),
                        None => NetForm::new(view),
                    });
                }
                None => {
                    self.message =
                        Some("The agent has not reported the network configuration yet.".into())
                }
            },
            (Screen::Network, KeyCode::Char('c')) if pending => {
                return vec![Action::ConfirmNetwork]
            }
            (Screen::Network, KeyCode::Char('r')) if pending => {
                return vec![Action::RollbackNetwork]
            }
            (Screen::Network, KeyCode::Char('h')) => {
                let current = self
                    .data
                    .as_ref()
                    .map(|d| d.info.hostname.clone())
                    .unwrap_or_default();
                self.field = Some(Field {
                    label: "Host name",
                    value: current,
                    error: None,
                });
            }
            (Screen::Manager, KeyCode::Char('n')) => return vec![Action::NewPairingCode],
            (Screen::Manager, KeyCode::Char('u')) => {
                self.confirm = Some(Confirm {
                    text: "Unregister from the manager? It loses control of this node.".into(),
                    action: Action::Unregister,
                })
            }
            (Screen::Manager, KeyCode::Char('m')) => {
                self.field = Some(Field {
                    label: "Manager URL",
                    value: "https://".into(),
                    error: None,
                })
            }
            (Screen::Manager, KeyCode::Char('a')) => {
                if let Some(c) = self.candidate.take() {
                    return vec![Action::AcceptManager(c.ca_fingerprint)];
                }
            }
            (Screen::Manager, KeyCode::Char('r')) if self.candidate.is_some() => {
                self.candidate = None;
                return vec![Action::RejectManager];
            }
            (Screen::Guests, KeyCode::Up) => self.selected = self.selected.saturating_sub(1),
            (Screen::Guests, KeyCode::Down) => {
                let n = self.data.as_ref().map_or(0, |d| d.guests.len());
                if self.selected + 1 < n {
                    self.selected += 1;
                }
            }
            (Screen::Guests, KeyCode::Char('s')) => {
                if let Some(g) = self.selected_guest() {
                    return vec![Action::Guest(g, GuestAction::Start)];
                }
            }
            (Screen::Guests, KeyCode::Char(c @ ('t' | 'd' | 'r'))) => {
                if let Some(g) = self.selected_guest() {
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
                    self.confirm = Some(Confirm {
                        text,
                        action: Action::Guest(g, op),
                    });
                }
            }
            (Screen::Guests, KeyCode::Char('p')) => {
                let guest = self.data.as_ref().and_then(|d| d.guests.get(self.selected));
                if let Some(g) = guest {
                    // Anything but a paused guest is asked to pause: the agent says why a
                    // stopped one cannot.
                    let op = if g.state == GuestState::Paused {
                        GuestAction::Resume
                    } else {
                        GuestAction::Pause
                    };
                    return vec![Action::Guest(g.spec.name.clone(), op)];
                }
            }
            (Screen::Guests, KeyCode::Enter) => {
                if let Some(g) = self.selected_guest() {
                    return vec![Action::GuestConsole(g)];
                }
            }
            (Screen::Storage, KeyCode::Char('i')) => {
                self.field = Some(Field {
                    label: "Type the blank disk's device to initialise (e.g. /dev/sdb)",
                    value: String::new(),
                    error: None,
                })
            }
            (Screen::Logs, KeyCode::Up) => self.scroll += 1,
            (Screen::Logs, KeyCode::Down) => self.scroll = self.scroll.saturating_sub(1),
            (Screen::Logs, KeyCode::PageUp) => self.scroll += 20,
            (Screen::Logs, KeyCode::PageDown) => self.scroll = self.scroll.saturating_sub(20),
            (Screen::Logs, KeyCode::Home) => self.scroll = usize::MAX / 2,
            (Screen::Logs, KeyCode::End) => self.scroll = 0,
            (Screen::Power, KeyCode::Char(c @ ('r' | 'o'))) => {
                let running = self.running_guests();
                let (what, action) = if c == 'r' {
                    ("Reboot", PowerAction::Reboot)
                } else {
                    ("Power off", PowerAction::Poweroff)
                };
                let warn = if running > 0 {
                    format!(" {running} guest(s) are running and will be shut down.")
                } else {
                    String::new()
                };
                self.confirm = Some(Confirm {
                    text: format!("{what} the node?{warn}"),
                    action: Action::Power(action),
                });
            }
            _ => {}
        }
        Vec::new()
    }
}

/// Validates a field; the action to send, or the inline error.
fn submit(f: &Field) -> Result<Action, String> {
    let v = f.value.trim().to_owned();
    match f.label {
        "Host name" => hvnode_api::config::validate_hostname(&v)
            .map(|_| Action::SetHostname(v))
            .map_err(|e| e.to_string()),
        "Manager URL" => {
            let rest = v
                .strip_prefix("https://")
                .ok_or("The URL must start with https://")?;
            let host = rest.trim_end_matches('/');
            if host.is_empty() || host.contains('/') || host.contains(' ') {
                return Err("Use https://HOST[:PORT]".into());
            }
            if let Some((_, port)) = host.rsplit_once(':').filter(|_| !host.ends_with(']')) {
                port.parse::<u16>()
                    .map_err(|_| format!("Invalid port {port:?}"))?;
            }
            Ok(Action::FetchManager(v))
        }
        _ => {
            if v.starts_with("/dev/") && v.len() > 5 && !v.contains("..") {
                Ok(Action::InitStorage(v))
            } else {
                Err("Type a whole-disk device such as /dev/sdb".into())
            }
        }
    }
}

fn kv(k: &str, v: impl Into<String>) -> Line<'static> {
    Line::from(vec![
        Span::styled(
            format!("{k:<18}"),
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::raw(v.into()),
    ])
}

fn reg_state(r: &RegistrationStatus) -> String {
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

fn status_lines(d: &Snapshot) -> Vec<Line<'static>> {
    let mut l = vec![
        kv("Host name", d.info.hostname.clone()),
        kv(
            "Version",
            format!("hvnode {} (kernel {})", d.info.version, d.info.kernel),
        ),
        kv("Manager", reg_state(&d.registration)),
    ];
    let running = d
        .guests
        .iter()
        .filter(|g| matches!(g.state, GuestState::Running | GuestState::Paused))
        .count();
    l.push(kv(
        "Guests",
        format!("{running} running / {} defined", d.guests.len()),
    ));
    l.push(kv(
        "CPU / memory",
        format!(
            "{:.0}% of {} CPUs, {} / {}",
            d.stats.cpu_percent,
            d.info.cpus,
            bytes(d.stats.memory_used_bytes),
            bytes(d.stats.memory_total_bytes)
        ),
    ));
    let up = d.stats.uptime_secs;
    l.push(kv(
        "Uptime",
        format!("{}d {:02}:{:02}", up / 86400, up / 3600 % 24, up / 60 % 60),
    ));
    let first_addr = d
        .info
        .nics
        .iter()
        .flat_map(|n| n.addresses.iter())
        .find(|a| !a.contains(':'))
        .and_then(|a| a.split('/').next())
        .map(str::to_owned);
    l.push(kv(
        "API",
        first_addr
            .map(|a| format!("https://{a}:8443"))
            .unwrap_or_else(|| "no address yet".into()),
    ));
    l.push(kv(
        "Fingerprint",
        d.registration
            .node_fingerprint
            .chars()
            .take(47)
            .collect::<String>(),
    ));
    l.push(kv(
        "",
        d.registration
            .node_fingerprint
            .chars()
            .skip(48)
            .collect::<String>(),
    ));
    l.push(Line::raw(""));
    for n in &d.info.nics {
        l.push(Line::raw(format!(
            "{:<10} {:<17} {:<5} {}",
            n.name,
            n.mac,
            if n.carrier { "up" } else { "down" },
            n.addresses.join(" ")
        )));
    }
    l
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

fn network_lines(app: &App, d: &Snapshot) -> Vec<Line<'static>> {
    let mut l = vec![kv("Host name", d.info.hostname.clone())];
    let selected = app
        .network
        .as_ref()
        .and_then(|v| selected_nic(v, app.net_selected));
    let selectable = app
        .network
        .as_ref()
        .map(netform::selectable_nics)
        .unwrap_or_default();
    let marker = |on: bool| if on { "> " } else { "  " };
    let nics = match &app.network {
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
            if let Some(e) = &app.network_error {
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
    if let Some(v) = &app.network {
        if let Some(p) = &v.pending {
            l.push(kv("Pending change", summary(p)));
            let text = match app.rollback_left {
                Some(0) | None => "Rolling back now...".to_owned(),
                Some(n) => format!("Rolls back in {n} s - press c to keep, r to roll back"),
            };
            l.push(Line::styled(text, bold));
            l.push(Line::raw(connectivity(p, &v.status)));
        } else {
            match app.net_outcome {
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

/// The body of the current screen, for a text area of `rows` by `cols`.
fn body_lines(app: &App, rows: usize, cols: usize) -> Vec<Line<'static>> {
    let Some(d) = &app.data else {
        return vec![Line::raw("No data from the agent yet.")];
    };
    match app.screen {
        Screen::Status => status_lines(d),
        Screen::Network => match &app.net_form {
            Some(form) => form.lines(),
            None => network_lines(app, d),
        },
        Screen::Manager => {
            let r = &d.registration;
            let mut l = vec![kv("State", reg_state(r))];
            if let Some(code) = &r.pairing_code {
                l.push(Line::raw(format!("Pairing code: {code}")));
            }
            l.push(kv(
                "Node fingerprint",
                r.node_fingerprint.chars().take(47).collect::<String>(),
            ));
            l.push(kv(
                "",
                r.node_fingerprint.chars().skip(48).collect::<String>(),
            ));
            l.push(Line::raw(""));
            if let Some(c) = &app.candidate {
                l.push(kv("Manager", format!("{} at {}", c.manager_name, c.url)));
                l.push(kv(
                    "CA fingerprint",
                    c.ca_fingerprint.chars().take(47).collect::<String>(),
                ));
                l.push(kv(
                    "",
                    c.ca_fingerprint.chars().skip(48).collect::<String>(),
                ));
                l.push(Line::raw(
                    "Compare it with the manager's; a: accept  r: reject",
                ));
            } else {
                l.push(Line::raw(
                    "A manager registers this node with the code and fingerprint above,",
                ));
                l.push(Line::raw(
                    "or press m to enter a manager's URL.  n: new code  u: unregister",
                ));
            }
            l
        }
        Screen::Guests => guest_lines(app, d, rows, cols),
        Screen::Storage => {
            let s = &d.storage.status;
            let mut l = if s.persistent {
                vec![
                    kv("Data partition", s.device.clone().unwrap_or_default()),
                    kv("Size", bytes(s.size_bytes)),
                    kv("Free", bytes(s.free_bytes)),
                ]
            } else {
                vec![Line::raw(
                    "No data partition: state is volatile and lost at reboot.",
                )]
            };
            if let Some(n) = &s.note {
                l.push(Line::raw(n.clone()));
            }
            l.push(Line::raw(""));
            l.push(Line::raw("Blank disks:"));
            for disk in &d.storage.blank_disks {
                l.push(Line::raw(format!(
                    "  /dev/{} {} {}",
                    disk.name,
                    bytes(disk.size_bytes),
                    disk.model
                )));
            }
            if d.storage.blank_disks.is_empty() {
                l.push(Line::raw("  none"));
            } else if !s.persistent {
                l.push(Line::raw(
                    "i: initialise a blank disk as the data partition",
                ));
            }
            l
        }
        Screen::Logs => {
            let lines: Vec<&str> = app.log_text.lines().collect();
            let end = lines.len().saturating_sub(app.scroll.min(lines.len()));
            let start = end.saturating_sub(16);
            lines[start..end]
                .iter()
                .map(|s| Line::raw(s.chars().take(78).collect::<String>()))
                .collect()
        }
        Screen::Power => vec![
            Line::raw(format!("{} guest(s) running.", app.running_guests())),
            Line::raw(""),
            Line::raw("r: reboot the node   o: power off the node"),
            Line::raw("Guests are shut down first; both ask for confirmation."),
        ],
    }
}

/// The guest list, the selected guest's detail and the keys, in `rows` by `cols`: a list longer
/// than what the detail leaves shows a window that keeps the selected guest in view.
fn guest_lines(app: &App, d: &Snapshot, rows: usize, cols: usize) -> Vec<Line<'static>> {
    let help =
        Line::raw("s: start  t: stop  d: shut down  r: reboot  p: pause/resume  Enter: console");
    let detail = d
        .guests
        .get(app.selected)
        .map(guest_detail)
        .unwrap_or_default();
    let tall = |l: &Line| l.width().div_ceil(cols.max(1)).max(1);
    let fixed: usize = 3 + usize::from(!detail.is_empty()) + detail.iter().map(tall).sum::<usize>();
    let room = rows.saturating_sub(fixed).max(1);
    let first = (app.selected + 1).saturating_sub(room);
    let mut l = vec![Line::raw(format!(
        "  {:<24} {:<13} {:>5} {:>9}",
        "NAME", "STATE", "VCPUS", "MEMORY"
    ))];
    for (i, g) in d.guests.iter().enumerate().skip(first).take(room) {
        let text = format!(
            "{} {:<24} {:<13} {:>5} {:>6} MiB",
            if i == app.selected { '>' } else { ' ' },
            g.spec.name,
            g.state.as_str(),
            g.spec.vcpus,
            g.spec.memory_mib
        );
        let style = if i == app.selected {
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
    l
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
    if let Some(why) = &g.crash_reason {
        l.push(Line::raw(format!("  Crashed: {why}")));
    }
    l
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
        .map(|(_, n)| {
            if app.screen == Screen::Logs {
                app.log_title.clone()
            } else if let Some(form) = app
                .net_form
                .as_ref()
                .filter(|_| app.screen == Screen::Network)
            {
                form.title()
            } else {
                (*n).to_owned()
            }
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
    let help = if app.net_form.is_some() {
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
