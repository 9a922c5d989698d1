//! Building the VM and running its vCPUs until the guest powers off, reboots or crashes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hvnode_api::vmm::VmConfig;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::Kvm;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::control::{self, control_loop, signal_loop, Controller, DeviceStats};
use crate::i8042::I8042;
use crate::serial::{SerialOut, SerialStats};
use crate::vcpu::{install_kick_handler, setup_vcpu, PortDevices, Vcpu, Vcpus};
use crate::{acpi, boot};

const SERIAL_IRQ: u32 = 4;
const KEYBOARD_IRQ: u32 = 1;

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
    /// Signal masks or handlers.
    #[error("Signals: {0}")]
    Signals(String),
    /// virtio devices (disk images, taps).
    #[error("virtio devices: {0}")]
    Devices(#[from] crate::devices::bus::SetupError),
}

/// Why the VM ended; the binary maps it to its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off, or reset after a shutdown request (exit 0).
    PowerOff,
    /// The VMM stopped the guest: a stop request, a signal, or a shutdown that took too long
    /// (exit 0).
    Stopped(String),
    /// The guest asked for a reset (exit 3: the agent starts it again).
    Reboot,
    /// The guest crashed or KVM failed (exit 2).
    Crash(String),
}

/// An eventfd wired to a GSI with KVM_IRQFD: a device's interrupt line.
#[derive(Debug)]
pub(crate) struct IrqLine(EventFd);

impl IrqLine {
    fn new(vm: &kvm_ioctls::VmFd, gsi: u32) -> Result<Self, VmError> {
        let fd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::File("eventfd".into(), e))?;
        vm.register_irqfd(&fd, gsi)?;
        Ok(IrqLine(fd))
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

pub(crate) type Console = Serial<IrqLine, vm_superio::serial::NoEvents, SerialOut>;
pub(crate) type Keyboard = I8042<IrqLine>;

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

fn console_loop(
    listener: UnixListener,
    clients: Arc<Mutex<Vec<UnixStream>>>,
    console: Arc<Mutex<Console>>,
    stats: Arc<SerialStats>,
) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(out) = conn.try_clone() else { continue };
        clients.lock().unwrap_or_else(|e| e.into_inner()).push(out);
        let (console, stats) = (Arc::clone(&console), Arc::clone(&stats));
        std::thread::spawn(move || {
            let mut conn = conn;
            let mut buf = [0u8; 64];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stats.received(n);
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

/// Builds the VM described by `config` and runs it until it ends.
pub fn run(config: &VmConfig) -> Result<ExitReason, VmError> {
    // Before any thread starts, so that every thread inherits the mask.
    control::block_termination_signals()?;
    install_kick_handler()?;
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
    // Before KVM, so that a bad image, tap or bridge fails the start with its name.
    let virtio = crate::devices::DeviceSet::open(config)?;
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
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
    // Guest memory is registered before the irqchip exists: on this nested KVM the first memory
    // slot added after KVM_CREATE_IRQCHIP costs 4-7 ms, the same slot added before it 0.2 ms.
    vm.set_tss_address(0xfffb_d000)?;
    vm.create_irq_chip()?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })?;
    let mem = Box::leak(Box::new(mem));
    let mmio = Arc::new(virtio.attach(&vm, mem)?);

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
    let tables = acpi::build_tables(config.vcpus, &mmio.acpi_devices())?;
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
    let serial_stats = Arc::new(SerialStats::default());
    let out = SerialOut::new(
        config.serial_log.as_deref(),
        Arc::clone(&clients),
        Arc::clone(&serial_stats),
    )
    .map_err(|e| VmError::File("serial log".into(), e))?;
    let console = Arc::new(Mutex::new(Serial::new(IrqLine::new(&vm, SERIAL_IRQ)?, out)));
    let keyboard = Arc::new(Mutex::new(I8042::new(IrqLine::new(&vm, KEYBOARD_IRQ)?)));
    let ports = Arc::new(PortDevices {
        console: Arc::clone(&console),
        i8042: Arc::clone(&keyboard),
    });
    let devices: Vec<Arc<dyn DeviceStats>> =
        vec![Arc::clone(&serial_stats) as _, Arc::clone(&mmio) as _];
    let vcpus = Arc::new(Vcpus::new(config.vcpus as usize));
    let (exit_tx, exit_rx) = mpsc::channel();
    let controller = Arc::new(Controller {
        config: config.clone(),
        started: Instant::now(),
        vcpus: Arc::clone(&vcpus),
        keyboard,
        devices,
        exit: exit_tx.clone(),
    });

    if let Some(path) = &config.serial_socket {
        let l = bind(path)?;
        let (c, s, st) = (Arc::clone(&clients), Arc::clone(&console), serial_stats);
        std::thread::spawn(move || console_loop(l, c, s, st));
    }
    if let Some(path) = &config.control_socket {
        let l = bind(path)?;
        let ctl = Arc::clone(&controller);
        std::thread::spawn(move || control_loop(l, ctl));
    }
    std::thread::spawn(move || signal_loop(controller));
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for id in 0..config.vcpus {
        vcpus.spawn(Vcpu {
            fd: setup_vcpu(&vm, &cpuid, id, entry)?,
            index: id as usize,
            ports: Arc::clone(&ports),
            mmio: Arc::clone(&mmio),
            vcpus: Arc::clone(&vcpus),
            exit: exit_tx.clone(),
        })?;
    }
    drop(exit_tx);
    // The VM and its fds stay alive until the process exits with the reason.
    let reason = exit_rx
        .recv()
        .unwrap_or(ExitReason::Crash("all vCPU threads ended".into()));
    std::mem::forget(vm);
    Ok(reason)
}
