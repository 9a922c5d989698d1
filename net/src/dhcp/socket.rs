//! The sockets the DHCP client talks through: a cooked `AF_PACKET` socket bound to one
//! interface (works before the interface has an address) and, for unicast renewals and
//! releases, a UDP socket bound to the leased address.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::packet::{self, CLIENT_PORT, SERVER_PORT};
use crate::netlink::poll_readable;

/// Errors on the DHCP sockets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The packet socket could not be set up.
    #[error("Cannot open a packet socket")]
    Open(#[source] io::Error),
    /// Sending failed.
    #[error("Cannot send a DHCP packet")]
    Send(#[source] io::Error),
    /// Receiving failed.
    #[error("Cannot receive a DHCP packet")]
    Recv(#[source] io::Error),
}

const ETH_P_IP: u16 = 0x0800;

/// A cooked packet socket for IPv4 on one interface, filtered to UDP port 68.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

fn sockaddr(ifindex: i32, broadcast: bool) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_IP.to_be();
    sa.sll_ifindex = ifindex;
    if broadcast {
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    }
    sa
}

impl PacketSocket {
    /// Opens the socket on interface `ifindex`.
    pub fn open(ifindex: u32) -> Result<Self, Error> {
        let ifindex = i32::try_from(ifindex)
            .map_err(|_| Error::Open(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_IP.to_be()),
            )
        };
        if raw < 0 {
            return Err(Error::Open(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let mut filter = packet::client_filter();
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_mut_ptr(),
        };
        // SAFETY: `prog` points at `filter`, which outlives the call; the kernel copies it.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&prog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(Error::Open(io::Error::last_os_error()));
        }

        let sa = sockaddr(ifindex, false);
        // SAFETY: `sa` is a valid sockaddr_ll and the length matches it.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(Error::Open(io::Error::last_os_error()));
        }
        Ok(PacketSocket { fd, ifindex })
    }

    /// Broadcasts a DHCP payload from `src`:68 to 255.255.255.255:67.
    pub fn broadcast(&self, src: Ipv4Addr, payload: &[u8]) -> Result<(), Error> {
        let pkt = packet::build(src, Ipv4Addr::BROADCAST, CLIENT_PORT, SERVER_PORT, payload);
        let sa = sockaddr(self.ifindex, true);
        // SAFETY: `pkt` and `sa` are valid for the lengths given for the whole call.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(Error::Send(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits up to `timeout` for a UDP payload sent to port 68.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>, Error> {
        if !poll_readable(self.fd.as_raw_fd(), timeout).map_err(Error::Recv)? {
            return Ok(None);
        }
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(Error::Recv(e));
        }
        buf.truncate(n as usize);
        Ok(packet::parse(&buf)
            .filter(|d| d.dst_port == CLIENT_PORT && d.src_port == SERVER_PORT)
            .map(|d| d.payload.to_vec()))
    }

    /// Discards queued packets (stale replies from an earlier exchange).
    pub fn drain(&self) {
        while let Ok(Some(_)) = self.recv(Duration::ZERO) {}
    }
}

/// Sends a DHCP payload by unicast from `from`:68 to `server`:67 (RENEWING state,
/// DHCPRELEASE). The reply arrives on the packet socket; keep the returned socket open
/// while waiting for it so the kernel does not answer the server with port-unreachable.
pub fn unicast(from: Ipv4Addr, server: Ipv4Addr, payload: &[u8]) -> Result<UdpSocket, Error> {
    let sock = UdpSocket::bind(SocketAddrV4::new(from, CLIENT_PORT)).map_err(Error::Send)?;
    sock.send_to(payload, SocketAddrV4::new(server, SERVER_PORT))
        .map_err(Error::Send)?;
    Ok(sock)
}
