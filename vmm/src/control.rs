//! The control side: the control socket (one JSON request per line in, one response per line
//! out) and the termination signals, both acting through one controller.
//!
//! SIGTERM asks the guest to shut down and stops it if it is still up after
//! [`SIGTERM_SHUTDOWN_LIMIT`]; a second SIGTERM, or SIGINT, stops it at once.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use hvnode_api::vmm::{
    MigrationPhase, MigrationStatus, SnapshotInfo, VmConfig, VmRunState, VmStats, VmmRequest,
    VmmResponse, MIGRATION_DOWNTIME_LIMIT_MS, MIGRATION_MAX_PASSES, MIGRATION_TIMEOUT_SECS,
};
use kvm_ioctls::VmFd;

use vmm_sys_util::signal::{block_signal, create_sigset};

use crate::devices::legacy::{Console, Keyboard};
use crate::devices::{DeviceStats, MmioBus};
use crate::error::VmError;
use crate::exit::ExitReason;
use crate::memory::GuestRam;
use crate::migration::send::{Failure, Limits, Source};
use crate::persist::{snapshot, VmState};
use crate::vcpu::{PauseError, Vcpus, PAUSE_TIMEOUT};

/// Longest request line; a longer one is refused and its connection closed.
pub const MAX_REQUEST_LINE: usize = 64 << 10;
/// Clients served at the same time; more are refused.
const MAX_CLIENTS: usize = 8;
/// A client that does not read its answers for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that sends nothing for this long is dropped, so that idle clients cannot hold
/// every slot.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a guest has to go down after SIGTERM. init waits 30 s after its SIGTERM before it
/// kills what is left; stopping the guest a little earlier lets the VMM still write its exit
/// file.
pub const SIGTERM_SHUTDOWN_LIMIT: Duration = Duration::from_secs(25);

/// What a snapshot reads besides the vCPUs and the virtio devices.
pub(crate) struct Machine {
    /// The VM, for the interrupt controllers, the PIT and the clock.
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub mem: &'static GuestRam,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// COM1.
    pub console: Arc<Mutex<Console>>,
}

/// Why a snapshot failed: the answer's code and message.
struct SnapshotError(&'static str, String);

impl SnapshotError {
    fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        SnapshotError("internal", format!("Snapshot: {what}: {e}"))
    }
}

/// What the control socket and the signals act on.
pub(crate) struct Controller {
    /// The launch configuration, for `describe`.
    config: VmConfig,
    /// When the VM started.
    started: Instant,
    /// The vCPUs: pause gate, exit counters, shutdown flag.
    vcpus: Arc<Vcpus>,
    /// The virtio devices, whose workers a pause parks too.
    virtio: Arc<MmioBus>,
    /// The keyboard controller, for ctrl-alt-del.
    keyboard: Arc<Mutex<Keyboard>>,
    /// Every device with counters.
    devices: Vec<Arc<dyn DeviceStats>>,
    /// Where the reason the VM ended goes.
    exit: mpsc::Sender<ExitReason>,
    /// Held for a whole pause or resume, so that two never interleave.
    pausing: Mutex<()>,
    /// Set once the vCPUs and every device worker are parked, cleared as a resume starts.
    paused: AtomicBool,
    /// `/proc/self/statm`, opened at set-up: the sandbox forbids opening files later.
    statm: Option<std::fs::File>,
    /// What a snapshot reads beyond the above.
    machine: Machine,
    /// The migration in progress or the last one.
    migration: Mutex<MigrationStatus>,
    /// Set while a migration runs: pause, resume, snapshot and shutdown are refused meanwhile.
    migrating: AtomicBool,
    /// Set once the guest runs on the destination: it never runs here again.
    migrated: AtomicBool,
    /// Asks the migration in progress to stop.
    cancel_migration: AtomicBool,
}

fn error(code: &str, message: impl Into<String>) -> VmmResponse {
    VmmResponse::Error {
        code: code.into(),
        message: message.into(),
    }
}

impl Controller {
    /// The controller of a VM started now.
    pub(crate) fn new(
        config: VmConfig,
        vcpus: Arc<Vcpus>,
        virtio: Arc<MmioBus>,
        keyboard: Arc<Mutex<Keyboard>>,
        devices: Vec<Arc<dyn DeviceStats>>,
        exit: mpsc::Sender<ExitReason>,
        machine: Machine,
    ) -> Self {
        Controller {
            config,
            started: Instant::now(),
            vcpus,
            virtio,
            keyboard,
            devices,
            exit,
            pausing: Mutex::new(()),
            paused: AtomicBool::new(false),
            statm: None,
            machine,
            migration: Mutex::new(MigrationStatus::default()),
            migrating: AtomicBool::new(false),
            migrated: AtomicBool::new(false),
            cancel_migration: AtomicBool::new(false),
        }
    }

    /// Reads the VMM's memory from `statm` (`/proc/self/statm`, opened before the jail).
    pub(crate) fn with_statm(mut self, statm: Option<std::fs::File>) -> Self {
        self.statm = statm;
        self
    }

    /// Answers one request.
    pub(crate) fn handle(&self, req: VmmRequest) -> VmmResponse {
        match req {
            VmmRequest::Describe => VmmResponse::Description {
                config: Box::new(self.config.clone()),
                state: self.state(),
                uptime_secs: self.started.elapsed().as_secs(),
            },
            VmmRequest::Stats => VmmResponse::Stats {
                stats: self.stats(),
            },
            VmmRequest::Pause => self.pause_result(self.pause()),
            VmmRequest::Resume => self.pause_result(self.resume()),
            VmmRequest::Shutdown { timeout_secs } => {
                if let Some(why) = self.busy_migrating() {
                    return error("invalid_state", why);
                }
                self.shutdown(timeout_secs.map(Duration::from_secs));
                VmmResponse::Ok
            }
            // serve_client ends the VM once the answer is written: the client must see it.
            VmmRequest::Stop => VmmResponse::Ok,
            VmmRequest::Snapshot { dir } => match self.snapshot(Path::new(&dir)) {
                Ok(snapshot) => VmmResponse::Snapshot { snapshot },
                Err(SnapshotError(code, message)) => error(code, message),
            },
            // serve_client hands the connection over to the migration before it gets here.
            VmmRequest::MigrateSend { .. } => error(
                "bad_request",
                "migrate_send must be the first request on its own connection",
            ),
            VmmRequest::MigrateStatus => self.migration_status(),
            VmmRequest::MigrateCancel => {
                if self.migrating.load(Ordering::SeqCst) {
                    self.cancel_migration.store(true, Ordering::SeqCst);
                    self.migration_status()
                } else {
                    error("invalid_state", "No migration is in progress")
                }
            }
        }
    }

    fn migration_status(&self) -> VmmResponse {
        VmmResponse::Migration {
            migration: self
                .migration
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Why the guest cannot be paused, resumed, snapshotted or shut down now, if it cannot.
    fn busy_migrating(&self) -> Option<&'static str> {
        if self.migrated.load(Ordering::SeqCst) {
            Some("The guest migrated to another node: it only waits to be stopped here")
        } else if self.migrating.load(Ordering::SeqCst) {
            Some("A migration is in progress: cancel it first")
        } else {
            None
        }
    }

    /// Starts a migration on `conn`, answering `ok` there first (or refusing, and then the
    /// connection stays a control connection: `Ok(false)`), then runs it to its end and closes
    /// the stream (`Ok(true)`). See [`crate::migration::send`].
    fn migrate_send(&self, req: VmmRequest, conn: &mut UnixStream) -> std::io::Result<bool> {
        let VmmRequest::MigrateSend {
            downtime_limit_ms,
            max_passes,
            timeout_secs,
            verify_memory,
        } = req
        else {
            return Ok(false);
        };
        let refused = {
            let _op = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(why) = self.busy_migrating() {
                Some(why)
            } else if self.vcpus.shutdown_requested() {
                Some("The guest is shutting down")
            } else if self.paused.load(Ordering::SeqCst) {
                Some("The guest is paused: resume it first (a migration moves a running guest)")
            } else {
                self.migrating.store(true, Ordering::SeqCst);
                self.cancel_migration.store(false, Ordering::SeqCst);
                // Before the answer: whoever asks for the status after it sees this one.
                *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = MigrationStatus {
                    phase: MigrationPhase::Precopy,
                    memory_bytes: self.machine.mem_size,
                    ..Default::default()
                };
                None
            }
        };
        if let Some(why) = refused {
            send(conn, &error("invalid_state", why))?;
            return Ok(false);
        }
        let limits = Limits {
            downtime: Duration::from_millis(
                downtime_limit_ms.unwrap_or(MIGRATION_DOWNTIME_LIMIT_MS),
            ),
            max_passes: max_passes.unwrap_or(MIGRATION_MAX_PASSES).max(2),
            timeout: Duration::from_secs(timeout_secs.unwrap_or(MIGRATION_TIMEOUT_SECS)),
        };
        let outcome = send(conn, &VmmResponse::Ok).map_err(|e| Failure {
            message: format!("answering the request: {e}"),
            cancelled: false,
            outcome_unknown: false,
        });
        let outcome = outcome.and_then(|()| {
            crate::migration::send::send(
                self,
                conn,
                limits,
                verify_memory,
                &self.migration,
                &self.cancel_migration,
            )
        });
        let _ = conn.shutdown(std::net::Shutdown::Both);
        let name = &self.config.name;
        let mut status = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(result) => {
                eprintln!(
                    "hvnode-vmm: {name}: migrated in {} ms, downtime {} ms",
                    result.total_ms, result.downtime_ms
                );
                self.migrated.store(true, Ordering::SeqCst);
                status.phase = MigrationPhase::Completed;
                status.result = Some(result);
            }
            Err(f) => {
                eprintln!("hvnode-vmm: {name}: migration failed: {}", f.message);
                status.phase = if f.cancelled {
                    MigrationPhase::Cancelled
                } else {
                    MigrationPhase::Failed
                };
                status.outcome_unknown = f.outcome_unknown;
                status.error = Some(f.message);
                // An unknown outcome leaves the guest paused: it may run on the destination.
                if f.outcome_unknown {
                    self.paused.store(true, Ordering::SeqCst);
                }
            }
        }
        self.migrating.store(false, Ordering::SeqCst);
        Ok(true)
    }

    /// Freezes the guest: parks the vCPUs, then every device worker once its request in flight
    /// is answered, so that neither guest memory nor device state changes until [`resume`].
    /// Anything that fails to stop by [`PAUSE_TIMEOUT`] fails the pause and the VM runs on.
    ///
    /// [`resume`]: Controller::resume
    fn pause(&self) -> Result<(), PauseError> {
        let _op = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        self.pause_locked()
    }

    /// [`Controller::pause`] with the `pausing` lock held.
    fn pause_locked(&self) -> Result<(), PauseError> {
        if let Some(why) = self.busy_migrating() {
            return Err(PauseError::InvalidState(why));
        }
        // Checked under the lock: a shutdown asks first and resumes after, so a pause can never
        // freeze a guest that was told to go down.
        if self.vcpus.shutdown_requested() {
            return Err(PauseError::InvalidState("The guest is shutting down"));
        }
        if self.paused.load(Ordering::SeqCst) {
            return Err(PauseError::InvalidState("The VM is already paused"));
        }
        self.park()
    }

    /// Parks the vCPUs, then every device worker, with the `pausing` lock held and the state
    /// checked by the caller.
    fn park(&self) -> Result<(), PauseError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        // vCPUs first: with them parked no driver can notify a queue or reset a device.
        self.vcpus.pause(deadline)?;
        if let Err(e) = self.virtio.pause(deadline) {
            let _ = self.vcpus.resume();
            return Err(PauseError::Timeout(format!("device {}", e.0)));
        }
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets the devices and then the vCPUs run again; notifications and frames that arrived
    /// during the pause are served now.
    fn resume(&self) -> Result<(), PauseError> {
        let _op = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = self.busy_migrating() {
            return Err(PauseError::InvalidState(why));
        }
        // Paused after a switchover whose answer never came: the guest may run elsewhere.
        if self
            .migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .outcome_unknown
        {
            return Err(PauseError::InvalidState(
                "The last migration's outcome is unknown: the guest may run on the destination",
            ));
        }
        self.resume_locked()
    }

    /// [`Controller::resume`] with the `pausing` lock held.
    fn resume_locked(&self) -> Result<(), PauseError> {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return Err(PauseError::InvalidState("The VM is not paused"));
        }
        self.virtio.resume();
        self.vcpus.resume()
    }

    /// Writes the guest into the new directory `dir` (see [`snapshot`]): a running guest is
    /// paused for it and resumed after, whether the snapshot succeeded or not; a paused one
    /// stays paused. The `pausing` lock is held throughout, so no pause or resume interleaves.
    fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        if !dir.is_absolute() {
            return Err(SnapshotError(
                "bad_request",
                format!(
                    "Snapshot directory {} is not an absolute path",
                    dir.display()
                ),
            ));
        }
        let _op = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = self.busy_migrating() {
            return Err(SnapshotError("invalid_state", why.into()));
        }
        if self.vcpus.shutdown_requested() {
            return Err(SnapshotError(
                "invalid_state",
                "The guest is shutting down".into(),
            ));
        }
        // Before pausing: a refusal costs the guest nothing.
        snapshot::create_dir(dir).map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::AlreadyExists {
                "bad_request"
            } else {
                "internal"
            };
            SnapshotError(
                code,
                format!("Snapshot: creating the directory {}: {e}", dir.display()),
            )
        })?;
        let was_running = !self.paused.load(Ordering::SeqCst);
        let paused_at = Instant::now();
        if was_running {
            self.pause_locked().map_err(|e| match e {
                PauseError::InvalidState(m) => SnapshotError("invalid_state", m.into()),
                PauseError::Timeout(_) => SnapshotError::internal("pausing", e),
            })?;
        }
        let write_started = Instant::now();
        let written = self.write_snapshot(dir);
        let write_ms = write_started.elapsed().as_millis() as u64;
        if was_running {
            if let Err(e) = self.resume_locked() {
                eprintln!(
                    "hvnode-vmm: {}: resuming after the snapshot: {e}",
                    self.config.name
                );
            }
        }
        let paused_ms = if was_running {
            paused_at.elapsed().as_millis() as u64
        } else {
            0
        };
        let w = written?;
        Ok(SnapshotInfo {
            memory_bytes: w.memory_bytes,
            memory_written_bytes: w.memory_written_bytes,
            state_bytes: w.state_bytes,
            paused_ms,
            write_ms,
        })
    }

    /// The paused VM's state and memory into `dir`, the disks flushed first.
    fn write_snapshot(&self, dir: &Path) -> Result<snapshot::Written, SnapshotError> {
        let state = self.save_state()?;
        let m = &self.machine;
        snapshot::write(dir, &self.config, &state, m.mem, m.mem_size)
            .map_err(|e| SnapshotError::internal(&format!("writing {}", dir.display()), e))
    }

    /// The paused VM's state, the disks flushed first.
    fn save_state(&self) -> Result<VmState, SnapshotError> {
        self.virtio
            .flush()
            .map_err(|(name, e)| SnapshotError::internal(&format!("flushing {name}"), e))?;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let vcpus = self
            .vcpus
            .save(deadline)
            .map_err(|e| SnapshotError::internal("reading the vCPUs", e))?;
        let m = &self.machine;
        let vm = crate::persist::kvm::save_vm(&m.vm)
            .map_err(|e| SnapshotError::internal("reading the VM", e))?;
        let serial = m
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
            .into();
        let i8042 = self
            .keyboard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state();
        Ok(VmState {
            vcpus,
            vm,
            serial,
            i8042,
            virtio: self.virtio.save(),
        })
    }

    fn pause_result(&self, r: Result<(), PauseError>) -> VmmResponse {
        match r {
            Ok(()) => VmmResponse::Ok,
            Err(e @ PauseError::InvalidState(_)) => error("invalid_state", e.to_string()),
            Err(e @ PauseError::Timeout(_)) => error("internal", e.to_string()),
        }
    }

    fn state(&self) -> VmRunState {
        if self.migrated.load(Ordering::SeqCst) {
            VmRunState::Migrated
        } else if self.vcpus.shutdown_requested() {
            VmRunState::Stopping
        } else if self.paused.load(Ordering::SeqCst) {
            VmRunState::Paused
        } else {
            VmRunState::Running
        }
    }

    fn stats(&self) -> VmStats {
        let mut devices = BTreeMap::new();
        for d in &self.devices {
            devices.extend(d.device_stats());
        }
        VmStats {
            vcpu_exits: self.vcpus.exit_counters(),
            devices,
            memory_bytes: self.config.memory_mib << 20,
            rss_bytes: self.statm.as_ref().map_or(0, rss_bytes),
        }
    }

    /// Presses ctrl-alt-del for the guest (resuming it first if paused); from then on a guest
    /// reset counts as powered off. With `limit`, a guest still up after it is stopped.
    pub(crate) fn shutdown(&self, limit: Option<Duration>) {
        self.vcpus.request_shutdown();
        // A paused guest cannot see the keys, nor shut down without its disks; "already
        // running" is fine too.
        let _ = self.resume();
        self.keyboard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .press_ctrl_alt_del();
        if let Some(limit) = limit {
            let exit = self.exit.clone();
            std::thread::spawn(move || {
                std::thread::sleep(limit);
                let why = format!(
                    "stopped: the guest did not shut down within {} s",
                    limit.as_secs()
                );
                let _ = exit.send(ExitReason::Stopped(why));
            });
        }
    }

    /// Ends the VM at once.
    pub(crate) fn stop(&self, why: String) {
        let _ = self.exit.send(ExitReason::Stopped(why));
    }
}

impl Source for Controller {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    fn vm(&self) -> &VmFd {
        &self.machine.vm
    }

    fn memory(&self) -> &GuestRam {
        self.machine.mem
    }

    fn memory_bytes(&self) -> u64 {
        self.machine.mem_size
    }

    fn pause(&self) -> Result<(), String> {
        // The migration's own pause: `busy_migrating` would refuse it.
        let _op = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        self.park().map_err(|e| e.to_string())
    }

    fn resume(&self) {
        let _op = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.resume_locked() {
            eprintln!(
                "hvnode-vmm: {}: resuming after the migration: {e}",
                self.config.name
            );
        }
    }

    fn state(&self) -> Result<Vec<u8>, String> {
        let state = self.save_state().map_err(|SnapshotError(_, m)| m)?;
        crate::persist::encode(&state).map_err(|e| e.to_string())
    }
}

fn rss_bytes(statm: &std::fs::File) -> u64 {
    let mut buf = [0u8; 128];
    let n = std::os::unix::fs::FileExt::read_at(statm, &mut buf, 0).unwrap_or(0);
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// A line read from a client.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Request(Vec<u8>),
    TooLong,
    End,
}

fn read_line(r: &mut impl BufRead) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    r.by_ref()
        .take(MAX_REQUEST_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Ok(Line::End);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() > MAX_REQUEST_LINE {
        return Ok(Line::TooLong);
    }
    Ok(Line::Request(buf))
}

/// The request on `line`, or what is wrong with it.
fn parse(line: &[u8]) -> Result<VmmRequest, String> {
    serde_json::from_slice(line).map_err(|e| {
        format!(
            "Invalid request: {e}; send one JSON object per line such as {{\"op\":\"describe\"}}"
        )
    })
}

fn send(w: &mut impl Write, resp: &VmmResponse) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    text.push(b'\n');
    w.write_all(&text)
}

/// Serves one client until it hangs up, sends garbage longer than a line, or stops the VM.
fn serve_client(ctl: &Controller, conn: UnixStream) -> std::io::Result<()> {
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    conn.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let line = match read_line(&mut r)? {
            Line::End => return Ok(()),
            Line::TooLong => {
                let msg = format!("Request line longer than {MAX_REQUEST_LINE} bytes");
                return send(&mut w, &error("bad_request", msg));
            }
            Line::Request(l) if l.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Request(l) => l,
        };
        let req = parse(&line);
        if let Ok(req @ VmmRequest::MigrateSend { .. }) = req {
            // The connection becomes the migration stream, or stays a control connection if
            // the migration was refused.
            // Bytes sent after the request, before its answer, would be lost in the line
            // reader's buffer: such a client is cut off.
            if !r.buffer().is_empty() {
                let msg = "Nothing may follow migrate_send before its answer";
                return send(&mut w, &error("bad_request", msg));
            }
            let mut conn = r.into_inner();
            if ctl.migrate_send(req, &mut conn)? {
                return Ok(());
            }
            r = BufReader::new(conn);
            continue;
        }
        let stop = matches!(req, Ok(VmmRequest::Stop));
        let resp = match req {
            Ok(req) => ctl.handle(req),
            Err(message) => error("bad_request", message),
        };
        let sent = send(&mut w, &resp);
        if stop {
            ctl.stop("stopped by a control request".into());
            return sent;
        }
        sent?;
    }
}

/// Accepts control clients, each on its own thread, at most [`MAX_CLIENTS`] at a time.
pub(crate) fn control_loop(listener: UnixListener, ctl: Arc<Controller>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
            let msg = format!("Too many control clients (at most {MAX_CLIENTS})");
            let _ = send(&mut conn, &error("busy", msg));
            continue;
        }
        let (client_ctl, client_active) = (Arc::clone(&ctl), Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                // A client that went away mid-answer is nothing to report.
                let _ = serve_client(&client_ctl, conn);
                client_active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread, and so in every thread it starts after:
/// [`signal_loop`] takes them with sigwait instead. Call before starting any thread.
pub(crate) fn block_termination_signals() -> Result<(), VmError> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        block_signal(sig).map_err(|e| VmError::Signals(e.to_string()))?;
    }
    Ok(())
}

/// Waits for SIGTERM and SIGINT and acts on them (see the module documentation).
pub(crate) fn signal_loop(ctl: Arc<Controller>) {
    let Ok(set) = create_sigset(&[libc::SIGTERM, libc::SIGINT]) else {
        return;
    };
    let mut shutting_down = false;
    loop {
        let mut sig = 0;
        // SAFETY: `set` is an initialised signal set and `sig` a valid place for the result.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGTERM && !shutting_down {
            shutting_down = true;
            eprintln!(
                "hvnode-vmm: {}: SIGTERM: shutting the guest down (stopped after {} s)",
                ctl.config.name,
                SIGTERM_SHUTDOWN_LIMIT.as_secs()
            );
            ctl.shutdown(Some(SIGTERM_SHUTDOWN_LIMIT));
        } else {
            let name = if sig == libc::SIGINT {
                "SIGINT"
            } else {
                "a second SIGTERM"
            };
            ctl.stop(format!("stopped by {name}"));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lines_and_refuses_one_longer_than_64_kib() {
        let mut input = b"{\"op\":\"stats\"}\r\n\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_REQUEST_LINE + 1));
        input.extend_from_slice(b"\n");
        let mut r = BufReader::new(&input[..]);
        assert_eq!(
            read_line(&mut r).unwrap(),
            Line::Request(b"{\"op\":\"stats\"}".to_vec())
        );
        assert_eq!(read_line(&mut r).unwrap(), Line::Request(Vec::new()));
        assert_eq!(read_line(&mut r).unwrap(), Line::TooLong);
    }

    #[test]
    fn accepts_a_line_of_exactly_64_kib() {
        let mut input = vec![b' '; MAX_REQUEST_LINE];
        input.push(b'\n');
        let mut r = BufReader::new(&input[..]);
        assert!(
            matches!(read_line(&mut r).unwrap(), Line::Request(l) if l.len() == MAX_REQUEST_LINE)
        );
        assert_eq!(read_line(&mut r).unwrap(), Line::End);
    }

    #[test]
    fn refuses_unknown_ops_and_garbage() {
        for line in [
            &b"{\"op\":\"frobnicate\"}"[..],
            b"nonsense",
            b"\xff\xfe",
            b"[]",
        ] {
            let message = parse(line).unwrap_err();
            assert!(message.starts_with("Invalid request"), "{message}");
        }
        let message = parse(b"{\"op\":\"frobnicate\"}").unwrap_err();
        assert!(
            message.contains("unknown variant `frobnicate`"),
            "{message}"
        );
        assert_eq!(
            parse(b"{\"op\":\"shutdown\"}").unwrap(),
            VmmRequest::Shutdown { timeout_secs: None }
        );
        assert_eq!(
            parse(b"{\"op\":\"shutdown\",\"timeout_secs\":5}").unwrap(),
            VmmRequest::Shutdown {
                timeout_secs: Some(5)
            }
        );
    }
}
