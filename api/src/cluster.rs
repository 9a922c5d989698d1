//! The cluster as a node sees it: joining (`PUT /v1/cluster`, from the manager), leaving
//! (`DELETE /v1/cluster`) and the view (`GET /v1/cluster`): the members, the leader, the
//! cluster's guests and where each is placed. The state itself lives in etcd (docs/cluster.md);
//! these are the API's bodies.

use serde::{Deserialize, Serialize};

/// Most etcd endpoints a node is given (a cluster of etcd has 1, 3, 5 or 7 members).
pub const MAX_ENDPOINTS: usize = 7;
/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "/hvnode/";

/// `PUT /v1/cluster`: join the cluster whose state is in these etcd endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinCluster {
    /// etcd client URLs (`http://host:port`), 1 to [`MAX_ENDPOINTS`].
    pub endpoints: Vec<String>,
    /// The key prefix of the cluster (`/hvnode/` by default): starts and ends with `/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The node's id in the cluster (the name the manager knows it by).
    pub node_id: String,
    /// The URL the node's agent is reached at (`https://host:port`), published to the others.
    pub address: String,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

impl JoinCluster {
    /// Checks the request as the agent will use it; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            return Err(format!(
                "endpoints: give 1 to {MAX_ENDPOINTS} etcd URLs, not {}",
                self.endpoints.len()
            ));
        }
        for e in &self.endpoints {
            endpoint(e).map_err(|why| format!("endpoints: {e:?}: {why}"))?;
        }
        if !(self.prefix.starts_with('/') && self.prefix.ends_with('/'))
            || self.prefix.len() > 64
            || !self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_".contains(&b))
            || self.prefix.contains("//")
        {
            return Err(format!(
                "prefix: {:?} must start and end with '/', hold only letters, digits, '-', '_' \
                 and single '/', and be at most 64 characters",
                self.prefix
            ));
        }
        node_id(&self.node_id).map_err(|why| format!("node_id: {why}"))?;
        let rest = self
            .address
            .strip_prefix("https://")
            .ok_or_else(|| format!("address: {:?} is not an https:// URL", self.address))?;
        if rest.is_empty() || rest.len() > 253 || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "address: {:?} must be https://HOST:PORT and nothing more",
                self.address
            ));
        }
        Ok(())
    }
}

/// An etcd endpoint: `http://HOST:PORT` (`https://` when etcd serves TLS).
fn endpoint(e: &str) -> Result<(), &'static str> {
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or("not an http:// or https:// URL")?;
    let (host, port) = rest.rsplit_once(':').ok_or("no :PORT")?;
    if host.is_empty() || host.len() > 253 || host.contains(['/', '?', '#', '@', ' ']) {
        return Err("the host is empty or not a host name or address");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port is not 1 to 65535"),
    }
}

/// A node id: 1 to 63 of `[a-z0-9-_]`, as the cluster's keys need (docs/cluster.md).
pub fn node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 63 {
        return Err(format!("{id:?} must be 1 to 63 characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "{id:?} may hold only lower-case letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// How the node stands with the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterConnection {
    /// The node is in no cluster.
    NotJoined,
    /// Joining: connecting to etcd, taking a lease.
    Connecting,
    /// A member: its lease is alive.
    Member,
    /// etcd does not answer: the node keeps running what it runs and changes nothing.
    Unreachable,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// How the node stands with the cluster.
    pub connection: ClusterConnection,
    /// The node's id in the cluster, when it joined one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// etcd endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Why the node is not a member, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The elected leader (a node id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The etcd revision the members and guests below were read at (0: never read).
    pub revision: i64,
    /// The live members (their leases alive at `revision`).
    #[serde(default)]
    pub members: Vec<ClusterMember>,
    /// The cluster's guests.
    #[serde(default)]
    pub guests: Vec<ClusterGuestView>,
    /// The cluster's storage domains and how this node sees each.
    #[serde(default)]
    pub domains: Vec<DomainView>,
    /// The node's watchdog and its guard (docs/ha.md).
    #[serde(default)]
    pub fencing: FencingView,
    /// This node's maintenance mode and its drain (docs/maintenance.md).
    #[serde(default)]
    pub maintenance: MaintenanceView,
}

/// Where the node's fencing stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceState {
    /// Not in a cluster: no watchdog armed, nothing to guard.
    #[default]
    Unarmed,
    /// The node holds its lease (or runs no HA guest): its watchdog, if it has one (see
    /// `watchdog` and `message`), is fed.
    Guarding,
    /// The lease was not renewed lately: the node asks its peers.
    Doubt,
    /// etcd is lost for every node: the node keeps its guests and starts nothing.
    QuorumLost,
    /// The node killed its HA guests and stopped feeding its watchdog: it is being reset.
    Fenced,
}

/// The node's watchdog and its guard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencingView {
    /// The armed watchdog's identity (e.g. "i6300esb", "Software Watchdog").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<String>,
    pub state: FenceState,
    /// Why (a watchdog that could not be armed, the reason for fencing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `GET /v1/cluster/peer` (node to node): whether the node holds its membership lease, for a
/// peer that cannot renew its own to tell a quorum loss from a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLease {
    /// The node's id in the cluster (absent when it is in none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Its lease was renewed recently: etcd answers it.
    pub member: bool,
    /// Milliseconds since its lease was last renewed (absent when it never held one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_age_ms: Option<u64>,
}

impl ClusterView {
    /// A node in no cluster.
    pub fn not_joined() -> Self {
        ClusterView {
            connection: ClusterConnection::NotJoined,
            node_id: None,
            endpoints: Vec::new(),
            error: None,
            leader: None,
            revision: 0,
            members: Vec::new(),
            guests: Vec::new(),
            domains: Vec::new(),
            fencing: FencingView::default(),
            maintenance: MaintenanceView::default(),
        }
    }
}

/// What a node in maintenance does with a guest that cannot live-migrate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainPolicy {
    /// Shut it down here; the cluster starts it on another node.
    #[default]
    Restart,
    /// Stop the drain at it and say why (the admin decides).
    Stop,
}

impl DrainPolicy {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainPolicy::Restart => "restart",
            DrainPolicy::Stop => "stop",
        }
    }
}

/// `PUT /v1/cluster/maintenance`: maintenance mode on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMaintenance {
    /// On: the node takes no new guests and its guests move to other nodes.
    pub on: bool,
    /// What to do with a guest that cannot live-migrate (default `restart`).
    #[serde(default)]
    pub policy: DrainPolicy,
    /// The longest pause each guest may see as it migrates off (default: a migration's,
    /// 100 ms); a slow link between the nodes needs more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
}

/// Where a node's drain stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceState {
    /// Maintenance mode is off: the node takes guests.
    #[default]
    Off,
    /// Guests are being moved off the node.
    Draining,
    /// No cluster guest is left on the node: it can be rebooted or updated.
    Drained,
    /// The drain stopped at a guest it could not move (`message` says why).
    Stopped,
}

impl MaintenanceState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            MaintenanceState::Off => "off",
            MaintenanceState::Draining => "draining",
            MaintenanceState::Drained => "drained",
            MaintenanceState::Stopped => "stopped",
        }
    }
}

/// What the drain does with a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrainAction {
    /// Live-migrating it to `to`.
    #[serde(rename = "migrating")]
    Migrating,
    /// Shutting it down here so that the cluster starts it on another node.
    #[serde(rename = "restarting elsewhere")]
    RestartingElsewhere,
}

/// The guest the drain works on now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainStep {
    /// The guest.
    pub guest: String,
    /// The node it goes to (for a restart: the node with room now; the leader decides).
    pub to: String,
    /// What happens to it.
    pub action: DrainAction,
}

/// A node's maintenance mode and its drain, in `ClusterView.maintenance`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceView {
    /// Maintenance mode is on (kept across reboots).
    pub on: bool,
    /// What happens to a guest that cannot live-migrate.
    pub policy: DrainPolicy,
    /// Where the drain stands.
    pub state: MaintenanceState,
    /// The cluster guests still on the node, in the order they go.
    #[serde(default)]
    pub guests_left: Vec<String>,
    /// The guest being moved now.
    #[serde(default)]
    pub current: Option<DrainStep>,
    /// Why the drain stopped, or what it waits for.
    #[serde(default)]
    pub message: Option<String>,
}

/// A live member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    /// Node id.
    pub id: String,
    /// Its agent's URL.
    pub address: String,
    /// `active` or `maintenance`.
    pub state: String,
    /// Memory for guests, MiB.
    pub mem_total_mib: u64,
    /// Of which free, MiB.
    pub mem_free_mib: u64,
    /// Host CPUs.
    pub vcpus_total: u32,
    /// vCPUs of the guests it runs.
    pub vcpus_used: u32,
    /// The cluster guests it runs.
    #[serde(default)]
    pub guests_running: Vec<String>,
    /// The storage domains as it sees them.
    #[serde(default)]
    pub domains: Vec<DomainHealth>,
    /// Its agent's version.
    pub agent_version: String,
    /// When it last wrote its record (Unix seconds).
    pub heartbeat_unix: u64,
    /// The watchdog that fences it (absent: none armed, so its HA guests are not restarted
    /// elsewhere should it be lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<String>,
}

/// A cluster guest and where it is placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterGuestView {
    /// Guest name.
    pub name: String,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// `running` or `stopped`: what the cluster wants.
    pub desired: String,
    /// Restarted elsewhere when its node is lost.
    pub ha: bool,
    /// Higher first when there is not room for all.
    pub priority: i32,
    /// The node it must run on, when pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// The node it is placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why it is placed there, or why it is not placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether its node reports it running.
    pub running: bool,
}

/// A storage domain of the cluster (an NFS export every node mounts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainView {
    /// Its name: guests' disks on it are `NAME:path`.
    pub name: String,
    /// The NFS server (host name or address).
    pub server: String,
    /// The exported path.
    pub export: String,
    /// NFS version (4.1, 4.2).
    pub nfs_version: String,
    /// Extra mount options.
    pub options: String,
    /// How this node sees it.
    pub here: DomainHealth,
}

/// How a node sees a storage domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainHealth {
    /// The domain's name.
    pub name: String,
    /// Mounted on the node.
    pub mounted: bool,
    /// Answered a check (statfs) within its deadline.
    pub healthy: bool,
    /// Size of the export's file system, bytes.
    pub total_bytes: u64,
    /// Free, bytes.
    pub free_bytes: u64,
    /// What went wrong, when it is not mounted or not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A storage domain's name: as a node id (it is a key in etcd and a directory on nodes).
pub fn domain_name(name: &str) -> Result<(), String> {
    node_id(name)
}

/// Checks a storage domain's definition; the message names the field.
pub fn validate_domain(
    name: &str,
    server: &str,
    export: &str,
    nfs_version: &str,
    options: &str,
) -> Result<(), String> {
    domain_name(name).map_err(|e| format!("name: {e}"))?;
    if server.is_empty()
        || server.len() > 253
        || !server
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    {
        return Err(format!(
            "server: {server:?} is not a host name or an IP address"
        ));
    }
    if !export.starts_with('/')
        || export.len() > 1024
        || export.contains(['\0', ',', ' '])
        || export.split('/').any(|c| c == "..")
    {
        return Err(format!(
            "export: {export:?} must be an absolute path without '..', ',' or spaces"
        ));
    }
    if !["4", "4.0", "4.1", "4.2"].contains(&nfs_version) {
        return Err(format!(
            "nfs_version: {nfs_version:?} is not 4, 4.0, 4.1 or 4.2"
        ));
    }
    for o in options.split(',').filter(|o| !o.is_empty()) {
        let key = o.split('=').next().unwrap_or_default();
        if !o
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"=._-".contains(&b))
            || ["addr", "vers", "clientaddr", "nfsvers"].contains(&key)
        {
            return Err(format!(
                "options: {o:?} is not an NFS mount option this node takes (the server's \
                 address and the version are set from the domain)"
            ));
        }
    }
    Ok(())
}

/// Splits a disk path `DOMAIN:path` into the domain and the path on it; `None` for a path in
/// the node's image directory (no `:` before the first `/`).
pub fn domain_path(path: &str) -> Option<(&str, &str)> {
    let first = path.split('/').next()?;
    let (domain, rest) = path.split_once(':')?;
    (domain.len() < first.len() && domain_name(domain).is_ok() && !rest.is_empty())
        .then_some((domain, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> JoinCluster {
        JoinCluster {
            endpoints: vec!["http://10.0.2.2:2379".into()],
            prefix: DEFAULT_PREFIX.into(),
            node_id: "node-a".into(),
            address: "https://10.0.0.5:8443".into(),
        }
    }

    #[test]
    fn a_good_join_validates() {
        join().validate().unwrap();
        let j: JoinCluster = serde_json::from_str(
            r#"{"endpoints":["https://e1:2379"],"node_id":"n1","address":"https://n1:8443"}"#,
        )
        .unwrap();
        assert_eq!(j.prefix, "/hvnode/");
        j.validate().unwrap();
    }

    #[test]
    fn bad_joins_are_refused_naming_the_field() {
        type Change = Box<dyn Fn(&mut JoinCluster)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|j| j.endpoints.clear()), "endpoints: give 1 to 7"),
            (
                Box::new(|j| j.endpoints = vec!["e1:2379".into()]),
                "not an http:// or https:// URL",
            ),
            (
                Box::new(|j| j.endpoints = vec!["http://e1".into()]),
                "no :PORT",
            ),
            (
                Box::new(|j| j.endpoints = vec!["http://e1:0".into()]),
                "the port is not",
            ),
            (
                Box::new(|j| j.endpoints = vec!["http://e1:99999".into()]),
                "the port is not",
            ),
            (
                Box::new(|j| j.endpoints = vec!["http://u@e1:1".into()]),
                "host",
            ),
            (
                Box::new(|j| j.endpoints = vec!["http://e:1".into(); 8]),
                "not 8",
            ),
            (Box::new(|j| j.prefix = "hvnode/".into()), "prefix:"),
            (Box::new(|j| j.prefix = "/a//b/".into()), "prefix:"),
            (Box::new(|j| j.prefix = "/a b/".into()), "prefix:"),
            (Box::new(|j| j.node_id = "Node".into()), "node_id:"),
            (Box::new(|j| j.node_id = "a/b".into()), "node_id:"),
            (Box::new(|j| j.node_id = String::new()), "node_id:"),
            (
                Box::new(|j| j.address = "http://n:1".into()),
                "not an https:// URL",
            ),
            (
                Box::new(|j| j.address = "https://n:1/x".into()),
                "https://HOST:PORT",
            ),
        ];
        for (change, want) in cases {
            let mut j = join();
            change(&mut j);
            let e = j.validate().unwrap_err();
            assert!(e.contains(want), "{j:?}: {e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<JoinCluster>(
            r#"{"endpoints":["http://e:1"],"node_id":"n","address":"https://n:1","x":1}"#
        )
        .is_err());
    }

    #[test]
    fn domains_validate_naming_the_field() {
        validate_domain("nfs-a", "10.0.2.2", "/export", "4.2", "port=2049,soft").unwrap();
        validate_domain("nfs-a", "nfs.lab", "/srv/vm", "4.1", "").unwrap();
        for (args, want) in [
            (("Nfs", "h", "/e", "4.2", ""), "name:"),
            (("n", "h/x", "/e", "4.2", ""), "server:"),
            (("n", "h", "e", "4.2", ""), "export:"),
            (("n", "h", "/e/../f", "4.2", ""), "export:"),
            (("n", "h", "/e", "3", ""), "nfs_version:"),
            (("n", "h", "/e", "4.2", "addr=1.2.3.4"), "options:"),
            (("n", "h", "/e", "4.2", "a b"), "options:"),
        ] {
            let e = validate_domain(args.0, args.1, args.2, args.3, args.4).unwrap_err();
            assert!(e.starts_with(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn domain_paths_are_told_from_local_ones() {
        assert_eq!(
            domain_path("nfs-a:web/root.raw"),
            Some(("nfs-a", "web/root.raw"))
        );
        assert_eq!(domain_path("nfs-a:root.raw"), Some(("nfs-a", "root.raw")));
        assert_eq!(domain_path("disks/web.raw"), None);
        assert_eq!(domain_path("disks/a:b.raw"), None);
        assert_eq!(domain_path("Nfs:x"), None);
        assert_eq!(domain_path("nfs-a:"), None);
    }
}
