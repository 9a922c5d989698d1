//! Building the VM, afresh or from a snapshot, and running its vCPUs until the guest powers off,
//! reboots or crashes.

use crate::memory::GuestRam;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hvnode_api::vmm::VmConfig;
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::Kvm;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::control::{self, control_loop, signal_loop, Controller, Machine};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{console_from_state, console_loop, SerialOut, SerialStats};
use crate::devices::legacy::{self, IrqLine};
use crate::devices::DeviceStats;
use crate::error::VmError;
use crate::exit::ExitReason;
use crate::migration::receive;
use crate::persist::kvm::{restore_vcpu, restore_vm};
use crate::persist::snapshot::{self, RestoreError, Snapshot};
use crate::persist::VmState;
use crate::vcpu::{install_kick_handler, setup_vcpu, Vcpu, Vcpus};
use crate::{acpi, boot};

/// An eventfd wired to `gsi` with KVM_IRQFD: a legacy device's interrupt line.
fn irq_line(vm: &kvm_ioctls::VmFd, gsi: u32) -> Result<IrqLine, VmError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::File("eventfd".into(), e))?;
    vm.register_irqfd(&fd, gsi)?;
    Ok(IrqLine::new(fd))
}

/// The kernel and initrd of a guest that boots, opened before the jail (which has neither).
struct BootFiles {
    kernel: File,
    initrd: Option<File>,
}

impl BootFiles {
    fn open(config: &VmConfig) -> Result<BootFiles, VmError> {
        let kernel = File::open(&config.kernel)
            .map_err(|e| VmError::File(format!("kernel {}", config.kernel), e))?;
        let initrd = match &config.initrd {
            Some(p) => Some(File::open(p).map_err(|e| VmError::File(format!("initrd {p}"), e))?),
            None => None,
        };
        Ok(BootFiles { kernel, initrd })
    }
}

fn load_kernel(
    mem: &GuestRam,
    path: &str,
    mut f: File,
) -> Result<
    (
        u64,
        u64,
        Option<linux_loader::loader::bootparam::setup_header>,
    ),
    VmError,
> {
    let file_err = |e| VmError::File(format!("kernel {path}"), e);
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
    mem: &GuestRam,
    path: &str,
    mut file: File,
    mem_size: u64,
    initrd_addr_max: Option<u32>,
    kernel_end: u64,
) -> Result<(u64, u64), VmError> {
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(|e| VmError::File(format!("initrd {path}"), e))?;
    let size = data.len() as u64;
    let addr = boot::initrd_addr(mem_size, initrd_addr_max, kernel_end, size).ok_or_else(|| {
        VmError::Config(format!(
            "initrd {path} ({size} bytes) does not fit in guest memory between the kernel and \
             the MMIO hole (or the kernel's initrd_addr_max)"
        ))
    })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| VmError::Memory(e.to_string()))?;
    Ok((addr, data.len() as u64))
}

fn bind(path: &str) -> Result<UnixListener, VmError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| VmError::File(format!("socket {path}"), e))
}

/// Maps `mem_size` bytes of guest RAM (around the MMIO hole, see [`boot::ram_ranges`]).
///
/// The mappings are anonymous, private and MAP_NORESERVE (vm-memory's default): the host
/// commits a page only when the guest or a device first touches it, so a guest costs what it
/// uses, not its size. A size the host cannot map at all fails here.
fn guest_memory(memory_mib: u64, mem_size: u64) -> Result<GuestRam, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = boot::ram_ranges(mem_size)
        .iter()
        .map(|r| usize::try_from(r.size).map(|size| (GuestAddress(r.start), size)))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            VmError::Memory(format!(
                "memory_mib {memory_mib} does not fit the host's address space"
            ))
        })?;
    GuestRam::from_ranges(&ranges).map_err(|e| {
        VmError::Memory(format!(
            "memory_mib {memory_mib} cannot be mapped on this host: {e}"
        ))
    })
}

/// Refuses a guest whose RAM would end above what its vCPUs can address (CPUID 0x8000_0008):
/// the guest could never reach it.
fn check_phys_bits(cpuid: &CpuId, memory_mib: u64, mem_size: u64) -> Result<(), VmError> {
    let Some(bits) = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| e.eax & 0xff)
        .filter(|&b| (32..64).contains(&b))
    else {
        return Ok(());
    };
    match boot::ram_end(mem_size) {
        Some(end) if end <= 1 << bits => Ok(()),
        _ => Err(VmError::Config(format!(
            "memory_mib {memory_mib}: guest RAM would end above the vCPUs' {bits}-bit physical \
             address space"
        ))),
    }
}

/// Whether the vCPUs have 1 GiB pages (CPUID 0x8000_0001 EDX bit 26, pdpe1gb).
fn has_gib_pages(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0)
}

/// Loads the kernel, the initrd, the command line, the ACPI tables, the page tables and the
/// zero page of a fresh guest; returns the kernel's 64-bit entry point.
fn load_guest(
    config: &VmConfig,
    files: BootFiles,
    mem: &GuestRam,
    mem_size: u64,
    mmio: &crate::devices::MmioBus,
    cpuid: &CpuId,
) -> Result<u64, VmError> {
    let (entry, kernel_end, header) = load_kernel(mem, &config.kernel, files.kernel)?;
    let initrd = match (&config.initrd, files.initrd) {
        (Some(p), Some(file)) => {
            let addr_max = header.map(|h| h.initrd_addr_max);
            Some(load_initrd(mem, p, file, mem_size, addr_max, kernel_end)?)
        }
        _ => None,
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
    boot::write_tables(mem, has_gib_pages(cpuid)).map_err(|e| VmError::Memory(e.to_string()))?;
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
    Ok(entry)
}

fn restoring(what: impl Into<String>, e: impl std::fmt::Display) -> VmError {
    VmError::Restore(RestoreError::Device(what.into(), e.to_string()))
}

/// Builds the VM described by `config` and runs it until it ends.
pub fn run(config: &VmConfig) -> Result<ExitReason, VmError> {
    run_from(config, Origin::Boot)
}

/// Where a VM's guest comes from.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// Booted afresh from its kernel.
    Boot,
    /// Resumed from the snapshot in this directory (see [`crate::persist::snapshot`]).
    Restore(&'a Path),
    /// Received from a migrating VMM through the one connection accepted on this unix socket
    /// (see [`crate::migration`]).
    Incoming(&'a Path),
}

/// The guest's memory and state as it starts.
struct Arrival {
    mem: GuestRam,
    state: Option<VmState>,
    /// For an incoming guest: the stream, answered once the vCPUs run.
    incoming: Option<(UnixStream, Instant)>,
}

/// Builds the VM described by `config`, booting it afresh, resuming it from a snapshot or
/// receiving it from a migrating VMM (see [`Origin`]), and runs it until it ends. A restored or
/// received guest runs at once, from where it stood.
pub fn run_from(config: &VmConfig, origin: Origin<'_>) -> Result<ExitReason, VmError> {
    // Before any thread starts, so that every thread inherits the mask.
    control::block_termination_signals()?;
    install_kick_handler()?;
    crate::seccomp::empty_capability_bounding_set()?;
    if config.vcpus == 0 || config.vcpus > 254 {
        return Err(VmError::Config(format!(
            "vcpus {}: use 1-254",
            config.vcpus
        )));
    }
    let mem_size = match config.memory_mib.checked_mul(1 << 20) {
        Some(size) if size < boot::MIN_RAM => {
            return Err(VmError::Config(format!(
                "memory_mib {}: use at least {}",
                config.memory_mib,
                boot::MIN_RAM >> 20
            )))
        }
        Some(size) if boot::ram_end(size).is_some() => size,
        _ => {
            return Err(VmError::Config(format!(
                "memory_mib {}: more than any host can map",
                config.memory_mib
            )))
        }
    };
    // Before anything is opened: a snapshot that does not fit fails the start first.
    let snapshot: Option<Snapshot> = match origin {
        Origin::Restore(dir) => Some(snapshot::open(dir, config, mem_size)?),
        _ => None,
    };
    // The sender may connect as soon as we start; it waits until the VM is built.
    let incoming = match origin {
        Origin::Incoming(path) => Some(bind(&path.to_string_lossy())?),
        _ => None,
    };
    // Before KVM, so that a bad image, tap or bridge fails the start with its name.
    let virtio = crate::devices::DeviceSet::open(config)?;
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    check_phys_bits(&cpuid, config.memory_mib, mem_size)?;
    let msr_indices = kvm.get_msr_index_list()?.as_slice().to_vec();
    let mem = match &snapshot {
        Some(s) => snapshot::map_memory(&s.memory, mem_size)?,
        None => guest_memory(config.memory_mib, mem_size)?,
    };
    // Guest memory is registered before the irqchip exists: on this nested KVM the first memory
    // slot added after KVM_CREATE_IRQCHIP costs 4-7 ms, the same slot added before it 0.2 ms.
    crate::memory::register(&vm, &mem, false)?;
    vm.set_tss_address(0xfffb_d000)?;
    vm.create_irq_chip()?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })?;
    // Everything that names a path is opened before a guest is received: the receiving VMM
    // drops root first (below).
    let clients = Arc::new(Mutex::new(Vec::new()));
    let serial_stats = Arc::new(SerialStats::default());
    let out = SerialOut::new(
        config.serial_log.as_deref(),
        Arc::clone(&clients),
        Arc::clone(&serial_stats),
    )
    .map_err(|e| VmError::File("serial log".into(), e))?;
    let serial_listener = config.serial_socket.as_deref().map(bind).transpose()?;
    let control_listener = config.control_socket.as_deref().map(bind).transpose()?;
    // After the memory, so that a guest too large fails as such, whatever its kernel.
    let mut boot_files = match origin {
        Origin::Boot => Some(BootFiles::open(config)?),
        _ => None,
    };
    // What the control socket's stats read; the jail has no /proc.
    let statm = File::open("/proc/self/statm").ok();
    // Every path the VM needs is open, and no thread runs yet: the jail goes on before a guest
    // is received or loaded.
    if let Some(jail) = &config.jail {
        crate::jail::enter(jail)?;
    }
    let arrival = match (snapshot, incoming) {
        (Some(s), _) => Arrival {
            mem,
            state: Some(s.state),
            incoming: None,
        },
        (None, Some(listener)) => receive(config, &listener, mem, mem_size)?,
        (None, None) => Arrival {
            mem,
            state: None,
            incoming: None,
        },
    };
    let Arrival {
        mem,
        state,
        mut incoming,
    } = arrival;
    let restored = Instant::now();
    // A receiving VMM answers the sender with what failed from here on.
    let refuse = |incoming: &mut Option<(UnixStream, Instant)>, e: VmError| {
        if let Some((stream, _)) = incoming {
            receive::refuse(
                stream,
                &receive::Refused {
                    code: "restore_failed",
                    message: hvnode_api::error::chain(&e),
                },
            );
        }
        e
    };
    if let Some(s) = &state {
        restore_vm(&vm, &s.vm).map_err(|e| refuse(&mut incoming, restoring("the VM", e)))?;
    }
    let mem = Box::leak(Box::new(mem));
    let mmio = Arc::new(
        virtio
            .attach(&vm, mem)
            .map_err(|e| refuse(&mut incoming, e.into()))?,
    );
    let entry = match &state {
        Some(s) => {
            mmio.restore(&s.virtio)
                .map_err(|e| refuse(&mut incoming, restoring("the virtio devices", e)))?;
            None
        }
        None => {
            let files = boot_files
                .take()
                .ok_or_else(|| VmError::Kernel("no kernel for a guest that boots".into()))?;
            Some(load_guest(config, files, mem, mem_size, &mmio, &cpuid)?)
        }
    };

    let serial_irq = irq_line(&vm, legacy::SERIAL_GSI)?;
    let console = match &state {
        Some(s) => console_from_state(&s.serial, serial_irq, out)
            .map_err(|e| refuse(&mut incoming, restoring("the serial port", e)))?,
        None => Serial::new(serial_irq, out),
    };
    let console = Arc::new(Mutex::new(console));
    let keyboard_irq = irq_line(&vm, legacy::KEYBOARD_GSI)?;
    let keyboard = match &state {
        Some(s) => I8042::from_state(&s.i8042, keyboard_irq),
        None => I8042::new(keyboard_irq),
    };
    let keyboard = Arc::new(Mutex::new(keyboard));
    let pio = Arc::new(legacy::port_bus(&console, &keyboard)?);
    let devices: Vec<Arc<dyn DeviceStats>> =
        vec![Arc::clone(&serial_stats) as _, Arc::clone(&mmio) as _];
    let vcpus = Arc::new(Vcpus::new(config.vcpus as usize, msr_indices));
    let (exit_tx, exit_rx) = mpsc::channel();
    let vm = Arc::new(vm);
    let controller = Arc::new(
        Controller::new(
            config.clone(),
            Arc::clone(&vcpus),
            Arc::clone(&mmio),
            keyboard,
            devices,
            exit_tx.clone(),
            Machine {
                vm: Arc::clone(&vm),
                mem,
                mem_size,
                console: Arc::clone(&console),
            },
        )
        .with_statm(statm),
    );

    if let Some(l) = serial_listener {
        let (c, s, st) = (Arc::clone(&clients), Arc::clone(&console), serial_stats);
        std::thread::spawn(move || console_loop(l, c, s, st));
    }
    if let Some(l) = control_listener {
        let ctl = Arc::clone(&controller);
        std::thread::spawn(move || control_loop(l, ctl));
    }
    std::thread::spawn(move || signal_loop(controller));
    let vcpu_fds = (0..config.vcpus)
        .map(|id| match (&state, entry) {
            (Some(s), _) => {
                let fd = vm.create_vcpu(u64::from(id))?;
                restore_vcpu(&fd, &s.vcpus[id as usize])
                    .map_err(|e| restoring(format!("vCPU {id}"), e))?;
                Ok(fd)
            }
            (None, Some(entry)) => setup_vcpu(&vm, &cpuid, id, entry),
            (None, None) => Err(VmError::Kernel("no entry point".into())),
        })
        .collect::<Result<Vec<_>, VmError>>()
        .map_err(|e| refuse(&mut incoming, e))?;
    // Everything the VM needs is open and mapped: the guest runs in the sandbox from its first
    // instruction.
    crate::seccomp::lock_down(&config.name, crate::seccomp::run_as(config))
        .map_err(|e| refuse(&mut incoming, e.into()))?;
    for (index, fd) in vcpu_fds.into_iter().enumerate() {
        vcpus.spawn(Vcpu {
            fd,
            index,
            pio: Arc::clone(&pio),
            mmio: Arc::clone(&mmio),
            vcpus: Arc::clone(&vcpus),
            exit: exit_tx.clone(),
        })?;
    }
    if let Some((mut stream, received)) = incoming {
        let restore_ms = restored.elapsed().as_millis() as u64;
        if let Err(e) = receive::finish(&mut stream, restore_ms) {
            // The guest runs here; the source decides what to do without our answer (it keeps
            // its copy paused).
            eprintln!(
                "hvnode-vmm: {}: answering the migration source: {e}",
                config.name
            );
        }
        eprintln!(
            "hvnode-vmm: {}: arrived by migration, running {} ms after the last byte",
            config.name,
            received.elapsed().as_millis()
        );
        // The network learns where the guest's MACs are now.
        let (announced, failed) = mmio.announce();
        for (device, e) in failed {
            eprintln!("hvnode-vmm: {}: announcing on {device}: {e}", config.name);
        }
        if announced > 0 {
            eprintln!(
                "hvnode-vmm: {}: announced the guest's MAC on {announced} NIC(s)",
                config.name
            );
        }
    }
    drop(exit_tx);
    // The VM and its fds stay alive until the process exits with the reason (the controller
    // holds the VM too).
    let reason = exit_rx
        .recv()
        .unwrap_or(ExitReason::Crash("all vCPU threads ended".into()));
    std::mem::forget(vm);
    Ok(reason)
}

/// Drops root, then takes the guest from the one connection accepted on `listener`.
fn receive(
    config: &VmConfig,
    listener: &UnixListener,
    mem: GuestRam,
    mem_size: u64,
) -> Result<Arrival, VmError> {
    // Whatever the stream holds is parsed without root (the filter comes once the VM is built).
    crate::seccomp::drop_privileges(crate::seccomp::run_as(config))?;
    let (mut stream, _) = listener
        .accept()
        .map_err(|e| VmError::File("accepting the incoming migration".into(), e))?;
    let arrived = receive::receive(&mut stream, config, &mem, mem_size)
        .map_err(|e| VmError::Incoming(e.to_string()))?;
    Ok(Arrival {
        mem,
        state: Some(arrived.state),
        incoming: Some((stream, Instant::now())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn cpuid(function: u32, eax: u32, edx: u32) -> CpuId {
        CpuId::from_entries(&[kvm_cpuid_entry2 {
            function,
            eax,
            edx,
            ..Default::default()
        }])
        .unwrap()
    }

    #[test]
    fn refuses_ram_beyond_the_vcpus_physical_address_bits() {
        let bits39 = cpuid(0x8000_0008, 0x3027, 0);
        // 39 bits: 512 GiB. A 510 GiB guest ends at 511 GiB (past the hole), a 512 GiB one at 513.
        assert!(check_phys_bits(&bits39, 510 << 10, 510 << 30).is_ok());
        let err = check_phys_bits(&bits39, 512 << 10, 512 << 30).unwrap_err();
        assert!(err.to_string().contains("39-bit"), "{err}");
        // No leaf 0x8000_0008: nothing to check against.
        assert!(check_phys_bits(&cpuid(0, 0, 0), 512 << 10, 512 << 30).is_ok());
    }

    #[test]
    fn reads_1_gib_pages_from_cpuid() {
        assert!(has_gib_pages(&cpuid(0x8000_0001, 0, 1 << 26)));
        assert!(!has_gib_pages(&cpuid(0x8000_0001, 0, !(1 << 26))));
        assert!(!has_gib_pages(&cpuid(0x8000_0008, 0, 1 << 26)));
    }
}
