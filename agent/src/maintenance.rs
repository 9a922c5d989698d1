//! Maintenance mode (docs/maintenance.md): a node that takes no new guests and moves its cluster
//! guests to other nodes, one at a time, so that it can be rebooted or updated without any
//! guest noticing.
//!
//! The mode is kept in `<data>/maintenance.toml` (on/off and the policy), so a reboot keeps the
//! node in maintenance and the drain resumes. While it is on, the node's record says
//! `maintenance` (the leader places nothing new here), the node starts no cluster guest placed
//! here, and one task (the drain) works through the cluster guests placed here on each state
//! the cluster loop reads ([`Agent::maintenance_observe`]):
//!
//! - a guest that can live-migrate goes to the node [`placement::place`] chooses, pinned by
//!   that node's fingerprint, through the node's own migration code; once it runs there, its
//!   placement follows it ([`Store::move_placement`]), and the destination adopts it
//!   ([`Agent::adopt_migrated`]);
//! - a guest that cannot (a writable disk on this node's storage) is shut down here and
//!   unplaced, so that the leader starts it elsewhere (policy `restart`), or the drain stops
//!   there and says why (policy `stop`);
//! - a guest placed here that does not run is unplaced (the leader places it elsewhere).
//!
//! A failed migration is tried once more on another node; then, or when no node has room, the
//! drain stops with the reason. Turning the mode off stops the drain after the step under way:
//! a migration in progress finishes (the guest stays where it arrived, its placement with it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvnode_api::cluster::{
    DrainAction, DrainPolicy, DrainStep, MaintenanceState, MaintenanceView, SetMaintenance,
};
use hvnode_api::error::ErrorCode;
use hvnode_api::guest::GuestState;
use hvnode_api::migration::{Direction, MigrateRequest};
use hvnode_api::vmm::MigrationPhase;
use hvnode_cluster::model::{ClusterGuest, Desired, NodeRecord, NodeState};
use hvnode_cluster::placement;
use hvnode_cluster::store::{ClusterState, Store};
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::{blocking, Error};
use crate::http::{json_response, Resp};
use crate::Agent;

/// How long a guest that cannot migrate may take to shut down before it is stopped.
const SHUTDOWN_TIMEOUT: Duration = crate::guests::vmms::REBOOT_TIMEOUT;
/// How often the drain reads a migration's progress.
const POLL: Duration = Duration::from_millis(250);
/// Migrations tried per guest (on different nodes) before the drain stops.
const ATTEMPTS: usize = 2;

/// What `<data>/maintenance.toml` keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Settings {
    on: bool,
    #[serde(default)]
    policy: DrainPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    downtime_limit_ms: Option<u64>,
}

/// The node's maintenance mode: its settings, the drain's progress, and the latest cluster
/// state the drain works on.
#[derive(Debug, Default)]
pub struct Maintenance {
    inner: Mutex<Inner>,
    /// Woken by each state the cluster loop reads.
    wake: Notify,
    /// The drain task runs.
    spawned: AtomicBool,
}

#[derive(Debug, Default)]
struct Inner {
    settings: Settings,
    state: MaintenanceState,
    guests_left: Vec<String>,
    current: Option<DrainStep>,
    message: Option<String>,
    /// The node's record must be rewritten at the next tick (the mode changed).
    record_due: bool,
    observed: Option<Observed>,
    /// The migrations that failed in this drain: guest → (node, why).
    failed: HashMap<String, Vec<(String, String)>>,
    /// The drain acts only on a state read after its own last write.
    after_revision: i64,
}

/// A state the cluster loop read, with what the drain needs to act on it.
#[derive(Debug, Clone)]
struct Observed {
    store: Store,
    state: Arc<ClusterState>,
    me: String,
}

impl Maintenance {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mode as kept in `path` (off when there is no file; a file this build cannot read
    /// is reported and taken as on, the safe side: the node takes no new guests).
    pub fn load(path: &std::path::Path) -> Maintenance {
        let settings = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).unwrap_or_else(|e| {
                eprintln!("agent: {}: {e}; maintenance mode stays on", path.display());
                Settings {
                    on: true,
                    policy: DrainPolicy::Stop,
                    downtime_limit_ms: None,
                }
            }),
            Err(_) => Settings::default(),
        };
        let m = Maintenance::default();
        {
            let mut i = m.lock();
            i.settings = settings;
            i.state = if settings.on {
                MaintenanceState::Draining
            } else {
                MaintenanceState::Off
            };
            i.record_due = settings.on;
        }
        m
    }

    /// What `GET /v1/cluster` shows in `maintenance`.
    pub fn view(&self) -> MaintenanceView {
        let i = self.lock();
        MaintenanceView {
            on: i.settings.on,
            policy: i.settings.policy,
            state: i.state,
            guests_left: i.guests_left.clone(),
            current: i.current.clone(),
            message: i.message.clone(),
        }
    }

    /// The state the node's record gives.
    pub fn node_state(&self) -> NodeState {
        if self.lock().settings.on {
            NodeState::Maintenance
        } else {
            NodeState::Active
        }
    }

    /// Whether the node's record must be rewritten now (the mode changed); asking clears it.
    pub fn record_due(&self) -> bool {
        std::mem::take(&mut self.lock().record_due)
    }

    /// Whether the node must not start the cluster guest `name` placed here: in maintenance it
    /// starts none (the drain unplaces them), and never the guest the drain is moving.
    pub fn blocks_start(&self, name: &str) -> bool {
        let i = self.lock();
        i.settings.on || i.current.as_ref().is_some_and(|c| c.guest == name)
    }
}

impl Agent {
    fn maintenance_path(&self) -> PathBuf {
        self.paths.data.join("maintenance.toml")
    }

    /// `PUT /v1/cluster/maintenance`: the mode on or off, kept across reboots. On needs a
    /// cluster (`not_in_cluster`); off is always taken.
    pub(crate) async fn set_maintenance(
        self: &Arc<Self>,
        req: SetMaintenance,
    ) -> Result<Resp, Error> {
        if let Some(ms) = req
            .downtime_limit_ms
            .filter(|ms| !(1..=600_000).contains(ms))
        {
            return Err(Error::new(
                ErrorCode::InvalidMigration,
                format!("downtime_limit_ms is {ms}: give 1 to 600000 (ms), or leave it out"),
            ));
        }
        if req.on && self.cluster_config().is_none() {
            return Err(Error::new(
                ErrorCode::NotInCluster,
                "The node is not in a cluster: maintenance mode moves cluster guests to other \
                 nodes; join a cluster first (`hvnodectl cluster join NODE`)",
            ));
        }
        let settings = Settings {
            on: req.on,
            policy: req.policy,
            downtime_limit_ms: req.downtime_limit_ms,
        };
        let text =
            toml::to_string(&settings).map_err(|e| Error::internal("maintenance.toml", e))?;
        let path = self.maintenance_path();
        blocking("Saving maintenance.toml", move || {
            hvnode_base::fs::write_atomic(&path, text.as_bytes(), 0o644)
                .map_err(|e| Error::internal("Saving maintenance.toml", e))
        })
        .await?;
        let was = {
            let mut i = self.maintenance.lock();
            let was = i.settings.on;
            i.settings = settings;
            i.record_due = true;
            i.message = None;
            i.failed.clear();
            if req.on {
                i.state = MaintenanceState::Draining;
            } else {
                i.state = MaintenanceState::Off;
                i.guests_left.clear();
            }
            was
        };
        let message = match (was, req.on) {
            (_, true) => format!(
                "maintenance mode on (policy {}): the node takes no new guests; its cluster \
                 guests move to other nodes",
                req.policy.as_str()
            ),
            (true, false) => "maintenance mode off: the node takes guests again; a migration \
                              under way finishes, nothing more moves"
                .to_owned(),
            (false, false) => "maintenance mode off (it was off)".to_owned(),
        };
        self.events.emit("maintenance", None, message);
        self.maintenance.wake.notify_one();
        Ok(json_response(StatusCode::OK, &self.maintenance.view()))
    }

    /// Starts the drain task (once, for the life of the agent).
    pub fn spawn_maintenance(self: &Arc<Self>) {
        if self.maintenance.spawned.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move { me.drain_loop().await });
    }

    /// The cluster loop's hook: the state it read, for the drain.
    pub(crate) fn maintenance_observe(&self, store: &Store, state: &ClusterState, me: &str) {
        self.maintenance.lock().observed = Some(Observed {
            store: store.clone(),
            state: Arc::new(state.clone()),
            me: me.to_owned(),
        });
        self.maintenance.wake.notify_one();
    }

    /// The reconcile hook on a destination: a cluster guest placed here that runs here without
    /// the cluster's mark arrived by migration (a drain moved it and its placement): it becomes
    /// the cluster's here. A node guest of the same name is left alone.
    pub(crate) fn adopt_migrated(&self, name: &str, ha: bool) {
        let arrived = self.migrations.view(name).is_some_and(|v| {
            v.direction == Direction::Incoming && v.status.phase == MigrationPhase::Completed
        });
        if !arrived {
            return;
        }
        match self.mark_cluster_guest(name, ha) {
            Ok(()) => self.events.emit(
                "cluster",
                Some(name),
                "arrived by migration and placed here by the cluster: runs here as the cluster's",
            ),
            Err(e) => eprintln!("agent: cluster: marking {name} as the cluster's: {e}"),
        }
    }

    async fn drain_loop(self: Arc<Self>) {
        loop {
            self.maintenance.wake.notified().await;
            let (settings, observed, after) = {
                let i = self.maintenance.lock();
                (i.settings, i.observed.clone(), i.after_revision)
            };
            let Some(obs) = observed else { continue };
            if !settings.on || obs.state.revision <= after {
                continue;
            }
            if self.maintenance.lock().state == MaintenanceState::Stopped {
                continue;
            }
            self.drain_once(&obs, settings.policy).await;
        }
    }

    /// One step of the drain on the state `obs`.
    async fn drain_once(self: &Arc<Self>, obs: &Observed, policy: DrainPolicy) {
        let active = |n: &str| self.running.is_active(n);
        let left = guests_left(&obs.state, &obs.me, &self.cluster_guests_here(), &active);
        let failed = self.maintenance.lock().failed.clone();
        let step = next_step(
            &obs.state,
            &obs.me,
            policy,
            &left,
            &active,
            &|g| crate::migration::can_migrate(&g.spec).map_err(|e| e.message),
            &failed,
        );
        {
            let mut i = self.maintenance.lock();
            i.guests_left = left;
            i.message = None;
        }
        match step {
            Step::Drained => {
                let was = std::mem::replace(
                    &mut self.maintenance.lock().state,
                    MaintenanceState::Drained,
                );
                if was != MaintenanceState::Drained {
                    self.events.emit(
                        "maintenance",
                        None,
                        "drained: no cluster guest is left on this node; it can be rebooted or \
                         updated",
                    );
                }
            }
            Step::Wait(why) => {
                let mut i = self.maintenance.lock();
                i.state = MaintenanceState::Draining;
                i.message = Some(why);
            }
            Step::Stop(why) => self.drain_stopped(why),
            Step::Unplace {
                guest,
                placement_revision,
            } => {
                self.maintenance.lock().state = MaintenanceState::Draining;
                match obs.store.unplace(&guest, placement_revision).await {
                    Ok(()) => {
                        self.events.emit(
                            "maintenance",
                            Some(&guest),
                            "not running here: unplaced, the cluster places it on another node",
                        );
                        self.maintenance.lock().after_revision = obs.state.revision;
                    }
                    Err(e) => {
                        self.maintenance.lock().message = Some(format!("unplacing {guest}: {e}"))
                    }
                }
            }
            Step::Migrate {
                guest,
                placement_revision,
                to,
            } => {
                self.drain_migrate(obs, &guest, placement_revision, &to)
                    .await
            }
            Step::Restart {
                guest,
                placement_revision,
                to,
                why,
            } => {
                self.drain_restart(obs, &guest, placement_revision, &to, &why)
                    .await
            }
        }
    }

    fn drain_stopped(&self, why: String) {
        {
            let mut i = self.maintenance.lock();
            i.state = MaintenanceState::Stopped;
            i.current = None;
            i.message = Some(why.clone());
        }
        self.events
            .emit("maintenance", None, format!("drain stopped: {why}"));
    }

    fn set_current(&self, guest: &str, to: &str, action: DrainAction) {
        let mut i = self.maintenance.lock();
        i.state = MaintenanceState::Draining;
        i.current = Some(DrainStep {
            guest: guest.to_owned(),
            to: to.to_owned(),
            action,
        });
    }

    /// Migrates `guest` to `to`, waits for the outcome, and on completion moves its placement
    /// there; a failure is remembered (the next step tries another node, or stops).
    async fn drain_migrate(
        self: &Arc<Self>,
        obs: &Observed,
        guest: &str,
        placement_revision: i64,
        to: &NodeRecord,
    ) {
        self.set_current(guest, &to.id, DrainAction::Migrating);
        let url = node_url(&to.address);
        self.events.emit(
            "maintenance",
            Some(guest),
            format!("migrating to {} ({url}) for maintenance", to.id),
        );
        let req = MigrateRequest {
            to: url,
            to_fingerprint: to.fingerprint.clone(),
            downtime_limit_ms: self.maintenance.lock().settings.downtime_limit_ms,
            max_passes: None,
            timeout_secs: None,
            verify_memory: false,
        };
        let outcome = match self.start_migration(guest.to_owned(), req).await {
            Err(e) => Err(e.message),
            Ok(_) => loop {
                match self.migrations.view(guest) {
                    Some(v) if v.status.phase.in_progress() => tokio::time::sleep(POLL).await,
                    Some(v) if v.status.phase == MigrationPhase::Completed => break Ok(()),
                    Some(v) => {
                        break Err(v
                            .status
                            .error
                            .unwrap_or_else(|| "the migration did not complete".into()))
                    }
                    None => break Err("the migration is not known here".into()),
                }
            },
        };
        match outcome {
            Ok(()) => {
                let reason = format!("migrated off {} for maintenance", obs.me);
                let moved = obs
                    .store
                    .move_placement(None, guest, placement_revision, &to.id, &reason)
                    .await;
                self.maintenance.lock().current = None;
                match moved {
                    Ok(revision) => {
                        self.maintenance.lock().after_revision = revision;
                        self.events.emit(
                            "maintenance",
                            Some(guest),
                            format!("runs on {} now; its placement moved there", to.id),
                        );
                    }
                    Err(e) => self.drain_stopped(format!(
                        "{guest} runs on {} now, but its placement could not follow: {e}; \
                         check `hvnodectl cluster status`",
                        to.id
                    )),
                }
            }
            Err(why) => {
                self.maintenance.lock().current = None;
                self.events.emit(
                    "maintenance",
                    Some(guest),
                    format!("migration to {} failed: {why}", to.id),
                );
                if self.running.state(guest).state == GuestState::Paused {
                    // The outcome is unknown: the guest may run on the destination.
                    return self.drain_stopped(format!(
                        "the migration of {guest} to {} ended with its outcome unknown: {why}; \
                         it stays paused here until you check {}",
                        to.id, to.id
                    ));
                }
                self.maintenance
                    .lock()
                    .failed
                    .entry(guest.to_owned())
                    .or_default()
                    .push((to.id.clone(), why));
            }
        }
    }

    /// Shuts `guest` down here (stopped if it is not down in time) and unplaces it: the leader
    /// starts it on another node (this one is in maintenance).
    async fn drain_restart(
        self: &Arc<Self>,
        obs: &Observed,
        guest: &str,
        placement_revision: i64,
        to: &str,
        why: &str,
    ) {
        self.set_current(guest, to, DrainAction::RestartingElsewhere);
        self.events.emit(
            "maintenance",
            Some(guest),
            format!(
                "cannot live-migrate ({why}): shutting it down here (stopped after {} s) so that \
                 the cluster starts it on another node (policy restart)",
                SHUTDOWN_TIMEOUT.as_secs()
            ),
        );
        let me = Arc::clone(self);
        let name = guest.to_owned();
        let _ = tokio::task::spawn_blocking(move || {
            if me.running.shutdown(&name, Some(SHUTDOWN_TIMEOUT)).is_ok() {
                let deadline = Instant::now() + SHUTDOWN_TIMEOUT + Duration::from_secs(10);
                while me.running.is_active(&name) && Instant::now() < deadline {
                    std::thread::sleep(POLL);
                }
            }
            if me.running.is_active(&name) {
                if let Err(e) = me.running.stop(&name) {
                    eprintln!("agent: maintenance: stopping {name}: {e}");
                }
            }
        })
        .await;
        self.maintenance.lock().current = None;
        if self.running.is_active(guest) {
            return self.drain_stopped(format!("{guest} does not stop here"));
        }
        match obs.store.unplace(guest, placement_revision).await {
            Ok(()) => {
                self.maintenance.lock().after_revision = obs.state.revision;
                self.events.emit(
                    "maintenance",
                    Some(guest),
                    "shut down here and unplaced: the cluster starts it on another node",
                );
            }
            Err(e) => self.drain_stopped(format!(
                "{guest} is shut down here, but unplacing it failed: {e}"
            )),
        }
    }
}

/// The agent's URL from a node record's address (`https://host:port`, or `host:port` as older
/// records have it).
fn node_url(address: &str) -> String {
    if address.starts_with("https://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    }
}

/// What the drain does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// No cluster guest is left here.
    Drained,
    /// Nothing to do on this state; the reason is shown.
    Wait(String),
    /// Stop the drain, with the reason.
    Stop(String),
    /// A guest placed here that does not run here: unplace it.
    Unplace {
        guest: String,
        placement_revision: i64,
    },
    /// Live-migrate a guest to `to`.
    Migrate {
        guest: String,
        placement_revision: i64,
        to: NodeRecord,
    },
    /// Shut a guest that cannot migrate down here and unplace it (`to` has room for it now).
    Restart {
        guest: String,
        placement_revision: i64,
        to: String,
        why: String,
    },
}

/// The cluster guests on node `me`, in the order the drain takes them: highest priority
/// first, then by name. Those placed here, and those marked here (`marked`) that still run
/// here (the node stops them).
pub(crate) fn guests_left(
    state: &ClusterState,
    me: &str,
    marked: &[String],
    active: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let mut left: Vec<(i32, String)> = state
        .placements
        .iter()
        .filter(|p| p.value.node == me)
        .map(|p| p.value.guest.clone())
        .chain(marked.iter().filter(|n| active(n)).cloned())
        .map(|name| {
            let priority = state
                .guests
                .iter()
                .find(|g| g.value.name() == name)
                .map_or(0, |g| g.value.priority);
            (priority, name)
        })
        .collect();
    left.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    left.dedup();
    left.into_iter().map(|(_, n)| n).collect()
}

/// The drain's next step on `state` for the guests `left` (in order): the first guest that
/// can be acted on decides. `can_migrate` says why a guest cannot live-migrate; `failed` holds
/// the nodes a guest's migration failed to in this drain.
pub(crate) fn next_step(
    state: &ClusterState,
    me: &str,
    policy: DrainPolicy,
    left: &[String],
    active: &dyn Fn(&str) -> bool,
    can_migrate: &dyn Fn(&ClusterGuest) -> Result<(), String>,
    failed: &HashMap<String, Vec<(String, String)>>,
) -> Step {
    let Some(name) = left.first() else {
        return Step::Drained;
    };
    let here = state.nodes.iter().find(|n| n.id == me);
    if here.is_none_or(|n| n.state != NodeState::Maintenance) {
        return Step::Wait("waiting for the node's record to say maintenance".into());
    }
    let placement = state
        .placements
        .iter()
        .find(|p| p.value.guest == *name && p.value.node == me);
    let guest = state.guests.iter().find(|g| g.value.name() == name);
    let (Some(p), Some(g)) = (placement, guest) else {
        return Step::Wait(format!(
            "{name} is no longer placed here: the node stops it"
        ));
    };
    let g = &g.value;
    if g.desired == Desired::Stopped {
        return Step::Wait(format!("{name} is being stopped by the cluster"));
    }
    if !active(name) {
        return Step::Unplace {
            guest: name.clone(),
            placement_revision: p.revision,
        };
    }
    let tried = failed.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[]);
    let placements: Vec<_> = state.placements.iter().map(|p| p.value.clone()).collect();
    let guests: Vec<_> = state.guests.iter().map(|g| g.value.clone()).collect();
    let others = |migrating: bool| -> Vec<NodeRecord> {
        state
            .nodes
            .iter()
            .filter(|n| n.id != me && !tried.iter().any(|(t, _)| *t == n.id))
            .filter(|n| !migrating || !n.fingerprint.is_empty())
            .cloned()
            .collect()
    };
    match can_migrate(g) {
        Ok(()) => {
            if tried.len() >= ATTEMPTS {
                return Step::Stop(format!(
                    "migrating {name} failed {} times: {}",
                    tried.len(),
                    failures(tried)
                ));
            }
            let nodes = others(true);
            match placement::place(g, &nodes, &placements, &guests) {
                Ok(id) => Step::Migrate {
                    guest: name.clone(),
                    placement_revision: p.revision,
                    to: nodes.into_iter().find(|n| n.id == id).unwrap_or_default(),
                },
                Err(no_room) if tried.is_empty() => {
                    Step::Stop(format!("no room for {name}: {}", no_room.reason))
                }
                Err(no_room) => Step::Stop(format!(
                    "migrating {name} failed ({}), and no other node has room: {}",
                    failures(tried),
                    no_room.reason
                )),
            }
        }
        Err(why) if policy == DrainPolicy::Stop => Step::Stop(format!(
            "{name} cannot live-migrate: {why} (policy stop: shut it down or move it yourself, \
             or use policy restart)"
        )),
        Err(why) => match placement::place(g, &others(false), &placements, &guests) {
            Ok(to) => Step::Restart {
                guest: name.clone(),
                placement_revision: p.revision,
                to,
                why,
            },
            Err(no_room) => Step::Stop(format!(
                "no room for {name} (it cannot live-migrate, and no other node could start it): {}",
                no_room.reason
            )),
        },
    }
}

fn failures(tried: &[(String, String)]) -> String {
    tried
        .iter()
        .map(|(n, why)| format!("to {n}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnode_api::guest::{DiskSpec, GuestSpec};
    use hvnode_cluster::model::Placement;
    use hvnode_cluster::store::Versioned;

    fn node(id: &str, mem_free: u64, state: NodeState) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            address: format!("https://{id}:8443"),
            state,
            mem_total_mib: 8192,
            mem_free_mib: mem_free,
            vcpus_total: 8,
            fingerprint: format!("fp-{id}"),
            ..NodeRecord::default()
        }
    }

    fn guest(name: &str, priority: i32, writable_disk: bool) -> Versioned<ClusterGuest> {
        let mut spec = GuestSpec {
            memory_mib: 512,
            ..GuestSpec::minimal(name, "k.elf")
        };
        if writable_disk {
            spec.disks.push(DiskSpec {
                path: format!("{name}.raw"),
                read_only: false,
            });
        }
        let mut g = ClusterGuest::new(spec);
        g.priority = priority;
        Versioned {
            value: g,
            revision: 5,
        }
    }

    fn placed(guest: &str, node: &str, revision: i64) -> Versioned<Placement> {
        Versioned {
            value: Placement {
                format: 1,
                guest: guest.into(),
                node: node.into(),
                placed_at_revision: 1,
                reason: String::new(),
            },
            revision,
        }
    }

    /// n1 (in maintenance) runs a (priority 0), b (priority 9, a writable disk) and c
    /// (priority 0); n2 has more room than n3.
    fn cluster() -> ClusterState {
        ClusterState {
            revision: 50,
            nodes: vec![
                node("n1", 7000, NodeState::Maintenance),
                node("n2", 6000, NodeState::Active),
                node("n3", 3000, NodeState::Active),
            ],
            guests: vec![
                guest("a", 0, false),
                guest("b", 9, true),
                guest("c", 0, false),
            ],
            placements: vec![
                placed("a", "n1", 11),
                placed("b", "n1", 12),
                placed("c", "n1", 13),
            ],
            domains: Vec::new(),
        }
    }

    fn all_active(_: &str) -> bool {
        true
    }

    fn read_only_disks(g: &ClusterGuest) -> Result<(), String> {
        crate::migration::can_migrate(&g.spec).map_err(|e| e.message)
    }

    fn step(
        s: &ClusterState,
        policy: DrainPolicy,
        failed: &HashMap<String, Vec<(String, String)>>,
    ) -> Step {
        let left = guests_left(s, "n1", &[], &all_active);
        next_step(
            s,
            "n1",
            policy,
            &left,
            &all_active,
            &read_only_disks,
            failed,
        )
    }

    #[test]
    fn guests_go_highest_priority_first_then_by_name() {
        let s = cluster();
        let marked = ["z".to_owned(), "gone".to_owned()];
        let left = guests_left(&s, "n1", &marked, &|n| n != "gone");
        assert_eq!(left, ["b", "a", "c", "z"]);
        assert!(guests_left(&s, "n2", &[], &all_active).is_empty());
    }

    #[test]
    fn a_guest_that_can_migrate_goes_to_the_node_with_most_room() {
        let mut s = cluster();
        s.placements.retain(|p| p.value.guest != "b");
        match step(&s, DrainPolicy::Restart, &HashMap::new()) {
            Step::Migrate {
                guest,
                placement_revision,
                to,
            } => {
                assert_eq!((guest.as_str(), placement_revision), ("a", 11));
                assert_eq!((to.id.as_str(), to.fingerprint.as_str()), ("n2", "fp-n2"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_guest_with_a_writable_disk_restarts_elsewhere_or_stops_the_drain_by_policy() {
        let s = cluster();
        match step(&s, DrainPolicy::Restart, &HashMap::new()) {
            Step::Restart { guest, to, why, .. } => {
                assert_eq!((guest.as_str(), to.as_str()), ("b", "n2"));
                assert!(why.contains("writable disk \"b.raw\""), "{why}");
            }
            other => panic!("{other:?}"),
        }
        match step(&s, DrainPolicy::Stop, &HashMap::new()) {
            Step::Stop(why) => {
                assert!(why.starts_with("b cannot live-migrate"), "{why}");
                assert!(why.contains("policy stop"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_migration_is_tried_once_more_elsewhere_then_stops_the_drain() {
        let mut s = cluster();
        s.placements.retain(|p| p.value.guest != "b");
        let mut failed = HashMap::new();
        failed.insert(
            "a".to_owned(),
            vec![("n2".to_owned(), "link cut".to_owned())],
        );
        match step(&s, DrainPolicy::Restart, &failed) {
            Step::Migrate { to, .. } => assert_eq!(to.id, "n3"),
            other => panic!("{other:?}"),
        }
        failed
            .get_mut("a")
            .unwrap()
            .push(("n3".to_owned(), "peer_refused".to_owned()));
        match step(&s, DrainPolicy::Restart, &failed) {
            Step::Stop(why) => {
                assert!(why.contains("failed 2 times"), "{why}");
                assert!(
                    why.contains("to n2: link cut; to n3: peer_refused"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
        // One failure and no other node: the drain stops with both reasons.
        s.nodes.retain(|n| n.id != "n3");
        failed.get_mut("a").unwrap().pop();
        match step(&s, DrainPolicy::Restart, &failed) {
            Step::Stop(why) => {
                assert!(
                    why.contains("link cut") && why.contains("no other node has room"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_room_anywhere_stops_the_drain_with_the_reason() {
        let mut s = cluster();
        for n in &mut s.nodes[1..] {
            n.mem_free_mib = 100;
        }
        s.placements.retain(|p| p.value.guest != "b");
        match step(&s, DrainPolicy::Restart, &HashMap::new()) {
            Step::Stop(why) => {
                assert!(why.starts_with("no room for a: memory is short"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // A node without a fingerprint cannot be migrated to.
        let mut s = cluster();
        s.placements.retain(|p| p.value.guest != "b");
        for n in &mut s.nodes[1..] {
            n.fingerprint.clear();
        }
        assert!(matches!(
            step(&s, DrainPolicy::Restart, &HashMap::new()),
            Step::Stop(_)
        ));
    }

    #[test]
    fn the_drain_waits_for_the_record_and_unplaces_guests_that_do_not_run() {
        let mut s = cluster();
        s.nodes[0].state = NodeState::Active;
        assert!(matches!(
            step(&s, DrainPolicy::Restart, &HashMap::new()),
            Step::Wait(w) if w.contains("record")
        ));
        let s = cluster();
        let left = guests_left(&s, "n1", &[], &all_active);
        let not_b = |n: &str| n != "b";
        assert_eq!(
            next_step(
                &s,
                "n1",
                DrainPolicy::Stop,
                &left,
                &not_b,
                &read_only_disks,
                &HashMap::new()
            ),
            Step::Unplace {
                guest: "b".into(),
                placement_revision: 12
            }
        );
        let mut s = cluster();
        s.guests[1].value.desired = Desired::Stopped;
        assert!(matches!(
            step(&s, DrainPolicy::Stop, &HashMap::new()),
            Step::Wait(w) if w.contains("being stopped")
        ));
        let mut s = cluster();
        s.placements.clear();
        assert_eq!(step(&s, DrainPolicy::Stop, &HashMap::new()), Step::Drained);
    }

    #[test]
    fn node_urls_come_from_record_addresses() {
        assert_eq!(node_url("https://10.0.0.5:8443"), "https://10.0.0.5:8443");
        assert_eq!(node_url("10.0.0.5:8443"), "https://10.0.0.5:8443");
    }

    #[test]
    fn settings_persist_and_a_bad_file_keeps_the_node_out_of_placement() {
        let dir = std::env::temp_dir().join(format!("hvnode-maint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("maintenance.toml");
        assert_eq!(Maintenance::load(&p).view().state, MaintenanceState::Off);
        let s = Settings {
            on: true,
            policy: DrainPolicy::Stop,
            downtime_limit_ms: Some(2000),
        };
        std::fs::write(&p, toml::to_string(&s).unwrap()).unwrap();
        let m = Maintenance::load(&p);
        assert_eq!(
            (m.view().on, m.view().policy, m.view().state),
            (true, DrainPolicy::Stop, MaintenanceState::Draining)
        );
        assert_eq!(m.node_state(), NodeState::Maintenance);
        assert!(m.record_due() && !m.record_due());
        assert!(m.blocks_start("anything"));
        std::fs::write(&p, "on = 3").unwrap();
        assert_eq!(Maintenance::load(&p).node_state(), NodeState::Maintenance);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
