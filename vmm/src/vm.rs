//! Building the VM and running its vCPUs until the guest powers off, reboots or crashes.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hvnode_api::vmm::{VmConfig, VmRunState, VmStats, VmmRequest, VmmResponse};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::serial::SerialOut;
use crate::{acpi, boot};

const SERIAL_BASE: u16 = 0x3f8;
const SERIAL_IRQ: u32 = 4;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Errors setting up or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Invalid configuration.
    #[error("Invalid VM configuration: {0}")]
    Config(String),
    /// /dev/kvm could not be used.
    #[error("KVM: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    /// Guest memory.
    #[error("Guest memory: {0}")]
    Memory(String),
    /// A file of the VM (kernel, initrd, log, socket).
    #[error("{0}: {1}")]
    File(String, std::io::Error),
    /// The kernel could not be loaded.
    #[error("Loading the kernel: {0}")]
    Kernel(String),
    /// ACPI tables.
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
}

/// Why the VM ended; the binary maps it to its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off, or a client asked to stop (exit 0).
    PowerOff,
    /// The guest asked for a reset (exit 3: the agent starts it again).
    Reboot,
    /// The guest crashed or KVM failed (exit 2).
    Crash(String),
}

/// An eventfd wired to a GSI with KVM_IRQFD: the serial port's interrupt line.
struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

type Console = Serial<IrqLine, vm_superio::serial::NoEvents, SerialOut>;

/// Counters the control socket reports.
#[derive(Default)]
struct Counters {
    io: AtomicU64,
    mmio: AtomicU64,
    serial_bytes: AtomicU64,
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &str,
) -> Result<
    (
        u64,
        u64,
        Option<linux_loader::loader::bootparam::setup_header>,
    ),
    VmError,
> {
    let file_err = |e| VmError::File(format!("kernel {path}"), e);
    let mut f = File::open(path).map_err(file_err)?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).map_err(file_err)?;
    f.seek(SeekFrom::Start(0)).map_err(file_err)?;
    if &magic == b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(boot::HIMEM)))
            .map_err(|e| VmError::Kernel(format!("ELF {path}: {e}")))?;
        Ok((r.kernel_load.0, r.kernel_end, None))
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(boot::HIMEM)))
            .map_err(|e| VmError::Kernel(format!("bzImage {path}: {e}")))?;
        // The 64-bit entry point of a bzImage is 0x200 past where it was loaded.
        Ok((r.kernel_load.0 + 0x200, r.kernel_end, r.setup_header))
    }
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &str,
    mem_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), VmError> {
    let data = std::fs::read(path).map_err(|e| VmError::File(format!("initrd {path}"), e))?;
    let addr = boot::initrd_addr(mem_size, kernel_end, data.len() as u64).ok_or_else(|| {
        VmError::Config(format!(
            "initrd {path} ({} bytes) does not fit in guest memory above the kernel",
            data.len()
        ))
    })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| VmError::Memory(e.to_string()))?;
    Ok((addr, data.len() as u64))
}

fn setup_vcpu(kvm: &Kvm, vm: &VmFd, id: u32, entry: u64) -> Result<VcpuFd, VmError> {
    let vcpu = vm.create_vcpu(u64::from(id))?;
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Without the hypervisor bit a nested guest cannot calibrate its clock.
                e.ecx |= 1 << 31;
                e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
            }
            0xb => e.edx = id,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)?;
    let sregs = boot::long_mode_sregs(vcpu.get_sregs()?);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&boot::entry_regs(entry))?;
    vcpu.set_fpu(&boot::fpu())?;
    // LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them.
    let mut lapic = vcpu.get_lapic()?;
    for (offset, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)?;
    Ok(vcpu)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn control_loop(
    listener: UnixListener,
    config: VmConfig,
    started: Instant,
    counters: Arc<Counters>,
    exit: mpsc::Sender<ExitReason>,
) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(mut w) = conn.try_clone() else {
            continue;
        };
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            let resp = match serde_json::from_str::<VmmRequest>(&line) {
                Err(e) => VmmResponse::Error {
                    code: "bad_request".into(),
                    message: format!("Invalid request: {e}"),
                },
                Ok(VmmRequest::Describe) => VmmResponse::Description {
                    config: config.clone(),
                    state: VmRunState::Running,
                    uptime_secs: started.elapsed().as_secs(),
                },
                Ok(VmmRequest::Stats) => {
                    let mut exits = std::collections::BTreeMap::new();
                    exits.insert("io".to_owned(), counters.io.load(Ordering::Relaxed));
                    exits.insert("mmio".to_owned(), counters.mmio.load(Ordering::Relaxed));
                    let mut serial = std::collections::BTreeMap::new();
                    serial.insert("tx_bytes".to_owned(), counters.serial_bytes.load(Ordering::Relaxed));
                    let mut devices = std::collections::BTreeMap::new();
                    devices.insert("serial".to_owned(), serial);
                    VmmResponse::Stats {
                        stats: VmStats {
                            vcpu_exits: vec![exits],
                            devices,
                            memory_bytes: config.memory_mib << 20,
                            rss_bytes: rss_bytes(),
                        },
                    }
                }
                Ok(VmmRequest::Stop) => {
                    let _ = writeln!(w, "{}", serde_json::to_string(&VmmResponse::Ok).unwrap_or_default());
                    let _ = exit.send(ExitReason::PowerOff);
                    return;
                }
                Ok(op @ (VmmRequest::Pause | VmmRequest::Resume | VmmRequest::Shutdown)) => VmmResponse::Error {
                    code: "unsupported".into(),
                    message: format!("{op:?} is not supported by this VMM yet (no vCPU parking, no i8042 keyboard); use stop"),
                },
            };
            if writeln!(w, "{}", serde_json::to_string(&resp).unwrap_or_default()).is_err() {
                break;
            }
        }
    }
}

fn console_loop(
    listener: UnixListener,
    clients: Arc<Mutex<Vec<UnixStream>>>,
    console: Arc<Mutex<Console>>,
) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(out) = conn.try_clone() else { continue };
        let _ = out.set_nonblocking(true);
        clients.lock().unwrap_or_else(|e| e.into_inner()).push(out);
        let console = Arc::clone(&console);
        std::thread::spawn(move || {
            let mut conn = conn;
            let mut buf = [0u8; 64];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = console
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .enqueue_raw_bytes(&buf[..n]);
            }
        });
    }
}

fn bind(path: &str) -> Result<UnixListener, VmError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| VmError::File(format!("socket {path}"), e))
}

fn vcpu_loop(
    mut vcpu: VcpuFd,
    console: Arc<Mutex<Console>>,
    counters: Arc<Counters>,
    exit: mpsc::Sender<ExitReason>,
) {
    let reason = loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                counters.io.fetch_add(1, Ordering::Relaxed);
                let value = data.first().copied().unwrap_or(0);
                match port {
                    p if (SERIAL_BASE..SERIAL_BASE + 8).contains(&p) => {
                        if p == SERIAL_BASE {
                            counters.serial_bytes.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = console
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .write((p - SERIAL_BASE) as u8, value);
                    }
                    I8042_COMMAND if value == I8042_RESET => break ExitReason::Reboot,
                    acpi::SLEEP_CONTROL_PORT if acpi::is_poweroff_request(value) => {
                        break ExitReason::PowerOff
                    }
                    _ => {}
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                counters.io.fetch_add(1, Ordering::Relaxed);
                let value = match port {
                    p if (SERIAL_BASE..SERIAL_BASE + 8).contains(&p) => console
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .read((p - SERIAL_BASE) as u8),
                    // CMOS reads as zero so that probes of absent hardware fail fast.
                    0x70 | 0x71 => 0,
                    _ => 0xff,
                };
                data.fill(value);
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                counters.mmio.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
            Ok(VcpuExit::MmioWrite(..)) => {
                counters.mmio.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => {
                break ExitReason::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break ExitReason::Crash(format!(
                    "VM entry failed on cpu {cpu}: reason {reason:#x}"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                break ExitReason::Crash("KVM internal error (emulation failure)".into())
            }
            Ok(other) => break ExitReason::Crash(format!("unexpected vCPU exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => break ExitReason::Crash(format!("KVM_RUN: {e}")),
        }
    };
    let _ = exit.send(reason);
}

/// Builds the VM described by `config` and runs it until it ends.
pub fn run(config: &VmConfig) -> Result<ExitReason, VmError> {
    if config.vcpus == 0 || config.vcpus > 254 {
        return Err(VmError::Config(format!(
            "vcpus {}: use 1-254",
            config.vcpus
        )));
    }
    let mem_size = config.memory_mib << 20;
    if !(16 << 20..=boot::MAX_RAM).contains(&mem_size) {
        return Err(VmError::Config(format!(
            "memory_mib {}: use 16-{} (larger guests need the MMIO hole split, not done yet)",
            config.memory_mib,
            boot::MAX_RAM >> 20
        )));
    }
    if !config.disks.is_empty() || !config.nets.is_empty() || config.rng {
        return Err(VmError::Config(
            "virtio devices (disks, nets, rng) are not implemented in this VMM yet".into(),
        ));
    }
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    vm.set_tss_address(0xfffb_d000)?;
    vm.create_irq_chip()?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .map_err(|e| VmError::Memory(e.to_string()))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| VmError::Memory(e.to_string()))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_size,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is the whole mmap of `mem`, which lives until the process exits
    // (vCPU threads run until then and `run` never returns while they do).
    unsafe { vm.set_user_memory_region(region)? };
    let mem = Box::leak(Box::new(mem));

    let (entry, kernel_end, header) = load_kernel(mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(p) => Some(load_initrd(mem, p, mem_size, kernel_end)?),
        None => None,
    };
    let mut cmdline =
        Cmdline::new(boot::CMDLINE_MAX).map_err(|e| VmError::Config(e.to_string()))?;
    cmdline
        .insert_str(&config.cmdline)
        .map_err(|e| VmError::Config(format!("kernel command line: {e}")))?;
    let cmdline_len = config.cmdline.len();
    linux_loader::loader::load_cmdline(mem, GuestAddress(boot::CMDLINE), &cmdline)
        .map_err(|e| VmError::Kernel(e.to_string()))?;
    let tables = acpi::build_tables(config.vcpus, &[])?;
    for (addr, blob) in &tables.blobs {
        mem.write_slice(blob, GuestAddress(*addr))
            .map_err(|e| VmError::Memory(e.to_string()))?;
    }
    boot::write_tables(mem).map_err(|e| VmError::Memory(e.to_string()))?;
    boot::write_zero_page(
        mem,
        &boot::ZeroPage {
            header,
            cmdline_len,
            initrd,
            mem_size,
            rsdp: tables.rsdp_addr,
        },
    )
    .map_err(|e| VmError::Kernel(format!("zero page: {e}")))?;

    let clients = Arc::new(Mutex::new(Vec::new()));
    let out = SerialOut::new(config.serial_log.as_deref(), Arc::clone(&clients))
        .map_err(|e| VmError::File("serial log".into(), e))?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::File("eventfd".into(), e))?;
    vm.register_irqfd(&irq, SERIAL_IRQ)?;
    let console = Arc::new(Mutex::new(Serial::new(IrqLine(irq), out)));
    let counters = Arc::new(Counters::default());
    let (exit_tx, exit_rx) = mpsc::channel();

    if let Some(path) = &config.serial_socket {
        let l = bind(path)?;
        let (c, s) = (Arc::clone(&clients), Arc::clone(&console));
        std::thread::spawn(move || console_loop(l, c, s));
    }
    if let Some(path) = &config.control_socket {
        let l = bind(path)?;
        let (cfg, cnt, tx) = (config.clone(), Arc::clone(&counters), exit_tx.clone());
        let started = Instant::now();
        std::thread::spawn(move || control_loop(l, cfg, started, cnt, tx));
    }
    for id in 0..config.vcpus {
        let vcpu = setup_vcpu(&kvm, &vm, id, entry)?;
        let (c, n, tx) = (Arc::clone(&console), Arc::clone(&counters), exit_tx.clone());
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(vcpu, c, n, tx))
            .map_err(|e| VmError::File("vCPU thread".into(), e))?;
    }
    drop(exit_tx);
    // The VM and its fds stay alive until the process exits with the reason.
    let reason = exit_rx
        .recv()
        .unwrap_or(ExitReason::Crash("all vCPU threads ended".into()));
    std::mem::forget(vm);
    Ok(reason)
}
