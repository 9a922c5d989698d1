//! Manager-initiated registration and the registered nodes: `register` (pairing code and
//! fingerprint check), `nodes` (every node probed at once), `unregister`.

use std::io::{BufRead, Write};

use bytes::Bytes;
use hvnode_api::fingerprint;
use hvnode_api::node::{NodeInfo, NodeStats};
use hvnode_api::registration::{PairRequest, RegistrationStatus};
use hvnode_api::routes::Route;
use hyper::Method;

use super::{CmdError, Ctx};
use crate::client::{ClientError, NodeClient};
use crate::output::{self, NodeRow};
use crate::state::{self, NodeEntry};

impl Ctx {
    pub(super) async fn register(
        &self,
        node: &str,
        url: &str,
        code: &str,
        expected: Option<&str>,
        yes: bool,
        replace: bool,
    ) -> Result<(), CmdError> {
        let info = self.state.manager()?;
        let mut nodes = self.state.load_nodes()?;
        if nodes.nodes.contains_key(node) && !replace {
            return Err(CmdError::NodeExists(node.to_owned()));
        }
        let expected = expected.map(fingerprint::normalize).transpose()?;
        let probe = NodeClient::new(node, url, None, None)?;
        self.connecting(&probe);
        let (status, _): (RegistrationStatus, _) =
            probe.get_json(&Route::Registration.path()).await?;
        let presented = probe
            .seen_fingerprint()
            .ok_or_else(|| CmdError::Inconsistent {
                reported: status.node_fingerprint.clone(),
                presented: "none".into(),
            })?;
        if fingerprint::normalize(&status.node_fingerprint)
            .ok()
            .as_deref()
            != Some(presented.as_str())
        {
            return Err(CmdError::Inconsistent {
                reported: status.node_fingerprint,
                presented,
            });
        }
        eprintln!(
            "node fingerprint: {presented} (state: {})",
            output::state_name(&status.state)
        );
        match expected {
            Some(exp) if exp != presented => {
                return Err(CmdError::FingerprintDiffers {
                    actual: presented,
                    expected: exp,
                })
            }
            Some(_) => {}
            None if yes => {}
            None => confirm_fingerprint()?,
        }
        let pinned = NodeClient::new(node, url, Some(presented.clone()), None)?;
        let req = PairRequest {
            code: code.trim().to_owned(),
            manager_name: info.name.clone(),
            ca_pem: self.state.ca_pem()?,
        };
        let (answer, raw): (RegistrationStatus, _) = pinned
            .send_json(Method::POST, &Route::Registration.path(), Some(&req))
            .await?;
        let entry = NodeEntry {
            url: pinned.url().to_owned(),
            fingerprint: presented,
            registered_at: state::now(),
        };
        nodes.nodes.insert(node.to_owned(), entry.clone());
        self.state.save_nodes(&nodes)?;
        eprintln!("registered");
        // Prove the client certificate is accepted now.
        let check = self.client_for(node, &entry)?;
        let _: (NodeInfo, _) = check.get_json(&Route::Node.path()).await?;
        // The node's certificate for other nodes (live migration).
        match self.certify(node).await {
            Ok(s) => eprintln!("node certificate signed ({})", s.fingerprint),
            Err(e) => eprintln!(
                "warning: signing the node's certificate failed ({e}): it cannot take part in \
                 migrations until `hvnodectl node certify {node}` succeeds"
            ),
        }
        // A cluster set up already: the node joins it.
        if let Some(cluster) = self.state.cluster()? {
            match self.join_node(node, &cluster).await {
                Ok(_) => eprintln!("joining the cluster"),
                Err(e) => eprintln!(
                    "warning: the node did not join the cluster ({e}): run `hvnodectl cluster \
                     join {node}`"
                ),
            }
        }
        self.answer(&raw, || {
            format!(
                "node {node} at {} registered with manager {:?} (state: {})",
                entry.url,
                info.name,
                output::state_name(&answer.state)
            )
        })
    }

    pub(super) async fn nodes(&self) -> Result<(), CmdError> {
        let nodes = self.state.load_nodes()?;
        let mut probes = Vec::new();
        for (name, entry) in &nodes.nodes {
            let client = self.client_for(name, entry)?;
            probes.push(async move {
                let reg = client
                    .get_json::<RegistrationStatus>(&Route::Registration.path())
                    .await;
                let info = client.get_json::<NodeInfo>(&Route::Node.path()).await;
                let stats = client.get_json::<NodeStats>(&Route::Stats.path()).await;
                (reg, info, stats)
            });
        }
        let results = futures_util::future::join_all(probes).await;
        let cluster = self.cluster_membership().await;
        let mut rows = Vec::new();
        for ((name, entry), (reg, info, stats)) in nodes.nodes.iter().zip(results) {
            let reachable = !matches!(reg, Err(ClientError::Unreachable { .. }));
            let state = match &reg {
                Ok((r, _)) => output::state_name(&r.state),
                Err(ClientError::Unreachable { .. }) => "-".into(),
                Err(ClientError::FingerprintMismatch { .. }) => "wrong certificate".into(),
                Err(e) => format!("error: {e}"),
            };
            let state = match &info {
                Err(ClientError::Untrusted { .. }) => "untrusted".into(),
                _ => state,
            };
            let error = reg
                .as_ref()
                .err()
                .or(info.as_ref().err())
                .or(stats.as_ref().err())
                .map(|e| e.to_string());
            let info = info.ok().map(|(i, _)| i);
            let stats = stats.ok().map(|(s, _)| s);
            rows.push(NodeRow {
                error,
                fingerprint: entry.fingerprint.clone(),
                guests_running: stats.as_ref().map(|s| s.guests_running),
                guests_total: stats.as_ref().map(|s| s.guests_total),
                hostname: info.map(|i| i.hostname),
                name: name.clone(),
                reachable,
                state,
                url: entry.url.clone(),
                cluster: cluster.as_ref().map(|c| match c {
                    Ok((members, leader)) => {
                        let member = members.iter().find(|(id, _)| id == name);
                        let role = match (member, leader) {
                            (Some(_), Some(l)) if l == name => "leader",
                            (Some(_), _) => "member",
                            (None, _) => "lost",
                        };
                        match member {
                            Some((_, true)) => format!("{role} (maintenance)"),
                            _ => role.to_owned(),
                        }
                    }
                    Err(e) => e.clone(),
                }),
            });
        }
        self.show(&rows, || output::nodes(&rows))
    }

    pub(super) async fn unregister(&self, node: &str, force: bool) -> Result<(), CmdError> {
        let c = self.connect(node)?;
        let result = c
            .send_json_raw::<()>(Method::DELETE, &Route::Registration.path(), None)
            .await;
        let raw = match result {
            Ok(raw) => raw,
            Err(e) if force => {
                eprintln!("warning: {e}; forgetting the node anyway");
                Bytes::new()
            }
            Err(e) => return Err(e.into()),
        };
        let mut nodes = self.state.load_nodes()?;
        nodes.nodes.remove(node);
        self.state.save_nodes(&nodes)?;
        eprintln!("unregistered");
        self.answer(&raw, || {
            format!("node {node} unregistered and removed from nodes.toml")
        })
    }
}

/// Asks the admin on stdin whether the fingerprint shown matches the node's console.
fn confirm_fingerprint() -> Result<(), CmdError> {
    eprint!("Does this fingerprint match the one on the node's console? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CmdError::ReadFile("stdin".into(), e))?;
    if !matches!(answer.trim(), "y" | "Y" | "yes" | "Yes") {
        return Err(CmdError::NotConfirmed);
    }
    Ok(())
}
