//! The receiving side: a VMM started with `--incoming` takes the guest's memory into its own
//! fresh memory and its state, then its caller restores the state and answers with
//! [`finish`]. Everything read is bounded and checked (see [`super::protocol`]); a refusal is
//! sent back as an `error` frame before the VMM exits, so the sender can say why.

use std::io::{Read, Write};

use hvnode_api::vmm::VmConfig;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::protocol::{self, Complete, Kind, ProtocolError, Refusal, Resumed, Start};
use crate::memory::GuestRam;
use crate::persist::{self, snapshot, VmState};

/// Why the incoming migration failed, with the code sent to the sender.
#[derive(Debug, thiserror::Error)]
#[error("incoming migration: {message}")]
pub struct Refused {
    /// Stable code (see [`Refusal`]).
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
}

impl From<ProtocolError> for Refused {
    fn from(e: ProtocolError) -> Self {
        Refused {
            code: "bad_stream",
            message: e.to_string(),
        }
    }
}

/// What arrived: the state to restore, and how the sender wants it checked.
#[derive(Debug)]
pub struct Arrived {
    /// The VM state.
    pub state: VmState,
    /// The `complete` frame.
    pub complete: Complete,
    /// Memory bytes received.
    pub memory_bytes: u64,
}

/// Receives a guest for `config` (`mem_size` bytes of fresh memory in `mem`) from `stream`,
/// up to and including `complete`. On a refusal the sender is told why (best effort).
pub fn receive<S: Read + Write>(
    stream: &mut S,
    config: &VmConfig,
    mem: &GuestRam,
    mem_size: u64,
) -> Result<Arrived, Refused> {
    let r = receive_inner(stream, config, mem, mem_size);
    if let Err(e) = &r {
        refuse(stream, e);
    }
    r
}

/// Tells the sender why (best effort: it may be gone).
pub fn refuse(stream: &mut impl Write, e: &Refused) {
    let _ = protocol::write_json(
        stream,
        Kind::Error,
        &Refusal {
            code: e.code.into(),
            message: e.message.clone(),
        },
    );
}

fn receive_inner<S: Read + Write>(
    stream: &mut S,
    config: &VmConfig,
    mem: &GuestRam,
    mem_size: u64,
) -> Result<Arrived, Refused> {
    let h = protocol::read_header(stream)?;
    if h.kind != Kind::Start {
        return Err(ProtocolError::Unexpected {
            got: h.kind,
            expected: "start",
        }
        .into());
    }
    let start: Start = protocol::parse_json(Kind::Start, &protocol::read_payload(stream, h.len)?)?;
    let mismatch = |message: String| Refused {
        code: "mismatch",
        message,
    };
    if let Some(diff) = snapshot::mismatch(&start.config, config) {
        return Err(mismatch(format!(
            "the destination's VM config does not match the guest's: {}",
            diff.replace("in the snapshot", "on the source")
                .replace(" now", " here")
        )));
    }
    if start.memory_bytes != mem_size {
        return Err(mismatch(format!(
            "the guest has {} bytes of memory, the destination {mem_size}",
            start.memory_bytes
        )));
    }
    protocol::write_frame(stream, Kind::Ok, b"{}").map_err(ProtocolError::from)?;

    let mut state = None;
    let mut received = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let h = protocol::read_header(stream)?;
        match h.kind {
            Kind::Memory => {
                let ranges = protocol::read_table(stream, h.len, |addr, len| {
                    usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len))
                })?;
                for r in ranges {
                    let mut done = 0;
                    while done < r.len {
                        let n = (r.len - done).min(buf.len() as u64) as usize;
                        let at = r.addr + done;
                        stream.read_exact(&mut buf[..n]).map_err(|e| Refused {
                            code: "bad_stream",
                            message: format!(
                                "receiving memory at {at:#x}: {}",
                                ProtocolError::from(e)
                            ),
                        })?;
                        mem.write_slice(&buf[..n], GuestAddress(at))
                            .map_err(|e| Refused {
                                code: "internal",
                                message: format!("writing guest memory at {at:#x}: {e}"),
                            })?;
                        done += n as u64;
                    }
                    received += r.len;
                }
            }
            Kind::State => {
                let bytes = protocol::read_payload(stream, h.len)?;
                let s = persist::decode(&bytes).map_err(|e| Refused {
                    code: "bad_stream",
                    message: format!("the VM state: {e}"),
                })?;
                if s.vcpus.len() != config.vcpus as usize {
                    return Err(mismatch(format!(
                        "the state holds {} vCPUs, the config says {}",
                        s.vcpus.len(),
                        config.vcpus
                    )));
                }
                state = Some(s);
            }
            Kind::Complete => {
                let complete: Complete =
                    protocol::parse_json(Kind::Complete, &protocol::read_payload(stream, h.len)?)?;
                let state = state.ok_or_else(|| {
                    Refused::from(ProtocolError::Unexpected {
                        got: Kind::Complete,
                        expected: "state before complete",
                    })
                })?;
                if let Some(theirs) = &complete.memory_sha256 {
                    let ours = super::send::memory_sha256(mem).map_err(|e| Refused {
                        code: "internal",
                        message: e,
                    })?;
                    if &ours != theirs {
                        return Err(Refused {
                            code: "memory_mismatch",
                            message: format!(
                                "guest memory differs after the transfer: sha256 {theirs} on \
                                 the source, {ours} here"
                            ),
                        });
                    }
                }
                return Ok(Arrived {
                    state,
                    complete,
                    memory_bytes: received,
                });
            }
            Kind::Abandon => {
                let why = protocol::read_payload(stream, h.len)?;
                return Err(Refused {
                    code: "abandoned",
                    message: format!(
                        "the source abandoned the migration: {}",
                        String::from_utf8_lossy(&why)
                    ),
                });
            }
            got => {
                return Err(ProtocolError::Unexpected {
                    got,
                    expected: "memory, state, complete or abandon",
                }
                .into())
            }
        }
    }
}

/// Tells the sender the guest runs here.
pub fn finish(stream: &mut impl Write, restore_ms: u64) -> std::io::Result<()> {
    protocol::write_json(stream, Kind::Ok, &Resumed { restore_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::{encode_table, write_frame, write_header, write_json, Range};
    use std::io::Cursor;

    /// A stream that reads a scripted input and keeps what is written.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn config() -> VmConfig {
        serde_json::from_value(serde_json::json!({
            "name": "g", "vcpus": 1, "memory_mib": 1, "kernel": "/k", "cmdline": ""
        }))
        .unwrap()
    }

    const SIZE: u64 = 1 << 20;

    fn start(memory_bytes: u64, vcpus: u32) -> Vec<u8> {
        let mut c = config();
        c.vcpus = vcpus;
        let mut out = Vec::new();
        write_json(
            &mut out,
            Kind::Start,
            &Start {
                config: c,
                memory_bytes,
            },
        )
        .unwrap();
        out
    }

    fn run(input: Vec<u8>) -> (Result<Arrived, Refused>, Vec<u8>, GuestRam) {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), SIZE as usize)]).unwrap();
        let mut s = Script {
            input: Cursor::new(input),
            output: Vec::new(),
        };
        let r = receive(&mut s, &config(), &mem, SIZE);
        (r, s.output, mem)
    }

    fn refusal(output: &[u8]) -> Refusal {
        // The last frame written.
        let mut r = output;
        let mut last = None;
        while !r.is_empty() {
            let h = protocol::read_header(&mut r).unwrap();
            let p = protocol::read_payload(&mut r, h.len).unwrap();
            last = Some((h.kind, p));
        }
        let (kind, p) = last.unwrap();
        assert_eq!(kind, Kind::Error);
        serde_json::from_slice(&p).unwrap()
    }

    #[test]
    fn a_config_or_memory_size_that_differs_is_refused_before_any_memory() {
        let (r, out, _) = run(start(SIZE, 2));
        let e = r.unwrap_err();
        assert_eq!(e.code, "mismatch");
        assert!(e.message.contains("vcpus 2 on the source, 1 here"), "{e}");
        assert_eq!(refusal(&out).code, "mismatch");
        let (r, _, _) = run(start(2 * SIZE, 1));
        assert!(r.unwrap_err().message.contains("2097152 bytes of memory"));
    }

    #[test]
    fn memory_lands_where_the_table_says_and_bad_tables_are_refused() {
        let mut input = start(SIZE, 1);
        let table = encode_table(&[Range { addr: 4096, len: 4 }]);
        write_header(&mut input, Kind::Memory, table.len() as u64 + 4).unwrap();
        input.extend_from_slice(&table);
        input.extend_from_slice(&[1, 2, 3, 4]);
        // A range past the end of guest memory.
        let table = encode_table(&[Range {
            addr: SIZE - 2,
            len: 4,
        }]);
        write_header(&mut input, Kind::Memory, table.len() as u64 + 4).unwrap();
        input.extend_from_slice(&table);
        input.extend_from_slice(&[0; 4]);
        let (r, out, mem) = run(input);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(4096)).unwrap(),
            0x0403_0201
        );
        let e = r.unwrap_err();
        assert!(e.message.contains("not in guest RAM"), "{e}");
        assert_eq!(refusal(&out).code, "bad_stream");
    }

    #[test]
    fn a_cut_garbage_or_abandoned_stream_is_refused_saying_which() {
        let mut cut = start(SIZE, 1);
        let table = encode_table(&[Range { addr: 0, len: 4096 }]);
        write_header(&mut cut, Kind::Memory, table.len() as u64 + 4096).unwrap();
        cut.extend_from_slice(&table);
        cut.extend_from_slice(&[7; 100]);
        let e = run(cut).0.unwrap_err();
        assert!(e.message.contains("receiving memory"), "{e}");

        let e = run(b"GET / HTTP/1.1\r\n\r\n".to_vec()).0.unwrap_err();
        assert!(e.message.contains("not a migration stream"), "{e}");

        let mut abandoned = start(SIZE, 1);
        write_frame(&mut abandoned, Kind::Abandon, b"cancelled").unwrap();
        let e = run(abandoned).0.unwrap_err();
        assert_eq!(e.code, "abandoned");
        assert!(e.message.contains("cancelled"), "{e}");

        let mut early = start(SIZE, 1);
        write_json(&mut early, Kind::Complete, &Complete::default()).unwrap();
        let e = run(early).0.unwrap_err();
        assert!(e.message.contains("state before complete"), "{e}");

        let mut corrupt = start(SIZE, 1);
        write_frame(
            &mut corrupt,
            Kind::State,
            b"{\"format\":\"hvnode-vm-state\"",
        )
        .unwrap();
        let e = run(corrupt).0.unwrap_err();
        assert!(
            e.message.contains("the VM state: not a VM state file"),
            "{e}"
        );
    }
}
