//! `node ...`: facts, statistics, host name, log, power and metrics of one node.

use std::time::Duration;

use hvnode_api::cluster::{
    ClusterView, DrainAction, DrainPolicy, MaintenanceState, MaintenanceView, SetMaintenance,
};
use hvnode_api::install::{InstallDisk, InstallRequest, InstallState};
use hvnode_api::node::{
    Hostname, InstallCertificate, NodeCertificate, NodeInfo, NodeStats, PowerAction,
    SignedCertificate,
};
use hvnode_api::routes::Route;
use hvnode_api::update::{RollbackDone, UpdateInstalled, UpdateView};
use hyper::Method;

use super::{path_with, CmdError, Ctx};
use crate::cli::{NodeCommand, OnOff, PolicyArg, PowerArg};
use crate::output;

impl Ctx {
    pub(super) async fn node_cmd(&self, cmd: NodeCommand) -> Result<(), CmdError> {
        match cmd {
            NodeCommand::Info(a) => {
                let c = self.connect(&a.node)?;
                let (i, raw): (NodeInfo, _) = c.get_json(&Route::Node.path()).await?;
                self.answer(&raw, || output::node_info(&i))
            }
            NodeCommand::Stats(a) => {
                let c = self.connect(&a.node)?;
                let (s, raw): (NodeStats, _) = c.get_json(&Route::Stats.path()).await?;
                self.answer(&raw, || output::node_stats(&s))
            }
            NodeCommand::SetHostname { node, hostname } => {
                let c = self.connect(&node)?;
                let body = Hostname { hostname };
                let (i, raw): (NodeInfo, _) = c
                    .send_json(Method::PUT, &Route::NodeHostname.path(), Some(&body))
                    .await?;
                self.answer(&raw, || {
                    format!("host name of node {node} is now {}", i.hostname)
                })
            }
            NodeCommand::Logs { node, lines } => {
                let c = self.connect(&node)?;
                let path = path_with(&Route::Logs, "lines", lines);
                let raw = c.call(Method::GET, &path, None, "").await?;
                self.print(&raw)
            }
            NodeCommand::Power { node, action } => {
                let c = self.connect(&node)?;
                let (body, what) = match action {
                    PowerArg::Reboot => (PowerAction::Reboot, "reboot"),
                    PowerArg::Poweroff => (PowerAction::Poweroff, "power off"),
                };
                let raw = c
                    .send_json_raw(Method::POST, &Route::Power.path(), Some(&body))
                    .await?;
                self.answer(&raw, || format!("node {node}: {what} requested"))
            }
            NodeCommand::Certify(a) => {
                let signed = self.certify(&a.node).await?;
                self.answer(b"{}", || {
                    format!(
                        "node {}: certificate {} signed, valid until {}",
                        a.node,
                        signed.fingerprint,
                        output::unix_date(signed.not_after_unix)
                    )
                })
            }
            NodeCommand::Maintenance {
                node,
                mode,
                policy,
                no_wait,
                downtime_ms,
            } => {
                self.maintenance(&node, mode, policy, no_wait, downtime_ms)
                    .await
            }
            NodeCommand::Slots(a) => {
                let c = self.connect(&a.node)?;
                let (v, raw): (UpdateView, _) = c.get_json(&Route::NodeUpdate.path()).await?;
                self.answer(&raw, || output::slots(&v))
            }
            NodeCommand::Update {
                node,
                bundle,
                force,
                reboot,
            } => {
                let c = self.client(&node)?;
                let mut query = Vec::new();
                if force {
                    query.push(("force", "true"));
                }
                if reboot {
                    query.push(("reboot", "true"));
                }
                let (raw, _) = self
                    .stream_file(&c, &bundle, &Route::NodeUpdate.with_query(&query))
                    .await?;
                let done: UpdateInstalled = c.decode(&raw)?;
                self.answer(&raw, || {
                    let then = if done.rebooting {
                        "the node is rebooting into it"
                    } else {
                        "it boots once at the next boot (hvnodectl node power NODE reboot)"
                    };
                    format!(
                        "node {node}: {} written to slot {}; {then}",
                        done.version, done.slot
                    )
                })
            }
            NodeCommand::Rollback(a) => {
                let c = self.connect(&a.node)?;
                let (r, raw): (RollbackDone, _) = c
                    .send_json(Method::POST, &Route::NodeRollback.path(), None::<&()>)
                    .await?;
                self.answer(&raw, || {
                    format!("node {}: slot {} boots next", a.node, r.next_boot)
                })
            }
            NodeCommand::Install {
                node,
                disk,
                confirm,
            } => self.install(&node, disk, confirm).await,
            NodeCommand::Metrics(a) => {
                let c = self.connect(&a.node)?;
                let raw = c
                    .call(Method::GET, &Route::Metrics.path(), None, "")
                    .await?;
                self.print(&raw)
            }
        }
    }
}

/// How often `node install` reads the install's progress.
const INSTALL_POLL: Duration = Duration::from_millis(500);

impl Ctx {
    /// `node install NODE [--disk D [--confirm D]]`: without a disk, the disks and what an
    /// install would do to each; with one, starts the install and prints its progress until it
    /// is done (or failed: an error with why).
    async fn install(
        &self,
        node: &str,
        disk: Option<String>,
        confirm: Option<String>,
    ) -> Result<(), CmdError> {
        let c = self.connect(node)?;
        let Some(disk) = disk else {
            let (disks, raw): (Vec<InstallDisk>, _) = c.get_json(&Route::NodeDisks.path()).await?;
            return self.answer(&raw, || {
                disks
                    .iter()
                    .map(|d| {
                        format!(
                            "{} {} GiB {}{}: {}",
                            d.name,
                            d.size_bytes >> 30,
                            if d.model.is_empty() { "" } else { &d.model },
                            if d.boot_medium { " (boot medium)" } else { "" },
                            d.note
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        };
        let body = InstallRequest { disk, confirm };
        let _: (InstallState, _) = c
            .send_json(Method::POST, &Route::NodeInstall.path(), Some(&body))
            .await?;
        let mut last = String::new();
        loop {
            let (state, raw): (InstallState, _) = c.get_json(&Route::NodeInstall.path()).await?;
            match state {
                InstallState::Writing {
                    disk,
                    stage,
                    percent,
                } => {
                    let line = format!("node {node}: installing onto {disk}: {stage} {percent}%");
                    if line != last && !self.json {
                        eprintln!("{line}");
                        last = line;
                    }
                }
                InstallState::Done { disk } => {
                    return self.answer(&raw, || {
                        format!(
                            "node {node} is installed on {disk}: power it off, remove the \
                             installation medium and boot from {disk}"
                        )
                    })
                }
                InstallState::Failed { disk, error } => {
                    return Err(CmdError::Install(format!(
                        "Node {node}: installing onto {disk} failed: {error}"
                    )))
                }
                InstallState::Idle => {
                    return Err(CmdError::Install(format!(
                        "Node {node}: no install is running (did the agent restart?)"
                    )))
                }
            }
            tokio::time::sleep(INSTALL_POLL).await;
        }
    }
}

/// How often `node maintenance` reads the drain's progress.
const DRAIN_POLL: Duration = Duration::from_millis(500);

impl Ctx {
    /// `node maintenance NODE on|off`: sets the mode, then (on, unless `no_wait`) prints the
    /// drain's progress until the node is drained (or the drain stopped: an error with why).
    async fn maintenance(
        &self,
        node: &str,
        mode: OnOff,
        policy: PolicyArg,
        no_wait: bool,
        downtime_ms: Option<u64>,
    ) -> Result<(), CmdError> {
        let c = self.connect(node)?;
        let body = SetMaintenance {
            on: mode == OnOff::On,
            policy: match policy {
                PolicyArg::Restart => DrainPolicy::Restart,
                PolicyArg::Stop => DrainPolicy::Stop,
            },
            downtime_limit_ms: downtime_ms,
        };
        let (view, raw): (MaintenanceView, _) = c
            .send_json(Method::PUT, &Route::ClusterMaintenance.path(), Some(&body))
            .await?;
        if !view.on {
            return self.answer(&raw, || {
                format!("node {node}: maintenance mode off; the node takes guests again")
            });
        }
        if no_wait {
            return self.answer(&raw, || {
                format!(
                    "node {node}: maintenance mode on (policy {}); `hvnodectl cluster status` \
                     or the node's console follows the drain",
                    view.policy.as_str()
                )
            });
        }
        let mut last = String::new();
        loop {
            let (cluster, raw): (ClusterView, _) = c.get_json(&Route::Cluster.path()).await?;
            let m = &cluster.maintenance;
            let line = progress(node, m);
            if line != last && !self.json {
                eprintln!("{line}");
                last = line;
            }
            match m.state {
                MaintenanceState::Drained => {
                    return self.answer(&raw, || {
                        format!(
                            "node {node} is drained: no cluster guest is left; it can be \
                             rebooted or updated"
                        )
                    })
                }
                MaintenanceState::Stopped => {
                    return Err(CmdError::ClusterRefused(format!(
                        "Node {node}: the drain stopped: {}; fix that and run `hvnodectl node \
                         maintenance {node} on` again (or turn it off)",
                        m.message.as_deref().unwrap_or("no reason given")
                    )))
                }
                MaintenanceState::Off => {
                    return Err(CmdError::ClusterRefused(format!(
                        "Node {node}: maintenance mode was turned off meanwhile"
                    )))
                }
                MaintenanceState::Draining => tokio::time::sleep(DRAIN_POLL).await,
            }
        }
    }

    /// Signs the node's certificate request with the manager's CA and installs the
    /// certificate on the node: what another node checks before it takes a guest from it.
    pub(super) async fn certify(&self, node: &str) -> Result<SignedCertificate, CmdError> {
        let c = self.connect(node)?;
        self.certify_with(&c).await
    }

    /// [`Ctx::certify`] through a client already made.
    pub(super) async fn certify_with(
        &self,
        c: &crate::client::NodeClient,
    ) -> Result<SignedCertificate, CmdError> {
        let (req, _): (NodeCertificate, _) = c.get_json(&Route::NodeCertificate.path()).await?;
        let cert_pem = crate::pki::sign_node(&self.state.ca()?, &req.csr_pem)
            .map_err(crate::state::StateError::from)?;
        let (now, _): (NodeCertificate, _) = c
            .send_json(
                Method::PUT,
                &Route::NodeCertificate.path(),
                Some(&InstallCertificate { cert_pem }),
            )
            .await?;
        now.signed.ok_or(CmdError::StreamEnded)
    }
}

/// One progress line of a drain.
fn progress(node: &str, m: &MaintenanceView) -> String {
    let mut line = format!("node {node}: {}", m.state.as_str());
    if m.state == MaintenanceState::Draining {
        line.push_str(&format!(
            ", {} left{}",
            m.guests_left.len(),
            if m.guests_left.is_empty() {
                String::new()
            } else {
                format!(" ({})", m.guests_left.join(", "))
            }
        ));
    }
    if let Some(c) = &m.current {
        let what = match c.action {
            DrainAction::Migrating => "migrating",
            DrainAction::RestartingElsewhere => "restarting elsewhere",
        };
        line.push_str(&format!("; {what} {} to {}", c.guest, c.to));
    }
    if let Some(msg) = &m.message {
        line.push_str(&format!("; {msg}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnode_api::cluster::DrainStep;

    #[test]
    fn progress_lines_say_what_moves_where_and_why_it_stopped() {
        let mut m = MaintenanceView {
            on: true,
            state: MaintenanceState::Draining,
            guests_left: vec!["db".into(), "web".into()],
            current: Some(DrainStep {
                guest: "db".into(),
                to: "n2".into(),
                action: DrainAction::Migrating,
            }),
            ..MaintenanceView::default()
        };
        assert_eq!(
            progress("n1", &m),
            "node n1: draining, 2 left (db, web); migrating db to n2"
        );
        m.state = MaintenanceState::Stopped;
        m.current = None;
        m.message = Some("no room for web".into());
        assert_eq!(progress("n1", &m), "node n1: stopped; no room for web");
    }
}
