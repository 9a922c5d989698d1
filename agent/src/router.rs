//! The router: a request's path is parsed once into a [`Route`], the caller is authorized, the
//! method is checked against what the route serves (405 with `Allow` otherwise), and the one
//! match below hands the request to its domain's handler. Handlers live with their domains.

use std::sync::Arc;

use bytes::Bytes;
use hvnode_api::routes::{method, query_param, Route};
use hyper::{Request, StatusCode};

use crate::error::Error;
use crate::http::{json_response, read_json, Resp};
use crate::{Agent, Origin};

impl Agent {
    /// Handles one request: never fails, errors are responses.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>, origin: Origin) -> Resp
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let route = Route::parse(req.uri().path());
        match self.route(route.as_ref(), req, origin).await {
            Ok(r) => r,
            Err(e) => e.into_response(route.as_ref()),
        }
    }

    async fn route<B>(
        self: &Arc<Self>,
        route: Option<&Route>,
        req: Request<B>,
        origin: Origin,
    ) -> Result<Resp, Error>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let m = req.method().as_str().to_owned();
        self.authorize(origin, &m, route)?;
        let route = route.ok_or_else(Error::not_found)?;
        if !route.methods().contains(&m.as_str()) {
            return Err(Error::method_not_allowed(route, &m));
        }
        let query = |key: &str| query_param(req.uri().query().unwrap_or(""), key);
        use method::{DELETE, GET, POST, PUT};
        match (m.as_str(), route) {
            (GET, Route::Health) => Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"status": "ok", "version": hvnode_api::VERSION}),
            )),
            (GET, Route::Registration) => Ok(json_response(
                StatusCode::OK,
                &self.registration_status(origin),
            )),
            (POST, Route::Registration) => self.pair(read_json(req).await?, origin),
            (DELETE, Route::Registration) => self.unregister(origin),
            (POST, Route::PairingCode) => Ok(self.new_pairing_code(origin)),
            (POST, Route::RegistrationManager) => self.fetch_candidate(read_json(req).await?).await,
            (POST, Route::RegistrationManagerAccept) => {
                self.accept_candidate(read_json(req).await?, origin).await
            }
            (POST, Route::RegistrationManagerReject) => Ok(self.reject_candidate()),
            (GET, Route::Node) => Ok(self.node_info()),
            (PUT, Route::NodeHostname) => self.set_hostname(read_json(req).await?).await,
            (GET, Route::NodeDisks) => self.install_disks().await,
            (GET, Route::NodeInstall) => Ok(self.install_state()),
            (POST, Route::NodeInstall) => self.start_install(read_json(req).await?).await,
            (GET, Route::Stats) => Ok(json_response(StatusCode::OK, &self.stats())),
            (GET, Route::Metrics) => Ok(self.metrics().await),
            (GET, Route::Logs) => self.logs(query("lines")),
            (POST, Route::Power) => self.power(read_json(req).await?).await,
            (GET, Route::Network) => Ok(json_response(StatusCode::OK, &self.network_view()?)),
            (PUT, Route::Network) => self.apply_network(read_json(req).await?).await,
            (POST, Route::NetworkConfirm) => self.confirm_network(),
            (POST, Route::NetworkRollback) => self.rollback_network_now().await,
            (GET, Route::Storage) => self.storage().await,
            (POST, Route::StorageInit) => self.init_storage(read_json(req).await?).await,
            (GET, Route::Guests) => self.list_guests(),
            (POST, Route::Guests) => self.define_guest(read_json(req).await?, None),
            (GET, Route::Guest(name)) => self.show_guest(name),
            (PUT, Route::Guest(name)) => self.define_guest(read_json(req).await?, Some(name)),
            (DELETE, Route::Guest(name)) => self.delete_guest(name),
            (POST, Route::GuestAction(name, action)) => {
                let timeout = query("timeout_secs");
                self.guest_action(name.clone(), *action, timeout).await
            }
            (GET, Route::GuestStats(name)) => self.guest_stats(name.clone()).await,
            (GET, Route::GuestConsole(name)) => {
                self.console_log(name.clone(), query("bytes")).await
            }
            (GET, Route::GuestConsoleAttach(name)) => self.attach_console(name, req).await,
            (GET, Route::GuestSnapshots(name)) => self.list_snapshots(name),
            (POST, Route::GuestSnapshots(name)) => {
                self.create_snapshot(name.clone(), read_json(req).await?)
                    .await
            }
            (GET, Route::GuestSnapshot(name, snap)) => self.show_snapshot(name, snap),
            (DELETE, Route::GuestSnapshot(name, snap)) => self.delete_snapshot(name, snap),
            (POST, Route::GuestSnapshotRestore(name, snap)) => {
                self.restore_snapshot(name.clone(), snap.clone()).await
            }
            (GET, Route::Images) => Ok(self.images()),
            (PUT, Route::Image(path)) => self.upload_image(path, req.into_body()).await,
            (DELETE, Route::Image(path)) => self.delete_image(path),
            (GET, Route::Events) => self.event_stream(query("since")),
            (GET, Route::NodeCertificate) => self.node_certificate(),
            (GET, Route::Cluster) => Ok(self.cluster_view()),
            (GET, Route::ClusterPeer) => Ok(json_response(StatusCode::OK, &self.peer_lease())),
            (PUT, Route::Cluster) => self.join_cluster(read_json(req).await?).await,
            (DELETE, Route::Cluster) => self.leave_cluster().await,
            (PUT, Route::ClusterMaintenance) => self.set_maintenance(read_json(req).await?).await,
            (GET, Route::NodeUpdate) => self.update_view().await,
            (PUT, Route::NodeUpdate) => {
                let force = flag(query("force"), "force")?;
                let reboot = flag(query("reboot"), "reboot")?;
                self.put_update(req.into_body(), force, reboot).await
            }
            (POST, Route::NodeRollback) => self.rollback().await,
            (PUT, Route::NodeCertificate) => self.install_node_certificate(read_json(req).await?),
            (GET, Route::GuestMigration(name)) => self.show_migration(name),
            (POST, Route::GuestMigration(name)) => {
                self.start_migration(name.clone(), read_json(req).await?)
                    .await
            }
            (DELETE, Route::GuestMigration(name)) => self.cancel_migration(name.clone()).await,
            (POST, Route::Migrations) => self.prepare_incoming(read_json(req).await?).await,
            (GET, Route::MigrationStream(name)) => self.migration_stream(name, req).await,
            // `Route::methods` and this match list the same pairs; a test walks every route
            // and method to keep them so.
            (_, route) => Err(Error::method_not_allowed(route, &m)),
        }
    }
}

/// A boolean query parameter: absent is false.
fn flag(value: Option<String>, key: &str) -> Result<bool, Error> {
    match value.as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Error::new(
            hvnode_api::error::ErrorCode::InvalidQuery,
            format!("{key} must be true or false, not {other:?}"),
        )),
    }
}
