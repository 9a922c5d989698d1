//! `GET /metrics`: the node's load, its guests by state, and each running guest's VMM counters,
//! in Prometheus' text format (0.0.4) through `prometheus-client`.
//!
//! The registry is built anew for every scrape: every value is read at that moment (from /proc,
//! the guest table and the VMMs' control sockets), so nothing is kept between scrapes and a
//! guest that stopped simply has no series any more. The VMMs' counters are cumulative in the
//! VMM, which is what makes them Prometheus counters even though the registry is new.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hvnode_api::guest::{GuestState, GuestStatus};
use hvnode_api::node::NodeStats;
use hvnode_api::vmm::VmStats;
use hyper::StatusCode;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::http::{text_response, Resp};
use crate::Agent;

/// How long a scrape waits for all the VMMs together. Below the VMM control timeout, so that
/// one stuck VMM costs the scrape this long at most, and the whole answer stays within ~5 s.
pub const VMM_STATS_WAIT: Duration = Duration::from_secs(4);

/// Every state a guest can be in, so that each has a series, 0 included: a state's series must
/// not vanish when its last guest leaves it.
const STATES: [GuestState; 6] = [
    GuestState::Stopped,
    GuestState::Starting,
    GuestState::Running,
    GuestState::Paused,
    GuestState::ShuttingDown,
    GuestState::Crashed,
];

type GaugeU64 = Gauge<u64, AtomicU64>;
type Labels<const N: usize> = [(&'static str, String); N];

impl Agent {
    /// `GET /metrics`.
    pub(crate) async fn metrics(self: &Arc<Self>) -> Resp {
        // Unreadable definitions leave the guests out, as `guests_total` does: the node's own
        // series are still worth serving.
        let guests = self.guests().unwrap_or_default();
        let node = self.stats_counting(guests.len() as u32);
        let with_vmm = guests
            .iter()
            .filter(|g| g.pid.is_some())
            .map(|g| g.spec.name.clone());
        let vmms = self.vmm_stats(with_vmm).await;
        text_response(
            StatusCode::OK,
            encode(&node, &guests, &vmms),
            prometheus_text::CONTENT_TYPE,
        )
    }

    /// Asks every named guest's VMM for its counters at once, waiting [`VMM_STATS_WAIT`] for
    /// all of them; `None` for a VMM that failed or did not answer in time.
    async fn vmm_stats(
        &self,
        names: impl Iterator<Item = String>,
    ) -> BTreeMap<String, Option<VmStats>> {
        let deadline = tokio::time::Instant::now() + VMM_STATS_WAIT;
        let asks: Vec<_> = names
            .map(|name| {
                let running = Arc::clone(&self.running);
                let n = name.clone();
                (name, tokio::task::spawn_blocking(move || running.stats(&n)))
            })
            .collect();
        let mut out = BTreeMap::new();
        for (name, ask) in asks {
            // A late answer is dropped; its thread ends on its own at the control timeout.
            let stats = match tokio::time::timeout_at(deadline, ask).await {
                Ok(Ok(Ok(stats))) => Some(stats),
                _ => None,
            };
            out.insert(name, stats);
        }
        out
    }
}

/// The text of one scrape. `vmms` holds the guests that have a VMM, with their counters when
/// the VMM answered.
pub fn encode(
    node: &NodeStats,
    guests: &[GuestStatus],
    vmms: &BTreeMap<String, Option<VmStats>>,
) -> String {
    let mut r = Registry::default();

    // Info adds the `_info` suffix: this is `hvnode_build_info{version}`.
    r.register(
        "hvnode_build",
        "Version of the hvnode agent",
        Info::new([("version", hvnode_api::VERSION.to_owned())]),
    );
    let cpu = Gauge::<f64, AtomicU64>::default();
    cpu.set(node.cpu_percent);
    r.register(
        "node_cpu_percent",
        "Node CPU busy percent since the previous /v1/stats or /metrics request",
        cpu,
    );
    for (name, help, value) in [
        (
            "node_memory_used_bytes",
            "Node memory in use (total less available)",
            node.memory_used_bytes,
        ),
        (
            "node_memory_total_bytes",
            "Node memory in total",
            node.memory_total_bytes,
        ),
        ("node_uptime_seconds", "Node uptime", node.uptime_secs),
    ] {
        let g = GaugeU64::default();
        g.set(value);
        r.register(name, help, g);
    }

    let mut counts: BTreeMap<&str, u64> = STATES.iter().map(|s| (s.as_str(), 0)).collect();
    for g in guests {
        *counts.entry(g.state.as_str()).or_default() += 1;
    }
    counts.insert("defined", guests.len() as u64);
    let by_state = Family::<Labels<1>, GaugeU64>::default();
    for (state, n) in counts {
        by_state
            .get_or_create(&[("state", state.to_owned())])
            .set(n);
    }
    r.register(
        "hvnode_guests",
        "Guests by state; state=\"defined\" counts them all",
        by_state,
    );

    let up = Family::<Labels<1>, GaugeU64>::default();
    let stats_up = Family::<Labels<1>, GaugeU64>::default();
    let uptime = Family::<Labels<1>, GaugeU64>::default();
    let memory = Family::<Labels<1>, GaugeU64>::default();
    let rss = Family::<Labels<1>, GaugeU64>::default();
    let exits = Family::<Labels<3>, Counter>::default();
    let device = Family::<Labels<3>, Counter>::default();
    for g in guests.iter().filter(|g| vmms.contains_key(&g.spec.name)) {
        let name = &g.spec.name;
        let guest = [("guest", name.clone())];
        up.get_or_create(&guest).set(1);
        uptime.get_or_create(&guest).set(g.uptime_secs.unwrap_or(0));
        let Some(Some(s)) = vmms.get(name) else {
            stats_up.get_or_create(&guest).set(0);
            continue;
        };
        stats_up.get_or_create(&guest).set(1);
        memory.get_or_create(&guest).set(s.memory_bytes);
        rss.get_or_create(&guest).set(s.rss_bytes);
        for (vcpu, reasons) in s.vcpu_exits.iter().enumerate() {
            for (reason, n) in reasons {
                exits
                    .get_or_create(&[
                        ("guest", name.clone()),
                        ("vcpu", vcpu.to_string()),
                        ("reason", reason.clone()),
                    ])
                    .inc_by(*n);
            }
        }
        for (dev, counters) in &s.devices {
            for (counter, n) in counters {
                device
                    .get_or_create(&[
                        ("guest", name.clone()),
                        ("device", dev.clone()),
                        ("counter", counter.clone()),
                    ])
                    .inc_by(*n);
            }
        }
    }
    r.register("hvnode_guest_up", "1 for each guest with a VMM process", up);
    r.register(
        "hvnode_guest_stats_up",
        "Whether the guest's VMM answered for its counters in this scrape (0: its counters are left out)",
        stats_up,
    );
    r.register(
        "hvnode_guest_uptime_seconds",
        "Seconds since the guest's VMM started",
        uptime,
    );
    r.register("hvnode_guest_memory_bytes", "Guest memory size", memory);
    r.register(
        "hvnode_guest_vmm_rss_bytes",
        "Resident set size of the guest's VMM process",
        rss,
    );
    // Counters get the `_total` suffix from the encoder.
    r.register(
        "hvnode_guest_vcpu_exits",
        "vCPU exits by vCPU and exit reason",
        exits,
    );
    r.register(
        "hvnode_guest_device",
        "Device counters as the VMM names them (requests, tx_bytes, ...), by device",
        device,
    );

    let mut text = String::new();
    prometheus_text::encode(&mut text, &r).expect("writing to a String cannot fail");
    text
}
