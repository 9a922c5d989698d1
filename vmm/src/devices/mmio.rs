//! The virtio-mmio transport, version 2 (virtio 1.x "modern"): the register window of one
//! device.
//!
//! Registers are 32-bit and accessed from the vCPU threads under the bus lock; anything else
//! (other widths, unknown offsets, the legacy page-size and PFN registers) reads as zero and
//! writes are ignored. Queue configuration is accepted only until the driver sets DRIVER_OK;
//! DRIVER_OK validates every queue against guest memory and activates the device; a status
//! write of 0 resets it (stops its worker, resets the queues and the negotiated features).

use crate::memory::GuestRam;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueState, QueueT};

use vmm_sys_util::eventfd::EventFd;

use super::worker::Worker;
use super::{Activation, ActiveQueue, DeviceError, Interrupt, VirtioDevice};
use crate::hex::Hex;

/// Size of one device's register window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern transport.
pub const VERSION: u32 = 2;
/// "HVND".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"HVND");

/// The ConfigGeneration register: the device configuration spaces here never change.
const CONFIG_GENERATION: u32 = 0;

/// One queue of a transport as a snapshot holds it: what the driver configured, and where the
/// device stands in the rings (the next available entry it will take, the next used entry it
/// will fill).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
        }
    }
}

/// A transport and its device as a snapshot holds them. The device's own part is what the
/// driver has seen of it (type, offered features, configuration space): the devices here keep
/// nothing else across requests, and a restore refuses a device that would look different.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features: u64,
    pub device_config: Hex,
    pub driver_features: u64,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub queue_select: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueSnapshot>,
}

/// One device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    /// The device's worker while it is active (from DRIVER_OK to reset).
    worker: Option<Worker>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// The transport for `device`, whose queue notifications go to fresh eventfds
    /// ([`queue_events`](Self::queue_events), for the VMM to register as ioeventfds).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            worker: None,
        })
    }

    /// The eventfd of each queue, in queue order: a write of the queue's index to QueueNotify
    /// signals it.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's counters.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        self.device.stats()
    }

    /// Parks the device's worker, if one runs, once its request in flight is done: from then on
    /// the device neither reads its queues and backend nor writes guest memory. Fails at
    /// `deadline` with the pause still asked for, which [`MmioTransport::resume`] ends.
    pub fn pause(&self, deadline: Instant) -> Result<(), DeviceError> {
        self.worker.as_ref().map_or(Ok(()), |w| w.pause(deadline))
    }

    /// Lets a parked worker run again; what arrived meanwhile is served then.
    pub fn resume(&self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    /// Flushes what the device's backend buffers (a disk image's writes) to stable storage.
    pub fn flush(&self) -> std::io::Result<()> {
        self.device.flush()
    }

    /// See [`VirtioDevice::announce`].
    pub fn announce(&self) -> std::io::Result<bool> {
        self.device.announce()
    }

    /// The transport and its device as they are; call while paused. The queues of an active
    /// device come from its parked worker, which alone knows where it is in the rings.
    pub fn save(&self) -> TransportState {
        let queues = match self.worker.as_ref().and_then(Worker::parked_queues) {
            Some(queues) => queues,
            None => self.queues.iter().map(Queue::state).collect(),
        };
        TransportState {
            device_type: self.device.device_type(),
            device_features: self.device.features(),
            device_config: Hex(self.device.config().to_vec()),
            driver_features: self.driver_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: CONFIG_GENERATION,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues: queues.into_iter().map(QueueSnapshot::from).collect(),
        }
    }

    /// Puts a fresh transport into `state`. An active device gets its worker back on the saved
    /// queues, is notified on each of them (notifications the driver made while the VM was
    /// paused died with the old process) and interrupts once if an interrupt was pending: a
    /// spurious interrupt costs the driver a status read, a lost one a stuck queue.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        let device = self.device.as_ref();
        if state.device_type != device.device_type() {
            return Err(format!(
                "the snapshot has a device of type {} here, this VM one of type {}",
                state.device_type,
                device.device_type()
            ));
        }
        if state.device_features != device.features() || state.device_config.0 != device.config() {
            return Err("its features or configuration space differ from the snapshot's (another                         disk size or read-only flag, another MAC address)"
                .into());
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len()
            || state
                .queues
                .iter()
                .zip(max_sizes)
                .any(|(q, &max)| q.max_size != max)
        {
            return Err("its queues differ from the snapshot's".into());
        }
        let queues = state
            .queues
            .iter()
            .map(|q| Queue::try_from(QueueState::from(q)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("a saved queue: {e}"))?;
        self.queues = queues;
        self.driver_features = state.driver_features;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.queue_select = state.queue_select;
        self.status = state.status;
        self.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if self.config_frozen() && !state.needs_reset {
            self.activate();
            if self.worker.is_some() {
                for e in &self.queue_events {
                    let _ = e.write(1);
                }
            }
        }
        if state.interrupt_status != 0 {
            self.interrupt.raise(0);
        }
        Ok(())
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn config_frozen(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    /// A read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            let config = self.device.config();
            let start = (offset - u64::from(reg::VIRTIO_MMIO_CONFIG)) as usize;
            if let Some(src) = start
                .checked_add(data.len())
                .and_then(|end| config.get(start..end))
            {
                data.copy_from_slice(src);
            }
            return;
        }
        if data.len() != 4 {
            return;
        }
        let value = match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected().map_or(0, |q| q.max_size().into()),
            reg::VIRTIO_MMIO_QUEUE_READY => self.selected().map_or(0, |q| q.ready().into()),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => {
                let needs_reset = if self.interrupt.needs_reset() {
                    VIRTIO_CONFIG_S_NEEDS_RESET
                } else {
                    0
                };
                self.status | needs_reset
            }
            reg::VIRTIO_MMIO_CONFIG_GENERATION => CONFIG_GENERATION,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        // The device config spaces here are read-only.
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let frozen = self.config_frozen();
        match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if negotiating && self.driver_features_select < 2 {
                    let shift = 32 * self.driver_features_select;
                    self.driver_features &= !(0xffff_ffffu64 << shift);
                    self.driver_features |= u64::from(v) << shift;
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = v,
            // Reached only when no ioeventfd took the write (tests, or a KVM without it).
            reg::VIRTIO_MMIO_QUEUE_NOTIFY if self.worker.is_some() => {
                if let Some(e) = self.queue_events.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            reg::VIRTIO_MMIO_STATUS => self.write_status(v),
            _ if frozen => {}
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                if let (Some(q), Ok(n)) = (self.selected(), u16::try_from(v)) {
                    q.set_size(n);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.set_addr(|q| q.set_desc_table_address(Some(v), None))
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.set_addr(|q| q.set_desc_table_address(None, Some(v)))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.set_addr(|q| q.set_avail_ring_address(Some(v), None))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.set_addr(|q| q.set_avail_ring_address(None, Some(v)))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.set_addr(|q| q.set_used_ring_address(Some(v), None))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.set_addr(|q| q.set_used_ring_address(None, Some(v)))
            }
            _ => {}
        }
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue)) {
        // A ready queue's addresses stay as they were (virtio 1.2, 4.2.2.2).
        if let Some(q) = self.selected().filter(|q| !q.ready()) {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is ignored.
        if v & self.status != self.status {
            return;
        }
        let added = v & !self.status;
        let mut status = v;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Left clear, so that the driver sees the features were refused.
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 || status & VIRTIO_CONFIG_S_FAILED != 0 {
                return;
            }
            self.status = status;
            self.activate();
            return;
        }
        self.status = status;
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        if !valid {
            eprintln!(
                "hvnode-vmm: virtio device {}: driver set DRIVER_OK with a queue not ready or outside guest memory",
                self.device.device_type()
            );
            self.interrupt.set_needs_reset();
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (q, e) in self.queues.iter().zip(&self.queue_events) {
            // The device gets its own copy; the transport's stays for register reads.
            let queue = Queue::try_from(q.state()).map_err(|e| e.to_string());
            let event = e.try_clone().map_err(|e| e.to_string());
            match (queue, event) {
                (Ok(queue), Ok(event)) => queues.push(ActiveQueue { queue, event }),
                (Err(err), _) | (_, Err(err)) => {
                    eprintln!("hvnode-vmm: virtio device: queue: {err}");
                    self.interrupt.set_needs_reset();
                    return;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: Arc::clone(&self.interrupt),
            features: self.driver_features,
        };
        match self.device.activate(activation) {
            Ok(worker) => self.worker = Some(worker),
            Err(e) => {
                eprintln!(
                    "hvnode-vmm: virtio device {}: activation: {e}",
                    self.device.device_type()
                );
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins it.
        self.worker = None;
        for q in &mut self.queues {
            q.reset();
        }
        for e in &self.queue_events {
            let _ = e.read();
        }
        self.interrupt.clear();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::chain::testing::*;
    use crate::devices::rng::Rng;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

    fn transport(mem: &GuestRam) -> (MmioTransport, Arc<Interrupt>) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq));
        let t = MmioTransport::new(
            Box::new(Rng::new().unwrap()),
            mem.clone(),
            Arc::clone(&interrupt),
        )
        .unwrap();
        (t, interrupt)
    }

    fn r(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, reg::VIRTIO_MMIO_STATUS, ACK);
        w(t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(
            t,
            reg::VIRTIO_MMIO_DRIVER_FEATURES,
            1 << (VIRTIO_F_VERSION_1 - 32),
        );
        w(t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, q: &MockSplitQueue<GuestRam>, size: u32) {
        w(t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_NUM, size);
        w(
            t,
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
            q.desc_table_addr().0 as u32,
        );
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_addr().0 as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, q.used_addr().0 as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn identifies_as_a_modern_virtio_mmio_device() {
        let mem = memory();
        let (mut t, _) = transport(&mem);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_RNG);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 7");
        let mut byte = [0xaa; 1];
        t.read(0, &mut byte);
        assert_eq!(byte, [0], "registers are 32-bit only");
    }

    #[test]
    fn offers_version_1_in_the_high_feature_word() {
        let mem = memory();
        let (mut t, _) = transport(&mem);
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
            1 << (VIRTIO_F_VERSION_1 - 32)
        );
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn refuses_features_the_device_did_not_offer_or_a_driver_without_version_1() {
        let mem = memory();
        let (mut t, _) = transport(&mem);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
        w(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRIVER);
        w(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 0);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS),
            ACK | DRIVER,
            "legacy driver"
        );
        negotiate(&mut t);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS),
            ACK | DRIVER | FEATURES_OK
        );
    }

    #[test]
    fn activates_on_driver_ok_and_freezes_queue_configuration() {
        let mem = memory();
        let (mut t, interrupt) = transport(&mem);
        let q = MockSplitQueue::new(&mem, 16);
        negotiate(&mut t);
        setup_queue(&mut t, &q, 16);
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK
        );
        assert!(t.worker.is_some());
        // Writes to the queue registers are ignored from now on.
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 4);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1234_5000);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(t.queues[0].size(), 16);
        assert_eq!(t.queues[0].desc_table(), q.desc_table_addr().0);
        // The device serves a request notified through the QueueNotify fallback.
        offer(&q, 0, &[wo(0x10_0000, 32)]);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while used_idx(&q, &mem) == 0 {
            assert!(std::time::Instant::now() < deadline, "no used entry");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(used(&q, &mem, 0), (0, 32));
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert!(!interrupt.needs_reset());
    }

    #[test]
    fn a_queue_outside_guest_memory_fails_activation_with_needs_reset() {
        let mem = memory();
        let (mut t, _) = transport(&mem);
        negotiate(&mut t);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 16);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1000);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, 0x2000);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.worker.is_none());
        assert_ne!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
            2,
            "config change"
        );
    }

    #[test]
    fn a_queue_above_the_hole_activates_and_one_running_into_it_does_not() {
        let mem = two_regions();
        let (mut t, _) = transport(&mem);
        let q = MockSplitQueue::create(&mem, GuestAddress(HIGH), 16);
        negotiate(&mut t);
        setup_queue(&mut t, &q, 16);
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.worker.is_some());
        // The same queue with its used ring over the end of the first region.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        negotiate(&mut t);
        setup_queue(&mut t, &q, 16);
        assert!(t.worker.is_none() && t.queues[0].ready());
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, (16 << 20) - 64);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.worker.is_none());
        assert_ne!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn status_zero_resets_queues_features_and_interrupts() {
        let mem = memory();
        let (mut t, _) = transport(&mem);
        let q = MockSplitQueue::new(&mem, 16);
        negotiate(&mut t);
        setup_queue(&mut t, &q, 16);
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.worker.is_some());
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert!(t.worker.is_none());
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(t.driver_features, 0);
        assert_eq!(t.queues[0].desc_table(), 0);
        // The queue can be configured and activated again.
        negotiate(&mut t);
        setup_queue(&mut t, &q, 8);
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.worker.is_some());
        assert_eq!(t.queues[0].size(), 8);
    }

    #[test]
    fn ignores_status_writes_that_clear_bits_and_driver_ok_without_features_ok() {
        let mem = memory();
        let (mut t, _) = transport(&mem);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRIVER);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | DRIVER_OK);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRIVER);
        assert!(t.worker.is_none());
    }

    #[test]
    fn config_space_reads_are_bounded_to_its_size() {
        let mem = memory();
        let (mut t, _) = transport(&mem);
        let mut b = [0xffu8; 8];
        t.read(0x100, &mut b);
        assert_eq!(b, [0; 8], "rng has no config space");
        t.read(u64::MAX - 3, &mut b[..4]);
        assert_eq!(b[..4], [0; 4]);
    }
}
