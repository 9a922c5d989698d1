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

/// The counts that [`MEMORY_COUNTER`] (or [`DIRTIER`]) printed in a serial log: one per
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

/// This host's TSC rate (ticks a second), measured against the monotonic clock over `over`.
/// A KVM guest's TSC runs at the host's rate (KVM's default `tsc_khz`), so a payload paced on
/// its TSC ([`paced_dirtier`]) is paced in real time.
pub fn tsc_hz(over: std::time::Duration) -> u64 {
    let t0 = std::time::Instant::now();
    // SAFETY: RDTSC reads a counter; it has no preconditions and touches no memory.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    std::thread::sleep(over);
    // SAFETY: as above.
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    let ns = t0.elapsed().as_nanos().max(1);
    (u128::from(c1.wrapping_sub(c0)) * 1_000_000_000 / ns) as u64
}

/// [`DIRTIER`] paced to `bytes_per_sec`: the same count in memory and on the serial port (one
/// line per 16 MiB written, so [`counter_lines`] reads it), but after each 4 KiB page it waits
/// for a TSC deadline that advances by the page's share of a second (`tsc_hz` from
/// [`tsc_hz`]). The guest thus dirties its 16 MiB working set at a steady rate, as a real busy
/// guest does, instead of in bursts. Behind by more than a whole round of the working set
/// (paused, migrated, starved of CPU), it starts the deadlines afresh rather than catching up
/// at full speed.
///
/// ```text
///     mov r8, ticks_per_page; mov r9, r8; shl r9, 12      ; r9: a round of 4096 pages
///     rdtsc; shl rdx, 32; or rax, rdx; mov rsi, rax        ; rsi: the next deadline
/// 1:  (MEMORY_COUNTER up to its delay loop: count and print)
///     mov edi, 0x400000; mov ecx, 0x1000
/// 4:  mov [rdi], eax; add rsi, r8
/// 5:  rdtsc; shl rdx, 32; or rax, rdx; cmp rax, rsi; jb 5b
///     mov rdx, rax; sub rdx, rsi; cmp rdx, r9; jbe 6f; mov rsi, rax
/// 6:  add edi, 0x1000; dec ecx; jnz 4b; jmp 1b
/// ```
pub fn paced_dirtier(bytes_per_sec: u64, tsc_hz: u64) -> Vec<u8> {
    let ticks_per_page = (u128::from(tsc_hz) * 4096 / u128::from(bytes_per_sec.max(1))) as u64;
    const RDTSC64: [u8; 9] = [0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0];
    let mut c = vec![0x49, 0xb8];
    c.extend_from_slice(&ticks_per_page.to_le_bytes());
    c.extend_from_slice(&[0x4d, 0x89, 0xc1, 0x49, 0xc1, 0xe1, 0x0c]);
    c.extend_from_slice(&RDTSC64);
    c.extend_from_slice(&[0x48, 0x89, 0xc6]);
    let top = c.len();
    c.extend_from_slice(&MEMORY_COUNTER[..50]);
    c.extend_from_slice(&[0xbf, 0x00, 0x00, 0x40, 0x00, 0xb9, 0x00, 0x10, 0x00, 0x00]);
    let page = c.len();
    c.extend_from_slice(&[0x89, 0x07, 0x4c, 0x01, 0xc6]);
    let spin = c.len();
    c.extend_from_slice(&RDTSC64);
    c.extend_from_slice(&[0x48, 0x39, 0xf0, 0x72]);
    c.push(rel8(c.len() + 1, spin));
    c.extend_from_slice(&[
        0x48, 0x89, 0xc2, 0x48, 0x29, 0xf2, 0x4c, 0x39, 0xca, 0x76, 0x03, 0x48, 0x89, 0xc6,
    ]);
    c.extend_from_slice(&[0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75]);
    c.push(rel8(c.len() + 1, page));
    c.push(0xeb);
    c.push(rel8(c.len() + 1, top));
    c
}

/// The rel8 of a short jump whose next instruction is at `next`, to `target` (backwards).
fn rel8(next: usize, target: usize) -> u8 {
    let d = target as i64 - next as i64;
    assert!((-128..0).contains(&d), "a short jump back of {d} bytes");
    d as i8 as u8
}

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

    #[test]
    fn the_paced_dirtier_waits_its_share_per_page_and_loops_where_it_should() {
        // 2 GHz at 64 MiB/s: 16384 pages a second, 122070 ticks each.
        let c = paced_dirtier(64 << 20, 2_000_000_000);
        assert_eq!(&c[..2], &[0x49, 0xb8]);
        assert_eq!(u64::from_le_bytes(c[2..10].try_into().unwrap()), 122_070);
        // The three backward jumps: to the spin (jb), to the next page (jnz), to the count (jmp).
        let (top, page, spin) = (29, 29 + 50 + 10, 29 + 50 + 10 + 5);
        let target = |at: usize| (at as i64 + 2 + i64::from(c[at + 1] as i8)) as usize;
        let jb = spin + 9 + 3;
        assert_eq!((c[jb], target(jb)), (0x72, spin));
        let jnz = c.len() - 4;
        assert_eq!((c[jnz], target(jnz)), (0x75, page));
        let jmp = c.len() - 2;
        assert_eq!((c[jmp], target(jmp)), (0xeb, top));
        assert_eq!(&c[top..top + 50], &MEMORY_COUNTER[..50]);
        // The skip over the resync lands on `add edi, 0x1000`.
        let jbe = jb + 2 + 9;
        assert_eq!((c[jbe], jbe + 2 + c[jbe + 1] as usize), (0x76, jnz - 8));
        assert_eq!(&c[jnz - 8..jnz - 6], &[0x81, 0xc7]);
    }

    #[test]
    fn the_tsc_ticks() {
        let hz = tsc_hz(std::time::Duration::from_millis(20));
        assert!(hz > 100_000_000, "a TSC of {hz} Hz");
    }
}
