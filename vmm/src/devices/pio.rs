//! The port I/O bus: which device answers each I/O port, for the vCPUs' IN and OUT exits.
//!
//! A device claims a range of ports when it is inserted; ranges never overlap. It sees each
//! access as the base of its range plus an offset, so one device can claim several ranges (the
//! i8042's two ports are not adjacent). A port no device claims reads as all ones, as an
//! undriven ISA bus does, and writes to it are dropped.
//!
//! Every device here has byte-wide registers, so an access moves one byte: an OUT of a word or
//! a dword hands the device its low byte, and an IN repeats the byte read across its width.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A port write that ends the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortExit {
    /// The guest pulsed the CPU reset line.
    Reset,
    /// The guest asked for ACPI S5.
    PowerOff,
}

/// A device on I/O ports.
pub trait PioDevice: Send {
    /// A guest read of port `base + offset`, `base` being the start of the claimed range.
    fn read(&mut self, base: u16, offset: u16) -> u8;
    /// A guest write of `value` to port `base + offset`; `Some` when it ends the VM.
    fn write(&mut self, base: u16, offset: u16, value: u8) -> Option<PortExit>;
}

/// A range the bus refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PioBusError {
    /// No ports, or ports past 0xffff.
    #[error("{name}: {len} ports from {base:#x} is not a range of I/O ports")]
    BadRange {
        /// The device.
        name: &'static str,
        /// First port.
        base: u16,
        /// Number of ports.
        len: u16,
    },
    /// Some of the ports belong to another device already.
    #[error("{name}: ports {base:#x}-{last:#x} overlap those of {other}")]
    Overlap {
        /// The device refused.
        name: &'static str,
        /// Its first port.
        base: u16,
        /// Its last port.
        last: u16,
        /// The device that has some of them.
        other: &'static str,
    },
}

struct Range {
    name: &'static str,
    /// One past the last port; a u32 so that a range may end at 0xffff.
    end: u32,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// The I/O port ranges and their devices.
#[derive(Default)]
pub struct PioBus {
    /// By first port.
    ranges: BTreeMap<u16, Range>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.ranges
                    .iter()
                    .map(|(base, r)| (r.name, u32::from(*base)..r.end)),
            )
            .finish()
    }
}

impl PioBus {
    /// Gives `device` (called `name` in errors) the `len` ports from `base`.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), PioBusError> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(PioBusError::BadRange { name, base, len });
        }
        let last = base + (len - 1);
        // Ranges in the map are disjoint, so of those starting at or below `last` only the one
        // starting highest can reach into [base, last].
        if let Some((_, other)) = self.ranges.range(..=last).next_back() {
            if other.end > u32::from(base) {
                return Err(PioBusError::Overlap {
                    name,
                    base,
                    last,
                    other: other.name,
                });
            }
        }
        self.ranges.insert(base, Range { name, end, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, &Range)> {
        let (&base, range) = self.ranges.range(..=port).next_back()?;
        (u32::from(port) < range.end).then_some((base, range))
    }

    /// Serves a guest IN of `data.len()` bytes from `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = match self.find(port) {
            Some((base, range)) => range
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(base, port - base),
            None => 0xff,
        };
        data.fill(value);
    }

    /// Serves a guest OUT of `data` to `port`; `Some` when it ends the VM.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<PortExit> {
        let (base, range) = self.find(port)?;
        let value = data.first().copied().unwrap_or(0);
        range
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(base, port - base, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers every access and answers reads with `base + offset`'s low byte.
    #[derive(Debug, Default)]
    struct Recorder {
        writes: Vec<(u16, u16, u8)>,
        exit_on: Option<(u8, PortExit)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, base: u16, offset: u16) -> u8 {
            (base + offset) as u8
        }

        fn write(&mut self, base: u16, offset: u16, value: u8) -> Option<PortExit> {
            self.writes.push((base, offset, value));
            self.exit_on
                .and_then(|(v, exit)| (v == value).then_some(exit))
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::default()
    }

    #[test]
    fn refuses_overlapping_ranges_and_takes_adjacent_ones() {
        let mut bus = PioBus::default();
        bus.insert("a", 0x60, 4, recorder()).unwrap();
        for (base, len) in [(0x60, 4), (0x5e, 3), (0x63, 2), (0x50, 0x20), (0x61, 1)] {
            assert_eq!(
                bus.insert("b", base, len, recorder()),
                Err(PioBusError::Overlap {
                    name: "b",
                    base,
                    last: base + len - 1,
                    other: "a"
                }),
                "{base:#x}+{len}"
            );
        }
        bus.insert("below", 0x5c, 4, recorder()).unwrap();
        bus.insert("above", 0x64, 1, recorder()).unwrap();
        let err = bus.insert("c", 0x5f, 6, recorder()).unwrap_err();
        assert_eq!(err.to_string(), "c: ports 0x5f-0x64 overlap those of above");
    }

    #[test]
    fn refuses_empty_ranges_and_ranges_past_the_last_port() {
        let mut bus = PioBus::default();
        for (base, len) in [(0x10, 0), (0xfff0, 0x20), (0xffff, 2)] {
            assert_eq!(
                bus.insert("x", base, len, recorder()),
                Err(PioBusError::BadRange {
                    name: "x",
                    base,
                    len
                })
            );
        }
        bus.insert("top", 0xfff0, 0x10, recorder()).unwrap();
        let mut data = [0u8];
        bus.read(0xffff, &mut data);
        assert_eq!(data, [0xff]);
    }

    #[test]
    fn dispatches_by_range_with_the_range_base_and_offset() {
        let mut bus = PioBus::default();
        let (serial, kbd) = (recorder(), recorder());
        bus.insert("serial", 0x3f8, 8, Arc::clone(&serial) as _)
            .unwrap();
        bus.insert("kbd-data", 0x60, 1, Arc::clone(&kbd) as _)
            .unwrap();
        bus.insert("kbd-cmd", 0x64, 1, Arc::clone(&kbd) as _)
            .unwrap();
        assert_eq!(bus.write(0x3f8, b"h"), None);
        assert_eq!(bus.write(0x3ff, &[1, 2, 3, 4]), None);
        assert_eq!(bus.write(0x64, &[0xaa]), None);
        assert_eq!(bus.write(0x60, &[0xf4, 0]), None);
        assert_eq!(
            serial.lock().unwrap().writes,
            [(0x3f8, 0, b'h'), (0x3f8, 7, 1)],
            "only the low byte of a wide OUT"
        );
        assert_eq!(
            kbd.lock().unwrap().writes,
            [(0x64, 0, 0xaa), (0x60, 0, 0xf4)]
        );
        let mut word = [0u8; 2];
        bus.read(0x3fd, &mut word);
        assert_eq!(word, [0xfd, 0xfd], "the byte repeated across the IN");
        let mut byte = [0u8];
        bus.read(0x64, &mut byte);
        assert_eq!(byte, [0x64]);
    }

    #[test]
    fn a_port_nobody_claims_reads_all_ones_and_drops_writes() {
        let mut bus = PioBus::default();
        let kbd = recorder();
        bus.insert("kbd-data", 0x60, 1, Arc::clone(&kbd) as _)
            .unwrap();
        bus.insert("kbd-cmd", 0x64, 1, Arc::clone(&kbd) as _)
            .unwrap();
        for port in [0x0, 0x5f, 0x61, 0x63, 0x65, 0xffff] {
            let mut data = [0u8; 4];
            bus.read(port, &mut data);
            assert_eq!(data, [0xff; 4], "port {port:#x}");
            assert_eq!(bus.write(port, &[0xfe]), None);
        }
        assert!(kbd.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn a_write_that_ends_the_vm_says_how() {
        let mut bus = PioBus::default();
        let reset = Arc::new(Mutex::new(Recorder {
            exit_on: Some((0xfe, PortExit::Reset)),
            ..Recorder::default()
        }));
        bus.insert("kbd-cmd", 0x64, 1, reset).unwrap();
        assert_eq!(bus.write(0x64, &[0xad]), None);
        assert_eq!(bus.write(0x64, &[0xfe]), Some(PortExit::Reset));
    }
}
