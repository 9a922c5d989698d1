//! `node ...`: facts, statistics, host name, log, power and metrics of one node.

use hvnode_api::node::{
    Hostname, InstallCertificate, NodeCertificate, NodeInfo, NodeStats, PowerAction,
    SignedCertificate,
};
use hvnode_api::routes::Route;
use hyper::Method;

use super::{path_with, CmdError, Ctx};
use crate::cli::{NodeCommand, PowerArg};
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

impl Ctx {
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
