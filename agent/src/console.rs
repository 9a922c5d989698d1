//! A guest's serial console through the API: the log's tail (`GET .../console`) and the
//! interactive attach (`GET .../console/attach`, an HTTP/1.1 upgrade to raw bytes both ways,
//! joined to the VMM's console socket).

use std::path::Path;
use std::sync::Arc;

use hvnode_api::error::ErrorCode;
use hvnode_api::routes::CONSOLE_PROTOCOL;
use hyper::{Request, StatusCode};

use crate::error::{blocking, Error};
use crate::guests::vmms::GuestError;
use crate::http::{text_response, upgrade_response, wants_upgrade, Resp};
use crate::Agent;

/// How much of the console log an attach replays, at most.
pub const CONSOLE_REPLAY: u64 = 4 << 10;
/// How much of the console log `GET .../console` returns without `?bytes=`.
const CONSOLE_TAIL_DEFAULT: usize = 64 << 10;

impl Agent {
    fn console_dir(&self, name: &str) -> std::path::PathBuf {
        self.paths.run.join("vms").join(name)
    }

    /// `GET /v1/guests/{name}/console?bytes=N`: the end of the console log.
    pub(crate) async fn console_log(
        self: &Arc<Self>,
        name: String,
        bytes: Option<String>,
    ) -> Result<Resp, Error> {
        let me = Arc::clone(self);
        blocking("Console log", move || {
            let bytes = crate::http::query_number("bytes", bytes, u64::MAX)?
                .map_or(CONSOLE_TAIL_DEFAULT, |n| {
                    usize::try_from(n).unwrap_or(usize::MAX)
                });
            me.guest(&name)?;
            let data = std::fs::read(me.console_dir(&name).join("console.log")).unwrap_or_default();
            let tail = &data[data.len().saturating_sub(bytes)..];
            Ok(text_response(
                StatusCode::OK,
                String::from_utf8_lossy(tail).into_owned(),
                "text/plain; charset=utf-8",
            ))
        })
        .await
    }

    /// `GET /v1/guests/{name}/console/attach`: answers `101 Switching Protocols`, then joins
    /// the connection to the guest's serial console socket, replaying the end of the console
    /// log first so that the current prompt shows.
    pub(crate) async fn attach_console<B>(
        &self,
        name: &str,
        mut req: Request<B>,
    ) -> Result<Resp, Error> {
        let status = self.guest(name)?;
        if !self.running.is_active(name) {
            return Err(GuestError::State {
                name: name.to_owned(),
                state: status.state.as_str(),
                op: "attach to the console of",
            }
            .into());
        }
        if !wants_upgrade(&req, CONSOLE_PROTOCOL) {
            return Err(Error::new(
                ErrorCode::UpgradeRequired,
                format!(
                    "Attaching needs an HTTP/1.1 upgrade: send Connection: Upgrade and Upgrade: {CONSOLE_PROTOCOL}"
                ),
            ));
        }
        let dir = self.console_dir(name);
        // Connected before answering, so that a VMM that does not listen is an error response
        // rather than a connection that closes at once.
        let console = tokio::net::UnixStream::connect(dir.join("console.sock"))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorCode::VmmUnreachable,
                    format!("The console of guest {name:?} does not answer ({e}): is the guest stopping?"),
                )
            })?;
        // Read after connecting: output in between shows twice rather than not at all.
        let replay = console_tail(&dir.join("console.log"), CONSOLE_REPLAY);
        let upgrade = hyper::upgrade::on(&mut req);
        let name = name.to_owned();
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    match join_console(upgraded, console, &replay).await {
                        // A client that went away without a TLS close_notify has still left.
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                        Err(e) => eprintln!("agent: console of guest {name}: {e}"),
                    }
                }
                Err(e) => eprintln!("agent: console of guest {name}: upgrade failed: {e}"),
            }
        });
        Ok(upgrade_response(CONSOLE_PROTOCOL))
    }
}

/// The last `max` bytes of the console log, from the first line start in them (a cut escape
/// sequence would garble the terminal); nothing if there is no log.
pub fn console_tail(log: &Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    let mut data = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut data).is_err() {
        return Vec::new();
    }
    if start > 0 {
        let from = data
            .iter()
            .position(|b| *b == b'\n')
            .map_or(data.len(), |i| i + 1);
        data.drain(..from);
    }
    data
}

/// Copies bytes between an upgraded client connection and a guest console socket until either
/// side closes. Not `copy_bidirectional`: the VMM never closes a console client itself, so a
/// client that goes away must end the session, not just half-close it.
async fn join_console(
    upgraded: hyper::upgrade::Upgraded,
    console: tokio::net::UnixStream,
    replay: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let (mut client_rx, mut client_tx) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
    let (mut guest_rx, mut guest_tx) = console.into_split();
    client_tx.write_all(replay).await?;
    client_tx.flush().await?;
    let result = tokio::select! {
        r = tokio::io::copy(&mut client_rx, &mut guest_tx) => r,
        r = tokio::io::copy(&mut guest_rx, &mut client_tx) => r,
    };
    let _ = client_tx.shutdown().await;
    result.map(drop)
}
