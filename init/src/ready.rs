//! Readiness: the agent answers `GET /v1/health` on its unix socket with 200.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Whether an HTTP/1.x response starts with status 200.
pub fn is_ok_status(response: &[u8]) -> bool {
    let line = response.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let text = String::from_utf8_lossy(line);
    let mut parts = text.split_whitespace();
    matches!(parts.next(), Some(v) if v.starts_with("HTTP/1.")) && parts.next() == Some("200")
}

/// One health request to the agent's socket.
pub fn agent_healthy(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let req = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if s.write_all(req).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if buf[..n].contains(&b'\n') {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    is_ok_status(&buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn status_line_must_say_200() {
        assert!(is_ok_status(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        ));
        assert!(is_ok_status(b"HTTP/1.0 200\r\n"));
        assert!(!is_ok_status(b"HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(!is_ok_status(b"HTTP/1.1 2000 OK\r\n"));
        assert!(!is_ok_status(b"garbage 200\r\n"));
        assert!(!is_ok_status(b""));
    }

    fn serve_once(answer: &'static [u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "hvnode-init-health-{}-{}.sock",
            std::process::id(),
            answer.len()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut req = [0u8; 256];
                let n = s.read(&mut req).unwrap_or(0);
                if req[..n].starts_with(b"GET /v1/health HTTP/1.1\r\n") {
                    let _ = s.write_all(answer);
                }
            }
        });
        path
    }

    #[test]
    fn healthy_agent_socket_is_detected() {
        let path = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(agent_healthy(&path));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn failing_or_absent_agent_is_not_ready() {
        let path = serve_once(b"HTTP/1.1 500 Internal Server Error\r\n\r\n");
        assert!(!agent_healthy(&path));
        let _ = std::fs::remove_file(&path);
        assert!(!agent_healthy(Path::new("/nonexistent/agent.sock")));
    }
}
