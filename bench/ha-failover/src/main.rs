//! HA failover by simulation (docs/ha.md): a cluster of `NODES` nodes runs `GUESTS` HA guests;
//! one node dies at a random phase of its lease renewals; every member reads the state once a
//! tick (each at its own phase) and the leader decides with the real
//! [`hvnode_cluster::failover::Failover`] on a simulated clock. Prints, over many deaths, the
//! time from the death to each of its guests placed elsewhere and started (the next tick of the
//! node that takes it), and the leader's decision cost per tick with the whole state.
//!
//! `cargo run --release -p hvnode-bench-ha-failover`; `HVNODE_BENCH_RUNS` deaths (default 200).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use hvnode_api::guest::GuestSpec;
use hvnode_cluster::failover::Failover;
use hvnode_cluster::fencing::Timings;
use hvnode_cluster::model::{ClusterGuest, NodeRecord, Placement};
use hvnode_cluster::store::{ClusterState, Versioned};

const NODES: usize = 50;
const GUESTS: usize = 2000;

/// A small deterministic generator (xorshift), so runs compare.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn node(i: usize) -> NodeRecord {
    NodeRecord {
        id: format!("node-{i:03}"),
        mem_total_mib: 512 * 1024,
        mem_free_mib: 480 * 1024,
        vcpus_total: 128,
        watchdog: Some("iTCO_wdt".into()),
        ..Default::default()
    }
}

fn state(nodes: Vec<NodeRecord>) -> ClusterState {
    let mut guests = Vec::new();
    let mut placements = Vec::new();
    for g in 0..GUESTS {
        let mut c = ClusterGuest::new(GuestSpec {
            memory_mib: 2048,
            vcpus: 2,
            ..GuestSpec::minimal(&format!("guest-{g:04}"), "vmlinuz")
        });
        c.ha = true;
        c.priority = (g % 3) as i32;
        guests.push(Versioned {
            value: c,
            revision: 1,
        });
        placements.push(Versioned {
            value: Placement {
                format: 1,
                guest: format!("guest-{g:04}"),
                node: format!("node-{:03}", g % NODES),
                placed_at_revision: 1,
                reason: "most free memory".into(),
            },
            revision: 2 + g as i64,
        });
    }
    ClusterState {
        revision: 10_000,
        nodes,
        guests,
        placements,
        domains: Vec::new(),
    }
}

fn main() {
    let t = Timings::DEFAULT;
    let runs: usize = std::env::var("HVNODE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let all: Vec<NodeRecord> = (0..NODES).map(node).collect();
    let before = state(all.clone());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut failover_s = Vec::new();
    let mut decide_ns = Vec::new();
    let step = Duration::from_millis(100);
    for run in 0..runs {
        let dead = run % NODES;
        let lost = state(
            all.iter()
                .enumerate()
                .filter(|(i, _)| *i != dead)
                .map(|(_, n)| n.clone())
                .collect(),
        );
        let start = Instant::now();
        let mut f = Failover::new(t).expect("the default timings hold");
        f.observe(start, &before);
        // The node dies at 0; it last renewed up to one renewal period before; its record goes
        // a TTL after that renewal.
        let renewed = -(rng.unit() * t.renew_every.as_secs_f64());
        let gone = renewed + t.lease_ttl.as_secs_f64();
        let leader_phase = rng.unit() * t.tick.as_secs_f64();
        let taker_phase = rng.unit() * t.tick.as_secs_f64();
        let mut now = 0.0;
        let mut placed = 0usize;
        let want = GUESTS / NODES;
        let mut last = 0.0;
        while placed < want {
            now += step.as_secs_f64();
            // The leader's ticks only.
            let tick = ((now - leader_phase) / t.tick.as_secs_f64()).fract();
            if tick >= step.as_secs_f64() / t.tick.as_secs_f64() {
                continue;
            }
            let st = if now >= gone { &lost } else { &before };
            let at = start + Duration::from_secs_f64(now);
            f.observe(at, st);
            let t0 = Instant::now();
            let d = f.decide(at, st);
            decide_ns.push(t0.elapsed().as_nanos() as f64);
            if !d.restarts.is_empty() {
                placed += d.restarts.len();
                last = now;
            }
            assert!(now < 600.0, "the guests were never placed");
        }
        // The taker starts it at its next tick.
        let started = last + ((taker_phase - last).rem_euclid(t.tick.as_secs_f64()));
        failover_s.push(started);
    }
    failover_s.sort_by(f64::total_cmp);
    decide_ns.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!("HA failover by simulation ({NODES} nodes, {GUESTS} HA guests, one node of {} guests lost, {runs} deaths)", GUESTS / NODES);
    println!(
        "  timings: lease {} s, fence at {} s, watchdog {} s, leader waits {} s; worst case by the timings {} s",
        t.lease_ttl.as_secs(),
        t.fence_after.as_secs(),
        t.watchdog_timeout.as_secs(),
        t.restart_after_loss.as_secs(),
        t.worst_failover().as_secs()
    );
    println!(
        "  node lost -> all its guests placed and started elsewhere: min {:.1} s, median {:.1} s, p99 {:.1} s, max {:.1} s (VMM start not included)",
        failover_s[0],
        pct(&failover_s, 0.5),
        pct(&failover_s, 0.99),
        failover_s[failover_s.len() - 1]
    );
    println!(
        "  leader's decision per tick over the whole state: median {:.0} µs, p99 {:.0} µs",
        pct(&decide_ns, 0.5) / 1000.0,
        pct(&decide_ns, 0.99) / 1000.0
    );
}
