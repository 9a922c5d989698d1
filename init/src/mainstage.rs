//! Main stage: PID 1 on the read-only root. Mounts, modules, storage, host name,
//! network, services, readiness, the control socket, and the event loop that reaps
//! children and shuts the node down.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hvnode_api::config::{NetworkConfig, NodeConfig};
use hvnode_api::paths;
use hvnode_net::Network;
use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::cmdline::Cmdline;
use crate::control::{self, PowerKind};
use crate::spawn::Reaper;
use crate::storage::Storage;
use crate::supervisor::{self, Supervisor};
use crate::{hostname, kmod, kmsg, network, nodelog, out, power, ready, sys};

/// What other threads tell the main loop.
#[derive(Debug)]
enum Event {
    /// Storage and network are set up: start the agent.
    BootDone,
    /// The node is ready (or the agent is late): the console TUI takes the consoles.
    ConsolesDue,
    /// Shut down.
    Power(PowerKind),
}

/// State shared by the main loop, the boot thread and the control socket.
struct Node {
    cmdline: Cmdline,
    reaper: Reaper,
    storage: Storage,
    net: OnceLock<Network>,
    events: Sender<Event>,
    watchdog: crate::watchdog::Watchdog,
}

impl control::Handler for Node {
    fn apply_network(&self, network: &NetworkConfig) -> Result<(), String> {
        let net = self
            .net
            .get()
            .ok_or("Networking is not running: see the node log")?;
        net.apply(network)
            .map_err(|e| format!("Network change failed: {e}"))?;
        out::log_only("init: network configuration applied");
        Ok(())
    }

    fn set_hostname(&self, name: &str) -> Result<(), String> {
        hostname::set(name).map_err(|e| e.to_string())?;
        if let Some(net) = self.net.get() {
            net.set_hostname(name);
        }
        out::log_only(&format!("init: host name set to {name}"));
        Ok(())
    }

    fn init_storage(&self, device: &str) -> Result<(), String> {
        self.storage
            .init_storage(device, &self.reaper)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn watchdog(&self, feed_ms: u64) -> Result<(), String> {
        self.watchdog.grant(feed_ms).map(drop)
    }

    fn watchdog_disarm(&self) -> Result<(), String> {
        self.watchdog.disarm()
    }

    fn announce(&self, message: &str) {
        out::announce(3, message, true);
    }

    fn power(&self, kind: PowerKind) {
        let _ = self.events.send(Event::Power(kind));
    }
}

fn mount_main() -> Result<(), sys::SysError> {
    let nosuid = MsFlags::MS_NOSUID;
    let nodev_noexec = nosuid | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // When booted without our initrd, the API filesystems are not there yet.
    sys::ensure_mount("devtmpfs", "/dev", "devtmpfs", nosuid, Some("mode=0755"))?;
    sys::ensure_std_fds();
    sys::ensure_mount("proc", "/proc", "proc", nodev_noexec, None)?;
    sys::ensure_mount("sysfs", "/sys", "sysfs", nodev_noexec, None)?;
    sys::ensure_mount(
        "tmpfs",
        "/run",
        "tmpfs",
        nosuid | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    sys::ensure_mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        nosuid | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    sys::ensure_mount(
        "tmpfs",
        "/var",
        "tmpfs",
        nosuid | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    if let Err(e) = sys::ensure_mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nodev_noexec,
        Some("nsdelegate"),
    ) {
        out::say(&format!("{e}: services run without cgroups"));
    }
    sys::ensure_mount(
        "devpts",
        "/dev/pts",
        "devpts",
        nosuid | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=0620,ptmxmode=0666"),
    )?;
    sys::ensure_mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        nosuid | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    for dir in [
        "/var/log/hvnode",
        paths::RUN_DIR,
        paths::VMS_RUN_DIR,
        paths::DATA_DIR,
        "/var/tmp",
    ] {
        let _ = std::fs::create_dir_all(dir);
    }
    Ok(())
}

fn load_config() -> NodeConfig {
    match std::fs::read_to_string(paths::NODE_CONFIG) {
        Ok(text) => NodeConfig::from_toml(&text).unwrap_or_else(|e| {
            out::say(&format!(
                "{}: {e}; using defaults (DHCP)",
                paths::NODE_CONFIG
            ));
            NodeConfig::default()
        }),
        Err(_) => NodeConfig::default(),
    }
}

/// The boot thread: modules, storage, configuration, network, host name.
fn boot(node: &Arc<Node>, power_tx: Sender<PowerKind>) {
    kmod::load_main_stage();
    let _ = std::thread::Builder::new()
        .name("power-button".into())
        .spawn(move || power::power_button_loop(power_tx));
    node.storage
        .setup_at_boot(node.cmdline.data.as_ref(), &node.reaper);
    let ctl_node = Arc::clone(node);
    match control::listen(paths::INIT_SOCKET) {
        Ok(listener) => {
            let _ = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || control::serve(listener, ctl_node.as_ref()));
        }
        Err(e) => out::say(&e.to_string()),
    }
    let config = load_config();
    let net = network::start(&config, node.cmdline.ip.as_deref());
    let macs = match &net {
        Some(n) => n.macs(),
        None => hostname::sysfs_macs(),
    };
    let name = config
        .hostname
        .clone()
        .unwrap_or_else(|| hostname::default_hostname(&macs));
    match hostname::set(&name) {
        Ok(()) => out::say(&format!("host name {name}")),
        Err(e) => out::say(&e.to_string()),
    }
    if let Some(n) = net {
        n.set_hostname(&name);
        let _ = node.net.set(n);
    }
}

/// The ready thread: report the network, wait for the agent, announce readiness.
fn watch_ready(node: &Node) {
    if let Some(net) = node.net.get() {
        net.wait_configured(network::CONFIGURE_WAIT);
        for line in network::status_lines(&net.status()) {
            out::say(&line);
        }
    }
    let socket = Path::new(paths::AGENT_SOCKET);
    let mut waited = Duration::ZERO;
    let step = Duration::from_millis(300);
    while !ready::agent_healthy(socket) {
        std::thread::sleep(step);
        waited += step;
        if waited.as_secs() == 60 && waited.subsec_millis() < 300 {
            out::say("the agent does not answer yet; still waiting (see the node log)");
            // The console still helps without an agent (it says the agent is unreachable,
            // and its Power screen needs none): do not keep the admin waiting for it.
            hand_consoles_to_tui(node);
        }
    }
    crate::assess::run(crate::assess::Health {
        data_mounted: node.storage.status().persistent,
        network_configured: node.net.get().is_some_and(|n| {
            n.status()
                .interfaces
                .iter()
                .any(|i| !i.addresses.is_empty())
        }),
        kvm_usable: crate::assess::kvm_check(),
    });
    out::milestone("ready");
    if let Some(times) = boot_times() {
        out::milestone(&times);
    }
    hand_consoles_to_tui(node);
}

/// The TUI owns the consoles from here on: init and the kernel stop writing there first, so that
/// nothing lands on the TUI's screen, then the console services start.
fn hand_consoles_to_tui(node: &Node) {
    if out::consoles_owned_by_tui() {
        return;
    }
    out::hand_consoles_to_tui(node.cmdline.debug);
    let _ = node.events.send(Event::ConsolesDue);
}

/// `boot times: kernel_to_init_s A, init_to_ready_s B`, from the kernel's clock: PID 1's start
/// time (kept across the early stage's exec) and CLOCK_BOOTTIME now.
fn boot_times() -> Option<String> {
    let stat = std::fs::read_to_string("/proc/1/stat").ok()?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let now_s = now.tv_sec() as f64 + now.tv_nsec() as f64 / 1e9;
    let init_s = pid1_start_secs(&stat, sys::clock_ticks_per_sec())?;
    Some(format_boot_times(init_s, now_s))
}

/// PID 1's start time in seconds since boot, from `/proc/1/stat` (field 22, in clock ticks).
fn pid1_start_secs(stat: &str, ticks_per_sec: u64) -> Option<f64> {
    // The command name (field 2) may hold spaces; count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    (ticks_per_sec > 0).then(|| ticks as f64 / ticks_per_sec as f64)
}

fn format_boot_times(init_s: f64, ready_s: f64) -> String {
    format!(
        "boot times: kernel_to_init_s {init_s:.2}, init_to_ready_s {:.2}",
        (ready_s - init_s).max(0.0)
    )
}

fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with code {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
        other => format!("{other:?}"),
    }
}

fn reap_children(node: &Node, sup: &mut Supervisor) {
    loop {
        let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(s) => s,
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        let Some(pid) = status.pid() else { continue };
        if node.reaper.record(pid, status) {
            continue;
        }
        if !sup.child_exited(pid, &describe(&status)) {
            out::log_only(&format!(
                "init: reaped process {pid} ({})",
                describe(&status)
            ));
        }
    }
}

/// Runs the main stage. Returns only the reason for a fatal error.
pub fn run() -> String {
    sys::block_signals();
    sys::ensure_std_fds();
    let _ = nix::sys::reboot::set_cad_enabled(false);
    if let Err(e) = mount_main() {
        return e.to_string();
    }
    if let Err(e) = out::open_node_log(Path::new(paths::NODE_LOG), nodelog::LOG_LIMIT) {
        out::say(&e.to_string());
    }
    out::say(&format!("main stage, hvnode {}", hvnode_api::VERSION));
    let _ = std::thread::Builder::new()
        .name("kmsg".into())
        .spawn(kmsg::reader_loop);
    supervisor::setup_cgroups();
    let sfd = match SignalFd::with_flags(
        &sys::handled_signals(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    ) {
        Ok(s) => s,
        Err(e) => return format!("Cannot create the signal fd: {e}"),
    };
    let (tx, rx) = channel();
    let node = Arc::new(Node {
        cmdline: Cmdline::from_proc(),
        reaper: Reaper::default(),
        storage: Storage::new(crate::storage::boot_disk()),
        net: OnceLock::new(),
        events: tx.clone(),
        watchdog: crate::watchdog::Watchdog::default(),
    });
    node.watchdog.start();
    let (power_tx, power_rx) = channel();
    let boot_node = Arc::clone(&node);
    let boot_tx = tx;
    let spawned = std::thread::Builder::new()
        .name("boot".into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                boot(&boot_node, power_tx)
            }));
            if result.is_err() {
                out::say("boot step failed (see above); starting the services anyway");
            }
            let _ = boot_tx.send(Event::BootDone);
        });
    if let Err(e) = spawned {
        return format!("Cannot start the boot thread: {e}");
    }
    event_loop(&node, &sfd, &rx, &power_rx)
}

fn event_loop(
    node: &Arc<Node>,
    sfd: &SignalFd,
    rx: &Receiver<Event>,
    power_rx: &Receiver<PowerKind>,
) -> String {
    let mut sup = Supervisor::default();
    let mut next = Duration::from_millis(500);
    loop {
        let timeout = PollTimeout::try_from(next.min(Duration::from_millis(500)))
            .unwrap_or(PollTimeout::NONE);
        let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, timeout);
        let mut shutdown: Option<PowerKind> = None;
        while let Ok(Some(info)) = sfd.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => {}
                Ok(Signal::SIGINT) => shutdown = Some(PowerKind::Reboot),
                Ok(Signal::SIGTERM) | Ok(Signal::SIGPWR) => shutdown = Some(PowerKind::PowerOff),
                _ => {}
            }
        }
        // Reap on every pass: cheap, and no SIGCHLD can be missed.
        reap_children(node, &mut sup);
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::BootDone => {
                    sup.add(supervisor::agent_service());
                    let ready_node = Arc::clone(node);
                    let _ = std::thread::Builder::new()
                        .name("ready".into())
                        .spawn(move || watch_ready(&ready_node));
                }
                Event::ConsolesDue => {
                    for def in supervisor::console_services() {
                        sup.add(def);
                    }
                }
                Event::Power(kind) => shutdown = shutdown.or(Some(kind)),
            }
        }
        if let Ok(kind) = power_rx.try_recv() {
            shutdown = shutdown.or(Some(kind));
        }
        if let Some(kind) = shutdown {
            // A power-off must not turn into the watchdog's reset on the way down. A node that
            // fenced itself keeps it armed: the reset is the point.
            node.watchdog.shut_down();
            let net = node.net.get();
            power::shutdown(kind, &mut sup, || {
                if let Some(n) = net {
                    n.stop();
                }
            });
        }
        next = sup.tick().unwrap_or(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod boot_time_tests {
    use super::{format_boot_times, pid1_start_secs};

    #[test]
    fn reads_pid1_start_time_after_a_command_name_with_spaces() {
        let stat = "1 (hvnode init) S 0 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 321 1000 10";
        assert_eq!(pid1_start_secs(stat, 100), Some(3.21));
        assert_eq!(pid1_start_secs("garbage", 100), None);
    }

    #[test]
    fn formats_boot_times_for_the_bench() {
        assert_eq!(
            format_boot_times(3.21, 15.5),
            "boot times: kernel_to_init_s 3.21, init_to_ready_s 12.29"
        );
    }
}
