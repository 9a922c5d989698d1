//! The legacy PC devices, on I/O ports through the [`PioBus`]:
//!
//! | ports       | device                                                  | interrupt          |
//! |-------------|---------------------------------------------------------|--------------------|
//! | 0x60, 0x64  | the i8042 keyboard controller ([`i8042`])               | [`KEYBOARD_GSI`]   |
//! | 0x70-0x71   | no RTC/CMOS ([`cmos`]): reads as zero                   |                    |
//! | 0x3f8-0x3ff | COM1, a 16550 ([`Console`]; output, socket: [`serial`]) | [`SERIAL_GSI`]     |
//! | 0x600       | the ACPI sleep control register ([`power`])             |                    |
//!
//! Every other port reads as all ones. The interrupts are [`IrqLine`]s. The console and the
//! keyboard are shared beyond the vCPUs (console clients type into the one, the control side
//! presses ctrl-alt-del on the other), so each sits behind its own lock.

pub mod cmos;
pub mod i8042;
pub mod power;
pub mod serial;

use std::sync::{Arc, Mutex};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use self::i8042::I8042;
use self::power::SleepControl;
use self::serial::SerialOut;
use super::pio::{PioBus, PioBusError};
use crate::acpi::SLEEP_CONTROL_PORT;

/// COM1's interrupt (IOAPIC pin).
pub const SERIAL_GSI: u32 = 4;
/// The keyboard's interrupt (IOAPIC pin).
pub const KEYBOARD_GSI: u32 = 1;

/// COM1: vm-superio's 16550 writing to [`SerialOut`].
pub type Console = vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, SerialOut>;
/// The i8042 with its keyboard.
pub type Keyboard = I8042<IrqLine>;

/// A device's interrupt line: an eventfd the builder wired to the device's GSI with KVM_IRQFD.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// The line that fires `irqfd`, already registered with KVM.
    pub fn new(irqfd: EventFd) -> Self {
        IrqLine(irqfd)
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// The port bus of a PC with `console` on COM1 and `keyboard` on the i8042's ports, as the
/// DSDT and the FADT describe it.
pub fn port_bus(
    console: &Arc<Mutex<Console>>,
    keyboard: &Arc<Mutex<Keyboard>>,
) -> Result<PioBus, PioBusError> {
    let mut bus = PioBus::default();
    bus.insert(
        "serial",
        serial::COM1,
        serial::PORTS,
        Arc::clone(console) as _,
    )?;
    bus.insert("i8042", i8042::DATA_PORT, 1, Arc::clone(keyboard) as _)?;
    bus.insert("i8042", i8042::COMMAND_PORT, 1, Arc::clone(keyboard) as _)?;
    bus.insert(
        "cmos",
        cmos::PORT,
        cmos::PORTS,
        Arc::new(Mutex::new(cmos::NoCmos)),
    )?;
    let sleep = Arc::new(Mutex::new(SleepControl));
    bus.insert("acpi-sleep-control", SLEEP_CONTROL_PORT, 1, sleep)?;
    Ok(bus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pio::PortExit;

    fn line() -> IrqLine {
        IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    fn read(bus: &PioBus, port: u16) -> u8 {
        let mut data = [0u8];
        bus.read(port, &mut data);
        data[0]
    }

    #[test]
    fn the_pc_ports_reach_their_devices() {
        let out = SerialOut::new(None, Arc::default(), Arc::default()).unwrap();
        let console = Arc::new(Mutex::new(Console::new(line(), out)));
        let keyboard = Arc::new(Mutex::new(Keyboard::new(line())));
        let bus = port_bus(&console, &keyboard).unwrap();
        // COM1's scratch register keeps what was written.
        assert_eq!(bus.write(0x3ff, &[0x5a]), None);
        assert_eq!(read(&bus, 0x3ff), 0x5a);
        // The i8042 self test answers on the data port.
        assert_eq!(bus.write(0x64, &[0xaa]), None);
        assert_eq!(read(&bus, 0x64) & 1, 1, "output buffer full");
        assert_eq!(read(&bus, 0x60), 0x55);
        assert_eq!(bus.write(0x64, &[0xfe]), Some(PortExit::Reset));
        assert_eq!((read(&bus, 0x70), read(&bus, 0x71)), (0, 0));
        assert_eq!(
            bus.write(0x600, &[(5 << 2) | (1 << 5)]),
            Some(PortExit::PowerOff)
        );
        assert_eq!(bus.write(0x600, &[5 << 2]), None);
        for nobody in [0x61, 0x72, 0x2f8, 0x400, 0x601] {
            assert_eq!(read(&bus, nobody), 0xff, "port {nobody:#x}");
        }
    }
}
