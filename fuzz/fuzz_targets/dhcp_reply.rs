//! A DHCP server's reply, as the node's client decodes it: anything on the LAN may send one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    // The xid the client would be waiting for: taken from the packet itself where it has one,
    // so that the fuzzer reaches past the xid check.
    let xid = data
        .get(4..8)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    let _ = hvnode_net::dhcp::msg::parse_reply(data, xid, &mac);
});
