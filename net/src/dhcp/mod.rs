//! The DHCPv4 client: one thread per interface running the RFC 2131 state machine
//! (INIT → SELECTING → REQUESTING → BOUND → RENEWING → REBINDING).

pub mod msg;
pub mod packet;
pub mod socket;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use msg::{Client, Lease, Reply, INFINITE};
use socket::PacketSocket;

/// What the client reports to its owner.
pub trait Events: Send + Sync {
    /// The host name to send in option 12.
    fn hostname(&self) -> String;
    /// A lease was obtained or extended; `previous` is the lease it replaces.
    fn bound(&self, device: &str, lease: &Lease, previous: Option<&Lease>);
    /// A lease ended (NAK, expiry, release): its address must go.
    fn lost(&self, device: &str, lease: &Lease);
    /// A line for the node log.
    fn log(&self, line: &str);
}

/// A stop signal that wakes sleepers at once.
#[derive(Debug, Default)]
pub struct Stop {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Stop {
    /// Raises the signal.
    pub fn set(&self) {
        *self.flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Whether the signal is raised.
    pub fn is_set(&self) -> bool {
        *self.flag.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until `deadline`; returns true if stopped meanwhile.
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        let mut stopped = self.flag.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *stopped {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped = match self.cv.wait_timeout(stopped, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// A running client thread.
#[derive(Debug)]
pub struct Handle {
    stop: Arc<Stop>,
    release: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Stops the thread (sending DHCPRELEASE first when `release`) and waits for it.
    pub fn stop(mut self, release: bool) {
        self.release.store(release, Ordering::SeqCst);
        self.stop.set();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a client for `device`.
pub fn spawn(
    device: String,
    ifindex: u32,
    mac: [u8; 6],
    events: Arc<dyn Events>,
) -> std::io::Result<Handle> {
    let stop = Arc::new(Stop::default());
    let release = Arc::new(AtomicBool::new(false));
    let run = Run {
        device: device.clone(),
        ifindex,
        mac,
        events,
        stop: stop.clone(),
        release: release.clone(),
    };
    let thread = std::thread::Builder::new()
        .name(format!("dhcp-{device}"))
        .spawn(move || run.run())?;
    Ok(Handle {
        stop,
        release,
        thread: Some(thread),
    })
}

/// A fresh random transaction id.
fn xid() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 4 {
        // Without entropy, a time-derived id still changes between transactions.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
            .unwrap_or(0x5eed);
        return t;
    }
    u32::from_ne_bytes(b)
}

/// Retransmission delays while looking for a server: 4, 8, 16, 32, then 64 s (RFC 2131 4.1).
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(4u64 << attempt.min(4))
}

/// RENEWING/REBINDING retransmit: half the time left, at least 60 s, never past `end`.
fn extend_wait(now: Instant, end: Instant) -> Instant {
    let half = (end.saturating_duration_since(now)) / 2;
    (now + half.max(Duration::from_secs(60))).min(end)
}

enum Interrupt {
    Stopped,
    Socket(socket::Error),
}

enum Kept {
    Lost(Lease),
    Stopped(Lease),
}

struct Run {
    device: String,
    ifindex: u32,
    mac: [u8; 6],
    events: Arc<dyn Events>,
    stop: Arc<Stop>,
    release: Arc<AtomicBool>,
}

impl Run {
    fn client(&self) -> Client {
        Client {
            mac: self.mac,
            hostname: self.events.hostname(),
        }
    }

    fn log(&self, line: &str) {
        self.events.log(line);
    }

    fn run(self) {
        loop {
            let sock = match PacketSocket::open(self.ifindex) {
                Ok(s) => s,
                Err(e) => {
                    self.log(&format!("{}: DHCP: {e}: {}", self.device, source(&e)));
                    if self
                        .stop
                        .sleep_until(Instant::now() + Duration::from_secs(5))
                    {
                        return;
                    }
                    continue;
                }
            };
            match self.cycle(&sock) {
                Ok(()) => return,
                Err(Interrupt::Stopped) => return,
                Err(Interrupt::Socket(e)) => {
                    self.log(&format!("{}: DHCP: {e}: {}", self.device, source(&e)));
                    if self
                        .stop
                        .sleep_until(Instant::now() + Duration::from_secs(5))
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Acquire, keep, and on loss start again, until stopped.
    fn cycle(&self, sock: &PacketSocket) -> Result<(), Interrupt> {
        loop {
            let (lease, at) = self.acquire(sock)?;
            self.events.bound(&self.device, &lease, None);
            match self.keep(sock, lease, at)? {
                Kept::Lost(lease) => {
                    self.log(&format!(
                        "{}: DHCP lease {} lost, asking again",
                        self.device, lease.address
                    ));
                    self.events.lost(&self.device, &lease);
                }
                Kept::Stopped(lease) => {
                    if self.release.load(Ordering::SeqCst) {
                        self.send_release(sock, &lease);
                    }
                    self.events.lost(&self.device, &lease);
                    return Ok(());
                }
            }
        }
    }

    fn send_release(&self, sock: &PacketSocket, lease: &Lease) {
        let Ok(bytes) = self.client().release(xid(), lease) else {
            return;
        };
        if socket::unicast(lease.address, lease.server, &bytes).is_err() {
            let _ = sock.broadcast(lease.address, &bytes);
        }
        self.log(&format!(
            "{}: DHCP lease {} released",
            self.device, lease.address
        ));
    }

    /// Waits until `until` for a reply to `xid` that `want` accepts.
    fn wait(
        &self,
        sock: &PacketSocket,
        xid: u32,
        until: Instant,
        want: impl Fn(&Reply) -> bool,
    ) -> Result<Option<Reply>, Interrupt> {
        loop {
            if self.stop.is_set() {
                return Err(Interrupt::Stopped);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            let slice = (until - now).min(Duration::from_millis(250));
            if let Some(payload) = sock.recv(slice).map_err(Interrupt::Socket)? {
                if let Some(r) = msg::parse_reply(&payload, xid, &self.mac) {
                    if want(&r) {
                        return Ok(Some(r));
                    }
                }
            }
        }
    }

    fn send(
        &self,
        sock: &PacketSocket,
        src: Ipv4Addr,
        bytes: Result<Vec<u8>, msg::Error>,
    ) -> Result<(), Interrupt> {
        match bytes {
            Ok(b) => sock.broadcast(src, &b).map_err(Interrupt::Socket),
            Err(e) => {
                self.log(&format!("{}: {e}", self.device));
                Ok(())
            }
        }
    }

    /// INIT → SELECTING → REQUESTING: returns the lease and when it was requested.
    fn acquire(&self, sock: &PacketSocket) -> Result<(Lease, Instant), Interrupt> {
        let mut attempt = 0u32;
        loop {
            sock.drain();
            let id = xid();
            let client = self.client();
            self.send(sock, Ipv4Addr::UNSPECIFIED, client.discover(id))?;
            let until = Instant::now() + backoff(attempt);
            let offer = self.wait(sock, id, until, |r| matches!(r, Reply::Offer(_)))?;
            let Some(Reply::Offer(offer)) = offer else {
                attempt += 1;
                if attempt == 3 {
                    self.log(&format!("{}: no DHCP offer yet, still trying", self.device));
                }
                continue;
            };
            // REQUESTING: up to three tries, then back to INIT.
            for wait in [4u64, 8, 8] {
                let sent = Instant::now();
                self.send(
                    sock,
                    Ipv4Addr::UNSPECIFIED,
                    client.request_offer(id, &offer),
                )?;
                let server = offer.server;
                let r = self.wait(sock, id, sent + Duration::from_secs(wait), |r| match r {
                    Reply::Ack(_) => true,
                    Reply::Nak(s) => *s == server || s.is_unspecified(),
                    Reply::Offer(_) => false,
                })?;
                match r {
                    Some(Reply::Ack(lease)) => return Ok((lease, sent)),
                    Some(Reply::Nak(_)) => {
                        self.log(&format!(
                            "{}: DHCP server {server} refused {} (NAK)",
                            self.device, offer.address
                        ));
                        break;
                    }
                    _ => {}
                }
            }
            if self
                .stop
                .sleep_until(Instant::now() + Duration::from_secs(1))
            {
                return Err(Interrupt::Stopped);
            }
        }
    }

    /// BOUND → RENEWING → REBINDING, until the lease is lost or the client stopped.
    fn keep(
        &self,
        sock: &PacketSocket,
        mut lease: Lease,
        mut at: Instant,
    ) -> Result<Kept, Interrupt> {
        loop {
            if lease.lease_secs == INFINITE {
                self.stop
                    .sleep_until(Instant::now() + Duration::from_secs(u32::MAX.into()));
                return Ok(Kept::Stopped(lease));
            }
            let t1 = at + Duration::from_secs(lease.t1_secs.into());
            let t2 = at + Duration::from_secs(lease.t2_secs.into());
            let expiry = at + Duration::from_secs(lease.lease_secs.into());
            if self.stop.sleep_until(t1) {
                return Ok(Kept::Stopped(lease));
            }
            let mut renewed = None;
            // RENEWING: unicast to the server that granted the lease.
            while renewed.is_none() && Instant::now() < t2 {
                sock.drain();
                let id = xid();
                let sent = Instant::now();
                let bytes = match self.client().request_extend(id, lease.address) {
                    Ok(b) => b,
                    Err(e) => {
                        self.log(&format!("{}: {e}", self.device));
                        break;
                    }
                };
                let _udp = match socket::unicast(lease.address, lease.server, &bytes) {
                    Ok(s) => Some(s),
                    Err(_) => {
                        sock.broadcast(lease.address, &bytes)
                            .map_err(Interrupt::Socket)?;
                        None
                    }
                };
                match self.wait(sock, id, extend_wait(sent, t2), |r| {
                    !matches!(r, Reply::Offer(_))
                }) {
                    Ok(Some(Reply::Ack(new))) => renewed = Some((new, sent)),
                    Ok(Some(Reply::Nak(_))) => return Ok(Kept::Lost(lease)),
                    Ok(_) => {}
                    Err(Interrupt::Stopped) => return Ok(Kept::Stopped(lease)),
                    Err(e) => return Err(e),
                }
            }
            // REBINDING: broadcast to any server.
            while renewed.is_none() && Instant::now() < expiry {
                sock.drain();
                let id = xid();
                let sent = Instant::now();
                self.send(
                    sock,
                    lease.address,
                    self.client().request_extend(id, lease.address),
                )?;
                match self.wait(sock, id, extend_wait(sent, expiry), |r| {
                    !matches!(r, Reply::Offer(_))
                }) {
                    Ok(Some(Reply::Ack(new))) => renewed = Some((new, sent)),
                    Ok(Some(Reply::Nak(_))) => return Ok(Kept::Lost(lease)),
                    Ok(_) => {}
                    Err(Interrupt::Stopped) => return Ok(Kept::Stopped(lease)),
                    Err(e) => return Err(e),
                }
            }
            match renewed {
                Some((new, sent)) => {
                    self.events.bound(&self.device, &new, Some(&lease));
                    lease = new;
                    at = sent;
                }
                None => return Ok(Kept::Lost(lease)),
            }
        }
    }
}

fn source(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_64_seconds() {
        let d: Vec<u64> = (0..7).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(d, vec![4, 8, 16, 32, 64, 64, 64]);
    }

    #[test]
    fn extend_wait_is_half_remaining_but_at_least_60s_and_capped() {
        let now = Instant::now();
        assert_eq!(
            extend_wait(now, now + Duration::from_secs(1000)),
            now + Duration::from_secs(500)
        );
        assert_eq!(
            extend_wait(now, now + Duration::from_secs(100)),
            now + Duration::from_secs(60)
        );
        assert_eq!(
            extend_wait(now, now + Duration::from_secs(10)),
            now + Duration::from_secs(10)
        );
    }

    #[test]
    fn stop_wakes_a_sleeper_at_once() {
        let stop = Arc::new(Stop::default());
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let stopped = s2.sleep_until(Instant::now() + Duration::from_secs(60));
            (stopped, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        stop.set();
        let (stopped, took) = t.join().unwrap();
        assert!(stopped);
        assert!(took < Duration::from_secs(5));
        assert!(!Stop::default().sleep_until(Instant::now()));
    }
}
