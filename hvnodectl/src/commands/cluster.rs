//! `cluster ...`: setting the cluster up on etcd, nodes joining and leaving it, its status, and
//! its guests. The manager reads and writes etcd directly (docs/cluster.md: "who writes what");
//! nodes are told to join through their API.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hvnode_api::cluster::{ClusterView, JoinCluster};
use hvnode_api::routes::Route;
use hvnode_cluster::election::Election;
use hvnode_cluster::keys::Keys;
use hvnode_cluster::model::{ClusterGuest, Desired, StorageDomain};
use hvnode_cluster::store::{ClusterState, Store};
use hvnode_cluster::Error as EtcdError;
use hyper::Method;
use serde::Serialize;

use super::{read_spec, CmdError, Ctx};
use crate::cli::{ClusterCommand, ClusterGuestCommand, DomainCommand};
use crate::state::ClusterConfig;

/// How long `start` and `stop` wait for the cluster to do it.
const WAIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(250);

/// The cluster as `cluster status` prints it (and `--json` gives it).
#[derive(Debug, Serialize)]
pub struct Status {
    /// The etcd revision it was read at.
    pub revision: i64,
    /// The leader's node id.
    pub leader: Option<String>,
    /// Live members by id.
    pub members: BTreeMap<String, Member>,
    /// Guests by name.
    pub guests: BTreeMap<String, GuestRow>,
    /// Registered nodes that are not members.
    pub not_members: Vec<String>,
    /// Storage domains by name, with each member's view of it.
    pub domains: BTreeMap<String, DomainRow>,
}

/// A storage domain and how each member sees it.
#[derive(Debug, Serialize)]
pub struct DomainRow {
    /// `server:export`.
    pub source: String,
    /// Mount options.
    pub options: String,
    /// Each member's view: mounted and healthy, free bytes, or the error.
    pub members: BTreeMap<String, hvnode_api::cluster::DomainHealth>,
}

/// A live member.
#[derive(Debug, Serialize)]
pub struct Member {
    /// Its agent's URL.
    pub address: String,
    /// `active` or `maintenance`.
    pub state: String,
    /// Free memory, MiB.
    pub mem_free_mib: u64,
    /// vCPUs used of total.
    pub vcpus: (u32, u32),
    /// The cluster guests it runs.
    pub guests_running: Vec<String>,
    /// The watchdog that fences it; `None`: its HA guests are not restarted elsewhere should
    /// it be lost (docs/ha.md).
    pub watchdog: Option<String>,
}

/// A cluster guest.
#[derive(Debug, Serialize)]
pub struct GuestRow {
    /// `running` or `stopped`: what the cluster wants.
    pub desired: String,
    /// Its node, when placed.
    pub node: Option<String>,
    /// Its pin.
    pub pinned: Option<String>,
    /// Whether its node runs it.
    pub running: bool,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// HA.
    pub ha: bool,
}

impl Ctx {
    fn cluster_config(&self) -> Result<ClusterConfig, CmdError> {
        self.state.cluster()?.ok_or(CmdError::NoCluster)
    }

    async fn etcd(&self) -> Result<(Store, Election, ClusterConfig), CmdError> {
        let cfg = self.cluster_config()?;
        let keys = Keys::new(&cfg.prefix)?;
        let client = self.etcd_client(&cfg.endpoints).await?;
        Ok((
            Store::new(&client, &keys),
            Election::new(&client, &keys),
            cfg,
        ))
    }

    /// A client of etcd at `endpoints`: over TLS with the manager's client certificate when
    /// they are `https://`.
    async fn etcd_client(&self, endpoints: &[String]) -> Result<hvnode_cluster::Client, CmdError> {
        let tls = if endpoints.iter().all(|e| e.starts_with("https://")) {
            Some(self.state.etcd_tls()?)
        } else if endpoints.iter().any(|e| e.starts_with("https://")) {
            return Err(CmdError::ClusterRefused(
                "etcd endpoints are all http:// or all https://, not a mix".into(),
            ));
        } else {
            None
        };
        Ok(hvnode_cluster::connect_with(endpoints, tls.as_ref()).await?)
    }

    pub(super) async fn cluster_cmd(&self, cmd: ClusterCommand) -> Result<(), CmdError> {
        match cmd {
            ClusterCommand::Init {
                etcd,
                prefix,
                node_etcd,
            } => self.cluster_init(etcd, prefix, node_etcd).await,
            ClusterCommand::Domain(d) => self.domain_cmd(d).await,
            ClusterCommand::EtcdCertificate { sans, out } => {
                let ca = self.state.ca()?;
                let server =
                    crate::pki::issue(&ca, "hvnode etcd", &sans, crate::pki::Usage::Server)
                        .map_err(crate::state::StateError::from)?;
                std::fs::create_dir_all(&out).map_err(|e| CmdError::ReadFile(out.clone(), e))?;
                for (name, data, mode) in [
                    ("server.pem", &server.cert_pem, 0o644),
                    ("server.key", &server.key_pem, 0o600),
                    ("ca.pem", &ca.cert_pem, 0o644),
                ] {
                    let p = out.join(name);
                    hvnode_base::fs::write_atomic(&p, data.as_bytes(), mode)
                        .map_err(|e| CmdError::ReadFile(p.clone(), e))?;
                }
                self.show(&serde_json::json!({ "dir": out }), || {
                    format!(
                        "etcd's server certificate for {} is in {} (server.pem, server.key; \
                         ca.pem is the manager's CA, etcd's --trusted-ca-file)",
                        sans.join(", "),
                        out.display()
                    )
                })
            }
            ClusterCommand::Join(a) => {
                let cfg = self.cluster_config()?;
                let view = self
                    .join_node_at(&a.node, &cfg, a.address.as_deref())
                    .await?;
                self.show(&view, || format!("node {} is joining the cluster", a.node))
            }
            ClusterCommand::Leave(a) => {
                let c = self.connect(&a.node)?;
                c.send_json_raw::<()>(Method::DELETE, &Route::Cluster.path(), None)
                    .await?;
                self.show(&serde_json::json!({}), || {
                    format!("node {} left the cluster", a.node)
                })
            }
            ClusterCommand::Status => {
                let (store, election, _) = self.etcd().await?;
                let status = self.status(&store, &election).await?;
                self.show(&status, || status_text(&status))
            }
            ClusterCommand::Guest(g) => self.cluster_guest(g).await,
        }
    }

    /// `cluster init`: etcd must answer; the settings are saved; every registered node joins.
    async fn cluster_init(
        &self,
        etcd: Vec<String>,
        prefix: String,
        node_etcd: Vec<String>,
    ) -> Result<(), CmdError> {
        // The same rules the nodes apply, checked before anything is saved.
        let nodes_use = if node_etcd.is_empty() {
            &etcd
        } else {
            &node_etcd
        };
        for endpoints in [&etcd, nodes_use] {
            let probe = JoinCluster {
                endpoints: endpoints.clone(),
                prefix: prefix.clone(),
                node_id: "manager".into(),
                address: "https://manager:1".into(),
            };
            probe.validate().map_err(CmdError::ClusterRefused)?;
        }
        let keys = Keys::new(&prefix)?;
        let client = self.etcd_client(&etcd).await?;
        Store::new(&client, &keys).state().await?;
        let cfg = ClusterConfig {
            endpoints: etcd,
            prefix,
            node_endpoints: node_etcd,
        };
        self.state.save_cluster(&cfg)?;
        eprintln!("cluster set up on {}", cfg.endpoints.join(", "));
        let nodes = self.state.load_nodes()?;
        let mut joined = Vec::new();
        for name in nodes.nodes.keys() {
            match self.join_node(name, &cfg).await {
                Ok(_) => joined.push(name.clone()),
                Err(e) => eprintln!("warning: node {name} did not join: {e}; run `hvnodectl cluster join {name}` later"),
            }
        }
        self.show(&serde_json::json!({ "joined": joined }), || {
            format!(
                "cluster ready; nodes joining: {}",
                if joined.is_empty() {
                    "none".to_owned()
                } else {
                    joined.join(", ")
                }
            )
        })
    }

    /// Tells a registered node to join: its name is its id in the cluster, its registered URL
    /// its address.
    pub(super) async fn join_node(
        &self,
        node: &str,
        cfg: &ClusterConfig,
    ) -> Result<ClusterView, CmdError> {
        self.join_node_at(node, cfg, None).await
    }

    /// [`Self::join_node`], the node's address given (its registered URL if `None`).
    async fn join_node_at(
        &self,
        node: &str,
        cfg: &ClusterConfig,
        address: Option<&str>,
    ) -> Result<ClusterView, CmdError> {
        let entry = self
            .state
            .node(node)?
            .ok_or_else(|| CmdError::UnknownNode(node.to_owned()))?;
        let req = JoinCluster {
            endpoints: if cfg.node_endpoints.is_empty() {
                cfg.endpoints.clone()
            } else {
                cfg.node_endpoints.clone()
            },
            prefix: cfg.prefix.clone(),
            node_id: node.to_owned(),
            address: address.map_or_else(|| entry.url.clone(), str::to_owned),
        };
        req.validate().map_err(|e| {
            CmdError::ClusterRefused(format!(
                "node {node} cannot join under that name: {e} (cluster node ids are lower-case \
                 letters, digits, '-' and '_')"
            ))
        })?;
        let c = self.connect(node)?;
        let (view, _): (ClusterView, _) = c
            .send_json(Method::PUT, &Route::Cluster.path(), Some(&req))
            .await?;
        Ok(view)
    }

    /// The live members (id, in maintenance) and the leader, for `nodes`: `None` without a
    /// cluster, the error when etcd does not answer.
    pub(super) async fn cluster_membership(
        &self,
    ) -> Option<Result<(Vec<(String, bool)>, Option<String>), String>> {
        self.state.cluster().ok()??;
        let r = async {
            let (store, election, _) = self.etcd().await?;
            let state = store.state().await?;
            let leader = election.leader().await?;
            let members = state
                .nodes
                .into_iter()
                .map(|n| {
                    (
                        n.id,
                        n.state == hvnode_cluster::model::NodeState::Maintenance,
                    )
                })
                .collect();
            Ok::<_, CmdError>((members, leader))
        }
        .await;
        Some(r.map_err(|e| format!("unknown ({e})")))
    }

    async fn status(&self, store: &Store, election: &Election) -> Result<Status, CmdError> {
        let state = store.state().await?;
        let leader = election.leader().await?;
        let registered = self.state.load_nodes()?;
        Ok(status_of(&state, leader, registered.nodes.keys()))
    }

    async fn cluster_guest(&self, cmd: ClusterGuestCommand) -> Result<(), CmdError> {
        let (store, election, _) = self.etcd().await?;
        match cmd {
            ClusterGuestCommand::Define {
                file,
                ha,
                priority,
                stopped,
            } => {
                let spec = read_spec(&file)?;
                let name = spec.name.clone();
                // What no node could host is refused now, with the reason.
                let state = store.state().await?;
                let files = spec
                    .disks
                    .iter()
                    .map(|d| d.path.as_str())
                    .chain(Some(spec.kernel.as_str()))
                    .chain(spec.initrd.as_deref());
                for f in files {
                    if let Some((domain, _)) = hvnode_api::cluster::domain_path(f) {
                        if !state.domains.iter().any(|d| d.value.name == domain) {
                            return Err(CmdError::ClusterRefused(format!(
                                "{f:?} is on storage domain {domain:?}, which the cluster does \
                                 not have: `hvnodectl cluster domain add` it first"
                            )));
                        }
                    }
                }
                let biggest = state.nodes.iter().map(|n| n.mem_total_mib).max();
                if biggest.is_some_and(|b| b < spec.memory_mib) {
                    return Err(CmdError::ClusterRefused(format!(
                        "Guest {name} needs {} MiB; the largest member has {} MiB",
                        spec.memory_mib,
                        biggest.unwrap_or_default()
                    )));
                }
                let mut g = ClusterGuest::new(spec);
                g.ha = ha;
                g.priority = priority;
                if stopped {
                    g.desired = Desired::Stopped;
                }
                match store.create_guest(&g).await {
                    Ok(_) => {}
                    Err(EtcdError::Conflict { .. }) => {
                        return Err(CmdError::ClusterRefused(format!(
                            "A cluster guest named {name:?} exists"
                        )))
                    }
                    Err(e) => return Err(e.into()),
                }
                self.show(&serde_json::json!({ "defined": name }), || {
                    format!(
                        "cluster guest {name} defined{}",
                        if stopped {
                            ""
                        } else {
                            "; the leader places it"
                        }
                    )
                })
            }
            ClusterGuestCommand::List => {
                let status = self.status(&store, &election).await?;
                self.show(&status.guests, || guests_text(&status.guests))
            }
            ClusterGuestCommand::Start { name, on, no_wait } => {
                if let Some(node) = &on {
                    hvnode_api::cluster::node_id(node).map_err(CmdError::ClusterRefused)?;
                }
                loop {
                    let g = store.get_guest(&name).await?;
                    if let Some(p) = store.get_placement(&name).await? {
                        if on.as_ref().is_some_and(|n| *n != p.value.node) {
                            return Err(CmdError::ClusterRefused(format!(
                                "Guest {name} is placed on {} (it may still be stopping): stop \
                                 it and wait for it to be stopped, or migrate it",
                                p.value.node
                            )));
                        }
                    }
                    let mut v = g.value.clone();
                    v.desired = Desired::Running;
                    v.pinned = on.clone();
                    match store.update_guest(&v, g.revision).await {
                        Ok(_) => break,
                        Err(EtcdError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                if no_wait {
                    return self.show(&serde_json::json!({ "started": name }), || {
                        format!("cluster guest {name} is to run")
                    });
                }
                let row = self
                    .wait_guest(&store, &election, &name, |r| r.running)
                    .await?;
                self.show(&row, || {
                    format!(
                        "cluster guest {name} runs on {}",
                        row.node.as_deref().unwrap_or("?")
                    )
                })
            }
            ClusterGuestCommand::Stop { name, no_wait } => {
                loop {
                    let g = store.get_guest(&name).await?;
                    let mut v = g.value.clone();
                    v.desired = Desired::Stopped;
                    match store.update_guest(&v, g.revision).await {
                        Ok(_) => break,
                        Err(EtcdError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                if no_wait {
                    return self.show(&serde_json::json!({ "stopped": name }), || {
                        format!("cluster guest {name} is to stop")
                    });
                }
                let row = self
                    .wait_guest(&store, &election, &name, |r| !r.running && r.node.is_none())
                    .await?;
                self.show(&row, || format!("cluster guest {name} stopped"))
            }
            ClusterGuestCommand::Delete { name } => {
                let g = store.get_guest(&name).await?;
                if g.value.desired == Desired::Running
                    || store.get_placement(&name).await?.is_some()
                {
                    return Err(CmdError::ClusterRefused(format!(
                        "Cluster guest {name} is not stopped: `hvnodectl cluster guest stop \
                         {name}` first"
                    )));
                }
                store.delete_guest(&name, g.revision).await?;
                self.show(&serde_json::json!({ "deleted": name }), || {
                    format!("cluster guest {name} deleted")
                })
            }
        }
    }

    async fn domain_cmd(&self, cmd: DomainCommand) -> Result<(), CmdError> {
        let (store, election, _) = self.etcd().await?;
        match cmd {
            DomainCommand::Add {
                name,
                server,
                export,
                nfs_version,
                options,
            } => {
                hvnode_api::cluster::validate_domain(
                    &name,
                    &server,
                    &export,
                    &nfs_version,
                    &options,
                )
                .map_err(CmdError::ClusterRefused)?;
                let d = StorageDomain {
                    format: 0,
                    name: name.clone(),
                    server,
                    export,
                    nfs_version,
                    options,
                };
                match store.create_domain(&d).await {
                    Ok(_) => {}
                    Err(EtcdError::Conflict { .. }) => {
                        return Err(CmdError::ClusterRefused(format!(
                            "A storage domain named {name:?} exists"
                        )))
                    }
                    Err(e) => return Err(e.into()),
                }
                self.show(&serde_json::json!({ "added": name }), || {
                    format!("storage domain {name} added; the members mount it")
                })
            }
            DomainCommand::List => {
                let status = self.status(&store, &election).await?;
                self.show(&status.domains, || domains_text(&status.domains))
            }
            DomainCommand::Remove { name } => {
                let state = store.state().await?;
                let d = state
                    .domains
                    .iter()
                    .find(|d| d.value.name == name)
                    .ok_or_else(|| {
                        CmdError::ClusterRefused(format!("No storage domain named {name:?}"))
                    })?;
                let prefix = format!("{name}:");
                let users: Vec<&str> = state
                    .guests
                    .iter()
                    .filter(|g| {
                        g.value
                            .spec
                            .disks
                            .iter()
                            .any(|k| k.path.starts_with(&prefix))
                            || g.value.spec.kernel.starts_with(&prefix)
                    })
                    .map(|g| g.value.name())
                    .collect();
                if !users.is_empty() {
                    return Err(CmdError::ClusterRefused(format!(
                        "Cluster guests use storage domain {name}: {}",
                        users.join(", ")
                    )));
                }
                store.delete_domain(&name, d.revision).await?;
                self.show(&serde_json::json!({ "removed": name }), || {
                    format!("storage domain {name} removed; the members unmount it")
                })
            }
        }
    }

    /// Waits until the guest's row satisfies `done`; on timeout, says where it stands and why.
    async fn wait_guest(
        &self,
        store: &Store,
        election: &Election,
        name: &str,
        done: impl Fn(&GuestRow) -> bool,
    ) -> Result<GuestRow, CmdError> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut status = self.status(store, election).await?;
            let row = status
                .guests
                .remove(name)
                .ok_or_else(|| CmdError::ClusterRefused(format!("Cluster guest {name} is gone")))?;
            if done(&row) {
                return Ok(row);
            }
            if Instant::now() >= deadline {
                return Err(CmdError::ClusterRefused(format!(
                    "Cluster guest {name} did not get there within {} s: placed on {}, {}; \
                     `hvnodectl events NODE` on the nodes says why",
                    WAIT.as_secs(),
                    row.node.as_deref().unwrap_or("no node"),
                    if row.running {
                        "running"
                    } else {
                        "not running"
                    }
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The status of a state read at one revision.
pub fn status_of<'a>(
    state: &ClusterState,
    leader: Option<String>,
    registered: impl Iterator<Item = &'a String>,
) -> Status {
    let members: BTreeMap<String, Member> = state
        .nodes
        .iter()
        .map(|n| {
            (
                n.id.clone(),
                Member {
                    address: n.address.clone(),
                    state: serde_json::to_value(n.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    mem_free_mib: n.mem_free_mib,
                    vcpus: (n.vcpus_used, n.vcpus_total),
                    guests_running: n.guests_running.clone(),
                    watchdog: n.watchdog.clone(),
                },
            )
        })
        .collect();
    let guests = state
        .guests
        .iter()
        .map(|g| {
            let g = &g.value;
            let node = state
                .placements
                .iter()
                .find(|p| p.value.guest == g.name())
                .map(|p| p.value.node.clone());
            let running = node.as_ref().is_some_and(|n| {
                members
                    .get(n)
                    .is_some_and(|m| m.guests_running.iter().any(|r| r == g.name()))
            });
            (
                g.name().to_owned(),
                GuestRow {
                    desired: match g.desired {
                        Desired::Running => "running",
                        Desired::Stopped => "stopped",
                    }
                    .to_owned(),
                    node,
                    pinned: g.pinned.clone(),
                    running,
                    memory_mib: g.memory_mib(),
                    vcpus: g.vcpus(),
                    ha: g.ha,
                },
            )
        })
        .collect();
    let not_members = registered
        .filter(|n| !members.contains_key(*n))
        .cloned()
        .collect();
    let domains = state
        .domains
        .iter()
        .map(|d| {
            let d = &d.value;
            let members = state
                .nodes
                .iter()
                .filter_map(|n| {
                    let h = n.domains.iter().find(|h| h.name == d.name)?;
                    Some((n.id.clone(), h.clone()))
                })
                .collect();
            (
                d.name.clone(),
                DomainRow {
                    source: format!("{}:{}", d.server, d.export),
                    options: d.options.clone(),
                    members,
                },
            )
        })
        .collect();
    Status {
        revision: state.revision,
        leader,
        members,
        guests,
        not_members,
        domains,
    }
}

fn status_text(s: &Status) -> String {
    let mut out = format!(
        "cluster at revision {}, leader {}\n",
        s.revision,
        s.leader.as_deref().unwrap_or("none")
    );
    out.push_str("MEMBER          STATE        FREE MiB   VCPUS    WATCHDOG         GUESTS\n");
    for (id, m) in &s.members {
        out.push_str(&format!(
            "{:<15} {:<12} {:>8}   {:>2}/{:<4}  {:<16} {}{}\n",
            id,
            m.state,
            m.mem_free_mib,
            m.vcpus.0,
            m.vcpus.1,
            m.watchdog.as_deref().unwrap_or("none"),
            m.guests_running.join(","),
            if s.leader.as_deref() == Some(id) {
                "  (leader)"
            } else {
                ""
            }
        ));
    }
    for n in &s.not_members {
        out.push_str(&format!("{n:<15} not a member (lost, or not joined)\n"));
    }
    out.push_str(&guests_text(&s.guests));
    out.push('\n');
    out.push_str(&domains_text(&s.domains));
    out
}

fn domains_text(domains: &BTreeMap<String, DomainRow>) -> String {
    if domains.is_empty() {
        return "no storage domains".to_owned();
    }
    let mut out = String::new();
    for (name, d) in domains {
        out.push_str(&format!("domain {name}: {} {}\n", d.source, d.options));
        for (node, h) in &d.members {
            out.push_str(&format!(
                "  {node:<15} {}\n",
                match (&h.error, h.healthy) {
                    (Some(e), _) => format!("error: {e}"),
                    (None, true) => format!(
                        "healthy, {} free of {}",
                        hvnode_api::units::bytes(h.free_bytes),
                        hvnode_api::units::bytes(h.total_bytes)
                    ),
                    (None, false) => "not checked yet".to_owned(),
                }
            ));
        }
    }
    out.trim_end().to_owned()
}

fn guests_text(guests: &BTreeMap<String, GuestRow>) -> String {
    if guests.is_empty() {
        return "no cluster guests".to_owned();
    }
    let mut out =
        "GUEST           DESIRED   NODE            RUNNING  MEMORY  VCPUS  HA\n".to_owned();
    for (name, g) in guests {
        out.push_str(&format!(
            "{:<15} {:<9} {:<15} {:<8} {:>6}  {:>5}  {}\n",
            name,
            g.desired,
            g.node.as_deref().unwrap_or("-"),
            if g.running { "yes" } else { "no" },
            g.memory_mib,
            g.vcpus,
            if g.ha { "yes" } else { "no" }
        ));
    }
    out.trim_end().to_owned()
}
