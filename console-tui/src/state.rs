//! What the console knows and asks: the agent's last answers ([`Snapshot`]), the requests keys
//! and the clock produce ([`Action`]), the worker's answers ([`Done`]), and the two dialogs a
//! screen can open ([`Field`], [`Confirm`]). Shared by the App, the screens and the worker.

use hvnode_api::config::NetworkConfig;
use hvnode_api::guest::GuestStatus;
use hvnode_api::node::{NetworkView, NodeInfo, NodeStats, PowerAction, StorageView};
use hvnode_api::registration::{ManagerCandidate, RegistrationStatus};
use hvnode_api::routes::GuestAction;

use crate::client::ClientError;

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
    /// The cluster as the node sees it.
    pub cluster: hvnode_api::cluster::ClusterView,
    /// The disks the node could be installed onto (empty if the agent does not say).
    pub install_disks: Vec<hvnode_api::install::InstallDisk>,
    /// The install to disk.
    pub install: hvnode_api::install::InstallState,
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
    /// PUT /v1/cluster/maintenance: on or off (policy restart).
    Maintenance(bool),
    /// POST /v1/guests/{name}/{op}.
    Guest(String, GuestAction),
    /// GET /v1/guests/{name}/console.
    GuestConsole(String),
    /// POST /v1/guests/{name}/snapshots: guest, snapshot name.
    Snapshot(String, String),
    /// POST /v1/guests/{name}/snapshots/{snapshot}/restore: guest, snapshot name.
    Restore(String, String),
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
    /// POST /v1/node/install, confirmed with the disk's name the admin typed.
    Install(String),
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
            Action::Maintenance(true) => "Turning maintenance mode on...".into(),
            Action::Maintenance(false) => "Turning maintenance mode off...".into(),
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
            Action::Snapshot(name, snap) => format!("Taking snapshot {snap} of {name}..."),
            Action::Restore(name, snap) => format!("Restoring {name} from snapshot {snap}..."),
            Action::NewPairingCode => "Asking for a new pairing code...".into(),
            Action::Unregister => "Unregistering from the manager...".into(),
            Action::FetchManager(url) => format!("Fetching the manager's CA from {url}..."),
            Action::AcceptManager(_) => "Sending the join request to the manager...".into(),
            Action::RejectManager => "Rejecting the manager...".into(),
            Action::InitStorage(dev) => {
                format!("Initialising {dev} as the data partition (this takes a while)...")
            }
            Action::Install(dev) => format!("Starting the install onto {dev}..."),
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
    /// The action, as [`crate::app::App::on_key`] or [`crate::app::App::poll`] returned it.
    pub action: Action,
    /// The answer, or why there is none.
    pub result: Result<Answer, ClientError>,
}

/// What a text field is for: it decides how its text is checked and what is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldKind {
    /// The node's host name (Network screen).
    Hostname,
    /// A manager's URL for node-initiated registration (Manager screen).
    ManagerUrl,
    /// The blank disk to initialise as the data partition (Storage screen).
    StorageDevice,
    /// The disk to install the node onto, typed as its confirmation (Storage screen).
    InstallDisk,
    /// The name of a snapshot to take of this guest (Guests screen).
    SnapshotName(String),
}

/// A text field being edited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// What it is for.
    pub kind: FieldKind,
    /// Its prompt.
    pub label: &'static str,
    /// The text typed so far.
    pub value: String,
    /// The inline validation error, if the last submit was refused.
    pub error: Option<String>,
}

impl Field {
    /// A field of `kind` with a prompt and a starting value.
    pub fn new(kind: FieldKind, label: &'static str, value: String) -> Field {
        Field {
            kind,
            label,
            value,
            error: None,
        }
    }
}

/// A question awaiting y/n.
#[derive(Debug, Clone, PartialEq)]
pub struct Confirm {
    /// The question.
    pub text: String,
    /// What `y` does.
    pub action: Action,
}
