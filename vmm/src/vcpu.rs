//! vCPU threads: setting each vCPU up and running it, dispatching its port and MMIO exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::vm::{Console, ExitReason, VmError};
use crate::{acpi, boot};

const SERIAL_BASE: u16 = 0x3f8;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Counters the control socket reports.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) io: AtomicU64,
    pub(crate) mmio: AtomicU64,
    pub(crate) serial_bytes: AtomicU64,
}

pub(crate) fn setup_vcpu(kvm: &Kvm, vm: &VmFd, id: u32, entry: u64) -> Result<VcpuFd, VmError> {
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

pub(crate) fn vcpu_loop(
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
