//! x86-64 boot: the memory layout, identity page tables, GDT, the Linux zero page, and the
//! vCPU register state for a 64-bit entry.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GDT.
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty: the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (boot_params).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack top.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the identity map; the PDPT and four PDs follow it (up to 0xefff).
pub const PML4: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line.
pub const CMDLINE_MAX: usize = 2048;
/// Start of high memory, where kernels load.
pub const HIMEM: u64 = 0x10_0000;
/// End of the low RAM the e820 map reports (the EBDA and BIOS area above it are reserved; the
/// ACPI tables live there).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Guest RAM must end below the 32-bit MMIO hole.
pub const MAX_RAM: u64 = 0xc000_0000;

const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // 64-bit code
    0x00cf_9300_0000_ffff, // data
    0x008f_8b00_0000_ffff, // TSS
];

fn segment(index: u16, entry: u64) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and identity page tables (first 4 GiB, 2 MiB pages), so that a payload
/// entered in 64-bit mode also reaches the 32-bit MMIO hole (virtio-mmio windows, IOAPIC).
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    let pdpt = PML4 + 0x1000;
    mem.write_obj(pdpt | 0x3, GuestAddress(PML4))?;
    for gib in 0..4u64 {
        let pd = PML4 + 0x2000 + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(pdpt + gib * 8))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers for 64-bit mode with the tables of [`write_tables`].
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(1, GDT[1]);
    let data = segment(2, GDT[2]);
    let tss = segment(3, GDT[3]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x1 | 0x8000_0000; // PE, PG
    sregs.efer |= 0x100 | 0x400; // LME, LMA
    sregs
}

/// General registers for the entry point; `rsi` points at the zero page (Linux boot protocol).
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    }
}

/// FPU defaults.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The e820 map: low RAM, then RAM from 1 MiB to the end of guest memory.
pub fn e820(mem_size: u64) -> Vec<boot_e820_entry> {
    const RAM: u32 = 1;
    vec![
        boot_e820_entry {
            addr: 0,
            size: LOW_RAM_END,
            r#type: RAM,
        },
        boot_e820_entry {
            addr: HIMEM,
            size: mem_size - HIMEM,
            r#type: RAM,
        },
    ]
}

/// Everything the zero page needs.
#[derive(Debug, Clone, Copy)]
pub struct ZeroPage {
    /// The bzImage's setup header, if the kernel is a bzImage.
    pub header: Option<setup_header>,
    /// Command line length (without the NUL).
    pub cmdline_len: usize,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
    /// Guest memory size.
    pub mem_size: u64,
    /// RSDP address.
    pub rsdp: u64,
}

/// Writes the Linux zero page.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    z: &ZeroPage,
) -> Result<(), linux_loader::configurator::Error> {
    let mut p = boot_params::default();
    if let Some(h) = z.header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448; // "HdrS"
    p.hdr.kernel_alignment = 0x0100_0000;
    p.hdr.cmd_line_ptr = CMDLINE as u32;
    p.hdr.cmdline_size = z.cmdline_len as u32;
    if let Some((addr, size)) = z.initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    p.acpi_rsdp_addr = z.rsdp;
    let map = e820(z.mem_size);
    for (i, e) in map.iter().enumerate() {
        p.e820_table[i] = *e;
    }
    p.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&p, GuestAddress(ZERO_PAGE)),
        mem,
    )
}

/// Where the initrd goes: page-aligned at the top of RAM, above the kernel.
pub fn initrd_addr(mem_size: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let addr = mem_size.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_and_data_is_writable() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!((s.cs.l, s.cs.db, s.cs.selector, s.cs.type_), (1, 0, 8, 0xb));
        assert_eq!((s.ds.type_, s.ds.db, s.ds.present), (3, 1, 1));
        assert_ne!(s.efer & 0x400, 0);
    }

    #[test]
    fn e820_leaves_the_bios_area_out_of_ram() {
        let m = e820(256 << 20);
        assert_eq!(m[0].addr + m[0].size, LOW_RAM_END);
        assert_eq!((m[1].addr, m[1].addr + m[1].size), (HIMEM, 256 << 20));
        const { assert!(crate::acpi::ACPI_START >= LOW_RAM_END && crate::acpi::ACPI_END <= HIMEM) };
    }

    #[test]
    fn initrd_sits_page_aligned_at_the_top_and_never_over_the_kernel() {
        assert_eq!(
            initrd_addr(256 << 20, 16 << 20, 5000),
            Some((256 << 20) - 8192)
        );
        assert_eq!(initrd_addr(32 << 20, 30 << 20, 4 << 20), None);
        assert_eq!(initrd_addr(1 << 20, 0, 2 << 20), None);
    }

    #[test]
    fn identity_map_covers_the_first_four_gigabytes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PML4 + 0x2000 + 511 * 8)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        // 0xd000_0000 (the first virtio-mmio window): PDPT entry 3, PD entry 0x80.
        let pdpte: u64 = mem.read_obj(GuestAddress(PML4 + 0x1000 + 3 * 8)).unwrap();
        assert_eq!(pdpte, (PML4 + 0x5000) | 0x3);
        let pde: u64 = mem
            .read_obj(GuestAddress(PML4 + 0x5000 + 0x80 * 8))
            .unwrap();
        assert_eq!(pde, 0xd000_0000 | 0x83);
        const { assert!(PML4 + 0x6000 <= CMDLINE) };
    }
}
