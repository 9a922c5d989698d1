//! The node's side of HA fencing (docs/ha.md): the watchdog, held by init and fed on this
//! agent's grants, and the guard ([`hvnode_cluster::fencing::Guard`]) that decides every half
//! tick whether the node keeps granting. A node whose membership lease is in doubt asks its
//! peers (`GET /v1/cluster/peer`, node to node, pinned to the fingerprint in their records);
//! a node that must fence itself kills its HA guests' VMMs first, then tells init to stop
//! feeding, and its watchdog resets it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hvnode_api::cluster::{ClusterConnection, FenceState, FencingView, PeerLease};
use hvnode_api::init::InitRequest;
use hvnode_api::routes::Route;
use hvnode_cluster::fencing::{Guard, PeerAnswer, PeerRound, Timings, Verdict};
use hvnode_cluster::model::NodeRecord;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::manager::BaseUrl;
use crate::{tls, Agent};

/// The timings this node keeps (checked by the guard).
pub const TIMINGS: Timings = Timings::DEFAULT;

/// A node to ask when the lease is in doubt.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    id: String,
    address: String,
    fingerprint: String,
}

#[derive(Debug)]
struct Inner {
    /// When the membership lease was last renewed.
    renewed: Option<Instant>,
    /// When the agent started (the lease age of a node that never renewed one).
    started: Instant,
    peers: Vec<Peer>,
    round: Option<PeerRound>,
    view: FencingView,
}

/// The fencing state shared by the cluster loop, the guard and the peer route.
#[derive(Debug)]
pub struct Fencing {
    inner: Mutex<Inner>,
}

impl Default for Fencing {
    fn default() -> Self {
        Fencing {
            inner: Mutex::new(Inner {
                renewed: None,
                started: Instant::now(),
                peers: Vec::new(),
                round: None,
                view: FencingView::default(),
            }),
        }
    }
}

impl Fencing {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster loop: the lease was renewed at `at`.
    pub fn renewed(&self, at: Instant) {
        let mut i = self.lock();
        if i.renewed.is_none_or(|r| r < at) {
            i.renewed = Some(at);
        }
    }

    /// The cluster loop: the members of the state just read, this node (`me`) left out.
    pub fn members(&self, me: &str, nodes: &[NodeRecord]) {
        self.lock().peers = nodes
            .iter()
            .filter(|n| n.id != me)
            .map(|n| Peer {
                id: n.id.clone(),
                address: n.address.clone(),
                fingerprint: n.fingerprint.clone(),
            })
            .collect();
    }

    /// Time since the lease was last renewed (since the agent started, if never).
    pub fn lease_age(&self) -> Duration {
        let i = self.lock();
        i.renewed.unwrap_or(i.started).elapsed()
    }

    /// The view the API and the console show.
    pub fn view(&self) -> FencingView {
        self.lock().view.clone()
    }

    /// The watchdog that fences this node, for its record.
    pub fn watchdog(&self) -> Option<String> {
        let i = self.lock();
        match i.view.state {
            FenceState::Unarmed | FenceState::Fenced => None,
            _ => i.view.watchdog.clone(),
        }
    }

    /// Whether the node fenced itself (it starts nothing until it is reset).
    pub fn is_fenced(&self) -> bool {
        self.lock().view.state == FenceState::Fenced
    }

    fn set_view(&self, view: FencingView) {
        self.lock().view = view;
    }
}

impl Agent {
    /// `GET /v1/cluster/peer`.
    pub(crate) fn peer_lease(&self) -> PeerLease {
        let view = self.cluster_view_now();
        let joined = view.connection != ClusterConnection::NotJoined;
        let renewed = self.fencing.lock().renewed;
        let age = renewed.map(|r| r.elapsed());
        PeerLease {
            node_id: view.node_id,
            member: joined
                && view.connection == ClusterConnection::Member
                && age.is_some_and(|a| a < TIMINGS.doubt_after),
            lease_age_ms: age.map(|a| a.as_millis() as u64),
        }
    }

    /// Starts the guard (for the life of the agent).
    pub fn spawn_fencing(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.guard_loop().await });
    }

    async fn guard_loop(self: Arc<Self>) {
        let mut guard = match Guard::new(TIMINGS) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("agent: fencing timings refused: {e}");
                self.fencing.set_view(FencingView {
                    watchdog: None,
                    state: FenceState::Unarmed,
                    message: Some(format!("fencing timings refused: {e}")),
                });
                return;
            }
        };
        let mut step = tokio::time::interval(TIMINGS.tick / 2);
        let mut armed: Option<String> = None;
        loop {
            step.tick().await;
            let joined = self.cluster_view_now().connection != ClusterConnection::NotJoined;
            if !joined {
                if armed.take().is_some() {
                    if let Err(e) = self.init_request(InitRequest::WatchdogDisarm).await {
                        eprintln!("agent: disarming the watchdog: {e}");
                    }
                }
                self.fencing.set_view(FencingView::default());
                continue;
            }
            let ha = {
                let me = Arc::clone(&self);
                tokio::task::spawn_blocking(move || me.ha_guests_running())
                    .await
                    .unwrap_or_default()
            };
            let (age, round) = {
                let i = self.fencing.lock();
                (i.renewed.unwrap_or(i.started).elapsed(), i.round.clone())
            };
            let verdict = guard.step(Instant::now(), age, !ha.is_empty(), round.as_ref());
            let (state, message, ask) = match &verdict {
                Verdict::Feed => (FenceState::Guarding, None, false),
                Verdict::Doubt { ask_peers } => (
                    FenceState::Doubt,
                    Some(format!(
                        "lease not renewed for {} s: asking the other nodes",
                        age.as_secs()
                    )),
                    *ask_peers,
                ),
                Verdict::QuorumLost { ask_peers } => (
                    FenceState::QuorumLost,
                    Some(
                        "etcd answers no node: the guests keep running here, nothing is \
                         started or moved until it is back"
                            .to_owned(),
                    ),
                    *ask_peers,
                ),
                Verdict::Fence { reason } => {
                    if self.fencing.is_fenced() {
                        continue;
                    }
                    self.fence(reason, &ha).await;
                    continue;
                }
            };
            if ask {
                let me = Arc::clone(&self);
                tokio::spawn(async move { me.ask_peers().await });
            }
            let message_now = message.clone();
            match self
                .init_request(InitRequest::Watchdog {
                    feed_ms: TIMINGS.grant.as_millis() as u64,
                })
                .await
            {
                Ok(()) => {
                    let identity =
                        std::fs::read_to_string("/sys/class/watchdog/watchdog0/identity")
                            .map(|s| s.trim().to_owned())
                            .unwrap_or_else(|_| "watchdog".into());
                    if armed.as_deref() != Some(identity.as_str()) {
                        self.events.emit(
                            "fencing",
                            None,
                            format!("watchdog {identity} armed: fed while this node holds its cluster lease"),
                        );
                        armed = Some(identity.clone());
                    }
                    self.fencing.set_view(FencingView {
                        watchdog: Some(identity),
                        state,
                        message,
                    });
                }
                Err(e) => {
                    let was = self.fencing.view();
                    let message = format!(
                        "no watchdog ({e}): should this node be lost, its HA guests are not \
                         restarted elsewhere"
                    );
                    if was.message.as_deref() != Some(message.as_str()) {
                        eprintln!("agent: fencing: {message}");
                    }
                    armed = None;
                    self.fencing.set_view(FencingView {
                        watchdog: None,
                        state,
                        message: Some(match message_now {
                            Some(m) => format!("{m}; {message}"),
                            None => message,
                        }),
                    });
                }
            }
        }
    }

    /// Fences the node: kills the HA guests' VMMs, then stops the watchdog's feeding.
    async fn fence(self: &Arc<Self>, reason: &str, ha: &[String]) {
        let watchdog = self.fencing.view().watchdog;
        self.fencing.set_view(FencingView {
            watchdog: watchdog.clone(),
            state: FenceState::Fenced,
            message: Some(reason.to_owned()),
        });
        let line = format!("fence: {reason}: killing the HA guests {}", ha.join(", "));
        self.announce(&line).await;
        self.events.emit("fencing", None, line);
        let me = Arc::clone(self);
        let names = ha.to_vec();
        let killed = tokio::task::spawn_blocking(move || {
            names
                .iter()
                .map(|n| (n.clone(), me.running.kill_now(n)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (name, gone) in &killed {
            let line = if *gone {
                format!("fence: killed the HA guest {name}")
            } else {
                format!("fence: the HA guest {name}'s VMM did not go: the watchdog's reset ends it")
            };
            self.announce(&line).await;
            self.events.emit("fencing", Some(name), line);
        }
        let stop = self
            .init_request(InitRequest::Watchdog { feed_ms: 0 })
            .await;
        let line = match (stop, watchdog) {
            (Ok(()), Some(w)) => format!(
                "fence: watchdog {w} no longer fed: the node resets within {} s",
                TIMINGS.watchdog_timeout.as_secs()
            ),
            (r, _) => format!(
                "fence: no watchdog to reset the node ({}): its HA guests are killed; it starts \
                 no cluster guest until it restarts",
                r.err().unwrap_or_else(|| "none armed".into())
            ),
        };
        self.announce(&line).await;
        self.events.emit("fencing", None, line);
    }

    /// A line on the node's consoles (through init, which owns them), in its log and in the
    /// agent's output: what HA does on a node must be on record where the node is watched.
    pub(crate) async fn announce(&self, line: &str) {
        eprintln!("agent: {line}");
        let message: String = line.chars().filter(|c| !c.is_control()).take(512).collect();
        if let Err(e) = self.init_request(InitRequest::Announce { message }).await {
            eprintln!("agent: announcing on the consoles: {e}");
        }
    }

    /// One round of asking every peer whether it holds its lease; the answers are kept for
    /// the guard's next step.
    async fn ask_peers(self: Arc<Self>) {
        let peers = self.fencing.lock().peers.clone();
        let signed = tls::load_signed(&self.tls_dir())
            .map(|(pem, _)| pem)
            .ok_or_else(|| "this node has no certificate signed by the manager".to_owned());
        let mut asks = tokio::task::JoinSet::new();
        for (index, p) in peers.into_iter().enumerate() {
            let config = signed.clone().and_then(|s| {
                let fp = hvnode_api::fingerprint::normalize(&p.fingerprint)
                    .map_err(|e| format!("its record's fingerprint: {e}"))?;
                tls::peer_client_config(&self.identity, &s, &fp).map_err(|e| e.to_string())
            });
            asks.spawn(async move {
                let answer = match config {
                    Err(e) => PeerAnswer::NoAnswer(e),
                    Ok(c) => {
                        match tokio::time::timeout(TIMINGS.peer_poll, ask_peer(&p.address, c)).await
                        {
                            Ok(Ok(lease)) if lease.member => PeerAnswer::Member,
                            Ok(Ok(_)) => PeerAnswer::Cut,
                            Ok(Err(e)) => PeerAnswer::NoAnswer(e),
                            Err(_) => PeerAnswer::NoAnswer(format!(
                                "no answer within {} s",
                                TIMINGS.peer_poll.as_secs()
                            )),
                        }
                    }
                };
                (index, p.id, answer)
            });
        }
        let mut answers = asks.join_all().await;
        answers.sort_by_key(|(i, ..)| *i);
        let answers = answers.into_iter().map(|(_, id, a)| (id, a)).collect();
        self.fencing.lock().round = Some(PeerRound {
            at: Instant::now(),
            answers,
        });
    }

    /// The cluster guests whose VMMs run here and that are HA.
    pub(crate) fn ha_guests_running(&self) -> Vec<String> {
        self.cluster_guests_here()
            .into_iter()
            .filter(|n| self.is_ha_cluster_guest(n) && self.running.is_active(n))
            .collect()
    }

    async fn init_request(&self, req: InitRequest) -> Result<(), String> {
        let init = self.init.clone();
        tokio::task::spawn_blocking(move || init.request(&req).map_err(|e| e.message))
            .await
            .map_err(|e| e.to_string())?
    }
}

/// Asks one peer for its lease over mutual TLS (`config` pins its certificate).
async fn ask_peer(address: &str, config: rustls::ClientConfig) -> Result<PeerLease, String> {
    let url = if address.starts_with("https://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    };
    let base = BaseUrl::parse(&url).map_err(|_| format!("its address {address:?} is not a URL"))?;
    let tcp = tokio::net::TcpStream::connect((base.host.as_str(), base.port))
        .await
        .map_err(|e| e.to_string())?;
    let server = ServerName::try_from(base.host.clone()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(Route::ClusterPeer.path())
        .header(hyper::header::HOST, format!("{}:{}", base.host, base.port))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("it answered HTTP {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("its answer: {e}"))
}
