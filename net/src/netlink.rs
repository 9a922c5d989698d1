//! A small synchronous rtnetlink client: links, addresses and default routes.
//!
//! Every request carries `NLM_F_ACK`, so each call returns only once the kernel has
//! answered; errors carry the operation and the kernel's errno.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use hvnode_api::config::Cidr;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    BondMode, InfoBond, InfoBridge, InfoData, InfoKind, InfoVlan, LinkAttribute, LinkFlags,
    LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Errors talking rtnetlink.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened or bound.
    #[error("Cannot open a netlink socket")]
    Socket(#[source] io::Error),
    /// Sending a request failed.
    #[error("Netlink send failed")]
    Send(#[source] io::Error),
    /// Receiving a reply failed.
    #[error("Netlink receive failed")]
    Recv(#[source] io::Error),
    /// A reply could not be decoded.
    #[error("Cannot decode a netlink reply: {0}")]
    Decode(String),
    /// The kernel refused a request.
    #[error("{op} refused by the kernel")]
    Kernel {
        /// What was asked.
        op: String,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// No link has that name.
    #[error("No interface named {0:?}")]
    NoSuchLink(String),
}

impl Error {
    /// Whether the kernel said the object already exists.
    pub fn is_exists(&self) -> bool {
        matches!(self, Error::Kernel { source, .. } if source.raw_os_error() == Some(libc::EEXIST))
    }

    /// Whether the kernel said the object does not exist.
    pub fn is_missing(&self) -> bool {
        matches!(self, Error::Kernel { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL) | Some(libc::ENODEV) | Some(libc::ENOENT)))
    }
}

type Result<T> = std::result::Result<T, Error>;

/// A network link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, when it is an Ethernet one.
    pub mac: Option<[u8; 6]>,
    /// Administratively up.
    pub up: bool,
    /// Carrier present.
    pub carrier: bool,
    /// Index of the bridge or bond this link is enslaved to.
    pub master: Option<u32>,
}

/// An address on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    /// Interface index.
    pub index: u32,
    /// Address and prefix.
    pub cidr: Cidr,
    /// Link-local or host scope (not reported as a configured address).
    pub local_scope: bool,
}

/// A default route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultRoute {
    /// Outgoing interface index.
    pub oif: Option<u32>,
    /// Gateway.
    pub gateway: IpAddr,
}

/// Who installed a default route (the route's protocol field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOrigin {
    /// From the node config or `ip=`.
    Static,
    /// From a DHCP lease.
    Dhcp,
}

/// Multicast groups for [`Monitor`]: link, IPv4/IPv6 address and IPv4 route changes.
const MONITOR_GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100;

/// A blocking rtnetlink request socket.
#[derive(Debug)]
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
        sock.bind_auto().map_err(Error::Socket)?;
        Ok(Netlink { sock, seq: 0 })
    }

    fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(Error::Send)?;

        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(Error::Recv)?;
            let mut off = 0usize;
            while off < data.len() {
                let rest = data.get(off..).unwrap_or_default();
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                    .map_err(|e| Error::Decode(e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(Error::Decode("zero-length message".into()));
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(_) => Err(Error::Kernel {
                                op: op.to_owned(),
                                source: e.to_io(),
                            }),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// All links.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let replies = self.request(
            "Listing links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(&l)),
                _ => None,
            })
            .collect())
    }

    /// The link called `name`.
    pub fn link(&mut self, name: &str) -> Result<Link> {
        self.links()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::NoSuchLink(name.to_owned()))
    }

    /// All addresses of all links.
    pub fn addrs(&mut self) -> Result<Vec<Addr>> {
        let replies = self.request(
            "Listing addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            // IFA_LOCAL is the interface's own address on point-to-point links; prefer it.
            let local = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                out.push(Addr {
                    index: a.header.index,
                    cidr: Cidr {
                        addr,
                        prefix: a.header.prefix_len,
                    },
                    local_scope: !matches!(a.header.scope, AddressScope::Universe),
                });
            }
        }
        Ok(out)
    }

    /// Default routes (IPv4 and IPv6) of the main table.
    pub fn default_routes(&mut self) -> Result<Vec<DefaultRoute>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let replies = self.request(
                "Listing routes",
                RouteNetlinkMessage::GetRoute(msg),
                NLM_F_DUMP,
            )?;
            for m in replies {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    continue;
                };
                if r.header.destination_prefix_length != 0
                    || r.header.table != RouteHeader::RT_TABLE_MAIN
                {
                    continue;
                }
                let mut gateway = None;
                let mut oif = None;
                for at in &r.attributes {
                    match at {
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => {
                            gateway = Some(IpAddr::V4(*g))
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => {
                            gateway = Some(IpAddr::V6(*g))
                        }
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                if let Some(gateway) = gateway {
                    out.push(DefaultRoute { oif, gateway });
                }
            }
        }
        Ok(out)
    }

    fn set_link(&mut self, op: &str, index: u32, f: impl FnOnce(&mut LinkMessage)) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        f(&mut msg);
        self.request(op, RouteNetlinkMessage::SetLink(msg), 0)
            .map(drop)
    }

    /// Sets a link up or down.
    pub fn set_up(&mut self, index: u32, up: bool) -> Result<()> {
        let op = if up {
            "Setting link up"
        } else {
            "Setting link down"
        };
        self.set_link(op, index, |m| {
            if up {
                m.header.flags = LinkFlags::Up;
            }
            m.header.change_mask = LinkFlags::Up;
        })
    }

    /// Enslaves a link to a bridge or bond, or frees it (`None`).
    pub fn set_master(&mut self, index: u32, master: Option<u32>) -> Result<()> {
        self.set_link("Enslaving link", index, |m| {
            m.attributes
                .push(LinkAttribute::Controller(master.unwrap_or(0)));
        })
    }

    /// Sets the MTU of a link.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        self.set_link("Setting MTU", index, |m| {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        })
    }

    fn new_link(&mut self, op: &str, name: &str, attrs: Vec<LinkAttribute>) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes.extend(attrs);
        self.request(
            op,
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Creates a bridge with a fixed MAC that forwards at once (forward delay 0).
    pub fn create_bridge(&mut self, name: &str, mac: Option<[u8; 6]>) -> Result<()> {
        let mut attrs = vec![LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::ForwardDelay(0)])),
        ])];
        if let Some(mac) = mac {
            attrs.push(LinkAttribute::Address(mac.to_vec()));
        }
        self.new_link(&format!("Creating bridge {name}"), name, attrs)
    }

    /// Creates a bond in the given mode.
    pub fn create_bond(&mut self, name: &str, mode: BondMode) -> Result<()> {
        let attrs = vec![LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bond),
            LinkInfo::Data(InfoData::Bond(vec![InfoBond::Mode(mode)])),
        ])];
        self.new_link(&format!("Creating bond {name}"), name, attrs)
    }

    /// Creates an 802.1q VLAN device on top of `parent`.
    pub fn create_vlan(&mut self, name: &str, parent: u32, id: u16) -> Result<()> {
        let attrs = vec![
            LinkAttribute::Link(parent),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vlan),
                LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(id)])),
            ]),
        ];
        self.new_link(&format!("Creating VLAN {name}"), name, attrs)
    }

    /// Creates a veth pair (tests use it to build a link inside a namespace).
    #[cfg(test)]
    pub fn create_veth(&mut self, name: &str, peer: &str) -> Result<()> {
        use netlink_packet_route::link::InfoVeth;
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_owned()));
        let attrs = vec![LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ])];
        self.new_link(&format!("Creating veth {name}"), name, attrs)
    }

    /// Moves a link into the network namespace behind `fd` (tests put a DHCP server there).
    #[cfg(test)]
    pub fn move_to_netns(&mut self, index: u32, fd: i32) -> Result<()> {
        self.set_link("Moving link to a namespace", index, |m| {
            m.attributes.push(LinkAttribute::NetNsFd(fd));
        })
    }

    /// Deletes a link.
    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request("Deleting link", RouteNetlinkMessage::DelLink(msg), 0)
            .map(drop)
    }

    fn addr_msg(index: u32, cidr: Cidr) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.index = index;
        msg.header.prefix_len = cidr.prefix;
        match cidr.addr {
            IpAddr::V4(v4) => {
                msg.header.family = AddressFamily::Inet;
                if v4.is_loopback() {
                    msg.header.scope = AddressScope::Host;
                }
                msg.attributes.push(AddressAttribute::Local(cidr.addr));
                msg.attributes.push(AddressAttribute::Address(cidr.addr));
                if cidr.prefix < 31 {
                    msg.attributes
                        .push(AddressAttribute::Broadcast(broadcast(v4, cidr.prefix)));
                }
            }
            IpAddr::V6(v6) => {
                msg.header.family = AddressFamily::Inet6;
                if v6.is_loopback() {
                    msg.header.scope = AddressScope::Host;
                }
                msg.attributes.push(AddressAttribute::Address(cidr.addr));
            }
        }
        msg
    }

    /// Adds an address to a link; an address already present is not an error.
    pub fn add_addr(&mut self, index: u32, cidr: Cidr) -> Result<()> {
        let r = self.request(
            &format!("Adding address {cidr}"),
            RouteNetlinkMessage::NewAddress(Self::addr_msg(index, cidr)),
            NLM_F_CREATE | NLM_F_EXCL,
        );
        match r {
            Err(e) if e.is_exists() => Ok(()),
            r => r.map(drop),
        }
    }

    /// Removes an address from a link; an address already gone is not an error.
    pub fn del_addr(&mut self, index: u32, cidr: Cidr) -> Result<()> {
        let r = self.request(
            &format!("Removing address {cidr}"),
            RouteNetlinkMessage::DelAddress(Self::addr_msg(index, cidr)),
            0,
        );
        match r {
            Err(e) if e.is_missing() => Ok(()),
            r => r.map(drop),
        }
    }

    fn route_msg(index: u32, gateway: IpAddr, origin: RouteOrigin) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = match gateway {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = match origin {
            RouteOrigin::Static => RouteProtocol::Static,
            RouteOrigin::Dhcp => RouteProtocol::Dhcp,
        };
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        msg
    }

    /// Adds a default route through `gateway` on a link; one already present is not an error.
    pub fn add_default_route(
        &mut self,
        index: u32,
        gateway: IpAddr,
        origin: RouteOrigin,
    ) -> Result<()> {
        let r = self.request(
            &format!("Adding default route via {gateway}"),
            RouteNetlinkMessage::NewRoute(Self::route_msg(index, gateway, origin)),
            NLM_F_CREATE | NLM_F_EXCL,
        );
        match r {
            Err(e) if e.is_exists() => Ok(()),
            r => r.map(drop),
        }
    }

    /// Removes a default route; one already gone is not an error.
    pub fn del_default_route(
        &mut self,
        index: u32,
        gateway: IpAddr,
        origin: RouteOrigin,
    ) -> Result<()> {
        let r = self.request(
            &format!("Removing default route via {gateway}"),
            RouteNetlinkMessage::DelRoute(Self::route_msg(index, gateway, origin)),
            0,
        );
        match r {
            Err(e) if e.is_missing() => Ok(()),
            r => r.map(drop),
        }
    }
}

/// The IPv4 broadcast address of a prefix.
pub fn broadcast(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = prefix_mask(prefix);
    Ipv4Addr::from(u32::from(addr) | !mask)
}

/// The IPv4 netmask of a prefix length (clamped to 32).
pub fn prefix_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

fn link_from(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        up: l.header.flags.contains(LinkFlags::Up),
        carrier: l.header.flags.contains(LinkFlags::LowerUp),
        master: None,
    };
    for at in &l.attributes {
        match at {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Controller(m) if *m != 0 => link.master = Some(*m),
            _ => {}
        }
    }
    link
}

/// A socket that hears link, address and route changes.
#[derive(Debug)]
pub struct Monitor {
    sock: Socket,
}

impl Monitor {
    /// Subscribes to link, address and route change notifications.
    pub fn open() -> Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
        sock.bind(&SocketAddr::new(0, MONITOR_GROUPS))
            .map_err(Error::Socket)?;
        Ok(Monitor { sock })
    }

    /// Waits up to `timeout` for notifications; returns whether any arrived (and
    /// drains them).
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        if !poll_readable(self.sock.as_raw_fd(), timeout).map_err(Error::Recv)? {
            return Ok(false);
        }
        // Drain without blocking: the content does not matter, only that something changed.
        let mut buf = Vec::with_capacity(65536);
        loop {
            buf.clear();
            match self.sock.recv(&mut buf, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                // ENOBUFS: notifications were lost; that still means "something changed".
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(true),
                Err(e) => return Err(Error::Recv(e)),
            }
        }
    }
}

/// Polls one descriptor for input; `Ok(false)` on timeout or interruption.
pub fn poll_readable(fd: i32, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0 && pfd.revents & libc::POLLIN != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_and_mask_cover_edge_prefixes() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(32), u32::MAX);
        assert_eq!(
            broadcast(Ipv4Addr::new(10, 0, 2, 15), 24),
            Ipv4Addr::new(10, 0, 2, 255)
        );
        assert_eq!(
            broadcast(Ipv4Addr::new(10, 1, 2, 3), 8),
            Ipv4Addr::new(10, 255, 255, 255)
        );
    }
}
