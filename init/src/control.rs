//! Init's control socket (`paths::INIT_SOCKET`, mode 0600): one JSON
//! [`InitRequest`] per line in, one JSON [`InitResponse`] per line out.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use hvnode_api::config::NetworkConfig;
use hvnode_api::init::{InitRequest, InitResponse};

use crate::out;

/// Longest request line accepted.
const MAX_LINE: u64 = 256 * 1024;

/// Reboot or power off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerKind {
    /// Restart the machine.
    Reboot,
    /// Turn it off.
    PowerOff,
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be created.
    #[error("Cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// What the requests act on. Errors are messages for the admin.
pub trait Handler {
    /// Applies a network configuration now.
    fn apply_network(&self, network: &NetworkConfig) -> Result<(), String>;
    /// Sets the host name now.
    fn set_hostname(&self, hostname: &str) -> Result<(), String>;
    /// Creates and mounts the data partition on a blank disk.
    fn init_storage(&self, device: &str) -> Result<(), String>;
    /// Feeds the watchdog for `feed_ms` (0: stop feeding, the node fences itself).
    fn watchdog(&self, feed_ms: u64) -> Result<(), String>;
    /// Disarms the watchdog.
    fn watchdog_disarm(&self) -> Result<(), String>;
    /// Writes a checked message on every console.
    fn announce(&self, message: &str);
    /// Starts the shutdown sequence (after the answer is sent).
    fn power(&self, kind: PowerKind);
}

/// Handles one request line. Never panics on bad input.
pub fn handle_line(line: &str, h: &dyn Handler) -> (InitResponse, Option<PowerKind>) {
    let req: InitRequest = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            return (
                InitResponse::Error {
                    message: format!("Bad request: {e}; send one JSON InitRequest per line"),
                },
                None,
            )
        }
    };
    let result = match &req {
        InitRequest::ApplyNetwork { network } => match network.validate() {
            Ok(()) => h.apply_network(network),
            Err(e) => Err(format!("Invalid network configuration: {e}")),
        },
        InitRequest::SetHostname { hostname } => h.set_hostname(hostname),
        InitRequest::InitStorage { device } => h.init_storage(device),
        InitRequest::Watchdog { feed_ms } => h.watchdog(*feed_ms),
        InitRequest::WatchdogDisarm => h.watchdog_disarm(),
        InitRequest::Announce { message } => {
            if message.is_empty()
                || message.chars().count() > 512
                || message.chars().any(char::is_control)
            {
                Err("An announcement is 1 to 512 printable characters".to_owned())
            } else {
                h.announce(message);
                Ok(())
            }
        }
        InitRequest::Reboot => return (InitResponse::Ok, Some(PowerKind::Reboot)),
        InitRequest::PowerOff => return (InitResponse::Ok, Some(PowerKind::PowerOff)),
    };
    match result {
        Ok(()) => (InitResponse::Ok, None),
        Err(message) => (InitResponse::Error { message }, None),
    }
}

/// Serves one connection: requests until EOF or an error.
pub fn serve_connection<S: Read + Write>(stream: S, h: &dyn Handler) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                let resp = InitResponse::Error {
                    message: format!("Bad request: {e}"),
                };
                let _ = write_response(reader.get_mut(), &resp);
                return;
            }
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
            let resp = InitResponse::Error {
                message: "Bad request: line too long".to_owned(),
            };
            let _ = write_response(reader.get_mut(), &resp);
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let (resp, power) = handle_line(&line, h);
        let sent = write_response(reader.get_mut(), &resp);
        if let Some(kind) = power {
            h.power(kind);
            return;
        }
        if sent.is_err() {
            return;
        }
    }
}

fn write_response<W: Write>(w: &mut W, resp: &InitResponse) -> std::io::Result<()> {
    let mut text = serde_json::to_string(resp)
        .unwrap_or_else(|_| "{\"result\":\"error\",\"message\":\"internal\"}".to_owned());
    text.push('\n');
    w.write_all(text.as_bytes())?;
    w.flush()
}

/// Binds the socket (0600) and serves connections one at a time, forever.
pub fn listen(path: &str) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Listen {
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(path);
    if let Some(dir) = Path::new(path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Accept loop.
pub fn serve(listener: UnixListener, h: &dyn Handler) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        serve_unix(stream, h);
    }
    out::log_only("init: control socket closed");
}

fn serve_unix(stream: UnixStream, h: &dyn Handler) {
    // A client that connects and sends nothing must not block the others forever.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    serve_connection(stream, h);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io::Cursor;

    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<String>>,
        power: RefCell<Option<PowerKind>>,
    }

    impl Handler for Recorder {
        fn apply_network(&self, network: &NetworkConfig) -> Result<(), String> {
            self.calls
                .borrow_mut()
                .push(format!("net {}", network.bridge));
            Ok(())
        }
        fn set_hostname(&self, hostname: &str) -> Result<(), String> {
            self.calls.borrow_mut().push(format!("host {hostname}"));
            if hostname == "taken" {
                return Err("refused".into());
            }
            Ok(())
        }
        fn init_storage(&self, device: &str) -> Result<(), String> {
            self.calls.borrow_mut().push(format!("storage {device}"));
            Err(format!("{device} is not blank"))
        }
        fn watchdog(&self, feed_ms: u64) -> Result<(), String> {
            self.calls.borrow_mut().push(format!("watchdog {feed_ms}"));
            Ok(())
        }
        fn watchdog_disarm(&self) -> Result<(), String> {
            self.calls.borrow_mut().push("disarm".into());
            Ok(())
        }
        fn announce(&self, message: &str) {
            self.calls.borrow_mut().push(format!("announce {message}"));
        }
        fn power(&self, kind: PowerKind) {
            *self.power.borrow_mut() = Some(kind);
        }
    }

    /// A duplex in-memory stream: reads from `input`, collects writes.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn session(input: &str, h: &Recorder) -> Vec<InitResponse> {
        let mut d = Duplex {
            input: Cursor::new(input.as_bytes().to_vec()),
            output: Vec::new(),
        };
        serve_connection(&mut d, h);
        String::from_utf8(d.output)
            .expect("utf8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("response is JSON"))
            .collect()
    }

    #[test]
    fn bad_json_gets_an_error_and_the_connection_goes_on() {
        let h = Recorder::default();
        let r = session(
            "this is not json\n{\"op\":\"set_hostname\",\"hostname\":\"n1\"}\n",
            &h,
        );
        assert_eq!(r.len(), 2);
        assert!(
            matches!(&r[0], InitResponse::Error { message } if message.starts_with("Bad request"))
        );
        assert_eq!(r[1], InitResponse::Ok);
        assert_eq!(*h.calls.borrow(), vec!["host n1".to_owned()]);
    }

    #[test]
    fn unknown_operation_and_missing_fields_are_refused() {
        let h = Recorder::default();
        let r = session(
            "{\"op\":\"format_everything\"}\n{\"op\":\"init_storage\"}\n",
            &h,
        );
        assert!(r.iter().all(|x| matches!(x, InitResponse::Error { .. })));
        assert!(h.calls.borrow().is_empty());
    }

    #[test]
    fn handler_errors_are_passed_to_the_client() {
        let h = Recorder::default();
        let r = session("{\"op\":\"init_storage\",\"device\":\"/dev/sdb\"}\n", &h);
        assert_eq!(
            r,
            vec![InitResponse::Error {
                message: "/dev/sdb is not blank".into()
            }]
        );
    }

    #[test]
    fn power_requests_answer_first_then_shut_down_and_end_the_connection() {
        let h = Recorder::default();
        let r = session(
            "{\"op\":\"power_off\"}\n{\"op\":\"set_hostname\",\"hostname\":\"late\"}\n",
            &h,
        );
        assert_eq!(r, vec![InitResponse::Ok]);
        assert_eq!(*h.power.borrow(), Some(PowerKind::PowerOff));
        assert!(h.calls.borrow().is_empty());
    }

    #[test]
    fn overlong_line_is_refused_without_reading_it_all() {
        let h = Recorder::default();
        let long = "x".repeat(MAX_LINE as usize + 10);
        let r = session(&long, &h);
        assert_eq!(r.len(), 1);
        assert!(matches!(&r[0], InitResponse::Error { message } if message.contains("too long")));
    }

    #[test]
    fn invalid_network_configuration_is_refused_before_applying() {
        let h = Recorder::default();
        let line = "{\"op\":\"apply_network\",\"network\":{\"bridge\":\"bad name with spaces\"}}";
        let (resp, power) = handle_line(line, &h);
        assert!(power.is_none());
        assert!(matches!(resp, InitResponse::Error { .. }), "{resp:?}");
        assert!(h.calls.borrow().is_empty());
    }
}
