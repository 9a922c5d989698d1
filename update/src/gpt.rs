//! GUID partition tables: writing a table of any partitions (protective MBR, primary and backup
//! headers and entry arrays) and reading one back with every checksum verified.
//!
//! One implementation for the node: init's one-partition data disk ([`write_single`]) and the
//! installer's A/B layout ([`crate::disk`]) both go through [`write`].

use std::io::{Read, Seek, SeekFrom, Write};

/// Linux filesystem data partition type.
pub const LINUX_FS_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// Entries in the arrays this module writes (the UEFI minimum, what every tool writes).
pub const ENTRIES: u64 = 128;
const ENTRY_SIZE: u64 = 128;
const HEADER_SIZE: u32 = 92;
/// Partitions start and end on 1 MiB boundaries.
pub const ALIGN_BYTES: u64 = 1 << 20;
/// UTF-16 code units of a partition name.
pub const NAME_UNITS: usize = 36;
/// The bytes of sector 0 that hold boot code; the partition table and signature follow.
pub const BOOT_CODE_LEN: usize = 440;

/// Errors of GPT handling.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// Reading or writing the disk failed.
    #[error("Disk I/O failed")]
    Io(#[from] std::io::Error),
    /// The disk is too small for the partitions.
    #[error("Disk too small: {0} bytes")]
    TooSmall(u64),
    /// The sector size is not 512 or 4096.
    #[error("Unsupported sector size {0}")]
    SectorSize(u64),
    /// A partition to write does not fit or overlaps another.
    #[error("Partition {0:?} {1}")]
    BadPartition(String, &'static str),
    /// More partitions than the entry array holds.
    #[error("{0} partitions; a table holds at most 128")]
    TooMany(usize),
    /// The table read back is not valid.
    #[error("Invalid GPT: {0}")]
    Invalid(&'static str),
}

/// One partition as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based number (the entry's index + 1; the kernel's `sdb3` is number 3).
    pub number: u32,
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

impl Partition {
    /// Bytes from the start of the disk to the partition.
    pub fn offset(&self, sector: u64) -> u64 {
        self.first_lba * sector
    }

    /// The partition's size in bytes.
    pub fn len(&self, sector: u64) -> u64 {
        (self.last_lba + 1 - self.first_lba) * sector
    }
}

/// One partition to write, in GPT byte layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPartition {
    /// Name, at most 36 UTF-16 code units.
    pub name: String,
    pub type_guid: [u8; 16],
    pub guid: [u8; 16],
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
}

/// The LBAs partitions may use on a disk of `lbas` sectors: (first usable, last usable).
pub fn usable_range(lbas: u64, sector: u64) -> Result<(u64, u64), GptError> {
    let entry_sectors = ENTRIES * ENTRY_SIZE / sector;
    let first = 2 + entry_sectors;
    let last = lbas
        .checked_sub(2 + entry_sectors)
        .filter(|&l| l >= first)
        .ok_or(GptError::TooSmall(lbas * sector))?;
    Ok((first, last))
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
///
/// From `/dev/urandom`, which never blocks: PID 1 makes GUIDs early in boot, when the kernel's
/// pool may not be initialised yet, and the getrandom crate's fallback for static binaries
/// polls `/dev/random`, which then waits for entropy an idle machine may never gather. A GUID
/// needs to be unique on the disk, not secret.
pub fn random_guid() -> [u8; 16] {
    use std::io::Read;
    let mut b = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
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

/// The one partition of a data disk: from 1 MiB to the last whole MiB (or the last usable
/// sector if that leaves nothing), on a disk of `lbas` sectors.
pub fn partition_range(lbas: u64, sector: u64) -> Result<(u64, u64), GptError> {
    let align = ALIGN_BYTES / sector;
    let (_, last_usable) = usable_range(lbas, sector)?;
    let first = align;
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
    usable: (u64, u64),
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
    h[40..48].copy_from_slice(&usable.0.to_le_bytes());
    h[48..56].copy_from_slice(&usable.1.to_le_bytes());
    h[56..72].copy_from_slice(disk_guid);
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
    h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Sector 0: `boot_code` (or zeros), the one protective partition of type 0xEE over the whole
/// disk, the 0x55AA signature.
fn protective_mbr(lbas: u64, boot_code: Option<&[u8; BOOT_CODE_LEN]>) -> [u8; 512] {
    let mut m = [0u8; 512];
    if let Some(code) = boot_code {
        m[..BOOT_CODE_LEN].copy_from_slice(code);
    }
    let e = &mut m[446..462];
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

/// Checks `parts` against a disk of `lbas` sectors: each inside the usable range, none
/// overlapping, names that fit.
pub fn check_partitions(parts: &[NewPartition], lbas: u64, sector: u64) -> Result<(), GptError> {
    if parts.len() as u64 > ENTRIES {
        return Err(GptError::TooMany(parts.len()));
    }
    let (first_usable, last_usable) = usable_range(lbas, sector)?;
    for (i, p) in parts.iter().enumerate() {
        let bad = |why| Err(GptError::BadPartition(p.name.clone(), why));
        if p.name.encode_utf16().count() > NAME_UNITS {
            return bad("has a name longer than 36 UTF-16 units");
        }
        if p.type_guid == [0u8; 16] {
            return bad("has no type");
        }
        if p.first_lba > p.last_lba {
            return bad("ends before it starts");
        }
        if p.first_lba < first_usable || p.last_lba > last_usable {
            if p.last_lba >= lbas {
                return Err(GptError::TooSmall(lbas * sector));
            }
            return bad("lies outside the usable sectors");
        }
        for q in &parts[..i] {
            if p.first_lba <= q.last_lba && q.first_lba <= p.last_lba {
                return bad("overlaps another partition");
            }
        }
    }
    Ok(())
}

/// Writes a GPT holding `parts` (in entry order: the first is partition 1) to a disk of
/// `size_bytes` with `sector`-byte sectors, and `boot_code` into sector 0's first 440 bytes.
/// Order: backup array and header first, then the primary, then sector 0, so that a table
/// torn by a power cut has no valid primary header rather than a half-new one.
pub fn write<D: Write + Seek>(
    disk: &mut D,
    size_bytes: u64,
    sector: u64,
    disk_guid: &[u8; 16],
    parts: &[NewPartition],
    boot_code: Option<&[u8; BOOT_CODE_LEN]>,
) -> Result<(), GptError> {
    if sector != 512 && sector != 4096 {
        return Err(GptError::SectorSize(sector));
    }
    let lbas = size_bytes / sector;
    check_partitions(parts, lbas, sector)?;
    let usable = usable_range(lbas, sector)?;
    let entry_sectors = ENTRIES * ENTRY_SIZE / sector;

    let mut entries = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    for (p, e) in parts.iter().zip(entries.chunks_mut(ENTRY_SIZE as usize)) {
        e[0..16].copy_from_slice(&p.type_guid);
        e[16..32].copy_from_slice(&p.guid);
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        for (i, unit) in p.name.encode_utf16().take(NAME_UNITS).enumerate() {
            e[56 + i * 2..58 + i * 2].copy_from_slice(&unit.to_le_bytes());
        }
    }
    let entries_crc = crc32fast::hash(&entries);

    let backup_lba = lbas - 1;
    let backup_entries_lba = backup_lba - entry_sectors;
    let primary = header(1, backup_lba, usable, disk_guid, 2, entries_crc);
    let backup = header(
        backup_lba,
        1,
        usable,
        disk_guid,
        backup_entries_lba,
        entries_crc,
    );
    let in_sector = |h: &[u8]| {
        let mut s = vec![0u8; sector as usize];
        s[..h.len()].copy_from_slice(h);
        s
    };

    disk.seek(SeekFrom::Start(backup_entries_lba * sector))?;
    disk.write_all(&entries)?;
    disk.write_all(&in_sector(&backup))?;
    disk.seek(SeekFrom::Start(2 * sector))?;
    disk.write_all(&entries)?;
    disk.seek(SeekFrom::Start(sector))?;
    disk.write_all(&in_sector(&primary))?;
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&in_sector(&protective_mbr(lbas, boot_code)))?;
    disk.flush()?;
    Ok(())
}

/// Writes a GPT with one partition named `name` of type `type_guid` from 1 MiB to the end of
/// the disk ([`partition_range`]). Returns the partition's (first, last) LBA.
pub fn write_single<D: Write + Seek>(
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
    let (first, last) = partition_range(size_bytes / sector, sector)?;
    let part = NewPartition {
        name: name.to_owned(),
        type_guid: *type_guid,
        guid: *part_guid,
        first_lba: first,
        last_lba: last,
    };
    write(disk, size_bytes, sector, disk_guid, &[part], None)?;
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
    if lbas < 3 {
        return Err(GptError::TooSmall(size_bytes));
    }
    let mut mbr = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut mbr)?;
    if mbr[510..512] != [0x55, 0xAA] || mbr[446 + 4] != 0xEE {
        return Err(GptError::Invalid("no protective MBR"));
    }
    let primary = read_header(disk, 1, sector)?;
    let alt = le64(&primary[32..40]);
    if alt != lbas - 1 {
        return Err(GptError::Invalid("backup header not at the last sector"));
    }
    let backup = read_header(disk, alt, sector)?;
    if backup[56..72] != primary[56..72] || backup[88..92] != primary[88..92] {
        return Err(GptError::Invalid("backup header differs from the primary"));
    }
    let mut parts = Vec::new();
    for hdr in [&primary, &backup] {
        let entries_lba = le64(&hdr[72..80]);
        let count = le32(&hdr[80..84]) as usize;
        let size = le32(&hdr[84..88]) as usize;
        if !(1..=1024).contains(&count) || !(128..=1024).contains(&size) {
            return Err(GptError::Invalid("bad entry array geometry"));
        }
        let mut entries = vec![0u8; count * size];
        disk.seek(SeekFrom::Start(entries_lba.saturating_mul(sector)))?;
        disk.read_exact(&mut entries)?;
        if crc32fast::hash(&entries) != le32(&hdr[88..92]) {
            return Err(GptError::Invalid("entry array checksum mismatch"));
        }
        if hdr[..] != primary[..] {
            continue;
        }
        for (i, e) in entries.chunks(size).enumerate() {
            let type_guid: [u8; 16] = e[0..16].try_into().unwrap_or_default();
            if type_guid == [0u8; 16] {
                continue;
            }
            let units: Vec<u16> = e[56..128]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            let (first_lba, last_lba) = (le64(&e[32..40]), le64(&e[40..48]));
            if first_lba > last_lba || last_lba >= lbas {
                return Err(GptError::Invalid("a partition lies outside the disk"));
            }
            parts.push(Partition {
                number: i as u32 + 1,
                type_guid: guid_text(&type_guid),
                guid: guid_text(&e[16..32].try_into().unwrap_or_default()),
                first_lba,
                last_lba,
                name: String::from_utf16_lossy(&units),
            });
        }
    }
    Ok(parts)
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or_default())
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap_or_default())
}

fn read_header<D: Read + Seek>(disk: &mut D, lba: u64, sector: u64) -> Result<Vec<u8>, GptError> {
    let mut h = vec![0u8; HEADER_SIZE as usize];
    disk.seek(SeekFrom::Start(lba * sector))?;
    disk.read_exact(&mut h)?;
    if &h[0..8] != b"EFI PART" {
        return Err(GptError::Invalid("no GPT signature"));
    }
    let stored = le32(&h[16..20]);
    let mut z = h.clone();
    z[16..20].fill(0);
    if crc32fast::hash(&z) != stored {
        return Err(GptError::Invalid("header checksum mismatch"));
    }
    if le64(&h[24..32]) != lba {
        return Err(GptError::Invalid("header at the wrong LBA"));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn disk(size: u64) -> Cursor<Vec<u8>> {
        Cursor::new(vec![0u8; size as usize])
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
    fn single_partition_table_reads_back_with_valid_checksums() {
        let size = 64 << 20;
        let mut d = disk(size);
        let t = guid_bytes(LINUX_FS_TYPE).expect("type");
        let (first, last) = write_single(
            &mut d,
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
        let parts = read(&mut d, size, 512).expect("read back");
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].name, "HVNODE-DATA");
        assert_eq!(parts[0].number, 1);
        assert_eq!(parts[0].type_guid, LINUX_FS_TYPE);
        assert_eq!((parts[0].first_lba, parts[0].last_lba), (first, last));
    }

    #[test]
    fn corrupting_the_primary_header_is_detected() {
        let size = 8 << 20;
        let mut d = disk(size);
        let t = guid_bytes(LINUX_FS_TYPE).expect("type");
        write_single(&mut d, size, 512, "X", &t, &random_guid(), &random_guid()).expect("write");
        d.get_mut()[512 + 40] ^= 0xFF;
        assert!(matches!(read(&mut d, size, 512), Err(GptError::Invalid(_))));
    }

    #[test]
    fn supports_4k_sectors() {
        let size = 16 << 20;
        let mut d = disk(size);
        let t = guid_bytes(LINUX_FS_TYPE).expect("type");
        let (first, _) = write_single(&mut d, size, 4096, "X", &t, &random_guid(), &random_guid())
            .expect("write");
        assert_eq!(first, 256);
        assert_eq!(read(&mut d, size, 4096).expect("read")[0].name, "X");
    }

    #[test]
    fn refuses_tiny_disks_odd_sector_sizes_and_overlaps() {
        let mut d = disk(1 << 20);
        let t = guid_bytes(LINUX_FS_TYPE).expect("type");
        let g = random_guid();
        assert!(matches!(
            write_single(&mut d, 1 << 20, 512, "X", &t, &g, &g),
            Err(GptError::TooSmall(_))
        ));
        assert!(matches!(
            write_single(&mut d, 1 << 20, 1000, "X", &t, &g, &g),
            Err(GptError::SectorSize(1000))
        ));
        let p = |first, last| NewPartition {
            name: "p".into(),
            type_guid: t,
            guid: g,
            first_lba: first,
            last_lba: last,
        };
        let mut d = disk(8 << 20);
        assert!(matches!(
            write(
                &mut d,
                8 << 20,
                512,
                &g,
                &[p(2048, 4095), p(4000, 5000)],
                None
            ),
            Err(GptError::BadPartition(_, "overlaps another partition"))
        ));
        assert!(matches!(
            write(&mut d, 8 << 20, 512, &g, &[p(10, 4095)], None),
            Err(GptError::BadPartition(_, "lies outside the usable sectors"))
        ));
        assert!(matches!(
            write(&mut d, 8 << 20, 512, &g, &[p(2048, 1 << 20)], None),
            Err(GptError::TooSmall(_))
        ));
        assert_eq!(d.get_ref().iter().filter(|&&b| b != 0).count(), 0);
    }

    #[test]
    fn boot_code_goes_before_the_protective_entry() {
        let size = 8 << 20;
        let mut d = disk(size);
        let t = guid_bytes(LINUX_FS_TYPE).expect("type");
        let code = [0xEBu8; BOOT_CODE_LEN];
        let p = NewPartition {
            name: "p".into(),
            type_guid: t,
            guid: random_guid(),
            first_lba: 2048,
            last_lba: 4095,
        };
        write(&mut d, size, 512, &random_guid(), &[p], Some(&code)).expect("write");
        let s = d.get_ref();
        assert_eq!(s[..BOOT_CODE_LEN], code[..]);
        assert_eq!(s[446 + 4], 0xEE);
        assert_eq!(s[510..512], [0x55, 0xAA]);
        assert_eq!(read(&mut d, size, 512).expect("read").len(), 1);
    }

    #[test]
    fn random_guids_differ_and_carry_version_4() {
        let a = random_guid();
        let b = random_guid();
        assert_ne!(a, b);
        assert_eq!(a[7] >> 4, 4);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            /// Random disk sizes and partition sets: a table that is written reads back exactly,
            /// and every partition lies inside the disk's usable sectors; a set that does not
            /// fit is refused without writing a byte.
            #[test]
            fn tables_round_trip_and_stay_inside_the_disk(
                sector in prop_oneof![Just(512u64), Just(4096u64)],
                size_mib in 1u64..64,
                extra in 0u64..4096,
                parts in proptest::collection::vec((0u64..80, 1u64..40, "[a-z-]{0,36}"), 0..8),
            ) {
                let size = size_mib * (1 << 20) + extra * 512;
                let lbas = size / sector;
                let t = guid_bytes(LINUX_FS_TYPE).expect("type");
                let mut next = 0;
                let mut table = Vec::new();
                for (gap, len, name) in parts {
                    let first = next + gap + 34;
                    table.push(NewPartition {
                        name,
                        type_guid: t,
                        guid: random_guid(),
                        first_lba: first,
                        last_lba: first + len * (4096 / sector) - 1,
                    });
                    next = first + len * (4096 / sector);
                }
                let mut d = Cursor::new(vec![0u8; size as usize]);
                let disk_guid = random_guid();
                match write(&mut d, size, sector, &disk_guid, &table, None) {
                    Ok(()) => {
                        prop_assert_eq!(d.get_ref().len() as u64, size);
                        let back = read(&mut d, size, sector).expect("read back");
                        prop_assert_eq!(back.len(), table.len());
                        let (lo, hi) = usable_range(lbas, sector).expect("usable");
                        for (b, p) in back.iter().zip(&table) {
                            prop_assert_eq!(&b.name, &p.name);
                            prop_assert_eq!((b.first_lba, b.last_lba), (p.first_lba, p.last_lba));
                            prop_assert_eq!(b.guid.clone(), guid_text(&p.guid));
                            prop_assert!(b.first_lba >= lo && b.last_lba <= hi);
                            prop_assert!(b.offset(sector) + b.len(sector) <= size);
                        }
                    }
                    Err(_) => {
                        prop_assert!(d.get_ref().iter().all(|&b| b == 0));
                        prop_assert!(check_partitions(&table, lbas, sector).is_err() || usable_range(lbas, sector).is_err());
                    }
                }
            }
        }
    }
}
