//! Guest snapshots: a guest's memory, VM state and definition written by its VMM into
//! `<data>/snapshots/<guest>/<snapshot>/`, listed, deleted, and restored into a new VMM that
//! resumes the guest where it was. The VMM writes the snapshot's files; the agent adds
//! `meta.json` last, so a directory without it is a snapshot that never finished (ignored, and
//! removed when its name is taken again).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use hvnode_api::error::ErrorCode;
use hvnode_api::guest::{CreateSnapshot, GuestSpec, SnapshotStatus};
use hvnode_api::vmm::{VmConfig, SNAPSHOT_CONFIG};
use hyper::StatusCode;

use crate::error::{blocking, Error};
use crate::http::{json_response, no_content, Resp};
use crate::Agent;

/// Written by the agent once the VMM has written the rest.
const META: &str = "meta.json";

/// Bytes a directory's files take on disk (holes take none).
fn disk_usage(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// The VMM writes the snapshot after it dropped root: a guest's snapshot directory belongs to
/// the user its VMM runs as, its jail's `uid` (and to no one else: mode 0700). An agent that is
/// not root starts VMMs that keep its uid, and the directory stays its own.
fn give_to_vmm(dir: &std::path::Path, uid: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(id) = uid {
        std::os::unix::fs::chown(dir, Some(id), Some(id))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// What in the VM configuration a snapshot's state depends on, compared field by field: the
/// first difference, named for the admin.
fn mismatch(snap: &VmConfig, now: &VmConfig) -> Option<String> {
    if snap.vcpus != now.vcpus {
        return Some(format!(
            "{} vCPUs in the snapshot, {} defined now",
            snap.vcpus, now.vcpus
        ));
    }
    if snap.memory_mib != now.memory_mib {
        return Some(format!(
            "{} MiB of memory in the snapshot, {} MiB defined now",
            snap.memory_mib, now.memory_mib
        ));
    }
    let disks = |c: &VmConfig| -> Vec<(String, bool)> {
        c.disks
            .iter()
            .map(|d| (d.path.clone(), d.read_only))
            .collect()
    };
    if disks(snap) != disks(now) {
        return Some("the disks differ from the snapshot's (paths, order or read-only)".into());
    }
    let macs = |c: &VmConfig| -> Vec<String> { c.nets.iter().map(|n| n.mac.clone()).collect() };
    if macs(snap) != macs(now) {
        return Some("the NICs differ from the snapshot's (number, order or MACs)".into());
    }
    if snap.rng != now.rng {
        return Some("virtio-rng is on in one and off in the other".into());
    }
    None
}

impl Agent {
    fn snapshot_root(&self, guest: &str) -> PathBuf {
        crate::guests::vmms::snapshot_root(&self.paths.data, guest)
    }

    fn snapshot_dir(&self, guest: &str, snap: &str) -> Result<PathBuf, Error> {
        hvnode_api::guest::validate_name(snap).map_err(|_| {
            Error::new(
                ErrorCode::InvalidSnapshotName,
                format!(
                    "Invalid snapshot name {snap:?}: use 1-63 lower-case letters, digits, - and _, starting with a letter or digit"
                ),
            )
        })?;
        Ok(self.snapshot_root(guest).join(snap))
    }

    /// A finished snapshot's metadata, without the space it takes (`disk_bytes` 0): what a
    /// guest's status and the checks need, read without walking its files.
    fn read_snapshot(&self, guest: &str, snap: &str) -> Result<SnapshotStatus, Error> {
        let dir = self.snapshot_dir(guest, snap)?;
        let missing = || {
            Error::new(
                ErrorCode::SnapshotNotFound,
                format!("Guest {guest:?} has no snapshot {snap:?}"),
            )
        };
        let text = std::fs::read(dir.join(META)).map_err(|_| missing())?;
        let mut status: SnapshotStatus =
            serde_json::from_slice(&text).map_err(|e| Error::internal("Snapshot metadata", e))?;
        // The directory names it, whatever the file says: paths are built from these.
        status.guest = guest.to_owned();
        status.name = snap.to_owned();
        Ok(status)
    }

    /// A snapshot as the API shows it: its metadata and the space it takes on disk.
    fn with_disk_usage(&self, mut status: SnapshotStatus) -> SnapshotStatus {
        let dir = self.snapshot_root(&status.guest).join(&status.name);
        status.disk_bytes = disk_usage(&dir);
        status
    }

    /// The guest's finished snapshots, oldest first (metadata only, see [`Agent::read_snapshot`]).
    pub(crate) fn snapshots_of(&self, guest: &str) -> Vec<SnapshotStatus> {
        let mut out: Vec<SnapshotStatus> = std::fs::read_dir(self.snapshot_root(guest))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        self.read_snapshot(guest, &name).ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        out
    }

    /// `GET /v1/guests/{name}/snapshots`.
    pub(crate) fn list_snapshots(&self, guest: &str) -> Result<Resp, Error> {
        self.guest(guest)?;
        let list: Vec<SnapshotStatus> = self
            .snapshots_of(guest)
            .into_iter()
            .map(|s| self.with_disk_usage(s))
            .collect();
        Ok(json_response(StatusCode::OK, &list))
    }

    /// `GET /v1/guests/{name}/snapshots/{snapshot}`.
    pub(crate) fn show_snapshot(&self, guest: &str, snap: &str) -> Result<Resp, Error> {
        self.guest(guest)?;
        Ok(json_response(
            StatusCode::OK,
            &self.with_disk_usage(self.read_snapshot(guest, snap)?),
        ))
    }

    /// `POST /v1/guests/{name}/snapshots`: the guest's VMM writes it; a running guest is paused
    /// for the time it takes and runs on afterwards.
    pub(crate) async fn create_snapshot(
        self: &Arc<Self>,
        guest: String,
        req: CreateSnapshot,
    ) -> Result<Resp, Error> {
        let me = Arc::clone(self);
        blocking("Snapshot", move || {
            me.guest(&guest)?;
            let dir = me.snapshot_dir(&guest, &req.name)?;
            if dir.join(META).exists() {
                return Err(Error::new(
                    ErrorCode::SnapshotExists,
                    format!(
                        "Guest {guest:?} has a snapshot {:?}: delete it or pick another name",
                        req.name
                    ),
                ));
            }
            // What is there without metadata is a snapshot that never finished.
            let _ = std::fs::remove_dir_all(&dir);
            let parent = me.snapshot_root(&guest);
            std::fs::create_dir_all(&parent)
                .map_err(|e| Error::internal("Snapshot directory", e))?;
            give_to_vmm(&parent, me.running.vmm_uid(&guest))
                .map_err(|e| Error::internal("Snapshot directory", e))?;
            let started = Instant::now();
            let info = match me.running.snapshot(&guest, &dir) {
                Ok(info) => info,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e.into());
                }
            };
            let status = SnapshotStatus {
                name: req.name.clone(),
                guest: guest.clone(),
                created: crate::unix_secs(),
                memory_bytes: info.memory_bytes,
                disk_bytes: 0,
                paused_ms: info.paused_ms,
            };
            let meta =
                serde_json::to_vec_pretty(&status).map_err(|e| Error::internal("Snapshot", e))?;
            if let Err(e) = hvnode_base::fs::write_atomic(&dir.join(META), &meta, 0o600) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::internal("Saving the snapshot's metadata", e));
            }
            me.events.emit(
                "snapshot",
                Some(&guest),
                format!(
                    "snapshot {} taken in {} ms (guest paused {} ms, {} of memory written)",
                    req.name,
                    started.elapsed().as_millis(),
                    info.paused_ms,
                    hvnode_api::units::bytes(info.memory_written_bytes)
                ),
            );
            Ok(json_response(
                StatusCode::CREATED,
                &me.with_disk_usage(me.read_snapshot(&guest, &req.name)?),
            ))
        })
        .await
    }

    /// `DELETE /v1/guests/{name}/snapshots/{snapshot}`.
    pub(crate) fn delete_snapshot(&self, guest: &str, snap: &str) -> Result<Resp, Error> {
        self.read_snapshot(guest, snap)?;
        std::fs::remove_dir_all(self.snapshot_dir(guest, snap)?)
            .map_err(|e| Error::internal("Deleting the snapshot", e))?;
        self.events
            .emit("snapshot", Some(guest), format!("snapshot {snap} deleted"));
        Ok(no_content())
    }

    /// Removes every snapshot of a guest that is being deleted.
    pub(crate) fn delete_snapshots_of(&self, guest: &str) {
        let root = self.snapshot_root(guest);
        if let Err(e) = std::fs::remove_dir_all(&root) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("agent: removing {}: {e}", root.display());
            }
        }
    }

    /// `POST /v1/guests/{name}/snapshots/{snapshot}/restore`: a guest without a VMM starts from
    /// the snapshot, where it was when the snapshot was taken. Its definition must still fit the
    /// snapshot (vCPUs, memory, disks, NICs).
    pub(crate) async fn restore_snapshot(
        self: &Arc<Self>,
        guest: String,
        snap: String,
    ) -> Result<Resp, Error> {
        let me = Arc::clone(self);
        blocking("Restore", move || {
            let status = me.guest(&guest)?;
            me.read_snapshot(&guest, &snap)?;
            let dir = me.snapshot_dir(&guest, &snap)?;
            let saved: VmConfig = std::fs::read(dir.join(SNAPSHOT_CONFIG))
                .map_err(|e| Error::internal("Reading the snapshot's configuration", e))
                .and_then(|b| {
                    serde_json::from_slice(&b)
                        .map_err(|e| Error::internal("The snapshot's configuration", e))
                })?;
            let spec: &GuestSpec = &status.spec;
            let now = me.running.vm_config(spec)?;
            if let Some(diff) = mismatch(&saved, &now) {
                return Err(Error::new(
                    ErrorCode::SnapshotMismatch,
                    format!(
                        "Guest {guest:?} cannot resume from snapshot {snap:?}: {diff}. Change the definition back, or start the guest afresh"
                    ),
                ));
            }
            if me.running.is_active(&guest) {
                return Err(Error::new(
                    ErrorCode::GuestRunning,
                    format!("Guest {guest:?} has a running VMM: stop it before restoring a snapshot"),
                ));
            }
            me.running
                .start_from(spec, crate::guests::vmms::StartFrom::Snapshot(&dir))?;
            me.events.emit(
                "snapshot",
                Some(&guest),
                format!("restored from snapshot {snap}"),
            );
            Ok(json_response(StatusCode::OK, &me.guest(&guest)?))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnode_api::vmm::{VmDisk, VmNet};

    fn config() -> VmConfig {
        VmConfig {
            name: "web".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![VmDisk {
                path: "/img/web.raw".into(),
                read_only: false,
            }],
            nets: vec![VmNet {
                tap: "hv-web-0".into(),
                mac: "52:54:00:00:00:01".into(),
                bridge: Some("br0".into()),
            }],
            rng: true,
            serial_log: Some("/run/a".into()),
            serial_socket: None,
            control_socket: None,
            exit_file: None,
            jail: None,
        }
    }

    #[test]
    fn a_snapshot_fits_the_same_definition_and_names_the_first_difference() {
        let snap = config();
        let mut now = config();
        now.serial_log = Some("/run/b".into());
        now.kernel = "/other".into();
        assert_eq!(
            mismatch(&snap, &now),
            None,
            "runtime paths and the kernel do not matter"
        );
        now.memory_mib = 1024;
        assert!(mismatch(&snap, &now).unwrap().contains("512 MiB"));
        let mut now = config();
        now.disks[0].read_only = true;
        assert!(mismatch(&snap, &now).unwrap().contains("disks"));
        let mut now = config();
        now.nets.clear();
        assert!(mismatch(&snap, &now).unwrap().contains("NICs"));
    }
}
