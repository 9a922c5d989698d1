//! Guests: their definitions (`<data>/guests/<name>.toml`, written atomically) and the
//! operations on them. [`vmms`] runs and watches their VMM processes; this module is the API's
//! side: defining, reading, updating and deleting guests, and the actions of the guest state
//! machine (`docs/api.md`).

pub mod vmms;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hvnode_api::error::ErrorCode;
use hvnode_api::guest::{GuestSpec, GuestStatus};
use hvnode_api::routes::GuestAction;
use hyper::StatusCode;

use crate::error::{blocking, Error};
use crate::http::{json_response, no_content, Resp};
use crate::Agent;

impl Agent {
    pub(crate) fn guest_path(&self, name: &str) -> Result<PathBuf, Error> {
        hvnode_api::guest::validate_name(name)
            .map_err(|e| Error::new(ErrorCode::InvalidGuestName, e.to_string()))?;
        Ok(self.paths.guests().join(format!("{name}.toml")))
    }

    fn cluster_owned(name: &str) -> Error {
        Error::new(
            ErrorCode::ClusterGuest,
            format!(
                "Guest {name:?} belongs to the cluster: change or delete it through the cluster \
                 (hvnodectl guest ... --cluster)"
            ),
        )
    }

    fn no_guest(name: &str) -> Error {
        Error::new(ErrorCode::GuestNotFound, format!("No guest named {name:?}"))
    }

    /// One guest's definition and state.
    pub(crate) fn guest(&self, name: &str) -> Result<GuestStatus, Error> {
        let path = self.guest_path(name)?;
        let text = std::fs::read_to_string(&path).map_err(|_| Self::no_guest(name))?;
        let spec: GuestSpec =
            toml::from_str(&text).map_err(|e| Error::internal("Guest definition", e))?;
        let rt = self.running.state(name);
        Ok(GuestStatus {
            spec,
            state: rt.state,
            pid: rt.pid,
            uptime_secs: rt.uptime_secs,
            crash_reason: rt.crash_reason,
            cluster: self.is_cluster_guest(name),
            snapshots: self
                .snapshots_of(name)
                .into_iter()
                .map(|s| s.name)
                .collect(),
        })
    }

    /// Every guest, by name.
    pub(crate) fn guests(&self) -> Result<Vec<GuestStatus>, Error> {
        let mut out = Vec::new();
        let dir = match std::fs::read_dir(self.paths.guests()) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::internal("Reading guest definitions", e)),
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".toml") {
                if !n.starts_with('.') {
                    out.push(self.guest(n)?);
                }
            }
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    /// How many guests are defined (0 when the definitions cannot be read).
    pub(crate) fn guest_count(&self) -> u32 {
        self.guests().map(|g| g.len() as u32).unwrap_or(0)
    }

    /// `GET /v1/guests`.
    pub(crate) fn list_guests(&self) -> Result<Resp, Error> {
        Ok(json_response(StatusCode::OK, &self.guests()?))
    }

    /// `GET /v1/guests/{name}`.
    pub(crate) fn show_guest(&self, name: &str) -> Result<Resp, Error> {
        Ok(json_response(StatusCode::OK, &self.guest(name)?))
    }

    /// `POST /v1/guests` (`update` false) and `PUT /v1/guests/{name}` (`update` true, with the
    /// name from the path).
    pub(crate) fn define_guest(
        &self,
        spec: GuestSpec,
        path_name: Option<&str>,
    ) -> Result<Resp, Error> {
        let update = path_name.is_some();
        if path_name.is_some_and(|n| n != spec.name) {
            return Err(Error::new(
                ErrorCode::NameMismatch,
                "The name in the body must match the name in the path",
            ));
        }
        spec.validate()
            .map_err(|e| Error::new(ErrorCode::InvalidGuestSpec, e.to_string()))?;
        let path = self.guest_path(&spec.name)?;
        if self.is_cluster_guest(&spec.name) {
            return Err(Self::cluster_owned(&spec.name));
        }
        match (path.exists(), update) {
            (true, false) => {
                return Err(Error::new(
                    ErrorCode::GuestExists,
                    format!(
                        "A guest named {:?} exists: update it with PUT or pick another name",
                        spec.name
                    ),
                ))
            }
            (false, true) => return Err(Self::no_guest(&spec.name)),
            (true, true) if self.running.is_active(&spec.name) => {
                return Err(Error::new(
                    ErrorCode::GuestRunning,
                    format!(
                        "Guest {:?} is running: stop it before changing its definition",
                        spec.name
                    ),
                ))
            }
            _ => {}
        }
        let text = toml::to_string(&spec).map_err(|e| Error::internal("Guest definition", e))?;
        hvnode_base::fs::write_atomic(&path, text.as_bytes(), 0o644)
            .map_err(|e| Error::internal("Saving the guest definition", e))?;
        self.events.emit(
            "guest_defined",
            Some(&spec.name),
            if update {
                "definition updated"
            } else {
                "defined"
            },
        );
        let status = if update {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok(json_response(status, &self.guest(&spec.name)?))
    }

    /// `DELETE /v1/guests/{name}`: only without a VMM.
    pub(crate) fn delete_guest(&self, name: &str) -> Result<Resp, Error> {
        let path = self.guest_path(name)?;
        if self.is_cluster_guest(name) {
            return Err(Self::cluster_owned(name));
        }
        if self.running.is_active(name) {
            return Err(Error::new(
                ErrorCode::GuestRunning,
                format!("Guest {name:?} has a running VMM: stop it before deleting it"),
            ));
        }
        std::fs::remove_file(&path).map_err(|_| Self::no_guest(name))?;
        self.running.forget(name);
        self.delete_snapshots_of(name);
        self.events.emit("guest_deleted", Some(name), "deleted");
        Ok(no_content())
    }

    /// `GET /v1/guests/{name}/stats`: the VMM's counters.
    pub(crate) async fn guest_stats(self: &Arc<Self>, name: String) -> Result<Resp, Error> {
        let me = Arc::clone(self);
        blocking("Guest statistics", move || {
            me.guest(&name)?;
            Ok(json_response(StatusCode::OK, &me.running.stats(&name)?))
        })
        .await
    }

    /// `POST /v1/guests/{name}/{action}`; `?timeout_secs=N` for shutdown and reboot. The VMM's
    /// answers may take seconds: a blocking thread waits for them.
    pub(crate) async fn guest_action(
        self: &Arc<Self>,
        name: String,
        action: GuestAction,
        timeout_secs: Option<String>,
    ) -> Result<Resp, Error> {
        let me = Arc::clone(self);
        blocking("Guest operation", move || {
            let status = me.guest(&name)?;
            let timeout = timeout_secs
                .map(|v| {
                    v.parse::<u64>()
                        .ok()
                        .filter(|s| *s <= 86_400)
                        .map(Duration::from_secs)
                        .ok_or_else(|| {
                            Error::new(
                                ErrorCode::InvalidTimeout,
                                format!(
                                    "timeout_secs={v:?} is not a number of seconds from 0 to                                      86400"
                                ),
                            )
                        })
                })
                .transpose()?;
            let g = &me.running;
            match action {
                GuestAction::Start => g.start(&status.spec).map(drop)?,
                GuestAction::Stop => g.stop(&name)?,
                GuestAction::Shutdown => g.shutdown(&name, timeout)?,
                GuestAction::Pause => g.pause(&name)?,
                GuestAction::Resume => g.resume(&name)?,
                GuestAction::Reboot => g.reboot(&name, timeout.unwrap_or(vmms::REBOOT_TIMEOUT))?,
            }
            Ok(json_response(StatusCode::OK, &me.guest(&name)?))
        })
        .await
    }

    /// After a (re)start of the agent: takes over the guests whose VMMs still run, cleans up
    /// after those that ended meanwhile, and on the first start since the node booted starts
    /// the `autostart` guests. Blocking.
    pub fn start_guests(self: &Arc<Self>) {
        let specs = self.guest_specs();
        self.running.reattach(&specs);
        match vmms::first_start_since_boot(&self.paths.run) {
            Ok(true) => {
                let failed = self.running.autostart(&specs);
                if failed > 0 {
                    eprintln!("agent: {failed} autostart guest(s) failed to start");
                }
            }
            Ok(false) => {}
            Err(e) => eprintln!(
                "agent: cannot record the autostart marker in {}: {e}; not autostarting guests",
                self.paths.run.display()
            ),
        }
    }

    /// Every valid guest definition; invalid ones are logged and left out.
    pub(crate) fn guest_specs(&self) -> Vec<GuestSpec> {
        match self.guests() {
            Ok(list) => list.into_iter().map(|g| g.spec).collect(),
            Err(e) => {
                eprintln!("agent: reading guest definitions: {}", e.message);
                Vec::new()
            }
        }
    }
}
