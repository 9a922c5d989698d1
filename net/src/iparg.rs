//! The kernel `ip=` argument (Documentation/admin-guide/nfs/nfsroot.rst).
//!
//! `ip=dhcp`, `ip=off`/`ip=none`, or
//! `ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`
//! with any field empty.

use std::net::{IpAddr, Ipv4Addr};

use hvnode_api::config::{validate_hostname, validate_ifname, Cidr};

use crate::dhcp::msg::{classful_prefix, mask_prefix};

/// Errors in an `ip=` argument.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A field that must be an IPv4 address is not one.
    #[error("Invalid {field} {value:?} in ip=: expected an IPv4 address")]
    Address {
        /// Which field.
        field: &'static str,
        /// What was given.
        value: String,
    },
    /// The netmask is not a contiguous mask.
    #[error("Invalid netmask {0:?} in ip=: expected e.g. 255.255.255.0")]
    Netmask(String),
    /// The autoconf field is unknown.
    #[error("Invalid autoconf {0:?} in ip=: use dhcp, on, any, off, none or static")]
    Autoconf(String),
    /// The device name is invalid.
    #[error("Invalid device {0:?} in ip=")]
    Device(String),
    /// The host name is invalid.
    #[error("Invalid hostname {0:?} in ip=")]
    Hostname(String),
    /// Static mode without a client address.
    #[error("ip= asks for a static address but gives no client address")]
    NoAddress,
}

/// What the `ip=` argument asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpArg {
    /// No automatic configuration at all.
    Off,
    /// DHCP on `device` (or on every NIC when absent).
    Dhcp {
        /// The device, if named.
        device: Option<String>,
        /// Host name to use.
        hostname: Option<String>,
        /// DNS servers that override DHCP's.
        dns: Vec<IpAddr>,
    },
    /// A static address on `device` (or on the management interface when absent).
    Static {
        /// The device, if named.
        device: Option<String>,
        /// Address and prefix.
        address: Cidr,
        /// Default gateway.
        gateway: Option<Ipv4Addr>,
        /// Host name to use.
        hostname: Option<String>,
        /// DNS servers.
        dns: Vec<IpAddr>,
    },
}

impl IpArg {
    /// The device the argument names, if any.
    pub fn device(&self) -> Option<&str> {
        match self {
            IpArg::Off => None,
            IpArg::Dhcp { device, .. } | IpArg::Static { device, .. } => device.as_deref(),
        }
    }

    /// The host name the argument gives, if any.
    pub fn hostname(&self) -> Option<&str> {
        match self {
            IpArg::Off => None,
            IpArg::Dhcp { hostname, .. } | IpArg::Static { hostname, .. } => hostname.as_deref(),
        }
    }

    /// The DNS servers the argument gives.
    pub fn dns(&self) -> &[IpAddr] {
        match self {
            IpArg::Off => &[],
            IpArg::Dhcp { dns, .. } | IpArg::Static { dns, .. } => dns,
        }
    }
}

fn v4(field: &'static str, s: &str) -> Result<Option<Ipv4Addr>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| Error::Address {
        field,
        value: s.to_owned(),
    })
}

/// Parses the value of `ip=` (without the `ip=`).
pub fn parse(value: &str) -> Result<IpArg, Error> {
    match value {
        "off" | "none" => return Ok(IpArg::Off),
        "dhcp" | "on" | "any" | "both" | "bootp" | "rarp" => {
            return Ok(IpArg::Dhcp {
                device: None,
                hostname: None,
                dns: Vec::new(),
            })
        }
        _ => {}
    }
    let mut f = value.split(':');
    let mut next = || f.next().unwrap_or("");
    let client = v4("client address", next())?;
    let _server = v4("server address", next())?;
    let gateway = v4("gateway", next())?;
    let netmask = next();
    let hostname = next();
    let device = next();
    let autoconf = next();
    let dns0 = v4("DNS server", next())?;
    let dns1 = v4("DNS server", next())?;

    let prefix = match netmask {
        "" => None,
        m => {
            let mask: Ipv4Addr = m.parse().map_err(|_| Error::Netmask(m.to_owned()))?;
            Some(mask_prefix(mask).ok_or_else(|| Error::Netmask(m.to_owned()))?)
        }
    };
    let hostname = match hostname {
        "" => None,
        h => {
            validate_hostname(h).map_err(|_| Error::Hostname(h.to_owned()))?;
            Some(h.to_owned())
        }
    };
    let device = match device {
        "" => None,
        d => {
            validate_ifname(d).map_err(|_| Error::Device(d.to_owned()))?;
            Some(d.to_owned())
        }
    };
    let dns: Vec<IpAddr> = [dns0, dns1].into_iter().flatten().map(IpAddr::V4).collect();
    let dhcp = match autoconf {
        "dhcp" | "on" | "any" | "both" | "bootp" | "rarp" => true,
        "off" | "none" | "static" => false,
        // With no autoconf field the kernel configures statically when given an address.
        "" => client.is_none(),
        a => return Err(Error::Autoconf(a.to_owned())),
    };
    if dhcp {
        return Ok(IpArg::Dhcp {
            device,
            hostname,
            dns,
        });
    }
    let addr = client.ok_or(Error::NoAddress)?;
    Ok(IpArg::Static {
        device,
        address: Cidr {
            addr: IpAddr::V4(addr),
            prefix: prefix.unwrap_or_else(|| classful_prefix(addr)),
        },
        gateway,
        hostname,
        dns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keywords() {
        assert_eq!(parse("off"), Ok(IpArg::Off));
        assert_eq!(parse("none"), Ok(IpArg::Off));
        assert_eq!(
            parse("dhcp"),
            Ok(IpArg::Dhcp {
                device: None,
                hostname: None,
                dns: vec![]
            })
        );
    }

    #[test]
    fn parses_full_static_form() {
        let arg = parse("192.0.2.10::192.0.2.1:255.255.255.0:node1:eth0:off:192.0.2.53:192.0.2.54")
            .unwrap();
        assert_eq!(
            arg,
            IpArg::Static {
                device: Some("eth0".into()),
                address: "192.0.2.10/24".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
                hostname: Some("node1".into()),
                dns: vec!["192.0.2.53".parse().unwrap(), "192.0.2.54".parse().unwrap()],
            }
        );
        assert_eq!(arg.device(), Some("eth0"));
        assert_eq!(arg.hostname(), Some("node1"));
    }

    #[test]
    fn static_without_netmask_uses_class_prefix() {
        let arg = parse("10.1.2.3").unwrap();
        assert!(matches!(arg, IpArg::Static { address, .. } if address.prefix == 8));
        let arg = parse("192.168.1.9:::::eth1:static").unwrap();
        assert!(matches!(arg, IpArg::Static { address, .. } if address.prefix == 24));
    }

    #[test]
    fn dhcp_form_with_device_and_empty_fields() {
        assert_eq!(
            parse(":::::eth1:dhcp").unwrap(),
            IpArg::Dhcp {
                device: Some("eth1".into()),
                hostname: None,
                dns: vec![]
            }
        );
        // No address and no autoconf: DHCP, as the kernel does.
        assert!(matches!(
            parse("::::host:eth2").unwrap(),
            IpArg::Dhcp { .. }
        ));
    }

    #[test]
    fn rejects_bad_fields() {
        assert!(matches!(parse("300.1.1.1"), Err(Error::Address { .. })));
        assert_eq!(
            parse("10.0.0.1:::255.0.255.0"),
            Err(Error::Netmask("255.0.255.0".into()))
        );
        assert_eq!(
            parse("10.0.0.1::::::bogus"),
            Err(Error::Autoconf("bogus".into()))
        );
        assert_eq!(parse(":::::eth0:static"), Err(Error::NoAddress));
        assert!(matches!(parse("::::-bad-"), Err(Error::Hostname(_))));
    }
}
