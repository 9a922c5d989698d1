//! Starting processes from PID 1 and collecting their exit statuses.
//!
//! Init reaps every child with `waitpid(-1)` (orphans are reparented to it), so it cannot use
//! `std::process::Child::wait`. Children are started with fork + execve here; a caller that
//! needs an exit status registers the pid with the [`Reaper`] and waits on it.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// Errors of process start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program is not there.
    #[error("Program {0} not found")]
    Missing(PathBuf),
    /// An argument contained a NUL byte.
    #[error("Argument contains a NUL byte")]
    Nul,
    /// A system call failed before the child existed.
    #[error("Cannot start {path}: {source}")]
    Sys {
        /// The program.
        path: PathBuf,
        /// The cause.
        source: nix::Error,
    },
}

/// What the child's standard streams are connected to.
#[derive(Debug)]
pub enum Stdio {
    /// /dev/null for all three.
    Null,
    /// stdin /dev/null, stdout and stderr to this fd (a pipe's write end).
    Output(OwnedFd),
    /// A terminal as stdin/stdout/stderr and controlling terminal (new session).
    Tty(PathBuf),
}

/// A process to start.
#[derive(Debug)]
pub struct Spec {
    /// Program path.
    pub path: PathBuf,
    /// Arguments after argv\[0\].
    pub args: Vec<String>,
    /// Environment, `KEY=value`.
    pub env: Vec<String>,
    /// Standard streams.
    pub stdio: Stdio,
    /// Cgroup directory to join before exec (best effort).
    pub cgroup: Option<PathBuf>,
}

impl Spec {
    /// A program with arguments, /dev/null streams and the default environment.
    pub fn new(path: impl Into<PathBuf>, args: &[&str]) -> Self {
        Self {
            path: path.into(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: default_env(),
            stdio: Stdio::Null,
            cgroup: None,
        }
    }
}

/// The environment every child gets.
pub fn default_env() -> Vec<String> {
    vec![
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "HOME=/root".to_owned(),
        "LANG=C.UTF-8".to_owned(),
    ]
}

fn cstring(s: &[u8]) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul)
}

/// Forks and execs `spec`. The caller owns the pid (the reaper collects its status).
pub fn spawn(spec: Spec) -> Result<Pid, SpawnError> {
    if !spec.path.is_file() {
        return Err(SpawnError::Missing(spec.path.clone()));
    }
    // Everything the child needs is prepared before fork: after fork only
    // async-signal-safe calls are allowed.
    let path = cstring(spec.path.as_os_str().as_bytes())?;
    let mut argv = vec![path.clone()];
    for a in &spec.args {
        argv.push(cstring(a.as_bytes())?);
    }
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|e| cstring(e.as_bytes()))
        .collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let devnull = c"/dev/null";
    let tty = match &spec.stdio {
        Stdio::Tty(p) => Some(cstring(p.as_os_str().as_bytes())?),
        _ => None,
    };
    let out_fd = match &spec.stdio {
        Stdio::Output(fd) => fd.as_raw_fd(),
        _ => -1,
    };
    let procs_fd = spec.cgroup.as_ref().and_then(|dir| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .ok()
    });
    let procs_raw = procs_fd.as_ref().map_or(-1, |f| f.as_raw_fd());

    // SAFETY: the child only calls async-signal-safe functions (setsid, open, dup2, ioctl,
    // write, sigprocmask, sigaction, execve, _exit) on data prepared before the fork.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { child }) => Ok(child),
        Ok(nix::unistd::ForkResult::Child) => {
            // SAFETY: see above; every pointer refers to memory owned by this frame.
            unsafe {
                child_exec(
                    &path,
                    &argv_ptrs,
                    &envp_ptrs,
                    devnull,
                    tty.as_deref(),
                    out_fd,
                    procs_raw,
                )
            }
        }
        Err(source) => Err(SpawnError::Sys {
            path: spec.path.clone(),
            source,
        }),
    }
}

/// The child side of [`spawn`]. Never returns.
///
/// # Safety
/// Must only be called in a freshly forked child; pointers must be valid C strings and
/// NULL-terminated arrays.
unsafe fn child_exec(
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    devnull: &std::ffi::CStr,
    tty: Option<&std::ffi::CStr>,
    out_fd: i32,
    procs_fd: i32,
) -> ! {
    // SAFETY: the caller guarantees we are a forked child; all calls below are
    // async-signal-safe and their arguments are valid.
    unsafe {
        if procs_fd >= 0 {
            libc::write(procs_fd, b"0".as_ptr().cast(), 1);
            libc::close(procs_fd);
        }
        // Init blocks its signals and Rust ignores SIGPIPE; a child starts clean.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in [
            libc::SIGPIPE,
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGCHLD,
            libc::SIGHUP,
            libc::SIGPWR,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::setsid();
        match tty {
            Some(tty) => {
                let fd = libc::open(tty.as_ptr(), libc::O_RDWR);
                if fd < 0 {
                    libc::_exit(126);
                }
                libc::ioctl(fd, libc::TIOCSCTTY, 1);
                for target in 0..3 {
                    libc::dup2(fd, target);
                }
                if fd > 2 {
                    libc::close(fd);
                }
            }
            None => {
                let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    let out = if out_fd >= 0 { out_fd } else { null };
                    libc::dup2(out, 1);
                    libc::dup2(out, 2);
                    if null > 2 {
                        libc::close(null);
                    }
                    if out_fd > 2 {
                        libc::close(out_fd);
                    }
                }
            }
        }
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        libc::_exit(127)
    }
}

/// Exit statuses of children somebody waits for; filled by the main loop's reaping.
#[derive(Debug, Default)]
pub struct Reaper {
    state: Mutex<HashMap<i32, Option<WaitStatus>>>,
    cond: Condvar,
}

impl Reaper {
    /// Starts `spec` and registers its pid for [`Reaper::wait`] in one step, so the exit
    /// cannot be reaped before it is watched.
    pub fn spawn_watched(&self, spec: Spec) -> Result<Pid, SpawnError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let pid = spawn(spec)?;
        st.insert(pid.as_raw(), None);
        Ok(pid)
    }

    /// Records a reaped child; returns whether somebody was waiting for it.
    pub fn record(&self, pid: Pid, status: WaitStatus) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.get_mut(&pid.as_raw()) {
            Some(slot) => {
                *slot = Some(status);
                self.cond.notify_all();
                true
            }
            None => false,
        }
    }

    /// Waits for a watched child's exit status (`None` after `timeout`).
    pub fn wait(&self, pid: Pid, timeout: Duration) -> Option<WaitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(Some(status)) = st.get(&pid.as_raw()) {
                let status = *status;
                st.remove(&pid.as_raw());
                return Some(status);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                st.remove(&pid.as_raw());
                return None;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs a program to completion, its output going to the node log line by line.
    /// Returns the exit code (signals count as 128 + signal number).
    pub fn run(&self, path: &Path, args: &[&str], timeout: Duration) -> Result<i32, SpawnError> {
        let (rd, wr) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|source| SpawnError::Sys {
                path: path.to_path_buf(),
                source,
            })?;
        let mut spec = Spec::new(path, args);
        spec.stdio = Stdio::Output(wr);
        let pid = self.spawn_watched(spec)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let reader = std::thread::spawn(move || crate::out::copy_lines(rd, &name));
        let status = self.wait(pid, timeout);
        if status.is_none() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = reader.join();
        Ok(match status {
            Some(WaitStatus::Exited(_, code)) => code,
            Some(WaitStatus::Signaled(_, sig, _)) => 128 + sig as i32,
            _ => 255,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::waitpid;

    /// Stands in for the main loop: reaps exactly `pid` (other tests' children are theirs).
    fn reap_into(reaper: &Reaper, pid: Pid) {
        let status = waitpid(pid, None).expect("waitpid");
        assert!(reaper.record(pid, status), "the pid was watched");
    }

    #[test]
    fn watched_child_status_and_output_reach_the_waiter() {
        let reaper = Reaper::default();
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut spec = Spec::new("/bin/sh", &["-c", "echo out; echo err >&2; exit 3"]);
        spec.stdio = Stdio::Output(wr);
        let pid = reaper.spawn_watched(spec).expect("spawn");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(rd), &mut text).expect("read");
        reap_into(&reaper, pid);
        assert_eq!(
            reaper.wait(pid, Duration::from_secs(5)),
            Some(WaitStatus::Exited(pid, 3))
        );
        assert_eq!(text, "out\nerr\n");
    }

    #[test]
    fn child_gets_a_clean_environment_and_signal_mask() {
        let reaper = Reaper::default();
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut spec = Spec::new(
            "/bin/sh",
            &["-c", "echo $PATH; grep SigBlk /proc/self/status"],
        );
        spec.stdio = Stdio::Output(wr);
        let pid = reaper.spawn_watched(spec).expect("spawn");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(rd), &mut text).expect("read");
        reap_into(&reaper, pid);
        assert!(
            text.starts_with("/usr/sbin:/usr/bin:/sbin:/bin\n"),
            "{text}"
        );
        assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
    }

    #[test]
    fn unwatched_pid_is_not_recorded_and_wait_times_out() {
        let reaper = Reaper::default();
        assert!(!reaper.record(
            Pid::from_raw(999_999),
            WaitStatus::Exited(Pid::from_raw(999_999), 0)
        ));
        assert_eq!(
            reaper.wait(Pid::from_raw(999_999), Duration::from_millis(10)),
            None
        );
    }

    #[test]
    fn missing_program_is_reported_without_forking() {
        let err = spawn(Spec::new("/nonexistent/prog", &[])).expect_err("missing");
        assert!(matches!(err, SpawnError::Missing(_)));
    }
}
