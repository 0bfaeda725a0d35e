//! Real faults of a real 3-member etcd cluster while three electors run, each reaching every
//! member through proxies of its own (elector → its proxy → the member's proxy → the member).
//! Nobody steps a leader down by hand. An outside checker samples `is_leader()` of every
//! elector every 2 ms: never two valid leaders (by the electors' own deadlines), tokens grow
//! term to term, and no stretch without a leader lasts longer than `ttl + 2 × retry` (plus
//! scheduling slack, and the time the cluster itself was unavailable).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use ha_core::{Component, ComponentContext, FencingToken, LossReason};
use ha_election::testing::unique_key;
use ha_election::{Elector, ElectorConfig, ElectorEvent, EtcdLeaseStore, LeaseStore};
use ha_testkit::{EtcdCluster, FaultProxy, ProxyMode};
use std::sync::Arc;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(200);
/// Scheduling slack on a loaded 2-core machine for liveness bounds (not a speed target).
const SLACK: Duration = Duration::from_millis(1000);

struct Harness {
    etcd: EtcdCluster,
    /// `proxies[e][m]`: elector `e`'s way to member `m`.
    proxies: Vec<Vec<FaultProxy>>,
    electors: Vec<Elector>,
    last_token: Option<FencingToken>,
    last_leader: Option<(usize, FencingToken)>,
    leaderless_since: Option<Instant>,
    longest_gap: Duration,
}

impl Harness {
    async fn start() -> Self {
        let etcd = EtcdCluster::start().await.unwrap();
        let key = unique_key("etcd-faults");
        let mut proxies = Vec::new();
        let mut electors = Vec::new();
        for e in 0..3 {
            let mine: Vec<FaultProxy> = (0..3)
                .map(|m| FaultProxy::start(etcd.proxy(m).addr()).unwrap())
                .collect();
            let endpoints: Vec<String> = mine.iter().map(|p| p.addr().to_string()).collect();
            let store: Arc<dyn LeaseStore> =
                Arc::new(EtcdLeaseStore::connect(&endpoints).await.unwrap());
            let elector = Elector::builder(store)
                .config(ElectorConfig::with_ttl(key.clone(), TTL, RETRY))
                .build()
                .unwrap();
            elector
                .start(ComponentContext::standalone(format!("n{e}")))
                .await
                .unwrap();
            proxies.push(mine);
            electors.push(elector);
        }
        Self {
            etcd,
            proxies,
            electors,
            last_token: None,
            last_leader: None,
            leaderless_since: None,
            longest_gap: Duration::ZERO,
        }
    }

    /// Checks the invariants once; returns the current leader's index.
    fn check(&mut self) -> Option<usize> {
        let leaders: Vec<(usize, FencingToken)> = self
            .electors
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.is_leader().map(|l| (i, l.token)))
            .collect();
        assert!(leaders.len() <= 1, "split brain: {leaders:?}");
        let current = leaders.first().copied();
        match current {
            Some((i, token)) => {
                if let Some(since) = self.leaderless_since.take() {
                    self.longest_gap = self.longest_gap.max(since.elapsed());
                }
                if self.last_leader != Some((i, token)) {
                    if let Some(last) = self.last_token
                        && self.last_leader.is_none_or(|(_, t)| t != token)
                    {
                        assert!(token > last, "new term token {token} not above {last}");
                    }
                    self.last_token = Some(self.last_token.map_or(token, |t| t.max(token)));
                    self.last_leader = Some((i, token));
                }
            }
            None => {
                self.leaderless_since.get_or_insert_with(Instant::now);
            }
        }
        current.map(|(i, _)| i)
    }

    /// Polls every 2 ms until `done(leader)`, checking invariants; returns the time taken.
    async fn until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(Option<usize>) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let leader = self.check();
            if done(leader) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "not done within {limit:?} (leader {leader:?})"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Keeps checking the invariants for `span`.
    async fn hold(&mut self, span: Duration) {
        let until = Instant::now() + span;
        while Instant::now() < until {
            self.check();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn leader(&mut self) -> usize {
        self.until(TTL * 4, |l| l.is_some()).await;
        // Let the followers watch a few renewals.
        self.hold(TTL / 2).await;
        self.check().unwrap()
    }

    /// The longest stretch without a leader since the last reset.
    fn reset_gap(&mut self) {
        self.longest_gap = Duration::ZERO;
        if self.leaderless_since.is_some() {
            self.leaderless_since = Some(Instant::now());
        }
    }

    async fn shutdown(self) {
        for elector in &self.electors {
            elector.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_never_makes_two_leaders_and_leadership_recovers() {
    let mut h = Harness::start().await;
    h.leader().await;
    let member = h.etcd.wait_for_leader().await.unwrap();
    h.reset_gap();
    h.etcd.kill(member).unwrap();
    // The raft group elects another leader within about an election timeout; renewals land
    // on the survivors meanwhile or right after.
    h.hold(TTL * 3).await;
    h.until(TTL + RETRY * 2 + SLACK, |l| l.is_some()).await;
    assert!(
        h.longest_gap <= TTL + RETRY * 2 + SLACK,
        "{:?} without a leader",
        h.longest_gap
    );
    h.etcd.restart(member).await.unwrap();
    h.hold(TTL).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_stops_on_its_own_deadline_before_another_takes_over() {
    let mut h = Harness::start().await;
    let old = h.leader().await;
    let mut events = h.electors[old].events();
    let cut_at = Instant::now();
    for proxy in &h.proxies[old] {
        proxy.set_mode(ProxyMode::Blackhole);
    }
    h.until(TTL + RETRY * 2 + SLACK, |l| l.is_some_and(|i| i != old))
        .await;
    let took = cut_at.elapsed();
    assert!(took <= TTL + RETRY * 2 + SLACK, "{took:?}");
    // The old leader said why it stopped: its deadline passed without a renewal.
    let reason = loop {
        match events.recv().await.unwrap() {
            ElectorEvent::Lost { reason, .. } => break reason,
            _ => continue,
        }
    };
    assert_eq!(reason, LossReason::Expired);
    // Healing the partition does not bring back two leaders.
    for proxy in &h.proxies[old] {
        proxy.set_mode(ProxyMode::Pass);
    }
    h.hold(TTL).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_cut_off_from_every_client_does_not_end_leadership_for_long() {
    let mut h = Harness::start().await;
    h.leader().await;
    let member = h.etcd.wait_for_leader().await.unwrap();
    h.reset_gap();
    h.etcd.proxy(member).set_mode(ProxyMode::Blackhole);
    h.hold(TTL * 3).await;
    h.until(TTL + RETRY * 2 + SLACK, |l| l.is_some()).await;
    assert!(
        h.longest_gap <= TTL + RETRY * 2 + SLACK,
        "{:?} without a leader",
        h.longest_gap
    );
    h.etcd.proxy(member).set_mode(ProxyMode::Pass);
    h.hold(TTL).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_leader_never_makes_two_leaders() {
    let mut h = Harness::start().await;
    h.leader().await;
    let member = h.etcd.wait_for_leader().await.unwrap();
    h.reset_gap();
    h.etcd.pause(member).unwrap();
    h.hold(TTL * 3).await;
    h.until(TTL + RETRY * 2 + SLACK, |l| l.is_some()).await;
    h.etcd.resume(member).unwrap();
    // The thawed old raft leader steps down; its leases were reset to full by the new raft
    // leader, so nobody may act early.
    h.hold(TTL * 2).await;
    assert!(
        h.longest_gap <= TTL * 2 + RETRY * 2 + SLACK,
        "{:?} without a leader",
        h.longest_gap
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_whole_cluster_restarts_a_leader_returns_and_tokens_keep_growing() {
    let mut h = Harness::start().await;
    h.leader().await;
    let before = h.last_token.unwrap();
    h.etcd.restart_all().await.unwrap();
    let back_at = Instant::now();
    h.reset_gap();
    // Once the cluster is back, a leader (the same term adopted, or a new term with a greater
    // token, which the checker enforces) within ttl + 2 × retry of a follower's wait.
    h.until(TTL * 2 + RETRY * 2 + SLACK, |l| l.is_some()).await;
    let took = back_at.elapsed();
    h.hold(TTL).await;
    assert!(h.last_token.unwrap() >= before);
    assert!(took <= TTL * 2 + RETRY * 2 + SLACK, "{took:?}");
    h.shutdown().await;
}
