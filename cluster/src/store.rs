//! The cluster's guests, storage domains and placements in etcd, written with revision-checked
//! transactions: a create succeeds only if the key does not exist (create_revision == 0), an
//! update or delete only if the key is at the revision the writer read (mod_revision), and a
//! placement only if the guest record is unchanged since the decision and no placement exists.
//! A lost race is [`Error::Conflict`] (or [`Error::AlreadyPlaced`]): re-read and decide again.

use etcd_client::{Client, Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};

use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::model::{decode, encode, ClusterGuest, NodeRecord, Placement, Record, StorageDomain};

/// A record with the revision it was last modified at (its mod_revision), the revision to hand
/// back to an update or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: i64,
}

/// The whole cluster state, read at one etcd revision.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    /// The revision the state was read at.
    pub revision: i64,
    pub nodes: Vec<NodeRecord>,
    pub guests: Vec<Versioned<ClusterGuest>>,
    pub placements: Vec<Versioned<Placement>>,
    pub domains: Vec<Versioned<StorageDomain>>,
}

/// The cluster's records in etcd.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
}

fn key_of(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

fn versioned<T: Record>(kv: &KeyValue) -> Result<Versioned<T>> {
    Ok(Versioned {
        value: decode(&key_of(kv), kv.value())?,
        revision: kv.mod_revision(),
    })
}

/// The key-values of each get of a transaction's responses (a non-get gives an empty list).
fn txn_gets(resp: &etcd_client::TxnResponse) -> Vec<Vec<KeyValue>> {
    resp.op_responses()
        .into_iter()
        .map(|r| match r {
            TxnOpResponse::Get(mut g) => g.take_kvs(),
            _ => Vec::new(),
        })
        .collect()
}

/// The key-values of the `index`th get of a transaction's responses.
fn txn_get(resp: &etcd_client::TxnResponse, index: usize) -> Vec<KeyValue> {
    txn_gets(resp).into_iter().nth(index).unwrap_or_default()
}

fn revision_of(resp: &etcd_client::TxnResponse) -> i64 {
    resp.header().map(|h| h.revision()).unwrap_or_default()
}

impl Store {
    /// The store of the cluster under `keys`.
    pub fn new(client: &Client, keys: &Keys) -> Self {
        Store {
            client: client.clone(),
            keys: keys.clone(),
        }
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn create<T: Record>(&self, key: String, value: &T) -> Result<i64> {
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), encode(value), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.client.clone().txn(txn).await?;
        if resp.succeeded() {
            return Ok(revision_of(&resp));
        }
        let found = txn_get(&resp, 0)
            .first()
            .map(|kv| kv.mod_revision())
            .unwrap_or(0);
        Err(Error::Conflict {
            key,
            expected: 0,
            found,
        })
    }

    async fn update<T: Record>(&self, key: String, value: &T, revision: i64) -> Result<i64> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key.clone(), encode(value), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.client.clone().txn(txn).await?;
        if resp.succeeded() {
            return Ok(revision_of(&resp));
        }
        match txn_get(&resp, 0).first() {
            None => Err(Error::NotFound { key }),
            Some(kv) => Err(Error::Conflict {
                key,
                expected: revision,
                found: kv.mod_revision(),
            }),
        }
    }

    async fn delete(&self, key: String, revision: i64, also: Option<String>) -> Result<()> {
        let mut ops = vec![TxnOp::delete(key.clone(), None)];
        if let Some(also) = also {
            ops.push(TxnOp::delete(also, None));
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then(ops)
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.client.clone().txn(txn).await?;
        if resp.succeeded() {
            return Ok(());
        }
        match txn_get(&resp, 0).first() {
            None => Err(Error::NotFound { key }),
            Some(kv) => Err(Error::Conflict {
                key,
                expected: revision,
                found: kv.mod_revision(),
            }),
        }
    }

    async fn get<T: Record>(&self, key: String) -> Result<Versioned<T>> {
        let resp = self.client.clone().get(key.clone(), None).await?;
        match resp.kvs().first() {
            None => Err(Error::NotFound { key }),
            Some(kv) => versioned(kv),
        }
    }

    async fn list<T: Record>(&self, prefix: String) -> Result<Vec<Versioned<T>>> {
        let resp = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        resp.kvs().iter().map(versioned).collect()
    }

    /// Creates a guest (refused with a conflict if it exists); returns its revision.
    pub async fn create_guest(&self, guest: &ClusterGuest) -> Result<i64> {
        self.create(self.keys.guest(guest.name())?, guest).await
    }

    /// A guest and its revision.
    pub async fn get_guest(&self, name: &str) -> Result<Versioned<ClusterGuest>> {
        self.get(self.keys.guest(name)?).await
    }

    /// All guests, by name.
    pub async fn list_guests(&self) -> Result<Vec<Versioned<ClusterGuest>>> {
        self.list(self.keys.guests()).await
    }

    /// Replaces a guest if it is still at `revision` (the one read); returns the new revision.
    pub async fn update_guest(&self, guest: &ClusterGuest, revision: i64) -> Result<i64> {
        self.update(self.keys.guest(guest.name())?, guest, revision)
            .await
    }

    /// Deletes a guest, and its placement with it, if it is still at `revision`.
    pub async fn delete_guest(&self, name: &str, revision: i64) -> Result<()> {
        self.delete(
            self.keys.guest(name)?,
            revision,
            Some(self.keys.placement(name)?),
        )
        .await
    }

    /// Creates a storage domain (refused with a conflict if it exists).
    pub async fn create_domain(&self, domain: &StorageDomain) -> Result<i64> {
        self.create(self.keys.domain(&domain.name)?, domain).await
    }

    /// Replaces a storage domain if it is still at `revision`.
    pub async fn update_domain(&self, domain: &StorageDomain, revision: i64) -> Result<i64> {
        self.update(self.keys.domain(&domain.name)?, domain, revision)
            .await
    }

    /// Deletes a storage domain if it is still at `revision`.
    pub async fn delete_domain(&self, name: &str, revision: i64) -> Result<()> {
        self.delete(self.keys.domain(name)?, revision, None).await
    }

    /// All storage domains, by name.
    pub async fn list_domains(&self) -> Result<Vec<Versioned<StorageDomain>>> {
        self.list(self.keys.domains()).await
    }

    /// Places `guest` on `node` (the leader's write): succeeds only if the guest record is still
    /// at `read_revision` (the decision was made on it) and the guest has no placement. Returns
    /// the placement's revision.
    pub async fn place(
        &self,
        guest: &str,
        node: &str,
        read_revision: i64,
        reason: &str,
    ) -> Result<i64> {
        self.place_checked(guest, node, read_revision, reason, None)
            .await
    }

    /// [`Store::place`] by the leader, in the same transaction as a check that `leadership` is
    /// still current: a former leader (resigned, lease lost) gets [`Error::NotLeader`] and writes
    /// nothing.
    pub async fn place_as_leader(
        &self,
        leadership: &crate::election::Leadership,
        guest: &str,
        node: &str,
        read_revision: i64,
        reason: &str,
    ) -> Result<i64> {
        self.place_checked(guest, node, read_revision, reason, Some(leadership.key()))
            .await
    }

    async fn place_checked(
        &self,
        guest: &str,
        node: &str,
        read_revision: i64,
        reason: &str,
        leader: Option<(&[u8], i64)>,
    ) -> Result<i64> {
        let gkey = self.keys.guest(guest)?;
        let pkey = self.keys.placement(guest)?;
        crate::keys::validate_name("node id", node)?;
        let placement = Placement::new(guest, node, read_revision, reason);
        let when = vec![
            Compare::mod_revision(gkey.clone(), CompareOp::Equal, read_revision),
            Compare::create_revision(pkey.clone(), CompareOp::Equal, 0),
        ];
        let otherwise = vec![
            TxnOp::get(gkey.clone(), None),
            TxnOp::get(pkey.clone(), None),
        ];
        let resp = match self
            .put_placement_when(&pkey, &placement, when, otherwise, leader)
            .await?
        {
            Ok(revision) => return Ok(revision),
            Err(resp) => resp,
        };
        if let Some(kv) = txn_get(&resp, 1).first() {
            let existing: Placement = decode(&pkey, kv.value())?;
            return Err(Error::AlreadyPlaced {
                guest: guest.to_string(),
                node: existing.node,
            });
        }
        match txn_get(&resp, 0).first() {
            None => Err(Error::NotFound { key: gkey }),
            Some(kv) => Err(Error::Conflict {
                key: gkey,
                expected: read_revision,
                found: kv.mod_revision(),
            }),
        }
    }

    /// Moves a guest's placement to `node` if it is still at `revision` (the placement the
    /// decision was made on): the leader restarting an HA guest of a lost node elsewhere, or a
    /// draining node handing a guest it migrated to the node that now runs it. With
    /// `leadership`, only while it is current ([`Error::NotLeader`] otherwise). A placement
    /// changed or gone since is [`Error::Conflict`] or [`Error::NotFound`]. Returns the new
    /// placement's revision.
    pub async fn move_placement(
        &self,
        leadership: Option<&crate::election::Leadership>,
        guest: &str,
        revision: i64,
        node: &str,
        reason: &str,
    ) -> Result<i64> {
        let pkey = self.keys.placement(guest)?;
        crate::keys::validate_name("node id", node)?;
        let placement = Placement::new(guest, node, revision, reason);
        let when = vec![Compare::mod_revision(
            pkey.clone(),
            CompareOp::Equal,
            revision,
        )];
        let otherwise = vec![TxnOp::get(pkey.clone(), None)];
        let resp = match self
            .put_placement_when(
                &pkey,
                &placement,
                when,
                otherwise,
                leadership.map(|l| l.key()),
            )
            .await?
        {
            Ok(revision) => return Ok(revision),
            Err(resp) => resp,
        };
        match txn_get(&resp, 0).first() {
            None => Err(Error::NotFound { key: pkey }),
            Some(kv) => Err(Error::Conflict {
                key: pkey,
                expected: revision,
                found: kv.mod_revision(),
            }),
        }
    }

    /// Puts `placement` at `pkey` in one transaction if every compare in `when` holds and,
    /// with `leader`, the leadership is still current. `Ok(Ok(revision))` when written;
    /// `Ok(Err(response))` when a compare failed (the response holds the `otherwise` gets, in
    /// order, for the caller to say which); [`Error::NotLeader`] when the leadership is gone.
    async fn put_placement_when(
        &self,
        pkey: &str,
        placement: &Placement,
        mut when: Vec<Compare>,
        mut otherwise: Vec<TxnOp>,
        leader: Option<(&[u8], i64)>,
    ) -> Result<std::result::Result<i64, etcd_client::TxnResponse>> {
        let leader_at = otherwise.len();
        if let Some((key, rev)) = leader {
            when.push(Compare::create_revision(key, CompareOp::Equal, rev));
            otherwise.push(TxnOp::get(key, None));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(pkey, encode(placement), None)])
            .or_else(otherwise);
        let resp = self.client.clone().txn(txn).await?;
        if resp.succeeded() {
            return Ok(Ok(revision_of(&resp)));
        }
        if let Some((key, rev)) = leader {
            let found = txn_get(&resp, leader_at)
                .first()
                .map(|kv| kv.create_revision());
            if found != Some(rev) {
                return Err(Error::NotLeader(format!(
                    "candidacy {} (revision {rev}) is gone",
                    String::from_utf8_lossy(key)
                )));
            }
        }
        Ok(Err(resp))
    }

    /// A guest's placement, if it has one.
    pub async fn get_placement(&self, guest: &str) -> Result<Option<Versioned<Placement>>> {
        match self.get(self.keys.placement(guest)?).await {
            Ok(p) => Ok(Some(p)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes a guest's placement if it is still at `revision` (the leader moving or stopping
    /// it).
    pub async fn unplace(&self, guest: &str, revision: i64) -> Result<()> {
        self.delete(self.keys.placement(guest)?, revision, None)
            .await
    }

    /// All placements, by guest.
    pub async fn list_placements(&self) -> Result<Vec<Versioned<Placement>>> {
        self.list(self.keys.placements()).await
    }

    /// The whole state (nodes, guests, placements, domains) in one transaction, so at one
    /// revision.
    pub async fn state(&self) -> Result<ClusterState> {
        let p = || Some(GetOptions::new().with_prefix());
        let txn = Txn::new().and_then([
            TxnOp::get(self.keys.nodes(), p()),
            TxnOp::get(self.keys.guests(), p()),
            TxnOp::get(self.keys.placements(), p()),
            TxnOp::get(self.keys.domains(), p()),
        ]);
        let resp = self.client.clone().txn(txn).await?;
        let mut gets = txn_gets(&resp).into_iter();
        let mut next = || gets.next().unwrap_or_default();
        let nodes = next()
            .iter()
            .map(|kv| decode(&key_of(kv), kv.value()))
            .collect::<Result<_>>()?;
        Ok(ClusterState {
            revision: revision_of(&resp),
            nodes,
            guests: next().iter().map(versioned).collect::<Result<_>>()?,
            placements: next().iter().map(versioned).collect::<Result<_>>()?,
            domains: next().iter().map(versioned).collect::<Result<_>>()?,
        })
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}
