//! The sleep control register of the hardware-reduced FADT ([`crate::acpi::SLEEP_CONTROL_PORT`]):
//! the guest powers off by writing SLP_EN with the S5 sleep type the DSDT announces.

use crate::acpi::S5_SLEEP_TYPE;
use crate::devices::pio::{PioDevice, PortExit};

/// The sleep control register; write-only, it reads as a port nobody drives.
#[derive(Debug, Default)]
pub struct SleepControl;

/// Whether a byte written to the sleep control register asks for power-off (SLP_EN with the S5
/// type).
pub fn is_poweroff_request(value: u8) -> bool {
    const SLP_EN: u8 = 1 << 5;
    value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE
}

impl PioDevice for SleepControl {
    fn read(&mut self, _base: u16, _offset: u16) -> u8 {
        0xff
    }

    fn write(&mut self, _base: u16, _offset: u16, value: u8) -> Option<PortExit> {
        is_poweroff_request(value).then_some(PortExit::PowerOff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_s5_power_off_write() {
        assert!(is_poweroff_request((5 << 2) | (1 << 5)));
        assert!(!is_poweroff_request(5 << 2), "no SLP_EN");
        assert!(
            !is_poweroff_request((3 << 2) | (1 << 5)),
            "S3 is not power-off"
        );
        assert_eq!(
            SleepControl.write(0x600, 0, (5 << 2) | (1 << 5)),
            Some(PortExit::PowerOff)
        );
        assert_eq!(SleepControl.write(0x600, 0, 3 << 2), None);
    }
}
