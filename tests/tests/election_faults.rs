//! Real faults against real servers: three electors, each reaching the store through its own
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report
//! `FaultProxy`, on a real redis-server and on a real PostgreSQL. Invariants are checked
//! every few milliseconds throughout: never two valid leaders, tokens grow term to term.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ha_core::{Component, ComponentContext, FencingToken, LossReason};
use ha_election::{Elector, ElectorConfig, ElectorEvent, LeaseStore};
use ha_testkit::{FaultProxy, ProxyMode};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(200);
/// Scheduling slack on a loaded 2-core machine for liveness bounds (not a speed target).
const SLACK: Duration = Duration::from_millis(1000);

type Connect = Arc<
    dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = Arc<dyn LeaseStore>> + Send>> + Send + Sync,
>;

struct Cluster {
    proxies: Vec<FaultProxy>,
    electors: Vec<Option<Elector>>,
    connect: Connect,
    upstream: SocketAddr,
    last_token: Option<FencingToken>,
    last_leader: Option<(usize, FencingToken)>,
}

impl Cluster {
    async fn start(upstream: SocketAddr, connect: Connect, key: &str) -> Self {
        let mut cluster = Self {
            proxies: Vec::new(),
            electors: Vec::new(),
            connect,
            upstream,
            last_token: None,
            last_leader: None,
        };
        for i in 0..3 {
            cluster.add(key, i).await;
        }
        cluster
    }

    async fn add(&mut self, key: &str, i: usize) {
        let proxy = FaultProxy::start(self.upstream).unwrap();
        let store = (self.connect)(proxy.addr()).await;
        let elector = Elector::builder(store)
            .config(ElectorConfig::with_ttl(key, TTL, RETRY))
            .build()
            .unwrap();
        elector
            .start(ComponentContext::standalone(format!("n{i}")))
            .await
            .unwrap();
        self.proxies.push(proxy);
        self.electors.push(Some(elector));
    }

    /// Checks the invariants once; returns the current leader's index.
    fn check(&mut self) -> Option<usize> {
        let leaders: Vec<(usize, FencingToken)> = self
            .electors
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref()?.is_leader().map(|l| (i, l.token)))
            .collect();
        assert!(leaders.len() <= 1, "split brain: {leaders:?}");
        let current = leaders.first().copied();
        if let Some((i, token)) = current
            && self.last_leader != Some((i, token))
        {
            if let Some(last) = self.last_token {
                assert!(token > last, "new term token {token} not above {last}");
            }
            self.last_token = Some(token);
            self.last_leader = Some((i, token));
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
        self.until(TTL * 3, |l| l.is_some()).await;
        self.check().unwrap()
    }

    /// A crash as the store sees it: the node goes silent and never releases.
    async fn crash(&mut self, i: usize) {
        self.proxies[i].set_mode(ProxyMode::Blackhole);
        if let Some(e) = self.electors[i].take() {
            // Its shutdown release goes into the blackhole and times out.
            e.shutdown().await;
        }
    }
}

async fn crash_failover_within_ttl_plus_retry(upstream: SocketAddr, connect: Connect) {
    let mut c = Cluster::start(upstream, connect, "faults/crash").await;
    let old = c.leader().await;
    c.crash(old).await;
    // Shutdown of the crashed node took up to one request timeout; measure from the crash.
    let crashed_at = Instant::now();
    c.until(TTL + RETRY + SLACK, |l| l.is_some_and(|i| i != old))
        .await;
    let took = crashed_at.elapsed();
    assert!(took <= TTL + RETRY + SLACK, "{took:?}");
}

async fn partitioned_leader_steps_down_before_takeover(upstream: SocketAddr, connect: Connect) {
    let mut c = Cluster::start(upstream, connect, "faults/partition").await;
    let old = c.leader().await;
    let mut events = c.electors[old].as_ref().unwrap().events();
    c.proxies[old].set_mode(ProxyMode::Blackhole);
    let mut old_stopped = false;
    c.until(TTL * 2 + SLACK, |l| {
        old_stopped |= l != Some(old);
        l.is_some_and(|i| i != old)
    })
    .await;
    assert!(old_stopped);
    // The old leader said why it stopped: its deadline passed without a renewal.
    let reason = loop {
        match events.recv().await.unwrap() {
            ElectorEvent::Lost { reason, .. } => break reason,
            _ => continue,
        }
    };
    assert_eq!(reason, LossReason::Expired);
    // Healing the partition does not bring back two leaders.
    c.proxies[old].set_mode(ProxyMode::Pass);
    c.hold(TTL).await;
}

async fn graceful_handover_under_one_retry(upstream: SocketAddr, connect: Connect) {
    let mut c = Cluster::start(upstream, connect, "faults/graceful").await;
    let old = c.leader().await;
    let started = Instant::now();
    c.electors[old].take().unwrap().shutdown().await;
    c.until(TTL, |l| l.is_some()).await;
    let took = started.elapsed();
    assert!(
        took < RETRY,
        "graceful handover took {took:?}, retry interval is {RETRY:?}"
    );
}

/// After the store restarted (the caller restarts it between `Cluster::start` and this), a
/// new term starts with a token greater than every earlier one. The old term may survive
/// (PostgreSQL keeps its row) or vanish (Redis without persistence); its holder steps down so
/// that a new term must begin either way. The new term may go to any node — the old holder
/// too, once its lease is free — so the check is on the token, not the node.
async fn new_term_after_restart_has_a_greater_token(c: &mut Cluster, before: FencingToken) {
    if let Some(e) = c.check().and_then(|i| c.electors[i].as_ref()) {
        e.step_down().await;
    }
    let deadline = Instant::now() + TTL * 4 + SLACK;
    while c.last_token.is_none_or(|t| t <= before) {
        // A holder that lost its term during the outage may adopt its own unchanged record
        // once the store is back (the same term, same token): step that one down too, so the
        // check is on a new term's token.
        if let Some(i) = c.check()
            && c.last_token.is_some_and(|t| t <= before)
            && let Some(e) = c.electors[i].as_ref()
        {
            e.step_down().await;
        }
        assert!(
            Instant::now() < deadline,
            "no new term after the restart (last token {:?})",
            c.last_token
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

mod redis {
    use super::*;
    use ha_election::RedisLeaseStore;
    use ha_testkit::RedisServer;

    fn connect() -> Connect {
        Arc::new(|addr| {
            Box::pin(async move {
                Arc::new(
                    RedisLeaseStore::connect(&format!("redis://{addr}"))
                        .await
                        .unwrap(),
                ) as Arc<dyn LeaseStore>
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_failover() {
        let server = RedisServer::start().await.unwrap();
        crash_failover_within_ttl_plus_retry(server.addr(), connect()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partition() {
        let server = RedisServer::start().await.unwrap();
        partitioned_leader_steps_down_before_takeover(server.addr(), connect()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn graceful_handover() {
        let server = RedisServer::start().await.unwrap();
        graceful_handover_under_one_retry(server.addr(), connect()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_without_persistence_keeps_tokens_growing() {
        let mut server = RedisServer::start().await.unwrap();
        let mut c = Cluster::start(server.addr(), connect(), "faults/restart").await;
        c.leader().await;
        let before = c.last_token.unwrap();
        server.restart().await.unwrap(); // no persistence: every lease and counter is gone
        new_term_after_restart_has_a_greater_token(&mut c, before).await;
    }
}

mod postgres {
    use super::*;
    use ha_election::PostgresLeaseStore;
    use ha_testkit::PostgresServer;

    fn connect() -> Connect {
        Arc::new(|addr| {
            Box::pin(async move {
                Arc::new(
                    PostgresLeaseStore::connect(&format!("postgres://postgres@{addr}/postgres"))
                        .await
                        .unwrap(),
                ) as Arc<dyn LeaseStore>
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_failover() {
        let server = PostgresServer::start().await.unwrap();
        crash_failover_within_ttl_plus_retry(server.addr(), connect()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partition() {
        let server = PostgresServer::start().await.unwrap();
        partitioned_leader_steps_down_before_takeover(server.addr(), connect()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn graceful_handover() {
        let server = PostgresServer::start().await.unwrap();
        graceful_handover_under_one_retry(server.addr(), connect()).await;
    }

    /// The process-pause story on real PostgreSQL: the leader takes its token, stalls (cut
    /// off), is replaced, then its write arrives after the new leader's — and is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_leaders_fenced_write_is_rejected() {
        use ha_election::{Error, PgFence};
        use sqlx::{Connection, PgConnection};

        let server = PostgresServer::start().await.unwrap();
        let mut db = PgConnection::connect(&server.url()).await.unwrap();
        PgFence::new().migrate(&mut db).await.unwrap();
        sqlx::query("CREATE TABLE ledger (writer text NOT NULL)")
            .execute(&mut db)
            .await
            .unwrap();
        async fn fenced_write(
            db: &mut PgConnection,
            writer: &str,
            token: FencingToken,
        ) -> Result<(), Error> {
            let mut tx = db.begin().await.unwrap();
            PgFence::new().admit(&mut tx, "ledger", token).await?;
            sqlx::query("INSERT INTO ledger VALUES ($1)")
                .bind(writer)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            Ok(())
        }

        let mut c = Cluster::start(server.addr(), connect(), "faults/fence").await;
        let old = c.leader().await;
        let stale = c.electors[old].as_ref().unwrap().is_leader().unwrap().token;
        fenced_write(&mut db, "old", stale).await.unwrap();
        c.proxies[old].set_mode(ProxyMode::Blackhole); // the old leader stalls
        c.until(TTL * 2 + SLACK, |l| l.is_some_and(|i| i != old))
            .await;
        let leader = c.check().unwrap();
        let fresh = c.electors[leader]
            .as_ref()
            .unwrap()
            .is_leader()
            .unwrap()
            .token;
        fenced_write(&mut db, "new", fresh).await.unwrap();
        // The old leader's in-flight write lands now.
        let err = fenced_write(&mut db, "old-late", stale).await.unwrap_err();
        assert!(matches!(err, Error::StaleToken { .. }), "{err}");
        let writers: Vec<String> = sqlx::query_scalar("SELECT writer FROM ledger ORDER BY writer")
            .fetch_all(&mut db)
            .await
            .unwrap();
        assert_eq!(writers, ["new", "old"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_restart_keeps_tokens_growing() {
        let mut server = PostgresServer::start().await.unwrap();
        let mut c = Cluster::start(server.addr(), connect(), "faults/restart").await;
        c.leader().await;
        let before = c.last_token.unwrap();
        server.kill().unwrap(); // SIGKILL: crash recovery on restart
        server.restart().await.unwrap();
        new_term_after_restart_has_a_greater_token(&mut c, before).await;
    }
}
