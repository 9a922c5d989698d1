//! The cluster library against a real etcd: each test starts its own single-member etcd on free
//! loopback ports (killed when the test ends, on every path). Without etcd (Debian's
//! etcd-server) a test says why and returns, or fails under `CI=true`.

use std::time::Duration;

use hvnode_api::guest::GuestSpec;
use hvnode_cluster::election::Election;
use hvnode_cluster::keys::Keys;
use hvnode_cluster::local_etcd::{etcd_binary, LocalEtcd};
use hvnode_cluster::membership::{list_nodes, LeaseState, Membership};
use hvnode_cluster::model::{ClusterGuest, NodeRecord, NodeState, Record, StorageDomain};
use hvnode_cluster::store::Store;
use hvnode_cluster::{Client, Error};

const WAIT: Duration = Duration::from_secs(20);

/// A started etcd and a client of it, or `None` (the test returns) when etcd is missing.
async fn etcd(test: &str) -> Option<(LocalEtcd, Client)> {
    let Some(bin) = etcd_binary() else {
        hvnode_base::testing::cannot_run(
            test,
            "no etcd (/usr/bin/etcd, Debian's etcd-server; or set HVNODE_ETCD)",
        );
        return None;
    };
    let etcd = LocalEtcd::start(&bin, WAIT).await.expect("etcd starts");
    let client = etcd.client().await.expect("client connects");
    Some((etcd, client))
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        format: NodeRecord::FORMAT,
        id: id.into(),
        address: "127.0.0.1:8443".into(),
        state: NodeState::Active,
        mem_total_mib: 65536,
        mem_free_mib: 60000,
        vcpus_total: 32,
        vcpus_used: 0,
        agent_version: "0.1.0".into(),
        heartbeat_unix: 1,
        guests_running: Vec::new(),
        domains: Vec::new(),
        ..Default::default()
    }
}

fn guest(name: &str) -> ClusterGuest {
    let mut g = ClusterGuest::new(GuestSpec {
        vcpus: 2,
        memory_mib: 2048,
        ..GuestSpec::minimal(name, "vmlinuz")
    });
    g.ha = true;
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_update_and_list() {
    let Some((_etcd, client)) = etcd("join_update_and_list").await else {
        return;
    };
    let keys = Keys::default();
    let a = Membership::join(&client, &keys, &node("a"), 5)
        .await
        .unwrap();
    let _b = Membership::join(&client, &keys, &node("b"), 5)
        .await
        .unwrap();
    let nodes = list_nodes(&client, &keys).await.unwrap();
    let ids: Vec<_> = nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);

    let mut rec = node("a");
    rec.state = NodeState::Maintenance;
    rec.heartbeat_unix = 2;
    a.update(&rec).await.unwrap();
    let nodes = list_nodes(&client, &keys).await.unwrap();
    assert_eq!(nodes[0], rec);
    // A node writes only its own record.
    assert!(matches!(a.update(&node("b")).await, Err(Error::Invalid(_))));
    // The lease outlives a TTL while kept alive (TTL 5 s: renewed every 1.6 s).
    let mut w = a.watch();
    assert!(tokio::time::timeout(Duration::from_secs(6), w.changed())
        .await
        .is_err());
    assert_eq!(a.state(), LeaseState::Alive);
    assert_eq!(list_nodes(&client, &keys).await.unwrap().len(), 2);

    a.leave().await.unwrap();
    let nodes = list_nodes(&client, &keys).await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].id, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_loss_removes_the_node_and_is_reported() {
    let Some((_etcd, mut client)) = etcd("lease_loss_removes_the_node_and_is_reported").await
    else {
        return;
    };
    let keys = Keys::default();
    let m = Membership::join(&client, &keys, &node("a"), 3)
        .await
        .unwrap();
    let mut w = m.watch();
    client.lease_revoke(m.lease_id()).await.unwrap();
    assert!(list_nodes(&client, &keys).await.unwrap().is_empty());
    let state = tokio::time::timeout(WAIT, w.wait_for(|s| *s != LeaseState::Alive))
        .await
        .expect("Lost reported within the wait")
        .unwrap()
        .clone();
    match state {
        LeaseState::Lost { reason } => {
            assert!(reason.contains("expired or was revoked"), "{reason}")
        }
        s => panic!("{s:?}"),
    }
    let e = m.update(&node("a")).await.unwrap_err();
    assert!(matches!(e, Error::LeaseLost(_)), "{e:?}");
    assert!(list_nodes(&client, &keys).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_loss_when_etcd_goes_away() {
    let Some((mut etcd, client)) = etcd("lease_loss_when_etcd_goes_away").await else {
        return;
    };
    let keys = Keys::default();
    let m = Membership::join(&client, &keys, &node("a"), 2)
        .await
        .unwrap();
    let mut w = m.watch();
    etcd.kill();
    let state = tokio::time::timeout(WAIT, w.wait_for(|s| *s != LeaseState::Alive))
        .await
        .expect("Lost reported within the wait")
        .unwrap()
        .clone();
    assert!(
        matches!(state, LeaseState::Lost { ref reason } if reason.contains("not renewed")),
        "{state:?}"
    );
    // The store reports etcd unreachable, distinct from a conflict.
    let e = Store::new(&client, &keys)
        .create_guest(&guest("g"))
        .await
        .unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_writes_are_revision_checked() {
    let Some((_etcd, client)) = etcd("guest_writes_are_revision_checked").await else {
        return;
    };
    let store = Store::new(&client, &Keys::default());
    let rev = store.create_guest(&guest("web")).await.unwrap();
    let e = store.create_guest(&guest("web")).await.unwrap_err();
    assert!(
        matches!(e, Error::Conflict { ref key, expected: 0, found } if key == "/hvnode/guests/web" && found == rev),
        "{e:?}"
    );
    let read = store.get_guest("web").await.unwrap();
    assert_eq!(read.revision, rev);
    let mut g = read.value.clone();
    g.spec.memory_mib = 4096;
    let rev2 = store.update_guest(&g, read.revision).await.unwrap();
    assert!(rev2 > rev);
    // A second writer with the old revision loses.
    g.spec.memory_mib = 1024;
    let e = store.update_guest(&g, read.revision).await.unwrap_err();
    assert!(
        matches!(e, Error::Conflict { expected, found, .. } if expected == rev && found == rev2),
        "{e:?}"
    );
    let e = store.delete_guest("web", rev).await.unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e:?}");
    assert_eq!(
        store.get_guest("web").await.unwrap().value.memory_mib(),
        4096
    );
    store.delete_guest("web", rev2).await.unwrap();
    assert!(matches!(
        store.get_guest("web").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.update_guest(&g, rev2).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.create_guest(&guest("Web")).await,
        Err(Error::InvalidName { .. })
    ));

    // Storage domains follow the same rules.
    let mut d = StorageDomain {
        format: StorageDomain::FORMAT,
        name: "nfs-a".into(),
        server: "10.0.0.2".into(),
        export: "/export/a".into(),
        nfs_version: "4.2".into(),
        options: "hard".into(),
    };
    let drev = store.create_domain(&d).await.unwrap();
    assert!(matches!(
        store.create_domain(&d).await,
        Err(Error::Conflict { expected: 0, .. })
    ));
    d.options = "hard,timeo=600".into();
    let drev2 = store.update_domain(&d, drev).await.unwrap();
    assert!(matches!(
        store.update_domain(&d, drev).await,
        Err(Error::Conflict { .. })
    ));
    let domains = store.list_domains().await.unwrap();
    assert_eq!((domains.len(), domains[0].revision), (1, drev2));
    assert_eq!(domains[0].value, d);
    store.delete_domain("nfs-a", drev2).await.unwrap();
    assert!(store.list_domains().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_then_the_other_after_resign() {
    let Some((_etcd, client)) = etcd("one_leader_then_the_other_after_resign").await else {
        return;
    };
    let keys = Keys::default();
    let a = Membership::join(&client, &keys, &node("a"), 10)
        .await
        .unwrap();
    let b = Membership::join(&client, &keys, &node("b"), 10)
        .await
        .unwrap();
    let election = Election::new(&client, &keys);
    assert_eq!(election.leader().await.unwrap(), None);

    // Both campaign at once: one leads, the other waits.
    let (ea, eb) = (election.clone(), election.clone());
    let (lease_a, lease_b) = (a.lease_id(), b.lease_id());
    let mut campaign_a = tokio::spawn(async move { ea.campaign(lease_a, "a").await });
    let mut campaign_b = tokio::spawn(async move { eb.campaign(lease_b, "b").await });
    let (first, mut other) = tokio::select! {
        r = &mut campaign_a => (r.unwrap().unwrap(), campaign_b),
        r = &mut campaign_b => (r.unwrap().unwrap(), campaign_a),
    };
    let winner = first.value().to_string();
    let loser = if winner == "a" { "b" } else { "a" };
    assert_eq!(
        election.leader().await.unwrap().as_deref(),
        Some(winner.as_str())
    );
    let mut observer = election.observe().await.unwrap();
    assert_eq!(
        observer.next().await.unwrap().as_deref(),
        Some(winner.as_str())
    );
    // The other still waits while the first leads, past the client's request timeout.
    assert!(tokio::time::timeout(
        hvnode_cluster::REQUEST_TIMEOUT + Duration::from_secs(1),
        &mut other
    )
    .await
    .is_err());
    assert_eq!(
        election.leader().await.unwrap().as_deref(),
        Some(winner.as_str())
    );

    // The leader's placement carries a leadership check; once it resigned, it is refused.
    let store = Store::new(&client, &keys);
    let g1 = store.create_guest(&guest("g1")).await.unwrap();
    let g2 = store.create_guest(&guest("g2")).await.unwrap();
    store
        .place_as_leader(&first, "g1", &winner, g1, "test")
        .await
        .unwrap();
    let former = first.clone();
    election.resign(first).await.unwrap();
    let e = store
        .place_as_leader(&former, "g2", &winner, g2, "test")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotLeader(_)), "{e:?}");
    assert_eq!(store.get_placement("g2").await.unwrap(), None);
    // So is a move of a placement (the HA failover) by a former leader.
    let p1 = store.get_placement("g1").await.unwrap().unwrap();
    let e = store
        .move_placement(Some(&former), "g1", p1.revision, loser, "node lost")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotLeader(_)), "{e:?}");
    assert_eq!(
        store.get_placement("g1").await.unwrap().unwrap().value.node,
        winner
    );
    let second = tokio::time::timeout(WAIT, other)
        .await
        .expect("the other leads")
        .unwrap()
        .unwrap();
    assert_eq!(second.value(), loser);
    assert_eq!(election.leader().await.unwrap().as_deref(), Some(loser));
    let next = tokio::time::timeout(WAIT, observer.next())
        .await
        .expect("observed")
        .unwrap();
    assert_eq!(next.as_deref(), Some(loser));
    store
        .place_as_leader(&second, "g2", loser, g2, "test")
        .await
        .unwrap();
    // Leadership ends with membership: the leader's lease goes, nobody leads.
    let leader_membership = if loser == "a" { a } else { b };
    leader_membership.leave().await.unwrap();
    assert_eq!(election.leader().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_txn_refuses_a_second_placement() {
    let Some((_etcd, client)) = etcd("placement_txn_refuses_a_second_placement").await else {
        return;
    };
    let store = Store::new(&client, &Keys::default());
    let rev = store.create_guest(&guest("web")).await.unwrap();
    // A decision made on an older revision of the guest is refused.
    let mut g = guest("web");
    g.spec.vcpus = 4;
    let rev2 = store.update_guest(&g, rev).await.unwrap();
    let e = store
        .place("web", "a", rev, "most free memory")
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Conflict { expected, found, .. } if expected == rev && found == rev2),
        "{e:?}"
    );
    assert_eq!(store.get_placement("web").await.unwrap(), None);

    store
        .place("web", "a", rev2, "most free memory")
        .await
        .unwrap();
    let e = store
        .place("web", "b", rev2, "most free memory")
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::AlreadyPlaced { ref node, .. } if node == "a"),
        "{e:?}"
    );
    let p = store.get_placement("web").await.unwrap().unwrap();
    assert_eq!(
        (p.value.node.as_str(), p.value.placed_at_revision),
        ("a", rev2)
    );
    // A move is checked against the placement's revision: a second move on the same reading
    // loses, and a move of a placement that is gone says so.
    let moved = store
        .move_placement(None, "web", p.revision, "b", "migrated off a")
        .await
        .unwrap();
    let e = store
        .move_placement(None, "web", p.revision, "c", "node a lost")
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Conflict { expected, found, .. } if expected == p.revision && found == moved),
        "{e:?}"
    );
    let now = store.get_placement("web").await.unwrap().unwrap();
    assert_eq!((now.value.node.as_str(), now.revision), ("b", moved));
    assert!(matches!(
        store.move_placement(None, "nope", 1, "a", "").await,
        Err(Error::NotFound { .. })
    ));
    // Placing a guest that does not exist.
    assert!(matches!(
        store.place("nope", "a", 1, "").await,
        Err(Error::NotFound { .. })
    ));

    // The whole state at one revision; deleting the guest deletes its placement.
    let state = store.state().await.unwrap();
    assert_eq!((state.guests.len(), state.placements.len()), (1, 1));
    assert!(state.revision >= now.revision);
    store.delete_guest("web", rev2).await.unwrap();
    assert!(store.list_placements().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_a_newer_format_fails_clearly() {
    let Some((_etcd, mut client)) = etcd("a_record_of_a_newer_format_fails_clearly").await else {
        return;
    };
    let keys = Keys::default();
    let store = Store::new(&client, &keys);
    let mut v = serde_json::to_value(guest("web")).unwrap();
    v["format"] = 99.into();
    v["added_later"] = "x".into();
    client
        .put("/hvnode/guests/web", serde_json::to_vec(&v).unwrap(), None)
        .await
        .unwrap();
    let e = store.get_guest("web").await.unwrap_err();
    assert!(
        matches!(e, Error::NewerFormat { ref key, found: 99, supported: 1 } if key == "/hvnode/guests/web"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("newer than this build reads") && msg.contains("upgrade"),
        "{msg}"
    );
    assert!(matches!(
        store.state().await,
        Err(Error::NewerFormat { .. })
    ));
    // Garbage is bad data, not a newer format.
    client
        .put("/hvnode/nodes/x", "garbage", None)
        .await
        .unwrap();
    assert!(matches!(
        list_nodes(&client, &keys).await,
        Err(Error::BadData { .. })
    ));
}
