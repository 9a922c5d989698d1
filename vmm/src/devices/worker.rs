//! One thread per activated device: waits on the queue notifications (and a backend fd, for
//! net) with epoll, hands each event to the device's [`Handler`], and interrupts the guest when
//! the handler put entries in a used ring.
//!
//! The VMM controls the thread through a [`Gate`]: a command (run, pause, stop) under a lock,
//! and an eventfd the loop always watches so that a command wakes it from epoll. The loop looks
//! at the gate before every event it handles; it parks on pause only between events, so the
//! request it is serving is finished (and answered) first. While parked it reads nothing: the
//! queue eventfds keep their counts and the tap keeps its frames, and both are seen again, as
//! epoll is level-triggered, once the worker runs on.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use virtio_queue::QueueState;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Progress, QueueFault};
use super::{DeviceError, Interrupt};

const CONTROL: u64 = u64::MAX;
const INPUT: u64 = u64::MAX - 1;

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

    /// The device's queues as it has them (where it is in each ring), in queue order.
    fn queues(&self) -> Vec<QueueState>;
}

/// What the VMM wants the worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct GateState {
    command: Command,
    /// The thread is parked on a pause.
    parked: bool,
    /// The thread has left its loop (stopped, or given up after a queue fault).
    ended: bool,
    /// The handler's queues, recorded as the thread parked: a snapshot of a paused VM needs
    /// where the device is in each ring, which only the handler knows.
    parked_queues: Option<Vec<QueueState>>,
}

/// How the VMM commands a worker thread, and how the thread reports back.
#[derive(Debug)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// Set whenever the command is not Run: the loop's check between events takes no lock.
    attention: AtomicBool,
    /// Written with every command, so that a thread in epoll_wait sees it.
    wake: EventFd,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn command(&self, command: Command) {
        let mut st = self.lock();
        st.command = command;
        self.attention
            .store(command != Command::Run, Ordering::SeqCst);
        drop(st);
        // A full counter still wakes the thread.
        let _ = self.wake.write(1);
        self.changed.notify_all();
    }

    /// On the worker thread: parks while paused, leaving `queues()` for a snapshot; `false`
    /// once told to stop.
    fn pass(&self, queues: impl Fn() -> Vec<QueueState>) -> bool {
        if !self.attention.load(Ordering::SeqCst) {
            return true;
        }
        let mut st = self.lock();
        loop {
            match st.command {
                Command::Run => {
                    st.parked = false;
                    st.parked_queues = None;
                    return true;
                }
                Command::Stop => return false,
                Command::Pause if !st.parked => {
                    st.parked = true;
                    st.parked_queues = Some(queues());
                    self.changed.notify_all();
                }
                Command::Pause => {}
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn ended(&self) {
        let mut st = self.lock();
        st.ended = true;
        st.parked = false;
        drop(st);
        self.changed.notify_all();
    }
}

/// Marks the gate ended however the thread leaves its loop, a panic included, so that a pause
/// never waits for a thread that is gone.
struct EndGuard<'a>(&'a Gate);

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        self.0.ended();
    }
}

/// A running device worker thread.
#[derive(Debug)]
pub struct Worker {
    gate: Arc<Gate>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts `handler` on a thread named `name`, woken by `events` (queue `i` is `events[i]`).
    pub(crate) fn spawn<H: Handler>(
        name: &str,
        handler: H,
        events: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Worker> {
        let gate = Arc::new(Gate {
            state: Mutex::new(GateState {
                command: Command::Run,
                parked: false,
                ended: false,
                parked_queues: None,
            }),
            changed: Condvar::new(),
            attention: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        });
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
            gate.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, CONTROL),
        )?;
        let label = name.to_owned();
        let thread_gate = Arc::clone(&gate);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let _end = EndGuard(&thread_gate);
                run(&label, &epoll, &thread_gate, handler, &events, &interrupt);
            })?;
        Ok(Worker {
            gate,
            thread: Some(thread),
        })
    }

    /// Parks the thread once the request it is serving is done; returns when it is parked (or
    /// has ended), or an error at `deadline`, with the pause still asked for.
    pub fn pause(&self, deadline: Instant) -> Result<(), DeviceError> {
        self.gate.command(Command::Pause);
        let mut st = self.gate.lock();
        while !st.parked && !st.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DeviceError::PauseTimeout);
            }
            st = self
                .gate
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// The device's queues as the parked thread left them; `None` unless it is parked (a
    /// thread that gave up after a queue fault left its device needing a reset instead).
    pub fn parked_queues(&self) -> Option<Vec<QueueState>> {
        self.gate.lock().parked_queues.clone()
    }

    /// Lets a parked thread run again (also ends a pause that timed out).
    pub fn resume(&self) {
        self.gate.command(Command::Run);
    }

    /// Stops the thread, parked or not, and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.gate.command(Command::Stop);
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
    gate: &Gate,
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
        if !gate.pass(|| handler.queues()) {
            return;
        }
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
            // A command waits for no other event: those left are reported again after it.
            if gate.attention.load(Ordering::SeqCst) {
                break;
            }
            let result = match ev.data() {
                CONTROL => {
                    let _ = gate.wake.read();
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::chain::testing::wait_for;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A handler that counts its calls and, with `hold`, waits for a go-ahead inside each one,
    /// as a device would on a slow disk.
    struct Probe {
        calls: Arc<AtomicUsize>,
        entered: mpsc::Sender<()>,
        hold: Option<mpsc::Receiver<()>>,
        fail: bool,
    }

    impl Handler for Probe {
        fn queue_event(&mut self, _index: usize) -> Result<Progress, QueueFault> {
            let _ = self.entered.send(());
            if let Some(hold) = &self.hold {
                let _ = hold.recv();
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(QueueFault::Head(7, 4));
            }
            Ok(Progress {
                used: true,
                more: false,
            })
        }

        fn queues(&self) -> Vec<QueueState> {
            let q = <virtio_queue::Queue as virtio_queue::QueueT>::new(8).unwrap();
            vec![q.state()]
        }
    }

    struct Setup {
        worker: Worker,
        notify: EventFd,
        irq: EventFd,
        interrupt: Arc<Interrupt>,
        calls: Arc<AtomicUsize>,
        entered: mpsc::Receiver<()>,
        go: Option<mpsc::Sender<()>>,
    }

    fn setup(hold: bool, fail: bool) -> Setup {
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (entered_tx, entered) = mpsc::channel();
        let (go, hold_rx) = mpsc::channel();
        let probe = Probe {
            calls: Arc::clone(&calls),
            entered: entered_tx,
            hold: hold.then_some(hold_rx),
            fail,
        };
        let worker = Worker::spawn(
            "test-worker",
            probe,
            vec![notify.try_clone().unwrap()],
            Arc::clone(&interrupt),
        )
        .unwrap();
        Setup {
            worker,
            notify,
            irq,
            interrupt,
            calls,
            entered,
            go: hold.then_some(go),
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn pause_waits_for_the_request_in_flight_and_its_interrupt() {
        let mut s = setup(true, false);
        s.notify.write(1).unwrap();
        s.entered.recv_timeout(Duration::from_secs(5)).unwrap();
        // In flight: the pause cannot be acknowledged before the request is answered.
        let short = Instant::now() + Duration::from_millis(50);
        assert!(matches!(
            s.worker.pause(short),
            Err(DeviceError::PauseTimeout)
        ));
        assert_eq!(s.calls.load(Ordering::SeqCst), 0);
        s.go.as_ref().unwrap().send(()).unwrap();
        s.worker.pause(soon()).unwrap();
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
        assert_eq!(s.irq.read().unwrap(), 1, "interrupt raised before the ack");
        assert_eq!(s.worker.parked_queues().map(|q| q.len()), Some(1));
        s.worker.resume();
        wait_for("the queues to be let go", || {
            s.worker.parked_queues().is_none()
        });
        s.worker.stop();
    }

    #[test]
    fn notifications_during_a_pause_are_served_after_resume() {
        let mut s = setup(false, false);
        s.notify.write(1).unwrap();
        wait_for("the first request", || s.calls.load(Ordering::SeqCst) == 1);
        s.worker.pause(soon()).unwrap();
        for _ in 0..3 {
            s.notify.write(1).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(s.calls.load(Ordering::SeqCst), 1, "served while paused");
        assert_eq!(s.entered.try_iter().count(), 1);
        // A second pause request while parked is acknowledged at once.
        s.worker.pause(Instant::now()).unwrap();
        s.worker.resume();
        wait_for("the notification after resume", || {
            s.calls.load(Ordering::SeqCst) == 2
        });
        s.worker.stop();
    }

    #[test]
    fn stop_ends_a_parked_worker() {
        let mut s = setup(false, false);
        s.worker.pause(soon()).unwrap();
        s.worker.stop();
        assert!(s.worker.thread.is_none());
        s.notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(s.calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn pause_does_not_wait_for_a_worker_that_gave_up() {
        let s = setup(false, true);
        s.notify.write(1).unwrap();
        wait_for("the queue fault", || s.interrupt.needs_reset());
        wait_for("the thread to end", || s.worker.gate.lock().ended);
        s.worker.pause(Instant::now()).unwrap();
        s.worker.resume();
    }
}
