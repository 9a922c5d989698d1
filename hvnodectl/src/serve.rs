//! `hvnodectl serve`: the manager endpoint of node-initiated registration
//! (docs/api.md, "Manager side"). Requests are routed on [`ManagerRoute`] and refused with an
//! [`ErrorCode`], whose HTTP status is the answer's.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hvnode_api::error::{ApiError, ErrorCode};
use hvnode_api::fingerprint;
use hvnode_api::registration::{JoinState, ManagerHello, NodeJoinRequest, NodeJoinStatus};
use hvnode_api::routes::ManagerRoute;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::state::{self, JoinRecord, StateDir};
use crate::tls;

/// Largest join request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("Cannot listen on {0}: is another process using the port?")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Signal handlers could not be installed.
    #[error("Cannot install signal handlers")]
    Signal(#[source] std::io::Error),
}

/// What a request handler knows about its connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Source address.
    pub ip: IpAddr,
    /// Fingerprint of the client certificate, if one was presented.
    pub cert_fingerprint: Option<String>,
}

/// Handles one request. Pure over the state directory so tests need no socket.
pub fn handle(
    state: &StateDir,
    peer: &Peer,
    method: &Method,
    path: &str,
    body: &[u8],
) -> (StatusCode, Vec<u8>) {
    match route(state, peer, method, path, body) {
        Ok((status, body)) => (status, body),
        Err(err) => (status_of(err.code), error_body(&err)),
    }
}

fn status_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn error_body(err: &ApiError) -> Vec<u8> {
    serde_json::to_vec(err).unwrap_or_default()
}

fn json<T: serde::Serialize>(
    status: StatusCode,
    value: &T,
) -> Result<(StatusCode, Vec<u8>), ApiError> {
    serde_json::to_vec(value)
        .map(|b| (status, b))
        .map_err(|e| internal(e.to_string()))
}

fn internal(message: String) -> ApiError {
    ApiError::new(ErrorCode::InternalError, message)
}

fn route(
    state: &StateDir,
    peer: &Peer,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Result<(StatusCode, Vec<u8>), ApiError> {
    let path = path.split('?').next().unwrap_or(path);
    let Some(route) = ManagerRoute::parse(path) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("No route {path} on this manager"),
        ));
    };
    match (method, route) {
        (&Method::GET, ManagerRoute::Hello) => {
            let info = state.manager().map_err(|e| internal(e.to_string()))?;
            let ca_pem = state.ca_pem().map_err(|e| internal(e.to_string()))?;
            json(
                StatusCode::OK,
                &ManagerHello {
                    name: info.name,
                    ca_pem,
                },
            )
        }
        (&Method::POST, ManagerRoute::Nodes) => join(state, peer, body),
        (&Method::GET, ManagerRoute::Node(raw)) => {
            let fp = fingerprint::normalize(&raw)
                .map_err(|e| ApiError::new(ErrorCode::InvalidFingerprint, e.to_string()))?;
            match state
                .join_request(&fp)
                .map_err(|e| internal(e.to_string()))?
            {
                Some(record) => json(
                    StatusCode::OK,
                    &NodeJoinStatus {
                        state: record.state,
                    },
                ),
                None => Err(ApiError::new(
                    ErrorCode::JoinRequestNotFound,
                    format!("No join request with fingerprint {fp}: send one with POST /v1/nodes"),
                )),
            }
        }
        _ => Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not allowed on {path}"),
        )),
    }
}

fn join(state: &StateDir, peer: &Peer, body: &[u8]) -> Result<(StatusCode, Vec<u8>), ApiError> {
    let invalid = |message: String| ApiError::new(ErrorCode::InvalidJoinRequest, message);
    let req: NodeJoinRequest =
        serde_json::from_slice(body).map_err(|e| invalid(format!("Invalid join request: {e}")))?;
    let Some(presented) = &peer.cert_fingerprint else {
        return Err(ApiError::new(
            ErrorCode::ClientCertificateRequired,
            "A join request must be sent with the node certificate as TLS client certificate",
        ));
    };
    let der = CertificateDer::from_pem_slice(req.node_cert_pem.as_bytes())
        .map_err(|_| invalid("node_cert_pem is not a PEM certificate".to_owned()))?;
    let claimed = fingerprint::of_der(&der);
    if claimed != *presented {
        return Err(ApiError::new(
            ErrorCode::CertificateMismatch,
            format!("The TLS client certificate ({presented}) is not node_cert_pem ({claimed}): send the node's own certificate"),
        ));
    }
    let hostname = req.hostname.trim();
    if hostname.is_empty()
        || hostname.len() > 253
        || hostname
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid(format!("Invalid hostname {:?}", req.hostname)));
    }
    if req.api_port == 0 {
        return Err(invalid("api_port must not be 0".to_owned()));
    }
    let existing = state
        .join_request(&claimed)
        .map_err(|e| internal(e.to_string()))?;
    let record = match existing {
        // A node re-sending its request after approval or rejection gets the decision.
        Some(r) if r.state != JoinState::Pending => r,
        _ => {
            let record = JoinRecord {
                hostname: hostname.to_owned(),
                fingerprint: claimed.clone(),
                node_cert_pem: req.node_cert_pem.clone(),
                source_ip: peer.ip.to_canonical().to_string(),
                api_port: req.api_port,
                received_at: state::now(),
                state: JoinState::Pending,
                node_name: None,
            };
            state
                .save_join_request(&record)
                .map_err(|e| internal(e.to_string()))?;
            println!(
                "join request from {} at {} (fingerprint {}): approve with `hvnodectl approve {} --name <node-name>`",
                record.hostname, record.source_ip, record.fingerprint, record.hostname
            );
            record
        }
    };
    json(
        StatusCode::ACCEPTED,
        &NodeJoinStatus {
            state: record.state,
        },
    )
}

async fn serve_request(
    state: Arc<StateDir>,
    peer: Arc<Peer>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let err = ApiError::new(
                ErrorCode::BodyTooLarge,
                format!("Request bodies are limited to {MAX_BODY} bytes"),
            );
            return Ok(response(status_of(err.code), error_body(&err)));
        }
    };
    let (status, out) = handle(&state, &peer, &method, &path, &body);
    eprintln!("{} {method} {path} -> {}", peer.ip, status.as_u16());
    Ok(response(status, out))
}

fn response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Binds `listen` and serves until SIGINT or SIGTERM.
pub async fn run(state: StateDir, listen: SocketAddr) -> Result<(), ServeError> {
    let identity = state.server_identity()?;
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(identity)?));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| ServeError::Bind(listen, e))?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError::Bind(listen, e))?;
    let info = state.manager()?;
    eprintln!(
        "serving manager {:?} on https://{local} (CA fingerprint {})",
        info.name,
        state.ca_fingerprint()?
    );
    let state = Arc::new(state);
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    eprintln!("{addr}: TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    eprintln!("{addr}: TLS handshake timed out");
                    return;
                }
            };
            let cert_fingerprint = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| fingerprint::of_der(c));
            let peer = Arc::new(Peer {
                ip: addr.ip(),
                cert_fingerprint,
            });
            let service = hyper::service::service_fn(move |req| {
                serve_request(state.clone(), peer.clone(), req)
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                eprintln!("{addr}: connection error: {e}");
            }
        });
    }
    eprintln!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn state(tag: &str) -> StateDir {
        let dir =
            std::env::temp_dir().join(format!("hvnodectl-serve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = StateDir::new(dir);
        s.init("mgr", &[]).unwrap();
        s
    }

    fn node_cert() -> (String, String) {
        let ca = pki::new_ca("node").unwrap();
        let fp =
            fingerprint::of_der(&CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap());
        (ca.cert_pem, fp)
    }

    fn join_body(pem: &str) -> Vec<u8> {
        serde_json::to_vec(&NodeJoinRequest {
            hostname: "hv1".into(),
            node_cert_pem: pem.into(),
            api_port: 8443,
        })
        .unwrap()
    }

    #[test]
    fn hello_returns_name_and_ca() {
        let s = state("hello");
        let peer = Peer {
            ip: "127.0.0.1".parse().unwrap(),
            cert_fingerprint: None,
        };
        let (status, body) = handle(&s, &peer, &Method::GET, &ManagerRoute::Hello.path(), b"");
        assert_eq!(status, StatusCode::OK);
        let hello: ManagerHello = serde_json::from_slice(&body).unwrap();
        assert_eq!(hello.name, "mgr");
        assert_eq!(hello.ca_pem, s.ca_pem().unwrap());
        std::fs::remove_dir_all(s.root()).unwrap();
    }

    #[test]
    fn join_request_is_stored_pending_and_status_follows_the_file() {
        let s = state("join");
        let (pem, fp) = node_cert();
        let peer = Peer {
            ip: "::ffff:192.0.2.7".parse().unwrap(),
            cert_fingerprint: Some(fp.clone()),
        };
        let (status, body) = handle(
            &s,
            &peer,
            &Method::POST,
            &ManagerRoute::Nodes.path(),
            &join_body(&pem),
        );
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let st: NodeJoinStatus = serde_json::from_slice(&body).unwrap();
        assert_eq!(st.state, JoinState::Pending);
        let mut rec = s.join_request(&fp).unwrap().unwrap();
        assert_eq!(rec.source_ip, "192.0.2.7");
        assert_eq!(rec.default_url(), "https://192.0.2.7:8443");

        rec.state = JoinState::Approved;
        s.save_join_request(&rec).unwrap();
        let path = ManagerRoute::Node(fp.clone()).path();
        let (status, body) = handle(&s, &peer, &Method::GET, &path, b"");
        assert_eq!(status, StatusCode::OK);
        let st: NodeJoinStatus = serde_json::from_slice(&body).unwrap();
        assert_eq!(st.state, JoinState::Approved);
        std::fs::remove_dir_all(s.root()).unwrap();
    }

    #[test]
    fn join_request_with_another_client_certificate_is_refused() {
        let s = state("mismatch");
        let (pem, _) = node_cert();
        let (_, other_fp) = node_cert();
        let peer = Peer {
            ip: "127.0.0.1".parse().unwrap(),
            cert_fingerprint: Some(other_fp),
        };
        let (status, body) = handle(
            &s,
            &peer,
            &Method::POST,
            &ManagerRoute::Nodes.path(),
            &join_body(&pem),
        );
        assert_eq!(status, StatusCode::FORBIDDEN);
        let err: ApiError = serde_json::from_slice(&body).unwrap();
        assert_eq!(err.code, ErrorCode::CertificateMismatch);

        let anonymous = Peer {
            ip: "127.0.0.1".parse().unwrap(),
            cert_fingerprint: None,
        };
        let (status, _) = handle(
            &s,
            &anonymous,
            &Method::POST,
            &ManagerRoute::Nodes.path(),
            &join_body(&pem),
        );
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(s.join_requests().unwrap().is_empty());
        std::fs::remove_dir_all(s.root()).unwrap();
    }

    #[test]
    fn unknown_fingerprint_and_route_are_not_found() {
        let s = state("404");
        let peer = Peer {
            ip: "127.0.0.1".parse().unwrap(),
            cert_fingerprint: None,
        };
        let path = ManagerRoute::Node(fingerprint::of_der(b"z")).path();
        assert_eq!(
            handle(&s, &peer, &Method::GET, &path, b"").0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            handle(&s, &peer, &Method::GET, "/v1/x", b"").0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            handle(&s, &peer, &Method::GET, "/v1/nodes/xyz", b"").0,
            StatusCode::BAD_REQUEST
        );
        std::fs::remove_dir_all(s.root()).unwrap();
    }

    #[test]
    fn wrong_method_on_a_manager_route_is_method_not_allowed() {
        let s = state("405");
        let peer = Peer {
            ip: "127.0.0.1".parse().unwrap(),
            cert_fingerprint: None,
        };
        for (method, route) in [
            (Method::POST, ManagerRoute::Hello),
            (Method::GET, ManagerRoute::Nodes),
            (
                Method::DELETE,
                ManagerRoute::Node(fingerprint::of_der(b"z")),
            ),
        ] {
            let (status, body) = handle(&s, &peer, &method, &route.path(), b"");
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {route:?}");
            let err: ApiError = serde_json::from_slice(&body).unwrap();
            assert_eq!(err.code, ErrorCode::MethodNotAllowed);
        }
        std::fs::remove_dir_all(s.root()).unwrap();
    }
}
