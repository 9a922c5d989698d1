//! The thread that talks to the agent. It owns the blocking [`Client`], takes [`Action`]s from
//! a channel, one at a time in the order sent, and posts each [`Done`] back; the UI thread only
//! ever polls the answers, so an agent that never answers cannot freeze the screen.

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread;
use std::time::Duration;

use hvnode_api::cluster::{DrainPolicy, SetMaintenance};
use hvnode_api::config::NetworkConfig;
use hvnode_api::guest::CreateSnapshot;
use hvnode_api::install::{InstallRequest, InstallState};
use hvnode_api::node::{Hostname, NetworkView, StorageInit};
use hvnode_api::registration::{AcceptManager, ManagerUrl};
use hvnode_api::routes::method::{DELETE, POST, PUT};
use hvnode_api::routes::Route;

use crate::client::{Client, ClientError};
use crate::state::{Action, Answer, Done, Refreshed, Snapshot};

/// The worker thread is gone: it can only have panicked.
#[derive(Debug, thiserror::Error)]
#[error("The agent worker thread stopped")]
pub struct WorkerGone;

/// The UI thread's end of the worker.
#[derive(Debug)]
pub struct Worker {
    requests: Sender<Action>,
    answers: Receiver<Done>,
}

impl Worker {
    /// Starts the thread. It ends once the `Worker` is dropped and the action at hand is done.
    pub fn spawn(client: Client) -> std::io::Result<Worker> {
        let (requests, inbox) = mpsc::channel::<Action>();
        let (outbox, answers) = mpsc::channel();
        thread::Builder::new()
            .name("agent-client".into())
            .spawn(move || {
                for action in inbox {
                    let result = perform(&client, &action);
                    if outbox.send(Done { action, result }).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Worker { requests, answers })
    }

    /// Queues an action; never waits for the agent.
    pub fn send(&self, action: Action) -> Result<(), WorkerGone> {
        self.requests.send(action).map_err(|_| WorkerGone)
    }

    /// An answer, if one has arrived; never waits.
    pub fn try_recv(&self) -> Result<Option<Done>, WorkerGone> {
        match self.answers.try_recv() {
            Ok(d) => Ok(Some(d)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(WorkerGone),
        }
    }
}

/// Lines of the node log the Logs screen reads.
const NODE_LOG_LINES: &str = "500";
/// Guest operations: `stop` answers once the VMM is gone, which the agent forces after 10 s.
const GUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A snapshot writes the guest's whole memory.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// A network change init applies (bonds, VLANs, a bridge) can take longer than a read.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(30);
/// Formatting the data partition: the agent waits up to 120 s for init.
const STORAGE_TIMEOUT: Duration = Duration::from_secs(130);

fn refresh(c: &Client, node_log: bool) -> Result<Answer, ClientError> {
    let snapshot = (|| -> Result<Snapshot, ClientError> {
        Ok(Snapshot {
            registration: c.get(&Route::Registration.path())?,
            info: c.get(&Route::Node.path())?,
            stats: c.get(&Route::Stats.path())?,
            guests: c.get(&Route::Guests.path())?,
            storage: c.get(&Route::Storage.path())?,
            cluster: c.get(&Route::Cluster.path())?,
            install_disks: c.get(&Route::NodeDisks.path()).unwrap_or_default(),
            install: c
                .get(&Route::NodeInstall.path())
                .unwrap_or(InstallState::Idle),
        })
    })();
    if let Err(e @ ClientError::Unreachable(..)) = snapshot {
        return Err(e);
    }
    let network = c.get(&Route::Network.path());
    let node_log =
        node_log.then(|| c.get_text(&Route::Logs.with_query(&[("lines", NODE_LOG_LINES)])));
    Ok(Answer::Refreshed(Box::new(Refreshed {
        snapshot,
        network,
        node_log,
    })))
}

fn network(
    c: &Client,
    method: &str,
    route: Route,
    body: Option<&NetworkConfig>,
) -> Result<Answer, ClientError> {
    let view: NetworkView = c.call(method, &route.path(), body, NETWORK_TIMEOUT)?;
    Ok(Answer::Network(Box::new(view)))
}

/// Carries out one action against the agent.
fn perform(c: &Client, action: &Action) -> Result<Answer, ClientError> {
    let done = |r: Result<(), ClientError>| r.map(|()| Answer::Done);
    match action {
        Action::Refresh { node_log } => refresh(c, *node_log),
        Action::SetHostname(h) => done(c.send(
            PUT,
            &Route::NodeHostname.path(),
            Some(&Hostname {
                hostname: h.clone(),
            }),
        )),
        Action::Power(p) => done(c.send(POST, &Route::Power.path(), Some(p))),
        Action::Maintenance(on) => done(c.send(
            PUT,
            &Route::ClusterMaintenance.path(),
            Some(&SetMaintenance {
                on: *on,
                policy: DrainPolicy::Restart,
                downtime_limit_ms: None,
            }),
        )),
        Action::Guest(name, op) => c
            .call::<(), _>(
                POST,
                &Route::GuestAction(name.clone(), *op).path(),
                None,
                GUEST_TIMEOUT,
            )
            .map(|g| Answer::Guest(Box::new(g))),
        Action::GuestConsole(name) => c
            .get_text(&Route::GuestConsole(name.clone()).path())
            .map(Answer::Text),
        Action::Snapshot(name, snap) => c
            .call::<_, serde_json::Value>(
                POST,
                &Route::GuestSnapshots(name.clone()).path(),
                Some(&CreateSnapshot { name: snap.clone() }),
                SNAPSHOT_TIMEOUT,
            )
            .map(|_| Answer::Done),
        Action::Restore(name, snap) => c
            .call::<(), _>(
                POST,
                &Route::GuestSnapshotRestore(name.clone(), snap.clone()).path(),
                None,
                GUEST_TIMEOUT,
            )
            .map(|g| Answer::Guest(Box::new(g))),
        Action::NewPairingCode => done(c.send::<()>(POST, &Route::PairingCode.path(), None)),
        Action::Unregister => done(c.send::<()>(DELETE, &Route::Registration.path(), None)),
        Action::FetchManager(url) => c
            .call(
                POST,
                &Route::RegistrationManager.path(),
                Some(&ManagerUrl { url: url.clone() }),
                Duration::from_secs(5),
            )
            .map(Answer::Candidate),
        Action::AcceptManager(fp) => done(c.send(
            POST,
            &Route::RegistrationManagerAccept.path(),
            Some(&AcceptManager {
                ca_fingerprint: fp.clone(),
            }),
        )),
        Action::RejectManager => {
            done(c.send::<()>(POST, &Route::RegistrationManagerReject.path(), None))
        }
        Action::InitStorage(dev) => c
            .call::<_, serde_json::Value>(
                POST,
                &Route::StorageInit.path(),
                Some(&StorageInit {
                    device: dev.clone(),
                    confirm: dev.clone(),
                }),
                STORAGE_TIMEOUT,
            )
            .map(|_| Answer::Done),
        Action::Install(dev) => c
            .call::<_, serde_json::Value>(
                POST,
                &Route::NodeInstall.path(),
                Some(&InstallRequest {
                    disk: dev.clone(),
                    confirm: Some(dev.clone()),
                }),
                STORAGE_TIMEOUT,
            )
            .map(|_| Answer::Done),
        Action::ApplyNetwork(config) => network(c, PUT, Route::Network, Some(config)),
        Action::ConfirmNetwork => network(c, POST, Route::NetworkConfirm, None),
        Action::RollbackNetwork => network(c, POST, Route::NetworkRollback, None),
    }
}
