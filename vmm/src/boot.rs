//! x86-64 boot: the memory layout, identity page tables, GDT, the Linux zero page, and the
//! vCPU register state for a 64-bit entry.

use crate::memory::GuestRam;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

/// GDT.
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty: the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (boot_params).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack top.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the identity map; the PDPT and the page directories follow it (up to 0xefff with
/// 1 GiB pages above 4 GiB, up to 0x12fff without them).
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
/// Start of the 32-bit MMIO hole (virtio-mmio windows, IOAPIC, local APICs, the TSS KVM
/// needs): RAM below 4 GiB ends here, the rest of a larger guest's RAM starts at
/// [`HIGH_RAM_START`].
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Where the RAM above the MMIO hole starts.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// The smallest guest.
pub const MIN_RAM: u64 = 16 << 20;
/// The identity map at entry uses 2 MiB pages up to here; with 1 GiB pages (CPUID pdpe1gb) it
/// goes on to [`IDENTITY_MAP_END_1G`].
pub const IDENTITY_MAP_END_2M: u64 = 8 << 30;
/// End of the identity map at entry with 1 GiB pages: one full PDPT.
pub const IDENTITY_MAP_END_1G: u64 = 512 << 30;

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

/// Writes the GDT and the identity page tables, so that a payload entered in 64-bit mode also
/// reaches the 32-bit MMIO hole (virtio-mmio windows, IOAPIC) and RAM above 4 GiB: the first
/// 4 GiB with 2 MiB pages, then with 1 GiB pages up to [`IDENTITY_MAP_END_1G`] if the vCPUs
/// have them (`gib_pages`, CPUID pdpe1gb), else with 2 MiB pages up to [`IDENTITY_MAP_END_2M`].
pub fn write_tables(mem: &GuestRam, gib_pages: bool) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    mem.write_slice(&identity_map(gib_pages), GuestAddress(PML4))
}

/// The identity map's PML4, PDPT and page directories, laid out from [`PML4`]; built in one
/// buffer and written at once, since thousands of small guest writes cost start-up time.
fn identity_map(gib_pages: bool) -> Vec<u8> {
    const PAGE: u64 = 0x1000;
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x83; // present, writable, page size
    let two_mib_gibs = if gib_pages {
        4
    } else {
        IDENTITY_MAP_END_2M >> 30
    };
    let mut entries = vec![0u64; ((2 + two_mib_gibs) * 512) as usize];
    let pdpt = PML4 + PAGE;
    entries[0] = pdpt | PRESENT_RW;
    for gib in 0..two_mib_gibs {
        let pd = pdpt + PAGE + gib * PAGE;
        entries[(512 + gib) as usize] = pd | PRESENT_RW;
        for i in 0..512u64 {
            entries[((2 + gib) * 512 + i) as usize] = (gib << 30) | (i << 21) | HUGE;
        }
    }
    if gib_pages {
        for gib in two_mib_gibs..512 {
            entries[(512 + gib) as usize] = (gib << 30) | HUGE;
        }
    }
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
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

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

impl RamRange {
    /// The first address past the range.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Where `mem_size` bytes of guest RAM go: from 0 up to the MMIO hole, and whatever does not
/// fit there from 4 GiB on. `mem_size` must be at least [`MIN_RAM`]; the caller checks that the
/// end does not overflow (see [`ram_end`]).
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        start: 0,
        size: low,
    }];
    if mem_size > low {
        ranges.push(RamRange {
            start: HIGH_RAM_START,
            size: mem_size - low,
        });
    }
    ranges
}

/// The first guest-physical address past the RAM of a `mem_size`-byte guest; `None` on overflow.
pub fn ram_end(mem_size: u64) -> Option<u64> {
    match mem_size.checked_sub(MMIO_HOLE_START) {
        Some(high) if high > 0 => HIGH_RAM_START.checked_add(high),
        _ => Some(mem_size),
    }
}

/// The e820 map: low RAM up to the EBDA, RAM from 1 MiB to the MMIO hole (or the end of a
/// smaller guest), and RAM above 4 GiB for the rest. What is not listed (the EBDA and BIOS
/// area with the ACPI tables, the MMIO hole) the guest leaves alone.
pub fn e820(mem_size: u64) -> Vec<boot_e820_entry> {
    const RAM: u32 = 1;
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: LOW_RAM_END,
        r#type: RAM,
    }];
    for r in ram_ranges(mem_size) {
        let start = r.start.max(HIMEM);
        if r.end() > start {
            map.push(boot_e820_entry {
                addr: start,
                size: r.end() - start,
                r#type: RAM,
            });
        }
    }
    map
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
    mem: &GuestRam,
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
    LinuxBootConfigurator::write_bootparams::<GuestRam>(
        &BootParams::new::<boot_params>(&p, GuestAddress(ZERO_PAGE)),
        mem,
    )
}

/// Where the initrd goes: page-aligned at the top of the RAM below the MMIO hole (the zero
/// page holds a 32-bit address), under the kernel's `initrd_addr_max` if its setup header gives
/// one, and above the kernel.
pub fn initrd_addr(
    mem_size: u64,
    initrd_addr_max: Option<u32>,
    kernel_end: u64,
    size: u64,
) -> Option<u64> {
    let mut top = mem_size.min(MMIO_HOLE_START);
    if let Some(max) = initrd_addr_max.filter(|&m| m != 0) {
        top = top.min(u64::from(max) + 1);
    }
    let addr = top.checked_sub(size)? & !0xfff;
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

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn ranges(mem_size: u64) -> Vec<(u64, u64)> {
        ram_ranges(mem_size)
            .iter()
            .map(|r| (r.start, r.end()))
            .collect()
    }

    fn map(mem_size: u64) -> Vec<(u64, u64)> {
        e820(mem_size)
            .iter()
            .map(|e| {
                assert_eq!({ e.r#type }, 1, "every entry is RAM");
                (e.addr, e.addr + e.size)
            })
            .collect()
    }

    #[test]
    fn a_guest_below_the_hole_is_one_range() {
        assert_eq!(ranges(256 * MIB), [(0, 256 * MIB)]);
        assert_eq!(
            map(256 * MIB),
            [(0, LOW_RAM_END), (HIMEM, 256 * MIB)],
            "the BIOS area stays out of RAM"
        );
        assert_eq!(ram_end(256 * MIB), Some(256 * MIB));
        const { assert!(crate::acpi::ACPI_START >= LOW_RAM_END && crate::acpi::ACPI_END <= HIMEM) };
    }

    #[test]
    fn a_guest_of_exactly_3_gib_ends_at_the_hole_with_nothing_above_4_gib() {
        assert_eq!(ranges(3 * GIB), [(0, MMIO_HOLE_START)]);
        assert_eq!(map(3 * GIB), [(0, LOW_RAM_END), (HIMEM, MMIO_HOLE_START)]);
        assert_eq!(ram_end(3 * GIB), Some(MMIO_HOLE_START));
    }

    #[test]
    fn memory_past_3_gib_goes_above_4_gib() {
        let size = 3 * GIB + MIB;
        assert_eq!(
            ranges(size),
            [(0, MMIO_HOLE_START), (HIGH_RAM_START, HIGH_RAM_START + MIB)]
        );
        assert_eq!(
            map(size),
            [
                (0, LOW_RAM_END),
                (HIMEM, MMIO_HOLE_START),
                (HIGH_RAM_START, HIGH_RAM_START + MIB)
            ]
        );
        assert_eq!(ram_end(size), Some(HIGH_RAM_START + MIB));
    }

    #[test]
    fn a_64_gib_guest_has_61_gib_above_the_hole() {
        let r = ram_ranges(64 * GIB);
        assert_eq!(r.iter().map(|r| r.size).sum::<u64>(), 64 * GIB);
        assert_eq!(
            ranges(64 * GIB),
            [(0, 3 * GIB), (4 * GIB, 65 * GIB)],
            "the hole is skipped, not eaten"
        );
        assert_eq!(
            map(64 * GIB),
            [(0, LOW_RAM_END), (HIMEM, 3 * GIB), (4 * GIB, 65 * GIB)]
        );
        assert_eq!(ram_end(64 * GIB), Some(65 * GIB));
        assert_eq!(ram_end(u64::MAX), None);
    }

    #[test]
    fn no_range_touches_the_mmio_hole_or_the_device_windows() {
        for size in [MIN_RAM, 3 * GIB, 3 * GIB + MIB, 64 * GIB] {
            for r in ram_ranges(size) {
                assert!(
                    r.end() <= MMIO_HOLE_START || r.start >= HIGH_RAM_START,
                    "{r:?}"
                );
            }
        }
        const { assert!(crate::devices::bus::MMIO_BASE >= MMIO_HOLE_START) };
    }

    #[test]
    fn initrd_sits_page_aligned_at_the_top_and_never_over_the_kernel() {
        assert_eq!(
            initrd_addr(256 * MIB, None, 16 * MIB, 5000),
            Some(256 * MIB - 8192)
        );
        assert_eq!(initrd_addr(32 * MIB, None, 30 * MIB, 4 * MIB), None);
        assert_eq!(initrd_addr(MIB, None, 0, 2 * MIB), None);
    }

    #[test]
    fn initrd_stays_below_the_hole_and_the_kernels_initrd_addr_max() {
        // A large guest: the top of the RAM below 4 GiB, never above 4 GiB.
        assert_eq!(
            initrd_addr(64 * GIB, None, 16 * MIB, 4096),
            Some(MMIO_HOLE_START - 4096)
        );
        // A bzImage that takes initrds up to 2 GiB - 1 (x86-64's 0x7fffffff).
        assert_eq!(
            initrd_addr(64 * GIB, Some(0x7fff_ffff), 16 * MIB, 4096),
            Some(2 * GIB - 4096)
        );
        assert_eq!(
            initrd_addr(GIB, Some(0x7fff_ffff), 16 * MIB, 4096),
            Some(GIB - 4096),
            "a limit above the RAM changes nothing"
        );
        // An unset field (0) is no limit.
        assert_eq!(initrd_addr(GIB, Some(0), 16 * MIB, 4096), Some(GIB - 4096));
    }

    /// Translates `va` through the identity map in `mem`, as the MMU would.
    fn walk(mem: &GuestRam, va: u64) -> Option<u64> {
        const ADDR: u64 = 0x000f_ffff_ffff_f000;
        let entry = |table: u64, index: u64| -> u64 {
            mem.read_obj(GuestAddress((table & ADDR) + index * 8))
                .unwrap()
        };
        let pml4e = entry(PML4, (va >> 39) & 511);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = entry(pml4e, (va >> 30) & 511);
        if pdpte & 1 == 0 {
            return None;
        }
        if pdpte & 0x80 != 0 {
            return Some((pdpte & ADDR & !(GIB - 1)) | (va & (GIB - 1)));
        }
        let pde = entry(pdpte, (va >> 21) & 511);
        if pde & 1 == 0 {
            return None;
        }
        assert_ne!(pde & 0x80, 0, "only 2 MiB pages in the page directories");
        Some((pde & ADDR & !(2 * MIB - 1)) | (va & (2 * MIB - 1)))
    }

    fn tables(gib_pages: bool) -> GuestRam {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_tables(&mem, gib_pages).unwrap();
        mem
    }

    #[test]
    fn identity_map_with_1_gib_pages_covers_512_gib() {
        let mem = tables(true);
        for va in [
            0,
            0x10_0123,
            0xd000_0000,
            0xfee0_0020,
            HIGH_RAM_START + 0x1234,
            5 * GIB + 7,
            IDENTITY_MAP_END_1G - 1,
        ] {
            assert_eq!(walk(&mem, va), Some(va), "{va:#x}");
        }
        assert_eq!(walk(&mem, IDENTITY_MAP_END_1G), None);
        // The first 4 GiB keep 2 MiB pages: 0xd000_0000 is PDPT entry 3, PD entry 0x80.
        let pde: u64 = mem
            .read_obj(GuestAddress(PML4 + 0x5000 + 0x80 * 8))
            .unwrap();
        assert_eq!(pde, 0xd000_0000 | 0x83);
        const { assert!(PML4 + 0x6000 <= CMDLINE) };
    }

    #[test]
    fn identity_map_with_2_mib_pages_covers_8_gib() {
        let mem = tables(false);
        for va in [
            0,
            0xd000_0000,
            HIGH_RAM_START,
            5 * GIB + 0x20_0001,
            IDENTITY_MAP_END_2M - 1,
        ] {
            assert_eq!(walk(&mem, va), Some(va), "{va:#x}");
        }
        assert_eq!(walk(&mem, IDENTITY_MAP_END_2M), None);
        // Ten pages of tables, still below the command line.
        const { assert!(PML4 + 0x2000 + (IDENTITY_MAP_END_2M >> 30) * 0x1000 <= CMDLINE) };
    }
}
