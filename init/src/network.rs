//! The glue to `hvnode-net`: start it, report what it configured.

use std::time::Duration;

use hvnode_api::config::NodeConfig;
use hvnode_api::node::{AddressSource, NetworkStatus};
use hvnode_net::Network;

use crate::out;

/// How long the ready report waits for a first address.
pub const CONFIGURE_WAIT: Duration = Duration::from_secs(20);

/// Starts networking; errors are logged (the node still boots and shows its console).
pub fn start(config: &NodeConfig, ip_arg: Option<&str>) -> Option<Network> {
    let log: Box<dyn Fn(&str) + Send + Sync> =
        Box::new(|line: &str| out::log_only(&format!("net: {line}")));
    match Network::start(config, ip_arg, log) {
        Ok(n) => Some(n),
        Err(e) => {
            out::say(&format!("network: {e}"));
            None
        }
    }
}

/// Progress lines such as `network: eth0 10.0.2.15/24 (dhcp)`.
pub fn status_lines(status: &NetworkStatus) -> Vec<String> {
    let mut lines: Vec<String> = status
        .interfaces
        .iter()
        .filter(|i| !i.addresses.is_empty())
        .map(|i| {
            let source = match i.source {
                AddressSource::Dhcp => "dhcp",
                AddressSource::Static => "static",
                AddressSource::None => "none",
            };
            format!("network: {} {} ({source})", i.name, i.addresses.join(" "))
        })
        .collect();
    if lines.is_empty() {
        lines.push(
            "network: no address configured yet (DHCP keeps trying; see the console)".to_owned(),
        );
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnode_api::node::NicStatus;

    #[test]
    fn reports_addressed_interfaces_only() {
        let status = NetworkStatus {
            hostname: "n".into(),
            interfaces: vec![
                NicStatus {
                    name: "br0".into(),
                    mac: "52:54:00:12:34:56".into(),
                    carrier: true,
                    addresses: vec!["10.0.2.15/24".into()],
                    source: AddressSource::Dhcp,
                },
                NicStatus {
                    name: "eth1".into(),
                    mac: "52:54:00:12:34:57".into(),
                    carrier: false,
                    addresses: vec![],
                    source: AddressSource::None,
                },
            ],
            gateways: vec![],
            dns: vec![],
        };
        assert_eq!(
            status_lines(&status),
            vec!["network: br0 10.0.2.15/24 (dhcp)".to_owned()]
        );
        assert!(status_lines(&NetworkStatus::default())[0].contains("no address"));
    }
}
