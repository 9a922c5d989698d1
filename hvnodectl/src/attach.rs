//! `guest console --attach`: the local terminal joined to a guest's serial port through the
//! agent's console upgrade, detached with Ctrl-] as in telnet and `virsh console`.

use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The detach key, Ctrl-] (GS).
pub const DETACH: u8 = 0x1d;

/// Errors of the terminal side.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The terminal could not be put into raw mode.
    #[error("Cannot put the terminal into raw mode")]
    RawMode(#[source] nix::Error),
    /// Writing the guest's output to stdout failed.
    #[error("Writing the console output")]
    Output(#[source] std::io::Error),
    /// SIGTERM/SIGHUP handlers.
    #[error("Installing the signal handlers")]
    Signals(#[source] std::io::Error),
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The user typed Ctrl-] (a terminal only).
    Detached,
    /// The node closed the connection: the guest stopped, or the agent went away.
    Closed,
    /// SIGTERM or SIGHUP.
    Signal,
}

/// The terminal's settings before raw mode; restored when dropped, so on every way out,
/// errors and panics included.
struct RawMode(Termios);

impl RawMode {
    fn enable() -> Result<Self, AttachError> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).map_err(AttachError::RawMode)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).map_err(AttachError::RawMode)?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

/// Reads stdin on a thread of its own: a read blocked in tokio's stdin would keep the runtime
/// from shutting down after a detach, a plain thread ends with the process.
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Joins the terminal to `conn` until Ctrl-] (when stdin is a terminal, which is then in raw
/// mode for the session), the node closing the connection, or SIGTERM/SIGHUP. After stdin
/// ends (a pipe), the output is still shown until the connection closes.
pub async fn run<C: AsyncRead + AsyncWrite>(conn: C, banner: &str) -> Result<End, AttachError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(AttachError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AttachError::Signals)?;
    let tty = std::io::stdin().is_terminal();
    eprintln!("{banner}");
    let _raw = if tty { Some(RawMode::enable()?) } else { None };
    let (mut rx, mut tx) = tokio::io::split(conn);
    let mut input = stdin_chunks();
    let mut input_open = true;
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 4096];
    let end = loop {
        tokio::select! {
            r = rx.read(&mut buf) => match r {
                Ok(0) | Err(_) => break End::Closed,
                Ok(n) => {
                    stdout.write_all(&buf[..n]).await.map_err(AttachError::Output)?;
                    stdout.flush().await.map_err(AttachError::Output)?;
                }
            },
            chunk = input.recv(), if input_open => match chunk {
                None => input_open = false,
                Some(chunk) => {
                    let detach = tty.then(|| chunk.iter().position(|b| *b == DETACH)).flatten();
                    let send = &chunk[..detach.unwrap_or(chunk.len())];
                    let sent = async { tx.write_all(send).await?; tx.flush().await }.await;
                    if sent.is_err() {
                        break End::Closed;
                    }
                    if detach.is_some() {
                        break End::Detached;
                    }
                }
            },
            _ = term.recv() => break End::Signal,
            _ = hup.recv() => break End::Signal,
        }
    };
    if end != End::Closed {
        // A TLS close_notify: the agent sees a detach, not a connection that broke off.
        let _ = tx.shutdown().await;
    }
    Ok(end)
}
