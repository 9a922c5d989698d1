//! A small blocking HTTP/1.1 client for the agent's unix socket: one request per connection
//! (`Connection: close`), bounded by timeouts so the console never freezes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use hvnode_api::error::ErrorCode;
use hvnode_api::routes::method::GET;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is missing or refuses connections.
    #[error("Agent unreachable at {0}: {1}")]
    Unreachable(String, String),
    /// The agent answered with an error body.
    #[error("{message} ({code})")]
    Api {
        /// Stable code.
        code: ErrorCode,
        /// What to fix.
        message: String,
    },
    /// The answer could not be understood.
    #[error("Unexpected answer from the agent: {0}")]
    Protocol(String),
}

/// The agent's local API.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// A raw response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body bytes (de-chunked).
    pub body: Vec<u8>,
}

/// Largest answer read from the agent (the node log's 10,000 lines fit many times over): an agent
/// gone wrong cannot make the console allocate without bound.
pub const MAX_RESPONSE: u64 = 32 << 20;
/// Most headers an answer may carry.
const MAX_HEADERS: usize = 32;

/// Parses an HTTP/1.1 response read to the end of the connection: the head with `httparse`, the
/// body by `Content-Length`, by chunks, or to the end.
pub fn parse_response(raw: &[u8]) -> Result<Response, ClientError> {
    let bad = |m: &str| ClientError::Protocol(m.to_owned());
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut headers);
    let split = match head.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(bad("no end of headers")),
        Err(e) => return Err(ClientError::Protocol(format!("bad response head: {e}"))),
    };
    let status = head.code.ok_or_else(|| bad("no status line"))?;
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let length = header("content-length")
        .map(|v| v.parse::<usize>().map_err(|_| bad("bad Content-Length")))
        .transpose()?;
    let mut body = &raw[split..];
    if chunked {
        let mut out = Vec::new();
        loop {
            let (start, size) = match httparse::parse_chunk_size(body) {
                Ok(httparse::Status::Complete(c)) => c,
                Ok(httparse::Status::Partial) => return Err(bad("truncated chunk")),
                Err(_) => return Err(bad("bad chunk size")),
            };
            let size = usize::try_from(size).map_err(|_| bad("bad chunk size"))?;
            body = &body[start..];
            if size == 0 {
                break;
            }
            if body.len() < size.saturating_add(2) {
                return Err(bad("truncated chunk"));
            }
            if &body[size..size + 2] != b"\r\n" {
                return Err(bad("chunk without its CRLF"));
            }
            out.extend_from_slice(&body[..size]);
            body = &body[size + 2..];
        }
        return Ok(Response { status, body: out });
    }
    let body = match length {
        Some(n) if n <= body.len() => body[..n].to_vec(),
        Some(_) => return Err(bad("truncated body")),
        None => body.to_vec(),
    };
    Ok(Response { status, body })
}

impl Client {
    /// A client of the agent listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// Sends one request, waiting up to 5 s for the answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        self.request_within(method, path, body, Duration::from_secs(5))
    }

    /// Sends one request, waiting up to `timeout` for the answer.
    fn request_within(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let unreachable = |e: std::io::Error| {
            ClientError::Unreachable(self.socket.display().to_string(), e.to_string())
        };
        let mut s = UnixStream::connect(&self.socket).map_err(unreachable)?;
        s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(unreachable)?;
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        let mut wrote = s.write_all(req.as_bytes());
        if let (Ok(()), Some(b)) = (&wrote, body) {
            wrote = s.write_all(b);
        }
        let mut raw = Vec::new();
        let read = (&mut s).take(MAX_RESPONSE + 1).read_to_end(&mut raw);
        // An agent that answers before reading a whole request body (a 413, say) closes with
        // the rest unread: the kernel then fails the rest of our write (a broken pipe) or the
        // read after the answer (a reset). A complete error answer already there is the answer.
        let complete = parse_response(&raw).is_ok_and(|r| r.status >= 400);
        if let Err(e) = wrote {
            if !complete {
                return Err(unreachable(e));
            }
        }
        if !complete {
            read.map_err(|e| match e.kind() {
                // An agent that accepts and never answers is as unreachable as a missing one.
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    ClientError::Unreachable(
                        self.socket.display().to_string(),
                        format!("no answer within {} s", timeout.as_secs()),
                    )
                }
                _ => unreachable(e),
            })?;
        }
        if raw.len() as u64 > MAX_RESPONSE {
            return Err(ClientError::Protocol(format!(
                "the answer is larger than {MAX_RESPONSE} bytes"
            )));
        }
        let resp = parse_response(&raw)?;
        if resp.status >= 400 {
            return Err(
                match serde_json::from_slice::<hvnode_api::error::ApiError>(&resp.body) {
                    Ok(e) => ClientError::Api {
                        code: e.code,
                        message: e.message,
                    },
                    Err(_) => ClientError::Protocol(format!("HTTP {}", resp.status)),
                },
            );
        }
        Ok(resp)
    }

    /// GET a JSON document.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self.request(GET, path, None)?;
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// GET plain text.
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        Ok(String::from_utf8_lossy(&self.request(GET, path, None)?.body).into_owned())
    }

    /// Sends a JSON body (or none) and parses the JSON answer, waiting up to `timeout`: a
    /// change init applies (bonds, VLANs, a bridge) can take longer than a read.
    pub fn call<T: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&T>,
        timeout: Duration,
    ) -> Result<R, ClientError> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let r = self.request_within(method, path, bytes.as_deref(), timeout)?;
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Sends a JSON body (or none) and ignores the answer's body.
    pub fn send<T: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&T>,
    ) -> Result<(), ClientError> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.request(method, path, bytes.as_deref()).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::{UnixListener, UnixStream};

    use hvnode_api::routes::method::PUT;
    use hvnode_api::routes::Route;

    use super::*;

    /// Reads one whole request, head and `Content-Length` body: a server that closes with part
    /// of the request unread makes the client's read fail with ECONNRESET instead of the answer.
    /// A fresh directory for a test's fake agent socket, and the socket's path in it.
    fn socket_dir(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("hvnode-console-{tag}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&path);
        (dir, path)
    }

    fn read_request(s: &mut UnixStream) -> (String, String) {
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        let body_start = loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended in its head");
            req.extend_from_slice(&buf[..n]);
            if let Some(p) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&req[..body_start]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.parse().unwrap());
        while req.len() < body_start + len {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended in its body");
            req.extend_from_slice(&buf[..n]);
        }
        let body = String::from_utf8_lossy(&req[body_start..]).into_owned();
        (head, body)
    }

    #[test]
    fn parses_content_length_and_chunked_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXX").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hi"[..]));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcde\r\n0\r\n\r\n"
        )
        .is_err());
    }

    #[test]
    fn reports_api_errors_and_a_missing_socket() {
        let (dir, path) = socket_dir("api");
        let c = Client::new(&path);
        assert!(matches!(
            c.get_text(&Route::Health.path()),
            Err(ClientError::Unreachable(..))
        ));
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            read_request(&mut s);
            let body = r#"{"code":"invalid_hostname","message":"Invalid hostname"}"#;
            write!(
                s,
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        match c.send(
            PUT,
            &Route::NodeHostname.path(),
            Some(&serde_json::json!({"hostname": "-x"})),
        ) {
            Err(ClientError::Api { code, .. }) => assert_eq!(code, ErrorCode::InvalidHostname),
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An agent that refuses a body before reading it (413) closes with the body unread; the
    /// reset that follows its answer must not hide the answer.
    #[test]
    fn an_answer_before_the_body_was_read_is_still_the_answer() {
        let (dir, path) = socket_dir("413");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(s.read(&mut byte).unwrap(), 1);
                head.push(byte[0]);
            }
            let body = r#"{"code":"body_too_large","message":"The body exceeds 1048576 bytes"}"#;
            write!(
                s,
                "HTTP/1.1 413 Payload Too Large\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        let c = Client::new(&path);
        let big = serde_json::json!({"hostname": "x".repeat(32 << 10)});
        match c.send(PUT, &Route::NodeHostname.path(), Some(&big)) {
            Err(ClientError::Api { code, .. }) => assert_eq!(code, ErrorCode::BodyTooLarge),
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn call_sends_the_json_body_and_parses_the_answer() {
        let (dir, path) = socket_dir("call");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let request = read_request(&mut s);
            let body = r#"{"config":{},"status":{"hostname":"n","interfaces":[],"gateways":[],"dns":[]},"rollback_in_secs":60,"pending":{"management":"eth0"}}"#;
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            request
        });
        let config = hvnode_api::config::NetworkConfig {
            management: Some("eth0".into()),
            ..Default::default()
        };
        let view: hvnode_api::node::NetworkView = Client::new(&path)
            .call(
                PUT,
                &Route::Network.path(),
                Some(&config),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(view.rollback_in_secs, Some(60));
        assert_eq!(view.pending.unwrap().management.as_deref(), Some("eth0"));
        let (head, body) = server.join().unwrap();
        assert!(head.starts_with("PUT /v1/network HTTP/1.1\r\n"), "{head}");
        assert_eq!(
            serde_json::from_str::<hvnode_api::config::NetworkConfig>(&body).unwrap(),
            config
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
