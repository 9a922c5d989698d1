//! Measures what an update costs on a node's disk, with the image build's real files:
//! - `bundle_mib`: the size of `build/hvnode.hvb`;
//! - `install_ms`: the installer laying out a 4 GiB disk image and writing slot A from the
//!   build's root, hash tree, kernel, initrd and GRUB images (median of 3);
//! - `slot_write_ms` and `slot_write_mib_s`: the bundle read, its signature checked, and its
//!   files written into slot B while they are hashed, as `PUT /v1/node/update` does (median of 5).
//!
//! The disk image lives in the temp directory (tmpfs or the page cache): these are the CPU's and
//! the format's costs, not a disk's. Run after `image/build.sh` (as root, which made the files):
//! `cargo run --release -p hvnode-bench-update-slot [BUILD_DIR] [RELEASE_KEY.pub]`.
#![forbid(unsafe_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hvnode_bench_common::median;
use hvnode_update::bundle::{BundleReader, Policy};
use hvnode_update::disk::{DiskContent, SlotTarget};
use hvnode_update::install::{self, BootFiles, TargetDisk};
use hvnode_update::keys;
use hvnode_update::slot::{SlotSources, SlotWriter};
use hvnode_update::slots::Slot;

const DISK_BYTES: u64 = 4 << 30;

fn fresh_disk(path: &Path) -> File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.set_len(DISK_BYTES).expect("size the disk image");
    f
}

fn main() {
    let mut args = std::env::args().skip(1);
    let build = PathBuf::from(args.next().unwrap_or_else(|| "build".into()));
    let pubkey = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/var/cache/hvnode/release-dev.key.pub".into()),
    );
    let bundle = build.join("hvnode.hvb");
    let sources = SlotSources::live_medium(&build.join("iso"));
    let boot = BootFiles::in_dir(&build.join("rootfs-extra/usr/lib/hvnode/boot"));
    let trusted = vec![keys::read_public(&pubkey).expect("the release key's public half")];
    let disk_path = std::env::temp_dir().join(format!("hvnode-bench-disk-{}", std::process::id()));

    let size = std::fs::metadata(&bundle)
        .unwrap_or_else(|e| panic!("{}: {e} (run image/build.sh first)", bundle.display()))
        .len();
    println!("bundle_mib {:.1}", size as f64 / (1 << 20) as f64);

    let mut install_ms = Vec::new();
    for _ in 0..3 {
        let f = fresh_disk(&disk_path);
        let target = TargetDisk {
            device: disk_path.display().to_string(),
            size_bytes: DISK_BYTES,
            sector: 512,
            content: DiskContent::Blank,
            boot_medium: false,
            read_only: false,
        };
        let plan = install::plan(&target, None).expect("plan");
        let t = Instant::now();
        install::install(
            &f,
            &plan,
            &sources,
            &boot,
            &mut |_, _| Ok(()),
            &mut |_, _| {},
        )
        .expect("install");
        f.sync_all().expect("sync");
        install_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!("install_ms {:.0}", median(install_ms));

    let mut write_ms = Vec::new();
    let mut payload = 0;
    for _ in 0..5 {
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk_path)
            .expect("disk image");
        let target = SlotTarget::read(&disk, 512, Slot::B).expect("slot B");
        let t = Instant::now();
        let input = std::io::BufReader::new(File::open(&bundle).expect("bundle"));
        let policy = Policy {
            trusted: &trusted,
            running: None,
            force: false,
        };
        let reader = BundleReader::open(input, &policy).expect("bundle verifies");
        payload = reader.manifest().payload_size();
        let mut sink = SlotWriter::new(disk, target);
        reader.unpack(&mut sink).expect("unpack");
        write_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let ms = median(write_ms);
    println!("slot_write_ms {ms:.0}");
    println!(
        "slot_write_mib_s {:.0}",
        payload as f64 / (1 << 20) as f64 / (ms / 1000.0)
    );
    let _ = std::fs::remove_file(&disk_path);
}
