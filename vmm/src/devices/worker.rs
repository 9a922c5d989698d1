//! One thread per activated device: waits on the queue notifications (and a backend fd, for
//! net) with epoll, hands each event to the device's [`Handler`], and interrupts the guest when
//! the handler put entries in a used ring. Stopping it (device reset, or the device dropped) is
//! an eventfd the loop always watches.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::QueueFault;
use super::Interrupt;

const KILL: u64 = u64::MAX;
const INPUT: u64 = u64::MAX - 1;

/// What one call of a handler did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Entries were added to a used ring: the guest needs an interrupt.
    pub used: bool,
    /// The handler stopped at its budget with chains left: call it again after other events.
    pub more: bool,
}

/// A device's request processing, driven by the worker.
pub(crate) trait Handler: Send + 'static {
    /// The driver notified queue `index`.
    fn queue_event(&mut self, index: usize) -> Result<Progress, QueueFault>;

    /// A backend fd to watch for input, and whether to watch it now (net stops watching its tap
    /// while the guest has no receive buffers).
    fn input(&self) -> Option<(RawFd, bool)> {
        None
    }

    /// The input fd is readable.
    fn input_event(&mut self) -> Result<Progress, QueueFault> {
        Ok(Progress::default())
    }
}

/// A running device worker thread.
#[derive(Debug)]
pub(crate) struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts `handler` on a thread named `name`, woken by `events` (queue `i` is `events[i]`).
    pub fn spawn<H: Handler>(
        name: &str,
        handler: H,
        events: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Worker> {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for (i, e) in events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                e.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL),
        )?;
        let label = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&label, &epoll, handler, &events, &interrupt))?;
        Ok(Worker {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.kill.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<H: Handler>(
    name: &str,
    epoll: &Epoll,
    mut handler: H,
    events: &[EventFd],
    interrupt: &Interrupt,
) {
    let fail = |what: &dyn std::fmt::Display| {
        eprintln!("hvnode-vmm: {name}: {what}; the device needs a reset");
        interrupt.set_needs_reset();
    };
    let mut watching = false;
    let mut ready = [EpollEvent::default(); 8];
    loop {
        if let Some((fd, want)) = handler.input() {
            if want != watching {
                let op = if want {
                    ControlOperation::Add
                } else {
                    ControlOperation::Delete
                };
                if let Err(e) = epoll.ctl(op, fd, EpollEvent::new(EventSet::IN, INPUT)) {
                    return fail(&format!("epoll on the backend: {e}"));
                }
                watching = want;
            }
        }
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return fail(&format!("epoll: {e}")),
        };
        for ev in &ready[..n] {
            let token = ev.data();
            let result = match token {
                KILL => return,
                INPUT => handler.input_event(),
                i => {
                    let i = i as usize;
                    let Some(evt) = events.get(i) else { continue };
                    // Non-blocking: a spurious wake-up reads EAGAIN, which is harmless.
                    let _ = evt.read();
                    let r = handler.queue_event(i);
                    if let Ok(Progress { more: true, .. }) = r {
                        let _ = evt.write(1);
                    }
                    r
                }
            };
            match result {
                Ok(p) if p.used => interrupt.signal_used_queue(),
                Ok(_) => {}
                Err(fault) => return fail(&fault),
            }
        }
    }
}
