//! The node's watchdog, held by PID 1 (which never exits) and fed only on the agent's word.
//!
//! The agent grants "feed for the next N ms" on every tick of its cluster loop while its
//! membership lease is alive (or etcd is down for every node, docs/ha.md); a thread here feeds
//! the device once a second while a grant runs. An agent that hangs or dies stops granting,
//! and so does an agent that fences its node: either way the watchdog resets the node
//! [`TIMEOUT_SECS`] after the last feed. The device is armed by the first grant (a node that
//! is not in a cluster never arms it) and disarmed (the magic close) when the agent leaves the
//! cluster and at power-off, so that a power-off does not become a reset.
//!
//! Where the machine has no watchdog device (`/dev/watchdog0` after coldplug), init loads
//! `softdog`, a timer in the kernel: it resets a node whose agent or user space hangs, but not
//! one whose kernel hangs, which a hardware watchdog (i6300esb, iTCO, IPMI) does.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::out;

/// The watchdog's timeout (seconds): `hvnode_cluster::fencing::Timings::DEFAULT`'s.
pub const TIMEOUT_SECS: i32 = 8;
/// The longest grant the agent may give at once.
pub const MAX_GRANT: Duration = Duration::from_secs(5);
/// How often the feeding thread feeds a device whose grant runs.
const FEED_EVERY: Duration = Duration::from_secs(1);

const DEVICE: &str = "/dev/watchdog0";

nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);
nix::ioctl_read!(wdioc_gettimeout, b'W', 7, libc::c_int);

/// An open, armed watchdog device.
struct Armed {
    file: File,
    identity: String,
}

#[derive(Default)]
struct State {
    armed: Option<Armed>,
    /// Feed until then.
    until: Option<Instant>,
    /// Set once the agent fenced the node: no grant feeds it again.
    fenced: bool,
    /// Set once the node shuts down: no grant arms it again.
    closing: bool,
}

/// The watchdog, shared by the control socket and the feeding thread.
#[derive(Clone, Default)]
pub struct Watchdog {
    state: Arc<Mutex<State>>,
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the feeding thread.
    pub fn start(&self) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(FEED_EVERY);
                let mut st = me.lock();
                let due = st.until.is_some_and(|u| Instant::now() < u) && !st.fenced;
                if let (true, Some(a)) = (due, st.armed.as_mut()) {
                    let _ = a.file.write_all(b"\0");
                }
            });
    }

    /// The agent's grant: feed for the next `ms` milliseconds (at most [`MAX_GRANT`]), arming
    /// the device first if need be; `0` stops feeding at once (the node fences itself).
    /// Returns the device's identity.
    pub fn grant(&self, ms: u64) -> Result<String, String> {
        let mut st = self.lock();
        if ms == 0 {
            st.until = None;
            st.fenced = true;
            let identity = st.armed.as_ref().map(|a| a.identity.clone());
            drop(st);
            out::announce(
                2,
                &format!(
                    "fence: the watchdog ({}) is no longer fed: this node resets within {TIMEOUT_SECS} s",
                    identity.as_deref().unwrap_or("none")
                ),
                true,
            );
            return identity.ok_or_else(|| "no watchdog is armed".to_owned());
        }
        if st.fenced {
            return Err("the node has fenced itself: it waits for its watchdog's reset".into());
        }
        if st.closing {
            return Err("the node is shutting down".into());
        }
        if st.armed.is_none() {
            let armed = arm()?;
            out::announce(
                5,
                &format!(
                    "watchdog {} armed ({TIMEOUT_SECS} s): fed while the node holds its cluster lease",
                    armed.identity
                ),
                false,
            );
            st.armed = Some(armed);
        }
        let a = st.armed.as_mut().expect("armed above");
        let _ = a.file.write_all(b"\0");
        st.until = Some(Instant::now() + Duration::from_millis(ms).min(MAX_GRANT));
        Ok(st
            .armed
            .as_ref()
            .map(|a| a.identity.clone())
            .unwrap_or_default())
    }

    /// The node shuts down (however it was asked to: the API, the console, the power button):
    /// disarms the device, unless the node fenced itself, and arms it no more, so that a
    /// shutdown slower than the watchdog's timeout does not become a reset.
    pub fn shut_down(&self) {
        self.lock().closing = true;
        if let Err(e) = self.disarm() {
            out::log_only(&format!("init: {e}"));
        }
    }

    /// Disarms the device (the magic close), unless the node fenced itself.
    pub fn disarm(&self) -> Result<(), String> {
        let mut st = self.lock();
        if st.fenced {
            return Err("the node has fenced itself: its watchdog stays armed".into());
        }
        st.until = None;
        if let Some(mut a) = st.armed.take() {
            a.file
                .write_all(b"V")
                .map_err(|e| format!("disarming the watchdog: {e}"))?;
            out::log_only(&format!("init: watchdog {} disarmed", a.identity));
        }
        Ok(())
    }
}

/// Opens the watchdog (loading softdog if the machine has none) and sets its timeout.
fn arm() -> Result<Armed, String> {
    if !Path::new(DEVICE).exists() {
        let mut loader = crate::kmod::Loader::new(&crate::kmod::module_dir());
        if loader.has("softdog") {
            loader.load("softdog");
        }
        // devtmpfs makes the node as the driver registers it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !Path::new(DEVICE).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(DEVICE)
        .map_err(|e| format!("no watchdog device ({DEVICE}: {e})"))?;
    let identity = std::fs::read_to_string("/sys/class/watchdog/watchdog0/identity")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "watchdog".into());
    let mut timeout: libc::c_int = TIMEOUT_SECS;
    // SAFETY: WDIOC_SETTIMEOUT reads and writes one c_int, which we own for the call; the fd
    // is the open watchdog device.
    let set = unsafe { wdioc_settimeout(file.as_raw_fd(), &mut timeout) };
    let mut now: libc::c_int = 0;
    // SAFETY: WDIOC_GETTIMEOUT writes one c_int, which we own for the call.
    let got = unsafe { wdioc_gettimeout(file.as_raw_fd(), &mut now) };
    if set.is_err() || got.is_err() || now <= 0 || now > TIMEOUT_SECS {
        // Opening armed it: disarm before giving up.
        let _ = file.write_all(b"V");
        return Err(format!(
            "watchdog {identity} cannot be set to {TIMEOUT_SECS} s (it says {now} s): the node \
             cannot fence itself in time"
        ));
    }
    Ok(Armed { file, identity })
}
