//! The VM's state apart from guest memory, and the snapshot directory that holds it.
//!
//! The state file (`state.json`) is JSON, self-describing and checksummed:
//!
//! ```text
//! {"format":"hvnode-vm-state","version":1,"checksum":"sha256:<hex>","body":{...}}
//! ```
//!
//! The checksum covers the body's bytes exactly as they stand in the file, so a flipped byte
//! anywhere in the body is caught before anything is restored from it. Binary blobs (the XSAVE
//! area, the local APIC page, the serial input FIFO) are hex strings; everything else is named
//! fields mirroring the KVM structures ([`kvm`]) and the devices' own state types.
//!
//! A build reads its own [`VERSION`] and the one before it: when the body changes, the old
//! body type stays (frozen, in a `v<N>` module) with a conversion into the new one, and
//! [`read_body`] gains an arm for it. Version 1 is the first, so there is nothing older to read
//! yet. Anything else is refused, saying which and why: a file of another format, a newer or an
//! older version, a checksum that does not match, a body or an envelope that does not parse
//! (truncated or garbage).

pub mod kvm;
pub mod snapshot;

use crate::hex::hex;
pub use crate::hex::Hex;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::SerialState;
use crate::devices::mmio::TransportState;

/// The `format` of a state file.
pub const FORMAT: &str = "hvnode-vm-state";
/// The version this build writes.
pub const VERSION: u32 = 1;
/// The oldest version this build reads: the one before [`VERSION`], once there is one.
pub const OLDEST_READABLE: u32 = 1;

/// Everything of a paused VM that is not in guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// Each vCPU, by index.
    pub vcpus: Vec<kvm::VcpuState>,
    /// The in-kernel interrupt controllers, PIT and clock.
    pub vm: kvm::VmKvmState,
    /// COM1.
    pub serial: SerialState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// Each virtio-mmio transport with its device, in window order.
    pub virtio: Vec<TransportState>,
}

/// Why a state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not JSON, or not the envelope (cut short included).
    #[error("not a VM state file ({0})")]
    Envelope(String),
    /// Another format.
    #[error("a {0:?} file, not {FORMAT:?}")]
    Format(String),
    /// Written by a newer VMM.
    #[error(
        "state version {0} is newer than this VMM reads (versions {OLDEST_READABLE} to \
         {VERSION}): restore it with the VMM that wrote it or a newer one"
    )]
    Newer(u32),
    /// Older than this build still reads.
    #[error(
        "state version {0} is older than this VMM reads (versions {OLDEST_READABLE} to \
         {VERSION})"
    )]
    Older(u32),
    /// The body is not what was written.
    #[error("checksum mismatch: the file says {expected}, its body hashes to {actual}: the file is corrupt")]
    Checksum {
        /// The checksum in the envelope.
        expected: String,
        /// The checksum of the body as read.
        actual: String,
    },
    /// The checksum matches, the body does not parse as its version.
    #[error("the version {0} body does not parse: {1}")]
    Body(u32, String),
}

fn checksum(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    format!("sha256:{}", hex(&digest))
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    format: String,
    version: u32,
    checksum: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// `state` as a state file.
pub fn encode(state: &VmState) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_string(state)?;
    let envelope = Envelope {
        format: FORMAT.to_owned(),
        version: VERSION,
        checksum: checksum(&body),
        body: &RawValue::from_string(body)?,
    };
    serde_json::to_vec(&envelope)
}

/// The state in a state file of this version or the one before, checked against its checksum.
pub fn decode(bytes: &[u8]) -> Result<VmState, StateError> {
    let env: Envelope<'_> = serde_json::from_slice(bytes).map_err(|e| {
        let why = if e.is_eof() {
            format!("cut short: {e}")
        } else {
            e.to_string()
        };
        StateError::Envelope(why)
    })?;
    if env.format != FORMAT {
        return Err(StateError::Format(env.format));
    }
    if env.version > VERSION {
        return Err(StateError::Newer(env.version));
    }
    if env.version < OLDEST_READABLE {
        return Err(StateError::Older(env.version));
    }
    let actual = checksum(env.body.get());
    if actual != env.checksum {
        return Err(StateError::Checksum {
            expected: env.checksum,
            actual,
        });
    }
    read_body(env.version, env.body.get())
}

/// The body of a `version` file as the current [`VmState`]. An older version parses as its own
/// frozen type and converts (`v1::VmState` into `VmState`, say, once version 2 exists).
fn read_body(version: u32, body: &str) -> Result<VmState, StateError> {
    match version {
        VERSION => serde_json::from_str(body).map_err(|e| StateError::Body(version, e.to_string())),
        v if v > VERSION => Err(StateError::Newer(v)),
        v => Err(StateError::Older(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let mut vcpu = kvm::VcpuState::default();
        vcpu.regs.rip = 0x10_0000;
        vcpu.msrs.push(kvm::Msr {
            index: 0x10,
            data: 12345,
        });
        vcpu.lapic = Hex(vec![0xab; 1024]);
        VmState {
            vcpus: vec![vcpu],
            vm: kvm::VmKvmState::default(),
            serial: SerialState::default(),
            i8042: I8042State::default(),
            virtio: Vec::new(),
        }
    }

    /// `f` applied to the envelope of a good file, as JSON text.
    fn edited(f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&encode(&sample()).unwrap()).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn round_trips_and_looks_as_documented() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode(&bytes).unwrap(), sample());
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with(r#"{"format":"hvnode-vm-state","version":1,"checksum":"sha256:"#),
            "{}",
            &text[..80]
        );
        assert!(text.contains(&"ab".repeat(1024)), "LAPIC page as hex");
    }

    #[test]
    fn refuses_a_newer_version_saying_so() {
        let e = decode(&edited(|v| v["version"] = 2.into())).unwrap_err();
        assert!(matches!(e, StateError::Newer(2)), "{e}");
        assert!(e.to_string().contains("newer than this VMM reads"), "{e}");
    }

    #[test]
    fn refuses_a_version_older_than_it_reads() {
        let e = decode(&edited(|v| v["version"] = 0.into())).unwrap_err();
        assert!(matches!(e, StateError::Older(0)), "{e}");
        assert!(e.to_string().contains("older"), "{e}");
    }

    #[test]
    fn refuses_another_format_naming_it() {
        let e = decode(&edited(|v| v["format"] = "firecracker".into())).unwrap_err();
        assert!(matches!(e, StateError::Format(_)), "{e}");
        assert!(e.to_string().contains("\"firecracker\""), "{e}");
    }

    #[test]
    fn refuses_a_flipped_byte_naming_the_checksum() {
        let mut bytes = encode(&sample()).unwrap();
        let at = bytes.windows(8).position(|w| w == b"abababab").unwrap();
        bytes[at] = b'c';
        let e = decode(&bytes).unwrap_err();
        assert!(matches!(e, StateError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn refuses_truncated_and_garbage_input() {
        let bytes = encode(&sample()).unwrap();
        let e = decode(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
        for garbage in [&b""[..], b"\x00\xff", b"[1,2]", b"{\"format\":1}"] {
            let e = decode(garbage).unwrap_err();
            assert!(matches!(e, StateError::Envelope(_)), "{e}");
        }
    }

    #[test]
    fn refuses_a_body_that_matches_its_checksum_but_not_the_version() {
        let body = r#"{"vcpus":"many"}"#;
        let file = format!(
            r#"{{"format":"{FORMAT}","version":1,"checksum":"{}","body":{body}}}"#,
            checksum(body)
        );
        let e = decode(file.as_bytes()).unwrap_err();
        assert!(matches!(e, StateError::Body(1, _)), "{e}");
    }
}
