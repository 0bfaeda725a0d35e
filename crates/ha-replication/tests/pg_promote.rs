//! Promotion on real servers: a killed primary is replaced by a replica that then takes
//! writes, the other replica follows it; and each refusal path refuses with its reason
//! (not leader, old primary still reachable and unfenced, paused replay, a lagging replica),
//! while a SQL fence lets the promotion go ahead by stopping the old primary.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use ha_core::{AlwaysLeader, EventBus, FencingToken, HaEvent, Leadership, LeadershipGate, NodeId};
use ha_replication::Error;
use ha_replication::pg::{
    CommandFence, Ineligible, NoFence, PgMember, PgReplicationMonitor, PromoteConfig, Promoter,
    Refusal, RepointOutcome, SqlShutdownFence,
};
use ha_testkit::PostgresServer;

const WAIT: Duration = Duration::from_secs(30);

fn member(name: &str, server: &PostgresServer) -> PgMember {
    PgMember::new(name, &server.url())
        .unwrap()
        .query_timeout(Duration::from_secs(1))
}

fn promoter(fence: Arc<dyn ha_replication::pg::PrimaryFence>) -> Promoter {
    promoter_with(fence, PromoteConfig::default())
}

fn promoter_with(
    fence: Arc<dyn ha_replication::pg::PrimaryFence>,
    config: PromoteConfig,
) -> Promoter {
    Promoter::new(config, Arc::new(AlwaysLeader::new(FencingToken(42))), fence).unwrap()
}

/// A STONITH stand-in that succeeds: the old primary is already dead (SIGKILLed).
fn stonith() -> Arc<CommandFence> {
    Arc::new(CommandFence::new("true", Vec::<String>::new()))
}

async fn seeded() -> PostgresServer {
    let primary = PostgresServer::start().await.unwrap();
    primary
        .execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
        .await
        .unwrap();
    primary
        .execute("INSERT INTO t VALUES (1, 'before')")
        .await
        .unwrap();
    primary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_replaced_and_the_other_replica_follows() {
    let mut primary = seeded().await;
    let r1 = primary.start_replica().await.unwrap();
    let r2 = primary.start_replica().await.unwrap();
    let lsn = primary.current_wal_lsn().await.unwrap();
    r1.wait_for_replay(lsn, WAIT).await.unwrap();
    r2.wait_for_replay(lsn, WAIT).await.unwrap();
    let old = member("pg0", &primary);
    let candidates = vec![member("pg1", &r1), member("pg2", &r2)];
    let monitor =
        PgReplicationMonitor::new(old.clone(), candidates.clone(), Default::default()).unwrap();
    let last = monitor.sample().await.unwrap();

    primary.kill().unwrap();
    // A primary that does not answer is not thereby down: without a fence that can stop it
    // (STONITH), nothing is promoted.
    let err = promoter(Arc::new(SqlShutdownFence))
        .promote_best(&old, &candidates, Some(&last.primary))
        .await
        .unwrap_err();
    let Error::Refused(Refusal::PrimaryUnreachable { primary: name, .. }) = &err else {
        panic!("{err}");
    };
    assert_eq!(name, "pg0");
    assert!(r1.is_in_recovery().await.unwrap() && r2.is_in_recovery().await.unwrap());

    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let report = promoter(stonith())
        .with_bus(NodeId::new("leader"), bus.clone())
        .promote_best(&old, &candidates, Some(&last.primary))
        .await
        .unwrap();

    // Equally advanced: the tie goes to the first name.
    assert_eq!(report.promoted, "pg1");
    assert_eq!(report.token, Some(42));
    assert!(
        report.fenced,
        "the unreachable old primary was fenced by the command"
    );
    assert_eq!(report.needs_rewind, "pg0");
    assert_eq!(report.reference, last.primary.current_lsn);
    assert!(
        report.candidates.iter().all(|(_, v)| v.is_none()),
        "{report:?}"
    );
    let HaEvent::ReplicaPromoted { replica, token, .. } = events.try_recv().unwrap() else {
        panic!("expected ReplicaPromoted");
    };
    assert_eq!((replica.as_str(), token), ("pg1", Some(FencingToken(42))));

    // The new primary takes writes, and pg2 streams them from it.
    assert!(!r1.is_in_recovery().await.unwrap());
    r1.execute("INSERT INTO t VALUES (2, 'after')")
        .await
        .unwrap();
    assert_eq!(
        report.repointed,
        [("pg2".to_owned(), RepointOutcome::Streaming)]
    );
    let lsn = r1.current_wal_lsn().await.unwrap();
    r2.wait_for_replay(lsn, WAIT).await.unwrap();
    let rows: i64 = r2.query_scalar("SELECT count(*) FROM t").await.unwrap();
    assert_eq!(rows, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reachable_primary_blocks_promotion_unless_a_fence_stops_it() {
    let mut primary = seeded().await;
    let r1 = primary.start_replica().await.unwrap();
    let old = member("pg0", &primary);
    let candidates = [member("pg1", &r1)];

    let err = promoter(Arc::new(NoFence))
        .promote_best(&old, &candidates, None)
        .await
        .unwrap_err();
    let Error::Refused(Refusal::PrimaryReachable { primary: name, .. }) = &err else {
        panic!("{err}");
    };
    assert_eq!(name, "pg0");
    assert!(r1.is_in_recovery().await.unwrap(), "nothing was promoted");

    // Not the leader: refused before anything is touched.
    #[derive(Debug)]
    struct Follower;
    impl LeadershipGate for Follower {
        fn is_leader(&self) -> Option<Leadership> {
            None
        }
    }
    let err = Promoter::new(
        PromoteConfig::default(),
        Arc::new(Follower),
        Arc::new(SqlShutdownFence),
    )
    .unwrap()
    .promote_best(&old, &candidates, None)
    .await
    .unwrap_err();
    assert_eq!(err, Error::Refused(Refusal::NotLeader));
    assert!(primary.is_running(), "a follower never fences");

    // With a SQL fence, the old primary is shut down and the replica promoted.
    let report = promoter(Arc::new(SqlShutdownFence))
        .promote_best(&old, &candidates, None)
        .await
        .unwrap();
    assert!(report.fenced);
    assert_eq!(report.promoted, "pg1");
    let deadline = tokio::time::Instant::now() + WAIT;
    while primary.is_running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old primary still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r1.execute("INSERT INTO t VALUES (2, 'after')")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replay_and_a_lagging_replica_are_refused_with_their_reasons() {
    let mut primary = seeded().await;
    let paused = primary.start_replica().await.unwrap();
    let lagging = primary.start_replica().await.unwrap();
    let lsn = primary.current_wal_lsn().await.unwrap();
    paused.wait_for_replay(lsn, WAIT).await.unwrap();
    lagging.wait_for_replay(lsn, WAIT).await.unwrap();
    paused
        .execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    // Cut `lagging` off its primary, then write 3 MiB it will never receive.
    lagging
        .execute("ALTER SYSTEM SET primary_conninfo = ''")
        .await
        .unwrap();
    lagging.execute("SELECT pg_reload_conf()").await.unwrap();
    let old = member("pg0", &primary);
    let candidates = vec![member("paused", &paused), member("lagging", &lagging)];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let receiving: i64 = lagging
            .query_scalar("SELECT count(*) FROM pg_stat_wal_receiver")
            .await
            .unwrap();
        if receiving == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "receiver did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    primary
        .execute(
            "INSERT INTO t SELECT g, repeat(md5(g::text), 32) FROM generate_series(10, 3000) AS g",
        )
        .await
        .unwrap();
    let monitor =
        PgReplicationMonitor::new(old.clone(), candidates.clone(), Default::default()).unwrap();
    let last = monitor.sample().await.unwrap();
    primary.kill().unwrap();

    // The operator accepted the risk of an unreachable primary: the candidates decide.
    let assume_down = PromoteConfig {
        assume_unreachable_is_down: true,
        ..PromoteConfig::default()
    };
    let err = promoter_with(Arc::new(NoFence), assume_down)
        .promote_best(&old, &candidates, Some(&last.primary))
        .await
        .unwrap_err();
    let Error::Refused(Refusal::NoEligibleReplica { candidates: why }) = &err else {
        panic!("{err}");
    };
    assert_eq!(why[0], ("paused".to_owned(), Ineligible::ReplayPaused));
    assert!(
        matches!(&why[1], (name, Ineligible::LagTooHigh { bytes, max }) if name == "lagging" && bytes > max),
        "{why:?}"
    );
    assert!(err.to_string().contains("replay is paused"), "{err}");
    assert!(paused.is_in_recovery().await.unwrap());
    assert!(lagging.is_in_recovery().await.unwrap());
}
