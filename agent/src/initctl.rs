//! Requests to init over its control socket (line-delimited JSON, `hvnode_api::init`): the
//! node-wide changes only PID 1 makes (network, host name, storage, power). Blocking.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use hvnode_api::error::ErrorCode;
use hvnode_api::init::{InitRequest, InitResponse};

use crate::error::Error;

/// How long init may take to answer (initialising storage is the slowest request).
const INIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Init's control socket.
#[derive(Debug, Clone)]
pub struct InitClient {
    socket: PathBuf,
}

impl InitClient {
    /// A client of the socket at `socket`.
    pub fn new(socket: PathBuf) -> Self {
        InitClient { socket }
    }

    /// Sends one request and waits for init's answer.
    pub fn request(&self, request: &InitRequest) -> Result<(), Error> {
        let unavailable = |e: std::io::Error| {
            Error::new(
                ErrorCode::InitUnavailable,
                format!(
                    "Init's control socket {} does not answer: {e}",
                    self.socket.display()
                ),
            )
        };
        let mut s = UnixStream::connect(&self.socket).map_err(unavailable)?;
        s.set_read_timeout(Some(INIT_TIMEOUT))
            .map_err(unavailable)?;
        let line =
            serde_json::to_string(request).map_err(|e| Error::internal("Init request", e))?;
        writeln!(s, "{line}").map_err(unavailable)?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .map_err(unavailable)?;
        match serde_json::from_str::<InitResponse>(&answer) {
            Ok(InitResponse::Ok) => Ok(()),
            Ok(InitResponse::Error { message }) => Err(Error::new(ErrorCode::InitRefused, message)),
            Err(e) => Err(Error::internal("Init's answer", e)),
        }
    }
}
