//! The leader's HA decisions: which guests of a lost node, or of a node where they crash, go
//! elsewhere, when, and where. A pure function of the cluster state and a clock, so the
//! timeline can be tested and benchmarked without etcd (docs/ha.md).
//!
//! Every member runs [`Failover::observe`] on every state it reads, so that whichever node
//! leads next knows which nodes it saw, whether they had a watchdog, and since when each is
//! gone (by its own clock: a node first seen gone now was gone at least that long, which errs
//! on the safe side). Only the leader calls [`Failover::decide`].

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::fencing::Timings;
use crate::model::{Desired, Placement};
use crate::placement;
use crate::store::ClusterState;

/// The longest wait between two tries to place a guest for which there is no room.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Moving a guest's placement from a lost (or failing) node to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    pub guest: String,
    /// The placement's revision the decision was made on.
    pub placement_revision: i64,
    pub from: String,
    pub to: String,
    pub reason: String,
}

/// What the leader does now, and why the guests it leaves are waiting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Highest priority first.
    pub restarts: Vec<Restart>,
    /// Guests left where they are (or without room), with why, by name.
    pub waiting: HashMap<String, String>,
}

/// What the node saw of a member.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    watchdog: Option<String>,
}

/// The failover memory of one member.
#[derive(Debug, Clone)]
pub struct Failover {
    timings: Timings,
    seen: HashMap<String, Seen>,
    lost: HashMap<String, Instant>,
    backoff: HashMap<String, (u32, Instant)>,
}

enum Cause<'a> {
    Lost(&'a str),
    Crashed(&'a str),
}

impl Failover {
    /// Failover with `timings`, which must keep the fencing guarantee ([`Timings::check`]):
    /// a leader never restarts a guest sooner than they prove safe.
    pub fn new(timings: Timings) -> Result<Self, String> {
        timings.check()?;
        Ok(Failover {
            timings,
            seen: HashMap::new(),
            lost: HashMap::new(),
            backoff: HashMap::new(),
        })
    }

    /// Since when `node` has been gone, as this member saw it.
    pub fn lost_since(&self, node: &str) -> Option<Instant> {
        self.lost.get(node).copied()
    }

    /// Remembers the members of `state` and notes, at `now`, each node that a placement names
    /// but that is no longer a member.
    pub fn observe(&mut self, now: Instant, state: &ClusterState) {
        let live: HashSet<&str> = state.nodes.iter().map(|n| n.id.as_str()).collect();
        for n in &state.nodes {
            self.seen.insert(
                n.id.clone(),
                Seen {
                    watchdog: n.watchdog.clone(),
                },
            );
        }
        let placed_on: HashSet<&str> = state
            .placements
            .iter()
            .map(|p| p.value.node.as_str())
            .collect();
        for node in placed_on.iter().filter(|n| !live.contains(*n)) {
            self.lost.entry((*node).to_owned()).or_insert(now);
        }
        self.lost
            .retain(|n, _| placed_on.contains(n.as_str()) && !live.contains(n.as_str()));
    }

    /// The leader's decisions at `now` on `state` (which [`Failover::observe`] has seen).
    pub fn decide(&mut self, now: Instant, state: &ClusterState) -> Decisions {
        let mut out = Decisions::default();
        let live: HashMap<&str, &crate::model::NodeRecord> =
            state.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
        let guests: Vec<_> = state.guests.iter().map(|g| g.value.clone()).collect();
        let mut placements: Vec<Placement> =
            state.placements.iter().map(|p| p.value.clone()).collect();
        let by_name: HashMap<&str, &crate::store::Versioned<crate::model::ClusterGuest>> =
            state.guests.iter().map(|g| (g.value.name(), g)).collect();
        let mut candidates = Vec::new();
        for p in &state.placements {
            let Some(g) = by_name.get(p.value.guest.as_str()).copied() else {
                continue;
            };
            if g.value.desired != Desired::Running {
                continue;
            }
            let node = p.value.node.as_str();
            let cause = match live.get(node) {
                None => Cause::Lost(node),
                Some(n) if n.guests_failed.contains(&p.value.guest) => Cause::Crashed(node),
                Some(_) => continue,
            };
            if !g.value.ha {
                if let Cause::Lost(node) = cause {
                    out.waiting.insert(
                        p.value.guest.clone(),
                        format!(
                            "node {node} is lost; the guest is not HA, so it stays placed there \
                             until the node is back"
                        ),
                    );
                }
                continue;
            }
            candidates.push((g, p, cause));
        }
        candidates.sort_by(|(a, ..), (b, ..)| {
            b.value
                .priority
                .cmp(&a.value.priority)
                .then(a.value.name().cmp(b.value.name()))
        });
        let mut still: HashSet<String> = HashSet::new();
        for (g, p, cause) in candidates {
            let name = g.value.name().to_owned();
            still.insert(name.clone());
            let (from, why, exclude) = match cause {
                Cause::Lost(node) => {
                    let since = self.lost.get(node).copied().unwrap_or(now);
                    let gone = now.saturating_duration_since(since);
                    let wd = match self.seen.get(node) {
                        None => {
                            out.waiting.insert(
                                name,
                                format!(
                                    "node {node} is gone and was never seen by this leader, so \
                                     it is not known to have a watchdog: confirm it is off, \
                                     then stop and start the guest"
                                ),
                            );
                            continue;
                        }
                        Some(Seen { watchdog: None }) => {
                            out.waiting.insert(
                                name,
                                format!(
                                    "node {node} is lost and had no watchdog armed: nothing \
                                     guarantees the guest is not still running there; confirm \
                                     it is off, then stop and start the guest"
                                ),
                            );
                            continue;
                        }
                        Some(Seen { watchdog: Some(wd) }) => wd.clone(),
                    };
                    let due = since + self.timings.restart_after_loss;
                    if now < due {
                        out.waiting.insert(
                            name,
                            format!(
                                "node {node} lost {} s ago: restarting elsewhere in {} s, once \
                                 its watchdog ({wd}) has certainly reset it",
                                gone.as_secs(),
                                due.saturating_duration_since(now).as_secs().max(1)
                            ),
                        );
                        continue;
                    }
                    (
                        node,
                        format!(
                            "node {node} lost {} s ago, fenced by its watchdog ({wd})",
                            gone.as_secs()
                        ),
                        None,
                    )
                }
                Cause::Crashed(node) => (
                    node,
                    format!("it crashed too often on node {node}"),
                    Some(node),
                ),
            };
            if let Some((tries, next)) = self.backoff.get(&name) {
                if now < *next {
                    out.waiting.insert(
                        name,
                        format!(
                            "{why}; no room on try {tries}, next try in {} s",
                            next.saturating_duration_since(now).as_secs().max(1)
                        ),
                    );
                    continue;
                }
            }
            let nodes: Vec<_> = state
                .nodes
                .iter()
                .filter(|n| Some(n.id.as_str()) != exclude)
                .cloned()
                .collect();
            match placement::place(&g.value, &nodes, &placements, &guests) {
                Ok(to) => {
                    self.backoff.remove(&name);
                    if let Some(q) = placements.iter_mut().find(|q| q.guest == name) {
                        q.node = to.clone();
                    }
                    out.restarts.push(Restart {
                        guest: name,
                        placement_revision: p.revision,
                        from: from.to_owned(),
                        to,
                        reason: why,
                    });
                }
                Err(no_room) => {
                    let tries = self.backoff.get(&name).map_or(0, |b| b.0) + 1;
                    let wait = Duration::from_secs(1u64 << tries.min(5)).min(MAX_BACKOFF);
                    self.backoff.insert(name.clone(), (tries, now + wait));
                    out.waiting.insert(
                        name,
                        format!(
                            "{why}; {}; next try in {} s",
                            no_room.reason,
                            wait.as_secs()
                        ),
                    );
                }
            }
        }
        self.backoff.retain(|g, _| still.contains(g));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterGuest, NodeRecord};
    use crate::store::Versioned;
    use hvnode_api::guest::GuestSpec;

    const T: Timings = Timings::DEFAULT;

    fn node(id: &str, mem_free: u64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            mem_total_mib: 8192,
            mem_free_mib: mem_free,
            vcpus_total: 8,
            watchdog: Some("i6300esb".into()),
            ..Default::default()
        }
    }

    fn guest(name: &str, mem: u64, ha: bool, priority: i32) -> Versioned<ClusterGuest> {
        let mut g = ClusterGuest::new(GuestSpec {
            memory_mib: mem,
            ..GuestSpec::minimal(name, "vmlinuz")
        });
        g.ha = ha;
        g.priority = priority;
        Versioned {
            value: g,
            revision: 1,
        }
    }

    fn placed(guest: &str, node: &str, revision: i64) -> Versioned<Placement> {
        Versioned {
            value: Placement {
                format: 1,
                guest: guest.into(),
                node: node.into(),
                placed_at_revision: 1,
                reason: "most free memory".into(),
            },
            revision,
        }
    }

    fn state(
        nodes: Vec<NodeRecord>,
        guests: Vec<Versioned<ClusterGuest>>,
        placements: Vec<Versioned<Placement>>,
    ) -> ClusterState {
        ClusterState {
            revision: 10,
            nodes,
            guests,
            placements,
            domains: Vec::new(),
        }
    }

    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    #[test]
    fn a_lost_nodes_ha_guests_move_only_after_the_fencing_wait_highest_priority_first() {
        let t0 = Instant::now();
        let mut f = Failover::new(T).unwrap();
        let guests = vec![
            guest("db", 4096, true, 10),
            guest("web", 4096, true, 1),
            guest("batch", 1024, false, 0),
        ];
        let placements = vec![
            placed("db", "n1", 11),
            placed("web", "n1", 12),
            placed("batch", "n1", 13),
        ];
        let n2 = NodeRecord {
            mem_total_mib: 6000,
            ..node("n2", 6000)
        };
        let both = state(
            vec![node("n1", 8000), n2.clone()],
            guests.clone(),
            placements.clone(),
        );
        f.observe(t0, &both);
        assert_eq!(f.decide(t0, &both), Decisions::default());
        // n1's record is gone (its lease ran out): seen at t0 + 11 s.
        let lost = state(vec![n2], guests, placements);
        let seen = t0 + s(11);
        f.observe(seen, &lost);
        for wait in [0, 5, 12] {
            f.observe(seen + s(wait), &lost);
            let d = f.decide(seen + s(wait), &lost);
            assert!(d.restarts.is_empty(), "at {wait}: {d:?}");
            assert!(d.waiting["db"].contains("restarting elsewhere in"), "{d:?}");
            assert!(d.waiting["batch"].contains("not HA"), "{d:?}");
        }
        let due = seen + T.restart_after_loss;
        f.observe(due, &lost);
        let d = f.decide(due, &lost);
        // Room for one 4 GiB guest on n2: the higher priority goes, nothing is overcommitted.
        assert_eq!(d.restarts.len(), 1, "{d:?}");
        let r = &d.restarts[0];
        assert_eq!(
            (r.guest.as_str(), r.from.as_str(), r.to.as_str()),
            ("db", "n1", "n2")
        );
        assert_eq!(r.placement_revision, 11);
        assert!(
            r.reason.contains("fenced by its watchdog (i6300esb)"),
            "{r:?}"
        );
        assert!(d.waiting["web"].contains("next try in 2 s"), "{d:?}");
        // The next tries back off: 2, 4, 8... seconds.
        let d = f.decide(due + s(1), &lost);
        assert!(d.waiting["web"].contains("no room on try 1"), "{d:?}");
        let d = f.decide(due + s(2), &lost);
        assert!(d.waiting["web"].contains("next try in 4 s"), "{d:?}");
    }

    #[test]
    fn a_node_back_before_the_wait_keeps_its_guests() {
        let t0 = Instant::now();
        let mut f = Failover::new(T).unwrap();
        let guests = vec![guest("db", 1024, true, 0)];
        let placements = vec![placed("db", "n1", 11)];
        let both = state(
            vec![node("n1", 8000), node("n2", 8000)],
            guests.clone(),
            placements.clone(),
        );
        f.observe(t0, &both);
        let lost = state(vec![node("n2", 8000)], guests, placements);
        f.observe(t0 + s(1), &lost);
        assert!(f.lost_since("n1").is_some());
        f.observe(t0 + s(5), &both);
        assert!(f.lost_since("n1").is_none());
        // Lost again later: the wait starts over.
        f.observe(t0 + s(20), &lost);
        let d = f.decide(t0 + s(20) + T.restart_after_loss - s(1), &lost);
        assert!(d.restarts.is_empty(), "{d:?}");
    }

    #[test]
    fn no_restart_without_a_known_watchdog() {
        let t0 = Instant::now();
        let guests = vec![guest("db", 1024, true, 0)];
        let placements = vec![placed("db", "n1", 11)];
        let lost = state(vec![node("n2", 8000)], guests.clone(), placements.clone());
        // A leader that never saw n1.
        let mut f = Failover::new(T).unwrap();
        f.observe(t0, &lost);
        let d = f.decide(t0 + s(600), &lost);
        assert!(d.restarts.is_empty());
        assert!(d.waiting["db"].contains("never seen"), "{d:?}");
        // A leader that saw n1 without a watchdog.
        let mut f = Failover::new(T).unwrap();
        let mut n1 = node("n1", 8000);
        n1.watchdog = None;
        f.observe(t0, &state(vec![n1, node("n2", 8000)], guests, placements));
        f.observe(t0 + s(1), &lost);
        let d = f.decide(t0 + s(600), &lost);
        assert!(d.restarts.is_empty());
        assert!(d.waiting["db"].contains("no watchdog"), "{d:?}");
    }

    #[test]
    fn a_guest_that_crashes_too_often_goes_to_another_node_and_stopped_guests_stay() {
        let t0 = Instant::now();
        let mut f = Failover::new(T).unwrap();
        let mut n1 = node("n1", 8000);
        n1.guests_failed = vec!["db".into(), "off".into()];
        let mut off = guest("off", 1024, true, 0);
        off.value.desired = Desired::Stopped;
        let st = state(
            vec![n1, node("n2", 2000)],
            vec![guest("db", 1024, true, 0), off],
            vec![placed("db", "n1", 11), placed("off", "n1", 12)],
        );
        f.observe(t0, &st);
        let d = f.decide(t0, &st);
        assert_eq!(d.restarts.len(), 1, "{d:?}");
        assert_eq!(d.restarts[0].to, "n2");
        assert!(d.restarts[0]
            .reason
            .contains("crashed too often on node n1"));
        // With no other node, it waits (it is not placed back on n1).
        let alone = state(
            vec![st.nodes[0].clone()],
            st.guests.clone(),
            st.placements.clone(),
        );
        let d = f.decide(t0, &alone);
        assert!(d.restarts.is_empty());
        assert!(d.waiting["db"].contains("no room") || d.waiting["db"].contains("no active"));
    }
}
