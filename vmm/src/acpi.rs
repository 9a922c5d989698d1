//! ACPI tables for x86 guests: RSDP, XSDT, a hardware-reduced FADT, MADT and a DSDT that
//! describes the virtio-mmio devices, the COM1 serial port and the i8042.
//!
//! Distribution kernels (Debian's among them) are built without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so `virtio_mmio.device=` on the command line is ignored;
//! they find virtio-mmio devices as ACPI devices with _HID `LNRO0005`, as on QEMU's microvm. The
//! MADT gives the guest its local APICs and IOAPIC. Power-off is an ACPI S5 request written to the
//! sleep control register ([`SLEEP_CONTROL_PORT`], served by [`crate::devices::legacy::power`]);
//! reboot goes through the i8042 reset line.
//!
//! The tables are built as plain byte blobs with guest addresses, so the layout is testable
//! without guest memory; the caller copies them into guest RAM.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

/// Where the tables start: the BIOS area Linux scans for the RSDP (0xE0000-0xFFFFF), which the
/// e820 map leaves out of usable RAM.
pub const ACPI_START: u64 = 0x000e_0000;
/// End (exclusive) of the area the tables may use.
pub const ACPI_END: u64 = 0x0010_0000;
/// I/O port of the hardware-reduced sleep control register.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The S5 sleep type the DSDT's `_S5_` object announces.
pub const S5_SLEEP_TYPE: u8 = 5;
/// IAPC_BOOT_ARCH bit: the machine has an 8042 keyboard controller.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// Local APIC base address.
const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base address (the in-kernel IOAPIC's).
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const OEM_ID: [u8; 6] = *b"HVNODE";
const OEM_TABLE: [u8; 8] = *b"HVNODEVM";

/// A virtio-mmio device to describe in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiMmioDevice {
    /// Base address of its 4 KiB window.
    pub addr: u64,
    /// Window length in bytes.
    pub len: u32,
    /// Its GSI (IOAPIC pin), edge-triggered, active high.
    pub irq: u32,
}

/// Errors building the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// Too many vCPUs for 8-bit APIC ids.
    #[error("Too many vCPUs for the MADT: {0}")]
    TooManyVcpus(u32),
    /// A device lies above 4 GiB, which Memory32Fixed cannot describe.
    #[error("virtio-mmio window at {0:#x} is above 4 GiB")]
    DeviceAbove4G(u64),
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(u64),
}

/// The tables, each with the guest address it belongs at.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// Guest address of the RSDP (for `boot_params.acpi_rsdp_addr`).
    pub rsdp_addr: u64,
    /// `(guest address, bytes)` of every table.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt(devices: &[AcpiMmioDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();
    // COM1, so that 8250_pnp binds it with its IRQ.
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, 4);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &com1_hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    // The i8042, so that the keyboard driver binds and ctrl-alt-del reaches the guest.
    let kbd_data = aml::IO::new(0x60, 0x60, 0, 1);
    let kbd_cmd = aml::IO::new(0x64, 0x64, 0, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, 1);
    let ps2_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let ps2_hid = aml::EISAName::new("PNP0303");
    aml::Device::new(
        "_SB_.PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &ps2_hid),
            &aml::Name::new("_CRS".into(), &ps2_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    for (i, d) in devices.iter().enumerate() {
        let base = u32::try_from(d.addr).map_err(|_| AcpiError::DeviceAbove4G(d.addr))?;
        let mem = aml::Memory32Fixed::new(true, base, d.len);
        let irq = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let uid = i as u32;
        let path = format!("_SB_.V{i:03X}");
        aml::Device::new(
            path.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    // \_S5: the sleep type written to the sleep control register on power-off.
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    sdt.append_slice(&body);
    Ok(sdt.as_slice().to_vec())
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    f.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT + 1),
    );
    // Reset through the i8042's reset line, which the VMM already handles.
    f.reset_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, 0x64);
    f.reset_value = 0xfe;
    // IAPC_BOOT_ARCH "8042": without it Linux takes the i8042 for absent and never binds the
    // keyboard driver (so ctrl-alt-del could not reach it).
    f.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"HVNODEVM").into();
    to_bytes(&f.finalize())
}

fn madt(vcpus: u32) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 || vcpus > 254 {
        return Err(AcpiError::TooManyVcpus(vcpus));
    }
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus as u8 {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    Ok(to_bytes(&m))
}

/// Builds every table for `vcpus` vCPUs (APIC ids 0..vcpus) and the given virtio-mmio devices.
pub fn build_tables(vcpus: u32, devices: &[AcpiMmioDevice]) -> Result<AcpiTables, AcpiError> {
    let align = |x: u64| (x + 15) & !15;
    let rsdp_addr = ACPI_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(devices)?;
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus)?;
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut x = XSDT::new(OEM_ID, OEM_TABLE, 1);
    x.add_entry(fadt_addr);
    x.add_entry(madt_addr);
    let xsdt = to_bytes(&x);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(AcpiTables {
        rsdp_addr,
        blobs: vec![
            (rsdp_addr, rsdp),
            (dsdt_addr, dsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (xsdt_addr, xsdt),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn devices() -> Vec<AcpiMmioDevice> {
        (0..3)
            .map(|i| AcpiMmioDevice {
                addr: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                irq: 5 + i as u32,
            })
            .collect()
    }

    #[test]
    fn tables_fit_the_bios_area_with_valid_checksums() {
        let t = build_tables(4, &devices()).unwrap();
        assert_eq!(t.rsdp_addr, ACPI_START);
        let (addr, rsdp) = &t.blobs[0];
        assert_eq!(*addr, ACPI_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]));
        assert!(checksum_ok(rsdp));
        let mut last_end = 0;
        for (addr, blob) in &t.blobs {
            assert!(*addr >= last_end, "tables overlap");
            assert!(addr + blob.len() as u64 <= ACPI_END);
            last_end = addr + blob.len() as u64;
        }
        for (_, blob) in &t.blobs[1..] {
            let len = u32::from_le_bytes(blob[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, blob.len(), "{:?}", &blob[..4]);
            assert!(
                checksum_ok(blob),
                "{:?} checksum",
                std::str::from_utf8(&blob[..4])
            );
        }
        let sigs: Vec<&[u8]> = t.blobs[1..].iter().map(|(_, b)| &b[..4]).collect();
        assert_eq!(sigs, [b"DSDT", b"FACP", b"APIC", b"XSDT"]);
    }

    #[test]
    fn xsdt_points_at_fadt_and_madt_and_fadt_at_dsdt() {
        let t = build_tables(1, &devices()).unwrap();
        let addr_of = |sig: &[u8]| t.blobs.iter().find(|(_, b)| &b[..4] == sig).unwrap().0;
        let xsdt = &t.blobs[4].1;
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries, [addr_of(b"FACP"), addr_of(b"APIC")]);
        let fadt = &t.blobs[2].1;
        // X_DSDT is at offset 140 of the FADT.
        assert_eq!(
            u64::from_le_bytes(fadt[140..148].try_into().unwrap()),
            addr_of(b"DSDT")
        );
        // IAPC_BOOT_ARCH at offset 109 announces the i8042.
        assert_eq!(
            u16::from_le_bytes(fadt[109..111].try_into().unwrap()),
            IAPC_BOOT_ARCH_8042
        );
        // Hardware-reduced flag (bit 20) at offset 112.
        assert_ne!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
    }

    #[test]
    fn dsdt_describes_every_virtio_mmio_device() {
        let t = build_tables(2, &devices()).unwrap();
        let dsdt = &t.blobs[1].1;
        let count = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 3);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn madt_lists_one_local_apic_per_vcpu() {
        let t = build_tables(3, &[]).unwrap();
        let madt = &t.blobs[3].1;
        let mut i = 44;
        let mut lapics = 0;
        let mut ioapics = 0;
        while i < madt.len() {
            match madt[i] {
                0 => lapics += 1,
                1 => ioapics += 1,
                _ => {}
            }
            i += madt[i + 1] as usize;
        }
        assert_eq!((lapics, ioapics), (3, 1));
        assert_eq!(
            build_tables(0, &[]).unwrap_err(),
            AcpiError::TooManyVcpus(0)
        );
    }

    #[test]
    fn rejects_devices_above_4g() {
        let d = [AcpiMmioDevice {
            addr: 1 << 33,
            len: 0x1000,
            irq: 5,
        }];
        assert_eq!(
            build_tables(1, &d).unwrap_err(),
            AcpiError::DeviceAbove4G(1 << 33)
        );
    }
}
