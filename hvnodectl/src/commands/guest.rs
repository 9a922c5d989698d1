//! `guest ...` and `wait`: defining, showing and deleting guests, their actions (start, stop,
//! shutdown, pause, resume, reboot), and waiting for a guest to reach a state. The console
//! subcommand is dispatched from here to the `console` module.

use std::path::Path;
use std::time::{Duration, Instant};

use std::io::IsTerminal;

use hvnode_api::guest::{self, CreateSnapshot, GuestSpec, GuestState, GuestStatus, SnapshotStatus};
use hvnode_api::migration::{MigrateRequest, MigrationView};
use hvnode_api::routes::{GuestAction, Route};
use hvnode_api::vmm::MigrationPhase;
use hyper::Method;

use super::{path_with, CmdError, Ctx};
use crate::cli::{GuestCommand, WaitState};
use crate::output;

/// How long a snapshot may take: the agent's limit for the VMM writing the guest's memory.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How often `wait` asks for the guest's state.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// How long a migrated guest may take to show as running on its destination.
const ARRIVAL_WAIT: Duration = Duration::from_secs(30);

/// Reads and validates a guest definition file.
pub fn read_spec(path: &Path) -> Result<GuestSpec, CmdError> {
    let text = std::fs::read_to_string(path).map_err(|e| CmdError::ReadFile(path.to_owned(), e))?;
    let spec: GuestSpec =
        toml::from_str(&text).map_err(|e| CmdError::ParseSpec(path.to_owned(), e.to_string()))?;
    spec.validate()?;
    Ok(spec)
}

impl Ctx {
    pub(super) async fn guest_cmd(&self, cmd: GuestCommand) -> Result<(), CmdError> {
        use GuestAction::*;
        match cmd {
            GuestCommand::List(a) => {
                let c = self.connect(&a.node)?;
                let (list, raw): (Vec<GuestStatus>, _) = c.get_json(&Route::Guests.path()).await?;
                self.answer(&raw, || output::guest_list(&list))
            }
            GuestCommand::Define(a) => {
                let spec = read_spec(&a.file)?;
                let c = self.connect(&a.node)?;
                let (g, raw): (GuestStatus, _) = c
                    .send_json(Method::POST, &Route::Guests.path(), Some(&spec))
                    .await?;
                self.answer(&raw, || output::guest_changed("defined", &g))
            }
            GuestCommand::Update(a) => {
                let spec = read_spec(&a.file)?;
                let c = self.connect(&a.node)?;
                let path = Route::Guest(spec.name.clone()).path();
                let (g, raw): (GuestStatus, _) =
                    c.send_json(Method::PUT, &path, Some(&spec)).await?;
                self.answer(&raw, || output::guest_changed("updated", &g))
            }
            GuestCommand::Show(a) => {
                guest::validate_name(&a.name)?;
                let c = self.connect(&a.node)?;
                let (g, raw): (GuestStatus, _) =
                    c.get_json(&Route::Guest(a.name.clone()).path()).await?;
                self.answer(&raw, || output::guest(&g))
            }
            GuestCommand::Start(a) => self.guest_action(&a.node, &a.name, Start, None).await,
            GuestCommand::Stop(a) => self.guest_action(&a.node, &a.name, Stop, None).await,
            GuestCommand::Shutdown(a) => {
                self.guest_action(&a.node, &a.name, Shutdown, a.timeout)
                    .await
            }
            GuestCommand::Pause(a) => self.guest_action(&a.node, &a.name, Pause, None).await,
            GuestCommand::Resume(a) => self.guest_action(&a.node, &a.name, Resume, None).await,
            GuestCommand::Reboot(a) => self.guest_action(&a.node, &a.name, Reboot, a.timeout).await,
            GuestCommand::Delete(a) => {
                guest::validate_name(&a.name)?;
                let c = self.connect(&a.node)?;
                c.call(
                    Method::DELETE,
                    &Route::Guest(a.name.clone()).path(),
                    None,
                    "",
                )
                .await?;
                self.answer(b"{}", || format!("deleted guest {}", a.name))
            }
            GuestCommand::Snapshot(a) => {
                guest::validate_name(&a.name)?;
                // The agent allows the VMM as long to write the guest's memory.
                let c = self
                    .connect(&a.node)?
                    .with_request_timeout(SNAPSHOT_TIMEOUT);
                let body = CreateSnapshot {
                    name: a.snapshot.clone(),
                };
                let (snap, raw): (SnapshotStatus, _) = c
                    .send_json(
                        Method::POST,
                        &Route::GuestSnapshots(a.name.clone()).path(),
                        Some(&body),
                    )
                    .await?;
                self.answer(&raw, || output::snapshot_taken(&snap))
            }
            GuestCommand::Snapshots(a) => {
                guest::validate_name(&a.name)?;
                let c = self.connect(&a.node)?;
                let (list, raw): (Vec<SnapshotStatus>, _) = c
                    .get_json(&Route::GuestSnapshots(a.name.clone()).path())
                    .await?;
                self.answer(&raw, || output::snapshots(&list))
            }
            GuestCommand::Restore(a) => {
                guest::validate_name(&a.name)?;
                let c = self.connect(&a.node)?;
                let path = Route::GuestSnapshotRestore(a.name.clone(), a.snapshot.clone()).path();
                let (g, raw): (GuestStatus, _) =
                    c.send_json::<(), _>(Method::POST, &path, None).await?;
                self.answer(&raw, || {
                    format!(
                        "guest {} restored from snapshot {}: {}",
                        g.spec.name,
                        a.snapshot,
                        output::state_name(&g.state)
                    )
                })
            }
            GuestCommand::SnapshotDelete(a) => {
                guest::validate_name(&a.name)?;
                let c = self.connect(&a.node)?;
                let path = Route::GuestSnapshot(a.name.clone(), a.snapshot.clone()).path();
                c.call(Method::DELETE, &path, None, "").await?;
                self.answer(b"{}", || {
                    format!("deleted snapshot {} of guest {}", a.snapshot, a.name)
                })
            }
            GuestCommand::Migrate {
                node,
                name,
                to,
                to_url,
                downtime_ms,
                max_passes,
                timeout,
                verify_memory,
                no_wait,
            } => {
                guest::validate_name(&name)?;
                let dest = self
                    .state
                    .node(&to)?
                    .ok_or_else(|| CmdError::UnknownNode(to.clone()))?;
                if to == node {
                    return Err(CmdError::SameNode(node));
                }
                let c = self.connect(&node)?;
                let req = MigrateRequest {
                    to: to_url.unwrap_or_else(|| dest.url.clone()),
                    to_fingerprint: dest.fingerprint.clone(),
                    downtime_limit_ms: downtime_ms,
                    max_passes,
                    timeout_secs: timeout,
                    verify_memory,
                };
                let path = Route::GuestMigration(name.clone()).path();
                let (_, raw): (MigrationView, _) =
                    c.send_json(Method::POST, &path, Some(&req)).await?;
                if no_wait {
                    return self.answer(&raw, || {
                        format!("guest {name} is migrating from {node} to {to}")
                    });
                }
                let tty = std::io::stderr().is_terminal();
                let mut last = None;
                let (view, raw) = loop {
                    let (view, raw): (MigrationView, _) = c.get_json(&path).await?;
                    if !view.status.phase.in_progress() {
                        break (view, raw);
                    }
                    let line = output::migration_progress(&view.status);
                    if tty {
                        eprint!("\r{line}   ");
                    } else if last.as_ref() != Some(&view.status.pass) {
                        eprintln!("{line}");
                    }
                    last = Some(view.status.pass);
                    tokio::time::sleep(WAIT_POLL).await;
                };
                if tty {
                    eprintln!();
                }
                if view.status.phase == MigrationPhase::Completed {
                    // The destination learns the guest is its own when the stream ends, a
                    // moment after the source does: done is when the destination says so.
                    let d = self.connect(&to)?;
                    let gpath = Route::Guest(name.clone()).path();
                    let deadline = Instant::now() + ARRIVAL_WAIT;
                    let state = loop {
                        let (g, _): (GuestStatus, _) = d.get_json(&gpath).await?;
                        if g.state != GuestState::Migrating || Instant::now() >= deadline {
                            break g.state;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    };
                    if state != GuestState::Running {
                        return Err(CmdError::MigrationFailed(format!(
                            "the source handed {name} over, but on {to} it is {}",
                            state.as_str()
                        )));
                    }
                }
                self.answer(&raw, || output::migration_done(&view, &node, &to))?;
                if view.status.phase == MigrationPhase::Completed {
                    Ok(())
                } else {
                    Err(CmdError::MigrationFailed(
                        view.status.error.unwrap_or_default(),
                    ))
                }
            }
            GuestCommand::MigrateCancel(a) => {
                guest::validate_name(&a.name)?;
                let c = self.connect(&a.node)?;
                let path = Route::GuestMigration(a.name.clone()).path();
                let (_, raw): (MigrationView, _) =
                    c.send_json::<(), _>(Method::DELETE, &path, None).await?;
                self.answer(&raw, || {
                    format!(
                        "migration of guest {} cancelled: it keeps running on {}",
                        a.name, a.node
                    )
                })
            }
            GuestCommand::Console {
                node,
                name,
                attach: true,
                ..
            } => self.console_attach(&node, &name).await,
            GuestCommand::Console {
                node, name, bytes, ..
            } => self.console_log(&node, &name, bytes).await,
        }
    }

    /// `action` on guest `name`; `timeout` is the node's `timeout_secs` for shutdown and
    /// reboot.
    async fn guest_action(
        &self,
        node: &str,
        name: &str,
        action: GuestAction,
        timeout: Option<u64>,
    ) -> Result<(), CmdError> {
        guest::validate_name(name)?;
        let c = self.connect(node)?;
        let route = Route::GuestAction(name.to_owned(), action);
        let path = path_with(&route, "timeout_secs", timeout);
        let raw = c.call(Method::POST, &path, None, "").await?;
        if self.json {
            return self.print(&raw);
        }
        // Decoded only for humans: `--json` passes on whatever the node answered.
        let g: GuestStatus = c.decode(&raw)?;
        Ok(output::text(&output::guest_state(name, &g.state))?)
    }

    pub(super) async fn wait(
        &self,
        node: &str,
        guest: &str,
        wanted: WaitState,
        secs: u64,
    ) -> Result<(), CmdError> {
        guest::validate_name(guest)?;
        let c = self.connect(node)?;
        let want = match wanted {
            WaitState::Running => GuestState::Running,
            WaitState::Stopped => GuestState::Stopped,
            WaitState::Paused => GuestState::Paused,
        };
        let deadline = Instant::now() + Duration::from_secs(secs);
        let path = Route::Guest(guest.to_owned()).path();
        loop {
            let (g, raw): (GuestStatus, _) = c.get_json(&path).await?;
            if g.state == want {
                return self.answer(&raw, || output::guest_state(guest, &g.state));
            }
            if Instant::now() >= deadline {
                return Err(CmdError::WaitTimeout {
                    guest: guest.to_owned(),
                    wanted: output::state_name(&want),
                    secs,
                    last: output::state_name(&g.state),
                });
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnode_api::guest::GuestSpecError;

    #[test]
    fn rejects_invalid_guest_definition_before_sending() {
        let dir = std::env::temp_dir().join(format!("hvnodectl-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "name = \"web\"\nkernel = \"../vmlinuz\"\n").unwrap();
        assert!(matches!(
            read_spec(&bad),
            Err(CmdError::Spec(GuestSpecError::Path(_)))
        ));
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "name = \"web\"\nkernel = \"vmlinuz\"\nmemory_mib = 128\n",
        )
        .unwrap();
        assert_eq!(read_spec(&good).unwrap().memory_mib, 128);
        let typo = dir.join("typo.toml");
        std::fs::write(
            &typo,
            "name = \"web\"\nkernel = \"vmlinuz\"\nmemory = 128\n",
        )
        .unwrap();
        assert!(matches!(read_spec(&typo), Err(CmdError::ParseSpec(..))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
