//! Supervision of the node's services: the agent and the console on each terminal.
//! A dead service is restarted with exponential backoff; each gets its own cgroup.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::out;
use crate::spawn::{self, Spec, Stdio};

/// First restart delay.
const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A service that ran this long counts as healthy: its backoff starts over.
const HEALTHY_UPTIME: Duration = Duration::from_secs(60);
/// Retry interval while a service's binary is missing.
const MISSING_RETRY: Duration = Duration::from_secs(30);
/// Where the services' cgroups go.
const CGROUP_ROOT: &str = "/sys/fs/cgroup/hvnode";

/// The delay before restarting a service that exited after `uptime`, given the delay
/// used before its last start (`None` for the first restart).
pub fn next_backoff(previous: Option<Duration>, uptime: Duration) -> Duration {
    match previous {
        _ if uptime >= HEALTHY_UPTIME => BACKOFF_START,
        None => BACKOFF_START,
        Some(d) => (d * 2).clamp(BACKOFF_START, BACKOFF_MAX),
    }
}

/// How a service's output is handled.
#[derive(Debug, Clone)]
pub enum Output {
    /// On a terminal (the console).
    Tty(PathBuf),
    /// Copied into the node log, prefixed with the service name.
    Log,
}

/// A supervised service.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    /// Short name (log prefix, cgroup name).
    pub name: String,
    /// Binary.
    pub path: PathBuf,
    /// Arguments after argv\[0\].
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<String>,
    /// Where its output goes.
    pub output: Output,
}

#[derive(Debug)]
enum State {
    Running { pid: Pid, since: Instant },
    Waiting { until: Instant },
    Stopped,
}

#[derive(Debug)]
struct Service {
    def: ServiceDef,
    state: State,
    backoff: Option<Duration>,
    missing_logged: bool,
}

/// The set of services.
#[derive(Debug, Default)]
pub struct Supervisor {
    services: Vec<Service>,
    stopping: bool,
}

impl Supervisor {
    /// Adds a service; it is started at the next [`Supervisor::tick`].
    pub fn add(&mut self, def: ServiceDef) {
        self.services.push(Service {
            def,
            state: State::Waiting {
                until: Instant::now(),
            },
            backoff: None,
            missing_logged: false,
        });
    }

    /// Starts services that are due. Returns the time until the next one is due.
    pub fn tick(&mut self) -> Option<Duration> {
        if self.stopping {
            return None;
        }
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        for svc in &mut self.services {
            if let State::Waiting { until } = svc.state {
                if until <= now {
                    start(svc);
                }
            }
            if let State::Waiting { until } = svc.state {
                let left = until.saturating_duration_since(now);
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        }
        next
    }

    /// Handles a reaped child. Returns whether it was one of the services.
    pub fn child_exited(&mut self, pid: Pid, how: &str) -> bool {
        let stopping = self.stopping;
        for svc in &mut self.services {
            let State::Running { pid: p, since } = svc.state else {
                continue;
            };
            if p != pid {
                continue;
            }
            if stopping {
                svc.state = State::Stopped;
                return true;
            }
            let uptime = since.elapsed();
            let delay = next_backoff(svc.backoff, uptime);
            svc.backoff = Some(delay);
            out::log_only(&format!(
                "init: service {} {how} after {} s; restart in {} s",
                svc.def.name,
                uptime.as_secs(),
                delay.as_secs()
            ));
            svc.state = State::Waiting {
                until: Instant::now() + delay,
            };
            return true;
        }
        false
    }

    /// Sends SIGTERM to every running service and stops restarting them. Returns their pids.
    pub fn stop_all(&mut self) -> Vec<Pid> {
        self.stopping = true;
        let mut pids = Vec::new();
        for svc in &mut self.services {
            match svc.state {
                State::Running { pid, .. } => {
                    let _ = kill(pid, Signal::SIGTERM);
                    pids.push(pid);
                }
                _ => svc.state = State::Stopped,
            }
        }
        pids
    }
}

fn start(svc: &mut Service) {
    if !svc.def.path.is_file() {
        if !svc.missing_logged {
            out::say(&format!(
                "{} is missing: will retry",
                svc.def.path.display()
            ));
            svc.missing_logged = true;
        }
        svc.state = State::Waiting {
            until: Instant::now() + MISSING_RETRY,
        };
        return;
    }
    svc.missing_logged = false;
    let args: Vec<&str> = svc.def.args.iter().map(String::as_str).collect();
    let mut spec = Spec::new(&svc.def.path, &args);
    spec.env.extend(svc.def.env.iter().cloned());
    spec.cgroup = service_cgroup(&svc.def.name);
    let mut reader: Option<OwnedFd> = None;
    spec.stdio = match &svc.def.output {
        Output::Tty(p) => Stdio::Tty(p.clone()),
        Output::Log => match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok((rd, wr)) => {
                reader = Some(rd);
                Stdio::Output(wr)
            }
            Err(_) => Stdio::Null,
        },
    };
    match spawn::spawn(spec) {
        Ok(pid) => {
            out::log_only(&format!("init: started {} (pid {pid})", svc.def.name));
            if let Some(rd) = reader {
                let name = svc.def.name.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("log-{name}"))
                    .spawn(move || out::copy_lines(rd, &name));
            }
            svc.state = State::Running {
                pid,
                since: Instant::now(),
            };
        }
        Err(e) => {
            let delay = next_backoff(svc.backoff, Duration::ZERO);
            svc.backoff = Some(delay);
            out::log_only(&format!("init: cannot start {}: {e}", svc.def.name));
            svc.state = State::Waiting {
                until: Instant::now() + delay,
            };
        }
    }
}

/// Creates the service's cgroup when cgroup2 is mounted.
fn service_cgroup(name: &str) -> Option<PathBuf> {
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return None;
    }
    let dir = Path::new(CGROUP_ROOT).join(name);
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// Enables the useful controllers for the services' cgroups (best effort).
pub fn setup_cgroups() {
    let root = Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        return;
    }
    let _ = std::fs::create_dir_all(CGROUP_ROOT);
    for dir in [root, Path::new(CGROUP_ROOT)] {
        for c in ["+cpu", "+memory", "+pids", "+io"] {
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), c);
        }
    }
}

/// The agent, started once storage and network are set up.
pub fn agent_service() -> ServiceDef {
    ServiceDef {
        name: "agent".to_owned(),
        path: PathBuf::from(hvnode_api::paths::AGENT_BINARY),
        args: Vec::new(),
        env: Vec::new(),
        output: Output::Log,
    }
}

/// The console on tty1 and on a real ttyS0, started when the node is ready (see
/// `out::hand_consoles_to_tui`).
pub fn console_services() -> Vec<ServiceDef> {
    let mut defs = Vec::new();
    if Path::new("/dev/tty1").exists() {
        defs.push(console("console-tty1", "/dev/tty1", "linux"));
    }
    if Path::new("/dev/ttyS0").exists() && out::serial_present("ttyS0") {
        defs.push(console("console-ttyS0", "/dev/ttyS0", "vt220"));
    }
    defs
}

fn console(name: &str, tty: &str, term: &str) -> ServiceDef {
    ServiceDef {
        name: name.to_owned(),
        path: PathBuf::from(hvnode_api::paths::CONSOLE_BINARY),
        args: Vec::new(),
        env: vec![format!("TERM={term}")],
        output: Output::Tty(PathBuf::from(tty)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_thirty() {
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let next = next_backoff(d, Duration::from_secs(2));
            seen.push(next.as_secs());
            d = Some(next);
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn backoff_resets_after_a_minute_of_uptime() {
        let d = next_backoff(Some(Duration::from_secs(30)), Duration::from_secs(60));
        assert_eq!(d, BACKOFF_START);
        let d = next_backoff(Some(Duration::from_secs(30)), Duration::from_secs(59));
        assert_eq!(d, BACKOFF_MAX);
    }

    #[test]
    fn stop_all_terminates_running_services_and_ends_restarts() {
        let mut sup = Supervisor::default();
        sup.add(ServiceDef {
            name: "sleeper".into(),
            path: PathBuf::from("/bin/sleep"),
            args: vec!["30".into()],
            env: Vec::new(),
            output: Output::Log,
        });
        assert_eq!(sup.tick(), None, "nothing is waiting once the service runs");
        let pids = sup.stop_all();
        assert_eq!(pids.len(), 1);
        let status = nix::sys::wait::waitpid(pids[0], None).expect("waitpid");
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Signaled(pids[0], Signal::SIGTERM, false)
        );
        assert!(sup.child_exited(pids[0], "was killed by SIGTERM"));
        assert_eq!(sup.tick(), None, "no restart while stopping");
    }

    #[test]
    fn dead_service_is_scheduled_for_restart_after_one_second() {
        let mut sup = Supervisor::default();
        sup.add(ServiceDef {
            name: "quick".into(),
            path: PathBuf::from("/bin/true"),
            args: Vec::new(),
            env: Vec::new(),
            output: Output::Log,
        });
        assert_eq!(sup.tick(), None);
        let State::Running { pid, .. } = sup.services[0].state else {
            panic!("not running")
        };
        let _ = nix::sys::wait::waitpid(pid, None).expect("waitpid");
        assert!(sup.child_exited(pid, "exited with code 0"));
        let next = sup.tick().expect("restart pending");
        assert!(
            next <= BACKOFF_START && next > Duration::from_millis(500),
            "{next:?}"
        );
        assert!(!sup.child_exited(Pid::from_raw(999_999), "unknown"));
    }

    #[test]
    fn missing_binary_is_retried_slowly_without_spawning() {
        let mut sup = Supervisor::default();
        sup.add(ServiceDef {
            name: "ghost".into(),
            path: PathBuf::from("/nonexistent/hvnode-ghost"),
            args: Vec::new(),
            env: Vec::new(),
            output: Output::Log,
        });
        let next = sup.tick().expect("the service waits");
        assert!(next > Duration::from_secs(25), "{next:?}");
        assert!(sup.stop_all().is_empty());
        assert_eq!(sup.tick(), None);
    }
}
