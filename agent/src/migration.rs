//! Live migration between nodes (the protocol is in [`hvnode_api::migration`]): the node's
//! manager-signed certificate, the source's side (prepare the destination, relay the VMM's
//! migration stream to it, follow the VMM's progress, hand the guest over), and the
//! destination's (start a VMM waiting for the guest, relay the stream into it).
//!
//! The agents only relay bytes: the stream is the VMMs' own (`hvnode_vmm::migration`), checked
//! by the receiving VMM. Node to node the connection is mutual TLS: the source presents the
//! certificate the manager signed for it, which the destination verifies against the
//! manager's CA (and admits only to the two node-to-node routes); the source pins the
//! destination's certificate by the fingerprint the manager gave it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hvnode_api::error::ErrorCode;
use hvnode_api::guest::{GuestSpec, GuestState};
use hvnode_api::migration::{Direction, IncomingMigration, MigrateRequest, MigrationView};
use hvnode_api::node::{InstallCertificate, NodeCertificate};
use hvnode_api::routes::{Route, MIGRATION_PROTOCOL};
use hvnode_api::vmm::{MigrationPhase, MigrationStatus, VmmRequest, VmmResponse};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{blocking, Error};
use crate::guests::vmms::{self, StartFrom};
use crate::http::{json_response, upgrade_response, wants_upgrade, Resp};
use crate::manager::BaseUrl;
use crate::{node, tls, Agent};

/// The socket a destination VMM receives the guest on, in the guest's run directory.
const INCOMING_SOCKET: &str = "incoming.sock";
/// How often the source reads its VMM's progress.
const POLL: Duration = Duration::from_millis(250);
/// How long a prepared destination waits for the stream before it gives up.
const STREAM_WAIT: Duration = Duration::from_secs(60);
/// How long the destination's VMM may take to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(15);
/// How long the source's VMM may take to conclude once the stream has ended.
const VERDICT_WAIT: Duration = Duration::from_secs(60);
/// Connecting to the destination and preparing it.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);

/// The migrations this node knows: in progress, and the last one of each guest.
#[derive(Debug, Default)]
pub struct Migrations {
    table: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    view: MigrationView,
    /// The destination's stream has been opened (only once).
    streaming: bool,
}

impl Migrations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut MigrationView)) {
        if let Some(e) = self.lock().get_mut(name) {
            f(&mut e.view);
        }
    }

    pub(crate) fn view(&self, name: &str) -> Option<MigrationView> {
        self.lock().get(name).map(|e| e.view.clone())
    }

    /// Whether the guest is migrating (either way) now.
    pub fn in_progress(&self, name: &str) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|e| e.view.status.phase.in_progress())
    }
}

fn peer_error(code: ErrorCode, to: &str, e: impl std::fmt::Display) -> Error {
    Error::new(code, format!("Migration to {to}: {e}"))
}

impl Agent {
    pub(crate) fn tls_dir(&self) -> PathBuf {
        self.paths.data.join("tls")
    }

    /// `GET /v1/node/certificate`.
    pub(crate) fn node_certificate(&self) -> Result<Resp, Error> {
        Ok(json_response(StatusCode::OK, &self.certificate_view()?))
    }

    fn certificate_view(&self) -> Result<NodeCertificate, Error> {
        let csr_pem = tls::csr_pem(&self.identity, &node::facts::hostname())
            .map_err(|e| Error::internal("Certificate request", e))?;
        Ok(NodeCertificate {
            csr_pem,
            signed: tls::load_signed(&self.tls_dir()).map(|(_, info)| info),
        })
    }

    /// `PUT /v1/node/certificate`: installs the certificate the manager signed.
    pub(crate) fn install_node_certificate(&self, req: InstallCertificate) -> Result<Resp, Error> {
        let ca = self.registration.ca_pem().ok_or_else(|| {
            Error::new(
                ErrorCode::NotRegistered,
                "The node is not registered with a manager",
            )
        })?;
        let info = tls::install_signed(&self.tls_dir(), &self.identity, &req.cert_pem, &ca)
            .map_err(|e| Error::new(ErrorCode::InvalidCertificate, e.to_string()))?;
        self.events.emit(
            "registration",
            None,
            format!(
                "node certificate signed by the manager installed ({}), valid until {}",
                info.fingerprint, info.not_after_unix
            ),
        );
        Ok(json_response(StatusCode::OK, &self.certificate_view()?))
    }

    /// `GET /v1/guests/{name}/migration`.
    pub(crate) fn show_migration(&self, name: &str) -> Result<Resp, Error> {
        let view = self
            .migrations
            .view(name)
            .ok_or_else(|| no_migration(name))?;
        Ok(json_response(StatusCode::OK, &view))
    }

    /// `DELETE /v1/guests/{name}/migration`: cancels the outgoing migration in progress; the
    /// guest keeps running here.
    pub(crate) async fn cancel_migration(self: &Arc<Self>, name: String) -> Result<Resp, Error> {
        match self.migrations.view(&name) {
            Some(v) if v.direction == Direction::Outgoing && self.migrations.in_progress(&name) => {
            }
            _ => return Err(no_migration(&name)),
        }
        let me = Arc::clone(self);
        blocking("Cancelling the migration", move || {
            me.running
                .ask(&name, "migrate_cancel", &VmmRequest::MigrateCancel)?;
            let view = me
                .migrations
                .view(&name)
                .ok_or_else(|| no_migration(&name))?;
            Ok(json_response(StatusCode::ACCEPTED, &view))
        })
        .await
    }

    /// `POST /v1/guests/{name}/migration`: prepares the destination, opens the stream, and
    /// relays the guest's VMM into it in the background; answers `202` with the migration's
    /// view once the destination is ready (its refusals are this request's errors).
    pub(crate) async fn start_migration(
        self: &Arc<Self>,
        name: String,
        req: MigrateRequest,
    ) -> Result<Resp, Error> {
        let status = self.guest(&name)?;
        if status.state != GuestState::Running {
            return Err(Error::new(
                ErrorCode::InvalidGuestState,
                format!(
                    "Only a running guest migrates: {name:?} is {}",
                    status.state.as_str()
                ),
            ));
        }
        can_migrate(&status.spec)?;
        let disk_bytes = status
            .spec
            .disks
            .iter()
            .map(|d| {
                let p = vmms::resolve_file(&self.paths, "disk", &d.path)
                    .map_err(|e| Error::new(ErrorCode::InvalidGuestPath, e.to_string()))?;
                std::fs::metadata(&p)
                    .map(|m| m.len())
                    .map_err(|e| Error::internal("Reading a disk's size", e))
            })
            .collect::<Result<Vec<u64>, Error>>()?;
        let base = BaseUrl::parse(&req.to).map_err(|_| {
            Error::new(
                ErrorCode::InvalidMigration,
                format!("Invalid destination {:?}: use https://HOST[:PORT]", req.to),
            )
        })?;
        let fp = hvnode_api::fingerprint::normalize(&req.to_fingerprint)
            .map_err(|e| Error::new(ErrorCode::InvalidFingerprint, e.to_string()))?;
        if fp == self.fingerprint {
            return Err(Error::new(
                ErrorCode::InvalidMigration,
                "The destination is this node",
            ));
        }
        let (signed, _) = tls::load_signed(&self.tls_dir()).ok_or_else(|| {
            Error::new(
                ErrorCode::NodeCertificateMissing,
                "This node has no certificate signed by the manager, which the destination \
                 needs to trust it: the manager signs one at registration (or with `hvnodectl \
                 node certify NODE`)",
            )
        })?;
        let config = tls::peer_client_config(&self.identity, &signed, &fp)
            .map_err(|e| Error::internal("Node TLS", e))?;
        {
            let mut t = self.migrations.lock();
            if t.get(&name)
                .is_some_and(|e| e.view.status.phase.in_progress())
            {
                return Err(Error::new(
                    ErrorCode::MigrationInProgress,
                    format!("Guest {name:?} is migrating already"),
                ));
            }
            t.insert(
                name.clone(),
                Entry {
                    view: MigrationView {
                        guest: name.clone(),
                        direction: Direction::Outgoing,
                        peer: req.to.clone(),
                        started_unix: crate::unix_secs(),
                        status: MigrationStatus {
                            phase: MigrationPhase::Precopy,
                            memory_bytes: status.spec.memory_mib << 20,
                            ..Default::default()
                        },
                    },
                    streaming: true,
                },
            );
        }
        if !self
            .running
            .set_state(&name, GuestState::Running, GuestState::Migrating, false)
        {
            self.fail_outgoing(
                &name,
                "the guest stopped running".into(),
                GuestState::Running,
            );
            return Err(Error::new(
                ErrorCode::InvalidGuestState,
                format!("Guest {name:?} is no longer running"),
            ));
        }
        let upgraded = match tokio::time::timeout(
            PREPARE_TIMEOUT,
            open_stream(&base, config, &status.spec, disk_bytes),
        )
        .await
        {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                self.fail_outgoing(&name, e.message.clone(), GuestState::Running);
                return Err(e);
            }
            Err(_) => {
                let e = peer_error(
                    ErrorCode::PeerUnreachable,
                    &req.to,
                    format!("no answer within {} s", PREPARE_TIMEOUT.as_secs()),
                );
                self.fail_outgoing(&name, e.message.clone(), GuestState::Running);
                return Err(e);
            }
        };
        self.events.emit(
            "migration",
            Some(&name),
            format!("migrating to {}: the destination is ready", req.to),
        );
        let me = Arc::clone(self);
        let task_name = name.clone();
        tokio::spawn(async move { me.run_outgoing(task_name, req, upgraded).await });
        let view = self
            .migrations
            .view(&name)
            .ok_or_else(|| no_migration(&name))?;
        Ok(json_response(StatusCode::ACCEPTED, &view))
    }

    /// Records a failed outgoing migration and puts the guest back in `state`.
    /// The guest's state comes first: a client that sees `failed` sees the guest back too.
    fn fail_outgoing(&self, name: &str, why: String, state: GuestState) {
        self.running
            .set_state(name, GuestState::Migrating, state, true);
        self.migrations.update(name, |v| {
            v.status.phase = MigrationPhase::Failed;
            v.status.error = Some(why.clone());
        });
        self.events
            .emit("migration", Some(name), format!("migration failed: {why}"));
    }

    /// The background half of an outgoing migration: the VMM's stream relayed to the
    /// destination, progress read meanwhile, and the outcome applied.
    async fn run_outgoing(
        self: Arc<Self>,
        name: String,
        req: MigrateRequest,
        upgraded: hyper::upgrade::Upgraded,
    ) {
        let socket = self.paths.run.join("vms").join(&name).join("control.sock");
        let request = VmmRequest::MigrateSend {
            downtime_limit_ms: req.downtime_limit_ms,
            max_passes: req.max_passes,
            timeout_secs: req.timeout_secs,
            verify_memory: req.verify_memory,
        };
        let vmm = match vmm_stream(&socket, &request).await {
            Ok(s) => s,
            Err(why) => {
                let mut peer = TokioIo::new(upgraded);
                let _ = peer.shutdown().await;
                return self.fail_outgoing(&name, why, GuestState::Running);
            }
        };
        let relay = relay(upgraded, vmm);
        tokio::pin!(relay);
        let mut last_pass = None;
        let relayed = loop {
            tokio::select! {
                r = &mut relay => break r,
                () = tokio::time::sleep(POLL) => {
                    if let Some(s) = self.vmm_migration_status(&name).await {
                        if last_pass != Some(s.pass) && s.phase == MigrationPhase::Precopy {
                            last_pass = Some(s.pass);
                            self.events.emit("migration", Some(&name), progress(&s));
                        }
                        // A finished phase is published only once its outcome is applied.
                        if s.phase.in_progress() {
                            self.migrations.update(&name, |v| v.status = s);
                        }
                    }
                }
            }
        };
        if let Err(e) = relayed {
            eprintln!("agent: migration of {name}: relay: {e}");
        }
        // The relay can end before the VMM has read the destination's last answer: its
        // verdict is the VMM's, once it has one.
        let deadline = Instant::now() + VERDICT_WAIT;
        let mut end = self.vmm_migration_status(&name).await;
        while end.as_ref().is_some_and(|s| s.phase.in_progress()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            end = self.vmm_migration_status(&name).await;
        }
        let Some(end) = end else {
            return self.fail_outgoing(
                &name,
                "the VMM stopped answering during the migration".into(),
                GuestState::Crashed,
            );
        };
        // Each outcome is applied before the migration shows it: a client that reads
        // `completed` finds the guest gone from this node, one that reads `failed` finds it back.
        match end.phase {
            MigrationPhase::Completed => {
                let r = end.result.clone().unwrap_or_default();
                self.events.emit(
                    "migration",
                    Some(&name),
                    format!(
                        "migrated to {}: runs there now; {} passes, {} MiB sent, downtime {} ms \
                         (last pass {} ms, state {} ms, transfer {} ms, resume {} ms), {} ms in all",
                        req.to,
                        r.passes,
                        r.bytes_sent >> 20,
                        r.downtime_ms,
                        r.last_pass_ms,
                        r.state_ms,
                        r.transfer_ms,
                        r.resume_ms,
                        r.total_ms
                    ),
                );
                let me = Arc::clone(&self);
                let handed = name.clone();
                let _ = tokio::task::spawn_blocking(move || me.hand_over(&handed)).await;
                self.migrations.update(&name, |v| v.status = end);
            }
            _ if end.outcome_unknown => {
                self.running
                    .set_state(&name, GuestState::Migrating, GuestState::Paused, true);
                self.migrations.update(&name, |v| {
                    v.status = end.clone();
                    v.status.phase = MigrationPhase::Failed;
                });
                self.events.emit(
                    "migration",
                    Some(&name),
                    format!(
                        "migration outcome unknown: {}; the guest stays paused here until you \
                         check {}",
                        end.error.unwrap_or_default(),
                        req.to
                    ),
                );
            }
            _ => {
                let why = end
                    .error
                    .clone()
                    .unwrap_or_else(|| "the migration ended without completing".into());
                self.running
                    .set_state(&name, GuestState::Migrating, GuestState::Running, true);
                self.migrations.update(&name, |v| {
                    v.status = end;
                    v.status.phase = MigrationPhase::Failed;
                    v.status.error = Some(why.clone());
                });
                self.events
                    .emit("migration", Some(&name), format!("migration failed: {why}"));
            }
        }
    }

    /// The guest runs on the destination: its VMM here stops and its definition goes (its
    /// snapshots stay on this node).
    fn hand_over(&self, name: &str) {
        if let Err(e) = self.running.stop(name) {
            eprintln!("agent: stopping the migrated guest {name}: {e}");
        }
        if let Ok(path) = self.guest_path(name) {
            let _ = std::fs::remove_file(path);
        }
        self.running.forget(name);
        self.events.emit(
            "guest_deleted",
            Some(name),
            "migrated away: defined on its new node",
        );
    }

    async fn vmm_migration_status(self: &Arc<Self>, name: &str) -> Option<MigrationStatus> {
        let me = Arc::clone(self);
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            match me
                .running
                .ask(&name, "migrate_status", &VmmRequest::MigrateStatus)
            {
                Ok(VmmResponse::Migration { migration }) => Some(migration),
                _ => None,
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// `POST /v1/migrations` (node to node): defines the guest here and starts a VMM waiting
    /// for it; if the stream does not come within [`STREAM_WAIT`], undoes both.
    pub(crate) async fn prepare_incoming(
        self: &Arc<Self>,
        req: IncomingMigration,
    ) -> Result<Resp, Error> {
        let spec = req.guest;
        spec.validate()
            .map_err(|e| Error::new(ErrorCode::InvalidGuestSpec, e.to_string()))?;
        let path = self.guest_path(&spec.name)?;
        let name = spec.name.clone();
        if path.exists() || self.running.is_active(&name) {
            return Err(Error::new(
                ErrorCode::GuestExists,
                format!("A guest named {name:?} exists on the destination"),
            ));
        }
        if !req.disk_bytes.is_empty() && req.disk_bytes.len() != spec.disks.len() {
            return Err(Error::new(
                ErrorCode::InvalidMigration,
                format!(
                    "{} disk sizes for {} disks",
                    req.disk_bytes.len(),
                    spec.disks.len()
                ),
            ));
        }
        for (d, &bytes) in spec.disks.iter().zip(&req.disk_bytes) {
            let here = vmms::resolve_file(&self.paths, "disk", &d.path)
                .ok()
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| m.len());
            match here {
                None => {
                    return Err(Error::new(
                        ErrorCode::InvalidGuestPath,
                        format!(
                            "The disk {:?} is not on the destination: upload it there first",
                            d.path
                        ),
                    ))
                }
                Some(n) if n != bytes => {
                    return Err(Error::new(
                        ErrorCode::InvalidGuestPath,
                        format!(
                            "The disk {:?} is {n} bytes on the destination and {bytes} on the \
                             source: not the same image",
                            d.path
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        let me = Arc::clone(self);
        let source = req.source.clone();
        let view = blocking("Preparing the incoming migration", move || {
            me.start_incoming(&spec, &source)
        })
        .await?;
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(STREAM_WAIT).await;
            let never_came = me
                .migrations
                .lock()
                .get(&name)
                .is_some_and(|e| !e.streaming);
            if never_came {
                me.events.emit(
                    "migration",
                    Some(&name),
                    format!(
                        "incoming migration from {}: no stream within {} s; given up",
                        view_source(&me, &name),
                        STREAM_WAIT.as_secs()
                    ),
                );
                let _ = tokio::task::spawn_blocking(move || me.drop_incoming(&name)).await;
            }
        });
        Ok(json_response(StatusCode::CREATED, &view))
    }

    /// Writes the definition and starts the waiting VMM (blocking).
    fn start_incoming(&self, spec: &GuestSpec, source: &str) -> Result<MigrationView, Error> {
        let name = &spec.name;
        let path = self.guest_path(name)?;
        let text = toml::to_string(spec).map_err(|e| Error::internal("Guest definition", e))?;
        hvnode_base::fs::write_atomic(&path, text.as_bytes(), 0o644)
            .map_err(|e| Error::internal("Saving the guest definition", e))?;
        let socket = self.paths.run.join("vms").join(name).join(INCOMING_SOCKET);
        let undo = |e: Error| {
            let _ = std::fs::remove_file(&path);
            self.running.forget(name);
            e
        };
        self.running
            .start_from(spec, StartFrom::Incoming(&socket))
            .map_err(|e| undo(e.into()))?;
        let deadline = Instant::now() + LISTEN_WAIT;
        while !socket.exists() {
            if !self.running.is_active(name) || Instant::now() > deadline {
                let why = self
                    .running
                    .state(name)
                    .crash_reason
                    .unwrap_or_else(|| "its VMM did not listen for the guest in time".into());
                let _ = self.running.stop(name);
                return Err(undo(Error::new(
                    ErrorCode::VmmStartFailed,
                    format!("The destination cannot receive {name:?}: {why}"),
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let view = MigrationView {
            guest: name.clone(),
            direction: Direction::Incoming,
            peer: source.to_owned(),
            started_unix: crate::unix_secs(),
            status: MigrationStatus {
                phase: MigrationPhase::Precopy,
                memory_bytes: spec.memory_mib << 20,
                ..Default::default()
            },
        };
        self.migrations.lock().insert(
            name.clone(),
            Entry {
                view: view.clone(),
                streaming: false,
            },
        );
        self.events.emit(
            "migration",
            Some(name),
            format!("incoming migration from {source}: waiting for the guest"),
        );
        Ok(view)
    }

    /// Stops a waiting or failed incoming guest's VMM and removes its definition (blocking).
    fn drop_incoming(&self, name: &str) {
        if self.running.state(name).state == GuestState::Migrating {
            let _ = self.running.stop(name);
        }
        if let Ok(path) = self.guest_path(name) {
            let _ = std::fs::remove_file(path);
        }
        self.running.forget(name);
        self.migrations.update(name, |v| {
            if v.status.phase != MigrationPhase::Completed {
                v.status.phase = MigrationPhase::Failed;
            }
        });
    }

    /// `GET /v1/migrations/{name}/stream` (node to node, an HTTP/1.1 upgrade): the connection
    /// becomes the migration stream into the waiting VMM.
    pub(crate) async fn migration_stream<B>(
        self: &Arc<Self>,
        name: &str,
        mut req: Request<B>,
    ) -> Result<Resp, Error> {
        if !wants_upgrade(&req, MIGRATION_PROTOCOL) {
            return Err(Error::new(
                ErrorCode::UpgradeRequired,
                format!("The migration stream needs Connection: Upgrade and Upgrade: {MIGRATION_PROTOCOL}"),
            ));
        }
        {
            let mut t = self.migrations.lock();
            match t.get_mut(name) {
                Some(e) if e.view.direction == Direction::Incoming && !e.streaming => {
                    e.streaming = true
                }
                _ => return Err(no_migration(name)),
            }
        }
        let socket = self.paths.run.join("vms").join(name).join(INCOMING_SOCKET);
        // The socket file appears at bind(), a moment before listen(): refused until then.
        let deadline = Instant::now() + LISTEN_WAIT;
        let vmm = loop {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline
                        && self.running.is_active(name) =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => {
                    // Nothing will arrive: undo the preparation now.
                    let me = Arc::clone(self);
                    let n = name.to_owned();
                    tokio::task::spawn_blocking(move || me.drop_incoming(&n));
                    return Err(Error::new(
                        ErrorCode::VmmUnreachable,
                        format!("The VMM waiting for {name:?} does not answer: {e}"),
                    ));
                }
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let me = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move {
            let relayed = match upgrade.await {
                Ok(upgraded) => relay(upgraded, vmm).await.map_err(|e| e.to_string()),
                Err(e) => Err(format!("upgrade failed: {e}")),
            };
            let me2 = Arc::clone(&me);
            let n = name.clone();
            let arrived = tokio::task::spawn_blocking(move || {
                me2.running
                    .set_state(&n, GuestState::Migrating, GuestState::Running, true)
            })
            .await
            .unwrap_or(false);
            let source = view_source(&me, &name);
            if arrived {
                me.migrations
                    .update(&name, |v| v.status.phase = MigrationPhase::Completed);
                me.events.emit(
                    "migration",
                    Some(&name),
                    format!("arrived from {source}: running here"),
                );
            } else {
                let why = relayed
                    .err()
                    .unwrap_or_else(|| "the guest did not arrive".into());
                me.events.emit(
                    "migration",
                    Some(&name),
                    format!("incoming migration from {source} failed: {why}"),
                );
                let _ = tokio::task::spawn_blocking(move || me.drop_incoming(&name)).await;
            }
        });
        Ok(upgrade_response(MIGRATION_PROTOCOL))
    }
}

/// Whether the guest's definition lets it live-migrate: `disk_not_shared` for a writable
/// disk. A writable disk lives on this node's own storage (shared storage domains come with the
/// cluster): two nodes would write two copies that part ways.
pub(crate) fn can_migrate(spec: &GuestSpec) -> Result<(), Error> {
    match spec.disks.iter().find(|d| !d.read_only) {
        None => Ok(()),
        Some(d) => Err(Error::new(
            ErrorCode::DiskNotShared,
            format!(
                "Guest {:?} has the writable disk {:?} on this node's storage: only read-only \
                 disks (the same image on both nodes) migrate; attach it read-only, or stop the \
                 guest and copy the disk",
                spec.name, d.path
            ),
        )),
    }
}

fn view_source(agent: &Agent, name: &str) -> String {
    agent
        .migrations
        .view(name)
        .map_or_else(|| "?".into(), |v| v.peer)
}

fn no_migration(name: &str) -> Error {
    Error::new(
        ErrorCode::MigrationNotFound,
        format!("No migration of guest {name:?} is in progress here"),
    )
}

/// One line of progress for the events.
fn progress(s: &MigrationStatus) -> String {
    format!(
        "migrating: pass {}, {} MiB sent, {} MiB left, dirtying {} MiB/s, sending {} MiB/s, \
         expected downtime {} ms",
        s.pass,
        s.bytes_sent >> 20,
        s.bytes_left >> 20,
        s.dirty_rate_bytes_per_sec >> 20,
        s.bandwidth_bytes_per_sec >> 20,
        s.expected_downtime_ms
    )
}

/// Opens the control connection to the guest's VMM and asks it to send: the connection, now
/// the migration stream, or why not.
async fn vmm_stream(
    socket: &std::path::Path,
    request: &VmmRequest,
) -> Result<tokio::net::UnixStream, String> {
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("the VMM's control socket: {e}"))?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line)
        .await
        .map_err(|e| format!("asking the VMM: {e}"))?;
    // Byte by byte: what follows the answer's line is the stream.
    let mut answer = Vec::new();
    loop {
        let b = s
            .read_u8()
            .await
            .map_err(|e| format!("the VMM's answer: {e}"))?;
        if b == b'\n' {
            break;
        }
        if answer.len() > 64 << 10 {
            return Err("the VMM's answer is too long".into());
        }
        answer.push(b);
    }
    match serde_json::from_slice::<VmmResponse>(&answer) {
        Ok(VmmResponse::Ok) => Ok(s),
        Ok(VmmResponse::Error { message, .. }) => Err(format!("the VMM refused: {message}")),
        _ => Err(format!(
            "unexpected answer from the VMM: {}",
            String::from_utf8_lossy(&answer)
        )),
    }
}

/// Copies both ways between the other node and the local VMM until the VMM side ends (the VMM
/// closes its end once it is done either way), then closes the other node's side.
async fn relay(
    upgraded: hyper::upgrade::Upgraded,
    vmm: tokio::net::UnixStream,
) -> std::io::Result<()> {
    let (mut peer_rx, mut peer_tx) = tokio::io::split(TokioIo::new(upgraded));
    let (mut vmm_rx, mut vmm_tx) = vmm.into_split();
    let to_peer = async {
        let r = tokio::io::copy(&mut vmm_rx, &mut peer_tx).await;
        let _ = peer_tx.shutdown().await;
        r
    };
    let from_peer = async {
        let r = tokio::io::copy(&mut peer_rx, &mut vmm_tx).await;
        let _ = vmm_tx.shutdown().await;
        r
    };
    tokio::pin!(from_peer);
    // The VMM's side decides; the other direction may still be open when it ends.
    tokio::select! {
        r = to_peer => r.map(drop),
        r = &mut from_peer => {
            r?;
            Ok(())
        }
    }
}

/// Connects to the destination over mutual TLS, asks it to prepare for `spec`, and opens the
/// migration stream.
async fn open_stream(
    base: &BaseUrl,
    config: rustls::ClientConfig,
    spec: &GuestSpec,
    disk_bytes: Vec<u64>,
) -> Result<hyper::upgrade::Upgraded, Error> {
    let url = format!("https://{}:{}", base.host, base.port);
    let unreachable = |e: &dyn std::fmt::Display| peer_error(ErrorCode::PeerUnreachable, &url, e);
    let tcp = tokio::net::TcpStream::connect((base.host.as_str(), base.port))
        .await
        .map_err(|e| unreachable(&e))?;
    let server = ServerName::try_from(base.host.clone()).map_err(|e| unreachable(&e))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(conn.with_upgrades());
    let host = format!("{}:{}", base.host, base.port);
    let body = serde_json::to_vec(&IncomingMigration {
        guest: spec.clone(),
        source: node::facts::hostname(),
        disk_bytes,
    })
    .map_err(|e| Error::internal("Migration request", e))?;
    let prepare = Request::post(Route::Migrations.path())
        .header(hyper::header::HOST, &host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Error::internal("Migration request", e))?;
    let resp = sender
        .send_request(prepare)
        .await
        .map_err(|e| unreachable(&e))?;
    let status = resp.status();
    let answer = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(&e))?
        .to_bytes();
    if status != StatusCode::CREATED {
        return Err(refused(&url, status, &answer));
    }
    sender.ready().await.map_err(|e| unreachable(&e))?;
    let stream = Request::get(Route::MigrationStream(spec.name.clone()).path())
        .header(hyper::header::HOST, &host)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, MIGRATION_PROTOCOL)
        .body(Full::new(Bytes::new()))
        .map_err(|e| Error::internal("Migration request", e))?;
    let resp = sender
        .send_request(stream)
        .await
        .map_err(|e| unreachable(&e))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let answer = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(refused(&url, status, &answer));
    }
    hyper::upgrade::on(resp).await.map_err(|e| unreachable(&e))
}

/// The destination's error answer as ours, its message kept.
fn refused(url: &str, status: StatusCode, body: &[u8]) -> Error {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            Some(format!(
                "{} ({})",
                v.get("message")?.as_str()?,
                v.get("code")?.as_str()?
            ))
        })
        .unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(body)));
    peer_error(
        ErrorCode::PeerRefused,
        url,
        format!("the destination refused: {message}"),
    )
}
