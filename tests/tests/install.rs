//! Install tests: boot the ISO with a blank 4 GiB disk, install onto it through the API
//! (hvnodectl), power off, boot from the disk alone and see the node come up on slot A, with the
//! same verified root as the ISO, and confirm the slot. Once under UEFI (OVMF), once under BIOS
//! (SeaBIOS). Then, with the environment block GRUB leaves after an update to slot B that never
//! confirmed, the node runs slot A and reports the failed update. See docs/install.md.
//!
//! Run with `HVNODE_ISO` (and `HVNODECTL`) set, as root; without the ISO each test says so and
//! returns (fails under CI=true).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hvnode_tests::{
    blank_disk, iso_under_test, repo_root, scratch_dir, Firmware, Medium, Options, Qemu,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(120);
const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

fn hvnodectl(state: &Path, args: &[&str]) -> (bool, String) {
    let bin = std::env::var_os("HVNODECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/hvnodectl"));
    assert!(
        bin.is_file(),
        "{} missing: run cargo build -p hvnodectl",
        bin.display()
    );
    let out = Command::new(&bin)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run hvnodectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(state: &Path, args: &[&str]) -> String {
    let (success, text) = hvnodectl(state, args);
    assert!(success, "hvnodectl {args:?} failed:\n{text}");
    text
}

/// Registers the booted node with a fresh manager, reading the pairing code from the console.
fn register(vm: &mut Qemu, dir: &Path) -> PathBuf {
    let mark = vm.mark();
    vm.send(b"3");
    let screen = vm.wait_screen(mark, "Pairing code", Duration::from_secs(60));
    let line = screen
        .lines()
        .find(|l| l.contains("Pairing code"))
        .unwrap_or_else(|| panic!("no pairing code on the manager screen:\n{screen}"));
    let code = line
        .split(':')
        .nth(1)
        .map(|s| s.split_whitespace().next().unwrap_or_default().to_owned())
        .filter(|c| c.len() == 8)
        .unwrap_or_else(|| panic!("cannot read the pairing code from {line:?}"));
    let state = dir.join("manager");
    let url = format!("https://127.0.0.1:{}", vm.api_port);
    ok(&state, &["init", "--name", "test-manager"]);
    ok(
        &state,
        &["register", "node1", "--url", &url, "--code", &code, "--yes"],
    );
    state
}

/// The root hash the early stage printed (`... (dm-verity, root hash H) ...`).
fn root_hash(serial: &str) -> String {
    serial
        .split("root hash ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_hexdigit()).next())
        .filter(|h| h.len() == 64)
        .unwrap_or_else(|| panic!("no root hash on the console:\n{serial}"))
        .to_owned()
}

fn install_then_boot_from_the_disk(name: &str, firmware: Firmware) {
    let Some(iso) = iso_under_test() else {
        hvnode_base::testing::cannot_run(name, "HVNODE_ISO is not set");
        return;
    };
    let dir = scratch_dir(name);
    let disk = dir.join("disk.raw");
    blank_disk(&disk, 4 << 30);
    let foreign = dir.join("foreign.raw");
    blank_disk(&foreign, 4 << 30);
    std::fs::write(&foreign, b"\xeb\x3c\x90mkfs.fat\0\0").expect("foreign data");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&foreign)
        .and_then(|f| f.set_len(4 << 30))
        .expect("size foreign disk");

    // The live medium, the blank disk (vda) and a disk with foreign data (vdb).
    let mut opts = Options::new(&format!("{name}-iso"), firmware, Medium::Cd);
    opts.disks = vec![disk.clone(), foreign.clone()];
    let mut vm = Qemu::start(&iso, &opts, &dir);
    vm.wait_for("hvnode: ready", BOOT_TIMEOUT);
    let live_hash = root_hash(&vm.serial_text());
    let state = register(&mut vm, &dir);

    let disks = ok(&state, &["node", "install", "node1"]);
    assert!(
        disks.contains("/dev/vda") && disks.contains("blank"),
        "{disks}"
    );
    // Foreign data is not overwritten without the disk's name.
    let (success, text) = hvnodectl(&state, &["node", "install", "node1", "--disk", "/dev/vdb"]);
    assert!(!success && text.contains("confirm"), "{text}");
    let (success, text) = hvnodectl(
        &state,
        &[
            "node",
            "install",
            "node1",
            "--disk",
            "/dev/vdb",
            "--confirm",
            "/dev/vda",
        ],
    );
    assert!(!success && text.contains("not the disk's name"), "{text}");

    let started = std::time::Instant::now();
    let out = ok(&state, &["node", "install", "node1", "--disk", "/dev/vda"]);
    assert!(out.contains("installed on /dev/vda"), "{out}");
    assert!(
        started.elapsed() < INSTALL_TIMEOUT,
        "install took {:?}",
        started.elapsed()
    );
    eprintln!("{name}: installed in {:?}", started.elapsed());
    let status = vm.power_button_and_wait(POWEROFF_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");
    drop(vm);

    // The disk alone.
    let mut opts = Options::new(&format!("{name}-disk"), firmware, Medium::None);
    opts.disks = vec![disk.clone()];
    let vm = Qemu::start(&iso, &opts, &dir);
    vm.wait_for("hvnode: ready", BOOT_TIMEOUT);
    let serial = vm.serial_text();
    assert!(
        serial.contains("from slot A"),
        "not booted from slot A:\n{serial}"
    );
    assert!(
        serial.contains("hvnode: slot A confirmed"),
        "slot A not confirmed:\n{serial}"
    );
    assert_eq!(root_hash(&serial), live_hash, "another root than the ISO's");
    assert!(
        serial.contains("storage: mounted /dev/vda7 at /var/lib/hvnode"),
        "the data partition is not mounted:\n{serial}"
    );
    let mut vm = vm;
    let status = vm.power_button_and_wait(POWEROFF_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");

    // Booting again: slot A again (confirmed, so GRUB does not fall back).
    let mut vm = Qemu::start(&iso, &opts, &dir);
    let mark = vm.mark();
    vm.wait_for_after(mark, "hvnode: slot A confirmed", BOOT_TIMEOUT);
    let status = vm.power_button_and_wait(POWEROFF_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");

    // The block as GRUB leaves it after an update to B that never confirmed: B lost OK, the
    // node runs A and says so.
    set_grubenv(
        &disk,
        &[
            ("ORDER", "B A"),
            ("A_OK", "1"),
            ("A_TRY", "0"),
            ("B_OK", "0"),
            ("B_TRY", "1"),
            ("HVNODE_PENDING", "B"),
        ],
    );
    let mut vm = Qemu::start(&iso, &opts, &dir);
    let text = vm.wait_for("hvnode: ready", BOOT_TIMEOUT);
    assert!(text.contains("from slot A"), "not on slot A:\n{text}");
    assert!(
        text.contains("hvnode: update to slot B failed, running slot A"),
        "the failed update is not reported:\n{text}"
    );
    assert!(text.contains("hvnode: slot A confirmed"), "{text}");
    let status = vm.power_button_and_wait(POWEROFF_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");
}

/// Replaces the ESP's `grubenv` (the ESP starts at 2 MiB) with a block of `vars`, with mtools.
fn set_grubenv(disk: &Path, vars: &[(&str, &str)]) {
    let mut block = String::from("# GRUB Environment Block\n");
    for (k, v) in vars {
        block.push_str(&format!("{k}={v}\n"));
    }
    while block.len() < 1024 {
        block.push('#');
    }
    let file = disk.with_file_name("grubenv");
    std::fs::write(&file, &block).expect("write grubenv");
    let out = Command::new("mcopy")
        .arg("-o")
        .arg("-i")
        .arg(format!("{}@@2M", disk.display()))
        .arg(&file)
        .arg("::/boot/grub/grubenv")
        .output()
        .expect("run mcopy (mtools: image/setup-host.sh)");
    assert!(
        out.status.success(),
        "mcopy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ovmf_installs_onto_a_blank_disk_and_boots_slot_a_from_it() {
    install_then_boot_from_the_disk("install-ovmf", Firmware::Ovmf);
}

#[test]
fn seabios_installs_onto_a_blank_disk_and_boots_slot_a_from_it() {
    install_then_boot_from_the_disk("install-seabios", Firmware::SeaBios);
}
