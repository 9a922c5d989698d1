//! The snapshot directory: writing it from a paused VM, and reading it back for a restore.
//!
//! It holds [`SNAPSHOT_CONFIG`] (the [`VmConfig`] the guest ran with), [`SNAPSHOT_STATE`] (the
//! state file, see [`super`]) and [`SNAPSHOT_MEMORY`]: guest RAM as one sparse file, the RAM
//! below the MMIO hole at its guest address and the RAM above 4 GiB right after it (at its guest
//! address minus the hole's size), so that the file is exactly as long as the guest's memory.
//! Only pages with a non-zero byte are written; the rest stay holes.
//!
//! The files are written once the VMM is sandboxed: only new files in a new directory can be
//! created (see [`crate::seccomp`]), never an existing one opened.

use crate::memory::GuestRam;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::Path;

use hvnode_api::vmm::{VmConfig, SNAPSHOT_CONFIG, SNAPSHOT_MEMORY, SNAPSHOT_STATE};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use super::{StateError, VmState};
use crate::boot::{self, RamRange};

/// The unit a page is skipped in when it is all zeros.
const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
/// Guest memory is read in pieces this large.
const CHUNK: usize = 1 << 20;

/// Where each range of guest RAM lies in the memory file: `(range, file offset)`.
pub fn memory_layout(mem_size: u64) -> Vec<(RamRange, u64)> {
    let mut offset = 0;
    boot::ram_ranges(mem_size)
        .into_iter()
        .map(|r| {
            let at = offset;
            offset += r.size;
            (r, at)
        })
        .collect()
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// The memory file's length: the guest's memory size.
    pub memory_bytes: u64,
    /// Bytes of it written (pages that are not all zeros).
    pub memory_written_bytes: u64,
    /// The state file's size.
    pub state_bytes: u64,
}

/// Creates the snapshot directory, which must not exist yet (its parent must); only its owner
/// can read it.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().mode(0o700).create(dir)
}

/// A new file in the snapshot directory; never an existing one.
fn create(dir: &Path, name: &str) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(name))
        .map_err(|e| io::Error::new(e.kind(), format!("creating {name}: {e}")))
}

fn context(what: &str) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Writes the config, the state and `mem` (of `mem_size` bytes) into `dir` (made by
/// [`create_dir`]) and syncs them and the directory.
pub fn write(
    dir: &Path,
    config: &VmConfig,
    state: &VmState,
    mem: &GuestRam,
    mem_size: u64,
) -> io::Result<Written> {
    // The jail is this run's, not the guest's: a restore runs in the one its start gives.
    let config = VmConfig {
        jail: None,
        ..config.clone()
    };
    let config_json = serde_json::to_vec_pretty(&config).map_err(io::Error::other)?;
    let f = create(dir, SNAPSHOT_CONFIG)?;
    f.write_all_at(&config_json, 0)
        .and_then(|()| f.sync_all())
        .map_err(context(SNAPSHOT_CONFIG))?;
    let state_bytes = super::encode(state).map_err(io::Error::other)?;
    let f = create(dir, SNAPSHOT_STATE)?;
    f.write_all_at(&state_bytes, 0)
        .and_then(|()| f.sync_all())
        .map_err(context(SNAPSHOT_STATE))?;
    let f = create(dir, SNAPSHOT_MEMORY)?;
    let memory_written_bytes = write_memory(&f, mem, mem_size)
        .and_then(|n| f.sync_all().map(|()| n))
        .map_err(context(SNAPSHOT_MEMORY))?;
    // The directory entries themselves, so that the files are there after a host crash.
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .and_then(|d| d.sync_all())
        .map_err(context("syncing the snapshot directory"))?;
    Ok(Written {
        memory_bytes: mem_size,
        memory_written_bytes,
        state_bytes: state_bytes.len() as u64,
    })
}

/// Writes the pages of `mem` that hold anything into `file` at their place in the layout;
/// returns the bytes written.
fn write_memory(file: &File, mem: &GuestRam, mem_size: u64) -> io::Result<u64> {
    file.set_len(mem_size)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    for (range, file_at) in memory_layout(mem_size) {
        let mut done = 0;
        while done < range.size {
            let n = (range.size - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(range.start + done))
                .map_err(|e| io::Error::other(format!("reading guest memory: {e}")))?;
            // Runs of pages with data, each written at once.
            let mut page = 0;
            while page < n {
                // A slice comparison is a memcmp: fast even in a debug build.
                let is_data = |p: usize| {
                    let page = &chunk[p..(p + PAGE).min(n)];
                    page != &ZERO_PAGE[..page.len()]
                };
                if !is_data(page) {
                    page += PAGE;
                    continue;
                }
                let start = page;
                while page < n && is_data(page) {
                    page += PAGE;
                }
                let end = page.min(n);
                file.write_all_at(&chunk[start..end], file_at + done + start as u64)?;
                written += (end - start) as u64;
            }
            done += n as u64;
        }
    }
    Ok(written)
}

/// Why a snapshot cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A file of the snapshot could not be read.
    #[error("snapshot {0}: {1}")]
    Read(String, io::Error),
    /// The saved config does not parse.
    #[error("snapshot {SNAPSHOT_CONFIG}: {0}")]
    Config(serde_json::Error),
    /// The state file was refused.
    #[error("snapshot {SNAPSHOT_STATE}: {0}")]
    State(#[from] StateError),
    /// This run's config does not fit the snapshot.
    #[error("the VM config does not match the snapshot's: {0}")]
    Mismatch(String),
    /// The memory file is not the guest's size, or cannot be mapped.
    #[error("snapshot {SNAPSHOT_MEMORY}: {0}")]
    Memory(String),
    /// The state does not fit this VM (vCPU count, devices) or KVM refused it.
    #[error("restoring {0}: {1}")]
    Device(String, String),
}

/// A snapshot read back: its state, and its memory file opened.
#[derive(Debug)]
pub struct Snapshot {
    /// The VM's state.
    pub state: VmState,
    /// The memory file (read-only: the guest's writes go to private copies of its pages).
    pub memory: File,
}

/// Reads the snapshot in `dir` for a VM configured as `config`: refuses a config that does
/// not match the saved one (see [`mismatch`]), a state file that fails its checks, and a memory
/// file that is not `mem_size` bytes long.
pub fn open(dir: &Path, config: &VmConfig, mem_size: u64) -> Result<Snapshot, RestoreError> {
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .map_err(|e| RestoreError::Read(dir.join(name).display().to_string(), e))
    };
    let saved: VmConfig =
        serde_json::from_slice(&read(SNAPSHOT_CONFIG)?).map_err(RestoreError::Config)?;
    if let Some(diff) = mismatch(&saved, config) {
        return Err(RestoreError::Mismatch(diff));
    }
    let state = super::decode(&read(SNAPSHOT_STATE)?)?;
    if state.vcpus.len() != config.vcpus as usize {
        return Err(RestoreError::Device(
            "vCPUs".into(),
            format!(
                "the state holds {} vCPUs, the config says {}",
                state.vcpus.len(),
                config.vcpus
            ),
        ));
    }
    let path = dir.join(SNAPSHOT_MEMORY);
    let memory =
        File::open(&path).map_err(|e| RestoreError::Read(path.display().to_string(), e))?;
    let len = memory
        .metadata()
        .map_err(|e| RestoreError::Read(path.display().to_string(), e))?
        .len();
    if len != mem_size {
        return Err(RestoreError::Memory(format!(
            "{len} bytes, the guest has {mem_size}"
        )));
    }
    Ok(Snapshot { state, memory })
}

/// What differs between the saved config and this run's in what the state depends on (vCPUs,
/// memory, the disks and NICs by number, order and what the guest sees of them, the rng), or
/// `None`. Everything of the run itself may differ: name, sockets, logs, exit file, image
/// paths, tap names and bridges, and the kernel and command line (the guest is past booting).
pub fn mismatch(saved: &VmConfig, now: &VmConfig) -> Option<String> {
    if saved.vcpus != now.vcpus {
        return Some(format!(
            "vcpus {} in the snapshot, {} now",
            saved.vcpus, now.vcpus
        ));
    }
    if saved.memory_mib != now.memory_mib {
        return Some(format!(
            "memory_mib {} in the snapshot, {} now",
            saved.memory_mib, now.memory_mib
        ));
    }
    if saved.disks.len() != now.disks.len() {
        return Some(format!(
            "{} disks in the snapshot, {} now",
            saved.disks.len(),
            now.disks.len()
        ));
    }
    for (i, (a, b)) in saved.disks.iter().zip(&now.disks).enumerate() {
        if a.read_only != b.read_only {
            return Some(format!(
                "disk {i} is read_only {} in the snapshot, {} now",
                a.read_only, b.read_only
            ));
        }
    }
    if saved.nets.len() != now.nets.len() {
        return Some(format!(
            "{} NICs in the snapshot, {} now",
            saved.nets.len(),
            now.nets.len()
        ));
    }
    for (i, (a, b)) in saved.nets.iter().zip(&now.nets).enumerate() {
        if !a.mac.eq_ignore_ascii_case(&b.mac) {
            return Some(format!(
                "NIC {i} has MAC {} in the snapshot, {} now",
                a.mac, b.mac
            ));
        }
    }
    if saved.rng != now.rng {
        return Some(format!(
            "rng {} in the snapshot, {} now",
            saved.rng, now.rng
        ));
    }
    None
}

/// Guest memory of `mem_size` bytes mapped from the snapshot's memory file, privately: pages
/// are read from the file as the guest first touches them (so a large guest resumes at once),
/// and its writes go to private copies, never to the file.
pub fn map_memory(file: &File, mem_size: u64) -> Result<GuestRam, RestoreError> {
    let err = |e: String| RestoreError::Memory(e);
    let mut regions = Vec::new();
    for (range, offset) in memory_layout(mem_size) {
        let size = usize::try_from(range.size)
            .map_err(|_| err(format!("{} bytes do not fit this host", range.size)))?;
        let fd = file.try_clone().map_err(|e| err(e.to_string()))?;
        let mapping: MmapRegion<AtomicBitmap> =
            MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::new(fd, offset))
                .build()
                .map_err(|e| err(format!("mapping {size} bytes at offset {offset}: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(range.start))
            .ok_or_else(|| err(format!("range at {:#x} overflows", range.start)))?;
        regions.push(region);
    }
    GuestRam::from_regions(regions).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnode_api::vmm::{VmDisk, VmNet};

    fn config() -> VmConfig {
        VmConfig {
            name: "a".into(),
            vcpus: 2,
            memory_mib: 64,
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![VmDisk {
                path: "/a.img".into(),
                read_only: false,
            }],
            nets: vec![VmNet {
                tap: "tap0".into(),
                mac: "52:54:00:00:00:01".into(),
                bridge: None,
            }],
            rng: true,
            serial_log: None,
            serial_socket: None,
            control_socket: None,
            exit_file: None,
            jail: None,
        }
    }

    #[test]
    fn the_high_ram_follows_the_low_ram_in_the_file() {
        let layout = memory_layout(5 << 30);
        assert_eq!(layout.len(), 2);
        assert_eq!((layout[0].0.start, layout[0].1), (0, 0));
        assert_eq!(layout[1].0.start, boot::HIGH_RAM_START);
        assert_eq!(layout[1].1, boot::MMIO_HOLE_START);
        assert_eq!(layout[1].1 + layout[1].0.size, 5 << 30);
    }

    #[test]
    fn a_config_that_changes_what_the_guest_saw_is_refused_naming_it() {
        let saved = config();
        let mut now = config();
        now.name = "b".into();
        now.disks[0].path = "/b.img".into();
        now.nets[0].tap = "tap9".into();
        now.nets[0].mac = "52:54:00:00:00:01".to_uppercase();
        now.kernel = "/other".into();
        assert_eq!(mismatch(&saved, &now), None, "the runtime may change");
        type Change = fn(&mut VmConfig);
        let cases: [(Change, &str); 6] = [
            (|c| c.vcpus = 1, "vcpus 2 in the snapshot, 1 now"),
            (|c| c.memory_mib = 128, "memory_mib 64"),
            (|c| c.disks.clear(), "1 disks in the snapshot, 0 now"),
            (|c| c.disks[0].read_only = true, "disk 0 is read_only"),
            (
                |c| c.nets[0].mac = "52:54:00:00:00:02".into(),
                "NIC 0 has MAC",
            ),
            (|c| c.rng = false, "rng true in the snapshot, false now"),
        ];
        for (change, says) in cases {
            let mut now = config();
            change(&mut now);
            let diff = mismatch(&saved, &now).expect(says);
            assert!(diff.contains(says), "{diff}");
        }
    }

    #[test]
    fn memory_goes_out_sparse_and_comes_back_mapped_privately() {
        let dir = std::env::temp_dir().join(format!("hvnode-snapmem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let size = 16u64 << 20;
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(1u8, GuestAddress(size - 1)).unwrap();
        let path = dir.join("memory");
        let f = File::create(&path).unwrap();
        assert_eq!(write_memory(&f, &mem, size).unwrap(), 2 * PAGE as u64);
        assert_eq!(f.metadata().unwrap().len(), size);
        let back = map_memory(&File::open(&path).unwrap(), size).unwrap();
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(back.read_obj::<u8>(GuestAddress(size - 1)).unwrap(), 1);
        back.write_obj(7u8, GuestAddress(0)).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk[0], 0, "the guest's writes stay out of the file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
