//! The node side of node-initiated registration: fetch the manager's CA for the admin to check,
//! send the join request over TLS verified against that CA, and poll for the decision.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::tls::Identity;

/// Errors talking to a manager.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The URL is not `https://host[:port]`.
    #[error("Invalid manager URL {0:?}: use https://HOST[:PORT]")]
    Url(String),
    /// Network or TLS failure.
    #[error("Cannot reach the manager at {0}: {1}")]
    Connect(String, String),
    /// The manager answered with an error status.
    #[error("The manager answered {0}: {1}")]
    Status(u16, String),
    /// The manager's answer was not what the protocol says.
    #[error("Unexpected answer from the manager: {0}")]
    Answer(String),
}

/// A parsed `https://host[:port]` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// Host name or address.
    pub host: String,
    /// Port (default 443).
    pub port: u16,
}

impl BaseUrl {
    /// Parses a manager base URL.
    pub fn parse(url: &str) -> Result<BaseUrl, ManagerError> {
        let bad = || ManagerError::Url(url.to_owned());
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return Err(bad());
        }
        let (host, port) = if let Some(h) = rest.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or_else(bad)?;
            (h.to_owned(), p.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (rest.to_owned(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => 443,
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(BaseUrl { host, port })
    }
}

fn first_contact_config() -> Result<ClientConfig, ManagerError> {
    // Any server certificate (its handshake signature still checked): only for the first fetch
    // of the manager's CA, whose fingerprint the admin then compares.
    hvnode_tls::pinned_client_config(Arc::new(hvnode_tls::PinnedServerVerifier::new(None)), None)
        .map_err(|e| ManagerError::Answer(e.to_string()))
}

/// A client config that trusts only `ca_pem` and presents the node certificate.
pub fn trusted_config(ca_pem: &str, id: &Identity) -> Result<ClientConfig, ManagerError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| ManagerError::Answer(format!("manager CA: {e}")))?;
        roots
            .add(c)
            .map_err(|e| ManagerError::Answer(format!("manager CA: {e}")))?;
    }
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| ManagerError::Answer(e.to_string()))?;
    ClientConfig::builder_with_provider(hvnode_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ManagerError::Answer(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![CertificateDer::from(id.cert_der.clone())], key)
        .map_err(|e| ManagerError::Answer(e.to_string()))
}

/// One HTTPS request to the manager; returns the status and body.
pub async fn request(
    base: &BaseUrl,
    config: ClientConfig,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), ManagerError> {
    let url = format!("https://{}:{}", base.host, base.port);
    let conn_err = |e: &dyn std::fmt::Display| ManagerError::Connect(url.clone(), e.to_string());
    let work = async {
        let tcp = tokio::net::TcpStream::connect((base.host.as_str(), base.port))
            .await
            .map_err(|e| conn_err(&e))?;
        let name = ServerName::try_from(base.host.clone()).map_err(|e| conn_err(&e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| conn_err(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| conn_err(&e))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", base.host, base.port));
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| conn_err(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| conn_err(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| conn_err(&e))?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(15), work)
        .await
        .map_err(|_| ManagerError::Connect(url.clone(), "timed out after 15 s".into()))?
}

/// Fetches `GET /v1/manager` without verifying the manager (first contact).
pub async fn fetch_hello(
    base: &BaseUrl,
) -> Result<hvnode_api::registration::ManagerHello, ManagerError> {
    let (status, body) = request(
        base,
        first_contact_config()?,
        Method::GET,
        "/v1/manager",
        None,
    )
    .await?;
    if status != 200 {
        return Err(ManagerError::Status(
            status,
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    serde_json::from_slice(&body).map_err(|e| ManagerError::Answer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_manager_urls() {
        assert_eq!(
            BaseUrl::parse("https://mgr.example:9443/").unwrap(),
            BaseUrl {
                host: "mgr.example".into(),
                port: 9443
            }
        );
        assert_eq!(BaseUrl::parse("https://10.0.0.1").unwrap().port, 443);
        assert_eq!(BaseUrl::parse("https://[::1]:9443").unwrap().host, "::1");
        for bad in [
            "http://x",
            "https://",
            "https://x:port",
            "https://u@x",
            "https://x/path",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
