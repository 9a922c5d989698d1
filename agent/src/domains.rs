//! Storage domains: the NFS exports the cluster defines (docs/cluster.md), mounted by every
//! member under `<run>/domains/<name>` by our own code (mount(2) with the kernel's NFSv4 client,
//! no helper, no shell). Soft mounts with a short timeout: a server that goes away makes its
//! guests' I/O fail (they see errors) instead of hanging the node, and each check of a domain
//! (statfs) runs on its own thread under a deadline, so that a dead server shows as unhealthy
//! rather than stopping the cluster loop.
//!
//! A guest's disk on a domain is `DOMAIN:path` (see [`hvnode_api::cluster::domain_path`]),
//! confined below the domain's mount point as local images are below the image directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hvnode_api::cluster::DomainHealth;
use hvnode_cluster::model::StorageDomain;
use nix::mount::{MntFlags, MsFlags};

use crate::Agent;

/// How long a mount may take before the domain is reported unreachable.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a domain's check (statfs) may take before it is reported unhealthy.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// The mount options every domain gets unless its own options say otherwise: soft (an I/O that
/// cannot complete fails after `timeo` x `retrans`), 5 s per try, 3 tries.
pub const DEFAULT_OPTIONS: &str = "soft,timeo=50,retrans=3";

/// The node's mounted domains, by name, and the last health of each.
#[derive(Debug, Default)]
pub struct Domains {
    health: Mutex<BTreeMap<String, DomainHealth>>,
}

impl Domains {
    /// The health of each domain the node knows, by name.
    pub fn health(&self) -> Vec<DomainHealth> {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn set(&self, all: BTreeMap<String, DomainHealth>) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = all;
    }
}

/// Where a domain is mounted under the runtime directory `run`.
pub fn mount_point(run: &Path, name: &str) -> PathBuf {
    run.join("domains").join(name)
}

/// Whether `target` is a mount point now (`/proc/self/mountinfo`, field 5).
pub(crate) fn is_mounted(target: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let t = target.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == t))
}

/// The mount(2) data for `d`: the server's address (resolved here: the kernel's text mount
/// options take an address), the version, our defaults and the domain's own options (later
/// options win).
fn mount_data(d: &StorageDomain) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    let host = d.server.trim_start_matches('[').trim_end_matches(']');
    let addr = (host, 2049)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {}: {e}", d.server))?
        .next()
        .ok_or_else(|| format!("{} has no address", d.server))?
        .ip();
    let mut data = format!("vers={},addr={addr},{DEFAULT_OPTIONS}", d.nfs_version);
    if !d.options.is_empty() {
        data.push(',');
        data.push_str(&d.options);
    }
    Ok(data)
}

/// The kernel's NFSv4 client identity (the `co_ownerid` its EXCHANGE_ID sends): by default it
/// is derived from the host name, and two nodes with one host name (cloned machines, or QEMU
/// nodes with one MAC) would present themselves to the server as the same client, each new
/// session wiping the other's state, so that no READ ever completes (seen as EIO in the cluster
/// test). The agent sets it to its node identity before the first mount.
const NFS_CLIENT_ID: &str = "/sys/fs/nfs/net/nfs_client/identifier";

/// Sets the NFSv4 client identity to `id` unless it is that already (blocking).
fn set_client_identifier(id: &str) -> Result<(), String> {
    let now =
        std::fs::read_to_string(NFS_CLIENT_ID).map_err(|e| format!("{NFS_CLIENT_ID}: {e}"))?;
    if now.trim() == id {
        return Ok(());
    }
    std::fs::write(NFS_CLIENT_ID, id).map_err(|e| format!("{NFS_CLIENT_ID}: {e}"))
}

/// Mounts `d` at `target` (blocking; the caller bounds it).
fn mount(d: &StorageDomain, target: &Path) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let data = mount_data(d)?;
    let source = format!("{}:{}", d.server, d.export);
    nix::mount::mount(
        Some(source.as_str()),
        target,
        Some("nfs4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(data.as_str()),
    )
    .map_err(|e| format!("mounting {source} ({data}): {e}"))
}

/// statfs of a mounted domain: (total, free) bytes.
fn check(target: &Path) -> Result<(u64, u64), String> {
    let st = nix::sys::statvfs::statvfs(target).map_err(|e| e.to_string())?;
    let frag = st.fragment_size() as u64;
    Ok((
        st.blocks() as u64 * frag,
        st.blocks_available() as u64 * frag,
    ))
}

/// Runs `f` on a thread of its own and waits at most `limit` for it: an NFS call to a dead
/// server may block far longer, and the thread is then left to finish (or not) by itself.
async fn bounded<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    tokio::time::timeout(limit, rx).await.ok()?.ok()
}

impl Agent {
    /// Brings the node's mounts in line with the cluster's domains (mounting what is missing,
    /// unmounting what the cluster no longer has) and checks each; the result is kept for the
    /// API and the node's record.
    pub(crate) async fn reconcile_domains(self: &Arc<Self>, domains: &[StorageDomain]) {
        let mut all = BTreeMap::new();
        if !domains.is_empty() {
            // The node's identity (its certificate's fingerprint, hex) names its NFS client.
            let id: String = self
                .fingerprint
                .chars()
                .filter(char::is_ascii_hexdigit)
                .take(32)
                .collect();
            if let Some(Err(e)) = bounded(CHECK_TIMEOUT, move || set_client_identifier(&id)).await {
                eprintln!("agent: storage domains: setting the NFS client's identity: {e}");
            }
        }
        for d in domains {
            let target = mount_point(&self.paths.run, &d.name);
            let mut h = DomainHealth {
                name: d.name.clone(),
                ..DomainHealth::default()
            };
            if let Err(e) = hvnode_api::cluster::validate_domain(
                &d.name,
                &d.server,
                &d.export,
                &d.nfs_version,
                &d.options,
            ) {
                h.error = Some(format!("not mounted: its definition is invalid: {e}"));
                all.insert(d.name.clone(), h);
                continue;
            }
            let t = target.clone();
            let mounted = bounded(CHECK_TIMEOUT, move || is_mounted(&t))
                .await
                .unwrap_or(false);
            if !mounted {
                let (dd, t) = (d.clone(), target.clone());
                match bounded(MOUNT_TIMEOUT, move || mount(&dd, &t)).await {
                    Some(Ok(())) => {
                        self.events.emit(
                            "storage",
                            None,
                            format!(
                                "storage domain {} mounted ({}:{})",
                                d.name, d.server, d.export
                            ),
                        );
                    }
                    Some(Err(e)) => h.error = Some(e),
                    None => {
                        h.error = Some(format!(
                            "mounting {}:{} took more than {} s",
                            d.server,
                            d.export,
                            MOUNT_TIMEOUT.as_secs()
                        ))
                    }
                }
            }
            if h.error.is_none() {
                h.mounted = true;
                let t = target.clone();
                match bounded(CHECK_TIMEOUT, move || check(&t)).await {
                    Some(Ok((total, free))) => {
                        h.healthy = true;
                        h.total_bytes = total;
                        h.free_bytes = free;
                    }
                    Some(Err(e)) => h.error = Some(format!("checking the mount: {e}")),
                    None => {
                        h.error = Some(format!(
                            "the server does not answer (no statfs within {} s): guests' I/O \
                             on it fails",
                            CHECK_TIMEOUT.as_secs()
                        ))
                    }
                }
            }
            let was = self.domains.health().into_iter().find(|o| o.name == d.name);
            if h.error.is_some() && was.as_ref().is_none_or(|w| w.error != h.error) {
                self.events.emit(
                    "storage",
                    None,
                    format!(
                        "storage domain {}: {}",
                        d.name,
                        h.error.as_deref().unwrap_or_default()
                    ),
                );
            }
            all.insert(d.name.clone(), h);
        }
        // Domains the cluster no longer has: detach their mounts (guests still using one keep
        // their open files; nothing new opens there).
        let dir = self.paths.run.join("domains");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if all.contains_key(&name) {
                continue;
            }
            let t = e.path();
            let gone = bounded(CHECK_TIMEOUT, move || {
                if is_mounted(&t) {
                    nix::mount::umount2(&t, MntFlags::MNT_DETACH).map_err(|e| e.to_string())?;
                }
                std::fs::remove_dir(&t).map_err(|e| e.to_string())
            })
            .await;
            if let Some(Err(e)) = gone {
                eprintln!("agent: removing storage domain {name}: {e}");
            }
        }
        self.domains.set(all);
    }
}
