//! Starts a real single-member etcd on loopback (/usr/bin/etcd, Debian's etcd-server, or
//! `$HVNODE_ETCD`), joins 100 simulated nodes (each under its own lease, kept alive), creates
//! 1,000 guests, places each one, and prints `name: min / median / max` lines for:
//! - `decision_us`: the pure placement decision over 100 nodes and the placements so far;
//! - `placement_txn_us`: the placement transaction's round trip (guest unchanged, no placement);
//! - `state_read_ms`: a full state read (nodes, guests, placements, domains at one revision);
//! - `guest_create_us`: a guest create transaction, for scale.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use hvnode_api::guest::GuestSpec;
use hvnode_cluster::keys::Keys;
use hvnode_cluster::local_etcd::{etcd_binary, LocalEtcd};
use hvnode_cluster::membership::Membership;
use hvnode_cluster::model::{ClusterGuest, NodeRecord, NodeState, Placement, Record};
use hvnode_cluster::placement;
use hvnode_cluster::store::Store;

const NODES: usize = 100;
const GUESTS: usize = 1000;
const STATE_READS: usize = 50;

fn summary(name: &str, unit: &str, mut samples: Vec<Duration>, div: f64) {
    samples.sort();
    let f = |d: Duration| d.as_secs_f64() * div;
    println!(
        "{name}: min {:.1} / median {:.1} / max {:.1} {unit} ({} samples)",
        f(samples[0]),
        f(samples[samples.len() / 2]),
        f(samples[samples.len() - 1]),
        samples.len()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(bin) = etcd_binary() else {
        eprintln!("error: no etcd (install Debian's etcd-server, or set HVNODE_ETCD)");
        std::process::exit(1);
    };
    let etcd = LocalEtcd::start(&bin, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("etcd: {e}"));
    let client = etcd.client().await.expect("client");
    let keys = Keys::default();
    let store = Store::new(&client, &keys);

    let mut members = Vec::new();
    for i in 0..NODES {
        let rec = NodeRecord {
            format: NodeRecord::FORMAT,
            id: format!("node-{i:03}"),
            address: format!("10.0.{}.{}:8443", i / 250, i % 250 + 1),
            state: if i % 20 == 19 {
                NodeState::Maintenance
            } else {
                NodeState::Active
            },
            mem_total_mib: 262144,
            mem_free_mib: 262144 - 4096 - (i as u64 % 7) * 1024,
            vcpus_total: 64,
            vcpus_used: (i % 5) as u32,
            agent_version: "0.1.0".into(),
            heartbeat_unix: 0,
            guests_running: Vec::new(),
            domains: Vec::new(),
            ..Default::default()
        };
        members.push(
            Membership::join(&client, &keys, &rec, 30)
                .await
                .expect("join"),
        );
    }
    let mut creates = Vec::new();
    for i in 0..GUESTS {
        let mut g = ClusterGuest::new(GuestSpec {
            vcpus: 1 + (i as u32 * 3) % 4,
            memory_mib: 1024 * (1 + (i as u64 * 7) % 8),
            ..GuestSpec::minimal(&format!("guest-{i:04}"), "vmlinuz")
        });
        g.ha = i % 3 == 0;
        g.priority = (i % 10) as i32;
        let t = Instant::now();
        store.create_guest(&g).await.expect("create guest");
        creates.push(t.elapsed());
    }

    let state = store.state().await.expect("state");
    assert_eq!((state.nodes.len(), state.guests.len()), (NODES, GUESTS));
    let guests: Vec<ClusterGuest> = state.guests.iter().map(|g| g.value.clone()).collect();
    let mut placements: Vec<Placement> = Vec::new();
    let (mut decisions, mut txns, mut no_room) = (Vec::new(), Vec::new(), 0);
    for g in &state.guests {
        let t = Instant::now();
        let chosen = placement::place(&g.value, &state.nodes, &placements, &guests);
        decisions.push(t.elapsed());
        let node = match chosen {
            Ok(n) => n,
            Err(_) => {
                no_room += 1;
                continue;
            }
        };
        let t = Instant::now();
        store
            .place(g.value.name(), &node, g.revision, "most free memory")
            .await
            .expect("placement txn");
        txns.push(t.elapsed());
        placements.push(Placement {
            format: Placement::FORMAT,
            guest: g.value.name().to_owned(),
            node,
            placed_at_revision: g.revision,
            reason: String::new(),
        });
    }
    let mut reads = Vec::new();
    for _ in 0..STATE_READS {
        let t = Instant::now();
        let s = store.state().await.expect("state");
        reads.push(t.elapsed());
        assert_eq!(s.placements.len(), GUESTS - no_room);
    }
    let per_node = {
        let mut counts = std::collections::HashMap::<&str, usize>::new();
        for p in &placements {
            *counts.entry(p.node.as_str()).or_default() += 1;
        }
        let (mn, mx) = (
            counts.values().min().copied(),
            counts.values().max().copied(),
        );
        format!(
            "{} nodes used, {}-{} guests each",
            counts.len(),
            mn.unwrap_or(0),
            mx.unwrap_or(0)
        )
    };
    println!(
        "nodes: {NODES} ({} active), guests: {GUESTS}, placed: {} ({per_node}), no room: {no_room}",
        state
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .count(),
        placements.len()
    );
    summary("decision_us", "µs", decisions, 1e6);
    summary("placement_txn_us", "µs", txns, 1e6);
    summary("state_read_ms", "ms", reads, 1e3);
    summary("guest_create_us", "µs", creates, 1e6);
    for m in members {
        let _ = m.leave().await;
    }
    drop(etcd);
}
