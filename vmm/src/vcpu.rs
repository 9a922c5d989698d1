//! vCPU threads: setting each vCPU up, running it and dispatching its port and MMIO exits to the
//! [`PioBus`] and the [`MmioBus`] (counting every exit for the control socket's stats), and
//! parking it outside KVM_RUN while the VM is paused.
//!
//! Pausing sets a flag and kicks every vCPU thread with a real-time signal whose handler is
//! empty but for setting `immediate_exit` in that vCPU's `kvm_run`: a signal that lands
//! between the flag check and the KVM_RUN ioctl then makes KVM_RUN return EINTR at once
//! instead of being lost. The thread sees the flag and waits on a condition variable until
//! resumed.
//!
//! A snapshot reads each vCPU's state on its own thread, while it is parked: [`Vcpus::save`]
//! posts the request and the parked threads answer it. Each first re-enters KVM_RUN with
//! `immediate_exit` set, which completes a port or MMIO read that the VMM has answered but
//! KVM has not yet put in the guest's registers, and returns at once.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot;
use crate::devices::pio::{PioBus, PortExit};
use crate::devices::MmioBus;
use crate::error::VmError;
use crate::exit::ExitReason;
use crate::persist::kvm::{save_vcpu, VcpuState};

/// How long a pause request waits for every vCPU to leave KVM_RUN and every device worker to
/// park, all together.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal's handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a thread-local read and a byte store: async-signal-safe.
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: the pointer is this thread's own vCPU `kvm_run` mapping, set by
        // `Vcpu::run` before its first KVM_RUN; the VcpuFd (and the mapping) outlives the
        // loop, and the pointer is cleared before the loop returns.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the kick signal's handler; once per process, before any vCPU runs.
pub(crate) fn install_kick_handler() -> Result<(), VmError> {
    register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| VmError::File("vCPU kick signal handler".into(), e.into()))
}

/// One vCPU's exit counters.
#[derive(Debug, Default)]
pub(crate) struct ExitCounters {
    io: AtomicU64,
    mmio: AtomicU64,
    hlt: AtomicU64,
    interrupted: AtomicU64,
}

impl ExitCounters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters by exit reason, as the control socket reports them.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("io", &self.io),
            ("mmio", &self.mmio),
            ("hlt", &self.hlt),
            ("interrupted", &self.interrupted),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

#[derive(Debug, Default)]
struct RunState {
    paused: bool,
    /// vCPU threads parked while paused.
    parked: usize,
    /// vCPU threads still in their loop.
    alive: usize,
    /// A snapshot's request for every vCPU's state: one slot per vCPU, filled by its thread.
    saving: Option<Vec<Option<Result<VcpuState, String>>>>,
}

/// Why a pause or resume was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PauseError {
    /// Pause while paused, or resume while running.
    #[error("{0}")]
    InvalidState(&'static str),
    /// A vCPU did not leave KVM_RUN, or a device worker did not park, in time (what did not
    /// stop is named); the VM was left running.
    #[error("{0} did not stop within {limit:?}; the VM keeps running", limit = PAUSE_TIMEOUT)]
    Timeout(String),
}

/// What the vCPU threads share with the control side: the pause gate, the threads to kick,
/// their exit counters, and whether a graceful shutdown was asked for.
#[derive(Debug)]
pub(crate) struct Vcpus {
    state: Mutex<RunState>,
    changed: Condvar,
    /// Read before every KVM_RUN without taking the lock.
    pause_requested: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    exits: Box<[ExitCounters]>,
    shutdown_requested: AtomicBool,
    /// The MSRs KVM lists as saveable (KVM_GET_MSR_INDEX_LIST), read at set-up.
    msr_indices: Vec<u32>,
}

impl Vcpus {
    /// Shared state for `count` vCPUs whose saveable MSRs are `msr_indices`.
    pub(crate) fn new(count: usize, msr_indices: Vec<u32>) -> Self {
        Vcpus {
            state: Mutex::new(RunState::default()),
            changed: Condvar::new(),
            pause_requested: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            exits: (0..count).map(|_| ExitCounters::default()).collect(),
            shutdown_requested: AtomicBool::new(false),
            msr_indices,
        }
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts vCPU `vcpu` on its own thread.
    pub(crate) fn spawn(self: &Arc<Self>, vcpu: Vcpu) -> Result<(), VmError> {
        self.lock().alive += 1;
        let name = format!("vcpu{}", vcpu.index);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || vcpu.run())
            .map_err(|e| VmError::File("vCPU thread".into(), e))?;
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
        Ok(())
    }

    /// Parks every vCPU outside KVM_RUN; returns once all are parked, or fails at `deadline`
    /// with every vCPU running again.
    pub(crate) fn pause(&self, deadline: Instant) -> Result<(), PauseError> {
        let mut st = self.lock();
        if st.paused {
            return Err(PauseError::InvalidState("The VM is already paused"));
        }
        st.paused = true;
        self.pause_requested.store(true, Ordering::SeqCst);
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // Fails only for a thread that has already ended, which no longer counts as alive.
            let _ = t.kill(kick_signal());
        }
        while st.parked < st.alive {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                self.unpause();
                return Err(PauseError::Timeout("vCPUs".into()));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Every vCPU's state, read by its parked thread; the VM must be paused. Fails naming the
    /// vCPU whose state KVM would not give, or at `deadline` if a thread did not answer (one
    /// that has ended never will).
    pub(crate) fn save(&self, deadline: Instant) -> Result<Vec<VcpuState>, String> {
        let mut st = self.lock();
        if !st.paused {
            return Err("the vCPUs are not paused".into());
        }
        st.saving = Some((0..self.exits.len()).map(|_| None).collect());
        self.changed.notify_all();
        loop {
            let done = st
                .saving
                .as_ref()
                .is_some_and(|s| s.iter().all(Option::is_some));
            if done {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.saving = None;
                return Err(format!(
                    "a vCPU did not give its state within {PAUSE_TIMEOUT:?}"
                ));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.saving
            .take()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.unwrap_or_else(|| Err("no answer".into()))
                    .map_err(|e| format!("vCPU {i}: {e}"))
            })
            .collect()
    }

    /// Lets parked vCPUs run again.
    pub(crate) fn resume(&self) -> Result<(), PauseError> {
        if !self.lock().paused {
            return Err(PauseError::InvalidState("The VM is not paused"));
        }
        self.unpause();
        Ok(())
    }

    fn unpause(&self) {
        let mut st = self.lock();
        st.paused = false;
        self.pause_requested.store(false, Ordering::SeqCst);
        drop(st);
        self.changed.notify_all();
    }

    /// Parks the calling vCPU thread while paused, answering snapshot requests with `save`'s
    /// result for vCPU `index`.
    fn park_while_paused(&self, index: usize, mut save: impl FnMut() -> Result<VcpuState, String>) {
        if !self.pause_requested.load(Ordering::SeqCst) {
            return;
        }
        let mut st = self.lock();
        if !st.paused {
            return;
        }
        st.parked += 1;
        self.changed.notify_all();
        while st.paused {
            let wanted = st
                .saving
                .as_ref()
                .is_some_and(|s| s.get(index).is_some_and(Option::is_none));
            if wanted {
                // The ioctls run without the lock: the other vCPUs answer meanwhile.
                drop(st);
                let state = save();
                st = self.lock();
                if let Some(slot) = st.saving.as_mut().and_then(|s| s.get_mut(index)) {
                    *slot = Some(state);
                }
                self.changed.notify_all();
                continue;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
    }

    fn exited(&self) {
        self.lock().alive -= 1;
        self.changed.notify_all();
    }

    /// Exit counters of every vCPU, by vCPU index.
    pub(crate) fn exit_counters(&self) -> Vec<BTreeMap<String, u64>> {
        self.exits.iter().map(ExitCounters::snapshot).collect()
    }

    /// From now on a guest reset (or triple fault) means the guest went down as asked: the
    /// VMM exits as powered off, not as reboot.
    pub(crate) fn request_shutdown(&self) {
        self.shutdown_requested.store(true, Ordering::SeqCst);
    }

    /// Whether [`Vcpus::request_shutdown`] was called.
    pub(crate) fn shutdown_requested(&self) -> bool {
        self.shutdown_requested.load(Ordering::SeqCst)
    }

    fn reset_reason(&self) -> ExitReason {
        if self.shutdown_requested() {
            ExitReason::PowerOff
        } else {
            ExitReason::Reboot
        }
    }
}

/// One vCPU and what its exits reach.
#[derive(Debug)]
pub(crate) struct Vcpu {
    /// The vCPU.
    pub fd: VcpuFd,
    /// Its index (and APIC id).
    pub index: usize,
    /// The I/O port devices.
    pub pio: Arc<PioBus>,
    /// The virtio-mmio device windows.
    pub mmio: Arc<MmioBus>,
    /// Pause gate and counters.
    pub vcpus: Arc<Vcpus>,
    /// Where the reason the VM ended goes.
    pub exit: mpsc::Sender<ExitReason>,
}

/// Creates vCPU `id` entering the kernel at `entry` in 64-bit mode, with `cpuid` (KVM's
/// supported CPUID, read once for all vCPUs) made its own.
pub(crate) fn setup_vcpu(vm: &VmFd, cpuid: &CpuId, id: u32, entry: u64) -> Result<VcpuFd, VmError> {
    let vcpu = vm.create_vcpu(u64::from(id))?;
    let mut cpuid = cpuid.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Without the hypervisor bit a nested guest cannot calibrate its clock.
                e.ecx |= 1 << 31;
                e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
            }
            0xb => e.edx = id,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)?;
    let sregs = boot::long_mode_sregs(vcpu.get_sregs()?);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&boot::entry_regs(entry))?;
    vcpu.set_fpu(&boot::fpu())?;
    // LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them.
    let mut lapic = vcpu.get_lapic()?;
    for (offset, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)?;
    Ok(vcpu)
}

impl Vcpu {
    fn run(mut self) {
        let vcpus = Arc::clone(&self.vcpus);
        let exit = self.exit.clone();
        let flag = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|c| c.set(flag));
        let reason = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()))
            .unwrap_or_else(|_| ExitReason::Crash("vCPU thread panicked".into()));
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        vcpus.exited();
        let _ = exit.send(reason);
    }

    /// This vCPU's state, from its parked thread.
    fn save(&mut self) -> Result<VcpuState, String> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(format!("completing the pending exit: KVM_RUN: {e}")),
            Ok(exit) => Err(format!("completing the pending exit: unexpected {exit:?}")),
        };
        self.fd.set_kvm_immediate_exit(0);
        completed?;
        save_vcpu(&self.fd, &self.vcpus.msr_indices).map_err(|e| e.to_string())
    }

    fn run_loop(&mut self) -> ExitReason {
        let vcpus = Arc::clone(&self.vcpus);
        let exits = &vcpus.exits[self.index];
        let index = self.index;
        loop {
            vcpus.park_while_paused(index, || self.save());
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    ExitCounters::bump(&exits.io);
                    match self.pio.write(port, data) {
                        Some(PortExit::Reset) => return self.vcpus.reset_reason(),
                        Some(PortExit::PowerOff) => return ExitReason::PowerOff,
                        None => {}
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    ExitCounters::bump(&exits.io);
                    self.pio.read(port, data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    ExitCounters::bump(&exits.mmio);
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    ExitCounters::bump(&exits.mmio);
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => ExitCounters::bump(&exits.hlt),
                Ok(VcpuExit::Shutdown) if self.vcpus.shutdown_requested() => {
                    // A guest whose reset did not take falls back to a triple fault.
                    return ExitReason::PowerOff;
                }
                Ok(VcpuExit::Shutdown) => {
                    return ExitReason::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into())
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return ExitReason::Crash(format!(
                        "VM entry failed on cpu {cpu}: reason {reason:#x}"
                    ))
                }
                Ok(VcpuExit::InternalError) => {
                    return ExitReason::Crash("KVM internal error (emulation failure)".into())
                }
                Ok(other) => return ExitReason::Crash(format!("unexpected vCPU exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR => {
                    // The kick: clear the flag the handler may have set, then park.
                    ExitCounters::bump(&exits.interrupted);
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => return ExitReason::Crash(format!("KVM_RUN: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Instant {
        Instant::now() + PAUSE_TIMEOUT
    }

    /// A stand-in for a vCPU thread: passes the gate in a loop, counting turns.
    fn gate_loop(vcpus: Arc<Vcpus>, turns: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::SeqCst) {
            vcpus.park_while_paused(0, || Err("no vCPU here".into()));
            turns.fetch_add(1, Ordering::SeqCst);
            std::thread::yield_now();
        }
        vcpus.exited();
    }

    #[test]
    fn pause_returns_once_every_thread_is_parked_and_resume_releases_them() {
        let vcpus = Arc::new(Vcpus::new(2, Vec::new()));
        let (turns, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let threads: Vec<_> = (0..2)
            .map(|_| {
                vcpus.lock().alive += 1;
                let (v, t, s) = (Arc::clone(&vcpus), Arc::clone(&turns), Arc::clone(&stop));
                std::thread::spawn(move || gate_loop(v, t, s))
            })
            .collect();
        while turns.load(Ordering::SeqCst) < 10 {
            std::thread::yield_now();
        }
        vcpus.pause(soon()).unwrap();
        assert!(vcpus.lock().paused);
        assert_eq!(vcpus.lock().parked, 2);
        let at_pause = turns.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(turns.load(Ordering::SeqCst), at_pause);
        assert_eq!(
            vcpus.pause(soon()),
            Err(PauseError::InvalidState("The VM is already paused"))
        );
        vcpus.resume().unwrap();
        while turns.load(Ordering::SeqCst) < at_pause + 10 {
            std::thread::yield_now();
        }
        assert_eq!(
            vcpus.resume(),
            Err(PauseError::InvalidState("The VM is not paused"))
        );
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(vcpus.lock().alive, 0);
    }

    #[test]
    fn pause_does_not_wait_for_threads_that_have_ended() {
        let vcpus = Vcpus::new(1, Vec::new());
        vcpus.lock().alive = 1;
        vcpus.exited();
        vcpus.pause(soon()).unwrap();
        vcpus.resume().unwrap();
    }

    #[test]
    fn a_pause_that_times_out_leaves_the_vcpus_running() {
        let vcpus = Vcpus::new(1, Vec::new());
        // A vCPU that never reaches the gate.
        vcpus.lock().alive = 1;
        let err = vcpus
            .pause(Instant::now() + Duration::from_millis(50))
            .unwrap_err();
        assert_eq!(err, PauseError::Timeout("vCPUs".into()));
        assert!(
            err.to_string().starts_with("vCPUs did not stop within 5s"),
            "{err}"
        );
        assert!(!vcpus.lock().paused);
        assert!(!vcpus.pause_requested.load(Ordering::SeqCst));
    }

    #[test]
    fn a_reset_after_a_shutdown_request_is_a_power_off() {
        let vcpus = Vcpus::new(1, Vec::new());
        assert_eq!(vcpus.reset_reason(), ExitReason::Reboot);
        vcpus.request_shutdown();
        assert_eq!(vcpus.reset_reason(), ExitReason::PowerOff);
    }
}
