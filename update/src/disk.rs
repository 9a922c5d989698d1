//! The installed node's disk: the A/B layout, the EFI system partition (FAT32, written with the
//! pure-Rust `fatfs`, never mounted), GRUB's BIOS boot code, and what a disk holds before an
//! install. See docs/install.md for the layout as the admin sees it.
//!
//! ```text
//! #  name              size      type                 holds
//! 1  hvnode-bios       1 MiB     BIOS boot            GRUB i386-pc core.img (boot.img in the MBR)
//! 2  hvnode-esp        256 MiB   EFI system, FAT32    /EFI/BOOT/BOOTX64.EFI, /boot/grub/{grub.cfg,
//!                                                     grub-ab.cfg,grubenv}, /A/{vmlinuz,initrd.img}, /B/...
//! 3  hvnode-root-a     1 GiB     root x86-64          slot A's squashfs
//! 4  hvnode-verity-a   64 MiB    root verity x86-64   slot A's dm-verity hash tree (with superblock)
//! 5  hvnode-root-b     1 GiB     root x86-64          slot B's squashfs
//! 6  hvnode-verity-b   64 MiB    root verity x86-64   slot B's hash tree
//! 7  HVNODE-DATA       the rest  Linux filesystem     ext4, the data partition (docs/storage.md)
//! ```
//!
//! Everything starts and ends on 1 MiB boundaries. Partitions are found by their GPT name, never
//! by number, so a later release may add partitions after these.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use hvnode_api::paths::DATA_LABEL;

use crate::gpt::{self, NewPartition, Partition};
use crate::grubenv::{self, GrubEnv};
use crate::slots::Slot;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// The BIOS boot partition: GRUB's core.img, outside any filesystem.
pub const BIOS_SIZE: u64 = MIB;
/// The EFI system partition.
pub const ESP_SIZE: u64 = 256 * MIB;
/// One slot's root image partition (the squashfs is ~54 MB today).
pub const ROOT_SIZE: u64 = 1024 * MIB;
/// One slot's hash tree partition (a 1 GiB image needs ~8 MiB of tree).
pub const VERITY_SIZE: u64 = 64 * MIB;
/// The smallest data partition an install creates.
pub const MIN_DATA_SIZE: u64 = 512 * MIB;

/// GPT type of the BIOS boot partition.
pub const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";
/// GPT type of the EFI system partition.
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// GPT type of a root partition (x86-64, the Discoverable Partitions Specification's).
pub const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// GPT type of a root verity partition (x86-64, DPS).
pub const VERITY_TYPE: &str = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5";
/// FAT volume label of the ESP; GRUB's embedded config searches for it.
pub const ESP_LABEL: &str = "HVNODE-ESP";
/// The environment block on the ESP.
pub const GRUBENV_PATH: &str = "boot/grub/grubenv";
/// Where a new block is written in full before the real one is overwritten in place.
pub const GRUBENV_NEW_PATH: &str = "boot/grub/grubenv.new";
/// The disk's boot menu on the ESP.
pub const GRUB_CFG_PATH: &str = "boot/grub/grub.cfg";
/// The slot selection script beside it.
pub const GRUB_AB_PATH: &str = "boot/grub/grub-ab.cfg";
/// The UEFI fallback loader path.
pub const EFI_LOADER_PATH: &str = "EFI/BOOT/BOOTX64.EFI";
/// The disk's boot menu (`image/grub-disk.cfg`).
pub const DISK_GRUB_CFG: &str = include_str!("../../image/grub-disk.cfg");

/// One partition of the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    BiosBoot,
    Esp,
    Root(Slot),
    Verity(Slot),
    Data,
}

impl Part {
    /// Every partition, in table order (the first is partition 1).
    pub const ALL: [Part; 7] = [
        Part::BiosBoot,
        Part::Esp,
        Part::Root(Slot::A),
        Part::Verity(Slot::A),
        Part::Root(Slot::B),
        Part::Verity(Slot::B),
        Part::Data,
    ];

    /// The GPT partition name, by which everything finds the partition.
    pub fn name(self) -> &'static str {
        match self {
            Part::BiosBoot => "hvnode-bios",
            Part::Esp => "hvnode-esp",
            Part::Root(Slot::A) => "hvnode-root-a",
            Part::Root(Slot::B) => "hvnode-root-b",
            Part::Verity(Slot::A) => "hvnode-verity-a",
            Part::Verity(Slot::B) => "hvnode-verity-b",
            Part::Data => DATA_LABEL,
        }
    }

    /// The GPT type GUID, as text.
    pub fn type_guid(self) -> &'static str {
        match self {
            Part::BiosBoot => BIOS_BOOT_TYPE,
            Part::Esp => ESP_TYPE,
            Part::Root(_) => ROOT_TYPE,
            Part::Verity(_) => VERITY_TYPE,
            Part::Data => gpt::LINUX_FS_TYPE,
        }
    }

    /// The size every install gives it; `None` for the data partition (the rest of the disk).
    pub fn size(self) -> Option<u64> {
        match self {
            Part::BiosBoot => Some(BIOS_SIZE),
            Part::Esp => Some(ESP_SIZE),
            Part::Root(_) => Some(ROOT_SIZE),
            Part::Verity(_) => Some(VERITY_SIZE),
            Part::Data => None,
        }
    }
}

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes from the start of the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Extent {
    /// The range of a partition read from a GPT.
    pub fn of(p: &Partition, sector: u64) -> Extent {
        Extent {
            offset: p.offset(sector),
            len: p.len(sector),
        }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Why a disk cannot take the layout or does not hold it.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("The disk is {size} bytes; installing needs at least {needed} ({} GiB)", needed.div_ceil(1 << 30))]
    TooSmall { size: u64, needed: u64 },
    #[error("Sector size {0} is not supported (512 or 4096)")]
    SectorSize(u64),
    #[error("The disk has no {0} partition")]
    Missing(&'static str),
    #[error("The {0} file is {1} bytes; its partition holds {2}")]
    DoesNotFit(&'static str, u64, u64),
    #[error("{0} is not a GRUB image this installer knows: {1}")]
    BadImage(&'static str, &'static str),
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    #[error("Cannot access the EFI system partition")]
    Esp(#[source] io::Error),
    #[error(transparent)]
    Env(#[from] grubenv::Error),
    #[error(transparent)]
    Slots(#[from] crate::slots::Error),
    #[error("Disk I/O failed")]
    Io(#[from] io::Error),
}

/// Where every partition of the layout lies on one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The disk's size in bytes.
    pub size_bytes: u64,
    /// Its logical sector size.
    pub sector: u64,
    extents: [Extent; 7],
}

impl Layout {
    /// The layout on a disk of `size_bytes` with `sector`-byte sectors.
    pub fn for_disk(size_bytes: u64, sector: u64) -> Result<Layout, DiskError> {
        if sector != 512 && sector != 4096 {
            return Err(DiskError::SectorSize(sector));
        }
        let too_small = DiskError::TooSmall {
            size: size_bytes,
            needed: Self::min_disk_size(),
        };
        let (_, last_usable) =
            gpt::usable_range(size_bytes / sector, sector).map_err(|_| too_small)?;
        let data_end = ((last_usable + 1) * sector / MIB) * MIB;
        let mut extents = [Extent { offset: 0, len: 0 }; 7];
        let mut next = MIB;
        for (i, part) in Part::ALL.iter().enumerate() {
            let len = part.size().unwrap_or(data_end.saturating_sub(next));
            extents[i] = Extent { offset: next, len };
            next += len;
        }
        if extents[6].len < MIN_DATA_SIZE {
            return Err(DiskError::TooSmall {
                size: size_bytes,
                needed: Self::min_disk_size(),
            });
        }
        Ok(Layout {
            size_bytes,
            sector,
            extents,
        })
    }

    /// The smallest disk that takes the layout: 1 MiB, the fixed partitions, the smallest data
    /// partition, and 1 MiB for the backup table.
    pub fn min_disk_size() -> u64 {
        let fixed: u64 = Part::ALL.iter().filter_map(|p| p.size()).sum();
        MIB + fixed + MIN_DATA_SIZE + MIB
    }

    /// Where `part` lies.
    pub fn extent(&self, part: Part) -> Extent {
        let i = Part::ALL.iter().position(|p| *p == part).unwrap_or(0);
        self.extents[i]
    }

    /// The partition table entries; `data` keeps an existing data partition's extent and GUID
    /// (it must start at or after the layout's data start: [`DiskContent::Hvnode`] checks).
    pub fn partitions(&self, data: Option<&Partition>) -> Vec<NewPartition> {
        Part::ALL
            .iter()
            .map(|&part| {
                let e = self.extent(part);
                let mut p = NewPartition {
                    name: part.name().to_owned(),
                    type_guid: gpt::guid_bytes(part.type_guid()).unwrap_or_default(),
                    guid: gpt::random_guid(),
                    first_lba: e.offset / self.sector,
                    last_lba: e.end() / self.sector - 1,
                };
                if let (Part::Data, Some(d)) = (part, data) {
                    p.first_lba = d.first_lba;
                    p.last_lba = d.last_lba;
                    p.guid = gpt::guid_bytes(&d.guid).unwrap_or(p.guid);
                }
                p
            })
            .collect()
    }
}

/// The partition named as `part`'s, if the table has one.
pub fn find_part(parts: &[Partition], part: Part) -> Option<&Partition> {
    parts.iter().find(|p| p.name == part.name())
}

/// Where one slot's files go: its two partitions and the ESP that holds its kernel and initrd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotTarget {
    pub slot: Slot,
    pub root: Extent,
    pub verity: Extent,
    pub esp: Extent,
}

impl SlotTarget {
    /// The slot's partitions in a table read from the disk (found by name).
    pub fn from_table(parts: &[Partition], sector: u64, slot: Slot) -> Result<Self, DiskError> {
        let get = |part: Part| {
            find_part(parts, part)
                .map(|p| Extent::of(p, sector))
                .ok_or(DiskError::Missing(part.name()))
        };
        Ok(SlotTarget {
            slot,
            root: get(Part::Root(slot))?,
            verity: get(Part::Verity(slot))?,
            esp: get(Part::Esp)?,
        })
    }

    /// The slot's partitions in a layout about to be written.
    pub fn from_layout(layout: &Layout, slot: Slot) -> Self {
        SlotTarget {
            slot,
            root: layout.extent(Part::Root(slot)),
            verity: layout.extent(Part::Verity(slot)),
            esp: layout.extent(Part::Esp),
        }
    }

    /// Reads the GPT of `disk` and finds `slot`'s partitions.
    pub fn read(disk: &File, sector: u64, slot: Slot) -> Result<Self, DiskError> {
        let size = disk_size(disk)?;
        let parts = gpt::read(&mut Window::whole(disk, size), size, sector)?;
        Self::from_table(&parts, sector, slot)
    }
}

/// The size of a disk or image file: its length (block devices report it by seeking).
pub fn disk_size(disk: &File) -> io::Result<u64> {
    let mut f = disk;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// A byte range of a disk as a file of its own: what `fatfs` and the GPT code read and write.
/// Positional I/O, so several windows over one `File` do not disturb each other.
#[derive(Debug)]
pub struct Window<'a> {
    file: &'a File,
    extent: Extent,
    pos: u64,
}

impl<'a> Window<'a> {
    /// `extent` of `file`.
    pub fn new(file: &'a File, extent: Extent) -> Self {
        Window {
            file,
            extent,
            pos: 0,
        }
    }

    /// The whole of a disk of `size` bytes.
    pub fn whole(file: &'a File, size: u64) -> Self {
        Self::new(
            file,
            Extent {
                offset: 0,
                len: size,
            },
        )
    }

    fn room(&self, want: usize) -> usize {
        (self.extent.len.saturating_sub(self.pos)).min(want as u64) as usize
    }
}

impl Read for Window<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        let n = self
            .file
            .read_at(&mut buf[..n], self.extent.offset + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Window<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        let n = self
            .file
            .write_at(&buf[..n], self.extent.offset + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Window<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.extent.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(n) if n <= self.extent.len => {
                self.pos = n;
                Ok(n)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the partition",
            )),
        }
    }
}

/// The EFI system partition, opened with `fatfs` on its raw bytes.
pub struct Esp<'a> {
    fs: fatfs::FileSystem<Window<'a>>,
}

impl std::fmt::Debug for Esp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Esp").finish_non_exhaustive()
    }
}

/// Every time stamp on the ESP is 1980-01-01 00:00, the first DOS date: the files' times mean
/// nothing to the boot, and a fixed one keeps installs alike (fatfs without a clock would write
/// the invalid date 0).
#[derive(Debug)]
struct FixedTime;

const DOS_EPOCH: fatfs::Date = fatfs::Date {
    year: 1980,
    month: 1,
    day: 1,
};

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        DOS_EPOCH
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: DOS_EPOCH,
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

fn fat_path(path: &str) -> &str {
    path.trim_start_matches('/')
}

impl<'a> Esp<'a> {
    /// Makes an empty FAT32 filesystem labelled [`ESP_LABEL`] on `extent`.
    pub fn format(disk: &File, extent: Extent, volume_id: u32) -> Result<(), DiskError> {
        let mut label = [b' '; 11];
        label[..ESP_LABEL.len()].copy_from_slice(ESP_LABEL.as_bytes());
        let opts = fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_cluster(2048)
            .volume_label(label)
            .volume_id(volume_id);
        fatfs::format_volume(Window::new(disk, extent), opts).map_err(DiskError::Esp)
    }

    /// Opens the FAT filesystem on `extent`.
    pub fn open(disk: &'a File, extent: Extent) -> Result<Self, DiskError> {
        let opts = fatfs::FsOptions::new()
            .update_accessed_date(false)
            .time_provider(&FIXED_TIME);
        let fs = fatfs::FileSystem::new(Window::new(disk, extent), opts).map_err(DiskError::Esp)?;
        Ok(Esp { fs })
    }

    /// Creates `dir` and its parents.
    pub fn create_dirs(&self, dir: &str) -> Result<(), DiskError> {
        let mut d = self.fs.root_dir();
        for part in fat_path(dir).split('/').filter(|p| !p.is_empty()) {
            d = d.create_dir(part).map_err(DiskError::Esp)?;
        }
        Ok(())
    }

    /// Writes `data` as `path` (replacing any file there), creating its directory.
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<(), DiskError> {
        let path = fat_path(path);
        if let Some((dir, _)) = path.rsplit_once('/') {
            self.create_dirs(dir)?;
        }
        let mut f = self
            .fs
            .root_dir()
            .create_file(path)
            .map_err(DiskError::Esp)?;
        f.truncate().map_err(DiskError::Esp)?;
        f.write_all(data).map_err(DiskError::Esp)?;
        f.flush().map_err(DiskError::Esp)
    }

    /// Overwrites the existing file `path` from its first byte without freeing its clusters:
    /// what GRUB's `save_env` does to the environment block.
    fn overwrite_in_place(&self, path: &str, data: &[u8]) -> Result<(), DiskError> {
        let mut f = self
            .fs
            .root_dir()
            .open_file(fat_path(path))
            .map_err(DiskError::Esp)?;
        f.write_all(data).map_err(DiskError::Esp)?;
        f.flush().map_err(DiskError::Esp)
    }

    /// The content of `path`.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, DiskError> {
        let mut f = self
            .fs
            .root_dir()
            .open_file(fat_path(path))
            .map_err(DiskError::Esp)?;
        let mut out = Vec::new();
        f.read_to_end(&mut out).map_err(DiskError::Esp)?;
        Ok(out)
    }

    /// Whether `path` exists.
    pub fn exists(&self, path: &str) -> bool {
        self.fs.root_dir().open_file(fat_path(path)).is_ok()
    }

    /// Removes `path`; a missing file is not an error.
    pub fn remove(&self, path: &str) -> Result<(), DiskError> {
        match self.fs.root_dir().remove(fat_path(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DiskError::Esp(e)),
            _ => Ok(()),
        }
    }

    /// Renames `from` to `to` in the same directory, replacing `to`.
    pub fn replace(&self, from: &str, to: &str) -> Result<(), DiskError> {
        self.remove(to)?;
        let root = self.fs.root_dir();
        root.rename(fat_path(from), &root, fat_path(to))
            .map_err(DiskError::Esp)
    }

    /// The environment block. If the block does not parse but a complete `grubenv.new` does (a
    /// power cut while the block was overwritten), that one.
    pub fn load_env(&self) -> Result<GrubEnv, DiskError> {
        let main = self
            .read_file(GRUBENV_PATH)
            .and_then(|b| Ok(GrubEnv::parse(&b)?));
        match main {
            Ok(env) => Ok(env),
            Err(e) => match self.read_file(GRUBENV_NEW_PATH) {
                Ok(b) => GrubEnv::parse(&b).map_err(|_| e),
                Err(_) => Err(e),
            },
        }
    }

    /// Stores the environment block: the whole new block first as `grubenv.new`, then the
    /// block overwritten in place (one 1024-byte write inside one cluster, as GRUB does; the
    /// file keeps its clusters, so GRUB's `save_env` can still write it), then `grubenv.new`
    /// removed. A power cut leaves either block complete somewhere ([`load_env`](Self::load_env)).
    pub fn store_env(&self, env: &GrubEnv) -> Result<(), DiskError> {
        let block = env.to_bytes()?;
        self.write_file(GRUBENV_NEW_PATH, &block)?;
        if self.exists(GRUBENV_PATH) && self.read_file(GRUBENV_PATH)?.len() == block.len() {
            self.overwrite_in_place(GRUBENV_PATH, &block)?;
        } else {
            self.write_file(GRUBENV_PATH, &block)?;
        }
        self.remove(GRUBENV_NEW_PATH)
    }

    /// Writes everything back and closes the filesystem.
    pub fn close(self) -> Result<(), DiskError> {
        self.fs.unmount().map_err(DiskError::Esp)
    }
}

/// Offset in boot.img of the LBA (64-bit little-endian) of core.img's first sector
/// (`GRUB_BOOT_MACHINE_KERNEL_SECTOR`, include/grub/i386/pc/boot.h).
pub const BOOT_IMG_KERNEL_SECTOR: usize = 0x5c;
/// Offset in boot.img of the boot drive; 0xff means "the drive the BIOS booted from"
/// (`GRUB_BOOT_MACHINE_BOOT_DRIVE`).
pub const BOOT_IMG_BOOT_DRIVE: usize = 0x64;
/// Offset in boot.img of the jump over the workaround for BIOSes that pass a wrong drive;
/// grub-setup turns it into two NOPs on hard disks (`GRUB_BOOT_MACHINE_DRIVE_CHECK`).
pub const BOOT_IMG_DRIVE_CHECK: usize = 0x66;
/// Size of one blocklist entry at the end of core.img's first sector (diskboot.img):
/// start LBA u64, sector count u16, load segment u16, little-endian.
const BLOCKLIST_ENTRY: usize = 12;
/// The segment the sectors after the first are loaded to: GRUB_BOOT_I386_PC_KERNEL_SEG (0x800)
/// plus one sector (diskboot.img itself) in paragraphs.
const CORE_LOAD_SEGMENT: u16 = 0x820;
/// The most sectors diskboot can load below 0x78000 from 0x8200.
pub const CORE_MAX_SECTORS: u64 = (0x78000 - 0x8200) / 512;

/// The MBR boot code: boot.img's first 440 bytes with the fields grub-setup patches: the LBA of
/// core.img, boot drive 0xff, and the drive check jump made NOPs. The protective MBR's entry and
/// signature after byte 440 are the GPT writer's.
pub fn patch_boot_img(
    boot_img: &[u8],
    core_lba: u64,
) -> Result<[u8; gpt::BOOT_CODE_LEN], DiskError> {
    if boot_img.len() != 512 || boot_img[510..512] != [0x55, 0xAA] {
        return Err(DiskError::BadImage(
            "boot.img",
            "not a 512-byte boot sector",
        ));
    }
    let mut code = [0u8; gpt::BOOT_CODE_LEN];
    code.copy_from_slice(&boot_img[..gpt::BOOT_CODE_LEN]);
    code[BOOT_IMG_KERNEL_SECTOR..BOOT_IMG_KERNEL_SECTOR + 8]
        .copy_from_slice(&core_lba.to_le_bytes());
    code[BOOT_IMG_BOOT_DRIVE] = 0xff;
    code[BOOT_IMG_DRIVE_CHECK] = 0x90;
    code[BOOT_IMG_DRIVE_CHECK + 1] = 0x90;
    Ok(code)
}

/// core.img (from `grub-mkimage -O i386-pc`: diskboot.img, then the compressed kernel) as it
/// goes into a BIOS boot partition starting at LBA `core_lba` (512-byte sectors): padded to
/// whole sectors, its blocklist cleared and set to one run of the sectors after the first,
/// from `core_lba + 1`, loaded at segment 0x820, then a zero terminator, as grub-setup does
/// when it embeds core.img.
pub fn patch_core_img(core_img: &[u8], core_lba: u64, room: u64) -> Result<Vec<u8>, DiskError> {
    let mut core = core_img.to_vec();
    core.resize(core.len().div_ceil(512) * 512, 0);
    let sectors = (core.len() / 512) as u64;
    if sectors < 2 {
        return Err(DiskError::BadImage("core.img", "shorter than two sectors"));
    }
    if sectors > CORE_MAX_SECTORS || sectors * 512 > room {
        return Err(DiskError::DoesNotFit(
            "core.img",
            sectors * 512,
            room.min(CORE_MAX_SECTORS * 512),
        ));
    }
    let first = 512 - BLOCKLIST_ENTRY;
    let segment = u16::from_le_bytes([core[first + 10], core[first + 11]]);
    if segment != CORE_LOAD_SEGMENT {
        return Err(DiskError::BadImage(
            "core.img",
            "its first blocklist entry does not load at 0x820 (not an i386-pc image?)",
        ));
    }
    let mut at = first;
    while u16::from_le_bytes([core[at + 8], core[at + 9]]) != 0 {
        core[at..at + BLOCKLIST_ENTRY].fill(0);
        if at < BLOCKLIST_ENTRY + 0x20 {
            return Err(DiskError::BadImage("core.img", "no blocklist terminator"));
        }
        at -= BLOCKLIST_ENTRY;
    }
    core[first..first + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    core[first + 8..first + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    core[first + 10..first + 12].copy_from_slice(&CORE_LOAD_SEGMENT.to_le_bytes());
    core[first - BLOCKLIST_ENTRY..first].fill(0);
    Ok(core)
}

/// What a disk holds, as far as an install is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskContent {
    /// First and last MiB all zero: no table, no filesystem signature.
    Blank,
    /// An hvnode disk: a GPT with our partitions. `data` is the data partition if the layout
    /// can keep it where it is (it starts at or after the layout's data start).
    Hvnode { data: Option<Partition> },
    /// A GPT with an hvnode data partition the layout cannot keep (the live medium's
    /// whole-disk data partition): installing erases it.
    HvnodeData,
    /// Anything else.
    Foreign,
}

impl DiskContent {
    /// The word the API uses.
    pub fn name(&self) -> &'static str {
        match self {
            DiskContent::Blank => "blank",
            DiskContent::Hvnode { .. } => "hvnode",
            DiskContent::HvnodeData => "hvnode-data",
            DiskContent::Foreign => "foreign",
        }
    }
}

/// Reads what `disk` (of `size` bytes, `sector`-byte sectors) holds.
pub fn classify(disk: &File, size: u64, sector: u64) -> io::Result<DiskContent> {
    let check = MIB.min(size) as usize;
    let mut buf = vec![0u8; check];
    disk.read_exact_at(&mut buf, 0)?;
    let head_zero = buf.iter().all(|&b| b == 0);
    disk.read_exact_at(&mut buf, size - check as u64)?;
    if head_zero && buf.iter().all(|&b| b == 0) {
        return Ok(DiskContent::Blank);
    }
    let Ok(parts) = gpt::read(&mut Window::whole(disk, size), size, sector) else {
        return Ok(DiskContent::Foreign);
    };
    let data = find_part(&parts, Part::Data);
    let ours = Part::ALL[..6]
        .iter()
        .all(|&p| find_part(&parts, p).is_some());
    if ours {
        let keep = Layout::for_disk(size, sector).ok().and_then(|l| {
            let start = l.extent(Part::Data).offset / sector;
            data.filter(|d| d.first_lba >= start).cloned()
        });
        return Ok(DiskContent::Hvnode { data: keep });
    }
    Ok(if data.is_some() {
        DiskContent::HvnodeData
    } else {
        DiskContent::Foreign
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn temp_disk(name: &str, size: u64) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!(
            "hvnode-update-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
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
    fn layout_puts_the_partitions_back_to_back_on_mib_boundaries() {
        let size = 4u64 << 30;
        let l = Layout::for_disk(size, 512).expect("layout");
        let mut next = MIB;
        for p in Part::ALL {
            let e = l.extent(p);
            assert_eq!(e.offset, next, "{p:?}");
            assert_eq!(e.offset % MIB, 0);
            assert_eq!(e.len % MIB, 0);
            next = e.end();
        }
        assert_eq!(l.extent(Part::Root(Slot::A)).len, ROOT_SIZE);
        assert!(l.extent(Part::Data).end() <= size - 33 * 512);
        assert!(l.extent(Part::Data).len >= MIN_DATA_SIZE);
    }

    #[test]
    fn refuses_a_disk_too_small_for_the_layout() {
        let min = Layout::min_disk_size();
        assert!(Layout::for_disk(min, 512).is_ok());
        assert!(matches!(
            Layout::for_disk(min - MIB, 512),
            Err(DiskError::TooSmall { .. })
        ));
        assert!(matches!(
            Layout::for_disk(1 << 20, 512),
            Err(DiskError::TooSmall { .. })
        ));
        assert!(matches!(
            Layout::for_disk(4 << 30, 1024),
            Err(DiskError::SectorSize(1024))
        ));
    }

    #[test]
    fn layout_table_is_found_by_name() {
        let size = 4u64 << 30;
        let (path, f) = temp_disk("layout", size);
        let l = Layout::for_disk(size, 512).expect("layout");
        gpt::write(
            &mut Window::whole(&f, size),
            size,
            512,
            &gpt::random_guid(),
            &l.partitions(None),
            None,
        )
        .expect("write");
        let t = SlotTarget::read(&f, 512, Slot::B).expect("slot B");
        assert_eq!(t, SlotTarget::from_layout(&l, Slot::B));
        assert!(matches!(
            classify(&f, size, 512).expect("classify"),
            DiskContent::Hvnode { data: Some(_) }
        ));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn classifies_blank_foreign_and_live_data_disks() {
        let size = 64 * MIB;
        let (path, f) = temp_disk("classify", size);
        assert_eq!(classify(&f, size, 512).expect("blank"), DiskContent::Blank);
        f.write_all_at(b"\xeb\x3c\x90mkfs.fat", 0).expect("write");
        assert_eq!(classify(&f, size, 512).expect("fat"), DiskContent::Foreign);
        let t = gpt::guid_bytes(gpt::LINUX_FS_TYPE).expect("type");
        gpt::write_single(
            &mut Window::whole(&f, size),
            size,
            512,
            DATA_LABEL,
            &t,
            &gpt::random_guid(),
            &gpt::random_guid(),
        )
        .expect("gpt");
        assert_eq!(
            classify(&f, size, 512).expect("data"),
            DiskContent::HvnodeData
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn esp_holds_files_and_the_environment_block() {
        let size = 300 * MIB;
        let (path, f) = temp_disk("esp", size);
        let e = Extent {
            offset: MIB,
            len: ESP_SIZE,
        };
        Esp::format(&f, e, 0x1234_5678).expect("format");
        let esp = Esp::open(&f, e).expect("open");
        esp.write_file("/A/vmlinuz", b"kernel").expect("write");
        assert_eq!(esp.read_file("A/vmlinuz").expect("read"), b"kernel");
        let mut env = GrubEnv::new();
        env.set("A_OK", "1").expect("set");
        esp.store_env(&env).expect("store");
        env.set("A_TRY", "0").expect("set");
        esp.store_env(&env).expect("store again");
        assert!(!esp.exists(GRUBENV_NEW_PATH));
        assert_eq!(esp.load_env().expect("load"), env);
        esp.close().expect("close");
        let esp = Esp::open(&f, e).expect("reopen");
        assert_eq!(esp.fs.fat_type(), fatfs::FatType::Fat32);
        assert_eq!(esp.fs.volume_label(), ESP_LABEL);
        // A block torn by a power cut: the complete copy is used.
        esp.write_file(GRUBENV_NEW_PATH, &env.to_bytes().expect("bytes"))
            .expect("new");
        esp.overwrite_in_place(GRUBENV_PATH, b"# GRUB Env")
            .expect("tear");
        assert_eq!(esp.load_env().expect("load"), env);
        let _ = std::fs::remove_file(path);
    }

    fn fake_core_img(sectors: usize) -> Vec<u8> {
        let mut core = vec![0x11u8; sectors * 512 - 100];
        core[500..512].fill(0);
        // grub-mkimage leaves the length of the rest and the load segment in the first entry.
        core[508..510].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
        core[510..512].copy_from_slice(&0x820u16.to_le_bytes());
        core[488..500].fill(0);
        core
    }

    #[test]
    fn core_img_gets_one_run_after_its_first_sector() {
        let core = patch_core_img(&fake_core_img(40), 2048, MIB).expect("patch");
        assert_eq!(core.len(), 40 * 512);
        assert_eq!(
            u64::from_le_bytes(core[500..508].try_into().expect("8")),
            2049
        );
        assert_eq!(u16::from_le_bytes([core[508], core[509]]), 39);
        assert_eq!(u16::from_le_bytes([core[510], core[511]]), 0x820);
        assert!(core[488..500].iter().all(|&b| b == 0));
        assert!(matches!(
            patch_core_img(&fake_core_img(40), 2048, 20 * 512),
            Err(DiskError::DoesNotFit(..))
        ));
        assert!(matches!(
            patch_core_img(&vec![0u8; 4096], 2048, MIB),
            Err(DiskError::BadImage(..))
        ));
    }

    #[test]
    fn boot_img_gets_the_core_lba_boot_drive_and_nops() {
        let mut boot = vec![0xAAu8; 512];
        boot[510] = 0x55;
        boot[511] = 0xAA;
        let code = patch_boot_img(&boot, 2048).expect("patch");
        assert_eq!(
            u64::from_le_bytes(code[0x5c..0x64].try_into().expect("8")),
            2048
        );
        assert_eq!(code[0x64], 0xff);
        assert_eq!(code[0x66..0x68], [0x90, 0x90]);
        assert!(patch_boot_img(&boot[..400], 2048).is_err());
    }
}
