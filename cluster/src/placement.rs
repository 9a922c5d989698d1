//! The placement decision: a pure function of the cluster state, so the leader's choice can be
//! tested and benchmarked without etcd.
//!
//! A node's room is counted conservatively from both what it reports and what the cluster has
//! placed on it (a placement made since its last heartbeat is not in its report yet):
//! free memory = min(`mem_free_mib`, `mem_total_mib` - memory of the guests placed on it);
//! free vCPUs = `vcpus_total` - max(`vcpus_used`, vCPUs of the guests placed on it).

use std::collections::HashMap;

use crate::model::{ClusterGuest, NodeRecord, NodeState, Placement};

/// The resource that kept a guest from being placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// No Active node at all.
    Nodes,
    Memory,
    Vcpus,
}

/// Why a guest could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no room for guest {guest}: {reason}")]
pub struct NoRoom {
    pub guest: String,
    /// The shortest resource.
    pub short: Resource,
    pub reason: String,
}

/// The room left on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub mem_free_mib: u64,
    pub vcpus_free: u32,
    pub guests: usize,
}

/// The room of each node (by id) given the placements, not counting `except` (the guest being
/// placed, should it have a placement already).
pub fn rooms<'a>(
    nodes: &'a [NodeRecord],
    placements: &[Placement],
    guests: &[ClusterGuest],
    except: &str,
) -> HashMap<&'a str, Room> {
    let by_name: HashMap<&str, &ClusterGuest> = guests.iter().map(|g| (g.name(), g)).collect();
    let mut placed: HashMap<&str, (u64, u32, usize)> = HashMap::new();
    for p in placements.iter().filter(|p| p.guest != except) {
        let e = placed.entry(p.node.as_str()).or_default();
        if let Some(g) = by_name.get(p.guest.as_str()) {
            e.0 += g.memory_mib();
            e.1 += g.vcpus();
        }
        e.2 += 1;
    }
    nodes
        .iter()
        .map(|n| {
            let (mem, vcpus, count) = placed.get(n.id.as_str()).copied().unwrap_or_default();
            let room = Room {
                mem_free_mib: n.mem_free_mib.min(n.mem_total_mib.saturating_sub(mem)),
                vcpus_free: n.vcpus_total.saturating_sub(n.vcpus_used.max(vcpus)),
                guests: count,
            };
            (n.id.as_str(), room)
        })
        .collect()
}

/// Chooses the node for `guest`: an Active node with enough free memory and vCPUs, the one with
/// the most free memory after placement; ties go to the node with the fewest guests, then the
/// smallest id. Without one, [`NoRoom`] names the shortest resource.
pub fn place(
    guest: &ClusterGuest,
    nodes: &[NodeRecord],
    placements: &[Placement],
    guests: &[ClusterGuest],
) -> Result<String, NoRoom> {
    let rooms = rooms(nodes, placements, guests, guest.name());
    let active: Vec<(&NodeRecord, Room)> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Active)
        .filter(|n| guest.pinned.as_ref().is_none_or(|p| *p == n.id))
        .map(|n| (n, rooms[n.id.as_str()]))
        .collect();
    let best = active
        .iter()
        .filter(|(_, r)| r.mem_free_mib >= guest.memory_mib() && r.vcpus_free >= guest.vcpus())
        .min_by(|(a, ra), (b, rb)| {
            // Most free memory after placement first (the guest's memory is the same for all).
            rb.mem_free_mib
                .cmp(&ra.mem_free_mib)
                .then(ra.guests.cmp(&rb.guests))
                .then(a.id.cmp(&b.id))
        });
    if let Some((n, _)) = best {
        return Ok(n.id.clone());
    }
    let no_room = |short, reason| NoRoom {
        guest: guest.name().to_owned(),
        short,
        reason,
    };
    if let (Some(pin), true) = (&guest.pinned, active.is_empty()) {
        return Err(no_room(
            Resource::Nodes,
            format!("it is pinned to node {pin}, which is not an active member"),
        ));
    }
    if active.is_empty() {
        return Err(no_room(
            Resource::Nodes,
            format!("no active node ({} in maintenance)", nodes.len()),
        ));
    }
    let mem_short = active
        .iter()
        .filter(|(_, r)| r.mem_free_mib < guest.memory_mib())
        .count();
    let cpu_short = active
        .iter()
        .filter(|(_, r)| r.vcpus_free < guest.vcpus())
        .count();
    let (most_mem_node, most_mem) = active
        .iter()
        .map(|(n, r)| (n.id.as_str(), r.mem_free_mib))
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .expect("active is not empty");
    let (most_cpu_node, most_cpu) = active
        .iter()
        .map(|(n, r)| (n.id.as_str(), r.vcpus_free))
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .expect("active is not empty");
    let n = active.len();
    let mem = format!(
        "memory is short on {mem_short} of {n} active nodes (needs {} MiB, most free {most_mem} MiB on {most_mem_node})",
        guest.memory_mib()
    );
    let cpu = format!(
        "vCPUs are short on {cpu_short} of {n} active nodes (needs {}, most free {most_cpu} on {most_cpu_node})",
        guest.vcpus()
    );
    // The shortest resource: the one short on more nodes; on a tie, the one with less headroom
    // relative to the need.
    let mem_first = mem_short > cpu_short
        || (mem_short == cpu_short
            && (most_mem as u128) * (guest.vcpus().max(1) as u128)
                <= (most_cpu as u128) * (guest.memory_mib().max(1) as u128));
    if mem_first {
        Err(no_room(Resource::Memory, format!("{mem}; {cpu}")))
    } else {
        Err(no_room(Resource::Vcpus, format!("{cpu}; {mem}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnode_api::guest::GuestSpec;

    fn node(id: &str, mem_free: u64, vcpus_free: u32) -> NodeRecord {
        NodeRecord {
            format: 1,
            id: id.into(),
            address: format!("{id}:8443"),
            state: NodeState::Active,
            mem_total_mib: 65536,
            mem_free_mib: mem_free,
            vcpus_total: 32,
            vcpus_used: 32 - vcpus_free,
            agent_version: "0.1.0".into(),
            heartbeat_unix: 0,
            guests_running: Vec::new(),
            domains: Vec::new(),
            ..Default::default()
        }
    }
    fn guest(name: &str, mem: u64, vcpus: u32) -> ClusterGuest {
        ClusterGuest::new(GuestSpec {
            vcpus,
            memory_mib: mem,
            ..GuestSpec::minimal(name, "vmlinuz")
        })
    }
    fn placed(guest: &str, node: &str) -> Placement {
        Placement {
            format: 1,
            guest: guest.into(),
            node: node.into(),
            placed_at_revision: 1,
            reason: String::new(),
        }
    }

    #[test]
    fn most_free_memory_wins() {
        let nodes = [node("a", 4096, 8), node("b", 8192, 8), node("c", 6000, 8)];
        assert_eq!(place(&guest("g", 1024, 1), &nodes, &[], &[]).unwrap(), "b");
    }

    #[test]
    fn needs_memory_and_vcpus() {
        let nodes = [node("a", 4096, 8), node("b", 8192, 1)];
        assert_eq!(place(&guest("g", 1024, 2), &nodes, &[], &[]).unwrap(), "a");
        assert_eq!(place(&guest("g", 4096, 1), &nodes, &[], &[]).unwrap(), "b");
    }

    #[test]
    fn maintenance_nodes_take_nothing() {
        let mut b = node("b", 60000, 32);
        b.state = NodeState::Maintenance;
        let nodes = [node("a", 2048, 2), b];
        assert_eq!(place(&guest("g", 1024, 1), &nodes, &[], &[]).unwrap(), "a");
        let e = place(&guest("g", 1024, 1), &nodes[1..], &[], &[]).unwrap_err();
        assert_eq!(e.short, Resource::Nodes);
        assert!(e.to_string().contains("no active node"), "{e}");
    }

    #[test]
    fn ties_fewest_guests_then_id() {
        let nodes = [node("b", 8192, 8), node("a", 8192, 8), node("c", 8192, 8)];
        assert_eq!(place(&guest("g", 1024, 1), &nodes, &[], &[]).unwrap(), "a");
        // A guest placed on a without memory counted (unknown guest): a has more guests.
        let ps = [placed("ghost", "a")];
        assert_eq!(place(&guest("g", 1024, 1), &nodes, &ps, &[]).unwrap(), "b");
    }

    #[test]
    fn placements_count_before_heartbeat() {
        // b reports more free memory, but a 6 GiB guest was placed on it since.
        let mut b = node("b", 16384, 8);
        b.mem_total_mib = 16384;
        let nodes = [node("a", 12000, 8), b];
        let gs = [guest("big", 6144, 1)];
        let ps = [placed("big", "b")];
        assert_eq!(place(&guest("g", 1024, 1), &nodes, &ps, &gs).unwrap(), "a");
        // Its own earlier placement does not count against the guest.
        let ps = [placed("g", "b")];
        let gs = [guest("g", 6144, 1)];
        assert_eq!(place(&gs[0], &nodes, &ps, &gs).unwrap(), "b");
    }

    #[test]
    fn no_room_names_the_shortest_resource() {
        let nodes = [node("a", 4096, 8), node("b", 2048, 1)];
        let e = place(&guest("g", 8192, 1), &nodes, &[], &[]).unwrap_err();
        assert_eq!(e.short, Resource::Memory);
        assert!(e.reason.starts_with("memory is short on 2 of 2"), "{e}");
        assert!(e.reason.contains("most free 4096 MiB on a"), "{e}");
        let e = place(&guest("g", 1024, 16), &nodes, &[], &[]).unwrap_err();
        assert_eq!(e.short, Resource::Vcpus);
        assert!(e.reason.starts_with("vCPUs are short on 2 of 2"), "{e}");
        // a lacks vCPUs only, b lacks memory and vCPUs: vCPUs are the shorter.
        let e = place(&guest("g", 3000, 9), &nodes, &[], &[]).unwrap_err();
        assert_eq!(e.short, Resource::Vcpus, "{e}");
        let e = place(&guest("g", 1024, 1), &[], &[], &[]).unwrap_err();
        assert_eq!(e.short, Resource::Nodes);
    }

    #[test]
    fn a_pinned_guest_goes_to_its_node_or_nowhere() {
        let nodes = [node("a", 4096, 8), node("b", 8192, 8)];
        let mut g = guest("g", 1024, 1);
        g.pinned = Some("a".into());
        assert_eq!(place(&g, &nodes, &[], &[]).unwrap(), "a");
        g.spec.memory_mib = 8192;
        let e = place(&g, &nodes, &[], &[]).unwrap_err();
        assert_eq!(e.short, Resource::Memory, "{e}");
        g.pinned = Some("c".into());
        let e = place(&g, &nodes, &[], &[]).unwrap_err();
        assert!(e.reason.contains("pinned to node c"), "{e}");
    }
}
