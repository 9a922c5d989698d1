//! The RTC/CMOS ports, with nothing behind them: they read as zero so that a guest's probe of
//! the absent hardware fails fast, and writes are dropped.

use crate::devices::pio::{PioDevice, PortExit};

/// The index port; the data port follows it.
pub const PORT: u16 = 0x70;
/// The index and data ports.
pub const PORTS: u16 = 2;

/// No RTC/CMOS.
#[derive(Debug, Default)]
pub struct NoCmos;

impl PioDevice for NoCmos {
    fn read(&mut self, _base: u16, _offset: u16) -> u8 {
        0
    }

    fn write(&mut self, _base: u16, _offset: u16, _value: u8) -> Option<PortExit> {
        None
    }
}
