//! The manager itself: `init` (CA, client and server certificates), `ca`, and `serve`, the
//! endpoint nodes send join requests to, which also renews the nodes' certificates.

use std::net::SocketAddr;
use std::time::Duration;

use hvnode_api::cluster::{ClusterConnection, ClusterView};
use hvnode_api::node::NodeCertificate;
use hvnode_api::routes::Route;

use super::{CmdError, Ctx};
use crate::{output, serve};

impl Ctx {
    pub(super) fn init(&self, name: &str, sans: &[String]) -> Result<(), CmdError> {
        let info = self.state.init(name, sans)?;
        let fp = self.state.ca_fingerprint()?;
        let json = serde_json::json!({
            "name": info.name,
            "state_dir": self.state.root(),
            "ca_fingerprint": fp,
            "ca_pem_path": self.state.ca_cert_path(),
        });
        self.show(&json, || {
            format!(
                "created manager {:?} in {}\nCA fingerprint: {fp}\nserver names: {}",
                info.name,
                self.state.root().display(),
                info.server_names.join(", ")
            )
        })
    }

    pub(super) fn ca(&self) -> Result<(), CmdError> {
        let info = self.state.manager()?;
        let fp = self.state.ca_fingerprint()?;
        let json = serde_json::json!({
            "name": info.name,
            "ca_fingerprint": fp,
            "ca_pem_path": self.state.ca_cert_path(),
        });
        self.show(&json, || {
            format!(
                "manager: {}\nCA fingerprint: {fp}\nCA certificate: {}",
                info.name,
                self.state.ca_cert_path().display()
            )
        })
    }

    pub(super) async fn serve(&self, listen: SocketAddr, sans: &[String]) -> Result<(), CmdError> {
        self.state.manager()?;
        if self.state.ensure_server_names(sans)? {
            eprintln!("server certificate re-issued with names {sans:?}");
        }
        // The manager keeps the nodes' certificates fresh while it serves.
        let renewer = Ctx {
            state: self.state.clone(),
            json: false,
        };
        let every = std::env::var(RENEW_CHECK_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(RENEW_CHECK, Duration::from_secs);
        tokio::spawn(async move {
            loop {
                renewer.renew_node_certificates().await;
                tokio::time::sleep(every).await;
            }
        });
        Ok(serve::run(self.state.clone(), listen).await?)
    }

    /// Signs again every registered node's certificate that is missing or expires within
    /// [`RENEW_BEFORE`]; an unreachable node is tried at the next check.
    pub(super) async fn renew_node_certificates(&self) {
        let Ok(nodes) = self.state.load_nodes() else {
            return;
        };
        let now = crate::state::now() as i64;
        for (name, entry) in &nodes.nodes {
            let Ok(c) = self.client_for(name, entry) else {
                continue;
            };
            let due = match c
                .get_json::<NodeCertificate>(&Route::NodeCertificate.path())
                .await
            {
                Ok((cert, _)) => cert
                    .signed
                    .is_none_or(|s| s.not_after_unix - now < RENEW_BEFORE.as_secs() as i64),
                Err(_) => false,
            };
            if due {
                match self.certify_with(&c).await {
                    Ok(s) => eprintln!(
                        "node {name}: certificate renewed ({}), valid until {}",
                        s.fingerprint,
                        output::unix_date(s.not_after_unix)
                    ),
                    Err(e) => eprintln!("node {name}: renewing its certificate failed: {e}"),
                }
            }
            // A node registered through a join request joins the cluster here.
            if let Ok(Some(cluster)) = self.state.cluster() {
                if let Ok((view, _)) = c.get_json::<ClusterView>(&Route::Cluster.path()).await {
                    if view.connection == ClusterConnection::NotJoined {
                        match self.join_node(name, &cluster).await {
                            Ok(_) => eprintln!("node {name}: joining the cluster"),
                            Err(e) => eprintln!("node {name}: joining the cluster failed: {e}"),
                        }
                    }
                }
            }
        }
    }
}

/// How often `serve` looks at the nodes' certificates: a node registered by a join request
/// (which the manager never talks to on its own) gets its first one within this time.
const RENEW_CHECK: Duration = Duration::from_secs(600);
/// Seconds between the checks instead of [`RENEW_CHECK`] (tests).
const RENEW_CHECK_ENV: &str = "HVNODECTL_RENEW_CHECK_SECS";
/// A node certificate this close to its expiry (of the 365 days it is valid) is signed again.
pub(super) const RENEW_BEFORE: Duration = Duration::from_secs(60 * 86_400);
