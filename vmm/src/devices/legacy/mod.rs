//! The legacy PC devices on I/O ports: COM1 (a 16550, see [`serial`]) and the i8042 keyboard
//! controller ([`i8042`]), each raising its ISA interrupt through an [`IrqLine`].
//!
//! Their state is shared beyond the vCPUs: console clients feed the serial input and the control
//! side presses ctrl-alt-del, so each sits behind its own lock.

pub mod i8042;
pub mod serial;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use self::i8042::I8042;
use self::serial::SerialOut;

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
