//! The migration stream as the receiving VMM reads it: it comes from another node, through a
//! relay, and is hostile until proven otherwise. Whatever the bytes, the receiver must refuse
//! or accept without panicking, allocating beyond the frame bounds, or writing outside the
//! guest's memory. A valid `start` frame is put in front of half the inputs so that the memory,
//! state and complete frames are reached, not only the header checks.
#![no_main]

use std::io::{Cursor, Read, Write};

use hvnode_vmm::memory::GuestRam;
use hvnode_vmm::migration::protocol::{write_json, Kind, Start};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

/// The input as the stream; what the receiver writes back is dropped.
struct Stream(Cursor<Vec<u8>>);

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const MEM: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let config: hvnode_api::vmm::VmConfig = serde_json::from_value(serde_json::json!({
        "name": "fuzz", "vcpus": 1, "memory_mib": 1, "kernel": "/k", "cmdline": ""
    }))
    .unwrap();
    let mut input = Vec::new();
    if mode % 2 == 1 {
        let start = Start {
            config: config.clone(),
            memory_bytes: MEM,
        };
        write_json(&mut input, Kind::Start, &start).unwrap();
    }
    input.extend_from_slice(rest);
    // Two regions with a gap, as a guest above 3 GiB has (scaled down).
    let mem = GuestRam::from_ranges(&[
        (GuestAddress(0), (MEM / 2) as usize),
        (GuestAddress(MEM), (MEM / 2) as usize),
    ])
    .unwrap();
    let mut s = Stream(Cursor::new(input));
    let _ = hvnode_vmm::migration::receive::receive(&mut s, &config, &mem, MEM);
});
