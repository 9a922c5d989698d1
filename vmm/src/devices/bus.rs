//! The VM's virtio-mmio devices: building them from the VM config, wiring their interrupts and
//! queue notifications into KVM, and dispatching the vCPUs' MMIO exits to their windows.
//!
//! Memory map: device `i` has the 4 KiB window at [`MMIO_BASE`] + `i` × 4 KiB and IOAPIC pin
//! [`FIRST_GSI`] + `i` (edge-triggered). Disks come first (in config order, so the first disk is
//! the guest's vda), then network devices, then the rng.

use crate::memory::GuestRam;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hvnode_api::vmm::VmConfig;
use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;

use vmm_sys_util::eventfd::EventFd;

use super::blk::{Block, BlockError};
use super::mmio::{MmioTransport, TransportState, WINDOW_SIZE};
use super::net::{tap, Net};
use super::rng::Rng;
use super::{DeviceError, DeviceStats, Interrupt, VirtioDevice};
use crate::acpi::AcpiMmioDevice;

/// Guest-physical address of the first device window: in the MMIO hole above the RAM below
/// 4 GiB (which ends at [`crate::boot::MMIO_HOLE_START`]) and well below the IOAPIC at
/// 0xfec0_0000.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// The first device's GSI. 0-4 are the PIT, the i8042 and COM1 territory.
pub const FIRST_GSI: u32 = 5;
/// The in-kernel IOAPIC has 24 pins.
pub const MAX_DEVICES: usize = 24 - FIRST_GSI as usize;

/// Errors building the devices.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A disk image.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// A tap device.
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    /// A MAC address in the config.
    #[error("Invalid MAC address {0:?} for tap {1}")]
    Mac(String, String),
    /// Too many devices for the IOAPIC pins.
    #[error("{0} virtio devices, at most {MAX_DEVICES} fit")]
    TooMany(usize),
    /// An eventfd, or /dev/urandom for the rng.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
}

/// A device that did not park by the pause deadline.
#[derive(Debug, thiserror::Error)]
#[error("{0}: {1}")]
pub struct PauseError(pub String, pub DeviceError);

struct Slot {
    name: String,
    base: u64,
    transport: Mutex<MmioTransport>,
}

/// The device windows, for the vCPU loop's MMIO exits and the control socket's stats.
pub struct MmioBus {
    slots: Vec<Slot>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.slots.iter().map(|s| (&s.name, s.base)))
            .finish()
    }
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(&Slot, u64)> {
        let i = addr.checked_sub(MMIO_BASE)? / WINDOW_SIZE;
        let slot = self.slots.get(usize::try_from(i).ok()?)?;
        Some((slot, addr - slot.base))
    }

    /// Serves a guest read at `addr`; `false` if no device window holds it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((slot, offset)) = self.find(addr) else {
            return false;
        };
        slot.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data);
        true
    }

    /// Serves a guest write at `addr`; `false` if no device window holds it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((slot, offset)) = self.find(addr) else {
            return false;
        };
        slot.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data);
        true
    }

    /// Counters of every device, by device name (`virtio-blk0`, `virtio-net0`, `virtio-rng`).
    pub fn stats(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.slots
            .iter()
            .map(|s| {
                let t = s.transport.lock().unwrap_or_else(|e| e.into_inner());
                (s.name.clone(), t.stats())
            })
            .collect()
    }

    /// Parks every device's worker (see [`super::worker::Worker::pause`]); returns once
    /// all are parked. A device still busy at `deadline` fails the pause, and every device runs
    /// again.
    pub fn pause(&self, deadline: Instant) -> Result<(), PauseError> {
        for slot in &self.slots {
            let paused = slot
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pause(deadline);
            if let Err(e) = paused {
                self.resume();
                return Err(PauseError(slot.name.clone(), e));
            }
        }
        Ok(())
    }

    /// Lets every device's worker run again.
    pub fn resume(&self) {
        for slot in &self.slots {
            slot.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .resume();
        }
    }

    /// Flushes every device's backend (the writable disks) to stable storage; the first
    /// failure names its device.
    pub fn flush(&self) -> Result<(), (String, std::io::Error)> {
        for slot in &self.slots {
            let t = slot.transport.lock().unwrap_or_else(|e| e.into_inner());
            t.flush().map_err(|e| (slot.name.clone(), e))?;
        }
        Ok(())
    }

    /// Has every NIC announce the guest's MAC on its network (after a migration): the devices
    /// that did, and the failures by device name.
    pub fn announce(&self) -> (usize, Vec<(String, std::io::Error)>) {
        let (mut done, mut failed) = (0, Vec::new());
        for slot in &self.slots {
            let t = slot.transport.lock().unwrap_or_else(|e| e.into_inner());
            match t.announce() {
                Ok(true) => done += 1,
                Ok(false) => {}
                Err(e) => failed.push((slot.name.clone(), e)),
            }
        }
        (done, failed)
    }

    /// Every transport with its device, in window order; call while paused.
    pub fn save(&self) -> Vec<TransportState> {
        self.slots
            .iter()
            .map(|s| s.transport.lock().unwrap_or_else(|e| e.into_inner()).save())
            .collect()
    }

    /// Puts every transport into its state from a snapshot, before any vCPU runs. A device
    /// that does not match its saved one is refused, named.
    pub fn restore(&self, states: &[TransportState]) -> Result<(), String> {
        if states.len() != self.slots.len() {
            return Err(format!(
                "the snapshot has {} virtio devices, this VM {}",
                states.len(),
                self.slots.len()
            ));
        }
        for (slot, state) in self.slots.iter().zip(states) {
            slot.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(state)
                .map_err(|e| format!("{}: {e}", slot.name))?;
        }
        Ok(())
    }

    /// The windows and GSIs, for the DSDT.
    pub fn acpi_devices(&self) -> Vec<AcpiMmioDevice> {
        (0..self.slots.len())
            .map(|i| AcpiMmioDevice {
                addr: MMIO_BASE + i as u64 * WINDOW_SIZE,
                len: WINDOW_SIZE as u32,
                irq: FIRST_GSI + i as u32,
            })
            .collect()
    }
}

impl DeviceStats for MmioBus {
    fn device_stats(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.stats()
    }
}

/// The devices `config` asks for, opened but not yet wired to a VM.
pub struct DeviceSet {
    devices: Vec<(String, Box<dyn VirtioDevice>)>,
}

impl std::fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(n, _)| n))
            .finish()
    }
}

impl DeviceSet {
    /// Opens every disk image and tap of `config` (and /dev/urandom for the rng), so that a
    /// bad path, a partial-sector image or a missing bridge fails the start with its name.
    pub fn open(config: &VmConfig) -> Result<DeviceSet, SetupError> {
        let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
        for (i, d) in config.disks.iter().enumerate() {
            devices.push((
                format!("virtio-blk{i}"),
                Box::new(Block::open(&d.path, d.read_only)?),
            ));
        }
        for (i, n) in config.nets.iter().enumerate() {
            let mac = hvnode_api::guest::parse_mac(&n.mac)
                .map_err(|_| SetupError::Mac(n.mac.clone(), n.tap.clone()))?;
            let file = tap::open(&n.tap, n.bridge.as_deref())?;
            devices.push((format!("virtio-net{i}"), Box::new(Net::new(file, mac))));
        }
        if config.rng {
            let rng = Rng::new().map_err(|e| SetupError::Io("/dev/urandom", e))?;
            devices.push(("virtio-rng".to_owned(), Box::new(rng)));
        }
        if devices.len() > MAX_DEVICES {
            return Err(SetupError::TooMany(devices.len()));
        }
        Ok(DeviceSet { devices })
    }

    /// Puts each device behind its window: its interrupt as an irqfd on its GSI, each queue's
    /// notification as an ioeventfd on QueueNotify matching the queue index.
    pub fn attach(self, vm: &VmFd, mem: &GuestRam) -> Result<MmioBus, SetupError> {
        let mut slots = Vec::new();
        for (i, (name, device)) in self.devices.into_iter().enumerate() {
            let base = MMIO_BASE + i as u64 * WINDOW_SIZE;
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| SetupError::Io("eventfd", e))?;
            vm.register_irqfd(&irq, FIRST_GSI + i as u32)
                .map_err(|e| SetupError::Kvm("KVM_IRQFD", e))?;
            let interrupt = Arc::new(Interrupt::new(irq));
            let transport = MmioTransport::new(device, mem.clone(), interrupt)
                .map_err(|e| SetupError::Io("queue eventfd", e))?;
            let notify = IoEventAddress::Mmio(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
            for (q, evt) in transport.queue_events().iter().enumerate() {
                vm.register_ioevent(evt, &notify, q as u32)
                    .map_err(|e| SetupError::Kvm("KVM_IOEVENTFD", e))?;
            }
            slots.push(Slot {
                name,
                base,
                transport: Mutex::new(transport),
            });
        }
        Ok(MmioBus { slots })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(disks: usize, rng: bool) -> (VmConfig, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("hvnode-bus-{disks}-{rng}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disks = (0..disks)
            .map(|i| {
                let p = dir.join(format!("d{i}.img"));
                std::fs::write(&p, vec![0u8; 4096]).unwrap();
                hvnode_api::vmm::VmDisk {
                    path: p.to_str().unwrap().to_owned(),
                    read_only: i % 2 == 1,
                }
            })
            .collect();
        let cfg = VmConfig {
            name: "t".into(),
            vcpus: 1,
            memory_mib: 64,
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            disks,
            nets: vec![],
            rng,
            serial_log: None,
            serial_socket: None,
            control_socket: None,
            exit_file: None,
            jail: None,
        };
        (cfg, dir)
    }

    #[test]
    fn names_disks_then_rng_and_refuses_too_many_devices() {
        let (cfg, dir) = config(2, true);
        let set = DeviceSet::open(&cfg).unwrap();
        let names: Vec<&str> = set.devices.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["virtio-blk0", "virtio-blk1", "virtio-rng"]);
        let _ = std::fs::remove_dir_all(&dir);
        let (cfg, dir) = config(MAX_DEVICES, true);
        assert!(matches!(
            DeviceSet::open(&cfg),
            Err(SetupError::TooMany(n)) if n == MAX_DEVICES + 1
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_a_bad_mac_before_touching_any_tap() {
        let (mut cfg, dir) = config(0, false);
        cfg.nets.push(hvnode_api::vmm::VmNet {
            tap: "hvt-never".into(),
            mac: "01:00:00:00:00:01".into(),
            bridge: None,
        });
        assert!(matches!(DeviceSet::open(&cfg), Err(SetupError::Mac(..))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
