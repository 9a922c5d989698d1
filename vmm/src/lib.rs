//! The hvnode VMM: one KVM virtual machine per process, built on the rust-vmm crates.
//!
//! This first version boots a Linux bzImage or ELF kernel (or any 64-bit ELF payload) with an
//! initrd and a command line on 1..N vCPUs: guest memory with an e820 map, CPUID from KVM with
//! the hypervisor bit set, the in-kernel irqchip and PIT, ACPI tables (MADT for the APICs, a
//! hardware-reduced FADT whose sleep register powers the guest off, a DSDT with the COM1 serial
//! port), and a 16550 serial console to a log file and to clients of a unix socket. Reboot is
//! the i8042 reset line (`reboot=k`); graceful shutdown is ctrl-alt-del on the [`i8042`](devices::legacy::i8042)
//! keyboard. virtio-blk, virtio-net and virtio-rng sit on the virtio-mmio transport
//! ([`devices`]), described to the guest in the DSDT. The [`control`] socket and the
//! termination signals pause, resume, shut down, stop and count.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod acpi;
pub mod boot;
pub mod control;
pub mod devices;
pub mod error;
pub mod exit;
pub mod payload;
pub mod seccomp;
mod vcpu;
pub mod vm;

pub use error::VmError;
pub use exit::ExitReason;
pub use vm::run;
