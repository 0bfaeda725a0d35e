//! The lag monitor against a real primary and streaming replica: figures match
//! `pg_stat_replication`, an idle primary gives no lag, paused replay under a write load makes
//! lag visible, and a SIGSTOPped replica breaches the bound and recovers when resumed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_core::{Component, ComponentContext, EventBus, HaEvent, NodeId, Status};
use ha_replication::pg::{LagConfig, Link, PgMember, PgReplicationMonitor, ReplicaLag};
use ha_testkit::PostgresServer;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

async fn cluster() -> (PostgresServer, PostgresServer) {
    let primary = PostgresServer::start().await.unwrap();
    let replica = primary.start_replica().await.unwrap();
    primary
        .execute("CREATE TABLE filler (id serial PRIMARY KEY, body text)")
        .await
        .unwrap();
    let lsn = primary.current_wal_lsn().await.unwrap();
    replica.wait_for_replay(lsn, WAIT).await.unwrap();
    (primary, replica)
}

fn monitor(
    primary: &PostgresServer,
    replica: &PostgresServer,
    config: LagConfig,
) -> PgReplicationMonitor {
    PgReplicationMonitor::new(
        PgMember::new("primary", &primary.url()).unwrap(),
        vec![
            PgMember::new("replica", &replica.url())
                .unwrap()
                .query_timeout(Duration::from_millis(500)),
        ],
        config,
    )
    .unwrap()
}

/// Samples until `pick` accepts the replica's figures, within `WAIT`.
async fn sample_until(
    m: &PgReplicationMonitor,
    mut pick: impl FnMut(&ReplicaLag) -> bool,
) -> ReplicaLag {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(sample) = m.sample().await
            && pick(&sample.replicas[0])
        {
            return sample.replicas[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "condition not met; last sample: {:?}",
            m.last_sample()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes about `mb` MiB of WAL on the primary.
async fn write_load(primary: &PostgresServer, mb: u32) {
    primary
        .execute(&format!(
            "INSERT INTO filler (body) SELECT repeat(md5(g::text), 32) FROM generate_series(1, {}) AS g",
            mb * 1024
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_match_pg_stat_replication_and_an_idle_primary_has_no_lag() {
    let (primary, replica) = cluster().await;
    let m = monitor(&primary, &replica, LagConfig::default());
    let lag = sample_until(&m, |r| r.lag_bytes == Some(0)).await;
    assert_eq!(lag.link, Link::Connected);
    assert_eq!(lag.lag, Some(Duration::ZERO));
    assert!(!lag.breached);
    let standby = lag.standby.unwrap();
    assert_eq!(
        standby.slot_name.as_deref(),
        replica.slot_name(),
        "matched by slot"
    );
    assert_eq!(standby.state, "streaming");
    let state: String = primary
        .query_scalar("SELECT state FROM pg_stat_replication")
        .await
        .unwrap();
    assert_eq!(standby.state, state);
    let replay: String = primary
        .query_scalar("SELECT replay_lsn::text FROM pg_stat_replication")
        .await
        .unwrap();
    assert_eq!(
        standby.replay_lsn.unwrap().to_string(),
        replay,
        "idle: the position does not move"
    );
    let own = lag.status.unwrap();
    assert!(own.in_recovery && !own.replay_paused);
    assert_eq!(own.receiver.unwrap().status, "streaming");
    let sample = m.last_sample().unwrap();
    assert_eq!(sample.primary.timeline, 1);
    assert_eq!(Some(sample.primary.current_lsn), standby.replay_lsn);

    // The last replayed commit keeps getting older while nothing is written; that is not lag.
    let lag = sample_until(&m, |r| {
        r.status
            .as_ref()
            .and_then(|s| s.last_replay_age)
            .is_some_and(|a| a > Duration::from_secs(2))
    })
    .await;
    assert_eq!(lag.lag, Some(Duration::ZERO));
    assert!(!lag.over_bound && !lag.breached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replay_under_a_write_load_makes_lag_visible() {
    let (primary, replica) = cluster().await;
    let m = monitor(&primary, &replica, LagConfig::default());
    replica
        .execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    write_load(&primary, 2).await;
    // Received but not replayed: the receive position moves ahead of the replay position.
    let lag = sample_until(&m, |r| {
        r.lag_bytes.is_some_and(|b| b > 1024 * 1024)
            && r.status
                .as_ref()
                .is_some_and(|s| s.receive_lsn > s.replay_lsn)
    })
    .await;
    assert!(lag.status.as_ref().unwrap().replay_paused);
    assert!(lag.lag.is_some_and(|t| t > Duration::ZERO), "{lag:?}");
    replica
        .execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    sample_until(&m, |r| r.lag_bytes == Some(0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_breaches_the_bound_and_recovers() {
    let (primary, replica) = cluster().await;
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let config = LagConfig {
        max_lag_bytes: 1024 * 1024,
        max_lag: Duration::from_secs(2),
        ..LagConfig::default()
    };
    // Started so that changes are published; the samples below are taken on demand besides
    // the monitor's own (one a minute), and each change is still published once.
    let m = monitor(
        &primary,
        &replica,
        LagConfig {
            interval: Duration::from_secs(60),
            ..config
        },
    );
    let ctx = ComponentContext::standalone(NodeId::new("n1")).with_bus(bus.clone());
    m.start(ctx).await.unwrap();
    sample_until(&m, |r| r.lag_bytes == Some(0)).await;
    assert_eq!(m.status(), Status::Healthy);

    replica.pause().unwrap();
    write_load(&primary, 3).await;
    let lag = sample_until(&m, |r| r.breached).await;
    replica.resume().unwrap();
    assert!(lag.error.is_some(), "a stopped replica does not answer");
    assert_eq!(
        lag.link,
        Link::ConnectedUnresponsive,
        "still found by its slot"
    );
    assert!(
        lag.lag_bytes.unwrap() > 1024 * 1024 || lag.lag.unwrap() > Duration::from_secs(2),
        "{lag:?}"
    );
    let HaEvent::ReplicationLagBreached { replica: name, .. } = events.try_recv().unwrap() else {
        panic!("expected a breach event");
    };
    assert_eq!(name, "replica");

    sample_until(&m, |r| !r.breached).await;
    let recovered = events.try_recv().unwrap();
    assert!(
        matches!(recovered, HaEvent::ReplicationLagRecovered { .. }),
        "{recovered:?}"
    );
    assert!(events.try_recv().is_err(), "one event per change");
    m.stop().await.unwrap();
    m.stop().await.unwrap();
}
