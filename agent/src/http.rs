//! HTTP plumbing: serving a connection (TLS or the local socket, upgrades included), reading a
//! request body within its limits, and building responses.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hvnode_api::error::{ApiError, ErrorCode};
use hvnode_api::routes::Route;
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;
use crate::{Agent, Origin};

/// Largest JSON body accepted.
pub const BODY_LIMIT: usize = 1 << 20;

/// Every response body: whole (JSON, text) or streamed (events).
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
/// A response.
pub type Resp = Response<Body>;

/// A JSON response.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_default();
    typed(status, Bytes::from(body), "application/json")
}

/// A response with a body of the given type.
pub fn typed(status: StatusCode, body: Bytes, content_type: &'static str) -> Resp {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// A plain-text response.
pub fn text_response(status: StatusCode, text: String, content_type: &'static str) -> Resp {
    typed(status, Bytes::from(text), content_type)
}

/// `204 No Content`.
pub fn no_content() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// Whether a request asks for an HTTP/1.1 upgrade to `protocol` (`Connection: upgrade` and
/// `Upgrade: <protocol>`, each among comma-separated tokens, any case).
pub fn wants_upgrade<B>(req: &Request<B>, protocol: &str) -> bool {
    let has_token = |header, token: &str| {
        req.headers()
            .get_all(header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(hyper::header::CONNECTION, "upgrade") && has_token(hyper::header::UPGRADE, protocol)
}

/// `101 Switching Protocols` to `protocol`.
pub fn upgrade_response(protocol: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static(protocol),
    );
    r
}

impl Error {
    /// The response: the code's status and the JSON error body (with `Allow` for a 405).
    pub fn into_response(self, route: Option<&Route>) -> Resp {
        let status = self.status();
        let mut r = json_response(status, &ApiError::new(self.code, self.message));
        if self.code == ErrorCode::MethodNotAllowed {
            if let Some(route) = route {
                if let Ok(v) = hyper::header::HeaderValue::from_str(&route.methods().join(", ")) {
                    r.headers_mut().insert(hyper::header::ALLOW, v);
                }
            }
        }
        r
    }
}

/// A query parameter that must be a whole number from 0 to `max` when given: 400
/// `invalid_query` for anything else, as agent/openapi.yaml bounds it.
pub fn query_number(key: &str, value: Option<String>, max: u64) -> Result<Option<u64>, Error> {
    let Some(v) = value else { return Ok(None) };
    match v.parse::<u64>() {
        Ok(n) if n <= max => Ok(Some(n)),
        _ => Err(Error::new(
            ErrorCode::InvalidQuery,
            format!("{key}={v:?}: give a whole number from 0 to {max}"),
        )),
    }
}

/// Reads a whole JSON body (at most [`BODY_LIMIT`] bytes) as `T`.
pub async fn read_json<T, B>(req: Request<B>) -> Result<T, Error>
where
    T: DeserializeOwned,
    B: hyper::body::Body<Data = Bytes> + Send + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let is_json = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.starts_with("application/json"))
        .unwrap_or(false);
    let body = Limited::new(req.into_body(), BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Error::new(
                    ErrorCode::BodyTooLarge,
                    format!("The body exceeds {BODY_LIMIT} bytes"),
                )
            } else {
                Error::new(ErrorCode::BadBody, format!("Reading the body: {e}"))
            }
        })?
        .to_bytes();
    if !is_json {
        return Err(Error::new(
            ErrorCode::UnsupportedMediaType,
            "Send the body as JSON with Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| Error::new(ErrorCode::InvalidJson, format!("Invalid request body: {e}")))
}

impl Agent {
    /// Serves one HTTP/1.1 connection (TLS or the local socket) with the router, upgrades
    /// included: the console attach outlives its request on the same connection. Each request
    /// head must arrive within `head` of the connection's start or of the previous answer.
    pub async fn serve_connection<I>(self: Arc<Self>, io: I, origin: Origin, head: Duration)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |req| {
            let agent = Arc::clone(&self);
            async move { Ok::<_, std::convert::Infallible>(agent.handle(req, origin).await) }
        });
        // One buffer per response: headers and body go out in one TLS record and one write
        // instead of two.
        let _ = hyper::server::conn::http1::Builder::new()
            .writev(false)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(head)
            .serve_connection(hyper_util::rt::TokioIo::new(io), service)
            .with_upgrades()
            .await;
    }
}

/// Answers every request on a connection the agent will not serve with `refusal` (a 503 with
/// its reason) and closes it.
pub async fn refuse_connection<I>(io: I, refusal: Error)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
        let refusal = refusal.clone();
        async move { Ok::<_, std::convert::Infallible>(refusal.into_response(None)) }
    });
    let _ = tokio::time::timeout(
        REFUSAL_WAIT,
        hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(REFUSAL_WAIT)
            .serve_connection(hyper_util::rt::TokioIo::new(io), service),
    )
    .await;
}

/// How long a refused connection is kept to tell it so.
const REFUSAL_WAIT: Duration = Duration::from_secs(5);
