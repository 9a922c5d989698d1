//! IPv4 + UDP framing for DHCP over a cooked (`SOCK_DGRAM`) packet socket, which
//! adds and strips the Ethernet header itself.

use std::net::Ipv4Addr;

/// DHCP client port.
pub const CLIENT_PORT: u16 = 68;
/// DHCP server port.
pub const SERVER_PORT: u16 = 67;

const IP_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const PROTO_UDP: u8 = 17;

/// A received UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// UDP payload.
    pub payload: &'a [u8],
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        let mut it = chunk.chunks(2);
        for pair in &mut it {
            let word = match pair {
                [a, b] => u16::from_be_bytes([*a, *b]),
                [a] => u16::from_be_bytes([*a, 0]),
                _ => 0,
            };
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds an IPv4 packet carrying one UDP datagram (TTL 64, DF clear).
pub fn build(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = (UDP_HEADER + payload.len()) as u16;
    let total = (IP_HEADER + UDP_HEADER + payload.len()) as u16;
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, PROTO_UDP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let ip_sum = checksum(&[&p]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());

    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&src_port.to_be_bytes());
    udp.extend_from_slice(&dst_port.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, PROTO_UDP]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let sum = match checksum(&[&pseudo, &udp]) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&udp);
    p
}

/// Parses an IPv4 packet holding an unfragmented UDP datagram; `None` for anything else.
pub fn parse(p: &[u8]) -> Option<Datagram<'_>> {
    let first = *p.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
    if ihl < IP_HEADER || total < ihl + UDP_HEADER || total > p.len() {
        return None;
    }
    let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]);
    if *p.get(9)? != PROTO_UDP || frag & 0x3fff != 0 {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let udp = p.get(ihl..total)?;
    let src_port = u16::from_be_bytes([udp[0], udp[1]]);
    let dst_port = u16::from_be_bytes([udp[2], udp[3]]);
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if len < UDP_HEADER || len > udp.len() {
        return None;
    }
    Some(Datagram {
        src,
        dst,
        src_port,
        dst_port,
        payload: udp.get(UDP_HEADER..len)?,
    })
}

/// A classic BPF program for a cooked packet socket that keeps only unfragmented
/// IPv4 UDP packets to port 68 (data starts at the IP header).
pub fn client_filter() -> [libc::sock_filter; 9] {
    const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const LD_H_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
    const LD_H_IND: u16 = 0x48; // BPF_LD | BPF_H | BPF_IND
    const LDX_MSH: u16 = 0xb1; // BPF_LDX | BPF_B | BPF_MSH
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        ins(LD_B_ABS, 0, 0, 9),                   // protocol
        ins(JEQ_K, 0, 6, u32::from(PROTO_UDP)),   // UDP? else drop
        ins(LD_H_ABS, 0, 0, 6),                   // flags + fragment offset
        ins(JSET_K, 4, 0, 0x1fff),                // a fragment: drop
        ins(LDX_MSH, 0, 0, 0),                    // X = IP header length
        ins(LD_H_IND, 0, 0, 2),                   // UDP destination port
        ins(JEQ_K, 0, 1, u32::from(CLIENT_PORT)), // port 68? else drop
        ins(RET_K, 0, 0, 0x0004_0000),            // accept (up to 256 KiB)
        ins(RET_K, 0, 0, 0),                      // drop
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_then_parse_round_trips_with_valid_checksums() {
        let src = Ipv4Addr::UNSPECIFIED;
        let dst = Ipv4Addr::BROADCAST;
        let p = build(src, dst, CLIENT_PORT, SERVER_PORT, b"hello dhcp");
        assert_eq!(checksum(&[&p[..20]]), 0, "IP header checksum");
        let d = parse(&p).unwrap();
        assert_eq!(d.src, src);
        assert_eq!(d.dst, dst);
        assert_eq!((d.src_port, d.dst_port), (68, 67));
        assert_eq!(d.payload, b"hello dhcp");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 17, 0, 18]);
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "UDP checksum");
    }

    #[test]
    fn parse_rejects_truncated_fragmented_and_non_udp() {
        let p = build(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1, 2, b"x");
        assert!(parse(&p[..p.len() - 1]).is_none());
        let mut frag = p.clone();
        frag[6] = 0x20; // more fragments
        assert!(parse(&frag).is_none());
        let mut tcp = p.clone();
        tcp[9] = 6;
        assert!(parse(&tcp).is_none());
        assert!(parse(&[]).is_none());
    }
}
