//! Writing one slot: root image → `hvnode-root-<slot>`, hash tree → `hvnode-verity-<slot>`,
//! kernel and initrd → `/<slot>/vmlinuz` and `/<slot>/initrd.img` on the ESP.
//!
//! [`SlotWriter`] is a [`Sink`]: a bundle unpacks straight into the inactive slot, and the
//! installer feeds it from the boot medium's files ([`SlotWriter::write_files`]). The kernel and
//! initrd go to the ESP under `.partial` names and are renamed at [`commit`](Sink::commit); the
//! raw partitions cannot be written aside, so **the caller marks the slot not bootable
//! (`AbState::mark_bad`) before writing and bootable only after `commit`**.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::bundle::{FileEntry, Role, Sink};
use crate::disk::{DiskError, Esp, SlotTarget};

/// The slot's kernel on the ESP.
pub fn kernel_path(slot: crate::slots::Slot) -> String {
    format!("{slot}/vmlinuz")
}

/// The slot's initrd on the ESP.
pub fn initrd_path(slot: crate::slots::Slot) -> String {
    format!("{slot}/initrd.img")
}

/// The largest kernel or initrd the writer holds in memory before it goes to the ESP.
pub const MAX_ESP_FILE: u64 = 256 << 20;

/// The four files of a slot, on a filesystem (the boot medium when installing).
#[derive(Debug, Clone)]
pub struct SlotSources {
    pub root: PathBuf,
    pub verity: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl SlotSources {
    /// The live medium's files under `media` (`live/root.squashfs`, `live/root.verity`,
    /// `boot/vmlinuz`, `boot/initrd.img`).
    pub fn live_medium(media: &Path) -> Self {
        SlotSources {
            root: media.join("live/root.squashfs"),
            verity: media.join("live/root.verity"),
            kernel: media.join("boot/vmlinuz"),
            initrd: media.join("boot/initrd.img"),
        }
    }

    fn path(&self, role: Role) -> &Path {
        match role {
            Role::Root => &self.root,
            Role::Verity => &self.verity,
            Role::Kernel => &self.kernel,
            Role::Initrd => &self.initrd,
        }
    }
}

/// Writes one slot. See the module documentation for the order and what the caller does.
#[derive(Debug)]
pub struct SlotWriter {
    disk: File,
    target: SlotTarget,
    current: Option<Current>,
    /// ESP files written under `.partial` names, waiting for commit.
    partial: Vec<String>,
}

#[derive(Debug)]
struct Current {
    role: Role,
    size: u64,
    written: u64,
    /// The kernel or initrd, until it goes to the ESP at `end`.
    buffer: Vec<u8>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl SlotWriter {
    /// A writer of `target` on `disk` (the whole disk, opened for writing).
    pub fn new(disk: File, target: SlotTarget) -> Self {
        SlotWriter {
            disk,
            target,
            current: None,
            partial: Vec::new(),
        }
    }

    fn final_path(&self, role: Role) -> Option<String> {
        match role {
            Role::Kernel => Some(kernel_path(self.target.slot)),
            Role::Initrd => Some(initrd_path(self.target.slot)),
            Role::Root | Role::Verity => None,
        }
    }

    /// Writes the slot from `sources`, calling `progress(role, bytes of this file written,
    /// its size)` as it goes, and commits. On an error everything written to the ESP is removed.
    pub fn write_files(
        mut self,
        sources: &SlotSources,
        progress: &mut dyn FnMut(Role, u64, u64),
    ) -> Result<File, DiskError> {
        match self.copy_all(sources, progress) {
            Ok(()) => Ok(self.disk),
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    fn copy_all(
        &mut self,
        sources: &SlotSources,
        progress: &mut dyn FnMut(Role, u64, u64),
    ) -> Result<(), DiskError> {
        let mut buf = vec![0u8; 1 << 20];
        for role in Role::ALL {
            let path = sources.path(role);
            let mut f = File::open(path).map_err(DiskError::Io)?;
            let size = f.metadata()?.len();
            let room = self.region(role).map_or(MAX_ESP_FILE, |e| e.len);
            if size > room {
                return Err(DiskError::DoesNotFit(role.name(), size, room));
            }
            let entry = FileEntry {
                role,
                size,
                sha256: String::new(),
            };
            self.begin(&entry)?;
            let mut done = 0;
            progress(role, 0, size);
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                self.write(&buf[..n])?;
                done += n as u64;
                progress(role, done, size);
            }
            if done != size {
                return Err(DiskError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} changed while it was read", path.display()),
                )));
            }
            self.end(&entry)?;
        }
        self.commit()?;
        Ok(())
    }

    fn region(&self, role: Role) -> Option<crate::disk::Extent> {
        match role {
            Role::Root => Some(self.target.root),
            Role::Verity => Some(self.target.verity),
            Role::Kernel | Role::Initrd => None,
        }
    }
}

impl Sink for SlotWriter {
    fn begin(&mut self, file: &FileEntry) -> io::Result<()> {
        let room = self
            .region(file.role)
            .map_or(MAX_ESP_FILE, |extent| extent.len);
        if file.size > room {
            return Err(other(DiskError::DoesNotFit(
                file.role.name(),
                file.size,
                room,
            )));
        }
        let buffer = if self.region(file.role).is_none() {
            Vec::with_capacity(file.size as usize)
        } else {
            Vec::new()
        };
        self.current = Some(Current {
            role: file.role,
            size: file.size,
            written: 0,
            buffer,
        });
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let region = self.current.as_ref().and_then(|c| self.region(c.role));
        let Some(cur) = self.current.as_mut() else {
            return Err(other("data outside a file"));
        };
        if cur.written + data.len() as u64 > cur.size {
            return Err(other(format!(
                "the {} file is longer than announced",
                cur.role
            )));
        }
        match region {
            Some(extent) => self.disk.write_all_at(data, extent.offset + cur.written)?,
            None => cur.buffer.extend_from_slice(data),
        }
        cur.written += data.len() as u64;
        Ok(())
    }

    fn end(&mut self, file: &FileEntry) -> io::Result<()> {
        let Some(cur) = self.current.take() else {
            return Err(other("end without begin"));
        };
        if cur.role != file.role || cur.written != cur.size {
            return Err(other(format!("the {} file is incomplete", cur.role)));
        }
        match self.final_path(cur.role) {
            None => self.disk.sync_data(),
            Some(path) => {
                let partial = format!("{path}.partial");
                let esp = Esp::open(&self.disk, self.target.esp).map_err(other)?;
                esp.write_file(&partial, &cur.buffer).map_err(other)?;
                esp.close().map_err(other)?;
                self.partial.push(path);
                Ok(())
            }
        }
    }

    fn commit(&mut self) -> io::Result<()> {
        let esp = Esp::open(&self.disk, self.target.esp).map_err(other)?;
        for path in self.partial.drain(..) {
            esp.replace(&format!("{path}.partial"), &path)
                .map_err(other)?;
        }
        esp.close().map_err(other)?;
        self.disk.sync_all()
    }

    fn abort(&mut self) {
        self.current = None;
        if let Ok(esp) = Esp::open(&self.disk, self.target.esp) {
            for path in self.partial.drain(..) {
                let _ = esp.remove(&format!("{path}.partial"));
            }
            let _ = esp.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{BundleReader, BundleWriter, Policy};
    use crate::disk::{Layout, Part, MIB};
    use crate::slots::Slot;

    fn setup(name: &str) -> (PathBuf, File, Layout) {
        let size = 3200 * MIB;
        let path = std::env::temp_dir().join(format!("hvnode-slot-{name}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        f.set_len(size).expect("size");
        let layout = Layout::for_disk(size, 512).expect("layout");
        Esp::format(&f, layout.extent(Part::Esp), 1).expect("format");
        (path, f, layout)
    }

    fn sources(dir: &Path, root_len: usize) -> SlotSources {
        std::fs::create_dir_all(dir.join("live")).expect("mkdir");
        std::fs::create_dir_all(dir.join("boot")).expect("mkdir");
        let s = SlotSources::live_medium(dir);
        std::fs::write(&s.root, vec![0x5au8; root_len]).expect("root");
        std::fs::write(&s.verity, vec![0xa5u8; 8192]).expect("verity");
        std::fs::write(&s.kernel, b"kernel image").expect("kernel");
        std::fs::write(&s.initrd, vec![7u8; 3 * 1024 * 1024 + 5]).expect("initrd");
        s
    }

    #[test]
    fn writes_the_four_files_where_the_layout_says() {
        let (path, f, layout) = setup("files");
        let dir = path.with_extension("src");
        let s = sources(&dir, 3 << 20);
        let target = SlotTarget::from_layout(&layout, Slot::B);
        let mut seen = Vec::new();
        let f = SlotWriter::new(f, target)
            .write_files(&s, &mut |role, done, size| {
                if done == size {
                    seen.push(role);
                }
            })
            .expect("write");
        assert_eq!(seen, Role::ALL);
        let mut root = vec![0u8; 3 << 20];
        f.read_exact_at(&mut root, target.root.offset)
            .expect("read");
        assert!(root.iter().all(|&b| b == 0x5a));
        let mut tree = vec![0u8; 8192];
        f.read_exact_at(&mut tree, target.verity.offset)
            .expect("read");
        assert!(tree.iter().all(|&b| b == 0xa5));
        let esp = Esp::open(&f, target.esp).expect("esp");
        assert_eq!(esp.read_file("B/vmlinuz").expect("kernel"), b"kernel image");
        assert_eq!(
            esp.read_file("B/initrd.img").expect("initrd").len(),
            3 * 1024 * 1024 + 5
        );
        assert!(!esp.exists("B/vmlinuz.partial"));
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_root_image_larger_than_its_partition_is_refused() {
        let (path, f, layout) = setup("large");
        let mut target = SlotTarget::from_layout(&layout, Slot::A);
        target.root.len = MIB;
        let dir = path.with_extension("src");
        let s = sources(&dir, 2 << 20);
        let err = SlotWriter::new(f, target)
            .write_files(&s, &mut |_, _, _| {})
            .expect_err("too large");
        assert!(matches!(err, DiskError::DoesNotFit("root", _, _)), "{err}");
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_bundle_unpacks_into_the_slot_and_a_tampered_one_leaves_no_esp_files() {
        let (path, f, layout) = setup("bundle");
        let dir = path.with_extension("src");
        let s = sources(&dir, 1 << 20);
        let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let mut bundle = Vec::new();
        BundleWriter::new("0.2.0", 1, &"ab".repeat(32))
            .expect("writer")
            .file(Role::Root, &s.root)
            .file(Role::Verity, &s.verity)
            .file(Role::Kernel, &s.kernel)
            .file(Role::Initrd, &s.initrd)
            .write(&key, &mut bundle)
            .expect("bundle");
        let trusted = [key.verifying_key()];
        let policy = Policy {
            trusted: &trusted,
            running: None,
            force: false,
        };
        let target = SlotTarget::from_layout(&layout, Slot::B);
        let disk = f.try_clone().expect("clone");
        let mut w = SlotWriter::new(disk, target);
        BundleReader::open(&bundle[..], &policy)
            .expect("open")
            .unpack(&mut w)
            .expect("unpack");
        let esp = Esp::open(&f, target.esp).expect("esp");
        assert_eq!(esp.read_file("B/vmlinuz").expect("kernel"), b"kernel image");
        esp.close().expect("close");

        // The initrd's last byte changed: refused at its hash, and the ESP keeps nothing new.
        let target = SlotTarget::from_layout(&layout, Slot::A);
        let n = bundle.len();
        bundle[n - 1] ^= 1;
        let mut w = SlotWriter::new(f.try_clone().expect("clone"), target);
        assert!(BundleReader::open(&bundle[..], &policy)
            .expect("open")
            .unpack(&mut w)
            .is_err());
        let esp = Esp::open(&f, target.esp).expect("esp");
        assert!(!esp.exists("A/vmlinuz.partial"));
        assert!(!esp.exists("A/vmlinuz"));
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir_all(dir);
    }
}
