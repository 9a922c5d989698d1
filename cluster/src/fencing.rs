//! Fencing: the timings every node and the leader share, and the node's guard, which decides
//! from the age of its membership lease (and, when that is in doubt, from its peers) whether
//! the node keeps feeding its watchdog or fences itself. docs/ha.md explains the timeline.
//!
//! The guarantee: when the leader restarts a lost node's HA guest elsewhere, that node has
//! either killed the guest's VMM itself or been reset by its watchdog. A node fences itself
//! once its lease has not been renewed for [`Timings::fence_after`] (less than the lease's TTL,
//! so before anyone else can see it lost) while it runs HA guests: it kills their VMMs, then
//! stops feeding the watchdog, which resets it within [`Timings::watchdog_timeout`]. The leader
//! restarts a guest only [`Timings::restart_after_loss`] after it first saw the node's record
//! gone, which [`Timings::check`] proves is later than the node's reset.
//!
//! Quorum loss is not node loss: when etcd answers no node, nobody can restart anything (the
//! leader's writes need etcd), so no node needs to fence itself, and resetting every node of the
//! cluster at once would turn an etcd outage into an outage of every guest. A node that cannot
//! renew its lease therefore asks the nodes it last saw in the cluster, over their node-to-node
//! API, whether they still hold theirs. Only if every one of them answers that it has lost etcd
//! too does the node keep its guests (and keep feeding); if any of them is a member, or any does
//! not answer, it fences. When etcd comes back and a peer is a member again before this node
//! is, the node has [`Timings::quorum_return_grace`] to renew its own lease, then fences too.

use std::time::{Duration, Instant};

/// The timings of membership and fencing. One set for the whole cluster: [`Timings::DEFAULT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// The membership lease's TTL: a node's record goes this long after its last renewal.
    pub lease_ttl: Duration,
    /// How often a node renews its lease (and so the longest a renewal's answer may take
    /// before the next try: the bound on the gap between etcd's renewal and the node's).
    pub renew_every: Duration,
    /// A lease not renewed for this long is in doubt: the node asks its peers.
    pub doubt_after: Duration,
    /// A lease not renewed for this long, on a node with HA guests and without proof of a
    /// quorum loss, makes the node fence itself.
    pub fence_after: Duration,
    /// The watchdog's timeout: a node that stops feeding it is reset this long after the last
    /// feed.
    pub watchdog_timeout: Duration,
    /// How long init keeps feeding the watchdog after the agent's last grant: an agent that
    /// hangs is reset at most this plus the watchdog's timeout after its last grant.
    pub grant: Duration,
    /// How often a node in doubt asks its peers, and how long it waits for each answer.
    pub peer_poll: Duration,
    /// In a quorum loss, how long a node may stay without its lease once a peer is a member
    /// again (etcd came back) before it fences itself.
    pub quorum_return_grace: Duration,
    /// How long the leader waits, after it first saw a node's record gone, before it restarts
    /// that node's HA guests elsewhere.
    pub restart_after_loss: Duration,
    /// How often a member reads the cluster and acts (the leader's and the node's loop).
    pub tick: Duration,
}

/// The safety margin [`Timings::check`] demands on top of every bound.
pub const MARGIN: Duration = Duration::from_secs(1);

impl Timings {
    /// The timings hvnode runs with (docs/ha.md).
    pub const DEFAULT: Timings = Timings {
        lease_ttl: Duration::from_secs(10),
        renew_every: Duration::from_millis(3333),
        doubt_after: Duration::from_secs(4),
        fence_after: Duration::from_secs(7),
        watchdog_timeout: Duration::from_secs(8),
        grant: Duration::from_secs(2),
        peer_poll: Duration::from_secs(1),
        quorum_return_grace: Duration::from_secs(1),
        restart_after_loss: Duration::from_secs(14),
        tick: Duration::from_secs(1),
    };

    /// The latest a node that lost its lease is reset, counted from its last renewal as the
    /// node saw it: its agent fences at `fence_after` and stops the feeding then; an agent that
    /// hung instead made its last grant before `fence_after`, which init honours for `grant`;
    /// the watchdog fires `watchdog_timeout` after the last feed.
    pub fn reset_by_after_renewal(&self) -> Duration {
        self.fence_after + self.grant + self.watchdog_timeout
    }

    /// The earliest the leader restarts a lost node's guests, counted from that node's last
    /// renewal as the node saw it: etcd granted that renewal at most `renew_every` earlier,
    /// the record goes `lease_ttl` after etcd's grant, and the leader waits
    /// `restart_after_loss` from then.
    pub fn restart_at_least_after_renewal(&self) -> Duration {
        (self.lease_ttl + self.restart_after_loss).saturating_sub(self.renew_every)
    }

    /// The latest a node in a quorum loss is reset, counted from the moment etcd is back for
    /// a peer: it learns it within two polls, waits `quorum_return_grace`, fences (or, hung,
    /// its last grant runs out), and its watchdog fires `watchdog_timeout` later.
    pub fn reset_by_after_quorum_return(&self) -> Duration {
        self.peer_poll * 2 + self.quorum_return_grace + self.grant + self.watchdog_timeout
    }

    /// The longest from a node's death to its HA guests being placed elsewhere: its record
    /// lasts the TTL, the leader sees it gone within a tick, waits `restart_after_loss`, and
    /// the chosen node starts the guest at its next tick.
    pub fn worst_failover(&self) -> Duration {
        self.lease_ttl + self.tick + self.restart_after_loss + self.tick
    }

    /// Checks that the timings keep the guarantee: a node is reset (or has killed its HA
    /// guests) before the leader restarts them, in a partition and when etcd comes back from a
    /// quorum loss, each with [`MARGIN`] to spare. The leader refuses timings that fail this.
    pub fn check(&self) -> Result<(), String> {
        let s = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        if self.renew_every * 2 > self.lease_ttl {
            return Err(format!(
                "renewing every {} leaves less than one retry within the lease's {}",
                s(self.renew_every),
                s(self.lease_ttl)
            ));
        }
        if !(self.renew_every < self.doubt_after
            && self.doubt_after + self.peer_poll * 2 <= self.fence_after
            && self.fence_after < self.lease_ttl)
        {
            return Err(format!(
                "the node must doubt (at {}) after a missed renewal (every {}), have two peer \
                 polls ({} each) before it fences (at {}), and fence before its lease ends \
                 (after {})",
                s(self.doubt_after),
                s(self.renew_every),
                s(self.peer_poll),
                s(self.fence_after),
                s(self.lease_ttl)
            ));
        }
        let reset = self.reset_by_after_renewal() + MARGIN;
        let restart = self.restart_at_least_after_renewal();
        if reset > restart {
            return Err(format!(
                "partition: a node cut off from etcd is reset up to {} after its last renewal \
                 (with the margin), but the leader may restart its guests {} after it",
                s(reset),
                s(restart)
            ));
        }
        let reset = self.reset_by_after_quorum_return() + MARGIN;
        if reset > self.restart_after_loss {
            return Err(format!(
                "quorum return: a node is reset up to {} after etcd is back for a peer (with the \
                 margin), but the leader may restart its guests {} after it",
                s(reset),
                s(self.restart_after_loss)
            ));
        }
        Ok(())
    }
}

/// What a peer answered to "do you hold your lease?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAnswer {
    /// Its lease was renewed within [`Timings::doubt_after`]: etcd answers it.
    Member,
    /// It cannot renew its lease either.
    Cut,
    /// It did not answer within [`Timings::peer_poll`] (or answered nonsense).
    NoAnswer(String),
}

/// The answers of one round of asking the peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRound {
    /// When the round ended.
    pub at: Instant,
    /// Each peer the node last saw in the cluster, with its answer.
    pub answers: Vec<(String, PeerAnswer)>,
}

/// What the node does with its watchdog now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The lease is fresh (or the node has nothing to fence): feed.
    Feed,
    /// The lease is in doubt: feed, and ask the peers (`true` when a new round is due).
    Doubt { ask_peers: bool },
    /// etcd is lost for every node: feed, keep the guests, start nothing; keep asking the
    /// peers (`true` when a new round is due).
    QuorumLost { ask_peers: bool },
    /// Kill the HA guests' VMMs, then stop feeding: the watchdog resets the node.
    Fence { reason: String },
}

/// The node's guard: [`Guard::step`] on every tick, with the lease's age, whether the node runs
/// HA guests and the latest round of peer answers.
#[derive(Debug, Clone)]
pub struct Guard {
    timings: Timings,
    /// Since when a peer has been a member while this node was in a quorum loss.
    peer_back_since: Option<Instant>,
    quorum_lost: bool,
    fenced: Option<String>,
    last_ask: Option<Instant>,
}

impl Guard {
    /// A guard with `timings` (checked: see [`Timings::check`]).
    pub fn new(timings: Timings) -> Result<Self, String> {
        timings.check()?;
        Ok(Guard {
            timings,
            peer_back_since: None,
            quorum_lost: false,
            fenced: None,
            last_ask: None,
        })
    }

    /// The timings it keeps.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Whether the node has fenced itself (for good: only a reset ends it).
    pub fn fenced(&self) -> Option<&str> {
        self.fenced.as_deref()
    }

    /// One decision at `now`: `lease_age` is the time since the lease was last renewed,
    /// `ha_guests` whether HA guests' VMMs run here, `peers` the latest round of answers (if
    /// any).
    pub fn step(
        &mut self,
        now: Instant,
        lease_age: Duration,
        ha_guests: bool,
        peers: Option<&PeerRound>,
    ) -> Verdict {
        if let Some(reason) = &self.fenced {
            return Verdict::Fence {
                reason: reason.clone(),
            };
        }
        let t = self.timings;
        if lease_age < t.doubt_after {
            self.quorum_lost = false;
            self.peer_back_since = None;
            self.last_ask = None;
            return Verdict::Feed;
        }
        if !ha_guests {
            // Nothing here could be started elsewhere: nothing to fence (the node starts
            // nothing while it cannot read its placements from etcd). It feeds, in doubt.
            self.quorum_lost = false;
            self.peer_back_since = None;
            return Verdict::Doubt { ask_peers: false };
        }
        let ask_peers = self.last_ask.is_none_or(|a| now >= a + t.peer_poll);
        if ask_peers {
            self.last_ask = Some(now);
        }
        if lease_age < t.fence_after && !self.quorum_lost {
            return Verdict::Doubt { ask_peers };
        }
        // A round is fresh if it ended within two polls (one in flight, one answered).
        let fresh = peers.filter(|r| now.saturating_duration_since(r.at) <= t.peer_poll * 2);
        let fence = |me: &mut Guard, reason: String| {
            me.fenced = Some(reason.clone());
            Verdict::Fence { reason }
        };
        let Some(round) = fresh else {
            return fence(
                self,
                format!(
                    "lease not renewed for {} s and no recent answer from the other nodes",
                    lease_age.as_secs()
                ),
            );
        };
        if round.answers.is_empty() {
            return fence(
                self,
                format!(
                    "lease not renewed for {} s and no other node to tell a quorum loss from a \
                     partition",
                    lease_age.as_secs()
                ),
            );
        }
        if let Some((peer, PeerAnswer::NoAnswer(why))) = round
            .answers
            .iter()
            .find(|(_, a)| matches!(a, PeerAnswer::NoAnswer(_)))
        {
            return fence(
                self,
                format!(
                    "lease not renewed for {} s and node {peer} does not answer ({why}): this \
                     node may be cut off from the cluster",
                    lease_age.as_secs()
                ),
            );
        }
        let member = round
            .answers
            .iter()
            .find(|(_, a)| *a == PeerAnswer::Member)
            .map(|(p, _)| p.clone());
        match member {
            None => {
                self.quorum_lost = true;
                self.peer_back_since = None;
                Verdict::QuorumLost { ask_peers }
            }
            Some(peer) if !self.quorum_lost => fence(
                self,
                format!(
                    "lease not renewed for {} s while node {peer} holds its own: this node is \
                     cut off from etcd",
                    lease_age.as_secs()
                ),
            ),
            Some(peer) => {
                let since = *self.peer_back_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= t.quorum_return_grace {
                    fence(
                        self,
                        format!(
                            "etcd is back for node {peer} but not for this node after {} s",
                            t.quorum_return_grace.as_secs()
                        ),
                    )
                } else {
                    Verdict::QuorumLost { ask_peers }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timings = Timings::DEFAULT;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn round(at: Instant, answers: &[(&str, PeerAnswer)]) -> PeerRound {
        PeerRound {
            at,
            answers: answers
                .iter()
                .map(|(p, a)| ((*p).to_owned(), a.clone()))
                .collect(),
        }
    }

    #[test]
    fn the_default_timings_keep_the_guarantee_and_the_failover_budget() {
        T.check().unwrap();
        assert!(T.worst_failover() <= Duration::from_secs(30), "{T:?}");
        assert_eq!(T.reset_by_after_renewal(), secs(17.0));
        assert!(T.restart_at_least_after_renewal() >= secs(20.6));
        assert_eq!(T.worst_failover(), secs(26.0));
    }

    #[test]
    fn timings_that_would_restart_a_guest_before_its_node_is_reset_are_refused() {
        let short = Timings {
            restart_after_loss: secs(3.0),
            ..T
        };
        let e = short.check().unwrap_err();
        assert!(e.contains("partition"), "{e}");
        let slow_dog = Timings {
            watchdog_timeout: secs(60.0),
            ..T
        };
        assert!(slow_dog.check().is_err());
        assert!(Guard::new(slow_dog).is_err());
        let late_fence = Timings {
            fence_after: secs(10.0),
            ..T
        };
        assert!(late_fence.check().unwrap_err().contains("fence before"));
        let grace = Timings {
            quorum_return_grace: secs(3.0),
            ..T
        };
        assert!(grace.check().unwrap_err().contains("quorum return"));
    }

    /// A simulated clock: the guard is stepped every tick with the lease's age.
    struct Sim {
        start: Instant,
        guard: Guard,
    }

    impl Sim {
        fn new() -> Self {
            Sim {
                start: Instant::now(),
                guard: Guard::new(T).unwrap(),
            }
        }
        fn at(&self, s: f64) -> Instant {
            self.start + secs(s)
        }
        /// Steps from `from` to `to` seconds (lease last renewed at 0), peers answering
        /// `answer(t)`; returns each verdict with its time.
        fn run(
            &mut self,
            from: f64,
            to: f64,
            ha: bool,
            answer: impl Fn(f64) -> Vec<(&'static str, PeerAnswer)>,
            renewed_at: impl Fn(f64) -> f64,
        ) -> Vec<(f64, Verdict)> {
            let mut out = Vec::new();
            let mut t = from;
            let mut last: Option<PeerRound> = None;
            while t <= to {
                let now = self.at(t);
                let v = self
                    .guard
                    .step(now, secs(t - renewed_at(t)), ha, last.as_ref());
                if let Verdict::Doubt { ask_peers: true } | Verdict::QuorumLost { .. } = v {
                    // The round's answers arrive half a second later.
                    last = Some(round(
                        self.at(t + 0.5),
                        &answer(t)
                            .iter()
                            .map(|(p, a)| (*p, a.clone()))
                            .collect::<Vec<_>>(),
                    ));
                }
                out.push((t, v));
                t += 0.5;
            }
            out
        }
    }

    fn first_fence(v: &[(f64, Verdict)]) -> Option<(f64, String)> {
        v.iter().find_map(|(t, v)| match v {
            Verdict::Fence { reason } => Some((*t, reason.clone())),
            _ => None,
        })
    }

    #[test]
    fn a_partitioned_node_fences_at_fence_after_when_a_peer_holds_its_lease() {
        let mut sim = Sim::new();
        let v = sim.run(
            0.0,
            12.0,
            true,
            |_| vec![("n2", PeerAnswer::Member)],
            |_| 0.0,
        );
        let (t, why) = first_fence(&v).expect("fenced");
        assert_eq!(t, 7.0, "{v:?}");
        assert!(why.contains("n2 holds its own"), "{why}");
        // Fed until then, asked its peers from the doubt on.
        assert!(v
            .iter()
            .take_while(|(t, _)| *t < 4.0)
            .all(|(_, v)| *v == Verdict::Feed));
        assert!(v.contains(&(4.0, Verdict::Doubt { ask_peers: true })));
        // Fencing is for good, even if the lease came back.
        let later = sim.guard.step(sim.at(13.0), secs(0.0), true, None);
        assert!(matches!(later, Verdict::Fence { .. }));
    }

    #[test]
    fn a_node_cut_off_from_everything_fences() {
        let mut sim = Sim::new();
        let v = sim.run(
            0.0,
            8.0,
            true,
            |_| vec![("n2", PeerAnswer::NoAnswer("timeout".into()))],
            |_| 0.0,
        );
        let (t, why) = first_fence(&v).unwrap();
        assert_eq!(t, 7.0);
        assert!(why.contains("does not answer"), "{why}");
        // And without any other node to ask.
        let mut sim = Sim::new();
        let v = sim.run(0.0, 8.0, true, |_| vec![], |_| 0.0);
        assert!(first_fence(&v).unwrap().1.contains("no other node"));
    }

    #[test]
    fn a_quorum_loss_fences_nobody_and_a_return_for_all_ends_it() {
        let mut sim = Sim::new();
        // etcd down for everyone from 0 to 30 s; back for all at 30 s (this node's lease renewed
        // at 30.5 s).
        let v = sim.run(
            0.0,
            40.0,
            true,
            |_| vec![("n2", PeerAnswer::Cut), ("n3", PeerAnswer::Cut)],
            |t| if t >= 30.5 { t - (t - 30.5) % 3.0 } else { 0.0 },
        );
        assert_eq!(first_fence(&v), None, "{v:?}");
        assert!(v
            .iter()
            .any(|(t, v)| *t == 7.0 && matches!(v, Verdict::QuorumLost { .. })));
        assert_eq!(v.last().unwrap().1, Verdict::Feed);
    }

    #[test]
    fn etcd_back_for_a_peer_but_not_for_this_node_fences_after_the_grace() {
        let mut sim = Sim::new();
        let v = sim.run(
            0.0,
            30.0,
            true,
            |t| {
                if t >= 20.0 {
                    vec![("n2", PeerAnswer::Member)]
                } else {
                    vec![("n2", PeerAnswer::Cut)]
                }
            },
            |_| 0.0,
        );
        let (t, why) = first_fence(&v).unwrap();
        // The answer asked at 20 s arrives at 20.5 s; the grace runs from the step that sees it.
        assert!((21.0..=22.0).contains(&t), "{t}: {v:?}");
        assert!(why.contains("back for node n2"), "{why}");
        // Within the bound check() relies on.
        assert!(secs(t - 20.0) + T.grant + T.watchdog_timeout <= T.reset_by_after_quorum_return());
    }

    #[test]
    fn one_silent_peer_in_a_quorum_loss_fences() {
        let mut sim = Sim::new();
        let v = sim.run(
            0.0,
            10.0,
            true,
            |_| {
                vec![
                    ("n2", PeerAnswer::Cut),
                    ("n3", PeerAnswer::NoAnswer("connection refused".into())),
                ]
            },
            |_| 0.0,
        );
        assert!(first_fence(&v).unwrap().1.contains("n3 does not answer"));
    }

    #[test]
    fn a_node_without_ha_guests_never_fences_and_a_stale_round_does_not_count() {
        let mut sim = Sim::new();
        let v = sim.run(0.0, 30.0, false, |_| vec![], |_| 0.0);
        assert_eq!(first_fence(&v), None);
        assert_eq!(v[8], (4.0, Verdict::Doubt { ask_peers: false }));
        // Answers older than two polls are no answers.
        let mut g = Guard::new(T).unwrap();
        let now = Instant::now();
        g.step(now, secs(4.0), true, None);
        let old = round(now, &[("n2", PeerAnswer::Cut)]);
        let v = g.step(now + secs(3.0), secs(7.0), true, Some(&old));
        assert!(matches!(v, Verdict::Fence { ref reason } if reason.contains("no recent")));
    }

    #[test]
    fn a_lease_renewed_again_in_time_clears_the_doubt() {
        let mut sim = Sim::new();
        let v = sim.run(
            0.0,
            10.0,
            true,
            |_| vec![("n2", PeerAnswer::Member)],
            |t| if t >= 5.0 { t - (t - 5.0) % 3.0 } else { 0.0 },
        );
        assert_eq!(first_fence(&v), None, "{v:?}");
        assert_eq!(v.last().unwrap().1, Verdict::Feed);
    }
}
