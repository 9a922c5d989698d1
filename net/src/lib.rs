//! Node networking: netlink, bridge, bond, VLAN, static addresses and a DHCPv4 client.

pub mod dhcp;
pub mod iparg;
pub mod netlink;
pub mod plan;
