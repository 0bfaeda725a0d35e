//! The PostgreSQL agent inside a node: it follows the node's elector (never the paused gate),
//! `pause` suspends it (no demotion during maintenance), `resume` lets it demote again.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use ha_election::{ElectorConfig, MemoryLeaseStore};
use ha_orchestrator::HaNode;
use ha_replication::pg::{PgAgent, PgAgentConfig, PgMember};
use ha_testkit::PostgresServer;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

async fn until(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a fresh session can commit a write.
async fn writable(server: &PostgresServer) -> bool {
    server
        .execute("INSERT INTO w (note) VALUES ('probe')")
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_keeps_its_primary_until_resumed_then_demotes_it() {
    let primary = PostgresServer::start().await.unwrap();
    primary
        .execute("CREATE TABLE w (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();
    let store = Arc::new(MemoryLeaseStore::new());
    let timing = ElectorConfig::with_ttl("-", Duration::from_secs(2), Duration::from_millis(200));
    let member = PgMember::new("db-a", &primary.url())
        .unwrap()
        .query_timeout(Duration::from_secs(1));
    let config = PgAgentConfig {
        loop_interval: Duration::from_millis(200),
        demote_margin: Duration::from_millis(600),
        demote_timeout: Duration::from_millis(500),
        ..PgAgentConfig::default()
    };
    let a = HaNode::builder()
        .node_id("a")
        .election_with(store.clone(), timing.clone())
        .pg_agent(PgAgent::new(member, config).unwrap())
        .build()
        .unwrap();
    a.start().await.unwrap();
    until("a leads", async || a.is_leader().is_some()).await;
    // A second node, started once `a` leads, takes over when `a` steps down.
    let b = HaNode::builder()
        .node_id("b")
        .election_with(store, timing)
        .build()
        .unwrap();
    b.start().await.unwrap();
    // Before `a` led, its agent kept the primary read-only (a primary without the lease takes
    // no writes); leading, it lifts that.
    until("the leader's database takes writes", async || {
        writable(&primary).await
    })
    .await;

    a.pause();
    let status = a.status().await;
    assert_eq!(status.replication["agent"]["paused"], true);
    assert!(a.step_down().await.unwrap(), "a led");
    until("b leads", async || b.is_leader().is_some()).await;
    // Paused: the agent leaves the database as it is, for many loops past a's deadline.
    let later = Instant::now() + Duration::from_secs(3);
    while Instant::now() < later {
        assert!(
            writable(&primary).await,
            "a paused agent changed its database"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    a.resume();
    until("the resumed agent demotes its primary", async || {
        !writable(&primary).await
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}
