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

#[cfg(test)]
mod tests {
    use super::*;

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
