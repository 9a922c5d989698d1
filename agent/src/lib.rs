//! The hvnode node agent: the API a central manager drives the node with (HTTPS with mutual TLS
//! on TCP) and local clients use (plain HTTP on a root-only unix socket).
//!
//! [`Agent::handle`] is the whole router: one function from a request and where it came from to
//! a response, so that tests drive it without sockets.
#![forbid(unsafe_code)]

pub mod events;
pub mod guests;
pub mod manager;
pub mod node;
pub mod store;
pub mod tls;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use hvnode_api::config::NodeConfig;
use hvnode_api::error::ApiError;
use hvnode_api::guest::GuestSpec;
use hvnode_api::init::{InitRequest, InitResponse};
use hvnode_api::node::{Hostname, NetworkView, NodeStats, PowerAction, StorageInit, StorageView};
use hvnode_api::registration::{
    AcceptManager, JoinState, ManagerCandidate, ManagerUrl, NodeJoinRequest, NodeJoinStatus,
    PairRequest, RegistrationState, RegistrationStatus,
};

/// Largest JSON body accepted.
pub const BODY_LIMIT: usize = 1 << 20;
/// Wrong pairing codes tolerated before the code is replaced.
pub const PAIRING_ATTEMPTS: u32 = 5;
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";

/// Where the agent keeps and finds things; every path derives from these.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The data partition (`/var/lib/hvnode`).
    pub data: PathBuf,
    /// The runtime directory (`/run/hvnode`).
    pub run: PathBuf,
    /// The guest image directory.
    pub images: PathBuf,
    /// Init's control socket.
    pub init_socket: PathBuf,
    /// The node log.
    pub node_log: PathBuf,
    /// The VMM binary started for each guest.
    pub vmm: PathBuf,
}

impl Paths {
    fn registration(&self) -> PathBuf {
        self.data.join("registration.toml")
    }
    /// The unconfirmed network change, on tmpfs: a reboot forgets it together with the change
    /// itself (init applies node.toml at boot), an agent restart does not.
    fn pending_network(&self) -> PathBuf {
        self.run.join("network-pending.json")
    }
    fn node_config(&self) -> PathBuf {
        self.data.join("node.toml")
    }
    fn guests(&self) -> PathBuf {
        self.data.join("guests")
    }
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The local unix socket: root on the node, trusted.
    Local,
    /// TCP. `client_generation` is the registration generation under which the connection's
    /// client certificate was verified against the manager CA, if it presented one.
    Tcp {
        /// See above.
        client_generation: Option<u64>,
    },
}

/// The persisted registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Registration {
    state: RegistrationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manager_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manager_url: Option<String>,
    #[serde(default)]
    registered_at: u64,
}

impl Default for Registration {
    fn default() -> Self {
        Registration {
            state: RegistrationState::Unregistered,
            manager_name: None,
            ca_pem: None,
            manager_url: None,
            registered_at: 0,
        }
    }
}

struct Pairing {
    code: String,
    failures: u32,
}

/// An API error: status, stable code, message.
#[derive(Debug)]
pub struct Error(StatusCode, &'static str, String);

impl Error {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Error(status, code, message.into())
    }
    fn not_found() -> Self {
        Error::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "No such route: see docs/api.md for the routes the agent serves",
        )
    }
    fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        Error::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what}: {e}"),
        )
    }
}

/// Every response body: whole (JSON, text) or streamed (events).
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
type Resp = Response<Body>;

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text_response(status: StatusCode, text: String, content_type: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(text)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// The one place errors become responses.
pub fn error_response(e: Error) -> Resp {
    json_response(
        e.0,
        &ApiError {
            code: hvnode_api::error::ErrorCode::from_wire(e.1),
            message: e.2,
        },
    )
}

fn random_code() -> String {
    let mut bytes = [0u8; 8];
    // /dev/urandom never blocks and is always there on Linux; the fallback mixes the clock in
    // only so that a failure here cannot leave a constant code.
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (t as u64).to_le_bytes();
    }
    bytes
        .iter()
        .map(|b| CODE_ALPHABET[(*b as usize) % CODE_ALPHABET.len()] as char)
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The agent's state.
pub struct Agent {
    paths: Paths,
    identity: tls::Identity,
    fingerprint: String,
    registration: Mutex<Registration>,
    /// Bumped whenever the trusted manager CA changes; connections verified under an older
    /// generation no longer count as authenticated.
    generation: Mutex<u64>,
    pairing: Mutex<Pairing>,
    tls: RwLock<Arc<rustls::ServerConfig>>,
    cpu: Mutex<(u64, u64)>,
    /// Node-initiated registration: the manager fetched for the admin to accept, with its CA.
    candidate: Mutex<Option<(ManagerCandidate, String)>>,
    /// Guest VMM processes.
    running: Arc<guests::Guests>,
    /// An applied network change waiting for confirmation.
    pending_network: Mutex<Option<PendingNetwork>>,
    /// The last network change token handed out (see `next_network_token`).
    network_token: AtomicU64,
    /// Events for `GET /v1/events`.
    events: Arc<events::EventLog>,
    /// `GET /v1/node`.
    info: node::InfoCache,
}

/// How long an applied network change waits for confirmation before it rolls back.
pub const NETWORK_ROLLBACK: Duration = Duration::from_secs(60);

/// An applied, unconfirmed network change. It is kept in [`Paths::pending_network`] too, so that
/// an agent that crashes or restarts before the deadline still rolls it back: the point of the
/// rollback is a change that cut the node off, and a lost timer would make it permanent.
#[derive(Debug, Serialize, Deserialize)]
struct PendingNetwork {
    token: u64,
    new: hvnode_api::config::NetworkConfig,
    previous: hvnode_api::config::NetworkConfig,
    /// CLOCK_BOOTTIME in milliseconds: it survives agent restarts and ignores clock changes.
    deadline_ms: u64,
}

/// CLOCK_BOOTTIME in milliseconds.
fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1000
                + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000
        })
        .unwrap_or(0)
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("paths", &self.paths)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Agent {
    /// Loads (or creates) the node identity and registration under `paths`.
    pub fn new(paths: Paths) -> Result<Agent, tls::TlsError> {
        let identity = tls::load_or_create(&paths.data.join("tls"), &node::hostname())?;
        let registration: Registration = std::fs::read_to_string(paths.registration())
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default();
        let config = tls::server_config(&identity, registration.ca_pem.as_deref())?;
        let events = Arc::new(events::EventLog::default());
        Ok(Agent {
            fingerprint: tls::fingerprint(&identity.cert_der),
            identity,
            registration: Mutex::new(registration),
            generation: Mutex::new(1),
            pairing: Mutex::new(Pairing {
                code: random_code(),
                failures: 0,
            }),
            tls: RwLock::new(Arc::new(config)),
            cpu: Mutex::new(node::cpu_times()),
            candidate: Mutex::new(None),
            running: Arc::new(guests::Guests::new(Arc::clone(&events), paths.clone())),
            events,
            pending_network: Mutex::new(None),
            network_token: AtomicU64::new(0),
            info: node::InfoCache::new(&paths.run),
            paths,
        })
    }

    /// The TLS configuration new connections use, with the registration generation it reflects.
    pub fn tls_config(&self) -> (Arc<rustls::ServerConfig>, u64) {
        let gen = *self.generation.lock().unwrap_or_else(|e| e.into_inner());
        let cfg = self.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        (cfg, gen)
    }

    /// SHA-256 fingerprint of the node certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn registration_status(&self, origin: Origin) -> RegistrationStatus {
        let reg = self.registration.lock().unwrap_or_else(|e| e.into_inner());
        RegistrationStatus {
            state: reg.state,
            manager_name: reg.manager_name.clone(),
            node_fingerprint: self.fingerprint.clone(),
            pairing_code: (origin == Origin::Local).then(|| {
                self.pairing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .code
                    .clone()
            }),
        }
    }

    fn set_registration(&self, reg: Registration) -> Result<(), Error> {
        let text = toml::to_string(&reg).map_err(|e| Error::internal("Registration", e))?;
        store::write_atomic(&self.paths.registration(), text.as_bytes(), 0o600)
            .map_err(|e| Error::internal("Saving the registration", e))?;
        let config = tls::server_config(&self.identity, reg.ca_pem.as_deref())
            .map_err(|e| Error::internal("TLS configuration", e))?;
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.generation.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        *self.registration.lock().unwrap_or_else(|e| e.into_inner()) = reg;
        self.new_pairing_code();
        Ok(())
    }

    fn new_pairing_code(&self) {
        let mut p = self.pairing.lock().unwrap_or_else(|e| e.into_inner());
        p.code = random_code();
        p.failures = 0;
    }

    /// Access rules of the TCP API; the local socket may do everything.
    fn authorize(&self, origin: Origin, method: &Method, path: &str) -> Result<(), Error> {
        let Origin::Tcp { client_generation } = origin else {
            return Ok(());
        };
        if path == "/v1/registration" && (method == Method::GET || method == Method::POST) {
            return Ok(());
        }
        if path == "/v1/health" || path.starts_with("/v1/registration/") {
            return Err(Error::not_found());
        }
        let registered = self
            .registration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
            == RegistrationState::Registered;
        let current = *self.generation.lock().unwrap_or_else(|e| e.into_inner());
        match client_generation {
            _ if !registered => Err(Error::new(
                StatusCode::FORBIDDEN,
                "not_registered",
                "The node is not registered with a manager: register it first (POST /v1/registration with the pairing code shown on its console)",
            )),
            None => Err(Error::new(
                StatusCode::UNAUTHORIZED,
                "client_certificate_required",
                "Present a client certificate signed by the registered manager's CA",
            )),
            Some(g) if g != current => Err(Error::new(
                StatusCode::FORBIDDEN,
                "untrusted_client_certificate",
                "The client certificate is not signed by the manager this node trusts now: reconnect, or re-register",
            )),
            Some(_) => Ok(()),
        }
    }

    /// Serves one HTTP/1.1 connection (TLS or the local socket) with the router, upgrades
    /// included: the console attach outlives its request on the same connection.
    pub async fn serve_connection<I>(self: Arc<Self>, io: I, origin: Origin)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |req| {
            let agent = Arc::clone(&self);
            async move { Ok::<_, std::convert::Infallible>(agent.handle(req, origin).await) }
        });
        // One buffer per response: headers and body go out in one TLS record and one write
        // instead of two.
        let _ = hyper::server::conn::http1::Builder::new()
            .writev(false)
            .serve_connection(hyper_util::rt::TokioIo::new(io), service)
            .with_upgrades()
            .await;
    }

    /// Handles one request.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>, origin: Origin) -> Resp
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self.route(req, origin).await {
            Ok(r) => r,
            Err(e) => error_response(e),
        }
    }

    async fn route<B>(self: &Arc<Self>, req: Request<B>, origin: Origin) -> Result<Resp, Error>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        self.authorize(origin, &method, &path)?;
        if method == Method::GET {
            let attach = path
                .strip_prefix("/v1/guests/")
                .and_then(|p| p.strip_suffix("/console/attach"));
            if let Some(name) = attach {
                return self.attach_console(name, req).await;
            }
        }
        if method == Method::PUT {
            if let Some(rel) = path.strip_prefix("/v1/images/") {
                return self.upload_image(rel, req.into_body()).await;
            }
        }
        let is_json = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.starts_with("application/json"))
            .unwrap_or(false);
        let body = Limited::new(req.into_body(), BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    Error::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("The body exceeds {BODY_LIMIT} bytes"),
                    )
                } else {
                    Error::new(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        format!("Reading the body: {e}"),
                    )
                }
            })?
            .to_bytes();
        let parse = |_: ()| -> Result<(), Error> {
            if !is_json {
                return Err(Error::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "Send the body as JSON with Content-Type: application/json",
                ));
            }
            Ok(())
        };
        macro_rules! json {
            ($t:ty) => {{
                parse(())?;
                serde_json::from_slice::<$t>(&body).map_err(|e| {
                    Error::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_json",
                        format!("Invalid request body: {e}"),
                    )
                })?
            }};
        }
        let me = Arc::clone(self);
        match (&method, path.as_str()) {
            (&Method::GET, "/v1/events") => {
                let since = query_param(&query, "since")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (backlog, mut live) = self.events.subscribe(since);
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                tokio::spawn(async move {
                    for ev in &backlog {
                        if tx.send(events::sse_frame(ev)).await.is_err() {
                            return;
                        }
                    }
                    loop {
                        match live.recv().await {
                            Ok(ev) => {
                                if tx.send(events::sse_frame(&ev)).await.is_err() {
                                    return;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        }
                    }
                });
                let mut r = Response::new(events::ChannelBody(rx).boxed());
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/event-stream"),
                );
                Ok(r)
            }
            (&Method::GET, "/v1/health") => Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"status": "ok", "version": hvnode_api::VERSION}),
            )),
            (&Method::GET, "/v1/registration") => Ok(json_response(
                StatusCode::OK,
                &self.registration_status(origin),
            )),
            (&Method::POST, "/v1/registration") => {
                let req = json!(PairRequest);
                self.pair(req, origin)
            }
            (&Method::DELETE, "/v1/registration") => {
                self.set_registration(Registration::default())?;
                eprintln!("agent: unregistered");
                self.events.emit("registration", None, "unregistered");
                Ok(json_response(
                    StatusCode::OK,
                    &self.registration_status(origin),
                ))
            }
            (&Method::POST, "/v1/registration/manager") => {
                let m = json!(ManagerUrl);
                let c = self.fetch_candidate(&m.url).await?;
                Ok(json_response(StatusCode::OK, &c))
            }
            (&Method::POST, "/v1/registration/manager/accept") => {
                let a = json!(AcceptManager);
                self.accept_candidate(&a.ca_fingerprint).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &self.registration_status(origin),
                ))
            }
            (&Method::POST, "/v1/registration/manager/reject") => {
                *self.candidate.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(text_response(
                    StatusCode::NO_CONTENT,
                    String::new(),
                    "text/plain",
                ))
            }
            (&Method::POST, "/v1/registration/pairing-code") => {
                self.new_pairing_code();
                Ok(json_response(
                    StatusCode::OK,
                    &self.registration_status(origin),
                ))
            }
            (&Method::GET, "/v1/node") => {
                let mut r = Response::new(Full::new(self.info.json()).boxed());
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                Ok(r)
            }
            (&Method::GET, "/v1/stats") => Ok(json_response(StatusCode::OK, &self.stats())),
            (&Method::PUT, "/v1/node/hostname") => {
                let h = json!(Hostname);
                let info = tokio::task::spawn_blocking(move || me.set_hostname(&h.hostname))
                    .await
                    .map_err(|e| Error::internal("Host name", e))??;
                Ok(json_response(StatusCode::OK, &info))
            }
            (&Method::GET, "/v1/network") => {
                Ok(json_response(StatusCode::OK, &self.network_view()?))
            }
            (&Method::PUT, "/v1/network") => {
                let network = json!(hvnode_api::config::NetworkConfig);
                network.validate().map_err(|e| {
                    Error::new(StatusCode::BAD_REQUEST, "invalid_network", e.to_string())
                })?;
                let saved = self.node_config()?.network;
                tokio::task::spawn_blocking({
                    let me = Arc::clone(self);
                    let network = network.clone();
                    move || me.init_request(&InitRequest::ApplyNetwork { network })
                })
                .await
                .map_err(|e| Error::internal("Network", e))??;
                let token = {
                    let mut p = self
                        .pending_network
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let token = self.next_network_token();
                    let pending = PendingNetwork {
                        token,
                        new: network,
                        previous: saved,
                        deadline_ms: boottime_ms() + NETWORK_ROLLBACK.as_millis() as u64,
                    };
                    self.save_pending_network(Some(&pending));
                    *p = Some(pending);
                    token
                };
                eprintln!(
                    "agent: network change applied; rolls back in {} s unless confirmed",
                    NETWORK_ROLLBACK.as_secs()
                );
                self.arm_network_rollback(token, NETWORK_ROLLBACK);
                Ok(json_response(StatusCode::OK, &self.network_view()?))
            }
            (&Method::POST, "/v1/network/confirm") => {
                let pending = self
                    .pending_network
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or_else(|| {
                        Error::new(
                            StatusCode::CONFLICT,
                            "no_pending_change",
                            "There is no network change to confirm",
                        )
                    })?;
                let mut config = self.node_config()?;
                config.network = pending.new;
                store::write_atomic(
                    &self.paths.node_config(),
                    config.to_toml().as_bytes(),
                    0o644,
                )
                .map_err(|e| Error::internal("Saving node.toml", e))?;
                self.save_pending_network(None);
                eprintln!("agent: network change confirmed and saved");
                self.events
                    .emit("network", None, "network change confirmed and saved");
                Ok(json_response(StatusCode::OK, &self.network_view()?))
            }
            (&Method::POST, "/v1/network/rollback") => {
                let me = Arc::clone(self);
                let rolled = tokio::task::spawn_blocking(move || me.rollback_network(None))
                    .await
                    .map_err(|e| Error::internal("Network", e))??;
                if !rolled {
                    return Err(Error::new(
                        StatusCode::CONFLICT,
                        "no_pending_change",
                        "There is no network change to roll back",
                    ));
                }
                Ok(json_response(StatusCode::OK, &self.network_view()?))
            }
            (&Method::POST, "/v1/storage/init") => {
                let req = json!(StorageInit);
                if req.device != req.confirm {
                    return Err(Error::new(
                        StatusCode::BAD_REQUEST,
                        "confirmation_mismatch",
                        "Type the device name again in `confirm` exactly as in `device`",
                    ));
                }
                let me = Arc::clone(self);
                tokio::task::spawn_blocking(move || {
                    me.init_request(&InitRequest::InitStorage { device: req.device })
                })
                .await
                .map_err(|e| Error::internal("Storage", e))??;
                let run = self.paths.run.clone();
                Ok(json_response(
                    StatusCode::OK,
                    &StorageView {
                        status: node::storage_status(&run),
                        blank_disks: Vec::new(),
                    },
                ))
            }
            (&Method::GET, "/v1/storage") => {
                let run = self.paths.run.clone();
                let view = tokio::task::spawn_blocking(move || StorageView {
                    status: node::storage_status(&run),
                    blank_disks: node::disks(true).into_iter().filter(|d| d.blank).collect(),
                })
                .await
                .map_err(|e| Error::internal("Storage", e))?;
                Ok(json_response(StatusCode::OK, &view))
            }
            (&Method::GET, "/v1/logs") => {
                let lines = query_param(&query, "lines")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(200)
                    .min(10_000);
                let text = std::fs::read_to_string(&self.paths.node_log).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n");
                Ok(text_response(
                    StatusCode::OK,
                    tail + "\n",
                    "text/plain; charset=utf-8",
                ))
            }
            (&Method::POST, "/v1/power") => {
                let action = json!(PowerAction);
                let request = match action {
                    PowerAction::Reboot => InitRequest::Reboot,
                    PowerAction::Poweroff => InitRequest::PowerOff,
                };
                eprintln!("agent: power request {action:?}");
                self.events
                    .emit("power", None, format!("{action:?}").to_lowercase());
                tokio::task::spawn_blocking(move || me.init_request(&request))
                    .await
                    .map_err(|e| Error::internal("Power", e))??;
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({"accepted": true}),
                ))
            }
            (&Method::GET, "/v1/guests") => Ok(json_response(StatusCode::OK, &self.guests()?)),
            (&Method::POST, "/v1/guests") => {
                let spec = json!(GuestSpec);
                self.define_guest(spec, false)
            }
            (&Method::GET, "/metrics") => Ok(text_response(
                StatusCode::OK,
                self.metrics(),
                "text/plain; version=0.0.4",
            )),
            (&Method::GET, "/v1/images") => Ok(json_response(StatusCode::OK, &self.images())),
            (&Method::DELETE, p) if p.starts_with("/v1/images/") => {
                let rel = &p["/v1/images/".len()..];
                hvnode_api::guest::validate_image_path(rel).map_err(|e| {
                    Error::new(StatusCode::BAD_REQUEST, "invalid_path", e.to_string())
                })?;
                std::fs::remove_file(self.paths.images.join(rel)).map_err(|_| {
                    Error::new(
                        StatusCode::NOT_FOUND,
                        "image_not_found",
                        format!("No image {rel:?}"),
                    )
                })?;
                Ok(text_response(
                    StatusCode::NO_CONTENT,
                    String::new(),
                    "text/plain",
                ))
            }
            (m, p) if p.starts_with("/v1/guests/") && p["/v1/guests/".len()..].contains('/') => {
                let (name, action) = p["/v1/guests/".len()..].split_once('/').unwrap_or_default();
                let (m, name, action) = (m.clone(), name.to_owned(), action.to_owned());
                tokio::task::spawn_blocking(move || me.guest_action(&m, &name, &action, &query))
                    .await
                    .map_err(|e| Error::internal("Guest operation", e))?
            }
            (m, p) if p.starts_with("/v1/guests/") => {
                let name = &p["/v1/guests/".len()..];
                match *m {
                    Method::GET => self.guest(name).map(|g| json_response(StatusCode::OK, &g)),
                    Method::PUT => {
                        let spec = json!(GuestSpec);
                        if spec.name != name {
                            return Err(Error::new(
                                StatusCode::BAD_REQUEST,
                                "name_mismatch",
                                "The name in the body must match the name in the path",
                            ));
                        }
                        self.define_guest(spec, true)
                    }
                    Method::DELETE => self.delete_guest(name),
                    _ => Err(Error::not_found()),
                }
            }
            _ => Err(Error::not_found()),
        }
    }

    fn pair(&self, req: PairRequest, origin: Origin) -> Result<Resp, Error> {
        {
            let reg = self.registration.lock().unwrap_or_else(|e| e.into_inner());
            if reg.state == RegistrationState::Registered && origin != Origin::Local {
                return Err(Error::new(
                    StatusCode::CONFLICT,
                    "already_registered",
                    "The node is registered with another manager: unregister it at its console first",
                ));
            }
        }
        {
            let mut p = self.pairing.lock().unwrap_or_else(|e| e.into_inner());
            if !constant_time_eq(req.code.trim().as_bytes(), p.code.as_bytes()) {
                p.failures += 1;
                if p.failures >= PAIRING_ATTEMPTS {
                    p.code = random_code();
                    p.failures = 0;
                    eprintln!("agent: {PAIRING_ATTEMPTS} wrong pairing codes; made a new one");
                    return Err(Error::new(
                        StatusCode::FORBIDDEN,
                        "pairing_locked",
                        "Too many wrong pairing codes: read the new code on the node's console",
                    ));
                }
                return Err(Error::new(
                    StatusCode::FORBIDDEN,
                    "wrong_pairing_code",
                    "Wrong pairing code: read the code on the node's console (Manager screen)",
                ));
            }
        }
        if req.manager_name.trim().is_empty() || req.manager_name.len() > 255 {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                "invalid_manager_name",
                "manager_name must be 1-255 characters",
            ));
        }
        tls::validate_ca(&req.ca_pem).map_err(|e| {
            Error::new(
                StatusCode::BAD_REQUEST,
                "invalid_ca",
                format!("ca_pem is not a usable CA certificate: {e}"),
            )
        })?;
        self.set_registration(Registration {
            state: RegistrationState::Registered,
            manager_name: Some(req.manager_name.clone()),
            ca_pem: Some(req.ca_pem),
            manager_url: None,
            registered_at: now_secs(),
        })?;
        eprintln!("agent: registered with manager {}", req.manager_name);
        self.events.emit(
            "registration",
            None,
            format!("registered with manager {}", req.manager_name),
        );
        Ok(json_response(
            StatusCode::OK,
            &self.registration_status(origin),
        ))
    }

    async fn fetch_candidate(&self, url: &str) -> Result<ManagerCandidate, Error> {
        let bad = |e: manager::ManagerError| match e {
            manager::ManagerError::Url(_) => Error::new(
                StatusCode::BAD_REQUEST,
                "invalid_manager_url",
                e.to_string(),
            ),
            e => Error::new(
                StatusCode::BAD_GATEWAY,
                "manager_unreachable",
                e.to_string(),
            ),
        };
        let base = manager::BaseUrl::parse(url).map_err(bad)?;
        let hello = manager::fetch_hello(&base).await.map_err(bad)?;
        let ca_fingerprint = tls::validate_ca(&hello.ca_pem).map_err(|e| {
            Error::new(
                StatusCode::BAD_GATEWAY,
                "invalid_manager_ca",
                format!("The manager's CA is unusable: {e}"),
            )
        })?;
        let candidate = ManagerCandidate {
            url: url.trim_end_matches('/').to_owned(),
            manager_name: hello.name,
            ca_fingerprint,
        };
        *self.candidate.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((candidate.clone(), hello.ca_pem));
        Ok(candidate)
    }

    async fn accept_candidate(self: &Arc<Self>, fingerprint: &str) -> Result<(), Error> {
        let (candidate, ca_pem) = self
            .candidate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::new(
                    StatusCode::CONFLICT,
                    "no_candidate",
                    "Fetch the manager first (POST /v1/registration/manager)",
                )
            })?;
        if !fingerprint.eq_ignore_ascii_case(&candidate.ca_fingerprint) {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                "fingerprint_mismatch",
                format!(
                    "The manager's CA fingerprint is {}, not {fingerprint}",
                    candidate.ca_fingerprint
                ),
            ));
        }
        let base = manager::BaseUrl::parse(&candidate.url).map_err(|e| {
            Error::new(
                StatusCode::BAD_REQUEST,
                "invalid_manager_url",
                e.to_string(),
            )
        })?;
        let config = manager::trusted_config(&ca_pem, &self.identity)
            .map_err(|e| Error::internal("Manager TLS", e))?;
        let join = NodeJoinRequest {
            hostname: node::hostname(),
            node_cert_pem: self.identity.cert_pem.clone(),
            api_port: 8443,
        };
        let body = serde_json::to_vec(&join).map_err(|e| Error::internal("Join request", e))?;
        let (status, answer) =
            manager::request(&base, config, Method::POST, "/v1/nodes", Some(body))
                .await
                .map_err(|e| {
                    Error::new(
                        StatusCode::BAD_GATEWAY,
                        "manager_unreachable",
                        e.to_string(),
                    )
                })?;
        if !(200..300).contains(&status) {
            return Err(Error::new(
                StatusCode::BAD_GATEWAY,
                "manager_refused",
                format!(
                    "The manager refused the join request ({status}): {}",
                    String::from_utf8_lossy(&answer)
                ),
            ));
        }
        {
            let mut reg = self.registration.lock().unwrap_or_else(|e| e.into_inner());
            reg.state = RegistrationState::Pending;
            reg.manager_name = Some(candidate.manager_name.clone());
            reg.manager_url = Some(candidate.url.clone());
            reg.ca_pem = Some(ca_pem);
            let text = toml::to_string(&*reg).map_err(|e| Error::internal("Registration", e))?;
            store::write_atomic(&self.paths.registration(), text.as_bytes(), 0o600)
                .map_err(|e| Error::internal("Saving the registration", e))?;
        }
        *self.candidate.lock().unwrap_or_else(|e| e.into_inner()) = None;
        eprintln!(
            "agent: join request sent to {}; waiting for approval",
            candidate.url
        );
        self.resume_pending();
        Ok(())
    }

    /// While the registration is pending, polls the manager every 2 s for its decision. Called
    /// after a join request and at start-up.
    pub fn resume_pending(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let reg = me
                    .registration
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let (Some(url), Some(ca)) = (reg.manager_url.clone(), reg.ca_pem.clone()) else {
                    return;
                };
                if reg.state != RegistrationState::Pending {
                    return;
                }
                let decision = match (
                    manager::BaseUrl::parse(&url),
                    manager::trusted_config(&ca, &me.identity),
                ) {
                    (Ok(base), Ok(cfg)) => {
                        let path = format!("/v1/nodes/{}", me.fingerprint.replace(':', "%3A"));
                        manager::request(&base, cfg, Method::GET, &path, None)
                            .await
                            .ok()
                            .filter(|(s, _)| *s == 200)
                            .and_then(|(_, b)| serde_json::from_slice::<NodeJoinStatus>(&b).ok())
                    }
                    _ => return,
                };
                match decision.map(|d| d.state) {
                    Some(JoinState::Approved) => {
                        let mut done = reg;
                        done.state = RegistrationState::Registered;
                        done.registered_at = now_secs();
                        if me.set_registration(done).is_ok() {
                            eprintln!("agent: the manager approved the join request: registered");
                            me.events.emit(
                                "registration",
                                None,
                                "the manager approved the join request",
                            );
                        }
                        return;
                    }
                    Some(JoinState::Rejected) => {
                        let _ = me.set_registration(Registration::default());
                        eprintln!("agent: the manager rejected the join request");
                        me.events.emit(
                            "registration",
                            None,
                            "the manager rejected the join request",
                        );
                        return;
                    }
                    _ => tokio::time::sleep(Duration::from_secs(2)).await,
                }
            }
        });
    }

    fn network_view(&self) -> Result<NetworkView, Error> {
        let (rollback_in_secs, pending) = self
            .pending_network
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|p| {
                let left = p.deadline_ms.saturating_sub(boottime_ms()) / 1000;
                (Some(left), Some(p.new.clone()))
            })
            .unwrap_or_default();
        Ok(NetworkView {
            config: self.node_config()?.network,
            status: node::network_status(&self.paths.run),
            rollback_in_secs,
            pending,
        })
    }

    /// A token no earlier change of this boot used, so that an old timer never rolls back a
    /// newer change (tokens survive agent restarts through the pending file).
    fn next_network_token(&self) -> u64 {
        let now = boottime_ms();
        let last = self.network_token.fetch_max(now, Ordering::SeqCst);
        if last >= now {
            self.network_token.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            now
        }
    }

    /// Writes (or with `None` removes) the pending change's file. A failure is logged: the
    /// in-memory timer still rolls back, only a restart of the agent would lose it.
    fn save_pending_network(&self, pending: Option<&PendingNetwork>) {
        let path = self.paths.pending_network();
        let result = match pending {
            Some(p) => serde_json::to_vec(p)
                .map_err(std::io::Error::other)
                .and_then(|b| store::write_atomic(&path, &b, 0o600)),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = result {
            eprintln!("agent: {}: {e}", path.display());
        }
    }

    fn arm_network_rollback(self: &Arc<Self>, token: u64, after: Duration) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let result =
                tokio::task::spawn_blocking(move || me.rollback_network(Some(token))).await;
            if let Ok(Err(e)) = result {
                eprintln!("agent: network rollback failed: {}", e.2);
            }
        });
    }

    /// Takes over a network change that an earlier agent applied and that is still
    /// unconfirmed: its rollback happens at the original deadline, or at once if that passed.
    pub fn resume_network_rollback(self: &Arc<Self>) {
        let Ok(bytes) = std::fs::read(self.paths.pending_network()) else {
            return;
        };
        let pending = match serde_json::from_slice::<PendingNetwork>(&bytes) {
            Ok(p) => p,
            Err(e) => {
                eprintln!(
                    "agent: {} is unreadable ({e}); the network stays as it is",
                    self.paths.pending_network().display()
                );
                self.save_pending_network(None);
                return;
            }
        };
        let left = Duration::from_millis(pending.deadline_ms.saturating_sub(boottime_ms()));
        eprintln!(
            "agent: an unconfirmed network change is pending; it rolls back in {} s",
            left.as_secs()
        );
        let token = pending.token;
        self.network_token.fetch_max(token, Ordering::SeqCst);
        *self
            .pending_network
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(pending);
        self.arm_network_rollback(token, left);
    }

    /// Re-applies the saved network configuration if a change is pending (and, when `token` is
    /// given, only if it is still that change). Returns whether it rolled back.
    fn rollback_network(&self, token: Option<u64>) -> Result<bool, Error> {
        let pending = {
            let mut p = self
                .pending_network
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match (p.as_ref(), token) {
                (Some(x), Some(t)) if x.token != t => return Ok(false),
                (None, _) => return Ok(false),
                _ => p.take(),
            }
        };
        let Some(pending) = pending else {
            return Ok(false);
        };
        self.save_pending_network(None);
        eprintln!("agent: rolling the network back to the saved configuration");
        self.events
            .emit("network", None, "network change rolled back");
        self.init_request(&InitRequest::ApplyNetwork {
            network: pending.previous,
        })?;
        Ok(true)
    }

    fn node_config(&self) -> Result<NodeConfig, Error> {
        match std::fs::read_to_string(self.paths.node_config()) {
            Ok(text) => {
                NodeConfig::from_toml(&text).map_err(|e| Error::internal("node.toml is invalid", e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeConfig::default()),
            Err(e) => Err(Error::internal("Reading node.toml", e)),
        }
    }

    fn init_request(&self, request: &InitRequest) -> Result<(), Error> {
        let unavailable = |e: std::io::Error| {
            Error::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "init_unavailable",
                format!(
                    "Init's control socket {} does not answer: {e}",
                    self.paths.init_socket.display()
                ),
            )
        };
        let mut s = UnixStream::connect(&self.paths.init_socket).map_err(unavailable)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(unavailable)?;
        let line =
            serde_json::to_string(request).map_err(|e| Error::internal("Init request", e))?;
        writeln!(s, "{line}").map_err(unavailable)?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .map_err(unavailable)?;
        match serde_json::from_str::<InitResponse>(&answer) {
            Ok(InitResponse::Ok) => Ok(()),
            Ok(InitResponse::Error { message }) => {
                Err(Error::new(StatusCode::CONFLICT, "init_refused", message))
            }
            Err(e) => Err(Error::internal("Init's answer", e)),
        }
    }

    fn set_hostname(&self, hostname: &str) -> Result<hvnode_api::node::NodeInfo, Error> {
        hvnode_api::config::validate_hostname(hostname)
            .map_err(|e| Error::new(StatusCode::BAD_REQUEST, "invalid_hostname", e.to_string()))?;
        let mut config = self.node_config()?;
        config.hostname = Some(hostname.to_owned());
        store::write_atomic(
            &self.paths.node_config(),
            config.to_toml().as_bytes(),
            0o644,
        )
        .map_err(|e| Error::internal("Saving node.toml", e))?;
        self.init_request(&InitRequest::SetHostname {
            hostname: hostname.to_owned(),
        })?;
        eprintln!("agent: host name set to {hostname}");
        self.events
            .emit("network", None, format!("host name set to {hostname}"));
        Ok(self.info.refresh())
    }

    fn stats(&self) -> NodeStats {
        let (busy, total) = node::cpu_times();
        let mut last = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let (db, dt) = (busy.saturating_sub(last.0), total.saturating_sub(last.1));
        *last = (busy, total);
        let (mem_total, mem_avail) = node::memory();
        let guests = self.guests().map(|g| g.len() as u32).unwrap_or(0);
        NodeStats {
            cpu_percent: if dt == 0 {
                0.0
            } else {
                db as f64 * 100.0 / dt as f64
            },
            memory_used_bytes: mem_total.saturating_sub(mem_avail),
            memory_total_bytes: mem_total,
            load: node::load(),
            guests_total: guests,
            guests_running: self.running.running_count() as u32,
            uptime_secs: node::uptime_secs(),
        }
    }

    fn metrics(&self) -> String {
        let s = self.stats();
        format!(
            "# TYPE hvnode_build_info gauge\nhvnode_build_info{{version=\"{}\"}} 1\n\
             # TYPE node_cpu_percent gauge\nnode_cpu_percent {}\n\
             # TYPE node_memory_used_bytes gauge\nnode_memory_used_bytes {}\n\
             # TYPE node_memory_total_bytes gauge\nnode_memory_total_bytes {}\n\
             # TYPE hvnode_guests gauge\nhvnode_guests{{state=\"defined\"}} {}\n\
             # TYPE node_uptime_seconds gauge\nnode_uptime_seconds {}\n",
            hvnode_api::VERSION,
            s.cpu_percent,
            s.memory_used_bytes,
            s.memory_total_bytes,
            s.guests_total,
            s.uptime_secs
        )
    }

    fn guests(&self) -> Result<Vec<hvnode_api::guest::GuestStatus>, Error> {
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

    fn guest_path(&self, name: &str) -> Result<PathBuf, Error> {
        hvnode_api::guest::validate_name(name).map_err(|e| {
            Error::new(StatusCode::BAD_REQUEST, "invalid_guest_name", e.to_string())
        })?;
        Ok(self.paths.guests().join(format!("{name}.toml")))
    }

    fn guest(&self, name: &str) -> Result<hvnode_api::guest::GuestStatus, Error> {
        let path = self.guest_path(name)?;
        let text = std::fs::read_to_string(&path).map_err(|_| {
            Error::new(
                StatusCode::NOT_FOUND,
                "guest_not_found",
                format!("No guest named {name:?}"),
            )
        })?;
        let spec: GuestSpec =
            toml::from_str(&text).map_err(|e| Error::internal("Guest definition", e))?;
        let rt = self.running.state(name);
        Ok(hvnode_api::guest::GuestStatus {
            spec,
            state: rt.state,
            pid: rt.pid,
            uptime_secs: rt.uptime_secs,
            crash_reason: rt.crash_reason,
        })
    }

    fn define_guest(&self, spec: GuestSpec, update: bool) -> Result<Resp, Error> {
        spec.validate().map_err(|e| {
            Error::new(StatusCode::BAD_REQUEST, "invalid_guest_spec", e.to_string())
        })?;
        let path = self.guest_path(&spec.name)?;
        match (path.exists(), update) {
            (true, false) => {
                return Err(Error::new(
                    StatusCode::CONFLICT,
                    "guest_exists",
                    format!(
                        "A guest named {:?} exists: update it with PUT or pick another name",
                        spec.name
                    ),
                ))
            }
            (false, true) => {
                return Err(Error::new(
                    StatusCode::NOT_FOUND,
                    "guest_not_found",
                    format!("No guest named {:?}", spec.name),
                ))
            }
            (true, true) if self.running.is_active(&spec.name) => {
                return Err(Error::new(
                    StatusCode::CONFLICT,
                    "guest_running",
                    format!(
                        "Guest {:?} is running: stop it before changing its definition",
                        spec.name
                    ),
                ))
            }
            _ => {}
        }
        let text = toml::to_string(&spec).map_err(|e| Error::internal("Guest definition", e))?;
        store::write_atomic(&path, text.as_bytes(), 0o644)
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

    fn delete_guest(&self, name: &str) -> Result<Resp, Error> {
        let path = self.guest_path(name)?;
        if self.running.is_active(name) {
            return Err(Error::new(
                StatusCode::CONFLICT,
                "guest_running",
                format!("Guest {name:?} has a running VMM: stop it before deleting it"),
            ));
        }
        std::fs::remove_file(&path).map_err(|_| {
            Error::new(
                StatusCode::NOT_FOUND,
                "guest_not_found",
                format!("No guest named {name:?}"),
            )
        })?;
        self.running.forget(name);
        self.events.emit("guest_deleted", Some(name), "deleted");
        Ok(text_response(
            StatusCode::NO_CONTENT,
            String::new(),
            "text/plain",
        ))
    }
}

impl From<guests::GuestError> for Error {
    fn from(e: guests::GuestError) -> Self {
        use guests::GuestError as G;
        let (status, code) = match &e {
            G::Path(..) => (StatusCode::BAD_REQUEST, "invalid_guest_path"),
            G::NoBridge(_) => (StatusCode::CONFLICT, "bridge_not_found"),
            G::TapInUse { .. } => (StatusCode::CONFLICT, "tap_in_use"),
            G::State { .. } => (StatusCode::CONFLICT, "invalid_guest_state"),
            G::Spawn(_) => (StatusCode::INTERNAL_SERVER_ERROR, "vmm_start_failed"),
            G::Unreachable(..) => (StatusCode::BAD_GATEWAY, "vmm_unreachable"),
            // The VMM saw the guest in another state than the agent did (a race with the
            // guest itself): the caller's request was fine, the moment was not.
            G::Refused { code, .. } if code == "invalid_state" => {
                (StatusCode::CONFLICT, "vmm_invalid_state")
            }
            G::Refused { .. } => (StatusCode::BAD_GATEWAY, "vmm_error"),
        };
        Error::new(status, code, e.to_string())
    }
}

impl Agent {
    /// After a (re)start of the agent: takes over the guests whose VMMs still run, cleans up
    /// after those that ended meanwhile, and on the first start since the node booted starts
    /// the `autostart` guests. Blocking.
    pub fn start_guests(self: &Arc<Self>) {
        let specs = self.guest_specs();
        self.running.reattach(&specs);
        match guests::first_start_since_boot(&self.paths.run) {
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
    fn guest_specs(&self) -> Vec<GuestSpec> {
        match self.guests() {
            Ok(list) => list.into_iter().map(|g| g.spec).collect(),
            Err(Error(_, _, msg)) => {
                eprintln!("agent: reading guest definitions: {msg}");
                Vec::new()
            }
        }
    }

    /// Guest operations; they may wait on a VMM, so they run on a blocking thread.
    fn guest_action(
        self: &Arc<Self>,
        method: &Method,
        name: &str,
        action: &str,
        query: &str,
    ) -> Result<Resp, Error> {
        let status = self.guest(name)?;
        let timeout = query_param(query, "timeout_secs")
            .map(|v| {
                v.parse::<u64>().map(Duration::from_secs).map_err(|_| {
                    Error::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_timeout",
                        format!("timeout_secs={v:?} is not a number of seconds"),
                    )
                })
            })
            .transpose()?;
        match (method, action) {
            (&Method::GET, "console") => {
                let bytes = query_param(query, "bytes")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(64 << 10);
                let log = self.paths.run.join("vms").join(name).join("console.log");
                let data = std::fs::read(log).unwrap_or_default();
                let tail = &data[data.len().saturating_sub(bytes)..];
                return Ok(text_response(
                    StatusCode::OK,
                    String::from_utf8_lossy(tail).into_owned(),
                    "text/plain; charset=utf-8",
                ));
            }
            (&Method::GET, "stats") => {
                return Ok(json_response(StatusCode::OK, &self.running.stats(name)?));
            }
            (&Method::POST, "start") => {
                self.running.start(&status.spec)?;
            }
            (&Method::POST, "stop") => self.running.stop(name)?,
            (&Method::POST, "shutdown") => self.running.shutdown(name, timeout)?,
            (&Method::POST, "pause") => self.running.pause(name)?,
            (&Method::POST, "resume") => self.running.resume(name)?,
            (&Method::POST, "reboot") => self
                .running
                .reboot(name, timeout.unwrap_or(guests::REBOOT_TIMEOUT))?,
            _ => return Err(Error::not_found()),
        }
        Ok(json_response(StatusCode::OK, &self.guest(name)?))
    }

    /// `GET /v1/guests/{name}/console/attach`: answers `101 Switching Protocols`, then joins
    /// the connection to the guest's serial console socket, replaying the end of the console
    /// log first so that the current prompt shows.
    async fn attach_console<B>(&self, name: &str, mut req: Request<B>) -> Result<Resp, Error> {
        let status = self.guest(name)?;
        if !self.running.is_active(name) {
            return Err(guests::GuestError::State {
                name: name.to_owned(),
                state: status.state.as_str(),
                op: "attach to the console of",
            }
            .into());
        }
        let has_token = |header, token: &str| {
            req.headers()
                .get_all(header)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        if !has_token(hyper::header::CONNECTION, "upgrade")
            || !has_token(hyper::header::UPGRADE, CONSOLE_PROTOCOL)
        {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                "upgrade_required",
                format!(
                    "Attaching needs an HTTP/1.1 upgrade: send Connection: Upgrade and Upgrade: {CONSOLE_PROTOCOL}"
                ),
            ));
        }
        let dir = self.paths.run.join("vms").join(name);
        // Connected before answering, so that a VMM that does not listen is an error response
        // rather than a connection that closes at once.
        let console = tokio::net::UnixStream::connect(dir.join("console.sock"))
            .await
            .map_err(|e| {
                Error::new(
                    StatusCode::BAD_GATEWAY,
                    "vmm_unreachable",
                    format!("The console of guest {name:?} does not answer ({e}): is the guest stopping?"),
                )
            })?;
        // Read after connecting: output in between shows twice rather than not at all.
        let replay = console_tail(&dir.join("console.log"), CONSOLE_REPLAY);
        let upgrade = hyper::upgrade::on(&mut req);
        let name = name.to_owned();
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    match join_console(upgraded, console, &replay).await {
                        // A client that went away without a TLS close_notify has still left.
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                        Err(e) => eprintln!("agent: console of guest {name}: {e}"),
                    }
                }
                Err(e) => eprintln!("agent: console of guest {name}: upgrade failed: {e}"),
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        h.insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static(CONSOLE_PROTOCOL),
        );
        Ok(r)
    }

    fn images(&self) -> Vec<serde_json::Value> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<serde_json::Value>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                let Ok(meta) = e.metadata() else { continue };
                if meta.is_dir() {
                    walk(root, &p, out);
                } else if meta.is_file() && !e.file_name().to_string_lossy().starts_with('.') {
                    let rel = p
                        .strip_prefix(root)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .into_owned();
                    out.push(serde_json::json!({"path": rel, "size_bytes": meta.len()}));
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.paths.images, &self.paths.images, &mut out);
        out.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
        out
    }

    async fn upload_image<B>(&self, rel: &str, mut body: B) -> Result<Resp, Error>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use tokio::io::AsyncWriteExt;
        const LIMIT: u64 = 16 << 30;
        hvnode_api::guest::validate_image_path(rel)
            .map_err(|e| Error::new(StatusCode::BAD_REQUEST, "invalid_path", e.to_string()))?;
        let dest = self.paths.images.join(rel);
        let dir = dest.parent().unwrap_or(&self.paths.images).to_owned();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::internal("Image directory", e))?;
        let tmp = dir.join(format!(".upload-{}-{}", std::process::id(), now_secs()));
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Error::internal("Image upload", e))?;
        let mut total = 0u64;
        let result: Result<(), Error> = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    Error::new(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        format!("Reading the upload: {}", e.into()),
                    )
                })?;
                if let Ok(data) = frame.into_data() {
                    total += data.len() as u64;
                    if total > LIMIT {
                        return Err(Error::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "image_too_large",
                            "Images are limited to 16 GiB",
                        ));
                    }
                    f.write_all(&data)
                        .await
                        .map_err(|e| Error::internal("Writing the image", e))?;
                }
            }
            f.sync_all()
                .await
                .map_err(|e| Error::internal("Writing the image", e))?;
            tokio::fs::rename(&tmp, &dest)
                .await
                .map_err(|e| Error::internal("Saving the image", e))
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        eprintln!("agent: image {rel} uploaded ({total} bytes)");
        Ok(json_response(
            StatusCode::CREATED,
            &serde_json::json!({"path": rel, "size_bytes": total}),
        ))
    }
}

/// The `Upgrade` protocol of `GET /v1/guests/{name}/console/attach`: raw serial bytes both ways.
pub const CONSOLE_PROTOCOL: &str = "hvnode-console";
/// How much of the console log an attach replays, at most.
const CONSOLE_REPLAY: u64 = 4 << 10;

/// The last `max` bytes of the console log, from the first line start in them (a cut escape
/// sequence would garble the terminal); nothing if there is no log.
fn console_tail(log: &Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    let mut data = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut data).is_err() {
        return Vec::new();
    }
    if start > 0 {
        let from = data
            .iter()
            .position(|b| *b == b'\n')
            .map_or(data.len(), |i| i + 1);
        data.drain(..from);
    }
    data
}

/// Copies bytes between an upgraded client connection and a guest console socket until either
/// side closes. Not `copy_bidirectional`: the VMM never closes a console client itself, so a
/// client that goes away must end the session, not just half-close it.
async fn join_console(
    upgraded: hyper::upgrade::Upgraded,
    console: tokio::net::UnixStream,
    replay: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let (mut client_rx, mut client_tx) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
    let (mut guest_rx, mut guest_tx) = console.into_split();
    client_tx.write_all(replay).await?;
    client_tx.flush().await?;
    let result = tokio::select! {
        r = tokio::io::copy(&mut client_rx, &mut guest_tx) => r,
        r = tokio::io::copy(&mut guest_rx, &mut client_tx) => r,
    };
    let _ = client_tx.shutdown().await;
    result.map(drop)
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Paths under one root directory (tests, benches, unprivileged runs).
pub fn paths_under(root: &Path) -> Paths {
    Paths {
        data: root.join("data"),
        run: root.join("run"),
        images: root.join("images"),
        init_socket: root.join("init.sock"),
        node_log: root.join("node.log"),
        vmm: PathBuf::from(hvnode_api::paths::VMM_BINARY),
    }
}

#[cfg(test)]
mod tests;
