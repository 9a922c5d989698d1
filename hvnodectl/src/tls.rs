//! hvnodectl's TLS configurations, built from the state directory's [`Identity`] types: the
//! client that pins a node certificate, and the server of `hvnodectl serve`. The verifiers
//! themselves are the ones the agent shares, from `hvnode_tls`.

use std::sync::Arc;

use hvnode_tls::{AnyClientCert, PinnedServerVerifier};

use crate::state::Identity;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("Cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// A client configuration pinning the node certificate, presenting `identity` if given.
pub fn client_config(
    verifier: Arc<PinnedServerVerifier>,
    identity: Option<Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    hvnode_tls::pinned_client_config(verifier, identity.map(|id| (id.chain, id.key)))
        .map_err(TlsError::Config)
}

/// The server configuration of `hvnodectl serve`: it asks nodes for their certificates without
/// requiring one, because the join request handler compares the certificate presented with the
/// one in the request body.
pub fn server_config(identity: Identity) -> Result<rustls::ServerConfig, TlsError> {
    rustls::ServerConfig::builder_with_provider(hvnode_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(AnyClientCert::default()))
        .with_single_cert(identity.chain, identity.key)
        .map_err(TlsError::Config)
}
