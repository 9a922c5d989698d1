//! Updates of an installed node (docs/update.md): `PUT /v1/node/update` streams a signed bundle
//! into the slot the node does not run from and sets that slot to be tried once at the next
//! boot; `GET /v1/node/update` shows both slots; `POST /v1/node/rollback` boots the other slot
//! next. Init confirms a slot at boot (its health gate) and publishes what it found in
//! `<run>/slot.json`, which this module reads.
//!
//! The order of a write: the target slot is marked not bootable first (a power cut in the middle
//! leaves a slot GRUB skips), the bundle is checked while it is written (signature and manifest
//! before a byte of the payload, each file's SHA-256 as it ends), and only a bundle that checked
//! out whole makes the slot bootable, first in order, to be tried once.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hvnode_api::error::{chain, ErrorCode};
use hvnode_api::init::InitRequest;
use hvnode_api::install::SlotStatus;
use hvnode_api::update::{
    RollbackDone, SlotRecord, SlotView, UpdateInstalled, UpdateProgress, UpdateView,
};
use hvnode_update::bundle::{self, BundleReader, FileEntry, Policy, Sink};
use hvnode_update::disk::{disk_size, find_part, Esp, Extent, Part, SlotTarget, Window};
use hvnode_update::slot::SlotWriter;
use hvnode_update::slots::{booted_from_cmdline, AbState, Slot};
use hvnode_update::{gpt, keys, sysfs};
use hyper::StatusCode;
use tokio::sync::mpsc;

use crate::error::{blocking, Error};
use crate::http::{json_response, Resp};
use crate::Agent;

/// Sector size of the installed disk's GPT (the installer writes 512-byte sectors).
const SECTOR: u64 = 512;
/// Pieces of the body in flight between the connection and the writer.
const IN_FLIGHT: usize = 16;

/// The state of updates on this node.
#[derive(Debug, Default)]
pub(crate) struct Updates {
    /// One update at a time.
    busy: AtomicBool,
    progress: Mutex<Option<UpdateProgress>>,
}

impl Updates {
    fn set(&self, p: UpdateProgress) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    fn get(&self) -> UpdateProgress {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(UpdateProgress::Idle)
    }
}

/// The installed system the node runs: its slot and its disk.
#[derive(Debug, Clone)]
struct System {
    booted: Slot,
    disk: PathBuf,
}

/// Releases the busy flag when the update ends, however it ends.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The body of the request as a `Read`, fed by the connection's task.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// A [`SlotWriter`] that reports how far it got.
struct Counting<'a> {
    inner: SlotWriter,
    updates: &'a Updates,
    slot: Slot,
    version: String,
    total: u64,
    written: u64,
    reported: u64,
}

impl Sink for Counting<'_> {
    fn begin(&mut self, file: &FileEntry) -> std::io::Result<()> {
        self.inner.begin(file)
    }
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.inner.write(data)?;
        self.written += data.len() as u64;
        if self.written - self.reported >= 4 << 20 || self.written == self.total {
            self.reported = self.written;
            self.updates.set(UpdateProgress::Writing {
                slot: self.slot.to_string(),
                version: Some(self.version.clone()),
                written_bytes: self.written,
                total_bytes: Some(self.total),
            });
        }
        Ok(())
    }
    fn end(&mut self, file: &FileEntry) -> std::io::Result<()> {
        self.inner.end(file)
    }
    fn commit(&mut self) -> std::io::Result<()> {
        self.inner.commit()
    }
    fn abort(&mut self) {
        self.inner.abort()
    }
}

/// Opens the ESP of `disk` and runs `f` on the slot state in its environment block; `f`
/// returning true stores the state back.
fn with_state<T>(
    disk: &Path,
    f: impl FnOnce(&mut AbState) -> Result<(T, bool), Error>,
) -> Result<T, Error> {
    let what = format!("The boot loader's state on {}", disk.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|e| Error::internal(&what, e))?;
    let size = disk_size(&file).map_err(|e| Error::internal(&what, e))?;
    let parts = gpt::read(&mut Window::whole(&file, size), size, SECTOR)
        .map_err(|e| Error::internal(&what, chain(&e)))?;
    let esp = find_part(&parts, Part::Esp)
        .map(|p| Extent::of(p, SECTOR))
        .ok_or_else(|| Error::internal(&what, "the disk has no hvnode-esp partition"))?;
    let esp = Esp::open(&file, esp).map_err(|e| Error::internal(&what, chain(&e)))?;
    let env = esp
        .load_env()
        .map_err(|e| Error::internal(&what, chain(&e)))?;
    let mut state = AbState::from_env(env).map_err(|e| Error::internal(&what, chain(&e)))?;
    let (out, store) = f(&mut state)?;
    if store {
        esp.store_env(state.env())
            .map_err(|e| Error::internal(&what, chain(&e)))?;
    }
    esp.close().map_err(|e| Error::internal(&what, chain(&e)))?;
    file.sync_all().map_err(|e| Error::internal(&what, e))?;
    Ok(out)
}

fn refused(e: &bundle::Error) -> Error {
    let code = match e {
        bundle::Error::Sink(..) | bundle::Error::Output(_) | bundle::Error::Input(..) => {
            ErrorCode::Internal
        }
        _ => ErrorCode::BundleRefused,
    };
    Error::new(code, chain(e))
}

impl Agent {
    fn slot_record_path(&self, slot: Slot) -> PathBuf {
        self.paths.data.join("slots").join(format!("{slot}.json"))
    }

    fn slot_record(&self, slot: Slot) -> Option<SlotRecord> {
        let text = std::fs::read(self.slot_record_path(slot)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn slot_status(&self) -> Option<SlotStatus> {
        let text = std::fs::read(self.paths.run.join("slot.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The installed system the node runs, or `not_installed`.
    fn system(&self) -> Result<System, Error> {
        let cmdline = std::fs::read_to_string(&self.paths.cmdline).unwrap_or_default();
        let not_installed = || {
            Error::new(
                ErrorCode::NotInstalled,
                "This node runs from its boot medium, which has one system and no slots: install \
                 it to a disk (POST /v1/node/install, `hvnodectl node install`) to update it",
            )
        };
        let booted = booted_from_cmdline(&cmdline).ok_or_else(not_installed)?;
        let disk = match &self.paths.system_disk {
            Some(d) => d.clone(),
            None => sysfs::system_disk(
                &sysfs::named_partitions(Path::new(sysfs::SYS_BLOCK)),
                booted,
            )
            .ok_or_else(not_installed)?,
        };
        Ok(System { booted, disk })
    }

    /// `GET /v1/node/update`.
    pub(crate) async fn update_view(self: &Arc<Self>) -> Result<Resp, Error> {
        let me = Arc::clone(self);
        let view = blocking("Update state", move || Ok(me.update_view_now())).await?;
        Ok(json_response(StatusCode::OK, &view))
    }

    fn update_view_now(&self) -> UpdateView {
        let status = self.slot_status();
        let mut view = UpdateView {
            running_version: hvnode_api::release_version(),
            booted_slot: None,
            confirmed: status.as_ref().is_some_and(|s| s.confirmed),
            failed_update: status.and_then(|s| s.failed_update),
            slots: Vec::new(),
            next_boot: None,
            progress: self.updates.get(),
        };
        let Ok(system) = self.system() else {
            return view;
        };
        view.booted_slot = Some(system.booted.to_string());
        let state = with_state(&system.disk, |s| Ok((s.clone(), false)));
        for slot in [Slot::A, Slot::B] {
            let (bootable, pending) = match &state {
                // A pending update that lost OK failed: it does not boot next.
                Ok(s) => {
                    let ok = s.ok(slot).unwrap_or(false);
                    (ok, ok && s.pending().ok().flatten() == Some(slot))
                }
                Err(_) => (slot == system.booted, false),
            };
            let version = if slot == system.booted {
                Some(hvnode_api::release_version())
            } else {
                self.slot_record(slot).map(|r| r.version)
            };
            view.slots.push(SlotView {
                name: slot.to_string(),
                bootable,
                booted: slot == system.booted,
                pending,
                version,
            });
        }
        if let Ok(s) = &state {
            view.next_boot = s
                .order()
                .ok()
                .and_then(|o| o.into_iter().find(|&x| s.ok(x).unwrap_or(false)))
                .map(|x| x.to_string());
        }
        view
    }

    /// `POST /v1/node/rollback`: the other slot boots next, if it holds a system that booted.
    pub(crate) async fn rollback(self: &Arc<Self>) -> Result<Resp, Error> {
        let system = self.system()?;
        if self.updates.busy.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorCode::UpdateInProgress,
                "An update is being written into the other slot; wait for it to end",
            ));
        }
        let disk = system.disk.clone();
        let next = blocking("Rollback", move || {
            with_state(&disk, |s| match s.rollback(system.booted) {
                Ok(next) => Ok((next, true)),
                Err(e) => Err(Error::new(ErrorCode::NoRollback, chain(&e))),
            })
        })
        .await?;
        eprintln!("agent: rollback: slot {next} boots next");
        self.events
            .emit("update", None, format!("rollback: slot {next} boots next"));
        Ok(json_response(
            StatusCode::OK,
            &RollbackDone {
                next_boot: next.to_string(),
            },
        ))
    }

    /// `PUT /v1/node/update?force=&reboot=`: the body is the bundle.
    pub(crate) async fn put_update<B>(
        self: &Arc<Self>,
        mut body: B,
        force: bool,
        reboot: bool,
    ) -> Result<Resp, Error>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use http_body_util::BodyExt;
        let system = self.system()?;
        if self
            .updates
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Error::new(
                ErrorCode::UpdateInProgress,
                "Another update is being written; wait for it to end (GET /v1/node/update)",
            ));
        }
        let (tx, rx) = mpsc::channel::<Bytes>(IN_FLIGHT);
        let me = Arc::clone(self);
        let writer = tokio::task::spawn_blocking(move || me.write_update(&system, rx, force));
        let mut received = 0u64;
        let mut body_error = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        received += data.len() as u64;
                        // The writer stopped (the bundle was refused): the rest is not needed.
                        if tx.send(data).await.is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    body_error = Some(format!("Reading the bundle: {}", e.into()));
                    break;
                }
            }
        }
        drop(tx);
        let result = writer
            .await
            .map_err(|e| Error::internal("Writing the update", e))?;
        let result = match (body_error, result) {
            (Some(e), Err(_)) => Err(Error::new(ErrorCode::BadBody, e)),
            (_, r) => r,
        };
        let result = if received == 0 && result.is_err() {
            Err(Error::new(
                ErrorCode::BodyRequired,
                "Send the update bundle as the request body (application/octet-stream); it was empty",
            ))
        } else {
            result
        };
        match result {
            Ok((slot, version)) => {
                let msg = format!(
                    "update to {version} written to slot {slot}; it boots once at the next boot"
                );
                eprintln!("agent: {msg}");
                self.events.emit("update", None, msg);
                if reboot {
                    let me = Arc::clone(self);
                    blocking("Reboot", move || me.init.request(&InitRequest::Reboot)).await?;
                }
                Ok(json_response(
                    StatusCode::OK,
                    &UpdateInstalled {
                        version,
                        slot: slot.to_string(),
                        rebooting: reboot,
                    },
                ))
            }
            Err(e) => {
                eprintln!("agent: update refused: {}", e.message);
                self.events
                    .emit("update", None, format!("update refused: {}", e.message));
                Err(e)
            }
        }
    }

    /// Checks and writes the bundle from `rx` into the slot the node does not run from.
    fn write_update(
        &self,
        system: &System,
        rx: mpsc::Receiver<Bytes>,
        force: bool,
    ) -> Result<(Slot, String), Error> {
        let _busy = Busy(&self.updates.busy);
        let slot = system.booted.other();
        self.updates.set(UpdateProgress::Writing {
            slot: slot.to_string(),
            version: None,
            written_bytes: 0,
            total_bytes: None,
        });
        let result = self.write_update_inner(system, slot, rx, force);
        match &result {
            Ok(version) => self.updates.set(UpdateProgress::Installed {
                slot: slot.to_string(),
                version: version.clone(),
            }),
            Err(e) => self.updates.set(UpdateProgress::Failed {
                slot: slot.to_string(),
                error: e.message.clone(),
            }),
        }
        result.map(|v| (slot, v))
    }

    fn write_update_inner(
        &self,
        system: &System,
        slot: Slot,
        rx: mpsc::Receiver<Bytes>,
        force: bool,
    ) -> Result<String, Error> {
        let trusted = keys::read_trusted_dir(&self.paths.release_keys).map_err(|e| {
            Error::new(
                ErrorCode::BundleRefused,
                format!(
                    "This node cannot check update bundles: its release keys in {} cannot be \
                     read: {}",
                    self.paths.release_keys.display(),
                    chain(&e)
                ),
            )
        })?;
        let input = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        let running = hvnode_api::release_version();
        let policy = Policy {
            trusted: &trusted,
            running: Some(&running),
            force,
        };
        // Signature, manifest and version first: a refused bundle changes nothing on the disk.
        let reader = BundleReader::open(input, &policy).map_err(|e| refused(&e))?;
        let manifest = reader.manifest().clone();
        // From here the slot is written: it must not be booted until the whole bundle checked
        // out (and is marked bad for good if it does not).
        with_state(&system.disk, |s| {
            s.mark_bad(slot)
                .map_err(|e| Error::internal("Marking the slot", chain(&e)))?;
            Ok(((), true))
        })?;
        let _ = std::fs::remove_file(self.slot_record_path(slot));
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&system.disk)
            .map_err(|e| Error::internal(&format!("Opening {}", system.disk.display()), e))?;
        let target = SlotTarget::read(&disk, SECTOR, slot)
            .map_err(|e| Error::internal("Reading the slot's partitions", chain(&e)))?;
        let mut sink = Counting {
            inner: SlotWriter::new(disk, target),
            updates: &self.updates,
            slot,
            version: manifest.version.clone(),
            total: manifest.payload_size(),
            written: 0,
            reported: 0,
        };
        reader.unpack(&mut sink).map_err(|e| refused(&e))?;
        let record = SlotRecord {
            version: manifest.version.clone(),
            root_hash: manifest.root_hash.clone(),
        };
        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
        hvnode_base::fs::write_atomic(&self.slot_record_path(slot), &json, 0o644)
            .map_err(|e| Error::internal("Recording the slot's release", e))?;
        with_state(&system.disk, |s| {
            s.mark_try_once(slot)
                .map_err(|e| Error::internal("Marking the slot", chain(&e)))?;
            Ok(((), true))
        })?;
        Ok(manifest.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{paths_under, Origin};
    use http_body_util::{BodyExt, Full};
    use hvnode_update::bundle::{BundleWriter, Role};
    use hvnode_update::disk::DiskContent;
    use hvnode_update::install::{self, BootFiles, TargetDisk};
    use hvnode_update::slot::SlotSources;
    use hyper::Request;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    async fn call(
        a: &Arc<Agent>,
        method: &str,
        uri: &str,
        body: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        let r = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let resp = a.handle(r, Origin::Local).await;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// A disk image installed by the real installer, slot A from `src`'s files.
    fn installed_disk(root: &Path) -> PathBuf {
        let src = root.join("medium");
        let s = SlotSources::live_medium(&src);
        std::fs::create_dir_all(src.join("live")).expect("mkdir");
        std::fs::create_dir_all(src.join("boot")).expect("mkdir");
        std::fs::write(&s.root, vec![0x5au8; 2 << 20]).expect("root");
        std::fs::write(&s.verity, vec![0xa5u8; 4096]).expect("verity");
        std::fs::write(&s.kernel, b"kernel A").expect("kernel");
        std::fs::write(&s.initrd, b"initrd A").expect("initrd");
        // Stand-ins for GRUB's images with the shape the installer patches (the boot test runs
        // the real ones).
        let b = BootFiles::in_dir(&src.join("grub"));
        std::fs::create_dir_all(src.join("grub")).expect("mkdir");
        std::fs::write(&b.efi, b"MZ efi grub").expect("efi");
        let mut core = vec![0x11u8; 60 * 512];
        core[488..512].fill(0);
        core[508..510].copy_from_slice(&59u16.to_le_bytes());
        core[510..512].copy_from_slice(&0x820u16.to_le_bytes());
        std::fs::write(&b.core_img, core).expect("core");
        let mut boot = vec![0xEBu8; 512];
        boot[510..512].copy_from_slice(&[0x55, 0xAA]);
        std::fs::write(&b.boot_img, boot).expect("boot");

        let disk = root.join("disk.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&disk)
            .expect("disk");
        let size = 4u64 << 30;
        f.set_len(size).expect("size");
        let target = TargetDisk {
            device: disk.display().to_string(),
            size_bytes: size,
            sector: SECTOR,
            content: DiskContent::Blank,
            boot_medium: false,
            read_only: false,
        };
        let plan = install::plan(&target, None).expect("plan");
        install::install(&f, &plan, &s, &b, &mut |_, _| Ok(()), &mut |_, _| {}).expect("install");
        disk
    }

    struct Release {
        dir: PathBuf,
    }

    impl Release {
        fn new(root: &Path, tag: &str) -> Release {
            let dir = root.join(format!("release-{tag}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("root"), vec![tag.as_bytes()[0]; 3 << 20]).expect("root");
            std::fs::write(dir.join("verity"), vec![0x77u8; 8192]).expect("verity");
            std::fs::write(dir.join("kernel"), format!("kernel {tag}")).expect("kernel");
            std::fs::write(dir.join("initrd"), format!("initrd {tag}")).expect("initrd");
            Release { dir }
        }

        fn bundle(&self, version: &str, key: &ed25519_dalek::SigningKey) -> Vec<u8> {
            let mut out = Vec::new();
            BundleWriter::new(version, 1_700_000_000, &"ab".repeat(32))
                .expect("writer")
                .file(Role::Root, &self.dir.join("root"))
                .file(Role::Verity, &self.dir.join("verity"))
                .file(Role::Kernel, &self.dir.join("kernel"))
                .file(Role::Initrd, &self.dir.join("initrd"))
                .write(key, &mut out)
                .expect("bundle");
            out
        }
    }

    fn state(disk: &Path) -> AbState {
        with_state(disk, |s| Ok((s.clone(), false))).expect("state")
    }

    fn esp_file(disk: &Path, path: &str) -> Vec<u8> {
        let f = File::open(disk).expect("disk");
        let size = disk_size(&f).expect("size");
        let parts = gpt::read(&mut Window::whole(&f, size), size, SECTOR).expect("gpt");
        let esp = Esp::open(
            &f,
            Extent::of(find_part(&parts, Part::Esp).expect("esp"), SECTOR),
        )
        .expect("esp");
        esp.read_file(path).expect("file")
    }

    fn partition_start(disk: &Path, part: Part, len: usize) -> Vec<u8> {
        let f = File::open(disk).expect("disk");
        let size = disk_size(&f).expect("size");
        let parts = gpt::read(&mut Window::whole(&f, size), size, SECTOR).expect("gpt");
        let e = Extent::of(find_part(&parts, part).expect("part"), SECTOR);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, e.offset).expect("read");
        buf
    }

    #[tokio::test]
    async fn an_installed_node_writes_a_signed_bundle_into_its_other_slot_and_refuses_bad_ones() {
        let root = std::env::temp_dir().join(format!("hvnode-agent-update-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("root");
        let a = Arc::new(Agent::new(paths_under(&root)).expect("agent"));
        let key = keys::generate().expect("key");
        let other_key = keys::generate().expect("key");
        keys::write_public(&key.verifying_key(), &root.join("release-keys/release.pub"))
            .expect("pub");
        let next = Release::new(&root, "next");
        let good = next.bundle("9.0.0", &key);

        // A node running from its boot medium has no slot to update.
        std::fs::write(root.join("cmdline"), "console=ttyS0 quiet\n").expect("cmdline");
        let (s, r) = call(&a, "PUT", "/v1/node/update", good.clone()).await;
        assert_eq!((s, r["code"].as_str()), (409, Some("not_installed")), "{r}");
        let (s, r) = call(&a, "GET", "/v1/node/update", Vec::new()).await;
        assert_eq!((s, r["booted_slot"].as_str()), (200, None), "{r}");

        let disk = installed_disk(&root);
        std::fs::write(root.join("cmdline"), "console=ttyS0 hvnode.slot=A quiet\n")
            .expect("cmdline");
        let (s, r) = call(&a, "GET", "/v1/node/update", Vec::new()).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["booted_slot"], "A");
        assert_eq!(r["next_boot"], "A");
        assert_eq!(r["slots"][1]["bootable"], false, "{r}");
        // Nothing to roll back to yet.
        let (s, r) = call(&a, "POST", "/v1/node/rollback", Vec::new()).await;
        assert_eq!((s, r["code"].as_str()), (409, Some("no_rollback")), "{r}");

        // Refused before a byte is written: the state stays as the installer left it.
        let before = state(&disk);
        for (bundle, why) in [
            (next.bundle("9.0.0", &other_key), "does not verify"),
            (next.bundle("0.0.1", &key), "older than the running"),
            (good[..good.len() / 2].to_vec(), "truncated"),
            (b"not a bundle at all, not at all".to_vec(), "wrong magic"),
        ] {
            let (s, r) = call(&a, "PUT", "/v1/node/update", bundle).await;
            assert_eq!(
                (s, r["code"].as_str()),
                (422, Some("bundle_refused")),
                "{why}: {r}"
            );
            assert!(
                r["message"].as_str().unwrap_or("").contains(why),
                "{why}: {r}"
            );
        }
        let (s, r) = call(&a, "PUT", "/v1/node/update", Vec::new()).await;
        assert_eq!((s, r["code"].as_str()), (400, Some("body_required")), "{r}");
        let (s, r) = call(&a, "PUT", "/v1/node/update?force=maybe", good.clone()).await;
        assert_eq!((s, r["code"].as_str()), (400, Some("invalid_query")), "{r}");
        assert_eq!(state(&disk).ok(Slot::B).ok(), before.ok(Slot::B).ok());
        assert_eq!(state(&disk).order().ok(), before.order().ok());

        // A good bundle: slot B holds it and boots once next; slot A is untouched.
        let root_a = partition_start(&disk, Part::Root(Slot::A), 4096);
        let (s, r) = call(&a, "PUT", "/v1/node/update", good.clone()).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(
            (r["slot"].as_str(), r["version"].as_str()),
            (Some("B"), Some("9.0.0"))
        );
        assert_eq!(r["rebooting"], false);
        assert_eq!(
            partition_start(&disk, Part::Root(Slot::B), 4096),
            vec![b'n'; 4096]
        );
        assert_eq!(partition_start(&disk, Part::Root(Slot::A), 4096), root_a);
        assert_eq!(esp_file(&disk, "B/vmlinuz"), b"kernel next");
        assert_eq!(esp_file(&disk, "B/initrd.img"), b"initrd next");
        assert_eq!(esp_file(&disk, "A/vmlinuz"), b"kernel A");
        let st = state(&disk);
        assert_eq!(st.order().ok(), Some([Slot::B, Slot::A]));
        assert_eq!(
            (st.ok(Slot::A).ok(), st.ok(Slot::B).ok()),
            (Some(true), Some(true))
        );
        assert_eq!(st.pending().ok(), Some(Some(Slot::B)));
        let (_, r) = call(&a, "GET", "/v1/node/update", Vec::new()).await;
        assert_eq!(r["next_boot"], "B", "{r}");
        assert_eq!(r["slots"][1]["pending"], true, "{r}");
        assert_eq!(r["slots"][1]["version"], "9.0.0", "{r}");
        assert_eq!(r["progress"]["state"], "installed", "{r}");
        assert!(
            a.events
                .subscribe(0)
                .0
                .iter()
                .any(|e| e.message.contains("update to 9.0.0 written to slot B")),
            "no event"
        );

        // A rollback boots the slot the node does not run: B here, bootable, so it is allowed.
        let (s, r) = call(&a, "POST", "/v1/node/rollback", Vec::new()).await;
        assert_eq!((s, r["next_boot"].as_str()), (200, Some("B")), "{r}");

        // A bundle damaged after signing is found out while it is written: slot B is no
        // longer bootable, slot A still boots.
        let mut bad = good.clone();
        let at = bad.len() - 100;
        bad[at] ^= 0xff;
        let (s, r) = call(&a, "PUT", "/v1/node/update", bad).await;
        assert_eq!(
            (s, r["code"].as_str()),
            (422, Some("bundle_refused")),
            "{r}"
        );
        assert!(
            r["message"].as_str().unwrap_or("").contains("SHA-256"),
            "{r}"
        );
        let st = state(&disk);
        assert_eq!(
            (st.ok(Slot::A).ok(), st.ok(Slot::B).ok()),
            (Some(true), Some(false))
        );
        assert_eq!(st.order().ok().map(|o| o[0]), Some(Slot::A));
        let (_, r) = call(&a, "GET", "/v1/node/update", Vec::new()).await;
        assert_eq!(r["progress"]["state"], "failed", "{r}");
        assert_eq!(r["next_boot"], "A", "{r}");
        assert!(r["slots"][1].get("version").is_none(), "{r}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
