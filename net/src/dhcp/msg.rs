//! DHCPv4 messages (RFC 2131/2132), encoded and decoded with `dhcproto`.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};

/// Errors building or reading DHCP messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message could not be encoded.
    #[error("Cannot encode a DHCP message")]
    Encode(#[source] dhcproto::error::EncodeError),
}

/// Lease time assumed when an ACK carries none.
const DEFAULT_LEASE_SECS: u32 = 3600;
/// Option 51's "infinite" value.
pub const INFINITE: u32 = u32::MAX;

/// What a server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Our address.
    pub address: Ipv4Addr,
    /// Prefix length from the subnet mask.
    pub prefix: u8,
    /// The server that granted it (option 54).
    pub server: Ipv4Addr,
    /// Routers, first is the default gateway.
    pub routers: Vec<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// Search domains (option 119, else option 15).
    pub search: Vec<String>,
    /// Lease time in seconds ([`INFINITE`] for no expiry).
    pub lease_secs: u32,
    /// Renewal time T1 in seconds.
    pub t1_secs: u32,
    /// Rebinding time T2 in seconds.
    pub t2_secs: u32,
}

/// A server reply addressed to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// DHCPOFFER.
    Offer(Lease),
    /// DHCPACK.
    Ack(Lease),
    /// DHCPNAK from a server.
    Nak(Ipv4Addr),
}

/// Our identity in messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Hardware address.
    pub mac: [u8; 6],
    /// Host name for option 12; empty sends none.
    pub hostname: String,
}

impl Client {
    fn base(&self, xid: u32, kind: MessageType, ciaddr: Ipv4Addr, broadcast: bool) -> Message {
        let mut m = Message::new_with_id(
            xid,
            ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac,
        );
        m.set_opcode(Opcode::BootRequest);
        if broadcast {
            m.set_flags(Flags::default().set_broadcast());
        }
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        let mut id = vec![1u8];
        id.extend_from_slice(&self.mac);
        opts.insert(DhcpOption::ClientIdentifier(id));
        if kind != MessageType::Release {
            opts.insert(DhcpOption::MaxMessageSize(1500));
            opts.insert(DhcpOption::ParameterRequestList(vec![
                OptionCode::SubnetMask,
                OptionCode::Router,
                OptionCode::DomainNameServer,
                OptionCode::DomainName,
                OptionCode::DomainSearch,
                OptionCode::AddressLeaseTime,
                OptionCode::Renewal,
                OptionCode::Rebinding,
            ]));
            if !self.hostname.is_empty() {
                opts.insert(DhcpOption::Hostname(self.hostname.clone()));
            }
        }
        m
    }

    /// DHCPDISCOVER, broadcast.
    pub fn discover(&self, xid: u32) -> Result<Vec<u8>, Error> {
        encode(&self.base(xid, MessageType::Discover, Ipv4Addr::UNSPECIFIED, true))
    }

    /// DHCPREQUEST in SELECTING state, for an offer.
    pub fn request_offer(&self, xid: u32, offer: &Lease) -> Result<Vec<u8>, Error> {
        let mut m = self.base(xid, MessageType::Request, Ipv4Addr::UNSPECIFIED, true);
        m.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(offer.address));
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(offer.server));
        encode(&m)
    }

    /// DHCPREQUEST in RENEWING (unicast) or REBINDING (broadcast) state: `ciaddr` set,
    /// no server identifier.
    pub fn request_extend(&self, xid: u32, address: Ipv4Addr) -> Result<Vec<u8>, Error> {
        encode(&self.base(xid, MessageType::Request, address, false))
    }

    /// DHCPRELEASE of a lease.
    pub fn release(&self, xid: u32, lease: &Lease) -> Result<Vec<u8>, Error> {
        let mut m = self.base(xid, MessageType::Release, lease.address, false);
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(lease.server));
        encode(&m)
    }
}

fn encode(m: &Message) -> Result<Vec<u8>, Error> {
    m.to_vec().map_err(Error::Encode)
}

/// The prefix length of a netmask, or `None` when it is not contiguous.
pub fn mask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// The prefix of the address's historic class (A /8, B /16, C /24), used when no mask is given.
pub fn classful_prefix(addr: Ipv4Addr) -> u8 {
    match addr.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// Decodes a server reply; `None` unless it is a valid OFFER/ACK/NAK for our `xid`
/// and hardware address.
pub fn parse_reply(bytes: &[u8], xid: u32, mac: &[u8; 6]) -> Option<Reply> {
    let m = Message::from_bytes(bytes).ok()?;
    // dhcproto's `chaddr` slices its 16-byte field by the packet's hardware address length and
    // panics on a longer one; a reply from the LAN must never panic PID 1's DHCP thread. Ours is
    // Ethernet: 6 bytes.
    if m.hlen() != 6 {
        return None;
    }
    if m.opcode() != Opcode::BootReply || m.xid() != xid || m.chaddr().get(..6)? != mac {
        return None;
    }
    let opts = m.opts();
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => m.siaddr(),
    };
    let kind = opts.msg_type()?;
    if kind == MessageType::Nak {
        return Some(Reply::Nak(server));
    }
    if kind != MessageType::Offer && kind != MessageType::Ack {
        return None;
    }
    let address = m.yiaddr();
    if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
        return None;
    }
    let prefix = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => {
            mask_prefix(*mask).unwrap_or(classful_prefix(address))
        }
        _ => classful_prefix(address),
    };
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) if *t > 0 => *t,
        _ => DEFAULT_LEASE_SECS,
    };
    let (t1_default, t2_default) = default_timers(lease_secs);
    let mut t1_secs = match opts.get(OptionCode::Renewal) {
        Some(DhcpOption::Renewal(t)) => *t,
        _ => t1_default,
    };
    let mut t2_secs = match opts.get(OptionCode::Rebinding) {
        Some(DhcpOption::Rebinding(t)) => *t,
        _ => t2_default,
    };
    // RFC 2131 4.4.5: T1 < T2 < lease; fall back to the defaults when a server says otherwise.
    if lease_secs != INFINITE && !(t1_secs < t2_secs && t2_secs < lease_secs) {
        t1_secs = t1_default;
        t2_secs = t2_default;
    }
    let routers = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.clone(),
        _ => Vec::new(),
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => Vec::new(),
    };
    let mut search: Vec<String> = match opts.get(OptionCode::DomainSearch) {
        Some(DhcpOption::DomainSearch(names)) => names
            .iter()
            .map(|n| n.to_ascii().trim_end_matches('.').to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        _ => Vec::new(),
    };
    if search.is_empty() {
        if let Some(DhcpOption::DomainName(d)) = opts.get(OptionCode::DomainName) {
            let d = d.trim().trim_end_matches('.');
            if !d.is_empty() {
                search.push(d.to_owned());
            }
        }
    }
    let lease = Lease {
        address,
        prefix,
        server,
        routers,
        dns,
        search,
        lease_secs,
        t1_secs,
        t2_secs,
    };
    Some(if kind == MessageType::Offer {
        Reply::Offer(lease)
    } else {
        Reply::Ack(lease)
    })
}

/// RFC 2131 defaults: T1 = 0.5 × lease, T2 = 0.875 × lease.
pub fn default_timers(lease_secs: u32) -> (u32, u32) {
    if lease_secs == INFINITE {
        return (INFINITE, INFINITE);
    }
    let l = u64::from(lease_secs);
    ((l / 2) as u32, (l * 7 / 8) as u32)
}

/// Reads the message type of a request (used by the test server).
#[cfg(test)]
pub fn request_kind(bytes: &[u8]) -> Option<(Message, MessageType)> {
    let m = Message::from_bytes(bytes).ok()?;
    let kind = m.opts().msg_type()?;
    Some((m, kind))
}

#[cfg(test)]
pub mod testserver {
    //! Builds server replies for tests.
    use super::*;
    use dhcproto::Name;

    /// What the test server hands out.
    #[derive(Debug, Clone)]
    pub struct Offer {
        /// Server address.
        pub server: Ipv4Addr,
        /// Address offered.
        pub address: Ipv4Addr,
        /// Router.
        pub router: Ipv4Addr,
        /// DNS server.
        pub dns: Ipv4Addr,
        /// Lease time.
        pub lease_secs: u32,
    }

    /// A reply of `kind` to `req`.
    pub fn reply(req: &Message, kind: MessageType, o: &Offer) -> Vec<u8> {
        let mut m = Message::new_with_id(
            req.xid(),
            Ipv4Addr::UNSPECIFIED,
            if kind == MessageType::Nak {
                Ipv4Addr::UNSPECIFIED
            } else {
                o.address
            },
            o.server,
            Ipv4Addr::UNSPECIFIED,
            req.chaddr().get(..6).unwrap_or(&[0; 6]),
        );
        m.set_opcode(Opcode::BootReply);
        m.set_flags(req.flags());
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(o.server));
        if kind != MessageType::Nak {
            opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
            opts.insert(DhcpOption::Router(vec![o.router]));
            opts.insert(DhcpOption::DomainNameServer(vec![o.dns]));
            opts.insert(DhcpOption::AddressLeaseTime(o.lease_secs));
            if let Ok(n) = Name::from_ascii("lab.example.") {
                opts.insert(DhcpOption::DomainSearch(vec![n]));
            }
        }
        m.to_vec().expect("encode reply")
    }
}

#[cfg(test)]
mod tests {
    use super::testserver::{reply, Offer};
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn client() -> Client {
        Client {
            mac: MAC,
            hostname: "node-1".into(),
        }
    }

    fn offer() -> Offer {
        Offer {
            server: Ipv4Addr::new(10, 0, 2, 2),
            address: Ipv4Addr::new(10, 0, 2, 15),
            router: Ipv4Addr::new(10, 0, 2, 1),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            lease_secs: 86400,
        }
    }

    #[test]
    fn discover_carries_broadcast_flag_hostname_and_chaddr() {
        let bytes = client().discover(0x1234).unwrap();
        let (m, kind) = request_kind(&bytes).unwrap();
        assert_eq!(kind, MessageType::Discover);
        assert_eq!(m.xid(), 0x1234);
        assert!(m.flags().broadcast());
        assert_eq!(&m.chaddr()[..6], &MAC);
        assert_eq!(
            m.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("node-1".into()))
        );
    }

    #[test]
    fn offer_round_trip_extracts_lease_with_default_timers() {
        let disc = client().discover(7).unwrap();
        let (req, _) = request_kind(&disc).unwrap();
        let bytes = reply(&req, MessageType::Offer, &offer());
        let Some(Reply::Offer(lease)) = parse_reply(&bytes, 7, &MAC) else {
            panic!("not an offer");
        };
        assert_eq!(lease.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(lease.prefix, 24);
        assert_eq!(lease.server, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(lease.routers, vec![Ipv4Addr::new(10, 0, 2, 1)]);
        assert_eq!(lease.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(lease.search, vec!["lab.example".to_owned()]);
        assert_eq!(lease.lease_secs, 86400);
        assert_eq!((lease.t1_secs, lease.t2_secs), (43200, 75600));

        let req_bytes = client().request_offer(8, &lease).unwrap();
        let (req, kind) = request_kind(&req_bytes).unwrap();
        assert_eq!(kind, MessageType::Request);
        assert_eq!(
            req.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(lease.address))
        );
        assert_eq!(
            req.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(lease.server))
        );
    }

    #[test]
    fn ignores_wrong_xid_wrong_mac_and_requests() {
        let (req, _) = request_kind(&client().discover(7).unwrap()).unwrap();
        let bytes = reply(&req, MessageType::Offer, &offer());
        assert_eq!(parse_reply(&bytes, 8, &MAC), None);
        assert_eq!(parse_reply(&bytes, 7, &[1, 2, 3, 4, 5, 6]), None);
        assert_eq!(parse_reply(&client().discover(7).unwrap(), 7, &MAC), None);
        assert_eq!(parse_reply(b"garbage", 7, &MAC), None);
    }

    /// Found by the `dhcp_reply` fuzz target: a hardware address length above 16 made the
    /// decoder slice past its field and panic, in PID 1.
    #[test]
    fn a_reply_with_an_overlong_hardware_address_length_is_ignored_not_a_panic() {
        let (req, _) = request_kind(&client().discover(7).unwrap()).unwrap();
        let mut bytes = reply(&req, MessageType::Offer, &offer());
        for hlen in [0u8, 5, 7, 16, 17, 122, 255] {
            bytes[2] = hlen;
            assert_eq!(parse_reply(&bytes, 7, &MAC), None, "hlen {hlen}");
        }
        bytes[2] = 6;
        assert!(parse_reply(&bytes, 7, &MAC).is_some());
    }

    #[test]
    fn nak_is_recognised() {
        let (req, _) = request_kind(&client().discover(9).unwrap()).unwrap();
        let bytes = reply(&req, MessageType::Nak, &offer());
        assert_eq!(
            parse_reply(&bytes, 9, &MAC),
            Some(Reply::Nak(Ipv4Addr::new(10, 0, 2, 2)))
        );
    }

    #[test]
    fn renew_and_release_set_ciaddr_without_broadcast() {
        let addr = Ipv4Addr::new(10, 0, 2, 15);
        let (m, kind) = request_kind(&client().request_extend(3, addr).unwrap()).unwrap();
        assert_eq!(kind, MessageType::Request);
        assert_eq!(m.ciaddr(), addr);
        assert!(!m.flags().broadcast());
        assert!(m.opts().get(OptionCode::ServerIdentifier).is_none());

        let (req, _) = request_kind(&client().discover(1).unwrap()).unwrap();
        let Some(Reply::Ack(lease)) =
            parse_reply(&reply(&req, MessageType::Ack, &offer()), 1, &MAC)
        else {
            panic!("not an ack");
        };
        let (m, kind) = request_kind(&client().release(4, &lease).unwrap()).unwrap();
        assert_eq!(kind, MessageType::Release);
        assert_eq!(m.ciaddr(), addr);
    }

    #[test]
    fn default_timers_follow_rfc() {
        assert_eq!(default_timers(3600), (1800, 3150));
        assert_eq!(default_timers(INFINITE), (INFINITE, INFINITE));
        assert_eq!(default_timers(1), (0, 0));
    }

    #[test]
    fn mask_prefix_rejects_holes() {
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(mask_prefix(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
    }
}
