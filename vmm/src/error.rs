//! The errors of setting up or running a VM, from every part of the VMM that can fail a start.

use crate::acpi::AcpiError;
use crate::devices::bus::SetupError;
use crate::devices::pio::PioBusError;
use crate::jail::JailError;
use crate::persist::snapshot::RestoreError;
use crate::seccomp::SandboxError;

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
    Acpi(#[from] AcpiError),
    /// Signal masks or handlers.
    #[error("Signals: {0}")]
    Signals(String),
    /// virtio devices (disk images, taps).
    #[error("virtio devices: {0}")]
    Devices(#[from] SetupError),
    /// Two legacy devices on the same I/O ports.
    #[error("I/O port devices: {0}")]
    Ports(#[from] PioBusError),
    /// Entering the jail (namespaces, the new root).
    #[error("Jail: {0}")]
    Jail(#[from] JailError),
    /// Dropping privileges or installing the seccomp filter.
    #[error("Sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    /// The snapshot to restore was refused or could not be put into the VM.
    #[error("Restoring the snapshot: {0}")]
    Restore(#[from] RestoreError),
    /// The incoming migration was refused or broke before the guest arrived.
    #[error("{0}")]
    Incoming(String),
}
