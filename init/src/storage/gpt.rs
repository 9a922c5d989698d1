//! Writing (and reading back) a GUID partition table with one partition: protective MBR,
//! primary and backup headers and entry arrays, the partition aligned to 1 MiB.

use std::io::{Read, Seek, SeekFrom, Write};

/// Linux filesystem data partition type.
pub const LINUX_FS_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const ENTRIES: u64 = 128;
const ENTRY_SIZE: u64 = 128;
const HEADER_SIZE: u32 = 92;
const ALIGN_BYTES: u64 = 1 << 20;

/// Errors of GPT handling.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// Reading or writing the disk failed.
    #[error("Disk I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The disk is too small for a 1 MiB-aligned partition.
    #[error("Disk too small: {0} bytes")]
    TooSmall(u64),
    /// The sector size is not 512 or 4096.
    #[error("Unsupported sector size {0}")]
    SectorSize(u64),
    /// The table read back is not valid.
    #[error("Invalid GPT: {0}")]
    Invalid(&'static str),
}

/// One partition as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Type GUID as text.
    pub type_guid: String,
    /// Unique GUID as text.
    pub guid: String,
    /// First LBA.
    pub first_lba: u64,
    /// Last LBA (inclusive).
    pub last_lba: u64,
    /// Partition name.
    pub name: String,
}

/// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` into GPT's mixed-endian byte layout.
pub fn guid_bytes(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || text.len() != 36 {
        return None;
    }
    let mut raw = [0u8; 16];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    let mut out = raw;
    out[0..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    out[4..6].copy_from_slice(&[raw[5], raw[4]]);
    out[6..8].copy_from_slice(&[raw[7], raw[6]]);
    Some(out)
}

/// The text form of GPT GUID bytes.
pub fn guid_text(b: &[u8; 16]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

/// A random (version 4) GUID in GPT byte layout.
pub fn random_guid() -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: getrandom writes at most the given number of bytes into the buffer.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), b.len() - filled, 0) };
        if n <= 0 {
            break;
        }
        filled += n as usize;
    }
    if filled < b.len() {
        // No entropy source: uniqueness on this disk is what matters; use the clock.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b.copy_from_slice(&t.as_nanos().to_le_bytes());
    }
    // Version 4 in the time_hi field (stored little-endian), RFC 4122 variant.
    b[7] = (b[7] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// The partition's first and last LBA on a disk of `lbas` sectors of `sector` bytes.
pub fn partition_range(lbas: u64, sector: u64) -> Result<(u64, u64), GptError> {
    let entry_sectors = ENTRIES * ENTRY_SIZE / sector;
    let align = ALIGN_BYTES / sector;
    let last_usable = lbas
        .checked_sub(2 + entry_sectors)
        .ok_or(GptError::TooSmall(lbas * sector))?;
    let first = align;
    // End on a 1 MiB boundary too, unless that leaves nothing.
    let aligned_end = ((last_usable + 1) / align) * align;
    let last = if aligned_end > first {
        aligned_end - 1
    } else {
        last_usable
    };
    if last < first + align - 1 {
        return Err(GptError::TooSmall(lbas * sector));
    }
    Ok((first, last))
}

fn header(
    my_lba: u64,
    alt_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: &[u8; 16],
    entries_lba: u64,
    entries_crc: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_SIZE as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
    h[40..48].copy_from_slice(&first_usable.to_le_bytes());
    h[48..56].copy_from_slice(&last_usable.to_le_bytes());
    h[56..72].copy_from_slice(disk_guid);
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
    h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

fn protective_mbr(lbas: u64) -> [u8; 512] {
    let mut m = [0u8; 512];
    let e = &mut m[446..462];
    e[0] = 0;
    e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    e[4] = 0xEE;
    e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = (lbas - 1).min(u64::from(u32::MAX)) as u32;
    e[12..16].copy_from_slice(&size.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xAA;
    m
}

/// Writes a GPT with one partition named `name` of type `type_guid` to a disk of
/// `size_bytes` with `sector`-byte sectors. Returns the partition's (first, last) LBA.
pub fn write<D: Write + Seek>(
    disk: &mut D,
    size_bytes: u64,
    sector: u64,
    name: &str,
    type_guid: &[u8; 16],
    disk_guid: &[u8; 16],
    part_guid: &[u8; 16],
) -> Result<(u64, u64), GptError> {
    if sector != 512 && sector != 4096 {
        return Err(GptError::SectorSize(sector));
    }
    let lbas = size_bytes / sector;
    let (first, last) = partition_range(lbas, sector)?;
    let entry_sectors = ENTRIES * ENTRY_SIZE / sector;
    let first_usable = 2 + entry_sectors;
    let last_usable = lbas - 2 - entry_sectors;

    let mut entries = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    let e = &mut entries[..ENTRY_SIZE as usize];
    e[0..16].copy_from_slice(type_guid);
    e[16..32].copy_from_slice(part_guid);
    e[32..40].copy_from_slice(&first.to_le_bytes());
    e[40..48].copy_from_slice(&last.to_le_bytes());
    for (i, unit) in name.encode_utf16().take(36).enumerate() {
        e[56 + i * 2..58 + i * 2].copy_from_slice(&unit.to_le_bytes());
    }
    let entries_crc = crc32fast::hash(&entries);

    let backup_lba = lbas - 1;
    let backup_entries_lba = backup_lba - entry_sectors;
    let primary = header(
        1,
        backup_lba,
        first_usable,
        last_usable,
        disk_guid,
        2,
        entries_crc,
    );
    let backup = header(
        backup_lba,
        1,
        first_usable,
        last_usable,
        disk_guid,
        backup_entries_lba,
        entries_crc,
    );

    let mut sector0 = vec![0u8; sector as usize];
    sector0[..512].copy_from_slice(&protective_mbr(lbas));
    let hdr_sector = |h: &[u8]| {
        let mut s = vec![0u8; sector as usize];
        s[..h.len()].copy_from_slice(h);
        s
    };
    let primary_s = hdr_sector(&primary);
    let backup_s = hdr_sector(&backup);

    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&sector0)?;
    disk.write_all(&primary_s)?;
    disk.write_all(&entries)?;
    disk.seek(SeekFrom::Start(backup_entries_lba * sector))?;
    disk.write_all(&entries)?;
    disk.write_all(&backup_s)?;
    disk.flush()?;
    Ok((first, last))
}

/// Reads and verifies the primary GPT (and that the backup header agrees); returns the
/// used partitions.
pub fn read<D: Read + Seek>(
    disk: &mut D,
    size_bytes: u64,
    sector: u64,
) -> Result<Vec<Partition>, GptError> {
    let lbas = size_bytes / sector;
    let mut mbr = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut mbr)?;
    if mbr[510..512] != [0x55, 0xAA] || mbr[446 + 4] != 0xEE {
        return Err(GptError::Invalid("no protective MBR"));
    }
    let primary = read_header(disk, 1, sector)?;
    let alt = u64::from_le_bytes(primary[32..40].try_into().unwrap_or_default());
    if alt != lbas - 1 {
        return Err(GptError::Invalid("backup header not at the last sector"));
    }
    let backup = read_header(disk, alt, sector)?;
    if backup[56..72] != primary[56..72] || backup[88..92] != primary[88..92] {
        return Err(GptError::Invalid("backup header differs from the primary"));
    }
    let mut parts = Vec::new();
    for hdr in [&primary, &backup] {
        let entries_lba = u64::from_le_bytes(hdr[72..80].try_into().unwrap_or_default());
        let count = u32::from_le_bytes(hdr[80..84].try_into().unwrap_or_default()) as usize;
        let size = u32::from_le_bytes(hdr[84..88].try_into().unwrap_or_default()) as usize;
        if !(1..=1024).contains(&count) || !(128..=1024).contains(&size) {
            return Err(GptError::Invalid("bad entry array geometry"));
        }
        let mut entries = vec![0u8; count * size];
        disk.seek(SeekFrom::Start(entries_lba * sector))?;
        disk.read_exact(&mut entries)?;
        let crc = u32::from_le_bytes(hdr[88..92].try_into().unwrap_or_default());
        if crc32fast::hash(&entries) != crc {
            return Err(GptError::Invalid("entry array checksum mismatch"));
        }
        if !parts.is_empty() {
            continue;
        }
        for e in entries.chunks(size) {
            let type_guid: [u8; 16] = e[0..16].try_into().unwrap_or_default();
            if type_guid == [0u8; 16] {
                continue;
            }
            let units: Vec<u16> = e[56..128]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            parts.push(Partition {
                type_guid: guid_text(&type_guid),
                guid: guid_text(&e[16..32].try_into().unwrap_or_default()),
                first_lba: u64::from_le_bytes(e[32..40].try_into().unwrap_or_default()),
                last_lba: u64::from_le_bytes(e[40..48].try_into().unwrap_or_default()),
                name: String::from_utf16_lossy(&units),
            });
        }
    }
    Ok(parts)
}

fn read_header<D: Read + Seek>(disk: &mut D, lba: u64, sector: u64) -> Result<Vec<u8>, GptError> {
    let mut h = vec![0u8; HEADER_SIZE as usize];
    disk.seek(SeekFrom::Start(lba * sector))?;
    disk.read_exact(&mut h)?;
    if &h[0..8] != b"EFI PART" {
        return Err(GptError::Invalid("no GPT signature"));
    }
    let stored = u32::from_le_bytes(h[16..20].try_into().unwrap_or_default());
    let mut z = h.clone();
    z[16..20].fill(0);
    if crc32fast::hash(&z) != stored {
        return Err(GptError::Invalid("header checksum mismatch"));
    }
    if u64::from_le_bytes(h[24..32].try_into().unwrap_or_default()) != lba {
        return Err(GptError::Invalid("header at the wrong LBA"));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn temp_disk(name: &str, size: u64) -> (std::path::PathBuf, std::fs::File) {
        let path =
            std::env::temp_dir().join(format!("hvnode-init-gpt-{name}-{}", std::process::id()));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        f.set_len(size).expect("size");
        (path, f)
    }

    #[test]
    fn guid_text_round_trips_through_mixed_endian_bytes() {
        let b = guid_bytes(LINUX_FS_TYPE).expect("guid");
        assert_eq!(b[..4], [0xAF, 0x3D, 0xC6, 0x0F]);
        assert_eq!(b[4..8], [0x83, 0x84, 0x72, 0x47]);
        assert_eq!(b[8..], [0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4]);
        assert_eq!(guid_text(&b), LINUX_FS_TYPE);
        assert_eq!(guid_bytes("not-a-guid"), None);
    }

    #[test]
    fn writes_a_table_that_reads_back_with_valid_checksums() {
        let size = 64 << 20;
        let (path, mut f) = temp_disk("rt", size);
        let t = guid_bytes(LINUX_FS_TYPE).expect("type");
        let (first, last) = write(
            &mut f,
            size,
            512,
            "HVNODE-DATA",
            &t,
            &random_guid(),
            &random_guid(),
        )
        .expect("write");
        assert_eq!(first, 2048);
        assert_eq!((last + 1) % 2048, 0, "ends on a MiB boundary");
        let parts = read(&mut f, size, 512).expect("read back");
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].name, "HVNODE-DATA");
        assert_eq!(parts[0].type_guid, LINUX_FS_TYPE);
        assert_eq!((parts[0].first_lba, parts[0].last_lba), (first, last));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn corrupting_the_primary_header_is_detected() {
        let size = 8 << 20;
        let (path, mut f) = temp_disk("corrupt", size);
        let t = guid_bytes(LINUX_FS_TYPE).expect("type");
        write(
            &mut f,
            size,
            512,
            "HVNODE-DATA",
            &t,
            &random_guid(),
            &random_guid(),
        )
        .expect("write");
        f.seek(SeekFrom::Start(512 + 40)).expect("seek");
        f.write_all(&[0xFF]).expect("corrupt");
        assert!(matches!(read(&mut f, size, 512), Err(GptError::Invalid(_))));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn supports_4k_sectors() {
        let size = 16 << 20;
        let (path, mut f) = temp_disk("4k", size);
        let t = guid_bytes(LINUX_FS_TYPE).expect("type");
        let (first, _) = write(
            &mut f,
            size,
            4096,
            "HVNODE-DATA",
            &t,
            &random_guid(),
            &random_guid(),
        )
        .expect("write");
        assert_eq!(first, 256);
        assert_eq!(
            read(&mut f, size, 4096).expect("read")[0].name,
            "HVNODE-DATA"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn refuses_tiny_disks_and_odd_sector_sizes() {
        let (path, mut f) = temp_disk("tiny", 1 << 20);
        let t = guid_bytes(LINUX_FS_TYPE).expect("type");
        assert!(matches!(
            write(
                &mut f,
                1 << 20,
                512,
                "X",
                &t,
                &random_guid(),
                &random_guid()
            ),
            Err(GptError::TooSmall(_))
        ));
        assert!(matches!(
            write(
                &mut f,
                1 << 20,
                1000,
                "X",
                &t,
                &random_guid(),
                &random_guid()
            ),
            Err(GptError::SectorSize(1000))
        ));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn random_guids_differ_and_carry_version_4() {
        let a = random_guid();
        let b = random_guid();
        assert_ne!(a, b);
        assert_eq!(a[7] >> 4, 4);
    }
}
