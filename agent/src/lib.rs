//! The hvnode node agent: the API a central manager drives the node with (HTTPS with mutual TLS
//! on TCP) and local clients use (plain HTTP on a root-only unix socket).
//!
//! [`Agent::handle`] is the whole API: one function from a request and where it came from to a
//! response, so that tests drive it without sockets.
//!
//! # Modules
//!
//! Plumbing:
//! - [`listen`]: accepting connections, TLS, deadlines and connection caps.
//! - [`http`]: serving a connection, reading bodies within limits, building responses.
//! - [`auth`]: who may call what (the TCP access rules, registration generations).
//! - [`router`]: a path parsed once into a `Route`, the method checked, the handler called.
//! - [`error`]: the one error type, a stable code (which knows its status) and a message.
//!
//! Domains, each owning its state and its handlers:
//! - [`registration`]: pairing code, manager candidate, the trusted CA and TLS configuration;
//!   [`manager`] is its client side (node-initiated registration).
//! - [`node`]: node facts and info cache, host name, stats and metrics, logs, power.
//! - [`network`]: applying a network change, its confirmation and its automatic rollback.
//! - [`storage`]: the data partition and blank disks.
//! - [`guests`]: guest definitions and operations; [`guests::vmms`] runs and watches the VMMs.
//! - [`snapshots`]: guest snapshots: taken by the VMM, listed, deleted, restored.
//! - [`images`]: the image directory: list, streamed upload, delete.
//! - [`console`]: a guest's console log and the interactive attach upgrade.
//! - [`events`]: the event log and its server-sent-events stream.
//! - [`cluster`]: joining a cluster (etcd), membership, the leader's placements, running the
//!   cluster guests placed here; [`domains`] mounts and checks the cluster's NFS storage
//!   domains; [`maintenance`] drains the node of its cluster guests (maintenance mode).
//!
//! Shared by the domains: [`config`] (node.toml, one owner), [`initctl`] (init's control
//! socket), [`tls`] (the node's identity and server configuration).
#![forbid(unsafe_code)]

pub mod auth;
pub mod cluster;
pub mod config;
pub mod console;
pub mod domains;
pub mod error;
pub mod events;
pub mod fencing;
pub mod guests;
pub mod http;
pub mod images;
pub mod initctl;
pub mod install;
pub mod listen;
pub mod maintenance;
pub mod manager;
pub mod migration;
pub mod network;
pub mod node;
pub mod registration;
pub mod router;
pub mod snapshots;
pub mod storage;
pub mod tls;
pub mod update;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::Error;
pub use http::{Body, BODY_LIMIT};
pub use network::NETWORK_ROLLBACK;
pub use registration::PAIRING_ATTEMPTS;

/// Where the agent keeps and finds things; every path derives from these.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The data partition (`/var/lib/hvnode`).
    pub data: PathBuf,
    /// The runtime directory (`/run/hvnode`).
    pub run: PathBuf,
    /// The guest image directory.
    pub images: PathBuf,
    /// Init's control socket.
    pub init_socket: PathBuf,
    /// The node log.
    pub node_log: PathBuf,
    /// The VMM binary started for each guest.
    pub vmm: PathBuf,
    /// The release keys update bundles must be signed with (`*.pub`, in the verified root).
    pub release_keys: PathBuf,
    /// The kernel command line (`hvnode.slot=` names the booted slot of an installed node).
    pub cmdline: PathBuf,
    /// The installed disk; `None`: the disk that holds the booted slot's partitions.
    pub system_disk: Option<PathBuf>,
}

impl Paths {
    /// The cgroup group this agent's guests go in (`hvnode_base::cgroup`): the node's agent
    /// uses `guests`; an agent with another run directory (a test's, one of several agents on
    /// a host) `guests-` and a hash of it, so that two agents' guests of one name stay apart.
    pub fn cgroup_group(&self) -> String {
        use sha2::Digest;
        if self.run == Path::new(hvnode_api::paths::RUN_DIR) {
            return hvnode_base::cgroup::GUESTS.to_owned();
        }
        let h = sha2::Sha256::digest(self.run.as_os_str().as_encoded_bytes());
        format!(
            "{}-{:02x}{:02x}{:02x}{:02x}",
            hvnode_base::cgroup::GUESTS,
            h[0],
            h[1],
            h[2],
            h[3]
        )
    }

    fn registration(&self) -> PathBuf {
        self.data.join("registration.toml")
    }
    /// The unconfirmed network change, on tmpfs: a reboot forgets it together with the change
    /// itself (init applies node.toml at boot), an agent restart does not.
    fn pending_network(&self) -> PathBuf {
        self.run.join("network-pending.json")
    }
    fn node_config(&self) -> PathBuf {
        self.data.join("node.toml")
    }
    fn guests(&self) -> PathBuf {
        self.data.join("guests")
    }
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The local unix socket: root on the node, trusted.
    Local,
    /// TCP. `client_generation` is the registration generation under which the connection's
    /// client certificate was verified against the manager CA, if it presented one;
    /// `node_peer` says that certificate is one the manager signed for a node (see
    /// [`tls::NODE_OU`]), not the manager's own.
    Tcp {
        /// See above.
        client_generation: Option<u64>,
        /// See above.
        node_peer: bool,
    },
}

/// The agent: the node's identity and one state per domain.
pub struct Agent {
    paths: Paths,
    identity: tls::Identity,
    fingerprint: String,
    registration: registration::Registration,
    node: node::Node,
    network: network::Network,
    /// Guest VMM processes.
    running: Arc<guests::vmms::Guests>,
    /// Events for `GET /v1/events`.
    events: Arc<events::EventLog>,
    /// Live migrations in progress, and the last one of each guest.
    migrations: migration::Migrations,
    config: config::NodeConfigFile,
    init: initctl::InitClient,
    /// The node's membership of a cluster.
    cluster: cluster::Cluster,
    /// The cluster's storage domains as mounted here.
    domains: domains::Domains,
    /// The watchdog and the guard that fences the node (HA).
    fencing: fencing::Fencing,
    /// Maintenance mode and the drain of the cluster guests.
    maintenance: maintenance::Maintenance,
    /// Updates of the installed system.
    updates: update::Updates,
    /// Installing the node to disk from its live medium.
    install: install::Installer,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("paths", &self.paths)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Agent {
    /// Loads (or creates) the node identity and registration under `paths`.
    pub fn new(paths: Paths) -> Result<Agent, tls::TlsError> {
        let identity = tls::load_or_create(&paths.data.join("tls"), &node::facts::hostname())?;
        let registration = registration::Registration::load(&paths.registration(), &identity)?;
        let events = Arc::new(events::EventLog::default());
        Ok(Agent {
            fingerprint: hvnode_api::fingerprint::of_der(&identity.cert_der),
            identity,
            registration,
            node: node::Node::new(&paths.run),
            network: network::Network::default(),
            running: Arc::new(guests::vmms::Guests::new(
                Arc::clone(&events),
                paths.clone(),
            )),
            events,
            migrations: migration::Migrations::default(),
            config: config::NodeConfigFile::new(paths.node_config()),
            init: initctl::InitClient::new(paths.init_socket.clone()),
            cluster: cluster::Cluster::default(),
            domains: domains::Domains::default(),
            fencing: fencing::Fencing::default(),
            maintenance: maintenance::Maintenance::load(&paths.data.join("maintenance.toml")),
            updates: update::Updates::default(),
            install: install::Installer::default(),
            paths,
        })
    }

    /// The TLS configuration new connections use, with the registration generation it reflects.
    pub fn tls_config(&self) -> (Arc<rustls::ServerConfig>, u64) {
        self.registration.tls_config()
    }

    /// SHA-256 fingerprint of the node certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// Unix time in seconds (0 for a clock before 1970): event times, registration and snapshot
/// dates.
pub(crate) fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Paths under one root directory (tests, benches, unprivileged runs).
pub fn paths_under(root: &Path) -> Paths {
    Paths {
        data: root.join("data"),
        run: root.join("run"),
        images: root.join("images"),
        init_socket: root.join("init.sock"),
        node_log: root.join("node.log"),
        vmm: PathBuf::from(hvnode_api::paths::VMM_BINARY),
        release_keys: root.join("release-keys"),
        cmdline: root.join("cmdline"),
        system_disk: Some(root.join("disk.img")),
    }
}

#[cfg(test)]
mod tests;
