//! The serial console around COM1's 16550 ([`super::Console`], vm-superio's): its output side,
//! a bounded log file plus every client attached to the console socket, and the socket's input
//! side (`console_loop`), which feeds what clients type to the guest. Whatever the guest writes
//! is stored and forwarded, never interpreted.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{Console, IrqLine};
use crate::devices::pio::{PioDevice, PortExit};
use crate::devices::DeviceStats;
use crate::hex::Hex;

/// COM1's first port.
pub const COM1: u16 = 0x3f8;
/// The 16550's eight registers.
pub const PORTS: u16 = 8;

/// The log file is cut back to its last [`KEEP`] bytes when it grows past [`LIMIT`].
pub const LIMIT: u64 = 4 << 20;
/// See [`LIMIT`].
pub const KEEP: usize = 1 << 20;

/// The serial console's counters.
#[derive(Debug, Default)]
pub struct SerialStats {
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
}

impl SerialStats {
    /// Counts `n` bytes a console client sent to the guest.
    pub fn received(&self, n: usize) {
        self.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl DeviceStats for SerialStats {
    fn device_stats(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let counters = [
            ("tx_bytes".to_owned(), self.tx_bytes.load(Ordering::Relaxed)),
            ("rx_bytes".to_owned(), self.rx_bytes.load(Ordering::Relaxed)),
        ];
        BTreeMap::from([("serial".to_owned(), BTreeMap::from(counters))])
    }
}

/// Where serial output goes.
#[derive(Debug, Default)]
pub struct SerialOut {
    log: Option<(File, u64)>,
    clients: Arc<Mutex<Vec<UnixStream>>>,
    stats: Arc<SerialStats>,
}

impl SerialOut {
    /// Output to `log` (appended) and to the clients in `clients`, counted in `stats`.
    pub fn new(
        log: Option<&str>,
        clients: Arc<Mutex<Vec<UnixStream>>>,
        stats: Arc<SerialStats>,
    ) -> std::io::Result<Self> {
        let log = match log {
            Some(path) => {
                // Readable too: the trim reads the tail back through this descriptor.
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .read(true)
                    .append(true)
                    .open(path)?;
                let len = f.metadata()?.len();
                Some((f, len))
            }
            None => None,
        };
        Ok(SerialOut {
            log,
            clients,
            stats,
        })
    }

    /// Cuts the log back to its last [`KEEP`] bytes, through the open descriptor: the sandbox
    /// allows no file to be opened once the guest runs.
    fn trim_log(&mut self) {
        let Some((file, len)) = self.log.as_mut() else {
            return;
        };
        if *len <= LIMIT {
            return;
        }
        let mut tail = vec![0u8; KEEP];
        let kept = match file.read_exact_at(&mut tail, *len - KEEP as u64) {
            Ok(()) => &tail[..],
            // Shorter than counted (cut by someone else): start afresh.
            Err(_) => &[][..],
        };
        // Appends land at the new end, so the tail goes back to the start.
        if file.set_len(0).is_ok() {
            *len = 0;
            if file.write_all(kept).is_ok() {
                *len = kept.len() as u64;
            }
        }
    }
}

/// Writes all of `buf` to `client` without blocking; false if it could not take it all. The
/// socket itself stays blocking: its other half is read by the thread that feeds serial input,
/// and O_NONBLOCK would be shared with it.
fn send_nowait(client: &UnixStream, buf: &[u8]) -> bool {
    let mut rest = buf;
    while !rest.is_empty() {
        // SAFETY: `rest` is a live, initialised slice of `rest.len()` bytes and the fd belongs to
        // `client`, which outlives the call; send only reads from the buffer.
        let n = unsafe {
            libc::send(
                client.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(n) if n > 0 => rest = &rest[n..],
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
    true
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stats
            .tx_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if let Some((f, len)) = self.log.as_mut() {
            if f.write_all(buf).is_ok() {
                *len += buf.len() as u64;
            }
        }
        self.trim_log();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        // A client that cannot take the output (gone or stuck) is dropped, never waited for.
        clients.retain(|c| send_nowait(c, buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl PioDevice for Console {
    fn read(&mut self, _base: u16, offset: u16) -> u8 {
        Console::read(self, offset as u8)
    }

    fn write(&mut self, _base: u16, offset: u16, value: u8) -> Option<PortExit> {
        // A byte or an interrupt that could not be delivered is lost; the guest cannot be told.
        let _ = Console::write(self, offset as u8, value);
        None
    }
}

/// The 16550's registers and its receive FIFO (what a client typed that the guest has not read
/// yet), as a snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Hex,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: Hex(s.in_buffer),
        }
    }
}

impl Default for SerialState {
    /// A 16550 after reset.
    fn default() -> Self {
        vm_superio::serial::SerialState::default().into()
    }
}

/// Errors bringing COM1 back from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    /// vm-superio refused the state (a receive FIFO longer than the 16550's) or could not raise
    /// the interrupt the state has pending.
    #[error("serial port state: {0:?}")]
    Refused(vm_superio::serial::Error<std::io::Error>),
}

/// COM1 as `state` has it, raising `irq` and writing to `out`.
pub fn console_from_state(
    state: &SerialState,
    irq: IrqLine,
    out: SerialOut,
) -> Result<Console, SerialRestoreError> {
    let s = vm_superio::serial::SerialState {
        baud_divisor_low: state.baud_divisor_low,
        baud_divisor_high: state.baud_divisor_high,
        interrupt_enable: state.interrupt_enable,
        interrupt_identification: state.interrupt_identification,
        line_control: state.line_control,
        line_status: state.line_status,
        modem_control: state.modem_control,
        modem_status: state.modem_status,
        scratch: state.scratch,
        in_buffer: state.in_buffer.0.clone(),
    };
    Console::from_state(&s, irq, vm_superio::serial::NoEvents, out)
        .map_err(SerialRestoreError::Refused)
}

/// Accepts console socket clients: each gets the guest's output from now on (through
/// `clients`, which [`SerialOut`] writes to), and what it sends goes to the guest's input.
pub(crate) fn console_loop(
    listener: UnixListener,
    clients: Arc<Mutex<Vec<UnixStream>>>,
    console: Arc<Mutex<Console>>,
    stats: Arc<SerialStats>,
) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(out) = conn.try_clone() else { continue };
        clients.lock().unwrap_or_else(|e| e.into_inner()).push(out);
        let (console, stats) = (Arc::clone(&console), Arc::clone(&stats));
        std::thread::spawn(move || {
            let mut conn = conn;
            let mut buf = [0u8; 64];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stats.received(n);
                let _ = console
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .enqueue_raw_bytes(&buf[..n]);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_typed_input_survive_a_state_round_trip() {
        let irq = || IrqLine::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let out = || SerialOut::new(None, Arc::default(), Arc::default()).unwrap();
        let mut c = Console::new(irq(), out());
        Console::write(&mut c, 7, 0x5a).unwrap();
        Console::write(&mut c, 3, 0x03).unwrap();
        c.enqueue_raw_bytes(b"ls\n").unwrap();
        let saved = SerialState::from(c.state());
        let json = serde_json::to_string(&saved).unwrap();
        assert!(json.contains("\"in_buffer\":\"6c730a\""), "{json}");
        let back: SerialState = serde_json::from_str(&json).unwrap();
        let mut c = console_from_state(&back, irq(), out()).unwrap();
        assert_eq!(Console::read(&mut c, 7), 0x5a);
        assert_eq!(Console::read(&mut c, 3), 0x03);
        assert_eq!(Console::read(&mut c, 0), b'l');
    }

    #[test]
    fn log_is_bounded_and_clients_receive_output() {
        let dir = std::env::temp_dir().join(format!("hvnode-vmm-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let _ = std::fs::remove_file(&log);
        let (a, mut b) = UnixStream::pair().unwrap();
        let clients = Arc::new(Mutex::new(vec![a]));
        let stats = Arc::new(SerialStats::default());
        let mut out = SerialOut::new(log.to_str(), clients.clone(), Arc::clone(&stats)).unwrap();
        out.write_all(b"hello").unwrap();
        assert_eq!(stats.device_stats()["serial"]["tx_bytes"], 5);
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut b, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..5 {
            out.write_all(&chunk).unwrap();
        }
        assert!(std::fs::metadata(&log).unwrap().len() <= LIMIT);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_that_stops_reading_is_dropped_and_its_socket_stays_blocking() {
        let (a, b) = UnixStream::pair().unwrap();
        let reader = a.try_clone().unwrap();
        let clients = Arc::new(Mutex::new(vec![a]));
        let stats = Arc::new(SerialStats::default());
        let mut out = SerialOut::new(None, clients.clone(), stats).unwrap();
        // Far more than a socket buffer holds; nobody reads `b`, yet no write blocks.
        let chunk = vec![b'y'; 64 << 10];
        for _ in 0..64 {
            out.write_all(&chunk).unwrap();
        }
        assert!(clients.lock().unwrap().is_empty(), "stuck client kept");
        // The input side (the same open socket) must still block rather than fail with EAGAIN.
        // SAFETY: F_GETFL on an fd `reader` owns only reads its flags.
        let flags = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_GETFL) };
        assert!(
            flags >= 0 && flags & libc::O_NONBLOCK == 0,
            "flags {flags:#x}"
        );
        drop(b);
    }
}
