//! The node in a cluster (docs/cluster.md): joining when the manager says so (`PUT
//! /v1/cluster`, kept in `<data>/cluster.toml`), membership under an etcd lease, the election,
//! and, once a member, one loop that every [`TICK`]:
//!
//! - reads the whole cluster state at one revision (the view `GET /v1/cluster` shows);
//! - as the leader, places the guests that should run and have no node, and removes the
//!   placements of guests stopped for good ([`lead`]);
//! - as a node, runs what is placed on it and stops what is not ([`Agent::reconcile`]).
//!
//! A cluster guest placed here is defined here like any guest (`<data>/guests/<name>.toml`, so the
//! console, the API and the metrics see it) and marked as the cluster's
//! (`<data>/cluster-guests/<name>`); the node changes it only on what etcd says. When etcd does
//! not answer the node keeps running what it runs and starts nothing: a start needs a placement
//! read back from etcd at the revision the decision was made on.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hvnode_api::cluster::{
    ClusterConnection, ClusterGuestView, ClusterMember, ClusterView, DomainView, JoinCluster,
};
use hvnode_api::error::ErrorCode;
use hvnode_api::guest::{GuestSpec, GuestState};
use hvnode_cluster::election::{Election, Leadership};
use hvnode_cluster::failover::Failover;
use hvnode_cluster::keys::Keys;
use hvnode_cluster::membership::{LeaseState, Membership};
use hvnode_cluster::model::{Desired, NodeRecord, NodeState};
use hvnode_cluster::placement;
use hvnode_cluster::store::{ClusterState, Store};
use hyper::StatusCode;
use tokio::sync::{watch, Notify};

use crate::error::{blocking, Error};
use crate::http::{json_response, Resp};
use crate::Agent;

/// How often a member reads the cluster state and acts on it.
pub const TICK: Duration = Duration::from_secs(1);
/// How long a node waits before it tries etcd again after a failure.
pub const RETRY: Duration = Duration::from_secs(2);
/// The membership lease's TTL (seconds): a node is lost to the others this long after its last
/// renewal.
pub const LEASE_TTL_SECS: i64 = hvnode_cluster::membership::DEFAULT_TTL_SECS;
/// Every how many ticks the node rewrites its record (free memory, vCPUs, guests running).
const RECORD_EVERY: u32 = 3;
/// An HA guest that crashes is restarted on its node this many times within
/// [`CRASH_WINDOW`]; at the next crash the node asks the leader to place it elsewhere.
pub const MAX_LOCAL_RESTARTS: usize = 3;
/// See [`MAX_LOCAL_RESTARTS`].
pub const CRASH_WINDOW: Duration = Duration::from_secs(600);

/// The node's side of the cluster: the view the API shows and the wake-up of the loop.
#[derive(Debug)]
pub struct Cluster {
    view: Mutex<ClusterView>,
    /// Bumped by every join and leave: the loop starts over when it changes.
    generation: AtomicU64,
    wake: Notify,
    /// What this member saw of lost nodes (the leader's failover decisions).
    failover: Mutex<Option<Failover>>,
    /// When each HA guest here crashed lately, and when it may start again.
    crashes: Mutex<HashMap<String, Crashes>>,
    /// The HA guests that crashed too often here: the record asks for them to go elsewhere.
    failed: Mutex<BTreeSet<String>>,
    /// The node's record is to be rewritten at the next tick, not [`RECORD_EVERY`] later.
    record_due: std::sync::atomic::AtomicBool,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            view: Mutex::new(ClusterView::not_joined()),
            generation: AtomicU64::new(0),
            wake: Notify::new(),
            failover: Mutex::new(Failover::new(crate::fencing::TIMINGS).ok()),
            crashes: Mutex::new(HashMap::new()),
            failed: Mutex::new(BTreeSet::new()),
            record_due: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    fn view(&self) -> ClusterView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ClusterView)) {
        f(&mut self.view.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Has the node's record rewritten at the next tick.
    pub(crate) fn record_now(&self) {
        self.record_due.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn take_record_due(&self) -> bool {
        self.record_due.swap(false, Ordering::SeqCst)
    }

    /// The node's connection to the cluster now (for the console and the node's info).
    pub fn connection(&self) -> ClusterConnection {
        self.view().connection
    }
}

impl Agent {
    fn cluster_config_path(&self) -> PathBuf {
        self.paths.data.join("cluster.toml")
    }

    pub(crate) fn cluster_guests_dir(&self) -> PathBuf {
        self.paths.data.join("cluster-guests")
    }

    /// Whether the guest `name` defined here is the cluster's.
    pub(crate) fn is_cluster_guest(&self, name: &str) -> bool {
        self.cluster_guests_dir().join(name).exists()
    }

    /// Whether the cluster guest `name` defined here is HA (its marker says so).
    pub(crate) fn is_ha_cluster_guest(&self, name: &str) -> bool {
        std::fs::read(self.cluster_guests_dir().join(name)).is_ok_and(|m| m.starts_with(b"ha"))
    }

    /// The cluster view with the fencing state of now.
    pub(crate) fn cluster_view_now(&self) -> ClusterView {
        let mut v = self.cluster.view();
        v.fencing = self.fencing.view();
        v.maintenance = self.maintenance.view();
        v
    }

    /// The cluster guests defined here.
    pub(crate) fn cluster_guests_here(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.cluster_guests_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| hvnode_api::guest::validate_name(n).is_ok())
            .collect();
        out.sort();
        out
    }

    /// The cluster the node was told to join, if any. A file this build cannot read is
    /// reported and treated as no cluster (the node changes nothing on a cluster's behalf).
    pub(crate) fn cluster_config(&self) -> Option<JoinCluster> {
        let text = match std::fs::read_to_string(self.cluster_config_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                self.cluster_error(format!("reading cluster.toml: {e}"));
                return None;
            }
        };
        match toml::from_str::<JoinCluster>(&text).map_err(|e| e.to_string()) {
            Ok(c) => match c.validate() {
                Ok(()) => Some(c),
                Err(e) => {
                    self.cluster_error(format!("cluster.toml: {e}"));
                    None
                }
            },
            Err(e) => {
                self.cluster_error(format!("cluster.toml: {e}"));
                None
            }
        }
    }

    fn cluster_error(&self, why: String) {
        eprintln!("agent: cluster: {why}");
        self.cluster.update(|v| {
            v.connection = ClusterConnection::NotJoined;
            v.error = Some(why);
        });
    }

    /// `GET /v1/cluster`.
    pub(crate) fn cluster_view(&self) -> Resp {
        json_response(StatusCode::OK, &self.cluster_view_now())
    }

    /// `PUT /v1/cluster` (the manager): join this cluster (or change to it). The join itself
    /// happens in the background: `202` with the view; `GET /v1/cluster` follows it.
    pub(crate) async fn join_cluster(self: &Arc<Self>, req: JoinCluster) -> Result<Resp, Error> {
        req.validate()
            .map_err(|e| Error::new(ErrorCode::InvalidCluster, e))?;
        if let Some(old) = self.cluster_config() {
            if old.node_id != req.node_id && !self.cluster_guests_here().is_empty() {
                return Err(Error::new(
                    ErrorCode::GuestRunning,
                    format!(
                        "The node runs cluster guests as {:?}: it cannot become {:?} until they \
                         are stopped or moved",
                        old.node_id, req.node_id
                    ),
                ));
            }
        }
        let text = toml::to_string(&req).map_err(|e| Error::internal("cluster.toml", e))?;
        let me = Arc::clone(self);
        blocking("Saving cluster.toml", move || {
            hvnode_base::fs::write_atomic(&me.cluster_config_path(), text.as_bytes(), 0o600)
                .map_err(|e| Error::internal("Saving cluster.toml", e))
        })
        .await?;
        self.cluster.update(|v| {
            *v = ClusterView::not_joined();
            v.connection = ClusterConnection::Connecting;
            v.node_id = Some(req.node_id.clone());
            v.endpoints = req.endpoints.clone();
        });
        self.cluster.generation.fetch_add(1, Ordering::SeqCst);
        self.cluster.wake.notify_one();
        self.events.emit(
            "cluster",
            None,
            format!(
                "joining the cluster at {} as {}",
                req.endpoints.join(","),
                req.node_id
            ),
        );
        Ok(json_response(
            StatusCode::ACCEPTED,
            &self.cluster_view_now(),
        ))
    }

    /// `DELETE /v1/cluster`: leave the cluster (the lease is revoked: the others see the node
    /// gone at once). Refused while cluster guests are defined here.
    pub(crate) async fn leave_cluster(self: &Arc<Self>) -> Result<Resp, Error> {
        let here = self.cluster_guests_here();
        if !here.is_empty() {
            return Err(Error::new(
                ErrorCode::GuestRunning,
                format!(
                    "Cluster guests are placed on this node ({}): stop them through the \
                     cluster first",
                    here.join(", ")
                ),
            ));
        }
        match std::fs::remove_file(self.cluster_config_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    ErrorCode::NotInCluster,
                    "The node is not in a cluster",
                ))
            }
            Err(e) => return Err(Error::internal("Removing cluster.toml", e)),
        }
        self.cluster.generation.fetch_add(1, Ordering::SeqCst);
        self.cluster.wake.notify_one();
        self.events.emit("cluster", None, "left the cluster");
        Ok(crate::http::no_content())
    }

    /// Starts the cluster loop (for the life of the agent).
    pub fn spawn_cluster(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.cluster_loop().await });
        self.spawn_fencing();
        self.spawn_maintenance();
    }

    async fn cluster_loop(self: Arc<Self>) {
        loop {
            let generation = self.cluster.generation.load(Ordering::SeqCst);
            let cfg = {
                let me = Arc::clone(&self);
                tokio::task::spawn_blocking(move || me.cluster_config())
                    .await
                    .ok()
                    .flatten()
            };
            let Some(cfg) = cfg else {
                self.cluster.update(|v| {
                    let error = v.error.take();
                    *v = ClusterView::not_joined();
                    v.error = error;
                });
                self.cluster.wake.notified().await;
                continue;
            };
            // A node that fenced itself waits for its watchdog's reset out of the cluster: as
            // a member it would be given guests it must not start.
            let why = if self.fencing.is_fenced() {
                Err(
                    "this node fenced itself: it joins again once its watchdog has reset it"
                        .to_owned(),
                )
            } else {
                self.member(&cfg, generation).await
            };
            if self.cluster.generation.load(Ordering::SeqCst) != generation {
                continue;
            }
            if let Err(why) = why {
                let was = self.cluster.connection();
                self.cluster.update(|v| {
                    v.connection = ClusterConnection::Unreachable;
                    v.error = Some(why.clone());
                    v.leader = None;
                });
                if was != ClusterConnection::Unreachable {
                    self.events.emit(
                        "cluster",
                        None,
                        format!("cluster unreachable: {why}; guests here keep running"),
                    );
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY) => {}
                () = self.cluster.wake.notified() => {}
            }
        }
    }

    /// One membership: joins, then ticks until the lease is lost or the configuration changes.
    async fn member(self: &Arc<Self>, cfg: &JoinCluster, generation: u64) -> Result<(), String> {
        let keys = Keys::new(&cfg.prefix).map_err(|e| e.to_string())?;
        let tls = self.etcd_tls(cfg)?;
        let client = hvnode_cluster::connect_with(&cfg.endpoints, tls.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        let record = self.node_record(cfg).await;
        let membership = Membership::join(&client, &keys, &record, LEASE_TTL_SECS)
            .await
            .map_err(|e| e.to_string())?;
        self.cluster.update(|v| {
            v.connection = ClusterConnection::Member;
            v.node_id = Some(cfg.node_id.clone());
            v.endpoints = cfg.endpoints.clone();
            v.error = None;
        });
        self.events.emit(
            "cluster",
            None,
            format!("member of the cluster as {}", cfg.node_id),
        );
        let election = Election::new(&client, &keys);
        // The campaign's outcome; the loop keeps a sender so that `changed()` fires on a change
        // only (a dropped sender would make it return at once, every time: a hot loop).
        let (lead_tx, mut lead_rx) = watch::channel(Campaign::Waiting);
        let lead_tx = std::sync::Arc::new(lead_tx);
        let campaign = {
            let election = election.clone();
            let (lease, id) = (membership.lease_id(), cfg.node_id.clone());
            let tx = std::sync::Arc::clone(&lead_tx);
            tokio::spawn(async move {
                let _ = tx.send(match election.campaign(lease, &id).await {
                    Ok(l) => Campaign::Leading(l),
                    Err(e) => Campaign::Failed(e.to_string()),
                });
            })
        };
        let store = Store::new(&client, &keys);
        let mut lease = membership.watch();
        let mut started: HashMap<String, i64> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        let mut ticks = 0u32;
        let end = loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = lease.changed() => {
                    if r.is_err() {
                        break Err("the lease keeper stopped".to_owned());
                    }
                }
                _ = lead_rx.changed() => {}
                () = self.cluster.wake.notified() => {}
            }
            if self.cluster.generation.load(Ordering::SeqCst) != generation {
                break Ok(());
            }
            if let LeaseState::Lost { reason } = lease.borrow().clone() {
                break Err(format!("membership lease lost: {reason}"));
            }
            if self.fencing.is_fenced() {
                break Err("this node fenced itself".to_owned());
            }
            self.fencing.renewed(membership.last_renewed());
            ticks = ticks.wrapping_add(1);
            // A changed maintenance mode, or HA guests that failed here, are in the record at
            // once.
            let due = self.cluster.take_record_due() | self.maintenance.record_due();
            if ticks.is_multiple_of(RECORD_EVERY) || due {
                let record = self.node_record(cfg).await;
                if let Err(e) = membership.update(&record).await {
                    self.cluster_unreachable(&e.to_string());
                    continue;
                }
            }
            let state = match store.state().await {
                Ok(s) => s,
                Err(e) => {
                    self.cluster_unreachable(&e.to_string());
                    continue;
                }
            };
            self.fencing.members(&cfg.node_id, &state.nodes);
            if let Some(f) = lock(&self.cluster.failover).as_mut() {
                f.observe(Instant::now(), &state);
            }
            let domains: Vec<_> = state.domains.iter().map(|d| d.value.clone()).collect();
            self.reconcile_domains(&domains).await;
            let leadership = match lead_rx.borrow().clone() {
                Campaign::Waiting => None,
                Campaign::Leading(l) => Some(l),
                // Membership starts over, with a new campaign.
                Campaign::Failed(why) => break Err(format!("campaigning for leadership: {why}")),
            };
            let leader = match &leadership {
                Some(l) => Some(l.value().to_owned()),
                None => election.leader().await.unwrap_or(None),
            };
            let mut reasons = HashMap::new();
            if let Some(l) = &leadership {
                reasons = lead(&store, l, &state, &self.events).await;
                self.fail_over(&store, l, &state, &mut reasons).await;
            }
            self.show(&state, leader, &reasons);
            self.reconcile(&store, &state, &cfg.node_id, &mut started)
                .await;
            // Maintenance hook: the drain works on this state (maintenance.rs).
            self.maintenance_observe(&store, &state, &cfg.node_id);
        };
        campaign.abort();
        drop(lead_tx);
        if end.is_ok() {
            // Leaving or changing cluster: the others see this node go at once.
            let _ = membership.leave().await;
        }
        end
    }

    /// TLS to etcd for `https://` endpoints: the node's manager-signed certificate and key, and
    /// the manager's CA (which signs etcd's server certificate too).
    fn etcd_tls(&self, cfg: &JoinCluster) -> Result<Option<hvnode_cluster::Tls>, String> {
        if !cfg.endpoints.iter().any(|e| e.starts_with("https://")) {
            return Ok(None);
        }
        let ca_pem = self
            .registration
            .ca_pem()
            .ok_or("TLS to etcd needs the manager's CA: the node is not registered")?;
        let (cert_pem, _) = crate::tls::load_signed(&self.paths.data.join("tls")).ok_or(
            "TLS to etcd needs the node's certificate signed by the manager: `hvnodectl node \
             certify NODE`",
        )?;
        Ok(Some(hvnode_cluster::Tls {
            ca_pem,
            cert_pem,
            key_pem: self.identity.key_pem.clone(),
        }))
    }

    fn cluster_unreachable(&self, why: &str) {
        let was = self.cluster.connection();
        self.cluster.update(|v| {
            v.connection = ClusterConnection::Unreachable;
            v.error = Some(why.to_owned());
        });
        if was == ClusterConnection::Member {
            self.events.emit(
                "cluster",
                None,
                format!("cluster unreachable: {why}; guests here keep running"),
            );
        }
    }

    /// The view `GET /v1/cluster` shows, from a state read at one revision.
    fn show(
        &self,
        state: &ClusterState,
        leader: Option<String>,
        reasons: &HashMap<String, String>,
    ) {
        let running: HashMap<&str, &str> = state
            .nodes
            .iter()
            .flat_map(|n| n.guests_running.iter().map(|g| (g.as_str(), n.id.as_str())))
            .collect();
        let members = state
            .nodes
            .iter()
            .map(|n| ClusterMember {
                id: n.id.clone(),
                address: n.address.clone(),
                state: match n.state {
                    NodeState::Active => "active",
                    NodeState::Maintenance => "maintenance",
                }
                .to_owned(),
                mem_total_mib: n.mem_total_mib,
                mem_free_mib: n.mem_free_mib,
                vcpus_total: n.vcpus_total,
                vcpus_used: n.vcpus_used,
                guests_running: n.guests_running.clone(),
                domains: n.domains.clone(),
                agent_version: n.agent_version.clone(),
                heartbeat_unix: n.heartbeat_unix,
                watchdog: n.watchdog.clone(),
            })
            .collect();
        let guests = state
            .guests
            .iter()
            .map(|g| {
                let g = &g.value;
                let placed = state.placements.iter().find(|p| p.value.guest == g.name());
                ClusterGuestView {
                    name: g.name().to_owned(),
                    memory_mib: g.memory_mib(),
                    vcpus: g.vcpus(),
                    desired: desired_str(g.desired).to_owned(),
                    ha: g.ha,
                    priority: g.priority,
                    pinned: g.pinned.clone(),
                    node: placed.map(|p| p.value.node.clone()),
                    reason: reasons
                        .get(g.name())
                        .cloned()
                        .or_else(|| placed.map(|p| p.value.reason.clone())),
                    running: placed
                        .is_some_and(|p| running.get(g.name()) == Some(&p.value.node.as_str())),
                }
            })
            .collect();
        let health = self.domains.health();
        let domains = state
            .domains
            .iter()
            .map(|d| {
                let d = &d.value;
                DomainView {
                    name: d.name.clone(),
                    server: d.server.clone(),
                    export: d.export.clone(),
                    nfs_version: d.nfs_version.clone(),
                    options: d.options.clone(),
                    here: health
                        .iter()
                        .find(|h| h.name == d.name)
                        .cloned()
                        .unwrap_or_default(),
                }
            })
            .collect();
        self.cluster.update(|v| {
            v.connection = ClusterConnection::Member;
            v.error = None;
            v.domains = domains;
            v.leader = leader;
            v.revision = state.revision;
            v.members = members;
            v.guests = guests;
        });
    }

    /// This node's record: its room and the cluster guests it runs.
    async fn node_record(self: &Arc<Self>, cfg: &JoinCluster) -> NodeRecord {
        let me = Arc::clone(self);
        let id = cfg.node_id.clone();
        let address = cfg.address.clone();
        tokio::task::spawn_blocking(move || {
            let (total, available) = crate::node::facts::memory();
            let specs = me.guest_specs();
            let vcpus_used = specs
                .iter()
                .filter(|s| me.running.is_active(&s.name))
                .map(|s| s.vcpus)
                .sum();
            let guests_running = me
                .cluster_guests_here()
                .into_iter()
                .filter(|n| me.running.is_active(n))
                .collect();
            NodeRecord {
                format: 0,
                id,
                address,
                state: me.maintenance.node_state(),
                mem_total_mib: total >> 20,
                mem_free_mib: available >> 20,
                vcpus_total: std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1),
                vcpus_used,
                agent_version: hvnode_api::VERSION.to_owned(),
                heartbeat_unix: crate::unix_secs(),
                guests_running,
                domains: me.domains.health(),
                fingerprint: me.fingerprint.clone(),
                watchdog: me.fencing.watchdog(),
                guests_failed: lock(&me.cluster.failed).iter().cloned().collect(),
            }
        })
        .await
        .unwrap_or_else(|_| NodeRecord {
            id: cfg.node_id.clone(),
            address: cfg.address.clone(),
            agent_version: hvnode_api::VERSION.to_owned(),
            heartbeat_unix: crate::unix_secs(),
            fingerprint: self.fingerprint.clone(),
            ..NodeRecord::default()
        })
    }

    /// Runs what the cluster placed here and stops what it did not. `started` remembers the
    /// placement revision each guest was started for: a guest that stopped or crashed since is
    /// not started again for the same placement (a new placement starts it).
    async fn reconcile(
        self: &Arc<Self>,
        store: &Store,
        state: &ClusterState,
        me: &str,
        started: &mut HashMap<String, i64>,
    ) {
        // A fenced node waits for its watchdog's reset: nothing starts here again (what the
        // cluster no longer places here still goes).
        let fenced = self.fencing.is_fenced();
        for p in state.placements.iter().filter(|p| p.value.node == me) {
            let name = p.value.guest.clone();
            let Some(g) = state.guests.iter().find(|g| g.value.name() == name) else {
                continue;
            };
            let active = self.running.is_active(&name);
            // Maintenance hooks: a guest a drain migrated here becomes the cluster's here; a
            // node in maintenance starts no cluster guest (its drain unplaces them).
            if active && !self.is_cluster_guest(&name) {
                self.adopt_migrated(&name, g.value.ha);
            }
            match g.value.desired {
                Desired::Running if self.maintenance.blocks_start(&name) => {}
                Desired::Running
                    if !fenced && !active && started.get(&name) != Some(&p.revision) =>
                {
                    // Ownership checked by revision right before the start: the placement
                    // read in the state must still be the one in etcd.
                    match store.get_placement(&name).await {
                        Ok(Some(now)) if now.revision == p.revision && now.value.node == me => {}
                        Ok(_) => continue,
                        Err(e) => {
                            self.cluster_unreachable(&e.to_string());
                            return;
                        }
                    }
                    started.insert(name.clone(), p.revision);
                    let me2 = Arc::clone(self);
                    let spec = g.value.spec.clone();
                    let ha = g.value.ha;
                    let reason = p.value.reason.clone();
                    let r = tokio::task::spawn_blocking(move || me2.start_cluster_guest(&spec, ha))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()));
                    match r {
                        Ok(()) => {
                            if ha {
                                // On the console too: the HA timeline is read from it.
                                self.announce(&format!("ha: started {name} here ({reason})"))
                                    .await;
                            }
                            self.events.emit(
                                "cluster",
                                Some(&name),
                                format!("placed here by the cluster ({reason}): started"),
                            )
                        }
                        Err(why) => self.events.emit(
                            "cluster",
                            Some(&name),
                            format!("placed here by the cluster, but it does not start: {why}"),
                        ),
                    }
                }
                Desired::Running if !active && g.value.ha => self.crashed_here(&name, started),
                Desired::Stopped if active => {
                    let me2 = Arc::clone(self);
                    let n = name.clone();
                    let r = tokio::task::spawn_blocking(move || me2.running.stop(&n)).await;
                    if let Ok(Err(e)) = r {
                        eprintln!("agent: cluster: stopping {name}: {e}");
                    } else {
                        self.events
                            .emit("cluster", Some(&name), "stopped by the cluster");
                    }
                }
                _ => {}
            }
        }
        // Cluster guests defined here that the cluster no longer places here: stop and forget.
        for name in self.cluster_guests_here() {
            let placed_here = state
                .placements
                .iter()
                .any(|p| p.value.guest == name && p.value.node == me);
            if placed_here {
                continue;
            }
            if self.running.state(&name).state == GuestState::Migrating {
                continue;
            }
            started.remove(&name);
            lock(&self.cluster.crashes).remove(&name);
            if lock(&self.cluster.failed).remove(&name) {
                self.cluster.record_now();
            }
            let me2 = Arc::clone(self);
            let n = name.clone();
            let _ = tokio::task::spawn_blocking(move || me2.drop_cluster_guest(&n)).await;
            self.events.emit(
                "cluster",
                Some(&name),
                "no longer placed on this node: its VMM stopped, its definition removed",
            );
        }
    }

    /// An HA guest placed here, started for its placement, has no VMM: if it crashed, it is
    /// started again here ([`MAX_LOCAL_RESTARTS`] times within [`CRASH_WINDOW`]), then the
    /// node's record asks the leader to place it elsewhere. A guest that powered itself off
    /// stays off (an admin's or the guest's own decision).
    fn crashed_here(&self, name: &str, started: &mut HashMap<String, i64>) {
        let rt = self.running.state(name);
        if rt.state != GuestState::Crashed || lock(&self.cluster.failed).contains(name) {
            return;
        }
        let now = Instant::now();
        let count = {
            let mut crashes = lock(&self.cluster.crashes);
            let c = crashes.entry(name.to_owned()).or_default();
            match c.restart_at {
                Some(at) if now < at => return,
                Some(_) => {
                    // The wait is over: the next tick starts it, after the same ownership
                    // check as any start.
                    c.restart_at = None;
                    started.remove(name);
                    return;
                }
                None => {}
            }
            c.at.retain(|t| now.saturating_duration_since(*t) < CRASH_WINDOW);
            c.at.push(now);
            if c.at.len() <= MAX_LOCAL_RESTARTS {
                c.restart_at = Some(now + restart_delay(c.at.len()));
            }
            c.at.len()
        };
        let why = rt.crash_reason.unwrap_or_else(|| "its VMM died".into());
        if count <= MAX_LOCAL_RESTARTS {
            self.events.emit(
                "ha",
                Some(name),
                format!(
                    "crashed ({why}): restarting it on this node in {} s ({count} of \
                     {MAX_LOCAL_RESTARTS} within {} min)",
                    restart_delay(count).as_secs(),
                    CRASH_WINDOW.as_secs() / 60
                ),
            );
        } else {
            lock(&self.cluster.failed).insert(name.to_owned());
            self.cluster.record_now();
            self.events.emit(
                "ha",
                Some(name),
                format!(
                    "crashed ({why}) {count} times within {} min: asking the cluster to \
                     restart it on another node",
                    CRASH_WINDOW.as_secs() / 60
                ),
            );
        }
    }

    /// The leader's failover: moves the HA guests of lost nodes (once they are certainly
    /// fenced) and of nodes where they crash too often; says why the others wait.
    async fn fail_over(
        &self,
        store: &Store,
        leadership: &Leadership,
        state: &ClusterState,
        reasons: &mut HashMap<String, String>,
    ) {
        let decisions = match lock(&self.cluster.failover).as_mut() {
            Some(f) => f.decide(Instant::now(), state),
            None => return,
        };
        reasons.extend(decisions.waiting);
        for r in decisions.restarts {
            match store
                .move_placement(
                    Some(leadership),
                    &r.guest,
                    r.placement_revision,
                    &r.to,
                    &r.reason,
                )
                .await
            {
                Ok(_) => {
                    eprintln!("agent: ha: {} goes to {}: {}", r.guest, r.to, r.reason);
                    self.events.emit(
                        "ha",
                        Some(&r.guest),
                        format!("restarting it on {} ({})", r.to, r.reason),
                    );
                }
                Err(e) => {
                    reasons.insert(r.guest.clone(), format!("moving it to {}: {e}", r.to));
                }
            }
        }
    }

    /// Defines a cluster guest here (replacing an earlier definition of it) and starts it;
    /// `ha` is kept in its marker (the guard kills HA guests when the node fences itself).
    fn start_cluster_guest(&self, spec: &GuestSpec, ha: bool) -> Result<(), String> {
        spec.validate().map_err(|e| e.to_string())?;
        let path = self.guest_path(&spec.name).map_err(|e| e.message)?;
        if path.exists() && !self.is_cluster_guest(&spec.name) {
            return Err(format!(
                "a node guest named {:?} is defined on this node",
                spec.name
            ));
        }
        self.mark_cluster_guest(&spec.name, ha)
            .map_err(|e| e.to_string())?;
        let text = toml::to_string(spec).map_err(|e| e.to_string())?;
        hvnode_base::fs::write_atomic(&path, text.as_bytes(), 0o644).map_err(|e| e.to_string())?;
        self.running
            .start(spec)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Marks the guest `name` defined here as the cluster's; `ha` is kept in the marker (the
    /// guard kills HA guests when the node fences itself).
    pub(crate) fn mark_cluster_guest(&self, name: &str, ha: bool) -> std::io::Result<()> {
        let dir = self.cluster_guests_dir();
        std::fs::create_dir_all(&dir)?;
        let mark: &[u8] = if ha { b"ha\n" } else { b"" };
        hvnode_base::fs::write_atomic(&dir.join(name), mark, 0o644)
    }

    /// Stops a cluster guest's VMM here and removes its definition.
    fn drop_cluster_guest(&self, name: &str) {
        if self.running.is_active(name) {
            if let Err(e) = self.running.stop(name) {
                eprintln!("agent: cluster: stopping {name}: {e}");
                return;
            }
        }
        if let Ok(path) = self.guest_path(name) {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_file(self.cluster_guests_dir().join(name));
        self.running.forget(name);
    }
}

/// How long an HA guest that crashed for the `n`th time (from 1) waits before it starts again
/// on its node: 4, 8, 16 s. Long enough in all for a disk lock held by a dead node's VMM to
/// lapse on an NFS server with a 10 s lease (docs/ha.md).
fn restart_delay(n: usize) -> Duration {
    Duration::from_secs(2 << n.min(6))
}

/// An HA guest's recent crashes on this node.
#[derive(Debug, Default)]
struct Crashes {
    at: Vec<Instant>,
    /// The restart waits until then (a backoff: a disk still locked by a dead node's VMM is
    /// free once the storage server's lease for that node runs out).
    restart_at: Option<Instant>,
}

/// Where the node's campaign for leadership stands.
#[derive(Clone)]
enum Campaign {
    /// Another node leads; this one waits its turn.
    Waiting,
    /// This node leads.
    Leading(Leadership),
    /// The campaign failed (etcd): membership starts over.
    Failed(String),
}

fn desired_str(d: Desired) -> &'static str {
    match d {
        Desired::Running => "running",
        Desired::Stopped => "stopped",
    }
}

/// The leader's work on one state: place each guest that should run and has no node (highest
/// priority first), and remove the placement of each guest that should not run once its node
/// no longer runs it (or is gone). Returns why each unplaced guest could not be placed.
async fn lead(
    store: &Store,
    leadership: &Leadership,
    state: &ClusterState,
    events: &crate::events::EventLog,
) -> HashMap<String, String> {
    let mut reasons = HashMap::new();
    let guests: Vec<_> = state.guests.iter().map(|g| g.value.clone()).collect();
    let mut placements: Vec<_> = state.placements.iter().map(|p| p.value.clone()).collect();
    let mut order: Vec<_> = state.guests.iter().collect();
    order.sort_by(|a, b| {
        b.value
            .priority
            .cmp(&a.value.priority)
            .then(a.value.name().cmp(b.value.name()))
    });
    for g in order {
        let name = g.value.name();
        let placed = state.placements.iter().find(|p| p.value.guest == name);
        match (g.value.desired, placed) {
            (Desired::Running, None) => {
                match placement::place(&g.value, &state.nodes, &placements, &guests) {
                    Ok(node) => {
                        let reason = if g.value.pinned.is_some() {
                            "pinned to this node".to_owned()
                        } else {
                            "most free memory".to_owned()
                        };
                        match store
                            .place_as_leader(leadership, name, &node, g.revision, &reason)
                            .await
                        {
                            Ok(_) => {
                                events.emit(
                                    "cluster",
                                    Some(name),
                                    format!("placed on {node} ({reason})"),
                                );
                                placements.push(hvnode_cluster::model::Placement {
                                    format: 0,
                                    guest: name.to_owned(),
                                    node,
                                    placed_at_revision: g.revision,
                                    reason,
                                });
                            }
                            Err(e) => {
                                reasons.insert(name.to_owned(), format!("placing it: {e}"));
                            }
                        }
                    }
                    Err(no_room) => {
                        reasons.insert(name.to_owned(), no_room.reason);
                    }
                }
            }
            (Desired::Stopped, Some(p)) => {
                let node = state.nodes.iter().find(|n| n.id == p.value.node);
                let still_runs = node.is_some_and(|n| n.guests_running.iter().any(|r| r == name));
                if !still_runs {
                    match store.unplace(name, p.revision).await {
                        Ok(()) => events.emit(
                            "cluster",
                            Some(name),
                            format!("stopped: no longer placed on {}", p.value.node),
                        ),
                        Err(e) => {
                            reasons.insert(name.to_owned(), format!("unplacing it: {e}"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    reasons
}
