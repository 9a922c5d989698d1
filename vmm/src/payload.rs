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
}
