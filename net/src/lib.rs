//! Node networking for PID 1: loopback, bonds, the management bridge, VLANs, static
//! addresses, a DHCPv4 client per interface, `resolv.conf`, and the published state.
//!
//! Everything is synchronous (rtnetlink through `netlink-sys`, DHCP on `AF_PACKET`
//! sockets, one thread per DHCP interface and one watching link changes) and nothing
//! here panics: failures on one interface are logged and the others go on.

pub mod dhcp;
pub mod iparg;
pub mod netlink;
pub mod plan;
pub mod resolv;
pub mod status;

mod runtime;

#[cfg(test)]
mod roottests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hvnode_api::config::{ConfigError, NetworkConfig, NodeConfig};
use hvnode_api::node::NetworkStatus;

use runtime::Shared;

/// Errors from [`Network`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("Invalid network configuration")]
    Config(#[from] ConfigError),
    /// The configuration cannot be turned into a plan (e.g. an unknown bond mode).
    #[error(transparent)]
    Plan(#[from] plan::Error),
    /// Netlink could not be used at all.
    #[error("Cannot talk to the kernel's network stack")]
    Netlink(#[from] netlink::Error),
    /// A thread could not be started.
    #[error("Cannot start a networking thread")]
    Thread(#[source] std::io::Error),
}

/// Where the library reads `/sys` and writes its state files, overridable for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// sysfs root (`/sys`).
    pub sys: PathBuf,
    /// Runtime directory (`/run/hvnode`): `network.json` and `resolv.conf` go there.
    pub run: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            sys: PathBuf::from("/sys"),
            run: PathBuf::from(hvnode_api::paths::RUN_DIR),
        }
    }
}

impl Roots {
    /// The network state file ([`hvnode_api::paths::NETWORK_STATE`] by default).
    pub fn state_file(&self) -> PathBuf {
        self.run.join("network.json")
    }

    /// The resolver configuration `/etc/resolv.conf` points to.
    pub fn resolv_conf(&self) -> PathBuf {
        self.run.join("resolv.conf")
    }
}

/// The running network configuration. `Send + Sync`; threads run inside.
pub struct Network {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("roots", &self.shared.roots)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// Brings up lo, bonds, the management bridge, VLANs, addresses, DHCP, routes,
    /// resolv.conf. `ip_arg` is the kernel `ip=` argument if any. Errors per interface
    /// are logged, not fatal.
    pub fn start(
        config: &NodeConfig,
        ip_arg: Option<&str>,
        log: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Result<Network, Error> {
        Self::start_with(config, ip_arg, log, Roots::default())
    }

    /// [`Network::start`] with other sysfs and runtime roots.
    pub fn start_with(
        config: &NodeConfig,
        ip_arg: Option<&str>,
        log: Box<dyn Fn(&str) + Send + Sync>,
        roots: Roots,
    ) -> Result<Network, Error> {
        let shared = Shared::start(config, ip_arg, log, roots)?;
        Ok(Network { shared })
    }

    /// Re-applies a new network config live: what the old one created and no longer
    /// matches is removed (addresses, routes, VLANs, bonds, DHCP clients), then the new
    /// one is applied. Devices whose settings did not change are left alone.
    pub fn apply(&self, network: &NetworkConfig) -> Result<(), Error> {
        self.shared.apply(network)
    }

    /// Sets the host name used in DHCP option 12 and the state file.
    pub fn set_hostname(&self, hostname: &str) {
        self.shared.set_hostname(hostname);
    }

    /// The current network state (also published at [`Roots::state_file`]).
    pub fn status(&self) -> NetworkStatus {
        self.shared.publish()
    }

    /// Physical NICs (those with `/sys/class/net/X/device`) and their MACs, by name.
    pub fn macs(&self) -> Vec<(String, [u8; 6])> {
        self.shared.macs()
    }

    /// Waits until some non-loopback interface has a global address; true if it has.
    pub fn wait_configured(&self, timeout: Duration) -> bool {
        self.shared.wait_configured(timeout)
    }

    /// Sends DHCPRELEASE for every lease and stops all threads.
    pub fn stop(&self) {
        self.shared.stop();
    }
}

#[cfg(test)]
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Network>();
};

impl Drop for Network {
    fn drop(&mut self) {
        self.shared.stop_threads_quietly();
    }
}
