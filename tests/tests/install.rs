//! Install tests: boot the ISO with a blank 4 GiB disk, install onto it through the API
//! (hvnodectl), power off, boot from the disk alone and see the node come up on slot A, with the
//! same verified root as the ISO, and confirm the slot. Once under UEFI (OVMF), once under BIOS
//! (SeaBIOS). Each node then takes an update to the next release (slot B, after a reboot) and
//! an update whose slot cannot boot, from which it falls back to slot B by itself. See
//! docs/install.md and docs/update.md.
//!
//! Run with `HVNODE_ISO` (and `HVNODECTL`) set, as root; without the ISO each test says so and
//! returns (fails under CI=true).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hvnode_tests::{
    blank_disk, hvnodectl, iso_under_test, ok, scratch_dir, Firmware, Medium, Options, Qemu,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(120);
const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

/// Registers the booted node with a fresh manager (state in `dir/manager`), reading the
/// pairing code from the console.
fn register(vm: &mut Qemu, dir: &Path, manager: &str) -> PathBuf {
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
    let state = dir.join(manager);
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

fn install_then_boot_from_the_disk(name: &str, firmware: Firmware, update: bool) {
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
    let state = register(&mut vm, &dir, "manager");

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
    if update {
        update_then_fall_back(&mut vm, &iso, &dir);
    }
    let status = vm.power_button_and_wait(POWEROFF_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");
}

/// The bundle of a newer release the test command builds beside the ISO
/// (`HVNODE_VERSION=0.1.1 image/build.sh`, kept as `update-next.hvb`).
fn next_bundle(iso: &Path) -> Option<PathBuf> {
    std::env::var_os("HVNODE_UPDATE_BUNDLE")
        .map(PathBuf::from)
        .or_else(|| iso.parent().map(|d| d.join("update-next.hvb")))
        .filter(|p| p.is_file())
}

/// The release version in a bundle's manifest, as `hvnode-bundle show` would print it.
fn bundle_version(bundle: &Path) -> String {
    let mut f = std::fs::File::open(bundle).expect("open bundle");
    let header = hvnode_update::bundle::Header::read(&mut f).expect("bundle header");
    header.manifest().expect("bundle manifest").version
}

/// A bundle signed with the build's release key whose slot cannot boot: the ISO's files with
/// every byte of the hash tree flipped, so that dm-verity refuses the root.
fn broken_bundle(iso: &Path, dir: &Path) -> PathBuf {
    let build = iso.parent().expect("ISO directory");
    let cache = std::env::var_os("HVNODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/hvnode"));
    let key_path = std::env::var_os("HVNODE_RELEASE_KEY")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("release-dev.key"));
    let key = hvnode_update::keys::read_private(&key_path)
        .unwrap_or_else(|e| panic!("the release key {}: {e}", key_path.display()));
    let files = build.join("iso");
    let mut verity = std::fs::read(files.join("live/root.verity")).expect("hash tree");
    for b in verity.iter_mut().skip(4096) {
        *b ^= 0xff;
    }
    let broken = dir.join("broken.verity");
    std::fs::write(&broken, verity).expect("write the broken tree");
    let root_hash = std::fs::read_to_string(build.join("root-hash")).expect("root-hash");
    let out = dir.join("broken.hvb");
    let mut f = std::fs::File::create(&out).expect("bundle file");
    use hvnode_update::bundle::{BundleWriter, Role};
    BundleWriter::new("1.0.0", 1_700_000_000, root_hash.trim())
        .expect("writer")
        .file(Role::Root, &files.join("live/root.squashfs"))
        .file(Role::Verity, &broken)
        .file(Role::Kernel, &files.join("boot/vmlinuz"))
        .file(Role::Initrd, &files.join("boot/initrd.img"))
        .write(&key, &mut f)
        .expect("write the bundle");
    out
}

/// On a node installed on slot A: an update to the next release goes to slot B and boots
/// there; an update whose slot cannot boot (its hash tree broken) is tried once, and the node
/// comes back on slot B by itself and says so.
fn update_then_fall_back(vm: &mut Qemu, iso: &Path, dir: &Path) {
    let Some(next) = next_bundle(iso) else {
        hvnode_base::testing::cannot_run(
            "update",
            "no update-next.hvb beside the ISO (the test command builds it) and no HVNODE_UPDATE_BUNDLE",
        );
        return;
    };
    let next_version = bundle_version(&next);
    // The installed node's state (its registration) lives on the disk's data partition.
    let state = register(vm, dir, "manager-installed");
    let slots = ok(&state, &["node", "slots", "node1"]);
    assert!(slots.contains("from slot A (confirmed)"), "{slots}");

    let out = ok(
        &state,
        &["node", "update", "node1", &next.display().to_string()],
    );
    assert!(
        out.contains(&format!("{next_version} written to slot B")),
        "{out}"
    );
    let slots = ok(&state, &["node", "slots", "node1"]);
    assert!(slots.contains("boots once next"), "{slots}");
    let mark = vm.mark();
    ok(&state, &["node", "power", "node1", "reboot"]);
    vm.wait_for_after(mark, "hvnode: slot B confirmed", BOOT_TIMEOUT);
    let slots = ok(&state, &["node", "slots", "node1"]);
    assert!(
        slots.contains(&format!(
            "running hvnode {next_version} from slot B (confirmed)"
        )),
        "{slots}"
    );

    // An update whose root dm-verity refuses: tried once, then slot B again, with the reason.
    let broken = broken_bundle(iso, dir);
    let out = ok(
        &state,
        &["node", "update", "node1", &broken.display().to_string()],
    );
    assert!(out.contains("1.0.0 written to slot A"), "{out}");
    let mark = vm.mark();
    ok(&state, &["node", "power", "node1", "reboot"]);
    vm.wait_for_after(mark, "failed at early boot", BOOT_TIMEOUT);
    vm.wait_for_after(
        mark,
        "update to slot A failed, running slot B",
        BOOT_TIMEOUT,
    );
    vm.wait_for_after(mark, "hvnode: slot B confirmed", BOOT_TIMEOUT);
    let slots = ok(&state, &["node", "slots", "node1"]);
    assert!(
        slots.contains(&format!(
            "running hvnode {next_version} from slot B (confirmed)"
        )) && slots.contains("update to slot A failed, running slot B (slot A: early boot:"),
        "{slots}"
    );
    eprintln!("update: {next_version} on slot B, a broken update to slot A fell back:\n{slots}");
}

#[test]
fn ovmf_installs_onto_a_blank_disk_boots_slot_a_updates_to_b_and_falls_back_from_a_broken_update() {
    install_then_boot_from_the_disk("install-ovmf", Firmware::Ovmf, true);
}

#[test]
fn seabios_installs_onto_a_blank_disk_boots_slot_a_updates_to_b_and_falls_back_from_a_broken_update(
) {
    install_then_boot_from_the_disk("install-seabios", Firmware::SeaBios, true);
}
