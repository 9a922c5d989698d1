//! The commands, one module per group of `cli.rs`'s subcommands. This module holds what they
//! share: the run context ([`Ctx`]) with its node clients and the human/JSON choice, the
//! errors, and the dispatch from a parsed [`Command`] to its module.

mod cluster;
mod console;
mod events;
mod guest;
mod image;
mod join;
mod manager;
mod node;
mod register;

use std::path::PathBuf;

use hvnode_api::fingerprint::FingerprintError;
use hvnode_api::guest::GuestSpecError;
use hvnode_api::routes::Route;

use crate::attach::AttachError;
use crate::cli::Command;
use crate::client::{ClientError, NodeClient};
use crate::output::{self, OutputError};
use crate::serve::ServeError;
use crate::state::{NodeEntry, StateDir, StateError};

pub use guest::read_spec;

/// Errors of the commands.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The interactive console.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// State directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// Talking to a node.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The manager server.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A fingerprint argument.
    #[error(transparent)]
    Fingerprint(#[from] FingerprintError),
    /// The node is not in nodes.toml.
    #[error("Unknown node {0:?}: see `hvnodectl nodes`, or register it first")]
    UnknownNode(String),
    /// The name is taken.
    #[error("A node named {0:?} is already registered here: unregister it first, pass --replace, or choose another name")]
    NodeExists(String),
    /// The node presented another certificate than the admin expected.
    #[error("node certificate fingerprint is {actual}, expected {expected}: this is not the node you meant; compare with the fingerprint on its console")]
    FingerprintDiffers {
        /// What the node presented.
        actual: String,
        /// What the admin gave.
        expected: String,
    },
    /// The node's certificate and the fingerprint it reports disagree.
    #[error("node reports fingerprint {reported} but presented a certificate with fingerprint {presented}: something is between you and the node")]
    Inconsistent {
        /// In the RegistrationStatus.
        reported: String,
        /// Of the TLS certificate.
        presented: String,
    },
    /// The admin did not confirm.
    #[error("Registration cancelled: the node fingerprint was not confirmed")]
    NotConfirmed,
    /// A local file.
    #[error("Cannot read {0}")]
    ReadFile(PathBuf, #[source] std::io::Error),
    /// A guest definition file could not be parsed.
    #[error("Cannot parse guest definition {0}: {1}")]
    ParseSpec(PathBuf, String),
    /// A guest definition or name is invalid.
    #[error(transparent)]
    Spec(#[from] GuestSpecError),
    /// No join request matches.
    #[error("No join request matches {0:?}: see `hvnodectl requests`")]
    RequestNotFound(String),
    /// Several join requests from one host.
    #[error("Several join requests come from host {0:?}: give the fingerprint instead")]
    AmbiguousRequest(String),
    /// The request was decided already.
    #[error("The join request from {hostname} was already {state}")]
    AlreadyDecided {
        /// Host name of the node.
        hostname: String,
        /// `approved` or `rejected`.
        state: String,
    },
    /// `wait` timed out.
    #[error("Guest {guest} did not reach state {wanted} within {secs} s (it is {last})")]
    WaitTimeout {
        /// Guest name.
        guest: String,
        /// State waited for.
        wanted: String,
        /// Timeout.
        secs: u64,
        /// Last state seen.
        last: String,
    },
    /// The event stream ended.
    #[error("The node closed the event stream")]
    StreamEnded,
    /// A migration to the node the guest is on.
    #[error("The guest is on node {0:?} already: migrate it to another node")]
    SameNode(String),
    /// The migration ended without moving the guest.
    #[error("The migration failed: {0}")]
    MigrationFailed(String),
    /// The cluster's etcd.
    #[error("Cluster: {0}")]
    Cluster(#[from] hvnode_cluster::Error),
    /// A cluster command before `cluster init`.
    #[error("No cluster is set up: run `hvnodectl cluster init --etcd http://HOST:2379` first")]
    NoCluster,
    /// A cluster request or guest that cannot be.
    #[error("{0}")]
    ClusterRefused(String),
    /// An install that failed or vanished on the node.
    #[error("{0}")]
    Install(String),
    /// Writing to stdout failed.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// Shared settings of a run.
#[derive(Debug)]
pub struct Ctx {
    /// The state directory.
    pub state: StateDir,
    /// Print raw JSON.
    pub json: bool,
}

impl Ctx {
    /// Runs one command.
    pub async fn run(&self, command: Command) -> Result<(), CmdError> {
        match command {
            Command::Init { name, sans } => self.init(&name, &sans),
            Command::Ca => self.ca(),
            Command::Serve { listen, sans } => self.serve(listen, &sans).await,
            Command::Register {
                node,
                url,
                code,
                fingerprint,
                yes,
                replace,
            } => {
                self.register(&node, &url, &code, fingerprint.as_deref(), yes, replace)
                    .await
            }
            Command::Nodes => self.nodes().await,
            Command::Unregister { node, force } => self.unregister(&node, force).await,
            Command::Requests => self.requests(),
            Command::Approve { request, name, url } => {
                self.approve(&request, &name, url.as_deref())
            }
            Command::Reject { request } => self.reject(&request),
            Command::Node(cmd) => self.node_cmd(cmd).await,
            Command::Guest(cmd) => self.guest_cmd(cmd).await,
            Command::Cluster(cmd) => self.cluster_cmd(cmd).await,
            Command::Image(cmd) => self.image_cmd(cmd).await,
            Command::Events { node, since, count } => self.events(&node, since, count).await,
            Command::Wait {
                node,
                guest,
                state,
                timeout,
            } => self.wait(&node, &guest, state, timeout).await,
        }
    }

    /// A client of a registered node: pinned fingerprint and client certificate.
    pub fn client(&self, node: &str) -> Result<NodeClient, CmdError> {
        let entry = self
            .state
            .node(node)?
            .ok_or_else(|| CmdError::UnknownNode(node.to_owned()))?;
        self.client_for(node, &entry)
    }

    fn client_for(&self, node: &str, entry: &NodeEntry) -> Result<NodeClient, CmdError> {
        let identity = self.state.client_identity()?;
        Ok(NodeClient::new(
            node,
            &entry.url,
            Some(entry.fingerprint.clone()),
            Some(identity),
        )?)
    }

    /// [`Self::client`], announced on stderr: most commands talk to one node at once.
    fn connect(&self, node: &str) -> Result<NodeClient, CmdError> {
        let c = self.client(node)?;
        self.connecting(&c);
        Ok(c)
    }

    fn connecting(&self, c: &NodeClient) {
        eprintln!("connecting to {}", c.url());
    }

    /// The agent's answer `raw` with `--json`, else the text `human` makes.
    fn answer(&self, raw: &[u8], human: impl FnOnce() -> String) -> Result<(), CmdError> {
        Ok(output::answer(self.json, raw, human)?)
    }

    /// A value of hvnodectl's own (state, join requests, probes) as JSON with `--json`, else
    /// the text `human` makes.
    fn show<T: serde::Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> String,
    ) -> Result<(), CmdError> {
        Ok(output::text(&match self.json {
            true => output::json(value),
            false => human(),
        })?)
    }

    /// Printed as is, whatever `--json` says: answers that are text on the wire (logs,
    /// metrics) and answers with no body.
    fn print(&self, text: &[u8]) -> Result<(), CmdError> {
        Ok(output::raw(text)?)
    }
}

/// `route`'s path, with the query parameter `key` when the user gave it a value.
fn path_with(route: &Route, key: &str, value: Option<impl std::fmt::Display>) -> String {
    match value {
        Some(v) => route.with_query(&[(key, &v.to_string())]),
        None => route.path(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_query_parameters_are_added_only_when_given() {
        let shutdown = Route::GuestAction("web".into(), hvnode_api::routes::GuestAction::Shutdown);
        assert_eq!(
            path_with(&shutdown, "timeout_secs", Some(30)),
            "/v1/guests/web/shutdown?timeout_secs=30"
        );
        assert_eq!(path_with(&Route::Logs, "lines", None::<u32>), "/v1/logs");
    }
}
