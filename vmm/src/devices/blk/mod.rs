//! virtio-blk over a raw image file: read, write, flush and get-id requests, bounded by the
//! image's capacity in 512-byte sectors.

mod device;
mod request;

pub use device::{Block, BlockError};

/// The sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
