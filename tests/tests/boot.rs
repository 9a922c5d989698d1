//! Boot tests: build/hvnode.iso under QEMU TCG, four ways (OVMF/SeaBIOS × CD/USB stick).
//!
//! Run by the README's test command with `HVNODE_ISO` set; without it each test says so and
//! returns. The full test (`ovmf_cd_...`) also drives the console over the serial port, registers
//! the node with hvnodectl, defines a guest, reboots and checks what persisted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hvnode_tests::screen::{self, Font, TextScreen};
use hvnode_tests::{
    blank_disk, hvnodectl, iso_under_test, ok, repo_root, scratch_dir, Firmware, Medium, Options,
    Qemu,
};

/// Boot under TCG takes 20-60 s on these machines; the limit leaves room for a loaded host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(120);

fn skip_without_iso(test: &str) -> Option<PathBuf> {
    let iso = iso_under_test();
    if iso.is_none() {
        hvnode_base::testing::cannot_run(
            test,
            "HVNODE_ISO is not set (the README's test command sets it)",
        );
    }
    iso
}

/// Boots, waits for `hvnode: ready`, checks the DHCP address, presses the power button and
/// checks a clean power-off; `console` also checks the server's screen and keyboard.
fn boot_ready_poweroff(name: &str, firmware: Firmware, medium: Medium, console: Option<Keyboard>) {
    let Some(iso) = skip_without_iso(name) else {
        return;
    };
    let dir = scratch_dir(name);
    let mut vm = Qemu::start(&iso, &Options::new(name, firmware, medium), &dir);
    if console.is_some() && firmware == Firmware::SeaBios {
        // The boot menu on the screen (GRUB draws it in VGA text mode); an arrow key on the PS/2
        // keyboard stops the countdown while it is read, Enter boots the first entry.
        vm.wait_for("first blank disk [d]", BOOT_TIMEOUT);
        vm.press_keys(&["up"], None);
        let read = |vm: &Qemu| {
            screen::vga_text_screen(&vm.vga_text_memory(), 25, |r| r.contains("GNU GRUB"))
        };
        // GRUB draws the entries one character at a time: wait for the end of the last one
        // before checking the others (a read in the middle of the drawing saw half a list).
        let menu = wait_physical(&vm, &read, "hvnode, debug: verbose kernel and init log [v]");
        assert!(
            menu.contains("hvnode, creating the data partition on the first blank disk [d]"),
            "{menu}"
        );
        vm.press_keys(&["ret"], None);
    }
    if console == Some(Keyboard::Usb) && firmware == Firmware::Ovmf {
        // The firmware draws GRUB's menu in its own font: no glyph table to read it with, but
        // the menu is there (ink on the screen) and follows the USB keyboard (the highlight
        // moves). Down stops the countdown, Up comes back to the first entry, Enter boots it.
        vm.wait_for("first blank disk [d]", BOOT_TIMEOUT);
        vm.press_keys(&["down"], Some("video0"));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        // Still for more than a second: the countdown (which ticks every second) has stopped.
        let mut lower = vm.screendump();
        loop {
            std::thread::sleep(Duration::from_millis(1200));
            let now = vm.screendump();
            if now.pixels == lower.pixels {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the boot menu keeps changing: the countdown did not stop on a USB key"
            );
            lower = now;
        }
        let ink = lower
            .pixels
            .iter()
            .filter(|p| **p != lower.pixels[0])
            .count();
        assert!(
            ink > 2000,
            "the boot menu screen is blank ({ink} pixels of ink)"
        );
        vm.press_keys(&["up"], Some("video0"));
        while vm.screendump().pixels == lower.pixels {
            assert!(
                std::time::Instant::now() < deadline,
                "the boot menu does not follow the USB keyboard"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        vm.press_keys(&["ret"], Some("video0"));
    }
    vm.wait_for("hvnode: ready", BOOT_TIMEOUT);
    if let Some(keyboard) = console {
        consoles_belong_to_the_tui(&mut vm, &iso, firmware, keyboard);
    }
    let text = vm.serial_text();
    assert!(
        text.contains("10.0.2.15"),
        "the node did not report QEMU's DHCP address 10.0.2.15 (log: {})",
        vm.log_path.display()
    );
    assert!(
        text.contains("state is volatile"),
        "without a data disk the node must say its state is volatile"
    );
    let status = vm.power_button_and_wait(POWEROFF_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");
    vm.wait_for("hvnode: power off", Duration::from_secs(1));
    vm.assert_clean_console();
}

#[test]
fn seabios_cd_boots_to_ready_with_the_tui_on_the_vga_text_screen_and_powers_off() {
    boot_ready_poweroff(
        "seabios-cd",
        Firmware::SeaBios,
        Medium::Cd,
        Some(Keyboard::Ps2),
    );
}

#[test]
fn ovmf_usb_stick_boots_to_ready_with_the_tui_on_the_framebuffer_and_powers_off() {
    boot_ready_poweroff(
        "ovmf-usb",
        Firmware::Ovmf,
        Medium::UsbStick,
        Some(Keyboard::Usb),
    );
}

#[test]
fn seabios_usb_stick_boots_to_ready_and_powers_off() {
    boot_ready_poweroff("seabios-usb", Firmware::SeaBios, Medium::UsbStick, None);
}

/// The keyboard the admin types on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keyboard {
    /// PS/2 (the i8042).
    Ps2,
    /// USB HID, on the xHCI controller.
    Usb,
}

/// Lines of init and the kernel that must never be seen over the TUI.
const NOT_OVER_THE_TUI: [&str; 5] = [
    "hvnode: ready",
    "boot times",
    "hvnode: network",
    "entered disabled state",
    "kernel:",
];

/// The console TUI owns the serial port and the server's screen once the node is ready: the
/// screen shows it with nothing written over it, a kernel message after ready stays off it,
/// and the physical keyboard drives it.
fn consoles_belong_to_the_tui(vm: &mut Qemu, iso: &Path, firmware: Firmware, keyboard: Keyboard) {
    // Serial: everything after the ready line, as a terminal shows it.
    let ready = vm.position_of("hvnode: ready").expect("ready was seen");
    let serial = vm.wait_screen(ready, "10.0.2.15", Duration::from_secs(120));
    for line in NOT_OVER_THE_TUI {
        assert!(
            !serial.contains(line),
            "{line:?} is written over the TUI on ttyS0:\n{serial}"
        );
    }

    let font = (firmware == Firmware::Ovmf).then(|| kernel_font(iso, &vm.dir));
    let read = |vm: &Qemu| -> Result<TextScreen, String> {
        match &font {
            None => screen::vga_text_screen(&vm.vga_text_memory(), 25, |r| {
                r.contains("1 Status") && r.contains("2 Network")
            }),
            Some(font) => Ok(font.read(&vm.screendump())),
        }
    };
    let physical = wait_physical(vm, &read, "10.0.2.15");
    assert!(physical.contains("Status"), "{physical}");

    // A cable pulled after ready: the bridge logs it (kernel, info level) and init's network
    // code reacts. The serial TUI's Logs screen shows it once it is in the node log...
    vm.qmp_ok("set_link", serde_json::json!({"name": "n0", "up": false}));
    let mark = vm.mark();
    vm.send(b"6");
    vm.wait_screen(mark, "entered disabled state", Duration::from_secs(60));
    vm.qmp_ok("set_link", serde_json::json!({"name": "n0", "up": true}));
    // ...and the server's screen, still on Status, shows none of it.
    let physical = read(vm).unwrap_or_else(|e| panic!("reading the screen: {e}"));
    for line in NOT_OVER_THE_TUI {
        assert!(
            !physical.contains(line),
            "{line:?} is written over the TUI on the screen:\n{physical}"
        );
    }
    assert!(physical.contains("10.0.2.15"), "{physical}");
    eprintln!("the server's screen ({firmware:?}) after the cable was pulled:\n{physical}");

    // The physical keyboard switches screens as the serial one does.
    let device = (keyboard == Keyboard::Usb).then_some("video0");
    vm.press_keys(&["2"], device);
    wait_physical(vm, &read, "h: change the host name");
    // F3 as the Linux console encodes it (ESC [ [ C), not as a serial terminal does.
    vm.press_keys(&["f3"], device);
    wait_physical(vm, &read, "Pairing code");
    vm.press_keys(&["1"], device);
    wait_physical(vm, &read, "10.0.2.15");
    if font.is_some() {
        // Alt-F2: the node log, live, with the kernel's lines the console kept off tty1.
        vm.press_keys(&["alt", "f2"], device);
        let log = wait_physical(vm, &read, "kernel: br0: port");
        assert!(!log.contains("1 Status"), "{log}");
        vm.press_keys(&["alt", "f1"], device);
        wait_physical(vm, &read, "10.0.2.15");
    }
}

/// Reads the server's screen until it shows `needle`.
fn wait_physical(
    vm: &Qemu,
    read: &dyn Fn(&Qemu) -> Result<TextScreen, String>,
    needle: &str,
) -> TextScreen {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let screen = read(vm);
        if let Ok(s) = &screen {
            if s.contains(needle) {
                return s.clone();
            }
        }
        if std::time::Instant::now() >= deadline {
            match screen {
                Ok(s) => panic!("{needle:?} is not on the server's screen:\n{s}"),
                Err(e) => panic!("{needle:?}: cannot read the server's screen: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The 8x16 console font of the kernel the ISO boots.
fn kernel_font(iso: &Path, dir: &Path) -> Font {
    let vmlinuz = dir.join("vmlinuz");
    let _ = std::fs::remove_file(&vmlinuz);
    let status = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .args(["-extract", "/boot/vmlinuz"])
        .arg(&vmlinuz)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run xorriso (image/setup-host.sh installs it)");
    assert!(
        status.success(),
        "cannot extract /boot/vmlinuz from the ISO"
    );
    let vmlinux = screen::vmlinux_of_bzimage(&vmlinuz).expect("unpack the kernel");
    Font::from_vmlinux(&vmlinux).expect("the kernel's console font")
}

/// The boot test's guest: 2 vCPUs and 4.5 GiB (RAM above the 32-bit MMIO hole too), the node's own
/// kernel, the initramfs and the disk `tests/guest/build.sh` builds, virtio-rng, and a NIC on the node's management bridge (which enslaves the node's NIC,
/// so QEMU's user network hands the guest a 10.0.2.x lease). Its /init checks the devices named
/// by `hvnode-guest.expect`.
const GUEST_SPEC: &str = r#"name = "testguest"
vcpus = 2
memory_mib = 4608
kernel = "test/vmlinuz"
initrd = "test/initramfs.img"
cmdline = "console=ttyS0 quiet reboot=k panic=-1 pci=off hvnode-guest.expect=disk,rng,net"
rng = true
disks = [{ path = "test/disk.raw" }]
nics = [{ bridge = "br0" }]
"#;

/// hvnodectl, built by the test command (`cargo build -p hvnodectl`).
/// Switches the console on ttyS0 to a screen with a digit key and returns the mark after it.
fn console_screen(vm: &mut Qemu, key: &[u8], expect: &str) -> String {
    let mark = vm.mark();
    vm.send(key);
    // The console redraws the whole screen on a switch; a full redraw lands after the mark.
    vm.wait_screen(mark, expect, Duration::from_secs(60))
}

fn pairing_code(screen: &str) -> String {
    let line = screen
        .lines()
        .find(|l| l.contains("Pairing code"))
        .unwrap_or_else(|| panic!("no pairing code on the manager screen:\n{screen}"));
    line.split(':')
        .nth(1)
        .map(|s| s.split_whitespace().next().unwrap_or_default().to_owned())
        .filter(|c| c.len() == 8)
        .unwrap_or_else(|| panic!("cannot read the pairing code from {line:?}"))
}

#[test]
fn ovmf_cd_data_disk_console_registration_and_persistence() {
    let name = "ovmf-cd-full";
    let Some(iso) = skip_without_iso(name) else {
        return;
    };
    let dir = scratch_dir(name);
    let data = dir.join("data.raw");
    blank_disk(&data, 2 << 30);
    let mut opts = Options::new(name, Firmware::Ovmf, Medium::Cd);
    opts.disks.push(data.clone());
    let mut vm = Qemu::start(&iso, &opts, &dir);

    // The admin picks "create the data partition on the first blank disk" in the boot menu.
    vm.wait_for("first blank disk [d]", BOOT_TIMEOUT);
    vm.send(b"d");
    vm.wait_for("hvnode: ready", BOOT_TIMEOUT);
    let text = vm.serial_text();
    assert!(text.contains("10.0.2.15"), "no DHCP address on the console");
    assert!(
        text.contains("HVNODE-DATA") || text.contains("/var/lib/hvnode"),
        "no data partition was created on the blank disk"
    );

    // The console on the serial port: status shows the address, the manager screen the code.
    let status = console_screen(&mut vm, b"1", "10.0.2.15");
    assert!(
        status.contains("Unregistered") || status.contains("unregistered"),
        "{status}"
    );

    // The host name through the console's Network screen with keys a serial terminal sends:
    // h opens the field, ^U clears it, Enter applies; the status screen then shows the name.
    console_screen(&mut vm, b"2", "h: change the host name");
    let mark = vm.mark();
    vm.send(b"h");
    vm.wait_screen(mark, "Host name:", Duration::from_secs(60));
    let mark = vm.mark();
    vm.send(b"\x15console-node\r");
    vm.wait_screen(mark, "Done.", Duration::from_secs(60));
    let status = console_screen(&mut vm, b"1", "console-node");
    assert!(
        status
            .lines()
            .any(|l| l.contains("Host name") && l.contains("console-node")),
        "{status}"
    );

    let manager = console_screen(&mut vm, b"3", "Pairing code");
    let code = pairing_code(&manager);

    // Manager-initiated registration through QEMU's port forward.
    let state = dir.join("manager");
    let url = format!("https://127.0.0.1:{}", vm.api_port);
    ok(&state, &["init", "--name", "test-manager"]);
    let (refused, text) = hvnodectl(
        &state,
        &[
            "register", "node1", "--url", &url, "--code", "WRONGCDE", "--yes",
        ],
    );
    assert!(!refused, "a wrong pairing code was accepted: {text}");
    ok(
        &state,
        &["register", "node1", "--url", &url, "--code", &code, "--yes"],
    );
    let info = ok(&state, &["node", "info", "node1"]);
    assert!(info.contains("kvm"), "{info}");
    assert!(
        info.contains("console-node"),
        "the API does not show the host name set on the console:\n{info}"
    );

    // Unauthenticated and wrongly authenticated requests are refused.
    let other = dir.join("other-manager");
    ok(&other, &["init", "--name", "intruder"]);
    let (taken, text) = hvnodectl(
        &other,
        &["register", "node1", "--url", &url, "--code", &code, "--yes"],
    );
    assert!(!taken, "a second manager took the node over: {text}");
    let no_cert = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{url}/v1/node"))
        .output()
        .expect("curl");
    let code_str = String::from_utf8_lossy(&no_cert.stdout).to_string();
    assert!(
        code_str == "401" || code_str == "403",
        "no client certificate gave HTTP {code_str}"
    );

    // A guest definition, which must survive the reboot.
    let spec = dir.join("guest.toml");
    std::fs::write(&spec, GUEST_SPEC).expect("write guest spec");
    ok(
        &state,
        &[
            "guest",
            "define",
            "node1",
            spec.to_str().unwrap_or_default(),
        ],
    );

    // A setting that must persist, then a reboot.
    ok(&state, &["node", "set-hostname", "node1", "rack7-node1"]);
    let mark = vm.mark();
    ok(&state, &["node", "power", "node1", "reboot"]);
    vm.wait_for_after(mark, "hvnode: reboot", POWEROFF_TIMEOUT);
    vm.wait_for_after(mark, "hvnode: ready", BOOT_TIMEOUT);
    let info = ok(&state, &["node", "info", "node1"]);
    assert!(
        info.contains("rack7-node1"),
        "hostname did not persist:\n{info}"
    );
    let guests = ok(&state, &["guest", "list", "node1"]);
    assert!(
        guests.contains("testguest"),
        "guest definition did not persist:\n{guests}"
    );

    let status = vm.power_button_and_wait(POWEROFF_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");
    vm.assert_clean_console();
}

/// Registers a booted node with a fresh manager, reading the pairing code from the console.
fn register(vm: &mut Qemu, dir: &Path) -> PathBuf {
    let manager = console_screen(vm, b"3", "Pairing code");
    let code = pairing_code(&manager);
    let state = dir.join("manager");
    let url = format!("https://127.0.0.1:{}", vm.api_port);
    ok(&state, &["init", "--name", "test-manager"]);
    ok(
        &state,
        &["register", "node1", "--url", &url, "--code", &code, "--yes"],
    );
    state
}

#[test]
fn nested_linux_guest_runs_in_the_vmm_inside_the_node() {
    let name = "nested-guest";
    let Some(iso) = skip_without_iso(name) else {
        return;
    };
    let guest = repo_root().join("build/guest");
    for f in ["vmlinuz", "initramfs.img", "disk.raw"] {
        assert!(
            guest.join(f).is_file(),
            "build/guest/{f} is missing: run tests/guest/build.sh"
        );
    }
    let dir = scratch_dir(name);
    let mut opts = Options::new(name, Firmware::SeaBios, Medium::Cd);
    opts.nested = true;
    opts.memory_mib = 2048;
    let mut vm = Qemu::start(&iso, &opts, &dir);
    vm.wait_for("hvnode: ready", BOOT_TIMEOUT);
    let state = register(&mut vm, &dir);
    let info = ok(&state, &["--json", "node", "info", "node1"]);
    assert!(
        info.contains("\"kvm\":true") || info.contains("\"kvm\": true"),
        "KVM is not usable inside the node: {info}"
    );
    for f in ["vmlinuz", "initramfs.img", "disk.raw"] {
        let local = guest.join(f);
        ok(
            &state,
            &[
                "image",
                "upload",
                "node1",
                local.to_str().unwrap_or_default(),
                &format!("test/{f}"),
            ],
        );
    }
    let spec = dir.join("guest.toml");
    std::fs::write(&spec, GUEST_SPEC).expect("write guest spec");
    ok(
        &state,
        &[
            "guest",
            "define",
            "node1",
            spec.to_str().unwrap_or_default(),
        ],
    );
    ok(&state, &["guest", "start", "node1", "testguest"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    let console = loop {
        let (_, console) = hvnodectl(&state, &["guest", "console", "node1", "testguest"]);
        if console.contains("hvnode-guest: done") || console.contains("FAIL") {
            break console;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the nested guest did not finish within 900 s; console:\n{console}"
        );
        std::thread::sleep(Duration::from_secs(5));
    };
    eprintln!("nested guest console:\n{console}");
    assert!(
        !console.contains("FAIL"),
        "guest reported a failure:\n{console}"
    );
    assert!(console.contains("hvnode-guest: started"), "{console}");
    assert!(
        console.contains("hvnode-guest: disk ok"),
        "virtio-blk:\n{console}"
    );
    assert!(
        console.contains("hvnode-guest: rng ok "),
        "virtio-rng:\n{console}"
    );
    assert!(
        console
            .lines()
            .any(|l| l.contains("hvnode-guest: net ") && l.contains(" 10.0.2.")),
        "virtio-net on br0 got no 10.0.2.x lease:\n{console}"
    );
    assert!(console.contains("hvnode-guest: kernel 6."), "{console}");
    // 2 vCPUs and 4.5 GiB: RAM on both sides of the 32-bit MMIO hole, in a 2 GiB node (guest
    // memory is mapped lazily). The kernel keeps some for itself, so MemTotal is a little less.
    let mib: u64 = console
        .lines()
        .find_map(|l| l.split(" with 2 cpu(s) and ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("the guest did not report 2 cpus and its memory:\n{console}"));
    assert!(
        mib > 4096,
        "the guest sees {mib} MiB of its 4608:\n{console}"
    );
    // The guest powers itself off through ACPI; the VMM then exits and the guest is stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let show = ok(&state, &["--json", "guest", "show", "node1", "testguest"]);
        if show.contains("\"stopped\"") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "guest did not stop after powering off: {show}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    // Again, driven while it runs: pause, resume, and a stop that answers once the VMM is gone.
    ok(&state, &["guest", "start", "node1", "testguest"]);
    let paused = ok(&state, &["guest", "pause", "node1", "testguest"]);
    assert!(paused.contains("paused"), "{paused}");
    let resumed = ok(&state, &["guest", "resume", "node1", "testguest"]);
    assert!(resumed.contains("running"), "{resumed}");
    let stopped = ok(&state, &["guest", "stop", "node1", "testguest"]);
    assert!(stopped.contains("stopped"), "{stopped}");
    let show = ok(&state, &["--json", "guest", "show", "node1", "testguest"]);
    assert!(show.contains("\"stopped\""), "{show}");
    let status = vm.power_button_and_wait(POWEROFF_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");
    vm.assert_clean_console();
}

/// Where `/live/root.squashfs` lies in the ISO: its first 2 KiB block and its size, from
/// xorriso's report (`File data lba:  0 , <start> , <blocks> , <size> , '/live/root.squashfs'`).
fn squashfs_extent(iso: &Path) -> (u64, u64) {
    let out = Command::new("xorriso")
        .arg("-indev")
        .arg(iso)
        .args(["-find", "/live/root.squashfs", "-exec", "report_lba", "--"])
        .output()
        .expect("run xorriso (install it with image/setup-host.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("File data lba:") && l.ends_with("'/live/root.squashfs'"))
        .unwrap_or_else(|| panic!("xorriso reports no /live/root.squashfs in the ISO:\n{text}"))
        .trim_start_matches("File data lba:")
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(
        fields[0], "0",
        "the root image is in one extent: {fields:?}"
    );
    let number = |i: usize| -> u64 {
        fields[i]
            .parse()
            .unwrap_or_else(|_| panic!("bad xorriso field {i}: {fields:?}"))
    };
    (number(1), number(3))
}

/// A copy of the ISO whose root image differs in one superblock field that squashfs itself
/// never checks (mkfs_time, bytes 8-11): without dm-verity this copy would boot to ready.
/// Nothing is mounted: the bytes are patched where the ISO keeps the file.
fn tampered_copy(iso: &Path, dir: &Path) -> PathBuf {
    use std::io::{Read, Seek, SeekFrom, Write};
    let (lba, size) = squashfs_extent(iso);
    assert!(size > 4096, "the root image is only {size} bytes");
    let copy = dir.join("tampered.iso");
    std::fs::copy(iso, &copy).expect("copy the ISO");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy)
        .expect("open the copy");
    let at = lba * 2048;
    let mut superblock = [0u8; 12];
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut superblock)
        .expect("read the squashfs superblock");
    assert_eq!(
        &superblock[..4],
        b"hsqs",
        "no squashfs at block {lba} of the ISO"
    );
    let flipped: Vec<u8> = superblock[8..12].iter().map(|b| !b).collect();
    f.seek(SeekFrom::Start(at + 8)).expect("seek");
    f.write_all(&flipped).expect("tamper with the copy");
    f.sync_all().expect("sync the copy");
    copy
}

#[test]
fn seabios_cd_with_a_modified_root_image_stops_before_ready() {
    let name = "seabios-cd-tampered";
    let Some(iso) = skip_without_iso(name) else {
        return;
    };
    let dir = scratch_dir(name);
    let tampered = tampered_copy(&iso, &dir);
    let vm = Qemu::start(
        &tampered,
        &Options::new(name, Firmware::SeaBios, Medium::Cd),
        &dir,
    );
    // Whichever comes first: an unverified root would reach the main stage and ready.
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    let text = loop {
        let text = vm.serial_text();
        if text.contains("press ctrl-alt-del to reboot")
            || text.contains("hvnode: main stage")
            || text.contains("hvnode: ready")
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tampered node neither stopped nor booted within {BOOT_TIMEOUT:?} (log: {})",
            vm.log_path.display()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        text.contains("hvnode: fatal: The root image failed verification"),
        "the console does not say the root failed verification (log: {})",
        vm.log_path.display()
    );
    assert!(
        text.contains("Write the ISO again"),
        "the console does not tell the admin what to do"
    );
    for bad in ["hvnode: main stage", "hvnode: ready", "Kernel panic"] {
        assert!(
            !text.contains(bad),
            "a modified root image got as far as {bad:?} (log: {})",
            vm.log_path.display()
        );
    }
    drop(vm);
    let _ = std::fs::remove_file(&tampered);
}

/// The migrating guest: a Linux guest that, once up and on the network, ticks once a second on
/// its serial port and reports each tick over TCP to the host (`hvnode-guest.report=PORT`).
fn mover_spec(report_port: u16) -> String {
    format!(
        r#"name = "mover"
vcpus = 1
memory_mib = 256
kernel = "test/vmlinuz"
initrd = "test/initramfs.img"
cmdline = "console=ttyS0 quiet reboot=k panic=-1 pci=off hvnode-guest.expect=net hvnode-guest.count hvnode-guest.report={report_port}"
rng = false
nics = [{{ bridge = "br0" }}]
"#
    )
}

/// Two nodes, `node-a` and `node-b`, each its own QEMU booted (BIOS, CD) with nested KVM from
/// the ISO, both registered with one manager (its state in `dir/manager`) and given the test
/// guest's kernel and initrd as `test/vmlinuz` and `test/initramfs.img`.
fn two_nodes(name: &str, iso: &Path, dir: &Path) -> (Qemu, Qemu, PathBuf) {
    two_nodes_with(name, iso, dir, |_| {})
}

/// [`two_nodes`], each node's QEMU options changed by `tune` first.
fn two_nodes_with(
    name: &str,
    iso: &Path,
    dir: &Path,
    tune: impl Fn(&mut Options),
) -> (Qemu, Qemu, PathBuf) {
    let guest = repo_root().join("build/guest");
    for f in ["vmlinuz", "initramfs.img"] {
        assert!(
            guest.join(f).is_file(),
            "build/guest/{f} is missing: run tests/guest/build.sh"
        );
    }
    let start = |n: &str| {
        let d = dir.join(n);
        std::fs::create_dir_all(&d).expect("node dir");
        let mut opts = Options::new(&format!("{name}-{n}"), Firmware::SeaBios, Medium::Cd);
        opts.nested = true;
        opts.memory_mib = 1536;
        tune(&mut opts);
        Qemu::start(iso, &opts, &d)
    };
    let mut a = start("a");
    let mut b = start("b");
    a.wait_for("hvnode: ready", BOOT_TIMEOUT);
    b.wait_for("hvnode: ready", BOOT_TIMEOUT);
    let state = dir.join("manager");
    ok(&state, &["init", "--name", "test-manager"]);
    for (node, vm) in [("node-a", &mut a), ("node-b", &mut b)] {
        let code = pairing_code(&console_screen(vm, b"3", "Pairing code"));
        let url = format!("https://127.0.0.1:{}", vm.api_port);
        let out = ok(
            &state,
            &["register", node, "--url", &url, "--code", &code, "--yes"],
        );
        assert!(out.contains("registered"), "{out}");
        for f in ["vmlinuz", "initramfs.img"] {
            let local = guest.join(f);
            ok(
                &state,
                &[
                    "image",
                    "upload",
                    node,
                    local.to_str().unwrap_or_default(),
                    &format!("test/{f}"),
                ],
            );
        }
    }
    (a, b, state)
}

/// The tick numbers in a guest's console log.
fn ticks(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.split("hvnode-guest: tick ").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn a_running_linux_guest_migrates_between_two_nodes_and_carries_on() {
    let name = "two-node-migration";
    let Some(iso) = skip_without_iso(name) else {
        return;
    };
    let dir = scratch_dir(name);
    // Node A reaches node B's API through the host (QEMU's user network maps 10.0.2.2 to the
    // host's loopback, where B's API port is forwarded).
    let (mut a, mut b, state) = two_nodes(name, &iso, &dir);
    // The guest's reports reach the host wherever it runs.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("report listener");
    let port = listener.local_addr().expect("addr").port();
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = std::sync::Arc::clone(&reports);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(conn), &mut line);
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    let reported = || ticks(&reports.lock().unwrap_or_else(|e| e.into_inner()).join(""));
    let spec = dir.join("mover.toml");
    std::fs::write(&spec, mover_spec(port)).expect("write guest spec");
    ok(
        &state,
        &[
            "guest",
            "define",
            "node-a",
            spec.to_str().unwrap_or_default(),
        ],
    );
    ok(&state, &["guest", "start", "node-a", "mover"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let (_, console) = hvnodectl(&state, &["guest", "console", "node-a", "mover"]);
        assert!(
            !console.contains("FAIL"),
            "the guest failed on node A:\n{console}"
        );
        if ticks(&console).len() >= 3 && !reported().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not tick and report on node A within 600 s:\n{console}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    let to_url = format!("https://10.0.2.2:{}", b.api_port);
    let moved = ok(
        &state,
        &[
            "guest",
            "migrate",
            "node-a",
            "mover",
            "--to",
            "node-b",
            "--to-url",
            &to_url,
            "--downtime-ms",
            "2000",
        ],
    );
    eprintln!("{moved}");
    assert!(
        moved.contains("guest mover migrated from node-a to node-b"),
        "{moved}"
    );
    let last_on_a = reported().into_iter().max().unwrap_or(0);
    let list_a = ok(&state, &["guest", "list", "node-a"]);
    assert!(
        !list_a.contains("mover"),
        "node A still has the guest:\n{list_a}"
    );
    // On node B it ticks on from where it was, without booting again, and reports over its
    // network.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let console_b = loop {
        let (_, console) = hvnodectl(&state, &["guest", "console", "node-b", "mover"]);
        let after: Vec<u64> = reported()
            .into_iter()
            .filter(|&t| t > last_on_a + 1)
            .collect();
        if ticks(&console).len() >= 2 && after.len() >= 2 {
            break console;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not tick and report on node B (last report on A: {last_on_a}):\n{console}"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        !console_b.contains("hvnode-guest: started"),
        "the guest booted again on node B:\n{console_b}"
    );
    let first_on_b = ticks(&console_b)[0];
    assert!(
        first_on_b > last_on_a.saturating_sub(3) && first_on_b <= last_on_a + 3,
        "node B's first tick {first_on_b} does not follow node A's last report {last_on_a}"
    );
    let show = ok(&state, &["--json", "guest", "show", "node-b", "mover"]);
    assert!(show.contains("\"running\""), "{show}");
    ok(&state, &["guest", "stop", "node-b", "mover"]);
    for vm in [&mut a, &mut b] {
        let status = vm.power_button_and_wait(POWEROFF_TIMEOUT);
        assert!(status.success(), "QEMU exit status {status}");
        vm.assert_clean_console();
    }
}

/// A cluster guest's spec: the test guest counting its boots on a disk on the storage domain.
fn cluster_guest_spec() -> String {
    r#"name = "clustered"
vcpus = 1
memory_mib = 256
kernel = "test/vmlinuz"
initrd = "test/initramfs.img"
cmdline = "console=ttyS0 quiet reboot=k panic=-1 pci=off hvnode-guest.expect=boots hvnode-guest.count"
rng = false
disks = [{ path = "shared:clustered/data.raw" }]
"#
    .to_owned()
}

/// Waits until the guest's console on `node` shows `want` (10 minutes at most: TCG).
fn wait_console(state: &Path, node: &str, guest: &str, want: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let (_, console) = hvnodectl(state, &["guest", "console", node, guest]);
        assert!(
            !console.contains("FAIL"),
            "the guest failed on {node}:\n{console}"
        );
        if console.contains(want) {
            return console;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {want:?} from {guest} on {node} within 600 s:\n{console}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn two_nodes_form_a_cluster_and_a_guest_on_nfs_runs_on_either_with_its_data() {
    let name = "two-node-cluster";
    let Some(iso) = skip_without_iso(name) else {
        return;
    };
    let dir = scratch_dir(name);
    // The host serves the cluster's state (etcd) and its shared storage (an NFSv4 export);
    // the nodes reach both at 10.0.2.2 through QEMU's user network.
    let (_etcd, etcd_port) = hvnode_tests::host_etcd(&dir.join("etcd"));
    let export = dir.join("export");
    let (_nfs, nfs_port) = hvnode_tests::host_nfs(&dir.join("nfs"), &export);
    let blank = dir.join("blank.raw");
    hvnode_tests::blank_disk(&blank, 1 << 20);

    // Each node has a watchdog, and reaches etcd through a link of its own that the test can
    // cut while its storage stays.
    let (a, b, state) = two_nodes_with(name, &iso, &dir, |o| {
        o.watchdog = true;
        o.etcd_link = Some(etcd_port);
    });
    let manager_etcd = format!("http://127.0.0.1:{etcd_port}");
    let node_etcd = hvnode_tests::NODE_ETCD.to_owned();
    ok(
        &state,
        &[
            "cluster",
            "init",
            "--etcd",
            &manager_etcd,
            "--node-etcd",
            &node_etcd,
        ],
    );
    // The nodes reach each other through the host (QEMU's user network maps 10.0.2.2 to the
    // host's loopback, where each node's API port is forwarded).
    for (node, vm) in [("node-a", &a), ("node-b", &b)] {
        let address = format!("https://10.0.2.2:{}", vm.api_port);
        ok(&state, &["cluster", "join", node, "--address", &address]);
    }
    let nfs_options = format!("port={nfs_port}");
    ok(
        &state,
        &[
            "cluster",
            "domain",
            "add",
            "shared",
            "--server",
            "10.0.2.2",
            "--export",
            "/export",
            "--options",
            &nfs_options,
        ],
    );
    // Both nodes are members, one leads, and both have the domain mounted and healthy.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let (_, s) = hvnodectl(&state, &["--json", "cluster", "status"]);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
        let members = v["members"].as_object().map_or(0, |m| m.len());
        let healthy = v["domains"]["shared"]["members"]
            .as_object()
            .map_or(0, |m| m.values().filter(|h| h["healthy"] == true).count());
        if members == 2 && healthy == 2 && v["leader"].is_string() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster did not form with the domain mounted on both nodes:\n{s}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    // Its disk goes onto the domain through node A (an upload to `DOMAIN:path`).
    ok(
        &state,
        &[
            "image",
            "upload",
            "node-a",
            blank.to_str().unwrap_or_default(),
            "shared:clustered/data.raw",
        ],
    );
    let data = export.join("clustered/data.raw");
    assert_eq!(
        std::fs::metadata(&data).map(|m| m.len()).ok(),
        Some(1 << 20)
    );
    // The cluster guest runs on node A and writes its disk on the export; stopped, started on
    // node B, it finds what it wrote there.
    let spec = dir.join("clustered.toml");
    std::fs::write(&spec, cluster_guest_spec()).expect("write guest spec");
    ok(
        &state,
        &[
            "cluster",
            "guest",
            "define",
            spec.to_str().unwrap_or_default(),
            "--stopped",
        ],
    );
    let started = ok(
        &state,
        &["cluster", "guest", "start", "clustered", "--on", "node-a"],
    );
    assert!(started.contains("runs on node-a"), "{started}");
    wait_console(&state, "node-a", "clustered", "hvnode-guest: tick 1 ");
    let console_a = wait_console(&state, "node-a", "clustered", "boots 1");
    assert!(console_a.contains("boots 1"), "{console_a}");
    // The disk is written by one VMM at a time, across nodes: node B cannot open it for
    // writing while node A's VMM holds its lock on the NFS server.
    let rival = dir.join("rival.toml");
    std::fs::write(
        &rival,
        cluster_guest_spec().replace("name = \"clustered\"", "name = \"rival\""),
    )
    .expect("write rival spec");
    ok(
        &state,
        &[
            "guest",
            "define",
            "node-b",
            rival.to_str().unwrap_or_default(),
        ],
    );
    // Its VMM starts and stops at once, saying why.
    ok(&state, &["guest", "start", "node-b", "rival"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let show = ok(&state, &["--json", "guest", "show", "node-b", "rival"]);
        if show.contains("\"crashed\"") {
            assert!(show.contains("in use by another VMM"), "{show}");
            break;
        }
        let (_, console) = hvnodectl(&state, &["guest", "console", "node-b", "rival"]);
        assert!(
            !console.contains("hvnode-guest: boots"),
            "a second VMM opened the disk for writing: {show}\n{console}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the rival VMM did not stop: {show}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    ok(&state, &["guest", "delete", "node-b", "rival"]);

    let stopped = ok(&state, &["cluster", "guest", "stop", "clustered"]);
    assert!(stopped.contains("stopped"), "{stopped}");
    let on_disk = std::fs::read(&data).expect("read the disk on the export");
    assert!(
        on_disk.starts_with(b"hvnode-boots 1\n"),
        "{:?}",
        &on_disk[..16]
    );
    let started = ok(
        &state,
        &["cluster", "guest", "start", "clustered", "--on", "node-b"],
    );
    assert!(started.contains("runs on node-b"), "{started}");
    let console_b = wait_console(&state, "node-b", "clustered", "boots 2");
    assert!(console_b.contains("boots 2"), "{console_b}");
    let list_a = ok(&state, &["guest", "list", "node-a"]);
    assert!(
        !list_a.contains("clustered"),
        "node A still has the guest:\n{list_a}"
    );
    ok(&state, &["cluster", "guest", "stop", "clustered"]);
    high_availability(&state, &dir, &blank, a, b);
}

/// The HA half of the cluster test (docs/ha.md), on its two nodes: an HA guest's node is cut
/// off from etcd (its storage stays): it kills the guest and its watchdog resets it before the
/// other node starts the guest, with its disk as it was; the node comes back, joins again, and
/// the other node dies at once (QEMU killed): the guest starts again on the node that came
/// back.
fn high_availability(state: &Path, dir: &Path, blank: &Path, a: Qemu, b: Qemu) {
    // Both nodes armed their watchdog when they joined.
    for vm in [&a, &b] {
        vm.wait_for("armed (8 s)", Duration::from_secs(120));
    }

    // (0) Maintenance (docs/maintenance.md): a running cluster guest leaves its node by live
    // migration, counting on where it was, and the node reports itself drained.
    let roamer = dir.join("roamer.toml");
    std::fs::write(
        &roamer,
        r#"name = "roamer"
vcpus = 1
memory_mib = 256
kernel = "test/vmlinuz"
initrd = "test/initramfs.img"
cmdline = "console=ttyS0 quiet reboot=k panic=-1 pci=off hvnode-guest.count"
rng = false
"#,
    )
    .expect("write spec");
    ok(
        state,
        &[
            "cluster",
            "guest",
            "define",
            roamer.to_str().unwrap_or_default(),
        ],
    );
    // The leader places it at its next look at the cluster.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let from = loop {
        let (_, s) = hvnodectl(state, &["--json", "cluster", "status"]);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
        if let Some(node) = v["guests"]["roamer"]["node"].as_str() {
            break node.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "roamer is not placed: {s}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let to = if from == "node-a" { "node-b" } else { "node-a" };
    let before = wait_console(state, &from, "roamer", "hvnode-guest: tick 3 ");
    // TCG's slow link between the nodes needs a longer pause than the default.
    let drained = ok(
        state,
        &["node", "maintenance", &from, "on", "--downtime-ms", "2000"],
    );
    assert!(drained.contains("drained"), "{drained}");
    // On the other node it ticks on from where it was, without booting again.
    let last = ticks(&before).into_iter().max().unwrap_or(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let after = loop {
        let (_, console) = hvnodectl(state, &["guest", "console", to, "roamer"]);
        if ticks(&console).len() >= 2 {
            break console;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not tick on {to}:\n{console}"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        !after.contains("hvnode-guest: started") && ticks(&after)[0] > last,
        "the guest booted again on {to} (it ticked up to {last} on {from}):\n{after}"
    );
    let list = ok(state, &["guest", "list", &from]);
    assert!(
        !list.contains("roamer"),
        "{from} still has the guest:\n{list}"
    );
    ok(state, &["node", "maintenance", &from, "off"]);
    ok(state, &["cluster", "guest", "stop", "roamer"]);
    ok(
        state,
        &[
            "image",
            "upload",
            "node-a",
            blank.to_str().unwrap_or_default(),
            "shared:ha/data.raw",
        ],
    );
    let spec = dir.join("ha.toml");
    std::fs::write(&spec, cluster_guest_spec().replace("clustered", "ha")).expect("write spec");
    ok(
        state,
        &[
            "cluster",
            "guest",
            "define",
            spec.to_str().unwrap_or_default(),
            "--ha",
            "--stopped",
        ],
    );
    let started = ok(state, &["cluster", "guest", "start", "ha"]);
    let (mut x, x_name, mut y, y_name) = if started.contains("runs on node-a") {
        (a, "node-a", b, "node-b")
    } else {
        assert!(started.contains("runs on node-b"), "{started}");
        (b, "node-b", a, "node-a")
    };
    wait_console(state, x_name, "ha", "boots 1");

    // (1) A partition: X loses etcd, not its storage.
    let (x_mark, y_mark) = (x.mark(), y.mark());
    let cut = std::time::Instant::now();
    x.cut_etcd_link();
    let console = wait_console(state, y_name, "ha", "boots 2");
    assert!(console.contains("boots 2"), "{console}");
    let fenced = x
        .seen_at(x_mark, "fence: killed the HA guest ha")
        .unwrap_or_else(|| {
            panic!(
                "{x_name} did not kill the guest (log: {})",
                x.log_path.display()
            )
        });
    let reset = x
        .seen_at(x_mark, "SeaBIOS")
        .unwrap_or_else(|| panic!("{x_name} was not reset (log: {})", x.log_path.display()));
    let taken = y
        .seen_at(y_mark, "hvnode: ha: started ha here")
        .unwrap_or_else(|| {
            panic!(
                "{y_name} has no start on its console (log: {})",
                y.log_path.display()
            )
        });
    let s = |t: std::time::Instant| t.saturating_duration_since(cut).as_secs_f64();
    eprintln!(
        "partition of {x_name}: guest killed at +{:.1} s, node reset at +{:.1} s, guest started \
         on {y_name} at +{:.1} s",
        s(fenced),
        s(reset),
        s(taken)
    );
    assert!(
        fenced < taken && reset < taken,
        "{y_name} started the guest before {x_name} was fenced"
    );

    // (2) X is back (it kept nothing: no data disk): registered again, it joins; then Y dies.
    x.wait_for_after(x_mark, "hvnode: ready", BOOT_TIMEOUT);
    std::fs::remove_file(x.dir.join("etcd-link.cut")).expect("mend the link");
    let code = pairing_code(&console_screen(&mut x, b"3", "Pairing code"));
    let url = format!("https://127.0.0.1:{}", x.api_port);
    ok(
        state,
        &[
            "register", "node-c", "--url", &url, "--code", &code, "--yes",
        ],
    );
    // It kept nothing: the guest's kernel and initrd go onto it again.
    let guest = repo_root().join("build/guest");
    for f in ["vmlinuz", "initramfs.img"] {
        let local = guest.join(f);
        ok(
            state,
            &[
                "image",
                "upload",
                "node-c",
                local.to_str().unwrap_or_default(),
                &format!("test/{f}"),
            ],
        );
    }
    let address = format!("https://10.0.2.2:{}", x.api_port);
    ok(state, &["cluster", "join", "node-c", "--address", &address]);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let (_, s) = hvnodectl(state, &["--json", "cluster", "status"]);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
        let healthy = v["domains"]["shared"]["members"]["node-c"]["healthy"] == true;
        if v["members"]["node-c"].is_object() && healthy {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-c did not join with the domain mounted:\n{s}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    x.wait_for_after(x_mark, "armed (8 s)", Duration::from_secs(120));
    let c_mark = x.mark();
    let died = std::time::Instant::now();
    y.kill_now();
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let (_, console) = hvnodectl(state, &["guest", "console", "node-c", "ha"]);
        if console.contains("boots 3") {
            break;
        }
        if std::time::Instant::now() > deadline {
            let (_, status) = hvnodectl(state, &["--json", "cluster", "status"]);
            let (_, show) = hvnodectl(state, &["--json", "guest", "show", "node-c", "ha"]);
            panic!(
                "no \"boots 3\" from ha on node-c within 600 s after {y_name} died:\n\
                 console: {console}\nstatus: {status}\nguest: {show}"
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let taken = x
        .seen_at(c_mark, "hvnode: ha: started ha here")
        .unwrap_or_else(|| panic!("node-c has no start on its console"));
    eprintln!(
        "failover after {y_name} died: guest started on node-c {:.1} s later",
        taken.saturating_duration_since(died).as_secs_f64()
    );
    ok(state, &["cluster", "guest", "stop", "ha"]);
    let status = x.power_button_and_wait(POWEROFF_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");
    x.assert_clean_console();
}
