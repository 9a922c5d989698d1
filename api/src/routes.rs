//! The agent's routes as one typed value: the agent parses a request path into a [`Route`] once
//! and dispatches on it; its clients (the console, `hvnodectl`) build paths from the same value,
//! so that a path is written in exactly one place. The manager side (`hvnodectl serve`) has
//! [`ManagerRoute`].
//!
//! Path segments that carry names are percent-encoded by [`Route::path`] and decoded by
//! [`Route::parse`]; whether a decoded name is valid is the agent's question, not the parser's.

/// The protocol name of the console attach upgrade (`Upgrade: hvnode-console`).
pub const CONSOLE_PROTOCOL: &str = "hvnode-console";
/// The `Upgrade` token of a migration stream between two nodes
/// (`GET /v1/migrations/{name}/stream`).
pub const MIGRATION_PROTOCOL: &str = "hvnode-migration";

/// An operation on a guest: `POST /v1/guests/{name}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestAction {
    /// Start a VMM.
    Start,
    /// Stop the VMM (hard).
    Stop,
    /// Ask the guest to shut down.
    Shutdown,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Shut down and start again.
    Reboot,
}

impl GuestAction {
    /// Every action.
    pub const ALL: [GuestAction; 6] = [
        GuestAction::Start,
        GuestAction::Stop,
        GuestAction::Shutdown,
        GuestAction::Pause,
        GuestAction::Resume,
        GuestAction::Reboot,
    ];

    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestAction::Start => "start",
            GuestAction::Stop => "stop",
            GuestAction::Shutdown => "shutdown",
            GuestAction::Pause => "pause",
            GuestAction::Resume => "resume",
            GuestAction::Reboot => "reboot",
        }
    }

    /// The action a path segment names.
    pub fn parse(s: &str) -> Option<GuestAction> {
        GuestAction::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl std::fmt::Display for GuestAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One route of the agent's API (see `docs/api.md`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// `/v1/health`
    Health,
    /// `/v1/registration`
    Registration,
    /// `/v1/registration/pairing-code`
    PairingCode,
    /// `/v1/registration/manager`
    RegistrationManager,
    /// `/v1/registration/manager/accept`
    RegistrationManagerAccept,
    /// `/v1/registration/manager/reject`
    RegistrationManagerReject,
    /// `/v1/node`
    Node,
    /// `/v1/node/hostname`
    NodeHostname,
    /// `/v1/node/disks`
    NodeDisks,
    /// `/v1/node/install`
    NodeInstall,
    /// `/v1/stats`
    Stats,
    /// `/v1/network`
    Network,
    /// `/v1/network/confirm`
    NetworkConfirm,
    /// `/v1/network/rollback`
    NetworkRollback,
    /// `/v1/storage`
    Storage,
    /// `/v1/storage/init`
    StorageInit,
    /// `/v1/guests`
    Guests,
    /// `/v1/guests/{name}`
    Guest(String),
    /// `/v1/guests/{name}/{action}`
    GuestAction(String, GuestAction),
    /// `/v1/guests/{name}/console`
    GuestConsole(String),
    /// `/v1/guests/{name}/console/attach`
    GuestConsoleAttach(String),
    /// `/v1/guests/{name}/stats`
    GuestStats(String),
    /// `/v1/guests/{name}/snapshots`
    GuestSnapshots(String),
    /// `/v1/guests/{name}/snapshots/{snapshot}`
    GuestSnapshot(String, String),
    /// `/v1/guests/{name}/snapshots/{snapshot}/restore`
    GuestSnapshotRestore(String, String),
    /// `/v1/images`
    Images,
    /// `/v1/images/{path}` (the path may contain `/`)
    Image(String),
    /// `/v1/events`
    Events,
    /// `/v1/logs`
    Logs,
    /// `/v1/power`
    Power,
    /// `/metrics`
    Metrics,
    /// `/v1/node/certificate`
    NodeCertificate,
    /// `/v1/node/update`: the slots, and a signed update bundle written into the inactive one.
    NodeUpdate,
    /// `/v1/node/rollback`: boot the other slot next.
    NodeRollback,
    /// `/v1/cluster`
    Cluster,
    /// `/v1/cluster/peer` (node to node): whether this node holds its membership lease.
    ClusterPeer,
    /// `/v1/cluster/maintenance`
    ClusterMaintenance,
    /// `/v1/guests/{name}/migration`
    GuestMigration(String),
    /// `/v1/migrations` (node to node)
    Migrations,
    /// `/v1/migrations/{name}/stream` (node to node)
    MigrationStream(String),
}

/// HTTP methods as the contract names them (this crate has no HTTP library).
pub mod method {
    /// GET
    pub const GET: &str = "GET";
    /// POST
    pub const POST: &str = "POST";
    /// PUT
    pub const PUT: &str = "PUT";
    /// DELETE
    pub const DELETE: &str = "DELETE";
}

impl Route {
    /// Parses a request path (without the query). `None`: no such route.
    pub fn parse(path: &str) -> Option<Route> {
        if path == "/metrics" {
            return Some(Route::Metrics);
        }
        let rest = path.strip_prefix("/v1/")?;
        if let Some(image) = rest.strip_prefix("images/") {
            return Some(Route::Image(decode(image)?));
        }
        let segs: Vec<&str> = rest.split('/').collect();
        let route = match segs.as_slice() {
            ["health"] => Route::Health,
            ["registration"] => Route::Registration,
            ["registration", "pairing-code"] => Route::PairingCode,
            ["registration", "manager"] => Route::RegistrationManager,
            ["registration", "manager", "accept"] => Route::RegistrationManagerAccept,
            ["registration", "manager", "reject"] => Route::RegistrationManagerReject,
            ["node"] => Route::Node,
            ["node", "hostname"] => Route::NodeHostname,
            ["node", "disks"] => Route::NodeDisks,
            ["node", "install"] => Route::NodeInstall,
            ["node", "certificate"] => Route::NodeCertificate,
            ["node", "update"] => Route::NodeUpdate,
            ["node", "rollback"] => Route::NodeRollback,
            ["cluster"] => Route::Cluster,
            ["cluster", "peer"] => Route::ClusterPeer,
            ["cluster", "maintenance"] => Route::ClusterMaintenance,
            ["migrations"] => Route::Migrations,
            ["migrations", name, "stream"] => Route::MigrationStream(segment(name)?),
            ["guests", name, "migration"] => Route::GuestMigration(segment(name)?),
            ["stats"] => Route::Stats,
            ["network"] => Route::Network,
            ["network", "confirm"] => Route::NetworkConfirm,
            ["network", "rollback"] => Route::NetworkRollback,
            ["storage"] => Route::Storage,
            ["storage", "init"] => Route::StorageInit,
            ["guests"] => Route::Guests,
            ["guests", name] => Route::Guest(segment(name)?),
            ["guests", name, "console"] => Route::GuestConsole(segment(name)?),
            ["guests", name, "console", "attach"] => Route::GuestConsoleAttach(segment(name)?),
            ["guests", name, "stats"] => Route::GuestStats(segment(name)?),
            ["guests", name, "snapshots"] => Route::GuestSnapshots(segment(name)?),
            ["guests", name, "snapshots", snap] => {
                Route::GuestSnapshot(segment(name)?, segment(snap)?)
            }
            ["guests", name, "snapshots", snap, "restore"] => {
                Route::GuestSnapshotRestore(segment(name)?, segment(snap)?)
            }
            ["guests", name, action] => {
                Route::GuestAction(segment(name)?, GuestAction::parse(action)?)
            }
            ["images"] => Route::Images,
            ["events"] => Route::Events,
            ["logs"] => Route::Logs,
            ["power"] => Route::Power,
            _ => return None,
        };
        Some(route)
    }

    /// The request path, names percent-encoded.
    pub fn path(&self) -> String {
        match self {
            Route::Guest(n) => format!("/v1/guests/{}", encode(n, false)),
            Route::GuestAction(n, a) => format!("/v1/guests/{}/{a}", encode(n, false)),
            Route::GuestConsole(n) => format!("/v1/guests/{}/console", encode(n, false)),
            Route::GuestConsoleAttach(n) => {
                format!("/v1/guests/{}/console/attach", encode(n, false))
            }
            Route::GuestStats(n) => format!("/v1/guests/{}/stats", encode(n, false)),
            Route::GuestMigration(n) => format!("/v1/guests/{}/migration", encode(n, false)),
            Route::MigrationStream(n) => format!("/v1/migrations/{}/stream", encode(n, false)),
            Route::GuestSnapshots(n) => format!("/v1/guests/{}/snapshots", encode(n, false)),
            Route::GuestSnapshot(n, s) => format!(
                "/v1/guests/{}/snapshots/{}",
                encode(n, false),
                encode(s, false)
            ),
            Route::GuestSnapshotRestore(n, s) => format!(
                "/v1/guests/{}/snapshots/{}/restore",
                encode(n, false),
                encode(s, false)
            ),
            Route::Image(p) => format!("/v1/images/{}", encode(p, true)),
            fixed => fixed.template().to_owned(),
        }
    }

    /// The path with a query (`key=value` pairs, values percent-encoded).
    pub fn with_query(&self, query: &[(&str, &str)]) -> String {
        let mut p = self.path();
        for (i, (k, v)) in query.iter().enumerate() {
            p.push(if i == 0 { '?' } else { '&' });
            p.push_str(k);
            p.push('=');
            p.push_str(&encode(v, false));
        }
        p
    }

    /// The route as `docs/api.md` and the OpenAPI document write it (`/v1/guests/{name}`).
    pub fn template(&self) -> &'static str {
        match self {
            Route::Health => "/v1/health",
            Route::Registration => "/v1/registration",
            Route::PairingCode => "/v1/registration/pairing-code",
            Route::RegistrationManager => "/v1/registration/manager",
            Route::RegistrationManagerAccept => "/v1/registration/manager/accept",
            Route::RegistrationManagerReject => "/v1/registration/manager/reject",
            Route::Node => "/v1/node",
            Route::NodeHostname => "/v1/node/hostname",
            Route::NodeDisks => "/v1/node/disks",
            Route::NodeInstall => "/v1/node/install",
            Route::Stats => "/v1/stats",
            Route::Network => "/v1/network",
            Route::NetworkConfirm => "/v1/network/confirm",
            Route::NetworkRollback => "/v1/network/rollback",
            Route::Storage => "/v1/storage",
            Route::StorageInit => "/v1/storage/init",
            Route::Guests => "/v1/guests",
            Route::Guest(_) => "/v1/guests/{name}",
            Route::GuestAction(_, a) => match a {
                GuestAction::Start => "/v1/guests/{name}/start",
                GuestAction::Stop => "/v1/guests/{name}/stop",
                GuestAction::Shutdown => "/v1/guests/{name}/shutdown",
                GuestAction::Pause => "/v1/guests/{name}/pause",
                GuestAction::Resume => "/v1/guests/{name}/resume",
                GuestAction::Reboot => "/v1/guests/{name}/reboot",
            },
            Route::GuestConsole(_) => "/v1/guests/{name}/console",
            Route::GuestConsoleAttach(_) => "/v1/guests/{name}/console/attach",
            Route::GuestStats(_) => "/v1/guests/{name}/stats",
            Route::GuestSnapshots(_) => "/v1/guests/{name}/snapshots",
            Route::GuestSnapshot(..) => "/v1/guests/{name}/snapshots/{snapshot}",
            Route::GuestSnapshotRestore(..) => "/v1/guests/{name}/snapshots/{snapshot}/restore",
            Route::Images => "/v1/images",
            Route::Image(_) => "/v1/images/{path}",
            Route::Events => "/v1/events",
            Route::Logs => "/v1/logs",
            Route::Power => "/v1/power",
            Route::Metrics => "/metrics",
            Route::NodeCertificate => "/v1/node/certificate",
            Route::NodeUpdate => "/v1/node/update",
            Route::NodeRollback => "/v1/node/rollback",
            Route::Cluster => "/v1/cluster",
            Route::ClusterPeer => "/v1/cluster/peer",
            Route::ClusterMaintenance => "/v1/cluster/maintenance",
            Route::GuestMigration(_) => "/v1/guests/{name}/migration",
            Route::Migrations => "/v1/migrations",
            Route::MigrationStream(_) => "/v1/migrations/{name}/stream",
        }
    }

    /// The methods the route serves (for `405` and its `Allow` header).
    pub fn methods(&self) -> &'static [&'static str] {
        use method::*;
        match self {
            Route::Registration => &[GET, POST, DELETE],
            Route::Cluster => &[GET, PUT, DELETE],
            Route::NodeHostname | Route::ClusterMaintenance => &[PUT],
            Route::Network | Route::NodeCertificate | Route::NodeUpdate => &[GET, PUT],
            Route::GuestMigration(_) => &[GET, POST, DELETE],
            Route::Guests | Route::GuestSnapshots(_) | Route::NodeInstall => &[GET, POST],
            Route::GuestSnapshot(..) => &[GET, DELETE],
            Route::Guest(_) => &[GET, PUT, DELETE],
            Route::Image(_) => &[PUT, DELETE],
            Route::PairingCode
            | Route::RegistrationManager
            | Route::RegistrationManagerAccept
            | Route::RegistrationManagerReject
            | Route::NetworkConfirm
            | Route::NetworkRollback
            | Route::StorageInit
            | Route::GuestAction(..)
            | Route::GuestSnapshotRestore(..)
            | Route::Migrations
            | Route::NodeRollback
            | Route::Power => &[POST],
            Route::Health
            | Route::Node
            | Route::NodeDisks
            | Route::Stats
            | Route::Storage
            | Route::GuestConsole(_)
            | Route::GuestConsoleAttach(_)
            | Route::GuestStats(_)
            | Route::Images
            | Route::Events
            | Route::Logs
            | Route::MigrationStream(_)
            | Route::ClusterPeer
            | Route::Metrics => &[GET],
        }
    }

    /// Served only on the local socket (the console's routes); TCP answers them `not_found`.
    pub fn local_only(&self) -> bool {
        matches!(
            self,
            Route::Health
                | Route::PairingCode
                | Route::RegistrationManager
                | Route::RegistrationManagerAccept
                | Route::RegistrationManagerReject
        )
    }

    /// Served to other nodes of the same manager (a client certificate the manager signed for a
    /// node), and only these: the two halves of an incoming migration, and the fencing peer
    /// check. Everything else refuses a node's certificate.
    pub fn node_to_node(&self) -> bool {
        matches!(
            self,
            Route::Migrations | Route::MigrationStream(_) | Route::ClusterPeer
        )
    }

    /// One example of every route, for tests that walk the whole API.
    pub fn examples() -> Vec<Route> {
        let g = || "web".to_owned();
        let mut all = vec![
            Route::Health,
            Route::Registration,
            Route::PairingCode,
            Route::RegistrationManager,
            Route::RegistrationManagerAccept,
            Route::RegistrationManagerReject,
            Route::Node,
            Route::NodeHostname,
            Route::NodeDisks,
            Route::NodeInstall,
            Route::Stats,
            Route::Network,
            Route::NetworkConfirm,
            Route::NetworkRollback,
            Route::Storage,
            Route::StorageInit,
            Route::Guests,
            Route::Guest(g()),
            Route::GuestConsole(g()),
            Route::GuestConsoleAttach(g()),
            Route::GuestStats(g()),
            Route::GuestSnapshots(g()),
            Route::GuestSnapshot(g(), "before-upgrade".to_owned()),
            Route::GuestSnapshotRestore(g(), "before-upgrade".to_owned()),
            Route::Images,
            Route::Image("disks/web.raw".to_owned()),
            Route::Events,
            Route::Logs,
            Route::Power,
            Route::Metrics,
            Route::NodeCertificate,
            Route::NodeUpdate,
            Route::NodeRollback,
            Route::Cluster,
            Route::ClusterPeer,
            Route::ClusterMaintenance,
            Route::GuestMigration(g()),
            Route::Migrations,
            Route::MigrationStream(g()),
        ];
        all.extend(GuestAction::ALL.map(|a| Route::GuestAction(g(), a)));
        all
    }
}

/// One route of the manager side (`hvnodectl serve`), for node-initiated registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerRoute {
    /// `/v1/manager`: the manager's name and CA.
    Hello,
    /// `/v1/nodes`: join requests.
    Nodes,
    /// `/v1/nodes/{fingerprint}`: one join request's status (the fingerprint as sent, decoded).
    Node(String),
}

impl ManagerRoute {
    /// Parses a request path.
    pub fn parse(path: &str) -> Option<ManagerRoute> {
        match path {
            "/v1/manager" => Some(ManagerRoute::Hello),
            "/v1/nodes" => Some(ManagerRoute::Nodes),
            _ => {
                let fp = path.strip_prefix("/v1/nodes/")?;
                (!fp.contains('/')).then_some(())?;
                Some(ManagerRoute::Node(decode(fp)?))
            }
        }
    }

    /// The request path.
    pub fn path(&self) -> String {
        match self {
            ManagerRoute::Hello => "/v1/manager".to_owned(),
            ManagerRoute::Nodes => "/v1/nodes".to_owned(),
            ManagerRoute::Node(fp) => format!("/v1/nodes/{}", encode(fp, false)),
        }
    }
}

/// A decoded, non-empty single path segment.
fn segment(s: &str) -> Option<String> {
    decode(s).filter(|d| !d.is_empty() && !d.contains('/'))
}

/// Percent-encodes everything but unreserved characters (and `/` where `keep_slash`).
pub fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
pub fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The value of `key` in a query string (`a=1&b=2`), decoded.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| decode(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_parses_back_from_its_path() {
        for r in Route::examples() {
            assert_eq!(Route::parse(&r.path()), Some(r.clone()), "{}", r.path());
            assert!(!r.methods().is_empty());
        }
    }

    #[test]
    fn names_and_image_paths_are_encoded_and_decoded() {
        let r = Route::Image("disks/web 1.raw".to_owned());
        assert_eq!(r.path(), "/v1/images/disks/web%201.raw");
        assert_eq!(Route::parse(&r.path()), Some(r));
        let g = Route::GuestAction("a b".to_owned(), GuestAction::Stop);
        assert_eq!(g.path(), "/v1/guests/a%20b/stop");
        assert_eq!(Route::parse(&g.path()), Some(g));
        // A name is one segment even encoded: `a%2Fb` is no guest name.
        assert_eq!(Route::parse("/v1/guests/a%2Fb/stop"), None);
        assert_eq!(
            Route::Logs.with_query(&[("lines", "5"), ("x", "a b")]),
            "/v1/logs?lines=5&x=a%20b"
        );
    }

    #[test]
    fn refuses_unknown_paths_and_bad_escapes() {
        for p in [
            "/",
            "/v1",
            "/v1/",
            "/v2/health",
            "/v1/healthz",
            "/v1/guests/",
            "/v1/guests//start",
            "/v1/guests/web/explode",
            "/v1/guests/web/console/detach",
            "/v1/guests/%zz",
            "/v1/guests/%ff",
            "/v1/images/%",
        ] {
            assert_eq!(Route::parse(p), None, "{p}");
        }
    }

    #[test]
    fn manager_routes_round_trip() {
        let fp = "AB:CD".to_owned();
        let r = ManagerRoute::Node(fp.clone());
        assert_eq!(r.path(), "/v1/nodes/AB%3ACD");
        assert_eq!(ManagerRoute::parse(&r.path()), Some(r));
        assert_eq!(
            ManagerRoute::parse("/v1/nodes/AB:CD"),
            Some(ManagerRoute::Node(fp))
        );
        assert_eq!(ManagerRoute::parse("/v1/nodes/a/b"), None);
        assert_eq!(query_param("since=4&x=y%20z", "x").as_deref(), Some("y z"));
    }
}
