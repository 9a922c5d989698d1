//! HTTPS client of the node agent: pins the node certificate, presents the manager's
//! client certificate, applies timeouts, and turns failures into messages that say
//! what to do.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hvnode_api::error::{ApiError, ErrorCode};
use hvnode_tls::PinnedServerVerifier;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::state::Identity;
use crate::tls;

/// Connecting (TCP and TLS handshake) gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole request (sending and reading the answer) gives up after this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Port of the agent API when the URL names none.
pub const DEFAULT_PORT: u16 = 8443;

/// Request bodies: in memory or streamed.
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `https://HOST[:PORT]`.
    #[error("Invalid node URL {0:?}: expected https://HOST:PORT")]
    Url(String),
    /// TCP connect or TLS handshake failed for a reason other than the certificate.
    #[error("cannot reach node {node} at {url}: {reason}")]
    Unreachable {
        /// Node name.
        node: String,
        /// Node URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The node presented another certificate than the pinned one.
    #[error("node certificate fingerprint is {actual}, expected {expected}: the node was reinstalled or this is not the node you registered; re-register")]
    FingerprintMismatch {
        /// What the node presented.
        actual: String,
        /// What nodes.toml pins.
        expected: String,
    },
    /// The node rejects the client certificate: it was unregistered or re-registered
    /// with another manager.
    #[error("node {node} no longer trusts this manager: re-register it")]
    Untrusted {
        /// Node name.
        node: String,
    },
    /// The node refused the pairing code.
    #[error(
        "{message} ({code}): read the current pairing code on the node's console and try again"
    )]
    Pairing {
        /// `wrong_pairing_code` or `pairing_locked`.
        code: ErrorCode,
        /// The agent's message.
        message: String,
    },
    /// The agent answered with an error body.
    #[error("{message} ({code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code.
        code: ErrorCode,
        /// The agent's message.
        message: String,
    },
    /// The agent answered with an unexpected status and no error body.
    #[error("node {node} answered HTTP {status}: {body}")]
    Status {
        /// Node name.
        node: String,
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
    /// The answer could not be decoded.
    #[error("node {node} sent an answer this hvnodectl cannot read ({what}): is the node running the same hvnode version?")]
    Decode {
        /// Node name.
        node: String,
        /// What failed.
        what: String,
    },
    /// The request did not finish in time.
    #[error("node {node} did not answer within {secs} s; check the node's console")]
    Timeout {
        /// Node name.
        node: String,
        /// The timeout.
        secs: u64,
    },
    /// The agent answered an upgrade request without switching protocols.
    #[error("node {node} answered HTTP {status} instead of switching to {protocol}: is the node running the same hvnode version?")]
    UpgradeRefused {
        /// Node name.
        node: String,
        /// HTTP status.
        status: u16,
        /// The protocol asked for.
        protocol: String,
    },
    /// The HTTP exchange broke off.
    #[error("request to node {node} failed")]
    Http {
        /// Node name.
        node: String,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Parses `https://HOST[:PORT]` into host (IPv6 without brackets), port and authority.
pub fn parse_url(url: &str) -> Result<(String, u16, String), ClientError> {
    let bad = || ClientError::Url(url.to_owned());
    let uri: Uri = url.trim_end_matches('/').parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let authority = if bare.contains(':') {
        format!("[{bare}]:{port}")
    } else {
        format!("{bare}:{port}")
    };
    Ok((bare, port, authority))
}

/// Maps a non-2xx answer to an error. `registered`: the request carried the client
/// certificate of a registered manager, so trust errors mean the node dropped us.
pub fn error_from_answer(
    node: &str,
    registered: bool,
    status: StatusCode,
    body: &[u8],
) -> ClientError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(api) => {
            let trust_status =
                status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
            let distrusted = matches!(
                api.code,
                ErrorCode::UntrustedClientCertificate | ErrorCode::NotRegistered
            );
            if registered && trust_status && distrusted {
                ClientError::Untrusted {
                    node: node.to_owned(),
                }
            } else if matches!(
                api.code,
                ErrorCode::WrongPairingCode | ErrorCode::PairingLocked
            ) {
                ClientError::Pairing {
                    code: api.code,
                    message: api.message,
                }
            } else {
                ClientError::Api {
                    status: status.as_u16(),
                    code: api.code,
                    message: api.message,
                }
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned();
            ClientError::Status {
                node: node.to_owned(),
                status: status.as_u16(),
                body: text,
            }
        }
    }
}

/// Finds a rustls error in an error's source chain (tokio-rustls wraps them in io errors).
fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(r);
            }
        }
        cur = e.source();
    }
    None
}

/// Whether a TLS failure is the server refusing our client certificate.
fn is_client_cert_rejection(err: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        err,
        rustls::Error::AlertReceived(
            A::BadCertificate
                | A::UnknownCA
                | A::CertificateRequired
                | A::AccessDenied
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::DecryptError
        )
    )
}

/// A client of one node.
#[derive(Debug, Clone)]
pub struct NodeClient {
    node: String,
    url: String,
    host: String,
    port: u16,
    authority: String,
    verifier: Arc<PinnedServerVerifier>,
    config: Arc<rustls::ClientConfig>,
    registered: bool,
    /// How long one request may take; [`REQUEST_TIMEOUT`] unless a command that waits for
    /// long work (a snapshot writes a guest's whole memory) sets more.
    request_timeout: Duration,
}

impl NodeClient {
    /// A client of node `node` at `url`. `fingerprint`: the pinned node certificate
    /// (`None` accepts any once, to show it). `identity`: the client certificate, given
    /// once the manager is registered.
    pub fn new(
        node: &str,
        url: &str,
        fingerprint: Option<String>,
        identity: Option<Identity>,
    ) -> Result<Self, ClientError> {
        let (host, port, authority) = parse_url(url)?;
        let verifier = Arc::new(PinnedServerVerifier::new(fingerprint));
        let registered = identity.is_some();
        let config = tls::client_config(verifier.clone(), identity)?;
        Ok(Self {
            node: node.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            host,
            port,
            authority,
            verifier,
            config: Arc::new(config),
            registered,
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    /// The same client with requests allowed `timeout`.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fingerprint of the certificate the node presented last.
    pub fn seen_fingerprint(&self) -> Option<String> {
        self.verifier.seen()
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> ClientError {
        ClientError::Unreachable {
            node: self.node.clone(),
            url: self.url.clone(),
            reason: reason.to_string(),
        }
    }

    fn tls_failure(&self, err: &(dyn std::error::Error + 'static)) -> Option<ClientError> {
        let rustls_err = rustls_error(err)?;
        if let (Some(expected), Some(actual)) = (self.verifier.expected(), self.verifier.seen()) {
            if expected != actual {
                return Some(ClientError::FingerprintMismatch {
                    actual,
                    expected: expected.to_owned(),
                });
            }
        }
        if self.registered && is_client_cert_rejection(rustls_err) {
            return Some(ClientError::Untrusted {
                node: self.node.clone(),
            });
        }
        None
    }

    /// Opens a new connection (TCP + TLS + HTTP/1.1 handshake).
    pub async fn connect(&self) -> Result<SendRequest<ReqBody>, ClientError> {
        let fut = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| self.unreachable(e))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(self.host.clone())
                .map_err(|_| ClientError::Url(self.url.clone()))?;
            let tls = TlsConnector::from(self.config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    self.tls_failure(&e)
                        .unwrap_or_else(|| self.unreachable(format!("TLS handshake failed: {e}")))
                })?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| self.unreachable(e))?;
            // With upgrades: the console attach takes the connection over after its answer.
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Ok(sender)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| {
                self.unreachable(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()))
            })?
    }

    /// Builds a request for `path` on this node.
    pub fn request(&self, method: Method, path: &str, body: ReqBody) -> Request<ReqBody> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
        if let Ok(host) = self.authority.parse() {
            req.headers_mut().insert(hyper::header::HOST, host);
        }
        req
    }

    /// Sends a request on a new connection; non-2xx answers become errors. The answer
    /// body is left to the caller (streams have no overall timeout).
    pub async fn send(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, ClientError> {
        let mut sender = self.connect().await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.map_hyper(e))?;
        // 101 only answers an upgrade request, which asked for it.
        if resp.status().is_success() || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.map_hyper(e))?
            .to_bytes();
        Err(error_from_answer(
            &self.node,
            self.registered,
            status,
            &body,
        ))
    }

    fn map_hyper(&self, e: hyper::Error) -> ClientError {
        if let Some(mapped) = self.tls_failure(&e) {
            return mapped;
        }
        ClientError::Http {
            node: self.node.clone(),
            source: e,
        }
    }

    /// Sends a request with an in-memory body and returns the whole answer, within
    /// [`REQUEST_TIMEOUT`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &str,
    ) -> Result<Bytes, ClientError> {
        let has_body = body.is_some();
        let full: ReqBody = Full::new(Bytes::from(body.unwrap_or_default()))
            .map_err(|never| match never {})
            .boxed();
        let mut req = self.request(method, path, full);
        if has_body {
            if let Ok(v) = content_type.parse() {
                req.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
        }
        let fut = async {
            let resp = self.send(req).await?;
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.map_hyper(e))?
                .to_bytes();
            Ok(bytes)
        };
        self.within_request_timeout(fut).await
    }

    /// `fut`'s result, or a timeout error naming this node after the request timeout.
    async fn within_request_timeout<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(self.request_timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout {
                node: self.node.clone(),
                secs: self.request_timeout.as_secs(),
            })?
    }

    /// `GET path` as an HTTP/1.1 upgrade to `protocol`; after `101 Switching Protocols` the
    /// connection is the caller's, both ways. Error answers become errors as for [`Self::send`].
    pub async fn upgrade(
        &self,
        path: &str,
        protocol: &'static str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let empty: ReqBody = Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed();
        let mut req = self.request(Method::GET, path, empty);
        let h = req.headers_mut();
        h.insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        h.insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static(protocol),
        );
        let fut = async {
            let resp = self.send(req).await?;
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                return Err(ClientError::UpgradeRefused {
                    node: self.node.clone(),
                    status: resp.status().as_u16(),
                    protocol: protocol.to_owned(),
                });
            }
            hyper::upgrade::on(resp)
                .await
                .map(TokioIo::new)
                .map_err(|e| self.map_hyper(e))
        };
        self.within_request_timeout(fut).await
    }

    /// `GET path` and decode the JSON answer. Also returns the raw answer for `--json`.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(T, Bytes), ClientError> {
        let raw = self.call(Method::GET, path, None, "").await?;
        Ok((self.decode(&raw)?, raw))
    }

    /// Sends `body` as JSON and decodes the JSON answer.
    pub async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(T, Bytes), ClientError> {
        let raw = self.send_json_raw(method, path, body).await?;
        Ok((self.decode(&raw)?, raw))
    }

    /// Sends `body` as JSON and returns the raw answer (which may be empty).
    pub async fn send_json_raw<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Bytes, ClientError> {
        let bytes = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| ClientError::Decode {
                node: self.node.clone(),
                what: e.to_string(),
            })?),
            None => None,
        };
        self.call(method, path, bytes, "application/json").await
    }

    /// Decodes a JSON answer.
    pub fn decode<T: DeserializeOwned>(&self, raw: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(raw).map_err(|e| ClientError::Decode {
            node: self.node.clone(),
            what: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_with_default_port_and_ipv6() {
        assert_eq!(
            parse_url("https://192.0.2.1:9000").unwrap(),
            ("192.0.2.1".into(), 9000, "192.0.2.1:9000".into())
        );
        assert_eq!(
            parse_url("https://node.example/").unwrap(),
            ("node.example".into(), 8443, "node.example:8443".into())
        );
        assert_eq!(
            parse_url("https://[2001:db8::1]:8443").unwrap(),
            ("2001:db8::1".into(), 8443, "[2001:db8::1]:8443".into())
        );
        assert!(parse_url("http://node:8443").is_err());
        assert!(parse_url("https://node:8443/v1").is_err());
        assert!(parse_url("node:8443").is_err());
    }

    fn body(code: ErrorCode, message: &str) -> Vec<u8> {
        serde_json::to_vec(&ApiError::new(code, message)).unwrap()
    }

    #[test]
    fn maps_api_errors_to_message_and_code() {
        let err = error_from_answer(
            "n1",
            true,
            StatusCode::CONFLICT,
            &body(
                ErrorCode::GuestRunning,
                "Guest web is running: stop it first",
            ),
        );
        assert_eq!(
            err.to_string(),
            "Guest web is running: stop it first (guest_running)"
        );
    }

    #[test]
    fn maps_trust_errors_after_registration_to_reregister_hint() {
        for (status, code) in [
            (
                StatusCode::UNAUTHORIZED,
                ErrorCode::UntrustedClientCertificate,
            ),
            (StatusCode::FORBIDDEN, ErrorCode::NotRegistered),
        ] {
            let err = error_from_answer("n1", true, status, &body(code, "x"));
            assert_eq!(
                err.to_string(),
                "node n1 no longer trusts this manager: re-register it"
            );
        }
        // Before registration the same code is just the agent's message.
        let err = error_from_answer(
            "n1",
            false,
            StatusCode::FORBIDDEN,
            &body(ErrorCode::NotRegistered, "Not registered"),
        );
        assert_eq!(err.to_string(), "Not registered (not_registered)");
    }

    #[test]
    fn maps_wrong_pairing_code_to_console_hint() {
        let err = error_from_answer(
            "n1",
            false,
            StatusCode::FORBIDDEN,
            &body(ErrorCode::WrongPairingCode, "Wrong pairing code"),
        );
        assert!(matches!(err, ClientError::Pairing { .. }));
        assert!(err
            .to_string()
            .starts_with("Wrong pairing code (wrong_pairing_code)"));
    }

    #[test]
    fn maps_non_json_answers_to_status_errors() {
        let err = error_from_answer("n1", true, StatusCode::BAD_GATEWAY, b"oops");
        assert_eq!(err.to_string(), "node n1 answered HTTP 502: oops");
    }
}
