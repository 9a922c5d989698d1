//! virtio-net over a tap device: receive queue 0, transmit queue 1, no offloads.

mod device;
pub mod tap;

pub use device::Net;
