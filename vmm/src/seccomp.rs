//! The run-phase sandbox: once the VM is built (files, taps, sockets, KVM VM and vCPUs, guest
//! memory), [`lock_down`] drops root and installs a seccomp filter on every thread, before the
//! guest runs its first instruction. Set-up syscalls need not be allowed; what stays is what
//! the threads of a running VM call.
//!
//! One filter for the whole process, synchronised to every thread (TSYNC), rather than one per
//! thread kind: threads are started at run time by the guest's own doing (a device's worker
//! when the driver sets DRIVER_OK, on a vCPU thread; a client thread per control or console
//! connection; a timer thread on shutdown) and inherit the filter of the thread that starts
//! them, so a vCPU filter would have to hold every worker syscall and thread creation anyway,
//! leaving per-thread filters apart by little more than `accept4` and `rt_sigtimedwait`.
//! No thread opens an existing path at run time (the exit file, the serial log and
//! `/proc/self/statm` are opened during set-up); threads share one address space, so a looser
//! filter on one thread would be reachable from any thread the guest took over.
//!
//! A snapshot is the one thing that touches paths at run time, and only to make new ones: it
//! creates a directory (mkdir), new files in it (openat with exactly
//! `O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC`, which fails on any existing path, a symlink included),
//! and opens that directory to sync it (`O_RDONLY|O_DIRECTORY|O_CLOEXEC`, which opens only a
//! directory, whose entries cannot be listed: getdents stays forbidden). It reads the VM's state
//! with the KVM get ioctls, each allowed by number; no set ioctl is, but one: a migration
//! turns dirty logging on and off by registering the guest's memory slots again
//! (KVM_SET_USER_MEMORY_REGION, which can only map this process's own memory into its own
//! VM) and reads the log (KVM_GET_DIRTY_LOG).
//!
//! A forbidden syscall does not run: the kernel sends SIGSYS (SECCOMP_RET_TRAP), whose handler
//! writes the syscall number and the thread to stderr and, through its descriptor opened at
//! set-up, to the exit file, then exits with code 2 (crash). `HVNODE_VMM_SECCOMP=0` in the
//! environment leaves the filter off for debugging; it is never an API field, so a manager
//! cannot turn the sandbox off.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule,
};

/// The environment variable that turns the filter off when set to `0`.
pub const DISABLE_ENV: &str = "HVNODE_VMM_SECCOMP";
/// The exit code after a forbidden syscall: the VMM's code for a crash.
pub const VIOLATION_EXIT_CODE: i32 = 2;
/// `nobody` and `nogroup`: what a VMM started as root runs as once the VM is built.
pub const UNPRIVILEGED_ID: u32 = hvnode_api::vmm::VMM_RUN_AS;

vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_MSRS,
    kvm_bindings::KVMIO,
    0x88,
    kvm_bindings::kvm_msrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_LAPIC,
    kvm_bindings::KVMIO,
    0x8e,
    kvm_bindings::kvm_lapic_state
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_CPUID2,
    kvm_bindings::KVMIO,
    0x91,
    kvm_bindings::kvm_cpuid2
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_MP_STATE,
    kvm_bindings::KVMIO,
    0x98,
    kvm_bindings::kvm_mp_state
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_DEBUGREGS,
    kvm_bindings::KVMIO,
    0xa1,
    kvm_bindings::kvm_debugregs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XSAVE,
    kvm_bindings::KVMIO,
    0xa4,
    kvm_bindings::kvm_xsave
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XCRS,
    kvm_bindings::KVMIO,
    0xa6,
    kvm_bindings::kvm_xcrs
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_IRQCHIP,
    kvm_bindings::KVMIO,
    0x62,
    kvm_bindings::kvm_irqchip
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_PIT2,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_pit_state2
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_CLOCK,
    kvm_bindings::KVMIO,
    0x7c,
    kvm_bindings::kvm_clock_data
);

vmm_sys_util::ioctl_iow_nr!(
    KVM_GET_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0x42,
    kvm_bindings::kvm_dirty_log
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    kvm_bindings::KVMIO,
    0x46,
    kvm_bindings::kvm_userspace_memory_region
);

/// The ioctls of a running VM: KVM_RUN, the reads of vCPU and VM state a snapshot makes, and a
/// migration's dirty logging (turning it on and off on the guest's own memory slots, and
/// reading it).
fn run_phase_ioctls() -> [u64; 16] {
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_GET_IRQCHIP(),
        KVM_GET_PIT2(),
        KVM_GET_CLOCK(),
        KVM_GET_DIRTY_LOG(),
        KVM_SET_USER_MEMORY_REGION(),
    ]
    .map(u64::from)
}

/// The open flags of a new snapshot file: it must not exist yet.
const SNAPSHOT_FILE_FLAGS: i32 = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
/// The open flags of the snapshot directory, opened to sync its entries.
const SNAPSHOT_DIR_FLAGS: i32 = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;

/// Flags every thread creation carries (glibc's and musl's pthread_create both set them);
/// a clone without them would be a new process.
const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;
/// Flags no thread creation of ours carries.
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_UNTRACED) as u64;

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` (signo, errno, code, padding to 16, then
/// `_sigsys { void *call_addr; int syscall; unsigned arch; }`); the libc crate has no
/// accessor for it.
const SI_SYSCALL_OFFSET: usize = 24;

/// Errors setting up the sandbox; each one fails the start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The filter could not be built.
    #[error("Building the seccomp filter: {0}")]
    Build(#[from] BackendError),
    /// The kernel refused the filter.
    #[error("Installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
    /// Dropping root or installing the SIGSYS handler.
    #[error("{0}: {1}")]
    Sys(&'static str, std::io::Error),
}

/// Whether the environment leaves the filter on (anything but `HVNODE_VMM_SECCOMP=0`).
pub fn filter_enabled() -> bool {
    std::env::var_os(DISABLE_ENV).is_none_or(|v| v != "0")
}

/// The uid and gid `config`'s VMM runs as once it dropped root: its jail's, or
/// [`UNPRIVILEGED_ID`] for a VMM without one.
pub fn run_as(config: &hvnode_api::vmm::VmConfig) -> (u32, u32) {
    config
        .jail
        .as_ref()
        .map_or((UNPRIVILEGED_ID, UNPRIVILEGED_ID), |j| (j.uid, j.gid))
}

/// Drops root to `ids` (uid, gid) and, unless [`filter_enabled`] says no, installs the filter
/// on every thread. Call once, after set-up and before any vCPU runs.
pub fn lock_down(name: &str, ids: (u32, u32)) -> Result<(), SandboxError> {
    drop_privileges(ids)?;
    if filter_enabled() {
        install()
    } else {
        eprintln!("hvnode-vmm: {name}: {DISABLE_ENV}=0: running without the seccomp filter");
        Ok(())
    }
}

fn check(rc: libc::c_int, what: &'static str) -> Result<(), SandboxError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(SandboxError::Sys(what, std::io::Error::last_os_error()))
    }
}

/// Switches a VMM started as root to `(uid, gid)` (its jail's, or `nobody:nogroup`) with no
/// supplementary groups. Linux
/// keeps credentials per thread; glibc's wrappers apply them to every thread of the process.
/// Leaving uid 0 clears the permitted and effective capabilities of every thread. Everything
/// the VM needs from here on is already open.
pub fn drop_privileges((uid, gid): (u32, u32)) -> Result<(), SandboxError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    // SAFETY: an empty group list; the pointer is not read for a size of 0.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, "setgroups")?;
    // SAFETY: plain credential calls with integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) }, "setresgid")?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid")
}

/// Empties the capability bounding set of a VMM started as root, keeping the capabilities it
/// holds: the set is per thread and only limits what `execve` could grant, so it is emptied
/// before any thread starts (every thread inherits it) while set-up still needs
/// CAP_NET_ADMIN for the taps. Nothing the VMM or its guest does later can gain a capability
/// back through a setuid or file-capability binary, even with the filter off.
pub fn empty_capability_bounding_set() -> Result<(), SandboxError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    // PR_CAPBSET_READ fails (EINVAL) past the last capability this kernel knows.
    for cap in 0..libc::c_ulong::from(u32::MAX) {
        // SAFETY: PR_CAPBSET_READ and PR_CAPBSET_DROP take a capability number and no pointer.
        match unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap) } {
            0 => {}
            1 => check(
                // SAFETY: as above.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap) },
                "dropping the capability bounding set",
            )?,
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// Installs the SIGSYS handler and the filters on every thread (with no_new_privs, which
/// seccompiler sets first).
fn install() -> Result<(), SandboxError> {
    install_sigsys_handler()?;
    // clone3 takes its flags through a pointer the filter cannot read: it fails with ENOSYS,
    // and libc falls back to clone, whose flags the main filter checks. Installed first: the
    // main filter forbids seccomp(2) itself.
    let clone3: BpfProgram = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target_arch(),
    )?
    .try_into()?;
    seccompiler::apply_filter_all_threads(&clone3)?;
    let main: BpfProgram = SeccompFilter::new(
        allowed_syscalls()?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        target_arch(),
    )?
    .try_into()?;
    seccompiler::apply_filter_all_threads(&main)?;
    Ok(())
}

fn target_arch() -> seccompiler::TargetArch {
    seccompiler::TargetArch::x86_64
}

fn eq(arg: u8, value: u64) -> Result<Cond, BackendError> {
    Cond::new(arg, Len::Dword, Op::Eq, value)
}

/// A rule per value `arg` may take.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values
        .iter()
        .map(|&v| SeccompRule::new(vec![eq(arg, v)?]))
        .collect()
}

/// Every syscall the run phase makes, with the arguments it makes it with where they can be
/// told apart (the filter sees integers only, never what a pointer points at).
fn allowed_syscalls() -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut rules = BTreeMap::new();
    let anyhow = [
        // Guest I/O on descriptors opened at set-up: disk images (lseek + read/write,
        // fdatasync), taps, eventfds (irqfds, ioeventfds, worker stop events), the serial log
        // (trimmed with pread64 + ftruncate), /proc/self/statm (pread64), stderr, the exit file.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_close,
        // A device worker is started when the driver sets DRIVER_OK.
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        // Control and console clients on the sockets bound at set-up; serial output goes to
        // console clients with send(MSG_DONTWAIT).
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        // The allocator.
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        // Locks, condition variables, channels, and threads starting and ending.
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        // Answered ENOSYS by the first filter; allowed here so that its answer stands.
        libc::SYS_clone3,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // The vCPU kick handler returns; the signal thread takes SIGTERM/SIGINT with sigwait;
        // a sleep or timed wait that a signal interrupted resumes.
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_restart_syscall,
        // Clocks (the vDSO falls back to the syscall on some clock sources) and sleeps.
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // std seeds a HashMap from it on a thread's first one.
        libc::SYS_getrandom,
    ];
    for nr in anyhow {
        rules.insert(nr, Vec::new());
    }
    // KVM_RUN and a snapshot's reads of KVM state: interrupts are irqfd writes, pausing only
    // parks the vCPU threads.
    rules.insert(libc::SYS_ioctl, one_of(1, &run_phase_ioctls())?);
    // A snapshot's new directory and new files in it (see the module documentation).
    rules.insert(libc::SYS_mkdir, Vec::new());
    rules.insert(libc::SYS_mkdirat, Vec::new());
    rules.insert(
        libc::SYS_openat,
        one_of(2, &[SNAPSHOT_FILE_FLAGS as u64, SNAPSHOT_DIR_FLAGS as u64])?,
    );
    // File::try_clone and the socket clones; F_GETFD is std's debug check before a close.
    rules.insert(
        libc::SYS_fcntl,
        one_of(1, &[libc::F_DUPFD_CLOEXEC as u64, libc::F_GETFD as u64])?,
    );
    // A migration ends its stream (the control connection it took over).
    rules.insert(libc::SYS_shutdown, Vec::new());
    // Control clients get read and write timeouts.
    rules.insert(
        libc::SYS_setsockopt,
        [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO]
            .iter()
            .map(|&opt| SeccompRule::new(vec![eq(1, libc::SOL_SOCKET as u64)?, eq(2, opt as u64)?]))
            .collect::<Result<_, _>>()?,
    );
    // Memory, never executable: no code can be added to the process.
    let no_exec = || {
        SeccompRule::new(vec![Cond::new(
            2,
            Len::Dword,
            Op::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])
    };
    rules.insert(libc::SYS_mmap, vec![no_exec()?]);
    rules.insert(libc::SYS_mprotect, vec![no_exec()?]);
    // glibc returns freed memory and ended threads' stacks this way.
    rules.insert(libc::SYS_madvise, one_of(2, &[libc::MADV_DONTNEED as u64])?);
    // Threads only, never a process.
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![
            Cond::new(0, Len::Qword, Op::MaskedEq(THREAD_FLAGS), THREAD_FLAGS)?,
            Cond::new(0, Len::Qword, Op::MaskedEq(NAMESPACE_FLAGS), 0)?,
        ])?],
    );
    // Thread names (set by std for named threads, read by the SIGSYS handler).
    rules.insert(
        libc::SYS_prctl,
        one_of(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64])?,
    );
    // The pause kick: signals to this process's own threads only.
    rules.insert(
        libc::SYS_tgkill,
        one_of(0, &[u64::from(std::process::id())])?,
    );
    Ok(rules)
}

/// The exit file's descriptor, for the SIGSYS handler; -1 for none.
static EXIT_FILE: AtomicI32 = AtomicI32::new(-1);
/// Set by whoever writes the exit file first: the main thread's own report or the handler's.
static EXIT_FILE_CLAIMED: AtomicBool = AtomicBool::new(false);

/// Has a forbidden syscall also reported through `file` (the exit file, opened before the
/// sandbox), which must stay open until the process exits.
pub fn report_violations_to(file: &'static std::fs::File) {
    EXIT_FILE.store(file.as_raw_fd(), Ordering::SeqCst);
}

/// Takes the exit file for the caller's report; false if a forbidden syscall already wrote it.
pub fn claim_exit_file() -> bool {
    !EXIT_FILE_CLAIMED.swap(true, Ordering::SeqCst)
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags) before the fields are set.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as extern "C" fn(_, _, _) as libc::sighandler_t;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act` is initialised and the handler is async-signal-safe (raw syscalls on
    // stack buffers only).
    check(
        unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) },
        "SIGSYS handler",
    )
}

/// A message built on the stack: the handler may not allocate.
struct StackBuf {
    buf: [u8; 256],
    len: usize,
}

impl StackBuf {
    fn new() -> Self {
        StackBuf {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    fn number(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// What a forbidden syscall is reported as: `syscall N on thread NAME (tid T)`. The thread
/// name is kept to printable characters other than `"` and `\`, so that the reason can go
/// into the exit file's JSON as it is.
fn violation(nr: i32, thread: &[u8], tid: u64) -> StackBuf {
    let mut b = StackBuf::new();
    b.push(b"the seccomp sandbox stopped syscall ")
        .number(u64::from(nr.unsigned_abs()))
        .push(b" on thread ");
    for &c in thread.iter().take_while(|&&c| c != 0) {
        let c = if c.is_ascii_graphic() && c != b'"' && c != b'\\' {
            c
        } else {
            b'?'
        };
        b.push(&[c]);
    }
    b.push(b" (tid ").number(tid).push(b")");
    b
}

/// The exit file's content for `reason` (see [`violation`] for why no escaping is needed).
fn exit_json(reason: &[u8]) -> StackBuf {
    let mut b = StackBuf::new();
    b.push(b"{\"code\":")
        .number(VIOLATION_EXIT_CODE as u64)
        .push(b",\"reason\":\"")
        .push(reason)
        .push(b"\"}");
    b
}

fn write_all(fd: RawFd, bytes: &[u8]) {
    // SAFETY: `bytes` is a live buffer of `bytes.len()` bytes; a failed write is ignored,
    // the process exits next.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only raw syscalls the filter allows, on stack buffers: async-signal-safe.
    // SAFETY: the kernel passes a SIGSYS siginfo, whose `_sigsys.syscall` field lies at
    // SI_SYSCALL_OFFSET within it.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let mut thread = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer it is given.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let reason = violation(nr, &thread, tid as u64);
    let mut line = StackBuf::new();
    line.push(b"hvnode-vmm: ")
        .push(reason.bytes())
        .push(b"; exiting\n");
    write_all(libc::STDERR_FILENO, line.bytes());
    let fd = EXIT_FILE.load(Ordering::SeqCst);
    if fd >= 0 && claim_exit_file() {
        let json = exit_json(reason.bytes());
        // SAFETY: `fd` is the exit file, open for the life of the process; the buffer is
        // live for the call.
        unsafe {
            libc::ftruncate(fd, 0);
            libc::pwrite(fd, json.bytes().as_ptr().cast(), json.bytes().len(), 0);
        }
    }
    // SAFETY: ends the process without running anything else.
    unsafe { libc::_exit(VIOLATION_EXIT_CODE) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;
    use std::process::{Command, Output};

    /// The action the child test performs in the sandbox, and the directory it works in.
    const CHILD_ACTION: &str = "HVNODE_SECCOMP_TEST_ACTION";
    const CHILD_DIR: &str = "HVNODE_SECCOMP_TEST_DIR";

    /// Runs [`sandboxed_child`] doing `action` in a copy of this test binary; returns its
    /// output and its directory (the exit file, the serial log), for the caller to remove.
    fn sandboxed(action: &str) -> (Output, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("hvnode-seccomp-{action}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::sandboxed_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ACTION, action)
            .env(CHILD_DIR, &dir)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        (out, dir)
    }

    fn say(what: &str) {
        write_all(libc::STDOUT_FILENO, what.as_bytes());
    }

    /// Forbidden and allowed syscalls made after the filter is on, in a child process (a
    /// filter cannot be taken off again). Run by the tests below; alone it does nothing.
    #[test]
    #[ignore = "the body of the sandbox tests, run by them in a child process"]
    fn sandboxed_child() {
        let (Ok(action), Some(dir)) = (std::env::var(CHILD_ACTION), std::env::var_os(CHILD_DIR))
        else {
            return;
        };
        let dir = PathBuf::from(dir);
        let exit_file = std::fs::File::create(dir.join("exit.json")).unwrap();
        report_violations_to(Box::leak(Box::new(exit_file)));
        let log = dir.join("console.log");
        let mut serial = crate::devices::legacy::serial::SerialOut::new(
            log.to_str(),
            Default::default(),
            Default::default(),
        )
        .unwrap();
        // The 32-bit syscall is killed with a core dump otherwise.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads the struct it is given, which `no_core` is.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) }, 0);
        install().unwrap();
        say("sandboxed\n");
        match action.as_str() {
            "socket" => {
                // SAFETY: a plain socket(2) call.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            }
            "open" => {
                let _ = std::fs::File::open("/etc/hostname");
            }
            "fork" => {
                // SAFETY: the child, if there were one, would only exit.
                if unsafe { libc::fork() } == 0 {
                    // SAFETY: ends the forked child at once.
                    unsafe { libc::_exit(0) };
                }
            }
            "mmap-exec" => {
                // SAFETY: an anonymous mapping nothing else refers to.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
            }
            "ioctl" => {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD on stdin writes one int, which `n` is.
                unsafe { libc::ioctl(libc::STDIN_FILENO, libc::FIONREAD, &mut n) };
            }
            "signal-other" => {
                // SAFETY: signal 0 only checks that the target exists.
                unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
            }
            "int80" => {
                // SAFETY: getpid through the 32-bit entry: no memory is touched; eax is
                // clobbered with the result.
                unsafe { std::arch::asm!("int 0x80", inout("eax") 20 => _) };
            }
            "panic" => {
                // A VMM bug on a vCPU thread is caught and reported as a crash.
                let caught = std::panic::catch_unwind(|| panic!("a bug"));
                assert!(caught.is_err());
                say("survived\n");
                // SAFETY: ends the process without the test harness, which the filter would stop.
                unsafe { libc::_exit(0) };
            }
            "snapshot-files" => {
                let snap = dir.join("snap");
                crate::persist::snapshot::create_dir(&snap).unwrap();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(snap.join("memory"))
                    .unwrap();
                f.set_len(1 << 20).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&f, b"page", 8192).unwrap();
                f.sync_all().unwrap();
                std::os::unix::fs::OpenOptionsExt::custom_flags(
                    std::fs::OpenOptions::new().read(true),
                    libc::O_DIRECTORY,
                )
                .open(&snap)
                .unwrap()
                .sync_all()
                .unwrap();
                say("survived\n");
                // Opening the file again, even only to write to it, is another matter.
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .open(snap.join("memory"));
            }
            "allowed" => {
                // What the run phase does: threads come and go, eventfds, the serial log
                // trimmed, a thread kicked, KVM_RUN (on a descriptor that is no vCPU: ENOTTY).
                let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
                let clone = evt.try_clone().unwrap();
                let t = std::thread::Builder::new()
                    .name("sandboxed".into())
                    .spawn(move || {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        clone.write(1).unwrap();
                    })
                    .unwrap();
                t.join().unwrap();
                assert_eq!(evt.read().unwrap(), 1);
                let chunk = vec![b'x'; 1 << 20];
                for _ in 0..5 {
                    serial.write_all(&chunk).unwrap();
                }
                // SAFETY: signal 0 to this very thread only checks that it exists.
                assert_eq!(unsafe { libc::pthread_kill(libc::pthread_self(), 0) }, 0);
                // SAFETY: KVM_RUN takes no argument; stdin is no vCPU, so the call fails.
                let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, KVM_RUN() as _, 0) };
                assert_eq!(rc, -1);
                say("survived\n");
                // SAFETY: ends the process without the test harness, which the filter would stop.
                unsafe { libc::_exit(0) };
            }
            other => panic!("unknown action {other}"),
        }
        say("not stopped\n");
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }

    /// Runs `action` and checks that the sandbox stopped it at `syscall`, on stderr and in
    /// the exit file.
    fn assert_stopped(action: &str, syscall: i64) {
        let (out, dir) = sandboxed(action);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(
            out.status.code(),
            Some(VIOLATION_EXIT_CODE),
            "{stdout}{stderr}"
        );
        assert!(stdout.contains("sandboxed\n"), "{stdout}");
        assert!(!stdout.contains("not stopped"), "{stdout}");
        let expected = format!("the seccomp sandbox stopped syscall {syscall} on thread ");
        assert!(stderr.contains(&expected), "{stderr}");
        let exit: hvnode_api::vmm::VmExit =
            serde_json::from_slice(&std::fs::read(dir.join("exit.json")).unwrap()).unwrap();
        assert_eq!(exit.code, VIOLATION_EXIT_CODE);
        assert!(exit.reason.starts_with(&expected), "{}", exit.reason);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_forbidden_socket_call_ends_the_process_with_code_2_naming_it() {
        assert_stopped("socket", libc::SYS_socket);
    }

    #[test]
    fn opening_a_file_after_set_up_is_forbidden() {
        assert_stopped("open", libc::SYS_openat);
    }

    #[test]
    fn fork_is_forbidden() {
        assert_stopped("fork", libc::SYS_clone);
    }

    #[test]
    fn executable_memory_is_forbidden() {
        assert_stopped("mmap-exec", libc::SYS_mmap);
    }

    #[test]
    fn ioctls_other_than_kvm_run_are_forbidden() {
        assert_stopped("ioctl", libc::SYS_ioctl);
    }

    #[test]
    fn signals_to_other_processes_are_forbidden() {
        assert_stopped("signal-other", libc::SYS_tgkill);
    }

    #[test]
    fn a_32_bit_syscall_is_killed_by_sigsys() {
        use std::os::unix::process::ExitStatusExt;
        let (out, dir) = sandboxed("int80");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_panic_is_caught_and_printed_under_the_filter() {
        let (out, dir) = sandboxed("panic");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stderr.contains("a bug"), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("survived\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_snapshot_creates_its_files_but_no_existing_file_opens() {
        let (out, dir) = sandboxed("snapshot-files");
        assert!(String::from_utf8_lossy(&out.stdout).contains("survived\n"));
        let f = dir.join("snap/memory");
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 1 << 20);
        assert_eq!(&std::fs::read(&f).unwrap()[8192..8196], b"page");
        let _ = std::fs::remove_dir_all(&dir);
        assert_stopped("snapshot-files", libc::SYS_openat);
    }

    #[test]
    fn threads_eventfds_kicks_and_the_serial_log_trim_pass() {
        let (out, dir) = sandboxed("allowed");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("survived\n"));
        let log = std::fs::metadata(dir.join("console.log")).unwrap().len();
        assert!(
            (1..=crate::devices::legacy::serial::LIMIT).contains(&log),
            "log {log} bytes"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_reason_keeps_the_exit_file_valid_json_whatever_the_thread_name() {
        let reason = violation(41, b"a\"b\\c d\n\0junk", 7);
        assert_eq!(
            reason.bytes(),
            b"the seccomp sandbox stopped syscall 41 on thread a?b?c?d? (tid 7)"
        );
        let exit: hvnode_api::vmm::VmExit =
            serde_json::from_slice(exit_json(reason.bytes()).bytes()).unwrap();
        assert_eq!(exit.code, 2);
    }
}
