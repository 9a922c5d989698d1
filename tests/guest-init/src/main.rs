//! /init of the boot test's guest. Runs inside a guest of the node's VMM and reports, on the
//! kernel log (which the VMM's serial port carries), what its virtio devices did:
//!
//! - `hvnode-guest: disk ok` when /dev/vda starts with the pattern the test wrote,
//! - `hvnode-guest: rng ok <hex>` after reading /dev/hwrng,
//! - `hvnode-guest: net <ifname> <address>` once DHCP over virtio-net gave an address,
//! - `hvnode-guest: kernel <release> with <n> cpu(s)` and `hvnode-guest: done`, then it powers
//!   the guest off (ACPI S5).
//!
//! Which devices it checks comes from `hvnode-guest.expect=disk,rng,net` on its command line.
//! With `hvnode-guest.count` it then runs on instead of powering off, for the migration test:
//! once a second it prints `hvnode-guest: tick <n> up <uptime>` and, with
//! `hvnode-guest.report=PORT`, sends the same line over TCP to the gateway (10.0.2.2:PORT,
//! the host through QEMU's user network), so the test sees the guest both counting and on the
//! network.
//!
//! Failures print `hvnode-guest: FAIL <what>`; the guest powers off either way.
#![forbid(unsafe_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hvnode_api::config::{NetworkConfig, NodeConfig};
use nix::mount::{mount, MsFlags};

/// The pattern the boot test writes at the start of the guest's disk.
const DISK_PATTERN: &[u8] = b"HVNODE-TEST-DISK-PATTERN-0123456789";
const MODULES_LIST: &str = "/etc/guest-modules";

fn say(msg: &str) {
    // Level 3 so that it reaches the console even with `quiet`.
    if let Ok(mut k) = OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = k.write_all(format!("<3>hvnode-guest: {msg}\n").as_bytes());
    }
}

fn mounts() {
    let fs: [(&str, &str, &str); 4] = [
        ("devtmpfs", "/dev", "devtmpfs"),
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("tmpfs", "/run", "tmpfs"),
    ];
    for (src, dst, kind) in fs {
        let _ = std::fs::create_dir_all(dst);
        let _ = mount(Some(src), dst, Some(kind), MsFlags::empty(), None::<&str>);
    }
}

fn load_modules() {
    let Ok(list) = std::fs::read_to_string(MODULES_LIST) else {
        say("FAIL no module list");
        return;
    };
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for m in list.lines().filter(|l| !l.is_empty()) {
        let p = module_params(&cmdline, m);
        if !p.is_empty() {
            say(&format!("module {m}: {p}"));
        }
        let params = CString::new(p).unwrap_or_default();
        match File::open(m) {
            Ok(f) => {
                if let Err(e) =
                    nix::kmod::finit_module(&f, &params, nix::kmod::ModuleInitFlags::empty())
                {
                    if e != nix::errno::Errno::EEXIST {
                        say(&format!("module {m}: {e}"));
                    }
                }
            }
            Err(e) => say(&format!("module {m}: {e}")),
        }
    }
}

/// The kernel applies `module.param=value` arguments only to built-in modules; for loadable ones
/// (like `virtio_mmio.device=`, which the VMM passes) the loader must hand them over, as modprobe does.
fn module_params(cmdline: &str, module_path: &str) -> String {
    let name = std::path::Path::new(module_path)
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('.').next())
        .unwrap_or_default()
        .replace('-', "_");
    let prefix = format!("{name}.");
    cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix(&prefix))
        .collect::<Vec<_>>()
        .join(" ")
}

fn wait_path(path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::path::Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn check_disk() {
    if !wait_path("/dev/vda", Duration::from_secs(20)) {
        return say("FAIL disk: /dev/vda did not appear");
    }
    let mut buf = vec![0u8; DISK_PATTERN.len()];
    match File::open("/dev/vda").and_then(|mut f| f.read_exact(&mut buf)) {
        Ok(()) if buf == DISK_PATTERN => say("disk ok"),
        Ok(()) => say(&format!(
            "FAIL disk: read {:?}",
            String::from_utf8_lossy(&buf)
        )),
        Err(e) => say(&format!("FAIL disk: {e}")),
    }
}

/// Counts the guest's boots on its disk (/dev/vda starts with `hvnode-boots N`): reads the
/// count, writes it plus one, syncs, and says `boots N+1`. A cluster guest whose disk lives on
/// shared storage says 2 on the second node it runs on.
fn count_boots() {
    if !wait_path("/dev/vda", Duration::from_secs(20)) {
        return say("FAIL boots: /dev/vda did not appear");
    }
    let mut buf = [0u8; 64];
    let r = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vda")
        .and_then(|mut f| {
            f.read_exact(&mut buf)?;
            let text = String::from_utf8_lossy(&buf);
            let n: u32 = text
                .strip_prefix("hvnode-boots ")
                .and_then(|t| t.split('\n').next())
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            let mut out = [0u8; 64];
            let line = format!("hvnode-boots {}\n", n + 1);
            out[..line.len()].copy_from_slice(line.as_bytes());
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start(0))?;
            f.write_all(&out)?;
            f.sync_all()?;
            Ok(n + 1)
        });
    match r {
        Ok(n) => say(&format!("boots {n}")),
        Err(e) => say(&format!("FAIL boots: {e}")),
    }
}

fn check_rng() {
    if !wait_path("/dev/hwrng", Duration::from_secs(20)) {
        return say("FAIL rng: /dev/hwrng did not appear");
    }
    let mut buf = [0u8; 16];
    match File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut buf)) {
        Ok(()) if buf.iter().any(|&b| b != 0) => {
            let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
            say(&format!("rng ok {hex}"));
        }
        Ok(()) => say("FAIL rng: all zero"),
        Err(e) => say(&format!("FAIL rng: {e}")),
    }
}

/// Brings the network up by DHCP and reports the addresses; the network is returned (it keeps
/// the lease renewed) so that a counting guest can keep reporting over it.
fn check_net() -> Option<hvnode_net::Network> {
    let config = NodeConfig {
        hostname: Some("hvnode-test-guest".into()),
        network: NetworkConfig {
            bridge: String::new(),
            ..NetworkConfig::default()
        },
    };
    let net = match hvnode_net::Network::start(&config, None, Box::new(|l: &str| say(l))) {
        Ok(n) => n,
        Err(e) => {
            say(&format!("FAIL net: {e}"));
            return None;
        }
    };
    if !net.wait_configured(Duration::from_secs(90)) {
        say("FAIL net: no address from DHCP within 90 s");
        return None;
    }
    for nic in net.status().interfaces {
        for a in nic.addresses.iter().filter(|a| !a.contains(':')) {
            say(&format!("net {} {a}", nic.name));
        }
    }
    Some(net)
}

/// Ticks forever, once a second: the serial line and, with a port, a TCP report to the host.
fn count(report: Option<u16>) -> ! {
    let mut n = 0u64;
    loop {
        n += 1;
        let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        let line = format!(
            "tick {n} up {}",
            up.split_whitespace().next().unwrap_or("?")
        );
        say(&line);
        if let Some(port) = report {
            let addr = std::net::SocketAddr::from(([10, 0, 2, 2], port));
            if let Ok(mut s) =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            {
                let _ = writeln!(s, "hvnode-guest: {line}");
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// MemTotal of /proc/meminfo in MiB (0 if absent): what the guest kernel made of its e820 map.
fn mem_total_mib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// The devices the test expects, from `hvnode-guest.expect=disk,rng,net` on the command line.
fn expected(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("hvnode-guest.expect="))
        .flat_map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

fn main() {
    mounts();
    say("started");
    load_modules();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let expect = expected(&cmdline);
    if expect.iter().any(|d| d == "disk") {
        check_disk();
    }
    if expect.iter().any(|d| d == "boots") {
        count_boots();
    }
    if expect.iter().any(|d| d == "rng") {
        check_rng();
    }
    let net = if expect.iter().any(|d| d == "net") {
        check_net()
    } else {
        None
    };
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    say(&format!(
        "kernel {} with {cpus} cpu(s) and {} MiB",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        mem_total_mib(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
    ));
    say("done");
    if cmdline
        .split_whitespace()
        .any(|a| a == "hvnode-guest.count")
    {
        // The network stays up (its lease renewed) while the guest counts and reports.
        let _net = net;
        let report = cmdline
            .split_whitespace()
            .find_map(|a| a.strip_prefix("hvnode-guest.report="))
            .and_then(|p| p.parse::<u16>().ok());
        count(report);
    }
    if let Some(net) = net {
        net.stop();
    }
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::module_params;

    #[test]
    fn reads_mem_total_in_mib() {
        let meminfo = "MemTotal:        4563412 kB\nMemFree:         4400000 kB\n";
        assert_eq!(super::mem_total_mib(meminfo), 4456);
        assert_eq!(super::mem_total_mib("nothing"), 0);
    }

    #[test]
    fn reads_the_expected_devices_from_the_command_line() {
        assert_eq!(
            super::expected("quiet hvnode-guest.expect=disk,rng"),
            ["disk", "rng"]
        );
        assert!(super::expected("quiet").is_empty());
    }

    #[test]
    fn passes_cmdline_parameters_to_their_module_only() {
        let cmdline = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 virtio_net.napi_tx=1";
        assert_eq!(
            module_params(
                cmdline,
                "/usr/lib/modules/6.1/kernel/drivers/virtio/virtio_mmio.ko"
            ),
            "device=4K@0xd0000000:5 device=4K@0xd0001000:6"
        );
        assert_eq!(module_params(cmdline, "/x/virtio-net.ko"), "napi_tx=1");
        assert_eq!(module_params(cmdline, "/x/virtio_blk.ko"), "");
    }
}
