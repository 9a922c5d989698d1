//! The hvnode VMM: one KVM virtual machine per process, built on the rust-vmm crates.
//!
//! This first version boots a Linux bzImage or ELF kernel (or any 64-bit ELF payload) with an
//! initrd and a command line on 1..N vCPUs: guest memory with an e820 map, CPUID from KVM with
//! the hypervisor bit set, the in-kernel irqchip and PIT, ACPI tables (MADT for the APICs, a
//! hardware-reduced FADT whose sleep register powers the guest off, a DSDT with the COM1 serial
//! port), and a 16550 serial console to a log file and to clients of a unix socket. Reboot is
//! the i8042 reset line (`reboot=k`); graceful shutdown is ctrl-alt-del on the i8042 keyboard.
//! virtio-blk, virtio-net and virtio-rng sit on the virtio-mmio transport, described to the
//! guest in the DSDT. The [`control`] socket and the termination signals pause, resume, shut
//! down, stop, count, snapshot and migrate; [`run_from`] resumes a guest from a snapshot or
//! receives a migrating one.
//!
//! # Modules
//!
//! Each module uses only modules below it in this list: [`vm`] builds on everything and nothing
//! builds on it.
//!
//! - [`vm`]: the builder: checks the config, sets up KVM, guest memory, the kernel, the ACPI
//!   tables and the devices, starts the vCPUs and waits for the reason the VM ended.
//! - [`control`]: the control socket and the termination signals, acting through one controller.
//! - [`migration`]: live migration: the stream between two VMMs, the pre-copy sender and the
//!   receiver.
//! - `vcpu`: the vCPU threads, their exit dispatch and counters, and the pause gate.
//! - [`error`]: [`VmError`], why a VM could not be set up.
//! - [`jail`]: the mount and IPC namespaces and the empty root a jailed VMM enters once
//!   everything is open.
//! - [`seccomp`]: the run-phase sandbox: dropped privileges and the seccomp filter.
//! - [`persist`]: the VM's state outside guest memory in its versioned, checksummed format.
//!   - [`persist::kvm`]: the vCPUs' and the VM's KVM state, saved and restored in KVM's order.
//!   - [`persist::snapshot`]: the snapshot directory: writing it, reading it back, the sparse
//!     memory file mapped copy-on-write.
//! - [`boot`]: the guest memory layout, page tables, long-mode registers and the zero page.
//! - [`devices`]: the devices, and [`DeviceStats`](devices::DeviceStats) for their counters.
//!   - [`devices::bus`]: the virtio devices from the config, wired to KVM, on the `MmioBus`.
//!   - [`devices::pio`]: the `PioBus`, I/O port ranges to devices, for IN and OUT exits.
//!   - [`devices::legacy`]: the PC devices' port layout and their [`IrqLine`].
//!     - [`devices::legacy::serial`]: COM1's output (bounded log, socket clients) and input.
//!     - [`devices::legacy::i8042`]: the keyboard controller: reset line, ctrl-alt-del.
//!     - [`devices::legacy::power`]: the ACPI sleep control register (power-off).
//!     - [`devices::legacy::cmos`]: the absent RTC/CMOS.
//!   - [`devices::mmio`]: the virtio-mmio transport registers of one device.
//!   - [`devices::worker`]: a virtio device's worker thread over its queue notifications.
//!   - [`devices::blk`], [`devices::net`], [`devices::rng`]: the virtio devices.
//! - [`acpi`]: the ACPI tables, as blobs with guest addresses.
//! - [`exit`]: [`ExitReason`], why a VM ended.
//! - [`memory`]: guest RAM, its KVM slots, and dirty page tracking.
//! - [`hex`]: bytes as hex strings in the state file.
//! - [`payload`]: tiny hand-assembled guests for tests and the start-up benchmark.
//!
//! [`IrqLine`]: devices::legacy::IrqLine
#![deny(unsafe_op_in_unsafe_fn)]

pub mod acpi;
pub mod boot;
pub mod control;
pub mod devices;
pub mod error;
pub mod exit;
pub mod hex;
pub mod jail;
pub mod memory;
pub mod migration;
pub mod payload;
pub mod persist;
pub mod seccomp;
mod vcpu;
pub mod vm;

pub use error::VmError;
pub use exit::ExitReason;
pub use vm::{run, run_from};
