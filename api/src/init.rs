//! Init's control protocol on [`crate::paths::INIT_SOCKET`]: one JSON request per line,
//! one JSON response per line. Only root on the node can reach the socket.

use serde::{Deserialize, Serialize};

use crate::config::NetworkConfig;

/// A request to init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum InitRequest {
    /// Apply a network configuration now (not persisted: the caller persists it once
    /// the admin confirms it).
    ApplyNetwork {
        /// The configuration to apply.
        network: NetworkConfig,
    },
    /// Set the host name now (not persisted).
    SetHostname {
        /// The new host name.
        hostname: String,
    },
    /// Create the data partition on a blank disk and mount it.
    InitStorage {
        /// Whole-disk device, e.g. `/dev/sdb`. Init refuses a disk that is not blank.
        device: String,
    },
    /// Feed the node's watchdog for the next `feed_ms` milliseconds (at most 5000), arming it
    /// first if it is not (loading softdog where the machine has no watchdog); `0` stops
    /// feeding at once: the node has fenced itself and its watchdog resets it (docs/ha.md).
    Watchdog {
        /// How long init keeps feeding without another grant.
        feed_ms: u64,
    },
    /// Disarm the watchdog (the node left its cluster). Refused once the node fenced itself.
    WatchdogDisarm,
    /// Write `hvnode: <message>` on every console (the serial port too, even under the TUI),
    /// in the kernel log and in the node log: what HA does on this node must be on record
    /// where an admin, or a test, reads the node's console. At most 512 characters, printable.
    Announce {
        /// The text.
        message: String,
    },
    /// Stop services and guests, then reboot.
    Reboot,
    /// Stop services and guests, then power off.
    PowerOff,
}

/// Init's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum InitResponse {
    /// Done.
    Ok,
    /// Refused or failed, with a message for the admin.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}
