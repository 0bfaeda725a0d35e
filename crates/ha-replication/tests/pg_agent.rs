//! The PostgreSQL agent on real servers, with a leadership gate the test controls: a primary
//! whose agent stops being renewed takes no commit after its deadline (a writer outside keeps
//! trying); a replica whose agent gains leadership promotes itself once, with the token in
//! the event; a leading agent leaves its primary writable (and undoes its own read-only mode);
//! a replica with paused replay is not promoted. Nothing here helps the agent by hand.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_core::{
    Component, ComponentContext, EventBus, FencingToken, HaEvent, Leadership, LeadershipGate,
    NodeId, Status,
};
use ha_replication::pg::{
    AgentAction, DemoteMode, PgAgent, PgAgentConfig, PgMember, PgRole, Upstream,
};
use ha_testkit::PostgresServer;
use sqlx::Connection;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

/// A gate whose answer the test sets; like the elector, it answers only before the deadline.
#[derive(Debug, Default)]
struct TestGate(Mutex<Option<Leadership>>);

impl TestGate {
    fn lead(&self, token: u64, for_: Duration) -> Instant {
        let valid_until = Instant::now() + for_;
        *self.0.lock().unwrap() = Some(Leadership {
            token: FencingToken(token),
            valid_until,
        });
        valid_until
    }
}

impl LeadershipGate for TestGate {
    fn is_leader(&self) -> Option<Leadership> {
        (*self.0.lock().unwrap()).filter(|l| l.is_valid_at(Instant::now()))
    }
}

fn agent(name: &str, server: &PostgresServer, config: PgAgentConfig) -> PgAgent {
    let member = PgMember::new(name, &server.url())
        .unwrap()
        .query_timeout(Duration::from_secs(1));
    PgAgent::new(member, config).unwrap()
}

fn fast() -> PgAgentConfig {
    PgAgentConfig {
        loop_interval: Duration::from_millis(200),
        demote_margin: Duration::from_secs(1),
        demote_timeout: Duration::from_millis(500),
        ..PgAgentConfig::default()
    }
}

fn context(gate: &Arc<TestGate>, bus: &EventBus) -> ComponentContext {
    ComponentContext::new(NodeId::new("node-a"), bus.clone(), gate.clone())
}

async fn seeded() -> PostgresServer {
    let primary = PostgresServer::start().await.unwrap();
    primary
        .execute("CREATE TABLE w (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();
    primary
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Inserts in a loop on one long-lived session (reconnecting after an error, as a client
/// pool would), recording the time of every acknowledged commit.
struct Writer {
    acked: AtomicU64,
    last_ack: Mutex<Option<Instant>>,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

async fn write_loop(url: String, w: Arc<Writer>) {
    let mut conn: Option<sqlx::PgConnection> = None;
    while !w.stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            conn = sqlx::PgConnection::connect(&url).await.ok();
        }
        let Some(c) = conn.as_mut() else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let result = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("INSERT INTO w (note) VALUES ('x')").execute(c),
        )
        .await;
        match result {
            Ok(Ok(_)) => {
                let now = Instant::now();
                w.acked.fetch_add(1, Ordering::SeqCst);
                *w.last_ack.lock().unwrap() = Some(now);
            }
            Ok(Err(e)) => {
                w.errors.lock().unwrap().push(e.to_string());
                // A terminated session is dead; a read-only refusal leaves it usable, but a
                // fresh one is what a reconnecting client would get.
                conn = None;
            }
            Err(_) => conn = None,
        }
        // Pacing, so the writer does not starve the 2 cores it shares.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_agent_is_not_renewed_takes_no_commit_after_the_deadline() {
    let primary = seeded().await;
    let gate = Arc::new(TestGate::default());
    gate.lead(5, Duration::from_secs(600));
    let bus = EventBus::default();
    let agent = agent("pg0", &primary, fast());
    agent.start(context(&gate, &bus)).await.unwrap();
    until("the agent to see a led primary", || {
        let s = agent.agent_status();
        s.leader && s.role == Some(PgRole::Primary)
    })
    .await;
    assert_eq!(agent.status(), Status::Healthy);

    let writer = Arc::new(Writer {
        acked: AtomicU64::new(0),
        last_ack: Mutex::new(None),
        errors: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let task = tokio::spawn(write_loop(primary.url(), writer.clone()));
    until("writes to flow", || {
        writer.acked.load(Ordering::SeqCst) >= 20
    })
    .await;

    // The lease is not renewed any more: it ends in 3 s, and nobody tells the agent.
    let deadline = gate.lead(5, Duration::from_secs(3));
    until("the agent to demote", || agent.agent_status().demoted).await;
    // The writer keeps trying past the deadline.
    tokio::time::sleep_until(deadline + Duration::from_secs(1)).await;
    writer.stop.store(true, Ordering::SeqCst);
    task.await.unwrap();

    let last_ack = writer.last_ack.lock().unwrap().unwrap();
    let status = agent.agent_status();
    println!(
        "demotion: {:?}; last acknowledged commit {:?} before the deadline",
        status.last_action,
        deadline.saturating_duration_since(last_ack)
    );
    assert!(
        last_ack < deadline,
        "a commit was acknowledged {:?} after the deadline",
        last_ack - deadline
    );
    let Some(AgentAction::DemotedReadOnly {
        margin_ms: Some(margin),
        ..
    }) = status.last_action
    else {
        panic!("not demoted read-only: {status:?}");
    };
    assert!(margin > 0, "{status:?}");
    let errors = writer.errors.lock().unwrap().clone();
    assert!(
        errors.iter().any(|e| e.contains("read-only")),
        "the writer was never refused as read-only: {errors:?}"
    );
    // Still a primary (not stopped), refusing writes from a fresh session too.
    assert!(!primary.is_in_recovery().await.unwrap());
    let refused = primary
        .execute("INSERT INTO w (note) VALUES ('late')")
        .await;
    assert!(refused.is_err(), "a fresh session could still write");
    assert_eq!(agent.status(), Status::Healthy, "{status:?}");

    // Leading again: the agent removes its own read-only setting.
    gate.lead(6, Duration::from_secs(600));
    until("the agent to make the primary writable", || {
        agent.agent_status().last_action == Some(AgentAction::MadeWritable)
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while primary
        .execute("INSERT INTO w (note) VALUES ('leader again')")
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the primary stayed read-only");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_mode_stops_the_primary_before_the_deadline() {
    let primary = seeded().await;
    let gate = Arc::new(TestGate::default());
    let bus = EventBus::default();
    let config = PgAgentConfig {
        demote_mode: DemoteMode::Stop,
        ..fast()
    };
    let agent = agent("pg0", &primary, config);
    let deadline = gate.lead(3, Duration::from_secs(3));
    agent.start(context(&gate, &bus)).await.unwrap();
    until("the agent to stop its primary", || {
        matches!(
            agent.agent_status().last_action,
            Some(AgentAction::Stopped { .. })
        )
    })
    .await;
    let stopped_at = Instant::now();
    assert!(stopped_at < deadline, "stopped after the deadline");
    let deadline_down = Instant::now() + WAIT;
    while primary.execute("SELECT 1").await.is_ok() {
        assert!(
            Instant::now() < deadline_down,
            "PostgreSQL still answers after the stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "stopped {:?} before the deadline, down {:?} before it",
        deadline.saturating_duration_since(stopped_at),
        deadline.saturating_duration_since(Instant::now())
    );
    assert!(Instant::now() < deadline, "still answering at the deadline");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_agent_gains_leadership_promotes_itself_once() {
    let mut primary = seeded().await;
    primary
        .execute("INSERT INTO w (note) VALUES ('before')")
        .await
        .unwrap();
    let replica = primary.start_replica().await.unwrap();
    let lsn = primary.current_wal_lsn().await.unwrap();
    replica.wait_for_replay(lsn, WAIT).await.unwrap();

    let gate = Arc::new(TestGate::default());
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let ctx = context(&gate, &bus);
    let agent = agent("pg1", &replica, fast());
    agent.run_once(&ctx).await;
    let status = agent.agent_status();
    assert_eq!(status.role, Some(PgRole::Replica));
    assert!(!status.leader);
    assert_eq!(status.last_action, None, "not leading: nothing to do");
    // The primary's last position, as the node's monitor would tell it.
    agent.observe_primary_position(ha_replication::Lsn(lsn.0));

    // Another agent that believes the primary was 10 MiB further refuses: too far behind.
    let behind = self::agent("pg1", &replica, fast());
    behind.observe_primary_position(ha_replication::Lsn(lsn.0 + 10 * 1024 * 1024));
    gate.lead(8, Duration::from_secs(600));
    behind.run_once(&ctx).await;
    match behind.agent_status().last_action {
        Some(AgentAction::NotPromoted { reason }) => assert!(reason.contains("behind"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(replica.is_in_recovery().await.unwrap());
    assert!(events.try_recv().is_err());

    primary.kill().unwrap();
    gate.lead(9, Duration::from_secs(600));
    agent.run_once(&ctx).await;
    let status = agent.agent_status();
    assert_eq!(
        status.last_action,
        Some(AgentAction::Promoted { token: 9 }),
        "{status:?}"
    );
    assert!(!replica.is_in_recovery().await.unwrap());
    replica
        .execute("INSERT INTO w (note) VALUES ('after')")
        .await
        .unwrap();
    match events.try_recv().unwrap() {
        HaEvent::ReplicaPromoted {
            replica: name,
            token,
            node,
            ..
        } => {
            assert_eq!(name, "pg1");
            assert_eq!(token, Some(FencingToken(9)));
            assert_eq!(node.as_str(), "node-a");
        }
        other => panic!("unexpected {other:?}"),
    }

    // The next loop finds a led primary: no second promotion, no second event.
    agent.run_once(&ctx).await;
    assert_eq!(agent.agent_status().role, Some(PgRole::Primary));
    assert_eq!(agent.status(), Status::Healthy);
    assert!(events.try_recv().is_err(), "promoted twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquired_leadership_promotes_at_once_not_at_the_next_tick() {
    let mut primary = seeded().await;
    let replica = primary.start_replica().await.unwrap();
    let lsn = primary.current_wal_lsn().await.unwrap();
    replica.wait_for_replay(lsn, WAIT).await.unwrap();

    let gate = Arc::new(TestGate::default());
    let bus = EventBus::default();
    // A tick far longer than the test: only the acquisition can make it act in time.
    let agent = agent(
        "pg1",
        &replica,
        PgAgentConfig {
            loop_interval: Duration::from_secs(600),
            ..fast()
        },
    );
    agent.observe_primary_position(ha_replication::Lsn(lsn.0));
    agent.start(context(&gate, &bus)).await.unwrap();
    until("the first look", || {
        agent.agent_status().role == Some(PgRole::Replica)
    })
    .await;

    primary.kill().unwrap();
    gate.lead(3, Duration::from_secs(600));
    let acquired = Instant::now();
    bus.publish(HaEvent::LeadershipAcquired {
        at: std::time::SystemTime::now(),
        node: NodeId::new("node-a"),
        key: "pg".into(),
        token: FencingToken(3),
    });
    until("the promotion", || {
        agent.agent_status().last_action == Some(AgentAction::Promoted { token: 3 })
    })
    .await;
    assert!(
        acquired.elapsed() < Duration::from_secs(30),
        "promoted {:?} after the acquisition",
        acquired.elapsed()
    );
    assert!(!replica.is_in_recovery().await.unwrap());
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leading_agent_leaves_its_primary_writable() {
    let primary = seeded().await;
    let gate = Arc::new(TestGate::default());
    gate.lead(1, Duration::from_secs(600));
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let ctx = context(&gate, &bus);
    let agent = agent("pg0", &primary, fast());
    for _ in 0..2 {
        agent.run_once(&ctx).await;
        primary
            .execute("INSERT INTO w (note) VALUES ('led')")
            .await
            .unwrap();
    }
    let status = agent.agent_status();
    assert!(status.leader && !status.demoted, "{status:?}");
    assert_eq!(status.last_action, None, "nothing to do: {status:?}");
    assert_eq!(agent.status(), Status::Healthy);
    assert!(events.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_paused_replay_is_not_promoted() {
    let primary = seeded().await;
    let replica = primary.start_replica().await.unwrap();
    replica
        .execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let gate = Arc::new(TestGate::default());
    gate.lead(4, Duration::from_secs(600));
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let agent = agent("pg1", &replica, fast());
    agent.run_once(&context(&gate, &bus)).await;
    let status = agent.agent_status();
    match &status.last_action {
        Some(AgentAction::NotPromoted { reason }) => assert!(reason.contains("paused"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(replica.is_in_recovery().await.unwrap());
    assert!(events.try_recv().is_err());
    assert_eq!(
        agent.status(),
        Status::Degraded,
        "a leader over a replica is not settled"
    );
}

/// Re-pointing: after a failover, a replica whose agent does not lead streams from the new
/// leader's database (its conninfo keeps every keyword but host and port; confirmed by
/// `pg_stat_wal_receiver`), the new primary keeps its slot, and the old primary, demoted,
/// is reported as needing a rejoin instead of being re-pointed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_is_repointed_to_the_leader_and_a_former_primary_needs_a_rejoin() {
    let mut primary = seeded().await;
    let r1 = primary.start_replica().await.unwrap();
    let r2 = primary.start_replica().await.unwrap();
    let before: String = r2
        .query_scalar("SELECT current_setting('primary_conninfo')")
        .await
        .unwrap();
    let r1_at = Upstream {
        host: "127.0.0.1".into(),
        port: r1.port(),
    };
    let leader = {
        let r1_at = r1_at.clone();
        move || {
            let r1_at = r1_at.clone();
            async move { Some(r1_at) }
        }
    };
    let bus = EventBus::default();

    // The old primary's agent does not lead: it demotes its database, then, told where the
    // leader's database is, reports a rejoin and leaves it a (read-only) primary.
    let g0 = Arc::new(TestGate::default());
    let a0 = agent("pg0", &primary, fast()).follow(leader.clone());
    a0.run_once(&context(&g0, &bus)).await;
    let s0 = a0.agent_status();
    assert!(s0.demoted, "{s0:?}");
    assert!(
        matches!(&s0.last_action, Some(AgentAction::NeedsRejoin { leader }) if *leader == r1_at.to_string()),
        "{s0:?}"
    );
    assert!(s0.needs_rejoin.is_some());
    assert!(
        !a0.eligible(),
        "a former primary to rejoin must not campaign"
    );
    assert!(!primary.is_in_recovery().await.unwrap(), "not re-pointed");

    // Both replicas have everything; the old primary dies; r1's agent leads and promotes.
    let lsn = primary.current_wal_lsn().await.unwrap();
    r1.wait_for_replay(lsn, WAIT).await.unwrap();
    r2.wait_for_replay(lsn, WAIT).await.unwrap();
    primary.kill().unwrap();
    let slot = r2.slot_name().unwrap().to_owned();
    let g1 = Arc::new(TestGate::default());
    g1.lead(2, Duration::from_secs(600));
    let a1 = agent(
        "pg1",
        &r1,
        PgAgentConfig {
            replica_slots: vec![slot.clone()],
            ..fast()
        },
    );
    a1.run_once(&context(&g1, &bus)).await;
    assert_eq!(
        a1.agent_status().last_action,
        Some(AgentAction::Promoted { token: 2 })
    );
    a1.run_once(&context(&g1, &bus)).await;
    let has_slot: bool = r1
        .query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')"
        ))
        .await
        .unwrap();
    assert!(has_slot, "the led primary keeps its follower's slot");
    assert!(a1.is_writable_primary());

    // r2's agent, not leading, follows r1: streaming from it, confirmed by the receiver.
    let g2 = Arc::new(TestGate::default());
    let a2 = agent("pg2", &r2, fast()).follow(leader);
    assert!(!a2.eligible(), "nothing known before the first loop");
    a2.start(context(&g2, &bus)).await.unwrap();
    until("r2 to stream from r1", || {
        a2.agent_status().streaming_from.as_ref() == Some(&r1_at)
    })
    .await;
    let s2 = a2.agent_status();
    assert_eq!(s2.role, Some(PgRole::Replica));
    assert!(a2.eligible(), "{s2:?}");
    let after: String = r2
        .query_scalar("SELECT current_setting('primary_conninfo')")
        .await
        .unwrap();
    assert!(
        after.contains(&format!("port={}", r1.port()))
            || after.contains(&format!("port='{}'", r1.port())),
        "{after}"
    );
    // Every keyword but host and port is kept (user, passfile, sslmode, …).
    for pair in before.split_whitespace() {
        let key = pair.split('=').next().unwrap();
        if !matches!(key, "host" | "hostaddr" | "port") {
            assert!(
                after.contains(&format!("{key}=")),
                "{key} lost: {before} -> {after}"
            );
        }
    }
    // And it replays what the new primary commits.
    r1.execute("INSERT INTO w (note) VALUES ('on r1')")
        .await
        .unwrap();
    let lsn = r1.current_wal_lsn().await.unwrap();
    r2.wait_for_replay(lsn, WAIT).await.unwrap();
    let rows: i64 = r2
        .query_scalar("SELECT count(*) FROM w WHERE note = 'on r1'")
        .await
        .unwrap();
    assert_eq!(rows, 1);
    a2.stop().await.unwrap();
}

/// With the watchdog enabled but unable to start, the agent neither lifts its primary's
/// read-only mode while leading nor counts as eligible: no watchdog, no writable primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_running_watchdog_a_leading_agent_keeps_its_primary_read_only() {
    let primary = seeded().await;
    let mut config = fast();
    config.watchdog = ha_replication::pg::WatchdogConfig {
        enabled: true,
        program: vec!["/nonexistent/ha-pg-watchdog".into()],
        ..Default::default()
    };
    let agent = agent("db-a", &primary, config);
    let gate = Arc::new(TestGate::default());
    let bus = EventBus::new(16);
    let ctx = context(&gate, &bus);
    // Not leading: demoted to read-only.
    agent.run_once(&ctx).await;
    assert!(agent.agent_status().demoted);
    assert!(
        primary
            .execute("INSERT INTO w (note) VALUES ('x')")
            .await
            .is_err()
    );
    // Leading: the agent would make it writable, but no watchdog runs.
    gate.lead(7, Duration::from_secs(10));
    agent.run_once(&ctx).await;
    let status = agent.agent_status();
    assert!(
        status
            .watchdog
            .as_deref()
            .is_some_and(|w| w.starts_with("not running")),
        "{status:?}"
    );
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("watchdog")),
        "{status:?}"
    );
    assert!(!agent.eligible());
    assert!(!agent.is_writable_primary());
    assert!(
        primary
            .execute("INSERT INTO w (note) VALUES ('y')")
            .await
            .is_err(),
        "the primary became writable without a watchdog"
    );
}
