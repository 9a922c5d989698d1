//! The leader election, with etcd's election API under the name `<prefix>leader`. A node
//! campaigns under its membership lease, so leadership ends with membership.

use etcd_client::{Client, LeaderKey, ResignOptions};

use crate::error::{Error, Result};
use crate::keys::Keys;

/// The cluster's election.
#[derive(Clone)]
pub struct Election {
    client: Client,
    name: String,
}

/// Being the leader: hand it to [`Election::resign`] to step down.
#[derive(Debug, Clone)]
pub struct Leadership {
    key: LeaderKey,
    value: String,
}

impl Leadership {
    /// The value proclaimed (the node id).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// etcd's key of this candidacy (under `<prefix>leader/`) and its creation revision: a
    /// leader's write compares them so that it fails once the leadership is over.
    pub fn key(&self) -> (&[u8], i64) {
        (self.key.key(), self.key.rev())
    }
}

/// A stream of leader changes.
#[derive(Debug)]
pub struct Observer {
    stream: etcd_client::ObserveStream,
}

impl Observer {
    /// The next leader (its value, the node id); `None` when the stream ends.
    pub async fn next(&mut self) -> Result<Option<String>> {
        loop {
            match self.stream.message().await? {
                None => return Ok(None),
                Some(r) => {
                    if let Some(kv) = r.kv() {
                        return Ok(Some(String::from_utf8_lossy(kv.value()).into_owned()));
                    }
                }
            }
        }
    }
}

impl Election {
    /// The election of the cluster under `keys`.
    pub fn new(client: &Client, keys: &Keys) -> Self {
        Election {
            client: client.clone(),
            name: keys.election(),
        }
    }

    /// Campaigns as `node_id` under `lease` (the membership lease): returns once this node
    /// leads (waits while another does, for as long as it takes: the client's request timeout
    /// ends a waiting campaign call, which is then made again; etcd keeps one candidacy per
    /// lease, so a repeated call waits in the same place). An error other than a timeout or an
    /// unreachable etcd (a lease gone, for one) ends the campaign.
    pub async fn campaign(&self, lease: i64, node_id: &str) -> Result<Leadership> {
        let mut c = self.client.clone();
        let resp = loop {
            match c.campaign(self.name.clone(), node_id, lease).await {
                Ok(r) => break r,
                Err(e) => match Error::from(e) {
                    Error::Unreachable(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    other => return Err(other),
                },
            }
        };
        let key = resp
            .leader()
            .cloned()
            .ok_or_else(|| Error::Etcd("campaign answered without a leader key".into()))?;
        Ok(Leadership {
            key,
            value: node_id.to_string(),
        })
    }

    /// The current leader's value (node id), `None` without a leader.
    pub async fn leader(&self) -> Result<Option<String>> {
        let mut c = self.client.clone();
        match c.leader(self.name.clone()).await {
            Ok(r) => Ok(r
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            Err(e) => match Error::from(e) {
                Error::Etcd(m) if m.contains("no leader") => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Follows the leader: the current one first, then each change.
    pub async fn observe(&self) -> Result<Observer> {
        let mut c = self.client.clone();
        Ok(Observer {
            stream: c.observe(self.name.clone()).await?,
        })
    }

    /// Steps down (the next campaigner leads).
    pub async fn resign(&self, leadership: Leadership) -> Result<()> {
        let mut c = self.client.clone();
        c.resign(Some(ResignOptions::new().with_leader(leadership.key)))
            .await?;
        Ok(())
    }
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}
