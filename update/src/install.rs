//! Installing the node onto a disk: the checks (what the disk holds, the admin's confirmation)
//! and the write, in an order that a power cut cannot turn into a disk that boots half a slot.
//!
//! Order of the writes ([`install`]):
//! 1. the old partition table and boot code are zeroed (primary and backup GPT, the MBR): from
//!    here on the firmware finds nothing to boot on the disk;
//! 2. GRUB's core.img into the BIOS boot partition;
//! 3. the ESP is formatted and gets GRUB (UEFI), `grub.cfg`, `grub-ab.cfg`;
//! 4. slot A: root image, hash tree, kernel and initrd ([`SlotWriter`]);
//! 5. the data partition is formatted, unless the disk's existing one is kept;
//! 6. the GPT, with GRUB's boot.img in the MBR (last but one): now the firmware finds the ESP
//!    and the BIOS boot code, but the ESP has no `grubenv` yet;
//! 7. `grubenv` with slot A good (last).
//!
//! Before 6 the disk boots nothing. Between 6 and 7, GRUB finds no `grubenv`, so
//! `grub-ab.cfg` falls back to the first slot of its default order, A, which is complete by
//! then; the node's first confirmation then writes the block. A power cut never leaves a disk
//! that boots an incomplete slot.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::bundle::Role;
use crate::disk::{
    self, DiskContent, DiskError, Esp, Extent, Layout, Part, SlotTarget, DISK_GRUB_CFG,
    EFI_LOADER_PATH, GRUB_AB_PATH, GRUB_CFG_PATH,
};
use crate::gpt::{self, Partition};
use crate::slot::{SlotSources, SlotWriter};
use crate::slots::{AbState, Slot, GRUB_SCRIPT};

/// Where the image build puts the boot loader files in the root.
pub const BOOT_FILES_DIR: &str = "/usr/lib/hvnode/boot";

/// GRUB as the image build made it.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// x86_64-efi GRUB with its embedded early config, as `/EFI/BOOT/BOOTX64.EFI`.
    pub efi: PathBuf,
    /// i386-pc core.img with its embedded early config.
    pub core_img: PathBuf,
    /// i386-pc boot.img, the MBR code.
    pub boot_img: PathBuf,
}

impl BootFiles {
    /// The files in `dir` (`BOOTX64.EFI`, `core.img`, `boot.img`).
    pub fn in_dir(dir: &Path) -> Self {
        BootFiles {
            efi: dir.join("BOOTX64.EFI"),
            core_img: dir.join("core.img"),
            boot_img: dir.join("boot.img"),
        }
    }
}

/// A step of the install, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Preparing,
    Bootloader,
    Esp,
    Root,
    Verity,
    Kernel,
    Initrd,
    Data,
    PartitionTable,
    BootState,
}

impl Stage {
    /// The word progress reports use.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Preparing => "preparing",
            Stage::Bootloader => "bootloader",
            Stage::Esp => "esp",
            Stage::Root => "root",
            Stage::Verity => "verity",
            Stage::Kernel => "kernel",
            Stage::Initrd => "initrd",
            Stage::Data => "data",
            Stage::PartitionTable => "partition-table",
            Stage::BootState => "boot-state",
        }
    }
}

/// The disk an install is asked to write.
#[derive(Debug, Clone)]
pub struct TargetDisk {
    /// The device, `/dev/vdb`.
    pub device: String,
    pub size_bytes: u64,
    pub sector: u64,
    pub content: DiskContent,
    /// It holds the medium the node runs from.
    pub boot_medium: bool,
    pub read_only: bool,
}

/// Why an install was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0} is the boot medium the node runs from; installing onto it destroys the running system. To do it anyway, confirm with the disk's name ({0})")]
    BootMedium(String),
    #[error(
        "{0} holds {1}; installing erases it. To go ahead, confirm with the disk's name ({0})"
    )]
    NotOurs(String, &'static str),
    #[error("The confirmation {given:?} is not the disk's name {device}")]
    ConfirmMismatch { device: String, given: String },
    #[error("{0} is read-only")]
    ReadOnly(String),
    #[error("Cannot install onto {0}")]
    Disk(String, #[source] DiskError),
    #[error("Cannot read {0}")]
    Source(PathBuf, #[source] io::Error),
    #[error("Cannot format the data partition")]
    Data(#[source] io::Error),
}

impl InstallError {
    /// Whether the admin's confirmation would allow it (409), rather than a request that can
    /// never work (422) or a failure (500).
    pub fn needs_confirmation(&self) -> bool {
        matches!(
            self,
            InstallError::BootMedium(_) | InstallError::NotOurs(..)
        )
    }

    /// Whether the request itself is wrong (422).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            InstallError::ConfirmMismatch { .. }
                | InstallError::ReadOnly(_)
                | InstallError::Disk(_, DiskError::TooSmall { .. } | DiskError::SectorSize(_))
        )
    }
}

/// `vdb`, `/dev/vdb`: the kernel name.
pub fn short_name(device: &str) -> &str {
    device.strip_prefix("/dev/").unwrap_or(device)
}

/// What an install onto `target` will do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub device: String,
    pub layout: Layout,
    /// The disk's data partition, kept as it is; `None`: a new one is made.
    pub keep_data: Option<Partition>,
}

/// Decides whether `target` may be installed onto: a blank disk or an hvnode disk as it is; the
/// boot medium, or a disk holding anything else (including a data partition the layout cannot
/// keep), only if `confirm` is the disk's name (`vdb` or `/dev/vdb`).
pub fn plan(target: &TargetDisk, confirm: Option<&str>) -> Result<Plan, InstallError> {
    let device = target.device.clone();
    let confirmed = match confirm {
        None => false,
        Some(c) if short_name(c) == short_name(&device) => true,
        Some(c) => {
            return Err(InstallError::ConfirmMismatch {
                device,
                given: c.to_owned(),
            })
        }
    };
    if target.read_only {
        return Err(InstallError::ReadOnly(device));
    }
    let layout = Layout::for_disk(target.size_bytes, target.sector)
        .map_err(|e| InstallError::Disk(device.clone(), e))?;
    if target.boot_medium && !confirmed {
        return Err(InstallError::BootMedium(device));
    }
    let keep_data = match &target.content {
        DiskContent::Blank => None,
        DiskContent::Hvnode { data } => data.clone(),
        DiskContent::HvnodeData if !confirmed => {
            return Err(InstallError::NotOurs(
                device,
                "an hvnode data partition that the installed layout cannot keep",
            ))
        }
        DiskContent::Foreign if !confirmed => {
            return Err(InstallError::NotOurs(
                device,
                "data that is not hvnode's (a partition table or filesystem)",
            ))
        }
        DiskContent::HvnodeData | DiskContent::Foreign => None,
    };
    Ok(Plan {
        device,
        layout,
        keep_data,
    })
}

/// Writes the whole installation onto `disk` (opened read-write) as `plan` says, in the order
/// of the module documentation. `format_data(disk, extent)` makes the data partition's
/// filesystem (mkfs.ext4 on a node, something cheap in tests); `progress(stage, percent)`
/// reports the stage and the overall percentage.
pub fn install(
    disk: &File,
    plan: &Plan,
    sources: &SlotSources,
    boot: &BootFiles,
    format_data: &mut dyn FnMut(&File, Extent) -> io::Result<()>,
    progress: &mut dyn FnMut(Stage, u8),
) -> Result<(), InstallError> {
    let derr = |e: DiskError| InstallError::Disk(plan.device.clone(), e);
    let ioerr = |e: io::Error| InstallError::Disk(plan.device.clone(), DiskError::Io(e));
    let layout = &plan.layout;
    let read = |p: &Path| std::fs::read(p).map_err(|e| InstallError::Source(p.to_owned(), e));

    // Everything is read and checked before the first byte is written.
    progress(Stage::Preparing, 0);
    let efi = read(&boot.efi)?;
    let bios = layout.extent(Part::BiosBoot);
    let core =
        disk::patch_core_img(&read(&boot.core_img)?, bios.offset / 512, bios.len).map_err(derr)?;
    let boot_code =
        disk::patch_boot_img(&read(&boot.boot_img)?, bios.offset / 512).map_err(derr)?;
    let mut total = 0;
    for p in [
        &sources.root,
        &sources.verity,
        &sources.kernel,
        &sources.initrd,
    ] {
        total += std::fs::metadata(p)
            .map_err(|e| InstallError::Source(p.clone(), e))?
            .len();
    }

    // 1. No table, no boot code: the disk boots nothing until step 6.
    let tail = (gpt::ENTRIES * 128 + layout.sector).min(layout.size_bytes);
    let zeros = vec![0u8; disk::MIB as usize];
    disk.write_all_at(&zeros, 0).map_err(ioerr)?;
    disk.write_all_at(&zeros[..tail as usize], layout.size_bytes - tail)
        .map_err(ioerr)?;
    disk.sync_data().map_err(ioerr)?;

    progress(Stage::Bootloader, 2);
    disk.write_all_at(&core, bios.offset).map_err(ioerr)?;

    progress(Stage::Esp, 3);
    let esp_extent = layout.extent(Part::Esp);
    Esp::format(disk, esp_extent, volume_id(&gpt::random_guid())).map_err(derr)?;
    let esp = Esp::open(disk, esp_extent).map_err(derr)?;
    esp.write_file(EFI_LOADER_PATH, &efi).map_err(derr)?;
    esp.write_file(GRUB_CFG_PATH, DISK_GRUB_CFG.as_bytes())
        .map_err(derr)?;
    esp.write_file(GRUB_AB_PATH, GRUB_SCRIPT.as_bytes())
        .map_err(derr)?;
    for slot in Slot::ALL {
        esp.create_dirs(slot.name()).map_err(derr)?;
    }
    esp.close().map_err(derr)?;

    let mut before = 0;
    let writer = SlotWriter::new(
        disk.try_clone().map_err(ioerr)?,
        SlotTarget::from_layout(layout, Slot::A),
    );
    writer
        .write_files(sources, &mut |role, done, size| {
            let stage = match role {
                Role::Root => Stage::Root,
                Role::Verity => Stage::Verity,
                Role::Kernel => Stage::Kernel,
                Role::Initrd => Stage::Initrd,
            };
            let pct = 5 + (before + done) * 80 / total.max(1);
            progress(stage, pct.min(85) as u8);
            if done == size {
                before += size;
            }
        })
        .map_err(derr)?;

    progress(Stage::Data, 86);
    if plan.keep_data.is_none() {
        format_data(disk, layout.extent(Part::Data)).map_err(InstallError::Data)?;
    }

    progress(Stage::PartitionTable, 95);
    let parts = layout.partitions(plan.keep_data.as_ref());
    let mut w = disk::Window::whole(disk, layout.size_bytes);
    gpt::write(
        &mut w,
        layout.size_bytes,
        layout.sector,
        &gpt::random_guid(),
        &parts,
        Some(&boot_code),
    )
    .map_err(|e| derr(e.into()))?;
    disk.sync_all().map_err(ioerr)?;

    progress(Stage::BootState, 98);
    let esp = Esp::open(disk, esp_extent).map_err(derr)?;
    esp.store_env(AbState::installed(Slot::A).env())
        .map_err(derr)?;
    esp.close().map_err(derr)?;
    disk.sync_all().map_err(ioerr)?;
    progress(Stage::BootState, 100);
    Ok(())
}

fn volume_id(g: &[u8; 16]) -> u32 {
    u32::from_le_bytes([g[0], g[1], g[2], g[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::classify;

    fn target(content: DiskContent) -> TargetDisk {
        TargetDisk {
            device: "/dev/vdb".into(),
            size_bytes: 4 << 30,
            sector: 512,
            content,
            boot_medium: false,
            read_only: false,
        }
    }

    #[test]
    fn blank_and_hvnode_disks_need_no_confirmation() {
        assert!(plan(&target(DiskContent::Blank), None)
            .expect("blank")
            .keep_data
            .is_none());
        assert!(plan(&target(DiskContent::Hvnode { data: None }), None).is_ok());
    }

    #[test]
    fn foreign_data_needs_the_disks_name() {
        for content in [DiskContent::Foreign, DiskContent::HvnodeData] {
            let t = target(content);
            let e = plan(&t, None).expect_err("refused");
            assert!(e.needs_confirmation(), "{e}");
            assert!(e.to_string().contains("/dev/vdb"), "{e}");
            let e = plan(&t, Some("/dev/vda")).expect_err("wrong name");
            assert!(e.is_invalid_request(), "{e}");
            assert!(plan(&t, Some("vdb")).is_ok());
            assert!(plan(&t, Some("/dev/vdb")).is_ok());
        }
    }

    #[test]
    fn the_boot_medium_needs_the_disks_name() {
        let mut t = target(DiskContent::Foreign);
        t.boot_medium = true;
        let e = plan(&t, None).expect_err("refused");
        assert!(matches!(e, InstallError::BootMedium(_)), "{e}");
        assert!(plan(&t, Some("vdb")).is_ok());
    }

    #[test]
    fn small_or_read_only_disks_are_refused_even_when_confirmed() {
        let mut t = target(DiskContent::Blank);
        t.size_bytes = 2 << 30;
        let e = plan(&t, Some("vdb")).expect_err("small");
        assert!(
            e.is_invalid_request() && e.to_string().contains("vdb"),
            "{e}"
        );
        let mut t = target(DiskContent::Blank);
        t.read_only = true;
        assert!(plan(&t, None).expect_err("ro").is_invalid_request());
    }

    fn boot_files(dir: &Path) -> BootFiles {
        std::fs::create_dir_all(dir).expect("mkdir");
        let b = BootFiles::in_dir(dir);
        std::fs::write(&b.efi, b"MZ efi grub").expect("efi");
        let mut core = vec![0x11u8; 60 * 512];
        core[488..512].fill(0);
        core[508..510].copy_from_slice(&59u16.to_le_bytes());
        core[510..512].copy_from_slice(&0x820u16.to_le_bytes());
        std::fs::write(&b.core_img, core).expect("core");
        let mut boot = vec![0xEBu8; 512];
        boot[510..512].copy_from_slice(&[0x55, 0xAA]);
        std::fs::write(&b.boot_img, boot).expect("boot");
        b
    }

    fn sources(dir: &Path) -> SlotSources {
        let s = SlotSources::live_medium(dir);
        std::fs::create_dir_all(dir.join("live")).expect("mkdir");
        std::fs::create_dir_all(dir.join("boot")).expect("mkdir");
        std::fs::write(&s.root, vec![0x5au8; 2 << 20]).expect("root");
        std::fs::write(&s.verity, vec![0xa5u8; 4096]).expect("verity");
        std::fs::write(&s.kernel, b"kernel").expect("kernel");
        std::fs::write(&s.initrd, b"initrd").expect("initrd");
        s
    }

    fn image(name: &str, size: u64) -> (PathBuf, File) {
        let path =
            std::env::temp_dir().join(format!("hvnode-install-{name}-{}", std::process::id()));
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
    fn installs_a_blank_image_and_reinstalls_keeping_the_data_partition() {
        let size = 4u64 << 30;
        let (path, f) = image("full", size);
        let dir = path.with_extension("src");
        let s = sources(&dir);
        let b = boot_files(&dir.join("bootfiles"));
        let mut t = target(classify(&f, size, 512).expect("classify"));
        assert_eq!(t.content, DiskContent::Blank);
        let p = plan(&t, None).expect("plan");
        let mut formatted = Vec::new();
        let mut stages = Vec::new();
        install(
            &f,
            &p,
            &s,
            &b,
            &mut |disk, e| {
                formatted.push(e);
                disk.write_all_at(b"ext4 here", e.offset + 1024)
            },
            &mut |stage, pct| stages.push((stage, pct)),
        )
        .expect("install");
        assert_eq!(formatted, vec![p.layout.extent(Part::Data)]);
        assert_eq!(stages.last(), Some(&(Stage::BootState, 100)));
        assert!(stages.windows(2).all(|w| w[0].1 <= w[1].1), "{stages:?}");

        // The table, found by name; slot A's files; boot code; the boot state.
        let parts = gpt::read(&mut disk::Window::whole(&f, size), size, 512).expect("gpt");
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            Part::ALL.iter().map(|p| p.name()).collect::<Vec<_>>()
        );
        let bios = disk::find_part(&parts, Part::BiosBoot).expect("bios");
        assert_eq!(bios.type_guid, disk::BIOS_BOOT_TYPE);
        let mut mbr = [0u8; 512];
        f.read_exact_at(&mut mbr, 0).expect("mbr");
        assert_eq!(
            u64::from_le_bytes(mbr[0x5c..0x64].try_into().expect("8")),
            bios.first_lba
        );
        assert_eq!(mbr[510..512], [0x55, 0xAA]);
        let mut core_first = [0u8; 512];
        f.read_exact_at(&mut core_first, bios.offset(512))
            .expect("core");
        assert_eq!(
            u64::from_le_bytes(core_first[500..508].try_into().expect("8")),
            bios.first_lba + 1
        );
        let target_a = SlotTarget::read(&f, 512, Slot::A).expect("slot A");
        let mut root = vec![0u8; 2 << 20];
        f.read_exact_at(&mut root, target_a.root.offset)
            .expect("root");
        assert!(root.iter().all(|&x| x == 0x5a));
        let esp = Esp::open(&f, target_a.esp).expect("esp");
        assert_eq!(esp.read_file("A/vmlinuz").expect("kernel"), b"kernel");
        assert_eq!(esp.read_file(EFI_LOADER_PATH).expect("efi"), b"MZ efi grub");
        assert_eq!(
            esp.read_file(GRUB_AB_PATH).expect("ab"),
            GRUB_SCRIPT.as_bytes()
        );
        assert!(
            String::from_utf8(esp.read_file(GRUB_CFG_PATH).expect("cfg"))
                .expect("utf8")
                .contains("hvnode.slot=")
        );
        let state = AbState::from_env(esp.load_env().expect("env")).expect("state");
        assert_eq!(state.order().expect("order"), [Slot::A, Slot::B]);
        assert!(state.ok(Slot::A).expect("ok"));
        assert!(!state.ok(Slot::B).expect("ok"));
        esp.close().expect("close");

        // Reinstalling: an hvnode disk, its data partition kept and not formatted.
        t.content = classify(&f, size, 512).expect("classify");
        let DiskContent::Hvnode { data: Some(data) } = &t.content else {
            panic!("{:?}", t.content);
        };
        let data = data.clone();
        let p = plan(&t, None).expect("plan");
        install(
            &f,
            &p,
            &s,
            &b,
            &mut |_, _| panic!("formatted"),
            &mut |_, _| {},
        )
        .expect("again");
        let parts = gpt::read(&mut disk::Window::whole(&f, size), size, 512).expect("gpt");
        assert_eq!(disk::find_part(&parts, Part::Data), Some(&data));
        let mut ext4 = [0u8; 9];
        f.read_exact_at(&mut ext4, data.offset(512) + 1024)
            .expect("data");
        assert_eq!(&ext4, b"ext4 here");
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_missing_source_fails_before_the_disk_is_touched() {
        let size = 4u64 << 30;
        let (path, f) = image("missing", size);
        f.write_all_at(b"keep me", 0).expect("write");
        let dir = path.with_extension("src");
        let s = sources(&dir);
        std::fs::remove_file(&s.initrd).expect("rm");
        let b = boot_files(&dir.join("bootfiles"));
        let p = plan(&target(DiskContent::Foreign), Some("vdb")).expect("plan");
        let e = install(&f, &p, &s, &b, &mut |_, _| Ok(()), &mut |_, _| {}).expect_err("fails");
        assert!(matches!(e, InstallError::Source(..)), "{e}");
        let mut head = [0u8; 7];
        f.read_exact_at(&mut head, 0).expect("read");
        assert_eq!(&head, b"keep me");
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir_all(dir);
    }
}
