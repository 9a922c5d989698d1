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
        }
    }
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
    /// Its agent's version.
    pub agent_version: String,
    /// When it last wrote its record (Unix seconds).
    pub heartbeat_unix: u64,
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
}
