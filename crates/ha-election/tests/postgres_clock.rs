//! A real wall-clock step on the PostgreSQL server that holds the lease (libfaketime in the
//! postmaster, stepped while it runs), with two electors on it and nobody helping by hand.
//!
//! `expires_at` is written from the server's `now()`: a step forward makes every running
//! term look expired to the server, a step back makes it look an hour longer. Neither may
//! matter, because followers judge expiry on their own monotonic clocks and take a lease over
//! only by compare-and-set on the record they watched: a step forward must not end the
//! running term (never two valid leaders), and a step back must not delay the next failover
//! by the hour the server now adds (a new term within ttl + 2 × retry of the leader's cut-off).
//! The last case loses the lease row instead. A checker outside both electors samples `is_leader()` of each every couple of milliseconds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FaultyStore, Invariants};
use ha_core::{Component, ComponentContext, FencingToken};
use ha_election::testing::unique_key;
use ha_election::{Elector, ElectorConfig, LeaseStore, PostgresLeaseStore};
use ha_testkit::PostgresServer;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(100);
/// An NTP step far beyond any ttl.
const STEP_SECS: i64 = 3600;

struct Cluster {
    electors: Vec<Elector>,
    stores: Vec<Arc<FaultyStore>>,
    invariants: Invariants,
}

impl Cluster {
    async fn start(server: &PostgresServer) -> Self {
        let key = unique_key("pg-clock");
        let mut electors = Vec::new();
        let mut stores = Vec::new();
        for name in ["a", "b"] {
            let store = FaultyStore::new(Arc::new(
                PostgresLeaseStore::connect(&server.url())
                    .await
                    .expect("connect and migrate"),
            ));
            let elector = Elector::builder(Arc::clone(&store) as Arc<dyn LeaseStore>)
                .config(ElectorConfig::with_ttl(key.clone(), TTL, RETRY))
                .build()
                .expect("valid config");
            elector
                .start(ComponentContext::standalone(name))
                .await
                .expect("starts");
            electors.push(elector);
            stores.push(store);
        }
        Self {
            electors,
            stores,
            invariants: Invariants::default(),
        }
    }

    /// Checks the invariants every 2 ms for `period`; returns the last leader seen.
    async fn watch_for(&mut self, period: Duration) -> Option<(usize, FencingToken)> {
        let until = Instant::now() + period;
        while Instant::now() < until {
            self.check();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.leader()
    }

    /// Checks the invariants until `done` holds for the current leader, or fails at `within`.
    async fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(Option<(usize, FencingToken)>) -> bool,
    ) -> Option<(usize, FencingToken)> {
        let deadline = Instant::now() + within;
        loop {
            self.check();
            let leader = self.leader();
            if done(leader) {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not within {within:?} (terms so far: {:?})",
                self.invariants.terms()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn check(&mut self) {
        let electors: Vec<&Elector> = self.electors.iter().collect();
        self.invariants.check(&electors);
    }

    fn leader(&self) -> Option<(usize, FencingToken)> {
        self.electors
            .iter()
            .enumerate()
            .find_map(|(i, e)| e.is_leader().map(|l| (i, l.token)))
    }

    async fn shutdown(self) {
        for store in &self.stores {
            store.partition(false);
        }
        for elector in &self.electors {
            elector.shutdown().await;
        }
    }
}

async fn fake_clock_server() -> PostgresServer {
    PostgresServer::builder()
        .fake_clock()
        .start()
        .await
        .expect("start PostgreSQL under libfaketime")
}

/// The step itself is real: the server's `now()` moves by the step at once.
async fn server_offset_secs(server: &PostgresServer) -> i64 {
    let server_now: f64 = server
        .query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
        .await
        .expect("read the server's clock");
    let real_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    (server_now - real_now).round() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_step_forward_on_the_store_does_not_end_a_running_term() {
    let server = fake_clock_server().await;
    let mut cluster = Cluster::start(&server).await;
    let (first, first_token) = cluster
        .wait_for(TTL * 5, "a first leader", |l| l.is_some())
        .await
        .expect("a leader");
    // The follower watches a few renewals before the step.
    cluster.watch_for(TTL / 2).await;

    server.step_clock(STEP_SECS).expect("step the clock");
    assert_eq!(server_offset_secs(&server).await, STEP_SECS);

    // To the server every term has now been over for an hour. Three ttls later the same term
    // still runs and no second leader appeared at any sample.
    let leader = cluster.watch_for(TTL * 3).await;
    assert_eq!(
        cluster.invariants.terms(),
        &[(first, first_token)],
        "the step ended or interrupted the running term"
    );
    assert_eq!(leader, Some((first, first_token)));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_step_back_on_the_store_neither_ends_a_term_nor_delays_the_next_failover() {
    let server = fake_clock_server().await;
    let mut cluster = Cluster::start(&server).await;
    let (first, first_token) = cluster
        .wait_for(TTL * 5, "a first leader", |l| l.is_some())
        .await
        .expect("a leader");
    cluster.watch_for(TTL / 2).await;

    server.step_clock(-STEP_SECS).expect("step the clock");
    assert_eq!(server_offset_secs(&server).await, -STEP_SECS);
    // Renewals now write an expiry from a clock an hour behind; `expires_at` never moves
    // backwards, so the row says "an hour and a ttl left" and keeps saying so.
    let leader = cluster.watch_for(TTL * 2).await;
    assert_eq!(leader, Some((first, first_token)));

    // The leader is cut off from the store (its requests never answer). Its term ends at its
    // own deadline; the follower takes over a ttl after the record last changed, however
    // long the server thinks the lease still runs.
    cluster.stores[first].partition(true);
    let cut_at = Instant::now();
    let (second, second_token) = cluster
        .wait_for(TTL * 4, "a new term after the leader was cut off", |l| {
            l.is_some_and(|(_, token)| token != first_token)
        })
        .await
        .expect("a leader");
    let took = cut_at.elapsed();
    assert_ne!(second, first);
    assert!(
        second_token > first_token,
        "{second_token} after {first_token}"
    );
    // ttl + 2 × retry, plus scheduling slack on a loaded 2-core machine.
    assert!(
        took <= TTL + RETRY * 2 + Duration::from_millis(500),
        "failover took {took:?}: the server's clock, an hour behind, delayed it"
    );
    cluster.shutdown().await;
}

/// Data loss instead of a clock step: the lease row vanishes while a term runs (a restore
/// from a backup taken before the grant, a careless `DELETE`). The follower that saw the
/// record waits a full ttl from when it vanished; the next token is still greater.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_row_lost_by_the_store_is_not_granted_while_its_term_runs() {
    let server = PostgresServer::start().await.expect("start PostgreSQL");
    let mut cluster = Cluster::start(&server).await;
    let (_, first_token) = cluster
        .wait_for(TTL * 5, "a first leader", |l| l.is_some())
        .await
        .expect("a leader");
    cluster.watch_for(TTL / 2).await;

    let deleted = server
        .execute("DELETE FROM ha_leases")
        .await
        .expect("delete the lease row");
    assert_eq!(deleted, 1, "the lease row was not there to lose");
    let lost_at = Instant::now();
    let (_, second_token) = cluster
        .wait_for(TTL * 4, "a new term after the row was lost", |l| {
            l.is_some_and(|(_, token)| token != first_token)
        })
        .await
        .expect("a leader");
    let took = lost_at.elapsed();
    assert!(
        second_token > first_token,
        "{second_token} after {first_token}"
    );
    assert!(
        took >= TTL,
        "a new term {took:?} after the row vanished: sooner than a ttl"
    );
    cluster.shutdown().await;
}
