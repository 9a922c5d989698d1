//! Root-only tests, each in a private network namespace (`unshare(CLONE_NEWNET)` in a
//! fresh thread, whose child threads inherit it). They build veth pairs, never touch
//! the host's interfaces, and skip with a message when not root or when namespaces
//! are unavailable. Kernel features a machine lacks (bond, 802.1q) are skipped the same way.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhcproto::v4::MessageType;
use hvnode_api::config::{AddressMode, InterfaceConfig, NetworkConfig, NodeConfig};
use hvnode_api::node::{AddressSource, NetworkStatus};

use crate::dhcp::msg::{request_kind, testserver};
use crate::netlink::Netlink;
use crate::{Network, Roots};

/// Runs `f` in a new network namespace; `None` (after saying why) when that is impossible.
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        hvnode_base::testing::cannot_run(name, "needs root (network namespaces, veth)");
        return None;
    }
    let t = std::thread::spawn(move || {
        // SAFETY: unshare affects only the calling thread, which is ours alone.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    });
    match t.join() {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            hvnode_base::testing::cannot_run(
                name,
                &format!("cannot create a network namespace: {e}"),
            );
            None
        }
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn unsupported(e: &crate::netlink::Error) -> bool {
    matches!(e, crate::netlink::Error::Kernel { source, .. }
        if source.raw_os_error() == Some(libc::EOPNOTSUPP))
}

struct Dirs {
    root: PathBuf,
}

impl Dirs {
    fn new(tag: &str, nics: &[&str]) -> Dirs {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "hvnode-net-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        for n in nics {
            std::fs::create_dir_all(root.join("sys/class/net").join(n).join("device")).unwrap();
        }
        std::fs::create_dir_all(root.join("sys/class/net")).unwrap();
        Dirs { root }
    }

    fn roots(&self) -> Roots {
        Roots {
            sys: self.root.join("sys"),
            run: self.root.join("run"),
        }
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The log closure handed to [`Network`].
type Log = Box<dyn Fn(&str) + Send + Sync>;

fn logger() -> (Arc<Mutex<Vec<String>>>, Log) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    (
        lines,
        Box::new(move |s: &str| {
            eprintln!("{s}");
            l2.lock().unwrap().push(s.to_owned());
        }),
    )
}

/// A veth pair, both ends up.
fn veth(nl: &mut Netlink, a: &str, b: &str) {
    nl.create_veth(a, b).unwrap();
    for n in [a, b] {
        let l = nl.link(n).unwrap();
        nl.set_up(l.index, true).unwrap();
    }
}

fn addresses_of(nl: &mut Netlink, name: &str) -> Vec<String> {
    let idx = nl.link(name).unwrap().index;
    nl.addrs()
        .unwrap()
        .into_iter()
        .filter(|a| a.index == idx && !a.local_scope)
        .map(|a| a.cidr.to_string())
        .collect()
}

fn read_status(path: &Path) -> NetworkStatus {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// What the test DHCP server saw: message type and `ciaddr`.
type Seen = Vec<(MessageType, Ipv4Addr)>;

/// Moves `dev` into a namespace of its own, gives it `offer.server`/24 there and runs a
/// DHCP server on it until `stop` (or 60 s). With `nak_first`, the first REQUEST is refused.
fn serve(
    nl: &mut Netlink,
    dev: &str,
    offer: testserver::Offer,
    nak_first: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Seen> {
    let (tx, rx) = std::sync::mpsc::channel::<std::fs::File>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let dev = dev.to_owned();
    let dev2 = dev.clone();
    let t = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        tx.send(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
            .unwrap();
        ready_rx.recv().unwrap();
        let mut nl = Netlink::open().unwrap();
        let link = nl.link(&dev2).unwrap();
        nl.add_addr(
            link.index,
            hvnode_api::config::Cidr {
                addr: IpAddr::V4(offer.server),
                prefix: 24,
            },
        )
        .unwrap();
        nl.set_up(link.index, true).unwrap();
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67)).unwrap();
        // SAFETY: the name buffer is valid for its length during the call.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                dev2.as_ptr().cast(),
                dev2.len() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_BINDTODEVICE");
        sock.set_broadcast(true).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut seen = Vec::new();
        let mut nak_pending = nak_first;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Some((req, kind)) = request_kind(&buf[..n]) else {
                continue;
            };
            seen.push((kind, req.ciaddr()));
            let answer = match kind {
                MessageType::Discover => MessageType::Offer,
                MessageType::Request if nak_pending => {
                    nak_pending = false;
                    MessageType::Nak
                }
                MessageType::Request => MessageType::Ack,
                _ => continue,
            };
            let bytes = testserver::reply(&req, answer, &offer);
            sock.send_to(&bytes, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68))
                .unwrap();
        }
        seen
    });
    let ns = rx.recv().unwrap();
    let link = nl.link(&dev).unwrap();
    nl.move_to_netns(link.index, ns.as_raw_fd()).unwrap();
    ready_tx.send(()).unwrap();
    t
}

fn test_offer(lease_secs: u32) -> testserver::Offer {
    testserver::Offer {
        server: Ipv4Addr::new(10, 99, 0, 1),
        address: Ipv4Addr::new(10, 99, 0, 50),
        router: Ipv4Addr::new(10, 99, 0, 254),
        dns: Ipv4Addr::new(10, 99, 0, 53),
        lease_secs,
    }
}

#[test]
fn dhcp_over_veth_configures_bridge_address_route_and_resolv_conf() {
    in_netns("dhcp_over_veth", || {
        let mut nl = Netlink::open().unwrap();
        veth(&mut nl, "nic0", "srv0");
        let stop = Arc::new(AtomicBool::new(false));
        let server = serve(&mut nl, "srv0", test_offer(3600), false, stop.clone());

        let dirs = Dirs::new("dhcp", &["nic0"]);
        let roots = dirs.roots();
        let (lines, log) = logger();
        let config = NodeConfig {
            hostname: Some("node-t".into()),
            ..Default::default()
        };
        let net = Network::start_with(&config, None, log, roots.clone()).unwrap();
        assert!(
            net.wait_configured(Duration::from_secs(30)),
            "no address in time"
        );

        let nic = nl.link("nic0").unwrap();
        let br = nl.link("br0").unwrap();
        assert_eq!(nic.master, Some(br.index), "nic0 enslaved to br0");
        assert_eq!(br.mac, nic.mac, "bridge carries the NIC's MAC");
        assert_eq!(addresses_of(&mut nl, "br0"), vec!["10.99.0.50/24"]);
        let routes = nl.default_routes().unwrap();
        assert!(routes
            .iter()
            .any(|r| r.gateway == IpAddr::V4(Ipv4Addr::new(10, 99, 0, 254))
                && r.oif == Some(br.index)));

        let status = net.status();
        let br0 = status.interfaces.iter().find(|i| i.name == "br0").unwrap();
        assert_eq!(br0.source, AddressSource::Dhcp);
        assert_eq!(br0.addresses, vec!["10.99.0.50/24"]);
        let nic0 = status.interfaces.iter().find(|i| i.name == "nic0").unwrap();
        assert!(nic0.addresses.is_empty());
        assert_eq!(status.hostname, "node-t");
        assert_eq!(read_status(&roots.state_file()), status);
        let resolv = std::fs::read_to_string(roots.resolv_conf()).unwrap();
        assert!(resolv.contains("nameserver 10.99.0.53"), "{resolv}");
        assert!(resolv.contains("search lab.example"), "{resolv}");
        assert!(lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("network: br0 10.99.0.50/24 via dhcp (lease 3600 s")));
        assert_eq!(net.macs(), vec![("nic0".to_owned(), nic.mac.unwrap())]);

        net.stop();
        assert!(
            addresses_of(&mut nl, "br0").is_empty(),
            "lease address removed on stop"
        );
        stop.store(true, Ordering::SeqCst);
        let seen = server.join().unwrap();
        assert_eq!(seen.first().map(|s| s.0), Some(MessageType::Discover));
        assert!(seen.iter().any(|s| s.0 == MessageType::Request));
        assert_eq!(seen.last().map(|s| s.0), Some(MessageType::Release));
    });
}

#[test]
fn dhcp_nak_restarts_discovery_and_short_lease_is_renewed_by_unicast() {
    in_netns("dhcp_nak_and_renew", || {
        let mut nl = Netlink::open().unwrap();
        veth(&mut nl, "nic0", "srv0");
        let stop = Arc::new(AtomicBool::new(false));
        let server = serve(&mut nl, "srv0", test_offer(4), true, stop.clone());
        let dirs = Dirs::new("renew", &["nic0"]);
        let (_lines, log) = logger();
        let config = NodeConfig {
            hostname: None,
            network: NetworkConfig {
                bridge: String::new(),
                ..Default::default()
            },
        };
        let net = Network::start_with(&config, None, log, dirs.roots()).unwrap();
        assert!(
            net.wait_configured(Duration::from_secs(30)),
            "no address in time"
        );
        let got = Instant::now();
        // Past the 4 s lease: only renewals keep the address.
        std::thread::sleep(Duration::from_secs(7));
        assert_eq!(addresses_of(&mut nl, "nic0"), vec!["10.99.0.50/24"]);
        assert!(got.elapsed() > Duration::from_secs(4));
        net.stop();
        stop.store(true, Ordering::SeqCst);
        let seen = server.join().unwrap();
        let kinds: Vec<MessageType> = seen.iter().map(|s| s.0).collect();
        assert_eq!(
            &kinds[..4],
            &[
                MessageType::Discover,
                MessageType::Request,
                MessageType::Discover,
                MessageType::Request
            ],
            "NAK sends the client back to DISCOVER"
        );
        let leased = Ipv4Addr::new(10, 99, 0, 50);
        assert!(
            seen.iter()
                .any(|s| s.0 == MessageType::Request && s.1 == leased),
            "a renewal REQUEST carries ciaddr: {seen:?}"
        );
    });
}

#[test]
fn static_config_applies_addresses_gateway_and_live_reapply_replaces_them() {
    in_netns("static_config", || {
        let mut nl = Netlink::open().unwrap();
        veth(&mut nl, "nic0", "peer0");
        let dirs = Dirs::new("static", &["nic0"]);
        let roots = dirs.roots();
        let (_lines, log) = logger();
        let network = NetworkConfig {
            bridge: String::new(),
            dns: vec!["192.0.2.53".parse().unwrap()],
            search: vec!["example.net".into()],
            interfaces: vec![InterfaceConfig {
                name: "nic0".into(),
                mode: AddressMode::Static,
                addresses: vec!["192.0.2.10/24".into(), "2001:db8::10/64".into()],
                gateway4: Some("192.0.2.1".parse().unwrap()),
                mtu: Some(1400),
                ..Default::default()
            }],
            ..Default::default()
        };
        let config = NodeConfig {
            hostname: None,
            network,
        };
        let net = Network::start_with(&config, None, log, roots.clone()).unwrap();
        assert!(net.wait_configured(Duration::from_secs(5)));
        let addrs = addresses_of(&mut nl, "nic0");
        assert!(addrs.contains(&"192.0.2.10/24".to_owned()), "{addrs:?}");
        assert!(addrs.contains(&"2001:db8::10/64".to_owned()), "{addrs:?}");
        let nic = nl.link("nic0").unwrap();
        assert!(nl.default_routes().unwrap().iter().any(|r| r.gateway
            == "192.0.2.1".parse::<IpAddr>().unwrap()
            && r.oif == Some(nic.index)));
        let status = net.status();
        let s = status.interfaces.iter().find(|i| i.name == "nic0").unwrap();
        assert_eq!(s.source, AddressSource::Static);
        assert!(status.hostname.starts_with("hvnode-"));
        assert_eq!(status.dns, vec!["192.0.2.53"]);
        let resolv = std::fs::read_to_string(roots.resolv_conf()).unwrap();
        assert!(
            resolv.contains("search example.net\nnameserver 192.0.2.53\n"),
            "{resolv}"
        );

        let mut changed = config.network.clone();
        changed.interfaces[0].addresses = vec!["198.51.100.7/24".into()];
        changed.interfaces[0].gateway4 = Some("198.51.100.1".parse().unwrap());
        net.apply(&changed).unwrap();
        assert_eq!(addresses_of(&mut nl, "nic0"), vec!["198.51.100.7/24"]);
        let gws: Vec<IpAddr> = nl
            .default_routes()
            .unwrap()
            .iter()
            .map(|r| r.gateway)
            .collect();
        assert_eq!(gws, vec!["198.51.100.1".parse::<IpAddr>().unwrap()]);

        let mut bad = changed.clone();
        bad.interfaces[0].addresses = vec!["nonsense".into()];
        assert!(matches!(net.apply(&bad), Err(crate::Error::Config(_))));
        net.stop();
    });
}

#[test]
fn bridge_enslaves_configured_management_nic_with_its_mac() {
    in_netns("bridge", || {
        let mut nl = Netlink::open().unwrap();
        veth(&mut nl, "nic0", "peer0");
        veth(&mut nl, "nic1", "peer1");
        let dirs = Dirs::new("bridge", &["nic0", "nic1"]);
        let (_lines, log) = logger();
        let config = NodeConfig {
            hostname: None,
            network: NetworkConfig {
                bridge: "mgmt0".into(),
                management: Some("nic1".into()),
                interfaces: vec![InterfaceConfig {
                    name: "nic1".into(),
                    mode: AddressMode::Static,
                    addresses: vec!["203.0.113.5/24".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        };
        let net = Network::start_with(&config, Some("off"), log, dirs.roots()).unwrap();
        let bridge = nl.link("mgmt0").unwrap();
        let nic1 = nl.link("nic1").unwrap();
        let nic0 = nl.link("nic0").unwrap();
        assert_eq!(nic1.master, Some(bridge.index));
        assert_eq!(nic0.master, None);
        assert_eq!(bridge.mac, nic1.mac);
        assert!(bridge.up);
        assert_eq!(addresses_of(&mut nl, "mgmt0"), vec!["203.0.113.5/24"]);
        assert!(addresses_of(&mut nl, "nic1").is_empty());
        let fd = std::fs::read_to_string("/sys/class/net/mgmt0/bridge/forward_delay");
        // sysfs shows the namespace that mounted it, so only check when it is ours.
        if let Ok(fd) = fd {
            assert_eq!(fd.trim(), "0");
        }

        // Turning the bridge off frees the NIC and moves the settings to it.
        let mut no_bridge = config.network.clone();
        no_bridge.bridge = String::new();
        net.apply(&no_bridge).unwrap();
        assert!(nl.link("mgmt0").is_err(), "bridge removed");
        assert_eq!(nl.link("nic1").unwrap().master, None);
        assert_eq!(addresses_of(&mut nl, "nic1"), vec!["203.0.113.5/24"]);
        net.stop();
    });
}

#[test]
fn vlan_and_bond_devices_are_created_when_the_kernel_has_them() {
    in_netns("vlan_and_bond", || {
        let mut nl = Netlink::open().unwrap();
        veth(&mut nl, "nic0", "peer0");
        veth(&mut nl, "nic1", "peer1");
        veth(&mut nl, "nic2", "peer2");
        let peer0 = nl.link("peer0").unwrap().index;
        let vlan_ok = match nl.create_vlan("probe.9", peer0, 9) {
            Ok(()) => {
                let p = nl.link("probe.9").unwrap();
                nl.delete_link(p.index).unwrap();
                true
            }
            Err(e) if unsupported(&e) => false,
            Err(e) => panic!("{e}"),
        };
        let bond_ok = match nl.create_bond("probe0", "active-backup".parse().unwrap()) {
            Ok(()) => {
                let p = nl.link("probe0").unwrap();
                nl.delete_link(p.index).unwrap();
                true
            }
            Err(e) if unsupported(&e) => false,
            Err(e) => panic!("{e}"),
        };
        if !vlan_ok && !bond_ok {
            // Not a missing setup step but the host kernel itself (a CI machine's may be built
            // without them): the node's kernel has both, and the boot tests run on it.
            eprintln!("skipping vlan_and_bond: this kernel has neither 802.1q nor bonding");
            return;
        }
        let dirs = Dirs::new("vlan", &["nic0", "nic1", "nic2"]);
        let (_lines, log) = logger();
        let mut network = NetworkConfig {
            bridge: String::new(),
            ..Default::default()
        };
        if vlan_ok {
            network.interfaces.push(InterfaceConfig {
                name: "nic0".into(),
                vlan: Some(42),
                mode: AddressMode::Static,
                addresses: vec!["192.0.2.42/24".into()],
                ..Default::default()
            });
        } else {
            eprintln!("skipping the VLAN part: no 802.1q in this kernel");
        }
        if bond_ok {
            network.bonds.push(hvnode_api::config::BondConfig {
                name: "bond0".into(),
                mode: "active-backup".into(),
                members: vec!["nic1".into(), "nic2".into()],
            });
            network.interfaces.push(InterfaceConfig {
                name: "bond0".into(),
                mode: AddressMode::Manual,
                ..Default::default()
            });
        } else {
            eprintln!("skipping the bond part: no bonding in this kernel");
        }
        let config = NodeConfig {
            hostname: None,
            network,
        };
        let net = Network::start_with(&config, Some("off"), log, dirs.roots()).unwrap();
        if vlan_ok {
            assert_eq!(addresses_of(&mut nl, "nic0.42"), vec!["192.0.2.42/24"]);
        }
        if bond_ok {
            let bond = nl.link("bond0").unwrap();
            assert_eq!(nl.link("nic1").unwrap().master, Some(bond.index));
            assert_eq!(nl.link("nic2").unwrap().master, Some(bond.index));
        }
        net.apply(&NetworkConfig {
            bridge: String::new(),
            ..Default::default()
        })
        .unwrap();
        assert!(nl.link("nic0.42").is_err());
        assert!(nl.link("bond0").is_err());
        net.stop();
    });
}
