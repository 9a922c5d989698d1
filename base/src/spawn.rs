//! Starting a program the way a jailed VMM needs it started (docs/vmm.md#the-jail): in a PID
//! namespace of its own, already inside its cgroup from its first instruction, and watched
//! through a pidfd. `std::process::Command` can do none of the three: a process cannot enter a
//! new PID namespace itself (`unshare(CLONE_NEWPID)` applies to its children, and no thread
//! can be started after it), so the parent clones it there with `clone3`.
//!
//! In cgroup v2 the child is cloned straight into its cgroup (`CLONE_INTO_CGROUP`); in v1 it
//! writes itself into each hierarchy's `cgroup.procs` before it execs. Either way it runs none of
//! its own code outside the cgroup. A failure in the child before `execve` comes back to
//! [`Spawn::spawn`] as its error, through a close-on-exec pipe (as std does).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use crate::cgroup::{Cgroup, Placement};

/// Where a standard stream of the child goes.
#[derive(Debug)]
pub enum Stdio {
    /// The parent's.
    Inherit,
    /// /dev/null.
    Null,
    /// This descriptor.
    Fd(OwnedFd),
}

impl From<File> for Stdio {
    fn from(f: File) -> Stdio {
        Stdio::Fd(f.into())
    }
}

/// A program to start (see the module documentation).
#[derive(Debug)]
pub struct Spawn {
    program: CString,
    args: Vec<CString>,
    env: Vec<(CString, CString)>,
    stdio: [Stdio; 3],
    process_group: bool,
    new_pid_namespace: bool,
    cgroup: Option<Placement>,
    error: Option<std::io::Error>,
}

fn cstring(s: &OsStr) -> Result<CString, std::io::Error> {
    CString::new(s.as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{s:?} holds a NUL byte"),
        )
    })
}

/// clone3's flag (libc's constant overflows its type).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What the child reports when it fails before `execve`: the step and the errno.
const STEP_CGROUP: u8 = 1;
const STEP_STDIO: u8 = 2;
const STEP_EXEC: u8 = 3;

impl Spawn {
    /// `program` (a path: no PATH search), with the caller's environment, standard streams and
    /// namespaces.
    pub fn new(program: impl AsRef<OsStr>) -> Spawn {
        let (program, error) = match cstring(program.as_ref()) {
            Ok(p) => (p, None),
            Err(e) => (CString::default(), Some(e)),
        };
        Spawn {
            args: vec![program.clone()],
            program,
            env: Vec::new(),
            stdio: [Stdio::Inherit, Stdio::Inherit, Stdio::Inherit],
            process_group: false,
            new_pid_namespace: false,
            cgroup: None,
            error,
        }
    }

    fn keep(&mut self, r: Result<CString, std::io::Error>) -> Option<CString> {
        match r {
            Ok(c) => Some(c),
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Spawn {
        if let Some(c) = self.keep(cstring(arg.as_ref())) {
            self.args.push(c);
        }
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&mut self, args: I) -> &mut Spawn {
        for a in args {
            self.arg(a);
        }
        self
    }

    /// Sets `key` in the child's environment (the rest is the caller's).
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Spawn {
        let k = self.keep(cstring(key.as_ref()));
        let v = self.keep(cstring(value.as_ref()));
        if let (Some(k), Some(v)) = (k, v) {
            self.env.push((k, v));
        }
        self
    }

    /// Standard input.
    pub fn stdin(&mut self, s: impl Into<Stdio>) -> &mut Spawn {
        self.stdio[0] = s.into();
        self
    }

    /// Standard output.
    pub fn stdout(&mut self, s: impl Into<Stdio>) -> &mut Spawn {
        self.stdio[1] = s.into();
        self
    }

    /// Standard error.
    pub fn stderr(&mut self, s: impl Into<Stdio>) -> &mut Spawn {
        self.stdio[2] = s.into();
        self
    }

    /// A process group of its own: signals to the caller's group do not reach it.
    pub fn process_group(&mut self) -> &mut Spawn {
        self.process_group = true;
        self
    }

    /// A PID namespace of its own, in which it is PID 1 and sees no other process (needs
    /// CAP_SYS_ADMIN).
    pub fn new_pid_namespace(&mut self) -> &mut Spawn {
        self.new_pid_namespace = true;
        self
    }

    /// Starts it inside `cgroup`.
    pub fn cgroup(&mut self, cgroup: &Cgroup) -> &mut Spawn {
        match cgroup.placement() {
            Ok(p) => self.cgroup = Some(p),
            Err(e) => {
                self.error
                    .get_or_insert(std::io::Error::other(e.to_string()));
            }
        }
        self
    }

    /// Starts it; returns once it has exec'd the program (or failed to).
    pub fn spawn(&mut self) -> std::io::Result<Child> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        // Everything the child touches is built here: between clone3 and execve it may only
        // make async-signal-safe calls, on this memory.
        let overridden = |k: &[u8]| self.env.iter().any(|(key, _)| key.as_bytes() == k);
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| !overridden(k.as_bytes()))
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        for (k, v) in &self.env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env.push(CString::new(kv).map_err(std::io::Error::other)?);
        }
        let mut argv: Vec<*const libc::c_char> = self.args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let null = File::options().read(true).write(true).open("/dev/null")?;
        let stdio: [RawFd; 3] = std::array::from_fn(|i| match &self.stdio[i] {
            Stdio::Inherit => -1,
            Stdio::Null => null.as_raw_fd(),
            Stdio::Fd(fd) => fd.as_raw_fd(),
        });
        let (v1_procs, v2_dir): (Vec<RawFd>, Option<RawFd>) = match &self.cgroup {
            None => (Vec::new(), None),
            Some(Placement::V2(dir)) => (Vec::new(), Some(dir.as_raw_fd())),
            Some(Placement::V1(files)) => (files.iter().map(|f| f.as_raw_fd()).collect(), None),
        };
        let (report_rd, report_wr) = pipe()?;
        let mut pidfd: RawFd = -1;
        let mut flags = libc::CLONE_PIDFD as u64;
        if self.new_pid_namespace {
            flags |= libc::CLONE_NEWPID as u64;
        }
        if v2_dir.is_some() {
            flags |= CLONE_INTO_CGROUP;
        }
        let args = CloneArgs {
            flags,
            pidfd: std::ptr::from_mut(&mut pidfd) as u64,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: v2_dir.unwrap_or(0) as u64,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM makes a copy of this process with one thread, as fork
        // does; it reads `args`, which lives across the call, and writes the pidfd into
        // `pidfd`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::from_ref(&args),
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if rc == 0 {
            let child = ChildSetup {
                program: &self.program,
                argv: &argv,
                envp: &envp,
                stdio,
                v1_procs: &v1_procs,
                process_group: self.process_group,
                report: report_wr.as_raw_fd(),
            };
            // SAFETY: this is the new child; `exec` only makes async-signal-safe calls on
            // memory prepared above, and never returns.
            unsafe { child.exec() }
        }
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        drop(report_wr);
        // SAFETY: clone3 wrote a pidfd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let child = Child {
            pid: rc as u32,
            pidfd,
            status: None,
        };
        let mut report = [0u8; 5];
        let mut got = 0;
        let mut rd = File::from(report_rd);
        loop {
            match rd.read(&mut report[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if got == 0 {
            return Ok(child);
        }
        let mut child = child;
        let _ = child.wait();
        let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
        let step = match report[0] {
            STEP_CGROUP => "joining its cgroup",
            STEP_STDIO => "setting up its standard streams",
            _ => "exec",
        };
        let e = std::io::Error::from_raw_os_error(errno);
        Err(std::io::Error::new(e.kind(), format!("{step}: {e}")))
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `struct clone_args` of clone3(2), version 2 (with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// What the child does between clone3 and execve, on memory the parent prepared.
struct ChildSetup<'a> {
    program: &'a CString,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    stdio: [RawFd; 3],
    v1_procs: &'a [RawFd],
    process_group: bool,
    report: RawFd,
}

impl ChildSetup<'_> {
    /// # Safety
    /// Call only in the child of clone3, once: it makes only async-signal-safe calls and
    /// ends in execve or _exit.
    unsafe fn exec(&self) -> ! {
        let fail = |step: u8| -> ! {
            // SAFETY: errno is this thread's; write and _exit are async-signal-safe.
            unsafe {
                let errno = *libc::__errno_location();
                let e = errno.to_ne_bytes();
                let msg = [step, e[0], e[1], e[2], e[3]];
                libc::write(self.report, msg.as_ptr().cast(), msg.len());
                libc::_exit(127)
            }
        };
        // SAFETY: plain syscalls on descriptors and buffers the parent prepared.
        unsafe {
            for &procs in self.v1_procs {
                // "0" is the writer itself.
                if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                    fail(STEP_CGROUP);
                }
            }
            // Rust ignores SIGPIPE and a parent may block signals: the program starts clean.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            if self.process_group {
                libc::setpgid(0, 0);
            }
            for (target, &fd) in self.stdio.iter().enumerate() {
                if fd >= 0 && libc::dup2(fd, target as RawFd) < 0 {
                    fail(STEP_STDIO);
                }
            }
            libc::execve(
                self.program.as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
            );
        }
        fail(STEP_EXEC)
    }
}

/// A started process, watched through its pidfd (which never names a recycled pid).
#[derive(Debug)]
pub struct Child {
    pid: u32,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
}

impl Child {
    /// Its pid, as the caller's PID namespace numbers it.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Its pidfd.
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Sends it `signal` (nothing if it has been reaped).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal takes the pidfd, a signal number, no siginfo and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Kills it (SIGKILL).
    pub fn kill(&self) -> std::io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Waits for it to end and reaps it.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.reap(0)
            .map(|s| s.expect("a blocking waitid returns a status"))
    }

    /// Reaps it if it has ended.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    fn reap(&mut self, flags: libc::c_int) -> std::io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let status = loop {
            // SAFETY: an all-zero siginfo_t is valid; waitid fills it in.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our own pidfd writes `info`.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PIDFD,
                    self.pidfd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED | flags,
                )
            };
            // SAFETY: as above; si_pid is 0 when WNOHANG found nothing to reap.
            if rc == 0 && unsafe { info.si_pid() } == 0 {
                return Ok(None);
            }
            if rc == 0 {
                // SAFETY: waitid filled in a SIGCHLD siginfo, whose si_status is set.
                let value = unsafe { info.si_status() };
                break match info.si_code {
                    libc::CLD_EXITED => ExitStatus::from_raw((value & 0xff) << 8),
                    libc::CLD_DUMPED => ExitStatus::from_raw(value | 0x80),
                    _ => ExitStatus::from_raw(value),
                };
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        self.status = Some(status);
        Ok(Some(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_a_program_with_its_arguments_environment_and_streams() {
        let dir = std::env::temp_dir().join(format!("hvnode-spawn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = File::create(dir.join("out")).unwrap();
        let mut child = Spawn::new("/bin/sh")
            .args([
                "-c",
                "echo \"$1 $HVNODE_SPAWN_TEST\"; exit 7",
                "sh",
                "hello",
            ])
            .env("HVNODE_SPAWN_TEST", "world")
            .stdout(out)
            .process_group()
            .spawn()
            .unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(7));
        assert_eq!(
            std::fs::read_to_string(dir.join("out")).unwrap(),
            "hello world\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_program_that_cannot_run_is_the_spawns_error_and_a_killed_one_says_by_what() {
        let e = Spawn::new("/nonexistent/program").spawn().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().starts_with("exec: "), "{e}");
        let mut child = Spawn::new("/bin/sleep").arg("30").spawn().unwrap();
        assert!(child.try_wait().unwrap().is_none());
        child.kill().unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        // Reaped: signals and waits are no-ops now.
        child.kill().unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_new_pid_namespace_makes_it_pid_1() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::testing::cannot_run("a_new_pid_namespace_makes_it_pid_1", "not root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("hvnode-spawn-ns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = File::create(dir.join("out")).unwrap();
        let mut child = Spawn::new("/bin/sh")
            .args(["-c", "echo $$"])
            .stdout(out)
            .new_pid_namespace()
            .spawn()
            .unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0));
        assert_eq!(std::fs::read_to_string(dir.join("out")).unwrap(), "1\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
