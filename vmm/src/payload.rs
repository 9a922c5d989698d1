//! Tiny hand-assembled 64-bit guests, for the host KVM tests and the start-up benchmark: an ELF64
//! executable entered at 1 MiB in long mode, and the instructions to print on the serial port.

/// Where [`elf64`] loads and enters its code.
pub const ENTRY: u64 = 0x10_0000;

/// An ELF64 executable whose single PT_LOAD segment is `code`, loaded and entered at [`ENTRY`].
pub fn elf64(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&ENTRY.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers right after the header
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut f[64..120];
    ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[16..24].copy_from_slice(&ENTRY.to_le_bytes());
    ph[24..32].copy_from_slice(&ENTRY.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// `mov dx, 0x3f8`, then `mov al, c; out dx, al` for each byte of `text`.
pub fn serial_print(text: &str) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for b in text.bytes() {
        code.extend_from_slice(&[0xb0, b, 0xee]);
    }
    code
}

/// `out 0x64, 0xfe` (i8042 reset), then `hlt` forever.
pub const RESET: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
/// `jmp $`.
pub const SPIN: [u8; 2] = [0xeb, 0xfe];

/// Writes a byte to every 4 KiB page of guest memory from `from` up to `to` (both below 2 GiB),
/// so that the host commits them: `mov edi, from; 1: mov byte [rdi], 1; add rdi, 4096;
/// cmp rdi, to; jb 1b`.
pub fn touch_pages(from: u32, to: u32) -> Vec<u8> {
    assert!(from < to && to < 1 << 31, "touch_pages({from:#x}, {to:#x})");
    let mut code = vec![0xbf];
    code.extend_from_slice(&from.to_le_bytes());
    code.extend_from_slice(&[0xc6, 0x07, 0x01, 0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]);
    code.extend_from_slice(&[0x48, 0x81, 0xff]);
    code.extend_from_slice(&to.to_le_bytes());
    code.extend_from_slice(&[0x72, 0xed]);
    code
}

/// Prints an incrementing byte to the serial port forever, one every 4096 turns of a delay
/// loop (a few hundred bytes a second on the nested KVM here): `mov dx, 0x3f8; xor eax, eax;
/// 1: out dx, al; inc al; mov ecx, 0x1000; 2: dec ecx; jnz 2b; jmp 1b`.
pub const COUNTER: [u8; 20] = [
    0x66, 0xba, 0xf8, 0x03, 0x31, 0xc0, 0xee, 0xfe, 0xc0, 0xb9, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9,
    0x75, 0xfc, 0xeb, 0xf2,
];

/// Where [`MEMORY_COUNTER`] keeps its counter (a little-endian u32).
pub const MEMORY_COUNTER_ADDR: u64 = 0x20_0000;

/// Keeps a counter in guest memory at [`MEMORY_COUNTER_ADDR`]: increments it, prints it on the
/// serial port as eight hex digits and a newline, waits a 256 Ki-turn delay loop, forever. The
/// counter lives in memory, not in a register, so that a snapshot carries it in its memory file.
///
/// ```text
/// 1:  mov eax, [0x200000]; inc eax; mov [0x200000], eax
///     mov ebx, eax; mov ecx, 8; mov dx, 0x3f8
/// 2:  rol ebx, 4; mov al, bl; and al, 0xf; add al, '0'; cmp al, '9'; jbe 3f; add al, 7
/// 3:  out dx, al; dec ecx; jnz 2b
///     mov al, '\n'; out dx, al
///     mov ecx, 0x40000
/// 4:  dec ecx; jnz 4b; jmp 1b
/// ```
pub const MEMORY_COUNTER: [u8; 61] = [
    0x8b, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0xff, 0xc0, 0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00,
    0x89, 0xc3, 0xb9, 0x08, 0x00, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xc1, 0xc3, 0x04, 0x88, 0xd8,
    0x24, 0x0f, 0x04, 0x30, 0x3c, 0x39, 0x76, 0x02, 0x04, 0x07, 0xee, 0xff, 0xc9, 0x75, 0xec, 0xb0,
    0x0a, 0xee, 0xb9, 0x00, 0x00, 0x04, 0x00, 0xff, 0xc9, 0x75, 0xfc, 0xeb, 0xc3,
];

/// The counts that [`MEMORY_COUNTER`] (or [`DIRTIER`], or [`PACED_DIRTIER`]) printed in a serial log: one per
/// complete line of eight hex digits; a line cut off at the end (the guest still printing it, or
/// paused or migrated in the middle of it) is left out.
pub fn counter_lines(log: &str) -> Vec<u32> {
    let complete = log.rfind('\n').map_or("", |end| &log[..end]);
    complete
        .split('\n')
        .filter_map(|l| {
            (l.len() == 8)
                .then(|| u32::from_str_radix(l, 16).ok())
                .flatten()
        })
        .collect()
}

/// Where [`DIRTIER`] writes: the 16 MiB from here (a guest needs at least 20 MiB).
pub const DIRTIER_AREA: u64 = 0x40_0000;

/// [`MEMORY_COUNTER`] with its delay loop replaced by a write of the counter into each of the
/// 4096 pages of the 16 MiB at [`DIRTIER_AREA`]: a guest that keeps dirtying a 16 MiB working
/// set as fast as it can, for migration tests and benchmarks.
///
/// ```text
/// (MEMORY_COUNTER up to its delay loop)
///     mov edi, 0x400000; mov ecx, 0x1000
/// 4:  mov [rdi], eax; add edi, 0x1000; dec ecx; jnz 4b; jmp 1b
/// ```
pub const DIRTIER: [u8; 74] = {
    let mut code = [0u8; 74];
    let mut i = 0;
    while i < 50 {
        code[i] = MEMORY_COUNTER[i];
        i += 1;
    }
    let tail = [
        0xbf, 0x00, 0x00, 0x40, 0x00, 0xb9, 0x00, 0x10, 0x00, 0x00, 0x89, 0x07, 0x81, 0xc7, 0x00,
        0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xf4, 0xeb, 0xb6,
    ];
    let mut j = 0;
    while j < tail.len() {
        code[50 + j] = tail[j];
        j += 1;
    }
    code
};

/// The rate [`PACED_DIRTIER`] dirties memory at: 16384 pages of 4 KiB a second, 64 MiB/s (the
/// busy guest of the migration issue).
pub const PACED_PAGES_PER_SEC: u64 = 16384;

/// Where [`PACED_DIRTIER`] writes: the 128 MiB from [`DIRTIER_AREA`] (a guest needs at least
/// 132 MiB), two seconds' worth of pages, so that the pages it dirties in any interval up to two
/// seconds (a pass of a migration, pass 0 of a 4 GiB guest too, on this machine) are all
/// different pages and count as the rate.
pub const PACED_AREA_BYTES: u64 = 128 << 20;

/// The PIT's input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// How [`PACED_DIRTIER`] measures the TSC: it counts TSC ticks over this many PIT ticks, 2^9
/// page periods (1/32 s), then shifts right by 9 for the ticks of one page period. Over 31 ms
/// the error of one port read (microseconds, even nested) stays far below 0.1 %.
pub const PACED_PIT_COUNT: u16 =
    ((PIT_HZ * 512 + PACED_PAGES_PER_SEC / 2) / PACED_PAGES_PER_SEC) as u16;

/// [`MEMORY_COUNTER`] that dirties memory at [`PACED_PAGES_PER_SEC`] (64 MiB/s) in real time,
/// for migration tests and benchmarks: it writes the counter into one page after another of the
/// [`PACED_AREA_BYTES`] at [`DIRTIER_AREA`], wrapping around, each write when the TSC reaches
/// its deadline, and prints the next count every 4096 pages (four lines a second).
///
/// The TSC rate comes from the PIT. CPUID leaves 0x15 and 0x16 would give it, but KVM passes on
/// the host's, and this nested KVM's host has none (both read zero); the VMM has KVM's in-kernel
/// PIT, whose channel 2 is read through port 0x61 without leaving the kernel (the VMM creates it
/// with `KVM_PIT_SPEAKER_DUMMY`), so the payload calibrates itself once at start, as Linux's
/// `pit_calibrate_tsc` does, and needs nothing from the VMM. After a migration the deadline
/// carries on (the TSC comes back with the vCPU's MSRs) and the rate measured stays right as long
/// as the destination's TSC runs at the source's rate. A deadline more than 1024 page periods
/// (1/16 s) behind is moved up to that: the pages a vCPU descheduled for a moment owes are made
/// up, but a guest paused for seconds comes back with at most 4 MiB at once, not seconds' worth.
///
/// ```text
///     in al, 0x61; and al, 0xfc; or al, 1; out 0x61, al   ; channel 2 gate on, speaker off
///     mov al, 0xb0; out 0x43, al                          ; channel 2, lo/hi byte, mode 0
///     mov al, lo(PACED_PIT_COUNT); out 0x42, al
///     mov al, hi(PACED_PIT_COUNT); out 0x42, al           ; counting from here
///     rdtsc; shl rdx, 32; lea rsi, [rax + rdx]            ; rsi: TSC at the start
/// 5:  in al, 0x61; test al, 0x20; jz 5b                   ; until channel 2's output goes high
///     rdtsc; shl rdx, 32; or rax, rdx                     ; rax: TSC now
///     mov r8, rax                                         ; r8: the next write's deadline
///     sub rax, rsi; shr rax, 9; mov rbp, rax              ; rbp: TSC ticks per page period
///     mov r9, rax; shl r9, 10                             ; r9: the most a deadline may lag
///     xor edi, edi                                        ; rdi: offset in the area
/// 1:  (MEMORY_COUNTER's count and print; ebx holds the count after the print)
///     mov ecx, 0x1000                                     ; 4096 pages a line
/// 4:  rdtsc; shl rdx, 32; or rax, rdx
///     cmp rax, r8; jl 4b                                  ; until the deadline
///     mov [rdi + 0x400000], ebx                           ; dirty one page
///     add r8, rbp                                         ; the next deadline
///     sub rax, r9; cmp r8, rax; cmovl r8, rax             ; at most r9 behind now
///     add edi, 0x1000; and edi, 0x7ffffff                 ; the next page, wrapping at 128 MiB
///     dec ecx; jnz 4b; jmp 1b
/// ```
pub const PACED_DIRTIER: [u8; 173] = {
    let [lo, hi] = PACED_PIT_COUNT.to_le_bytes();
    let head: [u8; PACED_COUNT_AT] = [
        0xe4, 0x61, 0x24, 0xfc, 0x0c, 0x01, 0xe6, 0x61, 0xb0, 0xb0, 0xe6, 0x43, 0xb0, lo, 0xe6,
        0x42, 0xb0, hi, 0xe6, 0x42, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x8d, 0x34, 0x10,
        0xe4, 0x61, 0xa8, 0x20, 0x74, 0xfa, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0,
        0x49, 0x89, 0xc0, 0x48, 0x29, 0xf0, 0x48, 0xc1, 0xe8, 0x09, 0x48, 0x89, 0xc5, 0x49, 0x89,
        0xc1, 0x49, 0xc1, 0xe1, 0x0a, 0x31, 0xff,
    ];
    let tail = [
        0xb9, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x4c,
        0x39, 0xc0, 0x7c, 0xf2, 0x89, 0x9f, 0x00, 0x00, 0x40, 0x00, 0x49, 0x01, 0xe8, 0x4c, 0x29,
        0xc8, 0x49, 0x39, 0xc0, 0x4c, 0x0f, 0x4c, 0xc0, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0x81,
        0xe7, 0xff, 0xff, 0xff, 0x07, 0xff, 0xc9, 0x75, 0xcf, 0xeb, 0x96,
    ];
    let mut code = [0u8; 173];
    let mut i = 0;
    while i < head.len() {
        code[i] = head[i];
        i += 1;
    }
    let mut j = 0;
    while j < PACED_COUNT_LEN {
        code[i + j] = MEMORY_COUNTER[j];
        j += 1;
    }
    let mut k = 0;
    while k < tail.len() {
        code[i + j + k] = tail[k];
        k += 1;
    }
    code
};

/// Where the count and print of [`MEMORY_COUNTER`] (label `1:`) start in [`PACED_DIRTIER`].
const PACED_COUNT_AT: usize = 67;
/// How long they are: [`MEMORY_COUNTER`] up to its delay loop.
const PACED_COUNT_LEN: usize = 50;

/// Drives the i8042 by polling: disables the keyboard interface, runs the controller self test,
/// enables the interface, then prints every byte read from port 0x60 as two hex digits and a
/// space, and resets through the i8042 (`out 0x64, 0xfe`) once it has read 0x53 (Del make).
///
/// ```text
///     mov al, 0xad; out 0x64, al          mov al, 0xaa; out 0x64, al
/// 1:  in al, 0x64; test al, 1; jz 1b      in al, 0x60; call hex
///     mov al, 0xae; out 0x64, al
/// 2:  in al, 0x64; test al, 1; jz 2b      in al, 0x60; mov bl, al; call hex
///     cmp bl, 0x53; jne 2b                mov al, 0xfe; out 0x64, al
/// 3:  hlt; jmp 3b
/// hex: mov cl, al; shr al, 4; call nib; mov al, cl; call nib; mov al, ' '; out dx, al; ret
/// nib: and al, 0xf; add al, '0'; cmp al, '9'; jbe 4f; add al, 7
/// 4:  mov dx, 0x3f8; out dx, al; ret
/// ```
pub const SCANCODE_ECHO: [u8; 89] = [
    0xb0, 0xad, 0xe6, 0x64, 0xb0, 0xaa, 0xe6, 0x64, 0xe4, 0x64, 0xa8, 0x01, 0x74, 0xfa, 0xe4, 0x60,
    0xe8, 0x1f, 0x00, 0x00, 0x00, 0xb0, 0xae, 0xe6, 0x64, 0xe4, 0x64, 0xa8, 0x01, 0x74, 0xfa, 0xe4,
    0x60, 0x88, 0xc3, 0xe8, 0x0c, 0x00, 0x00, 0x00, 0x80, 0xfb, 0x53, 0x75, 0xec, 0xb0, 0xfe, 0xe6,
    0x64, 0xf4, 0xeb, 0xfd, 0x88, 0xc1, 0xc0, 0xe8, 0x04, 0xe8, 0x0b, 0x00, 0x00, 0x00, 0x88, 0xc8,
    0xe8, 0x04, 0x00, 0x00, 0x00, 0xb0, 0x20, 0xee, 0xc3, 0x24, 0x0f, 0x04, 0x30, 0x3c, 0x39, 0x76,
    0x02, 0x04, 0x07, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xc3,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_lines_skip_a_line_cut_off_and_other_output() {
        assert_eq!(counter_lines("00000001\n0000000A\nboot\n0000"), vec![1, 10]);
        assert!(counter_lines("").is_empty());
    }

    /// Where the rel8 jump whose opcode is at `at` lands.
    fn rel8_target(code: &[u8], at: usize) -> usize {
        (at as isize + 2 + code[at + 1] as i8 as isize) as usize
    }

    fn find(code: &[u8], bytes: &[u8]) -> usize {
        code.windows(bytes.len())
            .position(|w| w == bytes)
            .unwrap_or_else(|| panic!("{bytes:x?} not in the code"))
    }

    #[test]
    fn the_paced_dirtier_counts_and_prints_as_the_memory_counter_does() {
        let c = &PACED_DIRTIER;
        assert_eq!(
            c[PACED_COUNT_AT..PACED_COUNT_AT + PACED_COUNT_LEN],
            MEMORY_COUNTER[..PACED_COUNT_LEN]
        );
        // Its last instruction jumps back to the count; the page loop's two jumps go back to
        // its rdtsc; the calibration's to its port read.
        assert_eq!(c[c.len() - 2], 0xeb);
        assert_eq!(rel8_target(c, c.len() - 2), PACED_COUNT_AT);
        let page_loop = PACED_COUNT_AT + PACED_COUNT_LEN + 5;
        assert_eq!(c[page_loop..page_loop + 2], [0x0f, 0x31], "rdtsc");
        let jl = find(c, &[0x7c]);
        let jnz = c.len() - 4;
        assert_eq!(c[jnz], 0x75);
        assert_eq!(rel8_target(c, jl), page_loop);
        assert_eq!(rel8_target(c, jnz), page_loop);
        let jz = find(c, &[0x74]);
        assert_eq!(c[rel8_target(c, jz)..][..2], [0xe4, 0x61], "in al, 0x61");
    }

    #[test]
    fn the_paced_dirtier_writes_its_area_at_64_mib_a_second() {
        let c = &PACED_DIRTIER;
        // The PIT interval is 2^9 page periods, the TSC ticks over it shifted right by 9.
        assert_eq!(PACED_PIT_COUNT, 37287);
        let lo = find(c, &[0xb0, 0xb0, 0xe6, 0x43]) + 5;
        assert_eq!(
            u16::from_le_bytes([c[lo], c[lo + 4]]),
            PACED_PIT_COUNT,
            "mov al, lo; out 0x42, al; mov al, hi"
        );
        assert_eq!(c[find(c, &[0x48, 0xc1, 0xe8]) + 3], 9, "shr rax, 9");
        let pages_per_sec = (PIT_HZ * 512) as f64 / f64::from(PACED_PIT_COUNT);
        assert!(
            (pages_per_sec / PACED_PAGES_PER_SEC as f64 - 1.0).abs() < 1e-4,
            "{pages_per_sec}"
        );
        assert_eq!(PACED_PAGES_PER_SEC * 4096, 64 << 20);
        // One page of the area per write, the offset wrapping at its end.
        let store = find(c, &[0x89, 0x9f]) + 2;
        assert_eq!(
            u32::from_le_bytes(c[store..store + 4].try_into().unwrap()),
            DIRTIER_AREA as u32
        );
        let step = find(c, &[0x81, 0xc7]) + 2;
        assert_eq!(
            u32::from_le_bytes(c[step..step + 4].try_into().unwrap()),
            4096
        );
        let mask = find(c, &[0x81, 0xe7]) + 2;
        assert_eq!(
            u64::from(u32::from_le_bytes(c[mask..mask + 4].try_into().unwrap())) + 1,
            PACED_AREA_BYTES
        );
    }

    #[test]
    fn builds_a_loadable_elf() {
        let e = elf64(&SPIN);
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(e.len(), 0x1000 + 2);
        assert_eq!(
            serial_print("A"),
            [0x66, 0xba, 0xf8, 0x03, 0xb0, b'A', 0xee]
        );
    }
}
