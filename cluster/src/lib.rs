//! A cluster of hvnode nodes on etcd (v3 API): the key layout ([`keys`]), the records
//! ([`model`]), membership under a lease ([`membership`]), the leader election ([`election`]),
//! the placement decision ([`placement`]) and the revision-checked store ([`store`]).
//! See docs/cluster.md.
#![forbid(unsafe_code)]

pub mod election;
pub mod error;
pub mod keys;
pub mod local_etcd;
pub mod membership;
pub mod model;
pub mod placement;
pub mod store;

use std::time::Duration;

pub use error::{Error, Result};
pub use etcd_client::Client;

/// How long a request waits for etcd before it is [`Error::Unreachable`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to etcd at `endpoints` (host:port or URLs), with a connect and request timeout so
/// an unreachable etcd is an error, not a hang.
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    Ok(Client::connect(endpoints, Some(opts)).await?)
}
