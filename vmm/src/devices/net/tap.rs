//! Tap devices: open (or create) one with a virtio-net header on every frame, bring it up and
//! put it on a bridge.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// The header every frame carries on the tap: `virtio_net_hdr_v1`, the same layout the guest
/// uses with VIRTIO_F_VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// `SIOCBRADDIF` from linux/sockios.h (not in the libc crate for glibc targets).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// Errors setting up a tap device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("Invalid interface name {0:?}")]
    Name(String),
    /// /dev/net/tun could not be opened.
    #[error("Opening /dev/net/tun: {0}")]
    Open(std::io::Error),
    /// An ioctl on the tap or a control socket failed.
    #[error("Tap {0}: {1}: {2}")]
    Ioctl(String, &'static str, std::io::Error),
    /// The bridge named in the config does not exist.
    #[error("Bridge {0} does not exist (tap {1} not attached)")]
    NoBridge(String, String),
}

fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::Name(name.to_owned()));
    }
    // SAFETY: ifreq is plain data (a name array and a union of integers and pointers); all
    // zeroes is a valid value of each member.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(ifr)
}

fn last_error(tap: &str, what: &'static str) -> TapError {
    TapError::Ioctl(tap.to_owned(), what, std::io::Error::last_os_error())
}

/// A datagram socket, for the interface ioctls.
fn control_socket(tap: &str) -> Result<OwnedFd, TapError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_error(tap, "socket"));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens tap `name` (creating it if it does not exist) as a non-blocking fd whose frames carry a
/// [`VNET_HDR_LEN`]-byte virtio-net header, sets it up, and adds it to `bridge` if given.
pub fn open(name: &str, bridge: Option<&str>) -> Result<File, TapError> {
    let mut ifr = ifreq(name)?;
    // Checked first so that a missing bridge leaves no tap behind.
    if let Some(bridge) = bridge {
        ifreq(bridge)?;
        let cname = std::ffi::CString::new(bridge).map_err(|_| TapError::Name(bridge.into()))?;
        // SAFETY: if_nametoindex reads the NUL-terminated string it is given.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NoBridge(bridge.to_owned(), name.to_owned()));
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is and outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(last_error(name, "TUNSETIFF"));
    }
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points at `hdr_len`.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(last_error(name, "TUNSETVNETHDRSZ"));
    }
    let sock = control_socket(name)?;
    let mut flags = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq it is given, which `flags` is.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut flags) } < 0 {
        return Err(last_error(name, "SIOCGIFFLAGS"));
    }
    // SAFETY: the kernel just wrote ifru_flags, the member read here.
    let current = unsafe { flags.ifr_ifru.ifru_flags };
    flags.ifr_ifru.ifru_flags = current | libc::IFF_UP as i16;
    // SAFETY: SIOCSIFFLAGS reads the ifreq it is given, which `flags` is.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &flags) } < 0 {
        return Err(last_error(name, "SIOCSIFFLAGS"));
    }
    if let Some(bridge) = bridge {
        let mut br = ifreq(bridge)?;
        let tname = std::ffi::CString::new(name).map_err(|_| TapError::Name(name.into()))?;
        // SAFETY: as above, for the tap's name.
        let index = unsafe { libc::if_nametoindex(tname.as_ptr()) };
        if index == 0 {
            return Err(last_error(name, "if_nametoindex"));
        }
        br.ifr_ifru.ifru_ifindex = index as libc::c_int;
        // SAFETY: SIOCBRADDIF reads an ifreq naming the bridge with the port's ifindex.
        if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDIF, &br) } < 0 {
            return Err(last_error(name, "SIOCBRADDIF"));
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_names_that_are_not_interface_names() {
        for bad in ["", "0123456789abcdef", "a\0b"] {
            assert!(matches!(ifreq(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        let ifr = ifreq("tap0").unwrap();
        assert_eq!(
            ifr.ifr_name[..5],
            [b't' as _, b'a' as _, b'p' as _, b'0' as _, 0]
        );
    }
}
