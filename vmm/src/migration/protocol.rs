//! The migration stream: frames between the sending and the receiving VMM.
//!
//! Every frame is a 16-byte header, then its payload:
//!
//! ```text
//! magic "HVMG" | kind u16 LE | version u16 LE | payload length u64 LE
//! ```
//!
//! The sender sends `start` (JSON [`Start`]: the guest's config), waits for `ok` or `error`;
//! then `memory` frames while the guest runs (no answer: the stream is one way until the
//! switchover), then, with the guest paused, the last `memory` frames, `state` (the VM state in
//! the VMM's state format, [`crate::persist`]) and `complete` (JSON [`Complete`]), and waits
//! for `ok` (JSON [`Resumed`]: the guest runs on the destination) or `error`. `abandon`
//! (a reason in UTF-8) ends a migration from the sender's side at any point before `complete`.
//!
//! A `memory` payload is a table and the bytes it describes:
//!
//! ```text
//! count u32 LE | 0u32 | count x (guest address u64 LE, length u64 LE) | the bytes, in table order
//! ```
//!
//! The receiver treats the stream as hostile: every length is bounded before anything is
//! allocated or read ([`MAX_CONTROL`], [`MAX_STATE`], [`MAX_MEMORY`], [`MAX_RANGES`]), every
//! range must lie in guest RAM and the table must account for the payload exactly.

use std::io::{self, Read, Write};

use hvnode_api::vmm::VmConfig;
use serde::{Deserialize, Serialize};

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"HVMG";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The oldest version this build still receives: the one before [`VERSION`] once there is one.
pub const OLDEST: u16 = 1;
/// Header length.
pub const HEADER: usize = 16;
/// Longest JSON payload (`start`, `complete`, `ok`, `error`, `abandon`).
pub const MAX_CONTROL: u64 = 1 << 20;
/// Longest `state` payload.
pub const MAX_STATE: u64 = 64 << 20;
/// Longest `memory` payload: the sender cuts memory into frames this large at most.
pub const MAX_MEMORY: u64 = 32 << 20;
/// Most ranges in one `memory` frame.
pub const MAX_RANGES: u32 = 1 << 16;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Sender: the guest's config ([`Start`]).
    Start,
    /// Sender: guest memory.
    Memory,
    /// Sender: the VM state.
    State,
    /// Sender: switch over ([`Complete`]).
    Complete,
    /// Sender: give up (reason).
    Abandon,
    /// Receiver: accepted ([`Resumed`] after `complete`, nothing after `start`).
    Ok,
    /// Receiver: refused ([`Refusal`]).
    Error,
}

impl Kind {
    fn code(self) -> u16 {
        match self {
            Kind::Start => 1,
            Kind::Memory => 2,
            Kind::State => 3,
            Kind::Complete => 4,
            Kind::Abandon => 5,
            Kind::Ok => 6,
            Kind::Error => 7,
        }
    }

    fn from_code(code: u16) -> Option<Kind> {
        Some(match code {
            1 => Kind::Start,
            2 => Kind::Memory,
            3 => Kind::State,
            4 => Kind::Complete,
            5 => Kind::Abandon,
            6 => Kind::Ok,
            7 => Kind::Error,
            _ => return None,
        })
    }

    /// The longest payload a frame of this kind may carry.
    fn max_len(self) -> u64 {
        match self {
            Kind::Memory => MAX_MEMORY,
            Kind::State => MAX_STATE,
            _ => MAX_CONTROL,
        }
    }
}

/// Why a stream was refused or broke.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing failed; a cut stream reads as `UnexpectedEof`.
    #[error("{}", io_text(.0))]
    Io(#[from] io::Error),
    /// Not our protocol.
    #[error("not a migration stream (bad magic {0:02x?})")]
    Magic([u8; 4]),
    /// A version this build does not speak.
    #[error("migration protocol version {0}; this VMM speaks versions {OLDEST} to {VERSION}")]
    Version(u16),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// A payload longer than its kind allows.
    #[error("a {kind:?} frame of {len} bytes (at most {max})")]
    TooLong {
        /// The frame's kind.
        kind: Kind,
        /// Its declared length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A frame that may not come now.
    #[error("a {got:?} frame where {expected} was expected")]
    Unexpected {
        /// What came.
        got: Kind,
        /// What could have come.
        expected: &'static str,
    },
    /// The receiver refused, saying why.
    #[error("the destination refused {0}")]
    Refused(String),
    /// A payload that does not parse or lies about its contents.
    #[error("bad {0:?} frame: {1}")]
    Bad(Kind, String),
}

fn io_text(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        "the stream was cut short (the other side closed it or died)".into()
    } else {
        e.to_string()
    }
}

/// A frame header, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame's kind.
    pub kind: Kind,
    /// The payload's length, within the kind's bound.
    pub len: u64,
}

/// Writes a header.
pub fn write_header(w: &mut impl Write, kind: Kind, len: u64) -> io::Result<()> {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&kind.code().to_le_bytes());
    h[6..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&h)
}

/// Writes a whole frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    write_header(w, kind, payload.len() as u64)?;
    w.write_all(payload)?;
    w.flush()
}

/// Writes a frame with `value` as its JSON payload.
pub fn write_json(w: &mut impl Write, kind: Kind, value: &impl Serialize) -> io::Result<()> {
    let payload = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_frame(w, kind, &payload)
}

/// Reads and checks a header: magic, version, kind and the length bound.
pub fn read_header(r: &mut impl Read) -> Result<Header, ProtocolError> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h)?;
    decode_header(&h)
}

/// Checks a header's bytes.
pub fn decode_header(h: &[u8; HEADER]) -> Result<Header, ProtocolError> {
    let magic: [u8; 4] = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtocolError::Magic(magic));
    }
    let code = u16::from_le_bytes([h[4], h[5]]);
    let version = u16::from_le_bytes([h[6], h[7]]);
    if !(OLDEST..=VERSION).contains(&version) {
        return Err(ProtocolError::Version(version));
    }
    let kind = Kind::from_code(code).ok_or(ProtocolError::UnknownKind(code))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&h[8..]);
    let len = u64::from_le_bytes(len);
    if len > kind.max_len() {
        return Err(ProtocolError::TooLong {
            kind,
            len,
            max: kind.max_len(),
        });
    }
    Ok(Header { kind, len })
}

/// Reads a payload of `len` bytes (already bounded by [`read_header`]).
pub fn read_payload(r: &mut impl Read, len: u64) -> Result<Vec<u8>, ProtocolError> {
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Parses a JSON payload of a frame of `kind`.
pub fn parse_json<T: for<'de> Deserialize<'de>>(
    kind: Kind,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Bad(kind, e.to_string()))
}

/// `start`: what the destination must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    /// The guest's config on the source (compared as a snapshot's is, see
    /// [`crate::persist::snapshot::mismatch`]).
    pub config: VmConfig,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
}

/// `complete`: switch over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Complete {
    /// SHA-256 of all guest memory on the source, paused, when the sender wants it checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_sha256: Option<String>,
}

/// `ok` after `complete`: the guest runs on the destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// How long restoring the state and starting the vCPUs took there.
    pub restore_ms: u64,
}

/// `error`: the receiver refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Stable code: `mismatch`, `bad_stream`, `memory_mismatch`, `restore_failed`.
    pub code: String,
    /// What was wrong.
    pub message: String,
}

/// One range of a `memory` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Encodes a `memory` frame's table.
pub fn encode_table(ranges: &[Range]) -> Vec<u8> {
    let mut t = Vec::with_capacity(8 + ranges.len() * 16);
    t.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    for r in ranges {
        t.extend_from_slice(&r.addr.to_le_bytes());
        t.extend_from_slice(&r.len.to_le_bytes());
    }
    t
}

/// Reads a `memory` frame's table from a payload of `len` bytes and checks it: at most
/// [`MAX_RANGES`] ranges, none empty, each inside guest RAM as `in_ram` says, and the table plus
/// the ranges' bytes exactly `len`. The bytes follow in the stream.
pub fn read_table(
    r: &mut impl Read,
    len: u64,
    in_ram: impl Fn(u64, u64) -> bool,
) -> Result<Vec<Range>, ProtocolError> {
    let bad = |m: String| ProtocolError::Bad(Kind::Memory, m);
    if len < 8 {
        return Err(bad(format!("{len} bytes cannot hold a table")));
    }
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let count = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if count > MAX_RANGES {
        return Err(bad(format!("{count} ranges (at most {MAX_RANGES})")));
    }
    let table_len = 8 + u64::from(count) * 16;
    if table_len > len {
        return Err(bad(format!("a table of {count} ranges in {len} bytes")));
    }
    let mut raw = vec![0u8; count as usize * 16];
    r.read_exact(&mut raw)?;
    let mut ranges = Vec::with_capacity(count as usize);
    let mut data = 0u64;
    for e in raw.chunks_exact(16) {
        let mut a = [0u8; 8];
        a.copy_from_slice(&e[..8]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&e[8..]);
        let range = Range {
            addr: u64::from_le_bytes(a),
            len: u64::from_le_bytes(l),
        };
        if range.len == 0 || !in_ram(range.addr, range.len) {
            return Err(bad(format!(
                "range {:#x}+{:#x} is not in guest RAM",
                range.addr, range.len
            )));
        }
        data = data
            .checked_add(range.len)
            .ok_or_else(|| bad("range lengths overflow".into()))?;
        ranges.push(range);
    }
    if table_len + data != len {
        return Err(bad(format!(
            "the table describes {data} bytes, the frame carries {}",
            len - table_len
        )));
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16, version: u16, len: u64) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&kind.to_le_bytes());
        h[6..8].copy_from_slice(&version.to_le_bytes());
        h[8..].copy_from_slice(&len.to_le_bytes());
        h
    }

    #[test]
    fn headers_round_trip_and_bad_ones_say_why() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::State, b"abc").unwrap();
        let h = read_header(&mut &buf[..]).unwrap();
        assert_eq!(
            h,
            Header {
                kind: Kind::State,
                len: 3
            }
        );
        let mut bad = header(2, VERSION, 1);
        bad[0] = b'X';
        assert!(matches!(decode_header(&bad), Err(ProtocolError::Magic(_))));
        let e = decode_header(&header(2, VERSION + 1, 1)).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        assert!(matches!(
            decode_header(&header(99, VERSION, 1)),
            Err(ProtocolError::UnknownKind(99))
        ));
        let e = decode_header(&header(2, VERSION, MAX_MEMORY + 1)).unwrap_err();
        assert!(matches!(e, ProtocolError::TooLong { .. }), "{e}");
        let e = decode_header(&header(1, VERSION, MAX_CONTROL + 1)).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::TooLong {
                    kind: Kind::Start,
                    ..
                }
            ),
            "{e}"
        );
        // Cut short.
        let e = read_header(&mut &buf[..10]).unwrap_err();
        assert!(
            matches!(e, ProtocolError::Io(ref io) if io.kind() == io::ErrorKind::UnexpectedEof)
        );
    }

    #[test]
    fn tables_must_lie_in_ram_and_account_for_the_payload() {
        let ram = |a: u64, l: u64| a.checked_add(l).is_some_and(|end| end <= 1 << 20);
        let ranges = [
            Range { addr: 0, len: 4096 },
            Range {
                addr: 8192,
                len: 100,
            },
        ];
        let t = encode_table(&ranges);
        let len = t.len() as u64 + 4196;
        assert_eq!(read_table(&mut &t[..], len, ram).unwrap(), ranges);
        let e = read_table(&mut &t[..], len + 1, ram).unwrap_err();
        assert!(e.to_string().contains("describes 4196 bytes"), "{e}");
        let outside = encode_table(&[Range {
            addr: (1 << 20) - 1,
            len: 2,
        }]);
        let e = read_table(&mut &outside[..], outside.len() as u64 + 2, ram).unwrap_err();
        assert!(e.to_string().contains("not in guest RAM"), "{e}");
        let wrap = encode_table(&[Range {
            addr: u64::MAX,
            len: 2,
        }]);
        assert!(read_table(&mut &wrap[..], wrap.len() as u64 + 2, ram).is_err());
        let empty = encode_table(&[Range { addr: 0, len: 0 }]);
        assert!(read_table(&mut &empty[..], empty.len() as u64, ram).is_err());
        let mut many = encode_table(&[]);
        many[..4].copy_from_slice(&(MAX_RANGES + 1).to_le_bytes());
        let e = read_table(&mut &many[..], MAX_MEMORY, ram).unwrap_err();
        assert!(e.to_string().contains("ranges (at most"), "{e}");
        let short = encode_table(&[Range { addr: 0, len: 1 }]);
        assert!(read_table(&mut &short[..], 4, ram).is_err());
    }
}
