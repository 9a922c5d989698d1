use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::request::{BlkHandler, Counters, Disk};
use super::SECTOR_SIZE;
use crate::devices::worker::Worker;
use crate::devices::{Activation, DeviceError, VirtioDevice};

/// Queue size; a request may use every descriptor but the header and the status.
pub(super) const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened or measured.
    #[error("Disk image {0}: {1}")]
    Open(String, std::io::Error),
    /// The image is not a whole number of sectors.
    #[error("Disk image {0} is {1} bytes, not a multiple of 512")]
    Size(String, u64),
    /// Another VMM holds a lock on the image that this one's use conflicts with.
    #[error(
        "Disk image {0} is in use by another VMM ({1}), on this node or, on shared storage, on \
         another: a disk is written by one VMM at a time"
    )]
    Locked(String, &'static str),
}

/// Takes an open file description lock on the whole of `file`: a write lock for a disk the
/// guest writes, a read lock for a read-only one, so that any number of VMMs read an image and
/// none writes one that another uses. OFD locks belong to the open file, not the process (so
/// no other thread's close drops them), last as long as the VMM holds it open, and on NFSv4
/// are held by the server: they exclude VMMs on every node that mounts the same export.
fn lock(file: &std::fs::File, path: &str, read_only: bool) -> Result<(), BlockError> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed flock is a valid value (all integers); the fields that matter are set
    // below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however long it grows
                  // SAFETY: F_OFD_SETLK reads the flock we own for the duration of the call; the fd is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(BlockError::Locked(
            path.to_owned(),
            if read_only {
                "it writes it"
            } else {
                "it uses it"
            },
        )),
        _ => Err(BlockError::Open(path.to_owned(), e)),
    }
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Disk>,
    config: [u8; 16],
    features: u64,
    counters: Arc<Counters>,
}

impl Block {
    /// Opens `path` (read-only when `read_only`, which the guest also sees as VIRTIO_BLK_F_RO).
    pub fn open(path: &str, read_only: bool) -> Result<Block, BlockError> {
        let err = |e| BlockError::Open(path.to_owned(), e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        lock(&file, path, read_only)?;
        // Seeking also measures block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(err)?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::Size(path.to_owned(), size));
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = Path::new(path)
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name[..n]);
        let sectors = size / SECTOR_SIZE;
        // virtio_blk_config: capacity, size_max (not offered), seg_max.
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        let mut features =
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Block {
            disk: Arc::new(Disk {
                file,
                sectors,
                read_only,
                id,
            }),
            config,
            features,
            counters: Arc::default(),
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, a: Activation) -> Result<Worker, DeviceError> {
        let got = a.queues.len();
        let Ok([q]) = <[_; 1]>::try_from(a.queues) else {
            return Err(DeviceError::QueueCount { expected: 1, got });
        };
        let handler = BlkHandler {
            mem: a.mem,
            queue: q.queue,
            disk: Arc::clone(&self.disk),
            counters: Arc::clone(&self.counters),
        };
        Worker::spawn("virtio-blk", handler, vec![q.event], a.interrupt)
            .map_err(DeviceError::Worker)
    }

    fn stats(&self) -> BTreeMap<String, u64> {
        self.counters.snapshot()
    }

    fn flush(&self) -> std::io::Result<()> {
        if self.disk.read_only {
            return Ok(());
        }
        self.disk.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_an_image_that_is_not_whole_sectors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("hvnode-blk-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("odd.img");
        std::fs::write(&path, vec![0u8; 1000]).unwrap();
        let p = path.to_str().unwrap();
        let e = Block::open(p, false).unwrap_err();
        assert!(matches!(e, BlockError::Size(_, 1000)));
        assert!(e.to_string().contains("odd.img"), "{e}");
        let missing = Block::open(dir.join("none.img").to_str().unwrap(), true).unwrap_err();
        assert!(missing.to_string().contains("none.img"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_space_holds_capacity_and_features_say_read_only() {
        let dir = std::env::temp_dir().join(format!("hvnode-blk-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a-disk-with-a-long-name.img");
        std::fs::write(&path, vec![0u8; 8 * 512]).unwrap();
        let b = Block::open(path.to_str().unwrap(), true).unwrap();
        assert_eq!(b.config()[..8], 8u64.to_le_bytes());
        assert_eq!(b.config()[12..16], SEG_MAX.to_le_bytes());
        assert_ne!(b.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(&b.disk.id, b"a-disk-with-a-long-n");
        drop(b);
        let rw = Block::open(path.to_str().unwrap(), false).unwrap();
        assert_eq!(rw.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// OFD locks exclude between open files, in one process as across processes and nodes:
    /// readers share an image, a writer has it alone, and the lock goes with the file.
    #[test]
    fn one_writer_or_many_readers_per_image() {
        let dir = std::env::temp_dir().join(format!("hvnode-blk-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shared.img");
        std::fs::write(&path, vec![0u8; 512]).unwrap();
        let p = path.to_str().unwrap();
        let r1 = Block::open(p, true).unwrap();
        let r2 = Block::open(p, true).unwrap();
        let e = Block::open(p, false).unwrap_err();
        assert!(matches!(e, BlockError::Locked(..)), "{e:?}");
        assert!(
            e.to_string().contains("shared.img") && e.to_string().contains("one VMM at a time"),
            "{e}"
        );
        drop((r1, r2));
        let w = Block::open(p, false).unwrap();
        assert!(matches!(Block::open(p, true), Err(BlockError::Locked(..))));
        assert!(matches!(Block::open(p, false), Err(BlockError::Locked(..))));
        drop(w);
        Block::open(p, false).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
