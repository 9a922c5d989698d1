//! A cluster of hvnode nodes on etcd (v3 API): the key layout ([`keys`]), the records
//! ([`model`]), membership under a lease ([`membership`]), the leader election ([`election`]),
//! the placement decision ([`placement`]) and the revision-checked store ([`store`]).
//! See docs/cluster.md.
#![forbid(unsafe_code)]

pub mod election;
pub mod error;
pub mod failover;
pub mod fencing;
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
    connect_with(endpoints, None).await
}

/// TLS to etcd (`https://` endpoints): the CA that signed etcd's server certificate, and the
/// client's own certificate and key, all PEM. In an hvnode cluster the CA is the manager's: it
/// signs etcd's server certificate (`hvnodectl cluster etcd-certificate`), the manager's client
/// certificate and each node's certificate, so etcd started with `--client-cert-auth
/// --trusted-ca-file <the manager's CA>` admits the manager and its nodes and nobody else.
#[derive(Clone)]
pub struct Tls {
    /// The CA etcd's server certificate must chain to.
    pub ca_pem: String,
    /// The client's certificate.
    pub cert_pem: String,
    /// The client's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

/// [`connect`], over TLS with a client certificate when `tls` is given.
pub async fn connect_with(endpoints: &[String], tls: Option<&Tls>) -> Result<Client> {
    let mut opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if let Some(t) = tls {
        opts = opts.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem))
                .identity(etcd_client::Identity::from_pem(&t.cert_pem, &t.key_pem)),
        );
    }
    Ok(Client::connect(endpoints, Some(opts)).await?)
}
