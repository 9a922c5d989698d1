//! The live side: applying plans through netlink, DHCP events, the link monitor, and
//! publishing state files.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hvnode_api::config::{Cidr, NetworkConfig, NodeConfig};
use hvnode_api::node::NetworkStatus;

use crate::dhcp::{self, msg::Lease, Stop};
use crate::iparg::{self, IpArg};
use crate::netlink::{Link, Monitor, Netlink, RouteOrigin};
use crate::plan::{self, Addressing, DevicePlan, Nic, Plan};
use crate::{resolv, status, Error, Roots};

/// How long to wait for NICs to report carrier after bringing them up.
const CARRIER_WAIT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State read by status, DHCP events and resolv.conf.
#[derive(Debug, Default)]
struct State {
    hostname: String,
    ip: Option<IpArg>,
    plan: Plan,
    nics: Vec<String>,
    leases: BTreeMap<String, Lease>,
    last_json: String,
    last_resolv: String,
    last_status: NetworkStatus,
    configured: bool,
}

/// What the applied plan owns.
#[derive(Debug, Default)]
struct Applied {
    plan: Plan,
    dhcp: BTreeMap<String, dhcp::Handle>,
    monitor: Option<JoinHandle<()>>,
    stopped: bool,
}

/// Shared between the handle, the DHCP threads and the monitor thread.
pub(crate) struct Shared {
    pub(crate) roots: Roots,
    log: Box<dyn Fn(&str) + Send + Sync>,
    state: Mutex<State>,
    changed: Condvar,
    applied: Mutex<Applied>,
    monitor_stop: Arc<Stop>,
}

fn default_hostname(nics: &[Nic]) -> String {
    let mut sorted: Vec<&Nic> = nics.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    match sorted.first() {
        Some(n) => format!("hvnode-{:02x}{:02x}{:02x}", n.mac[3], n.mac[4], n.mac[5]),
        None => "hvnode".to_owned(),
    }
}

impl Shared {
    pub(crate) fn start(
        config: &NodeConfig,
        ip_arg: Option<&str>,
        log: Box<dyn Fn(&str) + Send + Sync>,
        roots: Roots,
    ) -> Result<Arc<Shared>, Error> {
        let mut nl = Netlink::open()?;
        let shared = Arc::new(Shared {
            roots,
            log,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            applied: Mutex::new(Applied::default()),
            monitor_stop: Arc::new(Stop::default()),
        });
        let ip = match ip_arg.map(iparg::parse) {
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                shared.log(&format!("{e}; ignoring the ip= argument"));
                None
            }
            None => None,
        };

        shared.loopback(&mut nl);
        let nics = shared.bring_up_nics(&mut nl);

        let hostname = config
            .hostname
            .clone()
            .or_else(|| ip.as_ref().and_then(|a| a.hostname().map(str::to_owned)))
            .unwrap_or_else(|| default_hostname(&nics));
        {
            let mut st = lock(&shared.state);
            st.hostname = hostname;
            st.ip = ip.clone();
            st.nics = nics.iter().map(|n| n.name.clone()).collect();
        }

        let plan = match plan::compute(&config.network, ip.as_ref(), &nics) {
            Ok(p) => p,
            Err(e) => {
                shared.log(&format!(
                    "{}; falling back to DHCP on every NIC with carrier",
                    chain(&e)
                ));
                plan::compute(&NetworkConfig::default(), ip.as_ref(), &nics)?
            }
        };
        {
            let mut applied = lock(&shared.applied);
            shared.reconcile(&mut nl, &mut applied, plan);
            let s2 = shared.clone();
            let monitor = std::thread::Builder::new()
                .name("net-monitor".into())
                .spawn(move || s2.monitor())
                .map_err(Error::Thread)?;
            applied.monitor = Some(monitor);
        }
        shared.publish();
        Ok(shared)
    }

    pub(crate) fn log(&self, line: &str) {
        (self.log)(&format!("network: {line}"));
    }

    fn loopback(&self, nl: &mut Netlink) {
        let lo = match nl.link("lo") {
            Ok(l) => l,
            Err(e) => {
                self.log(&format!("lo: {}", chain(&e)));
                return;
            }
        };
        if let Err(e) = nl.set_up(lo.index, true) {
            self.log(&format!("lo: {}", chain(&e)));
        }
        for a in ["127.0.0.1/8", "::1/128"] {
            if let Ok(cidr) = a.parse::<Cidr>() {
                if let Err(e) = nl.add_addr(lo.index, cidr) {
                    // No IPv6 in the kernel is not worth more than a log line.
                    self.log(&format!("lo: {}", chain(&e)));
                }
            }
        }
    }

    /// Physical NIC names from sysfs (those with a `device` link), sorted.
    fn nic_names(&self) -> Vec<String> {
        let dir = self.roots.sys.join("class/net");
        let mut names: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .filter(|e| e.path().join("device").symlink_metadata().is_ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(e) => {
                self.log(&format!("Cannot list {}: {e}", dir.display()));
                Vec::new()
            }
        };
        names.sort();
        names
    }

    fn nics(&self, nl: &mut Netlink) -> Vec<Nic> {
        let names = self.nic_names();
        let links = nl.links().unwrap_or_default();
        names
            .into_iter()
            .filter_map(|n| {
                let l = links.iter().find(|l| l.name == n)?;
                Some(Nic {
                    name: n,
                    mac: l.mac.unwrap_or_default(),
                    carrier: l.carrier,
                })
            })
            .collect()
    }

    /// Sets every NIC up and waits (up to [`CARRIER_WAIT`]) until all report carrier.
    fn bring_up_nics(&self, nl: &mut Netlink) -> Vec<Nic> {
        for n in self.nics(nl) {
            if let Ok(l) = nl.link(&n.name) {
                if let Err(e) = nl.set_up(l.index, true) {
                    self.log(&format!("{}: {}", n.name, chain(&e)));
                }
            }
        }
        let deadline = Instant::now() + CARRIER_WAIT;
        loop {
            let nics = self.nics(nl);
            if nics.iter().all(|n| n.carrier) || Instant::now() >= deadline {
                for n in nics.iter().filter(|n| !n.carrier) {
                    self.log(&format!("{}: no carrier", n.name));
                }
                return nics;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn apply(self: &Arc<Self>, network: &NetworkConfig) -> Result<(), Error> {
        network.validate()?;
        let mut nl = Netlink::open()?;
        let ip = lock(&self.state).ip.clone();
        let nics = self.nics(&mut nl);
        let plan = plan::compute(network, ip.as_ref(), &nics)?;
        {
            let mut applied = lock(&self.applied);
            if applied.stopped {
                return Ok(());
            }
            self.reconcile(&mut nl, &mut applied, plan);
        }
        self.publish();
        Ok(())
    }

    /// Moves from the applied plan to `new`, keeping what is unchanged.
    fn reconcile(self: &Arc<Self>, nl: &mut Netlink, applied: &mut Applied, new: Plan) {
        let old = std::mem::take(&mut applied.plan);

        // Links of the old plan that survive: same spec, and their parent survives too.
        let bonds_kept: Vec<String> = old
            .bonds
            .iter()
            .filter(|b| new.bonds.contains(b))
            .map(|b| b.name.clone())
            .collect();
        let old_bond = |n: &str| old.bonds.iter().any(|b| b.name == n);
        let bridge_kept = match (&old.bridge, &new.bridge) {
            (Some(o), Some(n)) => o == n && (!old_bond(&o.port) || bonds_kept.contains(&o.port)),
            _ => false,
        };
        let parent_kept = |p: &str| -> bool {
            if old.bridge.as_ref().is_some_and(|b| b.name == p) {
                bridge_kept
            } else if old_bond(p) {
                bonds_kept.iter().any(|b| b == p)
            } else {
                true
            }
        };
        let vlans_kept: Vec<String> = old
            .vlans
            .iter()
            .filter(|v| new.vlans.contains(v) && parent_kept(&v.parent))
            .map(|v| v.name.clone())
            .collect();
        let link_removed = |n: &str| -> bool {
            (old.bridge.as_ref().is_some_and(|b| b.name == n) && !bridge_kept)
                || (old_bond(n) && !bonds_kept.iter().any(|b| b == n))
                || (old.vlans.iter().any(|v| v.name == n) && !vlans_kept.iter().any(|v| v == n))
        };
        let unchanged =
            |d: &DevicePlan| -> bool { new.device(&d.name) == Some(d) && !link_removed(&d.name) };

        // Tear down the settings of devices that change.
        for d in old.devices.iter().filter(|d| !unchanged(d)) {
            match &d.addressing {
                Addressing::Dhcp => {
                    if let Some(h) = applied.dhcp.remove(&d.name) {
                        h.stop(true);
                    }
                }
                Addressing::Static {
                    addresses,
                    gateway4,
                    gateway6,
                } => {
                    if let Ok(l) = nl.link(&d.name) {
                        for g in gateway4.iter().chain(gateway6.iter()) {
                            let _ = nl.del_default_route(l.index, *g, RouteOrigin::Static);
                        }
                        for a in addresses {
                            let _ = nl.del_addr(l.index, *a);
                        }
                    }
                }
                Addressing::Manual => {}
            }
        }

        // Remove links that do not survive: VLANs, then the bridge, then bonds.
        let removed: Vec<String> = old
            .vlans
            .iter()
            .map(|v| v.name.clone())
            .filter(|n| !vlans_kept.contains(n))
            .chain(
                old.bridge
                    .iter()
                    .filter(|_| !bridge_kept)
                    .map(|b| b.name.clone()),
            )
            .chain(
                old.bonds
                    .iter()
                    .map(|b| b.name.clone())
                    .filter(|n| !bonds_kept.contains(n)),
            )
            .collect();
        for name in &removed {
            if let Ok(l) = nl.link(name) {
                match nl.delete_link(l.index) {
                    Ok(()) => self.log(&format!("{name}: removed")),
                    Err(e) => self.log(&format!("{name}: {}", chain(&e))),
                }
            }
        }

        // Create what is new: bonds, the bridge, VLANs.
        for b in new.bonds.iter().filter(|b| !bonds_kept.contains(&b.name)) {
            if let Err(e) = self.create_bond(nl, b) {
                self.log(&format!("{}: {}", b.name, chain(&e)));
            }
        }
        if let (Some(b), false) = (&new.bridge, bridge_kept) {
            if let Err(e) = self.create_bridge(nl, b) {
                self.log(&format!("{}: {}", b.name, chain(&e)));
            }
        }
        for v in new.vlans.iter().filter(|v| !vlans_kept.contains(&v.name)) {
            let r = nl
                .link(&v.parent)
                .and_then(|p| nl.create_vlan(&v.name, p.index, v.id))
                .or_else(|e| if e.is_exists() { Ok(()) } else { Err(e) });
            match r {
                Ok(()) => self.log(&format!("{}: VLAN {} on {}", v.name, v.id, v.parent)),
                Err(e) => self.log(&format!("{}: {}", v.name, chain(&e))),
            }
        }

        // Apply device settings that changed.
        for d in &new.devices {
            let same = old.devices.iter().any(|o| o == d) && !link_removed(&d.name);
            if same && (d.addressing != Addressing::Dhcp || applied.dhcp.contains_key(&d.name)) {
                continue;
            }
            if let Err(e) = self.configure_device(nl, applied, d) {
                self.log(&format!("{}: {}", d.name, chain(&e)));
            }
        }

        {
            let mut st = lock(&self.state);
            st.plan = new.clone();
            let planned: Vec<String> = new.devices.iter().map(|d| d.name.clone()).collect();
            st.leases.retain(|k, _| planned.contains(k));
        }
        applied.plan = new;
    }

    fn create_bond(
        &self,
        nl: &mut Netlink,
        b: &plan::BondPlan,
    ) -> Result<(), crate::netlink::Error> {
        match nl.create_bond(&b.name, b.mode) {
            Err(e) if !e.is_exists() => return Err(e),
            _ => {}
        }
        let bond = nl.link(&b.name)?;
        for m in &b.members {
            let r = nl.link(m).and_then(|l| {
                if l.master == Some(bond.index) {
                    return Ok(());
                }
                nl.set_up(l.index, false)?;
                nl.set_master(l.index, Some(bond.index))?;
                nl.set_up(l.index, true)
            });
            if let Err(e) = r {
                self.log(&format!("{}: cannot join {}: {}", m, b.name, chain(&e)));
            }
        }
        nl.set_up(bond.index, true)?;
        self.log(&format!(
            "{}: bond ({:?}) of {}",
            b.name,
            b.mode,
            b.members.join(", ")
        ));
        Ok(())
    }

    fn create_bridge(
        &self,
        nl: &mut Netlink,
        b: &plan::BridgePlan,
    ) -> Result<(), crate::netlink::Error> {
        let port = nl.link(&b.port)?;
        match nl.create_bridge(&b.name, port.mac) {
            Err(e) if !e.is_exists() => return Err(e),
            _ => {}
        }
        let bridge = nl.link(&b.name)?;
        nl.set_master(port.index, Some(bridge.index))?;
        nl.set_up(port.index, true)?;
        nl.set_up(bridge.index, true)?;
        self.log(&format!("{}: bridge on {}", b.name, b.port));
        Ok(())
    }

    fn configure_device(
        self: &Arc<Self>,
        nl: &mut Netlink,
        applied: &mut Applied,
        d: &DevicePlan,
    ) -> Result<(), crate::netlink::Error> {
        let link = nl.link(&d.name)?;
        if let Some(mtu) = d.mtu {
            nl.set_mtu(link.index, mtu)?;
        }
        nl.set_up(link.index, true)?;
        match &d.addressing {
            Addressing::Manual => {}
            Addressing::Static {
                addresses,
                gateway4,
                gateway6,
            } => {
                for a in addresses {
                    match nl.add_addr(link.index, *a) {
                        Ok(()) => self.log(&format!("{} {a} static", d.name)),
                        Err(e) => self.log(&format!("{}: {}", d.name, chain(&e))),
                    }
                }
                for g in gateway4.iter().chain(gateway6.iter()) {
                    if let Err(e) = nl.add_default_route(link.index, *g, RouteOrigin::Static) {
                        self.log(&format!("{}: {}", d.name, chain(&e)));
                    }
                }
            }
            Addressing::Dhcp => {
                if let Some(h) = applied.dhcp.remove(&d.name) {
                    h.stop(false);
                }
                let mac = link.mac.unwrap_or_default();
                let events: Arc<dyn dhcp::Events> = self.clone();
                match dhcp::spawn(d.name.clone(), link.index, mac, events) {
                    Ok(h) => {
                        applied.dhcp.insert(d.name.clone(), h);
                    }
                    Err(e) => self.log(&format!("{}: cannot start DHCP: {e}", d.name)),
                }
            }
        }
        Ok(())
    }

    /// Watches link/address/route changes and republishes.
    fn monitor(self: Arc<Self>) {
        let mon = match Monitor::open() {
            Ok(m) => m,
            Err(e) => {
                self.log(&format!("Cannot watch link changes: {}", chain(&e)));
                return;
            }
        };
        while !self.monitor_stop.is_set() {
            match mon.wait(Duration::from_millis(500)) {
                Ok(true) => {
                    // Let a burst of changes settle before writing once.
                    std::thread::sleep(Duration::from_millis(50));
                    let _ = mon.wait(Duration::ZERO);
                    self.publish();
                }
                Ok(false) => {}
                Err(e) => {
                    self.log(&format!("Watching link changes: {}", chain(&e)));
                    if self
                        .monitor_stop
                        .sleep_until(Instant::now() + Duration::from_secs(1))
                    {
                        return;
                    }
                }
            }
        }
    }

    /// DNS servers and search domains for resolv.conf: static ones win over DHCP's.
    fn resolver(st: &State) -> (Vec<IpAddr>, Vec<String>) {
        let mut search = st.plan.search.clone();
        let mut dns = st.plan.dns.clone();
        // The management device's lease first.
        let first = st.plan.bridge.as_ref().map(|b| b.name.clone());
        let mut leases: Vec<&Lease> = Vec::new();
        if let Some(l) = first.as_ref().and_then(|f| st.leases.get(f)) {
            leases.push(l);
        }
        leases.extend(
            st.leases
                .iter()
                .filter(|(k, _)| Some(*k) != first.as_ref())
                .map(|(_, l)| l),
        );
        for l in leases {
            if st.plan.dns.is_empty() {
                dns.extend(l.dns.iter().map(|d| IpAddr::V4(*d)));
            }
            search.extend(l.search.iter().cloned());
        }
        (dns, search)
    }

    /// Recomputes the status, writes the state file and resolv.conf when they changed,
    /// and wakes `wait_configured`.
    pub(crate) fn publish(&self) -> NetworkStatus {
        let (links, addrs, routes) = match Netlink::open()
            .and_then(|mut nl| Ok((nl.links()?, nl.addrs()?, nl.default_routes()?)))
        {
            Ok(x) => x,
            Err(e) => {
                self.log(&format!("Cannot read network state: {}", chain(&e)));
                return lock(&self.state).last_status.clone();
            }
        };
        let mut st = lock(&self.state);
        let (dns, search) = Self::resolver(&st);
        let leased: Vec<String> = st.leases.keys().cloned().collect();
        let status = status::build(&status::Inputs {
            hostname: &st.hostname,
            nics: &st.nics,
            plan: &st.plan,
            leased: &leased,
            links: &links,
            addrs: &addrs,
            routes: &routes,
            dns: &dns,
        });
        for n in &status.interfaces {
            let before = st.last_status.interfaces.iter().find(|o| o.name == n.name);
            if let Some(b) = before {
                if b.carrier != n.carrier {
                    let word = if n.carrier { "up" } else { "down" };
                    self.log(&format!("{}: carrier {word}", n.name));
                }
            }
        }
        let text = resolv::render(&dns, &search);
        if text != st.last_resolv {
            match resolv::write_atomic(&self.roots.resolv_conf(), text.as_bytes()) {
                Ok(()) => st.last_resolv = text,
                Err(e) => self.log(&format!(
                    "Cannot write {}: {e}",
                    self.roots.resolv_conf().display()
                )),
            }
        }
        let json = serde_json::to_string_pretty(&status).unwrap_or_default();
        if json != st.last_json {
            match resolv::write_atomic(&self.roots.state_file(), json.as_bytes()) {
                Ok(()) => st.last_json = json,
                Err(e) => self.log(&format!(
                    "Cannot write {}: {e}",
                    self.roots.state_file().display()
                )),
            }
        }
        st.configured = status.interfaces.iter().any(|i| !i.addresses.is_empty());
        st.last_status = status.clone();
        drop(st);
        self.changed.notify_all();
        status
    }

    pub(crate) fn set_hostname(&self, hostname: &str) {
        lock(&self.state).hostname = hostname.to_owned();
        self.publish();
    }

    pub(crate) fn macs(&self) -> Vec<(String, [u8; 6])> {
        let Ok(mut nl) = Netlink::open() else {
            return Vec::new();
        };
        self.nics(&mut nl)
            .into_iter()
            .map(|n| (n.name, n.mac))
            .collect()
    }

    pub(crate) fn wait_configured(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if st.configured {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    fn stop_all(&self, release: bool) {
        self.monitor_stop.set();
        let (handles, monitor) = {
            let mut applied = lock(&self.applied);
            applied.stopped = true;
            (std::mem::take(&mut applied.dhcp), applied.monitor.take())
        };
        for (_, h) in handles {
            h.stop(release);
        }
        if let Some(m) = monitor {
            let _ = m.join();
        }
    }

    pub(crate) fn stop(&self) {
        self.stop_all(true);
        self.publish();
    }

    pub(crate) fn stop_threads_quietly(&self) {
        self.stop_all(false);
    }
}

impl dhcp::Events for Shared {
    fn hostname(&self) -> String {
        lock(&self.state).hostname.clone()
    }

    fn bound(&self, device: &str, lease: &Lease, previous: Option<&Lease>) {
        let cidr = Cidr {
            addr: IpAddr::V4(lease.address),
            prefix: lease.prefix,
        };
        let r = Netlink::open().and_then(|mut nl| {
            let link: Link = nl.link(device)?;
            if let Some(p) = previous {
                if p.address != lease.address || p.prefix != lease.prefix {
                    remove_lease(&mut nl, link.index, p);
                }
                if p.routers.first() != lease.routers.first() {
                    if let Some(g) = p.routers.first() {
                        nl.del_default_route(link.index, IpAddr::V4(*g), RouteOrigin::Dhcp)?;
                    }
                }
            }
            nl.add_addr(link.index, cidr)?;
            if let Some(g) = lease.routers.first() {
                nl.add_default_route(link.index, IpAddr::V4(*g), RouteOrigin::Dhcp)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            self.log(&format!("{device}: applying DHCP lease: {}", chain(&e)));
        }
        let renewal =
            previous.is_some_and(|p| p.address == lease.address && p.prefix == lease.prefix);
        if !renewal {
            let via = lease
                .routers
                .first()
                .map(|g| format!(", gateway {g}"))
                .unwrap_or_default();
            let secs = if lease.lease_secs == dhcp::msg::INFINITE {
                "infinite lease".to_owned()
            } else {
                format!("lease {} s", lease.lease_secs)
            };
            self.log(&format!("{device} {cidr} via dhcp ({secs}{via})"));
        }
        lock(&self.state)
            .leases
            .insert(device.to_owned(), lease.clone());
        self.publish();
    }

    fn lost(&self, device: &str, lease: &Lease) {
        if let Ok(mut nl) = Netlink::open() {
            if let Ok(link) = nl.link(device) {
                remove_lease(&mut nl, link.index, lease);
            }
        }
        lock(&self.state).leases.remove(device);
        self.publish();
    }

    fn log(&self, line: &str) {
        Shared::log(self, line);
    }
}

fn remove_lease(nl: &mut Netlink, index: u32, lease: &Lease) {
    if let Some(g) = lease.routers.first() {
        let _ = nl.del_default_route(index, IpAddr::V4(*g), RouteOrigin::Dhcp);
    }
    let _ = nl.del_addr(
        index,
        Cidr {
            addr: IpAddr::V4(lease.address),
            prefix: lease.prefix,
        },
    );
}

/// An error and its sources on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
