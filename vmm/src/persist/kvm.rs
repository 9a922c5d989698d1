//! The KVM side of the state: each vCPU's registers, LAPIC, MSRs, events and CPUID, and the
//! VM's interrupt controllers, PIT and clock, as named fields (the kernel structures' own names)
//! rather than the structures' raw bytes, so that a state file says what it holds and a newer
//! kernel's layout does not leak into it.
//!
//! The order of the get and set ioctls is KVM's, not ours:
//!
//! - Saving reads the MP state first (KVM_GET_MP_STATE accepts pending INIT/SIPI events into
//!   the LAPIC, which the later reads must see) and the vCPU events last (the other reads may
//!   still change what is pending).
//! - Restoring sets the CPUID first (what the other state is checked against), then MP state,
//!   regs, sregs (which also carry the APIC base MSR), XSAVE, XCRs, debug regs, the LAPIC (after
//!   sregs: its mode depends on the APIC base), the MSRs (after the LAPIC: KVM accepts the TSC
//!   deadline only from a LAPIC in TSC-deadline mode, and only after the TSC itself, so the
//!   deadline goes in a last batch), and the vCPU events last (KVM_SET_REGS drops a pending
//!   exception, which the events bring back).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_dtable, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcr, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::Hex;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Why a vCPU or the VM could not be saved or restored: what was being done and KVM's error.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    /// An ioctl failed.
    #[error("{0}: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    /// KVM took only part of a batch of MSRs.
    #[error("{0} MSR {1:#x}: KVM refused it")]
    Msr(&'static str, u32),
    /// A structure in the state does not fit KVM's (too many entries, a wrong blob size).
    #[error("{0}")]
    Invalid(String),
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, KvmStateError> {
    r.map_err(|e| KvmStateError::Ioctl(what, e))
}

/// A state type that mirrors a KVM structure `K` field by field.
trait Mirror<K> {
    fn save(k: &K) -> Self;
    fn load(&self) -> K;
}

impl<T: Copy> Mirror<T> for T {
    fn save(k: &T) -> Self {
        *k
    }
    fn load(&self) -> T {
        *self
    }
}

/// A serde struct with the fields of a KVM structure (its padding and reserved fields left out,
/// zero on the way back).
macro_rules! mirror {
    ($(#[$doc:meta])* $name:ident = $kvm:ty { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(missing_docs)]
        pub struct $name {
            $(pub $field: $ty,)*
        }

        impl Mirror<$kvm> for $name {
            fn save(k: &$kvm) -> Self {
                $name { $($field: Mirror::save(&k.$field),)* }
            }
            fn load(&self) -> $kvm {
                let mut k = <$kvm>::default();
                $(k.$field = Mirror::load(&self.$field);)*
                k
            }
        }
    };
}

mirror!(
    /// General-purpose registers (KVM_GET_REGS).
    Regs = kvm_regs {
        rax: u64, rbx: u64, rcx: u64, rdx: u64, rsi: u64, rdi: u64, rsp: u64, rbp: u64,
        r8: u64, r9: u64, r10: u64, r11: u64, r12: u64, r13: u64, r14: u64, r15: u64,
        rip: u64, rflags: u64,
    }
);

mirror!(
    /// A segment register with its hidden part.
    Segment = kvm_segment {
        base: u64, limit: u32, selector: u16, type_: u8, present: u8, dpl: u8, db: u8, s: u8,
        l: u8, g: u8, avl: u8, unusable: u8,
    }
);

mirror!(
    /// GDTR or IDTR.
    Dtable = kvm_dtable { base: u64, limit: u16 }
);

mirror!(
    /// Segment, control and descriptor-table registers (KVM_GET_SREGS).
    Sregs = kvm_sregs {
        cs: Segment, ds: Segment, es: Segment, fs: Segment, gs: Segment, ss: Segment,
        tr: Segment, ldt: Segment, gdt: Dtable, idt: Dtable,
        cr0: u64, cr2: u64, cr3: u64, cr4: u64, cr8: u64, efer: u64, apic_base: u64,
        interrupt_bitmap: [u64; 4],
    }
);

mirror!(
    /// Debug registers (KVM_GET_DEBUGREGS).
    DebugRegs = kvm_debugregs { db: [u64; 4], dr6: u64, dr7: u64, flags: u64 }
);

mirror!(
    /// A pending or injected exception.
    ExceptionEvent = kvm_bindings::kvm_vcpu_events__bindgen_ty_1 {
        injected: u8, nr: u8, has_error_code: u8, pending: u8, error_code: u32,
    }
);

mirror!(
    /// An injected interrupt and the interrupt shadow.
    InterruptEvent = kvm_bindings::kvm_vcpu_events__bindgen_ty_2 {
        injected: u8, nr: u8, soft: u8, shadow: u8,
    }
);

mirror!(
    /// NMI state.
    NmiEvent = kvm_bindings::kvm_vcpu_events__bindgen_ty_3 { injected: u8, pending: u8, masked: u8 }
);

mirror!(
    /// SMM state and a latched INIT.
    SmiEvent = kvm_bindings::kvm_vcpu_events__bindgen_ty_4 {
        smm: u8, pending: u8, smm_inside_nmi: u8, latched_init: u8,
    }
);

mirror!(
    /// A pending triple fault.
    TripleFaultEvent = kvm_bindings::kvm_vcpu_events__bindgen_ty_5 { pending: u8 }
);

mirror!(
    /// Pending and injected events (KVM_GET_VCPU_EVENTS); `flags` says which parts KVM filled
    /// and so which it takes back.
    VcpuEvents = kvm_vcpu_events {
        exception: ExceptionEvent, interrupt: InterruptEvent, nmi: NmiEvent, sipi_vector: u32,
        flags: u32, smi: SmiEvent, triple_fault: TripleFaultEvent, exception_has_payload: u8,
        exception_payload: u64,
    }
);

mirror!(
    /// One 8259 (KVM_GET_IRQCHIP, PIC master or slave).
    PicState = kvm_pic_state {
        last_irr: u8, irr: u8, imr: u8, isr: u8, priority_add: u8, irq_base: u8,
        read_reg_select: u8, poll: u8, special_mask: u8, init_state: u8, auto_eoi: u8,
        rotate_on_auto_eoi: u8, special_fully_nested_mode: u8, init4: u8, elcr: u8,
        elcr_mask: u8,
    }
);

mirror!(
    /// One PIT channel.
    PitChannel = kvm_pit_channel_state {
        count: u32, latched_count: u16, count_latched: u8, status_latched: u8, status: u8,
        read_state: u8, write_state: u8, write_latch: u8, rw_mode: u8, mode: u8, bcd: u8,
        gate: u8, count_load_time: i64,
    }
);

mirror!(
    /// The PIT (KVM_GET_PIT2).
    PitState = kvm_pit_state2 { channels: [PitChannel; 3], flags: u32 }
);

impl Mirror<[kvm_pit_channel_state; 3]> for [PitChannel; 3] {
    fn save(k: &[kvm_pit_channel_state; 3]) -> Self {
        k.each_ref().map(PitChannel::save)
    }
    fn load(&self) -> [kvm_pit_channel_state; 3] {
        self.each_ref().map(PitChannel::load)
    }
}

/// The IOAPIC (KVM_GET_IRQCHIP): registers and the 24 redirection entries as raw 64-bit values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct IoapicState {
    pub base_address: u64,
    pub ioregsel: u32,
    pub id: u32,
    pub irr: u32,
    pub redirtbl: Vec<u64>,
}

/// One CPUID leaf as the vCPU has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// An extended control register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Xcr {
    pub xcr: u32,
    pub value: u64,
}

/// An MSR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Msr {
    pub index: u32,
    pub data: u64,
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// The vCPU's CPUID (with its APIC id).
    pub cpuid: Vec<CpuidEntry>,
    /// KVM_MP_STATE_*: runnable, halted, waiting for SIPI...
    pub mp_state: u32,
    /// General-purpose registers.
    pub regs: Regs,
    /// Segment and control registers.
    pub sregs: Sregs,
    /// The XSAVE area (x87, SSE, AVX... state), 4 KiB.
    pub xsave: Hex,
    /// XCR0 and friends.
    pub xcrs: Vec<Xcr>,
    /// Debug registers.
    pub debug_regs: DebugRegs,
    /// The local APIC's register page, 1 KiB.
    pub lapic: Hex,
    /// Every MSR KVM lists as saveable and lets us read, TSC and kvmclock ones included.
    pub msrs: Vec<Msr>,
    /// Pending and injected events.
    pub events: VcpuEvents,
}

/// The VM-wide KVM state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmKvmState {
    /// The master 8259.
    pub pic_master: PicState,
    /// The slave 8259.
    pub pic_slave: PicState,
    /// The IOAPIC.
    pub ioapic: IoapicState,
    /// The PIT.
    pub pit: PitState,
    /// The kvmclock base, in nanoseconds.
    pub clock: u64,
}

const XSAVE_BYTES: usize = 4096;
const LAPIC_BYTES: usize = 1024;

fn xsave_bytes(x: &kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn lapic_bytes(l: &kvm_lapic_state) -> Vec<u8> {
    l.regs.iter().map(|&b| b as u8).collect()
}

fn blob<'a>(what: &str, h: &'a Hex, len: usize) -> Result<&'a [u8], KvmStateError> {
    if h.0.len() == len {
        Ok(&h.0)
    } else {
        Err(KvmStateError::Invalid(format!(
            "{what} is {} bytes, expected {len}",
            h.0.len()
        )))
    }
}

/// Reads MSRs `indices` in batches KVM takes; one KVM will not read (listed but not
/// supported by this vCPU model) is left out rather than failing the save.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<Msr>, KvmStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| KvmStateError::Invalid(format!("MSR batch: {e:?}")))?;
        let n = ioctl("KVM_GET_MSRS", fd.get_msrs(&mut msrs))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| Msr {
            index: e.index,
            data: e.data,
        }));
        // KVM stops at the first MSR it cannot read: skip that one and go on after it.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, msrs: &[Msr]) -> Result<(), KvmStateError> {
    for batch in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm = Msrs::from_entries(&entries)
            .map_err(|e| KvmStateError::Invalid(format!("MSR batch: {e:?}")))?;
        let n = ioctl("KVM_SET_MSRS", fd.set_msrs(&kvm))?;
        if n < batch.len() {
            return Err(KvmStateError::Msr("setting", batch[n].index));
        }
    }
    Ok(())
}

/// The state of vCPU `fd`, which must be out of KVM_RUN with its pending port or MMIO access
/// completed (see `Vcpus::save`); `msr_indices` is KVM's list of saveable MSRs.
pub fn save_vcpu(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, KvmStateError> {
    let mp_state = ioctl("KVM_GET_MP_STATE", fd.get_mp_state())?.mp_state;
    let regs = Regs::save(&ioctl("KVM_GET_REGS", fd.get_regs())?);
    let sregs = Sregs::save(&ioctl("KVM_GET_SREGS", fd.get_sregs())?);
    let xsave = Hex(xsave_bytes(&ioctl("KVM_GET_XSAVE", fd.get_xsave())?));
    let kxcrs = ioctl("KVM_GET_XCRS", fd.get_xcrs())?;
    let xcrs = kxcrs.xcrs[..(kxcrs.nr_xcrs as usize).min(kxcrs.xcrs.len())]
        .iter()
        .map(|x| Xcr {
            xcr: x.xcr,
            value: x.value,
        })
        .collect();
    let debug_regs = DebugRegs::save(&ioctl("KVM_GET_DEBUGREGS", fd.get_debug_regs())?);
    let lapic = Hex(lapic_bytes(&ioctl("KVM_GET_LAPIC", fd.get_lapic())?));
    let cpuid = ioctl("KVM_GET_CPUID2", fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?
        .as_slice()
        .iter()
        // The array comes back at full size: the unused tail is all zeros.
        .filter(|e| !(e.function == 0 && e.index == 0 && e.eax == 0 && e.flags == 0))
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect();
    let msrs = read_msrs(fd, msr_indices)?;
    let events = VcpuEvents::save(&ioctl("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?);
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// The MSRs in the order KVM takes them: everything but the TSC deadline, then the TSC
/// deadline (after the TSC, which it is relative to). A zero deadline becomes the TSC: a guest
/// whose deadline timer was disarmed just as it was saved would otherwise never get its next
/// timer interrupt (the guest re-arms it from that interrupt).
fn msr_batches(msrs: &[Msr]) -> (Vec<Msr>, Vec<Msr>) {
    let tsc = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    let (deadline, first): (Vec<Msr>, Vec<Msr>) =
        msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    let deadline = deadline
        .into_iter()
        .map(|m| match (m.data, tsc) {
            (0, Some(tsc)) => Msr { data: tsc, ..m },
            _ => m,
        })
        .collect();
    (first, deadline)
}

/// Puts `state` into the fresh vCPU `fd`, in KVM's order (see the module documentation).
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), KvmStateError> {
    let entries: Vec<_> = state
        .cpuid
        .iter()
        .map(|e| kvm_bindings::kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    let cpuid = CpuId::from_entries(&entries)
        .map_err(|e| KvmStateError::Invalid(format!("{} CPUID entries: {e:?}", entries.len())))?;
    ioctl("KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;
    ioctl(
        "KVM_SET_MP_STATE",
        fd.set_mp_state(kvm_mp_state {
            mp_state: state.mp_state,
        }),
    )?;
    ioctl("KVM_SET_REGS", fd.set_regs(&state.regs.load()))?;
    ioctl("KVM_SET_SREGS", fd.set_sregs(&state.sregs.load()))?;
    let bytes = blob("the XSAVE area", &state.xsave, XSAVE_BYTES)?;
    let mut xsave = kvm_xsave::default();
    for (w, b) in xsave.region.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    // SAFETY: a kvm_xsave of the legacy 4 KiB size, without the extra area that only
    // KVM_GET_XSAVE2 fills: KVM_SET_XSAVE reads exactly that struct.
    ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave(&xsave) })?;
    let mut xcrs = kvm_xcrs::default();
    if state.xcrs.len() > xcrs.xcrs.len() {
        return Err(KvmStateError::Invalid(format!(
            "{} XCRs, at most {}",
            state.xcrs.len(),
            xcrs.xcrs.len()
        )));
    }
    xcrs.nr_xcrs = state.xcrs.len() as u32;
    for (k, x) in xcrs.xcrs.iter_mut().zip(&state.xcrs) {
        *k = kvm_xcr {
            xcr: x.xcr,
            value: x.value,
            ..Default::default()
        };
    }
    // A host without XSAVE (QEMU's qemu64 CPU, say) reports no XCRs and refuses KVM_SET_XCRS
    // (EINVAL) even with none: a state without XCRs skips it. A state with XCRs on such a host
    // is refused by KVM, as it must be (the CPUs differ).
    if !state.xcrs.is_empty() {
        ioctl("KVM_SET_XCRS", fd.set_xcrs(&xcrs))?;
    }
    ioctl(
        "KVM_SET_DEBUGREGS",
        fd.set_debug_regs(&state.debug_regs.load()),
    )?;
    let bytes = blob("the LAPIC page", &state.lapic, LAPIC_BYTES)?;
    let mut lapic = kvm_lapic_state::default();
    for (r, &b) in lapic.regs.iter_mut().zip(bytes) {
        *r = b as _;
    }
    ioctl("KVM_SET_LAPIC", fd.set_lapic(&lapic))?;
    let (first, deadline) = msr_batches(&state.msrs);
    write_msrs(fd, &first)?;
    write_msrs(fd, &deadline)?;
    ioctl(
        "KVM_SET_VCPU_EVENTS",
        fd.set_vcpu_events(&state.events.load()),
    )?;
    // Tells a kvmclock guest it was stopped, so that its watchdogs do not count the time it
    // spent in the snapshot as a lock-up. A guest that has not set kvmclock up (EINVAL) or a
    // host without the ioctl (ENOTSUP, ENOTTY) has nothing to be told.
    match fd.kvmclock_ctrl() {
        Err(e) if ![libc::EINVAL, libc::ENOTSUP, libc::ENOTTY].contains(&e.errno()) => {
            Err(KvmStateError::Ioctl("KVM_KVMCLOCK_CTRL", e))
        }
        _ => Ok(()),
    }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    ioctl("KVM_GET_IRQCHIP", vm.get_irqchip(&mut chip))?;
    Ok(chip)
}

/// The interrupt controllers, PIT and clock of `vm`, whose vCPUs are all out of KVM_RUN.
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, KvmStateError> {
    let master = get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?;
    let slave = get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?;
    let ioapic = get_chip(vm, KVM_IRQCHIP_IOAPIC)?;
    // SAFETY: KVM filled the union member that `chip_id` names; every bit pattern is a valid
    // value of these plain-integer structures.
    let (master, slave, ioapic) = unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
    let redirtbl = ioapic
        .redirtbl
        .iter()
        // SAFETY: `bits` covers the whole of every redirection entry.
        .map(|e| unsafe { e.bits })
        .collect();
    Ok(VmKvmState {
        pic_master: PicState::save(&master),
        pic_slave: PicState::save(&slave),
        ioapic: IoapicState {
            base_address: ioapic.base_address,
            ioregsel: ioapic.ioregsel,
            id: ioapic.id,
            irr: ioapic.irr,
            redirtbl,
        },
        pit: PitState::save(&ioctl("KVM_GET_PIT2", vm.get_pit2())?),
        clock: ioctl("KVM_GET_CLOCK", vm.get_clock())?.clock,
    })
}

/// Puts `state` into `vm`, whose irqchip and PIT exist and whose vCPUs have not run.
///
/// The clock goes back to where it stood at the snapshot, without KVM_CLOCK_REALTIME: the
/// guest sees no time pass while it was saved, as after a pause.
pub fn restore_vm(vm: &VmFd, state: &VmKvmState) -> Result<(), KvmStateError> {
    for (chip_id, pic) in [
        (KVM_IRQCHIP_PIC_MASTER, &state.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        chip.chip.pic = pic.load();
        ioctl("KVM_SET_IRQCHIP", vm.set_irqchip(&chip))?;
    }
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    let s = &state.ioapic;
    // SAFETY: writing the IOAPIC member of a zeroed union of plain-integer structures; KVM
    // reads that member, as `chip_id` says.
    let ioapic = unsafe { &mut chip.chip.ioapic };
    if s.redirtbl.len() != ioapic.redirtbl.len() {
        return Err(KvmStateError::Invalid(format!(
            "{} IOAPIC redirection entries, expected {}",
            s.redirtbl.len(),
            ioapic.redirtbl.len()
        )));
    }
    ioapic.base_address = s.base_address;
    ioapic.ioregsel = s.ioregsel;
    ioapic.id = s.id;
    ioapic.irr = s.irr;
    for (e, &bits) in ioapic.redirtbl.iter_mut().zip(&s.redirtbl) {
        e.bits = bits;
    }
    ioctl("KVM_SET_IRQCHIP", vm.set_irqchip(&chip))?;
    ioctl("KVM_SET_PIT2", vm.set_pit2(&state.pit.load()))?;
    let clock = kvm_clock_data {
        clock: state.clock,
        ..Default::default()
    };
    ioctl("KVM_SET_CLOCK", vm.set_clock(&clock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_deadline_goes_last_and_a_zero_one_becomes_the_tsc() {
        let msrs = [
            Msr {
                index: MSR_IA32_TSC_DEADLINE,
                data: 0,
            },
            Msr {
                index: MSR_IA32_TSC,
                data: 777,
            },
            Msr {
                index: 0x4b56_4d00,
                data: 1,
            },
        ];
        let (first, last) = msr_batches(&msrs);
        assert_eq!(first, [msrs[1], msrs[2]]);
        assert_eq!(
            last,
            [Msr {
                index: MSR_IA32_TSC_DEADLINE,
                data: 777
            }]
        );
        let armed = [Msr {
            index: MSR_IA32_TSC_DEADLINE,
            data: 5,
        }];
        assert_eq!(msr_batches(&armed).1, armed);
    }

    #[test]
    fn mirrors_round_trip_kvm_structures() {
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 8;
        sregs.cs.l = 1;
        sregs.gdt.limit = 31;
        sregs.efer = 0x500;
        sregs.interrupt_bitmap[2] = 1 << 9;
        let back: kvm_sregs = Sregs::save(&sregs).load();
        assert_eq!(back.cs.selector, 8);
        assert_eq!(back.cs.l, 1);
        assert_eq!(back.gdt.limit, 31);
        assert_eq!(back.efer, 0x500);
        assert_eq!(back.interrupt_bitmap, sregs.interrupt_bitmap);
        let mut pit = kvm_pit_state2::default();
        pit.channels[2].count = 65536;
        pit.channels[0].count_load_time = -5;
        let back: kvm_pit_state2 = PitState::save(&pit).load();
        assert_eq!(back.channels[2].count, 65536);
        assert_eq!(back.channels[0].count_load_time, -5);
        let json = serde_json::to_value(Sregs::save(&sregs)).unwrap();
        assert_eq!(json["cs"]["selector"], 8, "fields by name: {json}");
    }
}
