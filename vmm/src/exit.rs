//! Why the VM ended: what a vCPU, the control socket or a signal hands the builder, and what the
//! binary turns into its exit code.

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
