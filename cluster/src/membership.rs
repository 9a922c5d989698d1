//! Membership: a node joins by granting a lease (TTL) and putting its record under it, and keeps
//! the lease alive from a task. If the lease goes (revoked, or not renewed within its TTL: etcd
//! unreachable from this node) the record goes with it, and the node is told on a
//! [`tokio::sync::watch`] channel.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::model::{decode, encode, NodeRecord};

/// The default membership lease TTL (seconds): a node is gone from the cluster this long after
/// it stops renewing.
pub const DEFAULT_TTL_SECS: i64 = 10;

/// The state of a node's membership lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// The lease was renewed within its TTL.
    Alive,
    /// The lease is gone (or could not be renewed within its TTL): the node's record is gone
    /// from the cluster and it must join again.
    Lost { reason: String },
}

/// A node's membership: its lease, kept alive by a task until [`Membership::leave`] or drop.
pub struct Membership {
    client: Client,
    key: String,
    id: String,
    lease: i64,
    ttl: i64,
    state: watch::Receiver<LeaseState>,
    renewed: std::sync::Arc<std::sync::Mutex<Instant>>,
    keeper: JoinHandle<()>,
}

impl Membership {
    /// Joins: grants a lease of `ttl_secs` (at least 2), puts `record` at `nodes/<id>` under it,
    /// and starts renewing it every third of the TTL.
    pub async fn join(
        client: &Client,
        keys: &Keys,
        record: &NodeRecord,
        ttl_secs: i64,
    ) -> Result<Self> {
        let key = keys.node(&record.id)?;
        let ttl = ttl_secs.max(2);
        let mut c = client.clone();
        let lease = c.lease_grant(ttl, None).await?.id();
        if let Err(e) = c
            .put(
                key.clone(),
                encode(record),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
        {
            let _ = c.lease_revoke(lease).await;
            return Err(e.into());
        }
        let (tx, rx) = watch::channel(LeaseState::Alive);
        let renewed = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
        let keeper = tokio::spawn(keep_alive(
            client.clone(),
            lease,
            ttl,
            tx,
            std::sync::Arc::clone(&renewed),
        ));
        Ok(Membership {
            client: client.clone(),
            key,
            id: record.id.clone(),
            lease,
            ttl,
            state: rx,
            renewed,
            keeper,
        })
    }

    /// The lease's id (for the election, which campaigns under the same lease).
    pub fn lease_id(&self) -> i64 {
        self.lease
    }

    /// The lease's TTL in seconds.
    pub fn ttl_secs(&self) -> i64 {
        self.ttl
    }

    /// When etcd last answered a renewal of the lease (by this node's monotonic clock; the
    /// grant at joining counts as one).
    pub fn last_renewed(&self) -> Instant {
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lease's state now.
    pub fn state(&self) -> LeaseState {
        self.state.borrow().clone()
    }

    /// A receiver that sees the lease's state change (Alive → Lost, once).
    pub fn watch(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Republishes the node's record (new free memory, heartbeat, state) under the lease.
    pub async fn update(&self, record: &NodeRecord) -> Result<()> {
        if record.id != self.id {
            return Err(Error::Invalid(format!(
                "node {} cannot write the record of node {}",
                self.id, record.id
            )));
        }
        if let LeaseState::Lost { reason } = self.state() {
            return Err(Error::LeaseLost(reason));
        }
        let mut c = self.client.clone();
        match c
            .put(
                self.key.clone(),
                encode(record),
                Some(PutOptions::new().with_lease(self.lease)),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match Error::from(e) {
                Error::Etcd(m) if m.contains("lease not found") => Err(Error::LeaseLost(m)),
                other => Err(other),
            },
        }
    }

    /// Leaves: stops renewing and revokes the lease (the record goes at once).
    pub async fn leave(self) -> Result<()> {
        self.keeper.abort();
        let mut c = self.client.clone();
        c.lease_revoke(self.lease).await?;
        Ok(())
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // The record then goes when the TTL runs out.
        self.keeper.abort();
    }
}

async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: i64,
    tx: watch::Sender<LeaseState>,
    renewed: std::sync::Arc<std::sync::Mutex<Instant>>,
) {
    let interval = Duration::from_millis((ttl as u64 * 1000) / 3);
    let ttl_d = Duration::from_secs(ttl as u64);
    let mut last_ok = Instant::now();
    let mut stream = None;
    loop {
        tokio::time::sleep(interval).await;
        if stream.is_none() {
            match tokio::time::timeout(interval, client.lease_keep_alive(lease)).await {
                Ok(Ok(s)) => stream = Some(s),
                Ok(Err(e)) => {
                    let e = Error::from(e).to_string();
                    if gone(&tx, lease, &e) || lost_after(&tx, last_ok, ttl_d, &e) {
                        return;
                    }
                    continue;
                }
                Err(_) => {
                    if lost_after(&tx, last_ok, ttl_d, "keepalive stream: timeout") {
                        return;
                    }
                    continue;
                }
            }
        }
        let (keeper, responses) = stream.as_mut().expect("set above");
        let round = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(interval, round).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                last_ok = Instant::now();
                *renewed.lock().unwrap_or_else(|e| e.into_inner()) = last_ok;
            }
            Ok(Ok(Some(_))) => {
                let _ = tx.send(LeaseState::Lost {
                    reason: format!("lease {lease:x} expired or was revoked"),
                });
                return;
            }
            Ok(Ok(None)) => {
                stream = None;
                if lost_after(&tx, last_ok, ttl_d, "keepalive stream closed") {
                    return;
                }
            }
            Ok(Err(e)) => {
                stream = None;
                let e = Error::from(e).to_string();
                if gone(&tx, lease, &e) || lost_after(&tx, last_ok, ttl_d, &e) {
                    return;
                }
            }
            Err(_) => {
                stream = None;
                if lost_after(&tx, last_ok, ttl_d, "keepalive: no answer") {
                    return;
                }
            }
        }
    }
}

/// etcd answers a keepalive of a revoked or expired lease with "lease not found": reports Lost.
fn gone(tx: &watch::Sender<LeaseState>, lease: i64, error: &str) -> bool {
    if !error.contains("lease not found") {
        return false;
    }
    let _ = tx.send(LeaseState::Lost {
        reason: format!("lease {lease:x} expired or was revoked ({error})"),
    });
    true
}

/// Reports Lost if the lease has not been renewed for its TTL (then etcd has dropped it too, or
/// will have by the time this node could tell).
fn lost_after(tx: &watch::Sender<LeaseState>, last_ok: Instant, ttl: Duration, why: &str) -> bool {
    if last_ok.elapsed() < ttl {
        return false;
    }
    let _ = tx.send(LeaseState::Lost {
        reason: format!("lease not renewed for {}s: {why}", ttl.as_secs()),
    });
    true
}

/// The live nodes: the records whose leases are alive (a record goes with its lease), by id.
pub async fn list_nodes(client: &Client, keys: &Keys) -> Result<Vec<NodeRecord>> {
    let mut c = client.clone();
    let resp = c
        .get(keys.nodes(), Some(GetOptions::new().with_prefix()))
        .await?;
    resp.kvs()
        .iter()
        .map(|kv| decode(&String::from_utf8_lossy(kv.key()), kv.value()))
        .collect()
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("key", &self.key)
            .field("lease", &self.lease)
            .field("ttl", &self.ttl)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}
