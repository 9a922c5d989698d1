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
        let rw = Block::open(path.to_str().unwrap(), false).unwrap();
        assert_eq!(rw.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
