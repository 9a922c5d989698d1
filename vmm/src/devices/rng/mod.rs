//! virtio-rng: device-writable buffers filled from the host's getrandom(2).

mod device;

pub use device::Rng;
