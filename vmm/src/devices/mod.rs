//! The VM's devices: virtio devices (block, net, rng) on the virtio-mmio transport, reached
//! through the [`MmioBus`], and the [`legacy`] PC devices on I/O ports, reached through the
//! [`pio::PioBus`].
//!
//! Each virtio device is split the same way: `device.rs` holds what the transport sees (device id,
//! features, config space) and starts the device's worker on activation; the request handling
//! (`request.rs`, or the device file for the small ones) works on one queue at a time and only
//! says whether it put entries in the used ring; [`worker`] owns the thread, the epoll loop over
//! the queue notifications and the guest interrupt. The vCPU threads only touch the transport
//! registers ([`mmio`], under a lock, through the [`bus::MmioBus`]); queue notifications arrive
//! as ioeventfds, so the I/O itself never runs on a vCPU.
//!
//! Everything the guest put in a queue is hostile: [`chain`] bounds and checks every descriptor
//! chain, each request is answered (the head always goes back to the used ring), and an error
//! that leaves a queue unusable marks the device DEVICE_NEEDS_RESET instead of touching the
//! process.

pub mod blk;
pub mod bus;
mod chain;
pub mod legacy;
pub mod mmio;
pub mod net;
pub mod pio;
pub mod rng;
pub mod worker;

use crate::memory::GuestRam;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;

use vmm_sys_util::eventfd::EventFd;

pub use bus::{DeviceSet, MmioBus};

/// Counters of devices, reported under `stats.devices` by the control socket.
pub trait DeviceStats: Send + Sync {
    /// Counters by device name (`serial`, `virtio-blk0`, ...), then by counter name.
    fn device_stats(&self) -> BTreeMap<String, BTreeMap<String, u64>>;
}

/// The interrupt line of one device and the status bits its worker raises.
///
/// The line is an eventfd wired to an edge-triggered IOAPIC pin with KVM_IRQFD; the driver reads
/// InterruptStatus to learn why it fired and acknowledges through InterruptACK.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl Interrupt {
    /// An interrupt that fires `irq`.
    pub fn new(irq: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // A full eventfd counter still means the interrupt is pending; nothing is lost.
        let _ = self.irq.write(1);
    }

    /// Tells the driver that the used ring of a queue has new entries.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Marks the device DEVICE_NEEDS_RESET and tells the driver through a configuration change
    /// interrupt, as the virtio spec asks.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Takes the status bits and the needs-reset flag of a snapshot, without interrupting.
    fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// One queue handed to a device on activation, with the eventfd its notifications arrive on.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue as the driver configured it (validated against guest memory).
    pub queue: Queue,
    /// Written by KVM (ioeventfd) or by the transport when the driver writes QueueNotify.
    pub event: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory (a clone sharing the same mapping).
    pub mem: GuestRam,
    /// The device's queues, in order.
    pub queues: Vec<ActiveQueue>,
    /// The device's interrupt.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver configured the wrong number of queues.
    #[error("Expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The backend could not be duplicated for the worker or the thread not started.
    #[error("Starting the device worker: {0}")]
    Worker(std::io::Error),
    /// The worker was still busy with a request at the pause deadline.
    #[error("The device worker did not stop in time")]
    PauseTimeout,
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// virtio device id (1 net, 2 block, 4 rng).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// The device configuration space (read-only for the devices here).
    fn config(&self) -> &[u8];
    /// Starts processing the queues: the worker that serves them. The transport owns it:
    /// dropping it (reset) stops and joins it, and the transport parks it on pause.
    fn activate(&mut self, activation: Activation) -> Result<worker::Worker, DeviceError>;
    /// The device's counters.
    fn stats(&self) -> BTreeMap<String, u64>;
    /// Flushes what the backend buffers to stable storage, for a snapshot; nothing by default.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// Tells the network where the guest is now, after it arrived by migration; `false` for a
    /// device with nothing to announce (the default).
    fn announce(&self) -> std::io::Result<bool> {
        Ok(false)
    }
}

/// A counter a worker bumps and the control socket reads.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
