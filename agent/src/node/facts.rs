//! Facts about the node read from /proc, /sys and the state files init publishes.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use hvnode_api::node::{DiskInfo, NetworkStatus, NicStatus, NodeInfo, StorageStatus};

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Seconds since boot.
pub fn uptime_secs() -> u64 {
    read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| s as u64)
        .unwrap_or(0)
}

/// `(total, available)` memory in bytes.
pub fn memory() -> (u64, u64) {
    let info = read("/proc/meminfo");
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// 1/5/15-minute load averages.
pub fn load() -> [f64; 3] {
    let text = read("/proc/loadavg");
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// `(busy, total)` jiffies from the first line of /proc/stat.
pub fn cpu_times() -> (u64, u64) {
    let text = read("/proc/stat");
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// The network state init publishes, or the NICs from /sys when init has not written it.
pub fn network_status(run_dir: &Path) -> NetworkStatus {
    if let Ok(text) = std::fs::read_to_string(run_dir.join("network.json")) {
        if let Ok(s) = serde_json::from_str(&text) {
            return s;
        }
    }
    let mut interfaces = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "lo" {
                continue;
            }
            let p = e.path();
            interfaces.push(NicStatus {
                mac: read(p.join("address")).trim().to_owned(),
                carrier: read(p.join("carrier")).trim() == "1",
                addresses: Vec::new(),
                source: hvnode_api::node::AddressSource::None,
                name,
            });
        }
    }
    interfaces.sort_by(|a, b| a.name.cmp(&b.name));
    NetworkStatus {
        hostname: hostname(),
        interfaces,
        gateways: Vec::new(),
        dns: Vec::new(),
    }
}

/// The storage state init publishes.
pub fn storage_status(run_dir: &Path) -> StorageStatus {
    std::fs::read_to_string(run_dir.join("storage.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| StorageStatus {
            note: Some("init has not reported storage".into()),
            ..StorageStatus::default()
        })
}

/// The current host name.
pub fn hostname() -> String {
    read("/proc/sys/kernel/hostname").trim().to_owned()
}

fn is_blank(dev: &Path, size: u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    const MIB: u64 = 1 << 20;
    if size < 2 * MIB {
        return false;
    }
    let Ok(mut f) = std::fs::File::open(dev) else {
        return false;
    };
    let mut buf = vec![0u8; MIB as usize];
    for off in [0, size - MIB] {
        if f.seek(SeekFrom::Start(off)).is_err() || f.read_exact(&mut buf).is_err() {
            return false;
        }
        if buf.iter().any(|&b| b != 0) {
            return false;
        }
    }
    true
}

/// Whole disks of the node (no loop, ram, zram, dm or optical devices).
pub fn disks(check_blank: bool) -> Vec<DiskInfo> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if ["loop", "ram", "zram", "dm-", "sr", "md"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let p = e.path();
        let size = read(p.join("size")).trim().parse::<u64>().unwrap_or(0) * 512;
        let removable = read(p.join("removable")).trim() == "1" || read(p.join("ro")).trim() == "1";
        let blank = check_blank && !removable && is_blank(&Path::new("/dev").join(&name), size);
        out.push(DiskInfo {
            model: read(p.join("device/model")).trim().to_owned(),
            size_bytes: size,
            removable,
            blank,
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The parts of [`NodeInfo`] that do not change while the node runs.
#[derive(Debug, Clone)]
struct Fixed {
    kernel: String,
    cpu_model: String,
    cpus: u32,
    memory_bytes: u64,
    kvm: bool,
}

impl Fixed {
    fn read() -> Fixed {
        let cpuinfo = read("/proc/cpuinfo");
        Fixed {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory_bytes: memory().0,
            kvm: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
        }
    }

    fn info(&self, run_dir: &Path) -> NodeInfo {
        NodeInfo {
            hostname: hostname(),
            version: hvnode_api::release_version(),
            kernel: self.kernel.clone(),
            cpu_model: self.cpu_model.clone(),
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
            kvm: self.kvm,
            nics: network_status(run_dir).interfaces,
            disks: disks(false),
            uptime_secs: uptime_secs(),
        }
    }
}

/// Everything `GET /v1/node` reports, read now.
pub fn info(run_dir: &Path) -> NodeInfo {
    Fixed::read().info(run_dir)
}

/// How old a cached `GET /v1/node` answer may be.
pub const INFO_REFRESH: Duration = Duration::from_secs(1);

/// `GET /v1/node` without the file system on every request: the fixed facts are read once, the
/// rest (host name, NICs, disks, uptime) at most once per [`INFO_REFRESH`], and the answer is
/// kept serialised. A request that finds the answer stale while another refreshes it gets the
/// stale one rather than waiting.
#[derive(Debug)]
pub struct InfoCache {
    run_dir: PathBuf,
    fixed: Fixed,
    cached: RwLock<Option<(Instant, Bytes)>>,
    refreshing: Mutex<()>,
}

impl InfoCache {
    /// Reads the fixed facts now.
    pub fn new(run_dir: &Path) -> InfoCache {
        InfoCache {
            run_dir: run_dir.to_owned(),
            fixed: Fixed::read(),
            cached: RwLock::new(None),
            refreshing: Mutex::new(()),
        }
    }

    /// Reads the changing facts now and caches the answer (after a change the agent made).
    pub fn refresh(&self) -> NodeInfo {
        let info = self.fixed.info(&self.run_dir);
        let json = Bytes::from(serde_json::to_vec(&info).unwrap_or_default());
        *self.cached.write().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), json));
        info
    }

    fn current(&self) -> Option<(bool, Bytes)> {
        self.cached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(at, json)| (at.elapsed() < INFO_REFRESH, json.clone()))
    }

    /// The answer as JSON.
    pub fn json(&self) -> Bytes {
        match self.current() {
            Some((true, json)) => json,
            stale => match (self.refreshing.try_lock(), stale) {
                (Err(std::sync::TryLockError::WouldBlock), Some((_, json))) => json,
                _ => {
                    self.refresh();
                    self.current().map(|(_, j)| j).unwrap_or_default()
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let (total, avail) = memory();
        assert!(total > 0 && avail <= total);
        let (busy, all) = cpu_times();
        assert!(all > 0 && busy <= all);
        assert!(uptime_secs() > 0);
        assert!(!info(Path::new("/nonexistent")).kernel.is_empty());
    }

    #[test]
    fn cached_node_info_is_reused_within_the_refresh_interval_then_reread() {
        let run = std::env::temp_dir().join(format!("hvnode-agent-info-{}", std::process::id()));
        std::fs::create_dir_all(&run).unwrap();
        let nic = |name: &str| {
            format!(
                r#"{{"hostname":"h","interfaces":[{{"name":"{name}","mac":"52:54:00:00:00:01","carrier":true,"addresses":[],"source":"none"}}],"gateways":[],"dns":[]}}"#
            )
        };
        std::fs::write(run.join("network.json"), nic("eth7")).unwrap();
        let cache = InfoCache::new(&run);
        let first = cache.json();
        let parsed: NodeInfo = serde_json::from_slice(&first).unwrap();
        assert_eq!(parsed.nics[0].name, "eth7");
        assert_eq!(parsed.kernel, info(&run).kernel);
        std::fs::write(run.join("network.json"), nic("eth8")).unwrap();
        assert_eq!(
            cache.json(),
            first,
            "within the interval the cached answer is served"
        );
        std::thread::sleep(INFO_REFRESH);
        let later: NodeInfo = serde_json::from_slice(&cache.json()).unwrap();
        assert_eq!(later.nics[0].name, "eth8");
        let _ = std::fs::remove_dir_all(&run);
    }

    #[test]
    fn storage_without_init_says_so() {
        let s = storage_status(Path::new("/nonexistent"));
        assert!(!s.persistent);
        assert!(s.note.unwrap().contains("init"));
    }
}
