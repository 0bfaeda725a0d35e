//! The PostgreSQL agent inside a node: it follows the node's elector (never the paused gate),
//! `pause` suspends it (no demotion during maintenance), `resume` lets it demote again; a
//! member whose replica may not be promoted does not campaign, and `GET /primary`,
//! `GET /replica` and `GET /read-only` answer from the agents (load-balancer checks); members
//! publish their WAL positions and only the most advanced eligible replica campaigns; a
//! `nofailover` member never does.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use ha_election::{ElectorConfig, MemoryLeaseStore};
use ha_orchestrator::HaNode;
use ha_replication::pg::{PgAgent, PgAgentConfig, PgMember, RejoinConfig, SyncMode};
use ha_testkit::PostgresServer;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(60);

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

fn agent_for(name: &str, server: &PostgresServer) -> PgAgent {
    let member = PgMember::new(name, &server.url())
        .unwrap()
        .query_timeout(Duration::from_secs(1));
    let config = PgAgentConfig {
        loop_interval: Duration::from_millis(200),
        demote_margin: Duration::from_millis(600),
        demote_timeout: Duration::from_millis(500),
        ..PgAgentConfig::default()
    };
    PgAgent::new(member, config).unwrap()
}

/// A node of a test cluster on `store` (ttl 2 s, retry 200 ms), with its HTTP API on a free
/// port, the admin token, and `agent` beside its database.
fn cluster_node(store: &Arc<MemoryLeaseStore>, id: &str, agent: PgAgent) -> HaNode {
    let timing = ElectorConfig::with_ttl("-", Duration::from_secs(2), Duration::from_millis(200));
    HaNode::builder()
        .node_id(id)
        .election_with(store.clone(), timing)
        .http("127.0.0.1:0".parse().unwrap())
        .admin_token(common::TOKEN)
        .pg_agent(agent)
        .build()
        .unwrap()
}

/// A primary that `pg_rewind` can rewind from (hint bits in the WAL, WAL kept), with the
/// checker's table, and two streaming replicas.
async fn rewindable_cluster() -> (PostgresServer, PostgresServer, PostgresServer) {
    let primary = PostgresServer::builder()
        .setting("wal_log_hints", "on")
        .setting("wal_keep_size", "256MB")
        .start()
        .await
        .unwrap();
    primary
        .execute("CREATE TABLE w (id bigint PRIMARY KEY, note text)")
        .await
        .unwrap();
    let one = primary.start_replica().await.unwrap();
    let two = primary.start_replica().await.unwrap();
    (primary, one, two)
}

async fn get(node: &HaNode, path: &str) -> (StatusCode, Value) {
    let url = format!("http://{}{path}", node.http_addr().unwrap());
    let response = common::client().get(url).send().await.unwrap();
    let code = response.status();
    (
        code,
        serde_json::from_str(&response.text().await.unwrap()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_eligible_member_leads_and_the_load_balancer_checks_follow_the_agents() {
    let mut primary = PostgresServer::start().await.unwrap();
    primary
        .execute("CREATE TABLE w (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();
    let replica = primary.start_replica().await.unwrap();
    replica
        .execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let store = Arc::new(MemoryLeaseStore::new());
    let node = |id: &str, agent: PgAgent| cluster_node(&store, id, agent);
    // b first, alone, over a replica whose replay is paused: it must not campaign.
    let b = node("b", agent_for("db-b", &replica));
    b.start().await.unwrap();
    until("b's agent to judge its replica", async || {
        let (_, body) = get(&b, "/status").await;
        body["replication"]["agent"]["report"]["ineligible"]
            .as_str()
            .is_some_and(|r| r.contains("paused"))
    })
    .await;
    let window = Instant::now() + Duration::from_secs(2);
    while Instant::now() < window {
        assert!(
            b.is_leader().is_none(),
            "an ineligible member took the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(replica.is_in_recovery().await.unwrap());
    let (code, body) = get(&b, "/primary").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Replay paused, the WAL receiver still streams: a replica for reads.
    until("b to serve /replica", async || {
        get(&b, "/replica").await.0 == StatusCode::OK
    })
    .await;
    let (_, body) = get(&b, "/replica").await;
    assert_eq!(
        body["streaming_from"],
        format!("127.0.0.1:{}", primary.port())
    );

    // a, over the primary, leads; /primary answers there only.
    let a = node("a", agent_for("db-a", &primary));
    a.start().await.unwrap();
    until("a to serve /primary", async || {
        get(&a, "/primary").await.0 == StatusCode::OK
    })
    .await;
    assert!(a.is_leader().is_some());
    let (code, body) = get(&a, "/replica").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reason"], "database is a primary");
    let (code, body) = get(&b, "/primary").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reason"], "this node does not lead");
    // Reads: the led primary and the streaming replica both serve them.
    assert_eq!(get(&a, "/read-only").await.0, StatusCode::OK);
    assert_eq!(get(&b, "/read-only").await.0, StatusCode::OK);
    // a publishes where its database is.
    let members = a.elector().unwrap().members().await.unwrap();
    let meta = &members
        .iter()
        .find(|m| m.node.as_str() == "a")
        .unwrap()
        .meta;
    assert_eq!(
        meta.get(ha_orchestrator::PG_CONNINFO_META)
            .map(String::as_str),
        Some(format!("host='127.0.0.1' port={}", primary.port()).as_str())
    );

    // The primary dies: a's member is not eligible any more and gives the lease up; b, its
    // replay resumed, is eligible, leads and promotes its replica.
    replica
        .execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    primary.kill().unwrap();
    until("b to serve /primary", async || {
        get(&b, "/primary").await.0 == StatusCode::OK
    })
    .await;
    assert!(a.is_leader().is_none());
    assert!(!replica.is_in_recovery().await.unwrap());
    replica
        .execute("INSERT INTO w (note) VALUES ('after')")
        .await
        .unwrap();
    let (code, _) = get(&a, "/primary").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    let (code, body) = get(&a, "/read-only").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Two replicas at different replayed positions (one delays replay by an hour, as a delayed
/// standby does: eligible on its own, within the lag bound, but behind): the behind one
/// defers while the other is more advanced, and when the primary dies only the more advanced
/// one leads and is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_most_advanced_replica_campaigns_and_is_promoted() {
    let mut primary = PostgresServer::start().await.unwrap();
    primary
        .execute("CREATE TABLE w (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();
    let ahead = primary.start_replica().await.unwrap();
    let behind = primary.start_replica().await.unwrap();
    behind
        .execute("ALTER SYSTEM SET recovery_min_apply_delay = '1h'")
        .await
        .unwrap();
    behind.execute("SELECT pg_reload_conf()").await.unwrap();
    let store = Arc::new(MemoryLeaseStore::new());
    let node = |id: &str, agent: PgAgent| cluster_node(&store, id, agent);
    let a = node("a", agent_for("db-a", &primary));
    a.start().await.unwrap();
    until("a to serve /primary", async || {
        get(&a, "/primary").await.0 == StatusCode::OK
    })
    .await;
    // "c" sorts after "b": the tie-break alone would favour b, so c is the delayed one only
    // to show positions decide; the writes below put b ahead anyway.
    let b = node("b", agent_for("db-b", &ahead));
    let c = node("c", agent_for("db-c", &behind));
    b.start().await.unwrap();
    c.start().await.unwrap();
    for i in 0..20 {
        primary
            .execute(&format!("INSERT INTO w (note) VALUES ('row {i}')"))
            .await
            .unwrap();
    }
    let end = primary.current_wal_lsn().await.unwrap();
    ahead
        .wait_for_replay(end, Duration::from_secs(10))
        .await
        .unwrap();
    until("c to defer to b on published positions", async || {
        let (_, body) = get(&c, "/status").await;
        let report = &body["replication"]["agent"]["report"];
        report["ineligible"]
            .as_str()
            .is_some_and(|r| r.starts_with("deferring") && r.contains("b replayed"))
    })
    .await;
    // Each member publishes its report.
    let members = a.elector().unwrap().members().await.unwrap();
    let meta = |id: &str| {
        members
            .iter()
            .find(|m| m.node.as_str() == id)
            .unwrap()
            .meta
            .clone()
    };
    assert_eq!(
        meta("a").get("pg_role").map(String::as_str),
        Some("primary")
    );
    assert!(meta("a").contains_key("pg_wal_lsn"));
    assert_eq!(
        meta("b").get("pg_role").map(String::as_str),
        Some("replica")
    );
    assert_eq!(meta("b").get("pg_timeline").map(String::as_str), Some("1"));
    assert!(meta("c").contains_key("pg_replayed_lsn"));

    // The primary dies; a gives the lease up. Only b may lead; c never does.
    primary.kill().unwrap();
    let deadline = Instant::now() + WAIT;
    while get(&b, "/primary").await.0 != StatusCode::OK {
        assert!(c.is_leader().is_none(), "the behind replica took the lease");
        assert!(Instant::now() < deadline, "b was not promoted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!ahead.is_in_recovery().await.unwrap());
    assert!(behind.is_in_recovery().await.unwrap());
    let rows: i64 = ahead.query_scalar("SELECT count(*) FROM w").await.unwrap();
    assert_eq!(rows, 20, "the promoted replica has every acknowledged row");
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

/// A replica tagged `nofailover` publishes the tag, never campaigns and is never promoted,
/// even when it is the only member left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nofailover_replica_never_leads() {
    let mut primary = PostgresServer::start().await.unwrap();
    let replica = primary.start_replica().await.unwrap();
    let store = Arc::new(MemoryLeaseStore::new());
    let node = |id: &str, agent: PgAgent| cluster_node(&store, id, agent);
    let a = node("a", agent_for("db-a", &primary));
    a.start().await.unwrap();
    until("a to serve /primary", async || {
        get(&a, "/primary").await.0 == StatusCode::OK
    })
    .await;
    let member = PgMember::new("db-b", &replica.url())
        .unwrap()
        .query_timeout(Duration::from_secs(1));
    let config = PgAgentConfig {
        loop_interval: Duration::from_millis(200),
        demote_margin: Duration::from_millis(600),
        demote_timeout: Duration::from_millis(500),
        nofailover: true,
        ..PgAgentConfig::default()
    };
    let b = node("b", PgAgent::new(member, config).unwrap());
    b.start().await.unwrap();
    until("b to publish its tag", async || {
        let members = a.elector().unwrap().members().await.unwrap();
        members.iter().any(|m| {
            m.node.as_str() == "b"
                && m.meta.get("pg_nofailover").map(String::as_str) == Some("true")
        })
    })
    .await;

    primary.kill().unwrap();
    until("a to give the lease up", async || a.is_leader().is_none()).await;
    // Two lease lifetimes: an eligible member would have taken over within one.
    let window = Instant::now() + Duration::from_secs(4);
    while Instant::now() < window {
        assert!(
            b.is_leader().is_none(),
            "a nofailover member took the lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replica.is_in_recovery().await.unwrap());
    let (_, body) = get(&b, "/status").await;
    assert_eq!(
        body["replication"]["agent"]["report"]["ineligible"],
        "tagged nofailover"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// One acknowledged commit: which database took it, and when.
#[derive(Clone, Copy, Debug)]
struct Ack {
    n: i64,
    on_b: bool,
    at: Instant,
}

/// Tries to commit one row on each of the two databases in turn, over long-lived sessions,
/// recording every acknowledged commit: both are asked all the time, so a database that takes
/// writes when it should not is seen doing so.
async fn write_both(
    a: String,
    b: String,
    after: i64,
    acks: Arc<std::sync::Mutex<Vec<Ack>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use sqlx::Connection;
    let urls = [a, b];
    let mut conns: [Option<sqlx::PgConnection>; 2] = [None, None];
    // Row ids go on past `after` (a second writer on the same table).
    let mut n = after + 1_000_000;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        for (i, url) in urls.iter().enumerate() {
            n += 1;
            if conns[i].is_none() {
                conns[i] = tokio::time::timeout(
                    Duration::from_millis(300),
                    sqlx::PgConnection::connect(url),
                )
                .await
                .ok()
                .and_then(Result::ok);
            }
            let Some(conn) = conns[i].as_mut() else {
                continue;
            };
            let insert = sqlx::query("INSERT INTO w (id, note) VALUES ($1, 'load')")
                .bind(n)
                .execute(&mut *conn);
            match tokio::time::timeout(Duration::from_millis(500), insert).await {
                Ok(Ok(_)) => {
                    acks.lock().unwrap().push(Ack {
                        n,
                        on_b: i == 1,
                        at: Instant::now(),
                    });
                }
                Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("25006") => {}
                _ => conns[i] = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// [`write_both`] running in the background.
struct Writer {
    acks: Arc<std::sync::Mutex<Vec<Ack>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Writes to `a` and `b` with row ids past `after` (0, or the last id of an earlier
    /// writer on the same table).
    fn start(a: String, b: String, after: i64) -> Self {
        let acks: Arc<std::sync::Mutex<Vec<Ack>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(write_both(
            a,
            b,
            after,
            Arc::clone(&acks),
            Arc::clone(&stop),
        ));
        Self { acks, stop, task }
    }

    /// Commits acknowledged so far.
    fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Commits acknowledged so far by `b`.
    fn acked_by_b(&self) -> usize {
        self.acks.lock().unwrap().iter().filter(|a| a.on_b).count()
    }

    /// Stops writing and returns every acknowledged commit.
    async fn stop(self) -> Vec<Ack> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap();
        self.acks.lock().unwrap().clone()
    }
}

/// The checker's verdict once the writes stopped (`on_b`: taken by the new primary `new`):
/// no commit acknowledged by the old primary after the new one took its first, and every
/// acknowledged commit present on `new`.
async fn judge(acks: &[Ack], new: &PostgresServer) {
    if let Some(first_on_new) = acks.iter().find(|a| a.on_b).map(|a| a.at) {
        let late: Vec<&Ack> = acks
            .iter()
            .filter(|a| !a.on_b && a.at > first_on_new)
            .collect();
        assert!(
            late.is_empty(),
            "the old primary took commits after the new one: {late:?}"
        );
    }
    let present: std::collections::BTreeSet<i64> = new
        .query_scalar::<Vec<i64>>("SELECT coalesce(array_agg(id), '{}') FROM w")
        .await
        .unwrap()
        .into_iter()
        .collect();
    let lost: Vec<i64> = acks
        .iter()
        .map(|a| a.n)
        .filter(|n| !present.contains(n))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged commits lost: {lost:?}",
        lost.len(),
        acks.len()
    );
}

/// A switchover under a write load: the old primary's agent demotes it *before* the node
/// gives its lease up, so no commit is acknowledged by the old primary once the new one took
/// its first, and — the old primary still streaming its last WAL to the replica before the
/// promotion — no acknowledged commit is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_under_load_demotes_first_and_loses_no_acknowledged_commit() {
    let primary = PostgresServer::start().await.unwrap();
    primary
        .execute("CREATE TABLE w (id bigint PRIMARY KEY, note text)")
        .await
        .unwrap();
    let replica = primary.start_replica().await.unwrap();
    let store = Arc::new(MemoryLeaseStore::new());
    let node = |id: &str, agent: PgAgent| cluster_node(&store, id, agent);
    let a = node("a", agent_for("db-a", &primary));
    a.start().await.unwrap();
    until("a to serve /primary", async || {
        get(&a, "/primary").await.0 == StatusCode::OK
    })
    .await;
    let b = node("b", agent_for("db-b", &replica));
    b.start().await.unwrap();
    until("b to serve /replica", async || {
        get(&b, "/replica").await.0 == StatusCode::OK
    })
    .await;

    let writer = Writer::start(primary.url(), replica.url(), 0);
    until("writes on a's primary", async || writer.acked() >= 20).await;

    let response = common::client()
        .post(format!("http://{}/switchover", a.http_addr().unwrap()))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    until("a commit on b's database", async || writer.acked_by_b() > 0).await;
    until("more commits on b's database", async || {
        writer.acked_by_b() >= 20
    })
    .await;
    let acks = writer.stop().await;
    judge(&acks, &replica).await;
    assert!(b.is_leader().is_some());
    a.shutdown().await;
    b.shutdown().await;
}

/// The rewindable cluster in synchronous mode with a node on each database: `a` (on the
/// primary) started and serving `/primary`; `b` (on the first replica) and `c` (on the
/// second), whose agents rewind, built but not started.
async fn sync_cluster() -> (
    (PostgresServer, PostgresServer, PostgresServer),
    [HaNode; 3],
) {
    let (primary, one, two) = rewindable_cluster().await;
    let store = Arc::new(MemoryLeaseStore::new());
    let slots = [one.slot_name().unwrap(), two.slot_name().unwrap()];
    let a = cluster_node(&store, "a", sync_agent("db-a", &primary, false, &slots));
    a.start().await.unwrap();
    until("a to serve /primary", async || {
        get(&a, "/primary").await.0 == StatusCode::OK
    })
    .await;
    let b = cluster_node(&store, "b", sync_agent("db-b", &one, true, &[slots[1]]));
    let c = cluster_node(&store, "c", sync_agent("db-c", &two, true, &[slots[0]]));
    ((primary, one, two), [a, b, c])
}

/// An agent in synchronous mode; a replica's agent (`rejoin`) also rewinds its database when
/// it diverged.
fn sync_agent(name: &str, server: &PostgresServer, rejoin: bool, slots: &[&str]) -> PgAgent {
    let member = PgMember::new(name, &server.url())
        .unwrap()
        .query_timeout(Duration::from_secs(1));
    let rejoin = RejoinConfig {
        enabled: rejoin,
        data_dir: Some(server.data_dir().to_owned()),
        bin_dir: server.bin_dir().to_owned(),
        start_command: server.start_command(),
        run_as: ha_testkit::postgres::server_user().unwrap(),
        retry_interval: Duration::from_secs(1),
        standby_stuck_after: Duration::from_secs(3),
        // A primary whose database dies fails over at once (no restart in place).
        primary_start_timeout: Duration::ZERO,
        ..RejoinConfig::default()
    };
    let config = PgAgentConfig {
        rejoin,
        // Leading, it keeps the slot each other member streams through.
        replica_slots: slots.iter().map(|s| (*s).to_owned()).collect(),
        loop_interval: Duration::from_millis(200),
        demote_margin: Duration::from_millis(600),
        demote_timeout: Duration::from_millis(500),
        synchronous_mode: SyncMode::On,
        // The synchronous standby below delays its replay: its lag is judged on replay.
        max_lag_on_failover: 256 << 20,
        ..PgAgentConfig::default()
    };
    PgAgent::new(member, config).unwrap()
}

/// The agent's published sync record, from `/status`.
async fn sync_record(node: &HaNode) -> String {
    let (_, body) = get(node, "/status").await;
    body["replication"]["agent"]["report"]["sync_record"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Synchronous mode. The leader's agent makes one replica its synchronous standby (recorded
/// in the store before the primary relies on it) and the other stays asynchronous. The
/// synchronous standby then delays its replay by an hour, so the asynchronous one has
/// *replayed* more and the candidate rule alone would pick it. The primary's database is
/// SIGKILLed under a write load: only the synchronous standby may lead and be promoted, and
/// it holds every commit the old primary acknowledged; alone, it then commits (mode `on`).
/// The asynchronous replica follows the new primary (its agent rewinds it if it received WAL
/// past the promotion point), and the new primary makes it its synchronous standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_synchronous_mode_only_the_synchronous_standby_is_promoted_and_no_commit_is_lost() {
    let ((mut primary, one, two), [a, b, c]) = sync_cluster().await;
    b.start().await.unwrap();
    c.start().await.unwrap();
    until("a synchronous standby, recorded", async || {
        let record = sync_record(&a).await;
        record.contains("standbys [b]") || record.contains("standbys [c]")
    })
    .await;
    let record = sync_record(&a).await;
    let (sync_node, sync_db, async_node, async_db) = if record.contains("standbys [b]") {
        (&b, &one, &c, &two)
    } else {
        (&c, &two, &b, &one)
    };
    let sync_name = if record.contains("standbys [b]") {
        "b"
    } else {
        "c"
    };
    let setting: String = primary
        .query_scalar("SELECT current_setting('synchronous_standby_names')")
        .await
        .unwrap();
    assert_eq!(setting, format!("FIRST 1 (\"{sync_name}\")"));
    // Both replicas name themselves to the primary; only one is synchronous.
    let sync_states: Vec<String> = primary
        .query_scalar(
            "SELECT array_agg(application_name || '=' || sync_state ORDER BY application_name) \
             FROM pg_stat_replication",
        )
        .await
        .unwrap();
    assert_eq!(sync_states.len(), 2, "{sync_states:?}");
    assert!(
        sync_states.contains(&format!("{sync_name}=sync")),
        "{sync_states:?}"
    );

    // The synchronous standby says so in its report (`hactl list` shows it).
    until("the synchronous standby to publish its role", async || {
        let members = a.elector().unwrap().members().await.unwrap();
        let flag = |id: &str| {
            members
                .iter()
                .find(|m| m.node.as_str() == id)
                .and_then(|m| m.meta.get("pg_sync_standby").cloned())
        };
        let other = if sync_name == "b" { "c" } else { "b" };
        flag(sync_name).as_deref() == Some("true") && flag(other).is_none()
    })
    .await;
    sync_db
        .execute("ALTER SYSTEM SET recovery_min_apply_delay = '1h'")
        .await
        .unwrap();
    sync_db.execute("SELECT pg_reload_conf()").await.unwrap();
    let writer = Writer::start(primary.url(), sync_db.url(), 0);
    until("writes on a's primary", async || writer.acked() >= 200).await;
    // The asynchronous replica has replayed more than the delayed synchronous one.
    let replayed = |db: &PostgresServer| {
        let db = db.url();
        async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&db).await.unwrap();
            let lsn: String = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn()::text")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            lsn.parse::<ha_replication::Lsn>().unwrap()
        }
    };
    until(
        "the asynchronous replica to replay past the synchronous one",
        async || replayed(async_db).await > replayed(sync_db).await,
    )
    .await;

    primary.kill().unwrap();
    let deadline = Instant::now() + WAIT;
    while get(sync_node, "/primary").await.0 != StatusCode::OK {
        assert!(
            async_node.is_leader().is_none(),
            "the asynchronous replica took the lease"
        );
        assert!(
            Instant::now() < deadline,
            "the synchronous standby was not promoted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // With no synchronous standby left, `on` lets the new primary commit alone.
    until("commits on the new primary", async || {
        writer.acked_by_b() >= 20
    })
    .await;
    let acks = writer.stop().await;
    assert!(async_db.is_in_recovery().await.unwrap());
    judge(&acks, sync_db).await;
    // The new primary recorded its own term (naming only itself) before it promoted. The
    // asynchronous replica follows it (rewound by its agent if it received WAL past the
    // promotion point), and the new primary makes it its synchronous standby.
    let other = if sync_name == "b" { "c" } else { "b" };
    let want = format!("primary {sync_name}, standbys [{other}]");
    let deadline = Instant::now() + WAIT;
    while !sync_record(sync_node).await.contains(&want) {
        if Instant::now() > deadline {
            let (_, new) = get(sync_node, "/status").await;
            let (_, old) = get(async_node, "/status").await;
            let log =
                std::fs::read_to_string(async_db.data_dir().parent().unwrap().join("pg_ctl.log"))
                    .unwrap_or_default();
            panic!(
                "the new primary did not record {want}: {}\n{}\n{log}",
                new["replication"]["agent"], old["replication"]["agent"]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every commit the new primary took is on the rewound standby too.
    let newest: i64 = sync_db.query_scalar("SELECT max(id) FROM w").await.unwrap();
    until(
        "the rewound standby to replay the new primary's commits",
        async || {
            async_db
                .query_scalar::<Option<i64>>(&format!("SELECT id FROM w WHERE id = {newest}"))
                .await
                .is_ok_and(|id| id == Some(newest))
        },
    )
    .await;
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

/// A switchover to a named member through the agents: the member named is the one that has
/// *replayed less* (it delays replay, so the candidate rule alone would have it defer to the
/// other replica). The old primary waits for the named member's standby to flush its last
/// WAL, the other member is held off and says so in its report, so the named member leads
/// and is promoted, under a write load, with no acknowledged commit lost and none taken by
/// the old primary after the new one took its first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_to_a_named_member_promotes_that_member_and_loses_nothing() {
    let primary = PostgresServer::start().await.unwrap();
    primary
        .execute("CREATE TABLE w (id bigint PRIMARY KEY, note text)")
        .await
        .unwrap();
    let ahead = primary.start_replica().await.unwrap();
    let behind = primary.start_replica().await.unwrap();
    behind
        .execute("ALTER SYSTEM SET recovery_min_apply_delay = '1h'")
        .await
        .unwrap();
    behind.execute("SELECT pg_reload_conf()").await.unwrap();
    let store = Arc::new(MemoryLeaseStore::new());
    let node = |id: &str, agent: PgAgent| cluster_node(&store, id, agent);
    let config = PgAgentConfig {
        loop_interval: Duration::from_millis(200),
        demote_margin: Duration::from_millis(600),
        demote_timeout: Duration::from_millis(500),
        // The named member delays its replay: its lag is judged on replay.
        max_lag_on_failover: 256 << 20,
        ..PgAgentConfig::default()
    };
    let agent = |name: &str, server: &PostgresServer| {
        let member = PgMember::new(name, &server.url())
            .unwrap()
            .query_timeout(Duration::from_secs(1));
        PgAgent::new(member, config.clone()).unwrap()
    };
    let a = node("a", agent("db-a", &primary));
    a.start().await.unwrap();
    until("a to serve /primary", async || {
        get(&a, "/primary").await.0 == StatusCode::OK
    })
    .await;
    let b = node("b", agent("db-b", &ahead));
    let c = node("c", agent("db-c", &behind));
    b.start().await.unwrap();
    c.start().await.unwrap();
    // The standbys carry their member names.
    until("both standbys named in pg_stat_replication", async || {
        primary
            .query_scalar::<Vec<String>>(
                "SELECT coalesce(array_agg(application_name ORDER BY application_name), '{}') \
                 FROM pg_stat_replication WHERE state = 'streaming'",
            )
            .await
            .is_ok_and(|names| names == ["b", "c"])
    })
    .await;

    let writer = Writer::start(primary.url(), behind.url(), 0);
    until("writes on a's primary", async || writer.acked() >= 50).await;
    until("c to defer to b (it replayed less)", async || {
        let (_, body) = get(&c, "/status").await;
        body["replication"]["agent"]["report"]["ineligible"]
            .as_str()
            .is_some_and(|r| r.starts_with("deferring"))
    })
    .await;

    let response = common::client()
        .post(format!("http://{}/switchover?to=c", a.http_addr().unwrap()))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let deadline = Instant::now() + WAIT;
    while get(&c, "/primary").await.0 != StatusCode::OK {
        assert!(b.is_leader().is_none(), "b took the lease, c was named");
        assert!(Instant::now() < deadline, "c was not promoted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until("commits on c's database", async || {
        writer.acked_by_b() >= 20
    })
    .await;
    let acks = writer.stop().await;
    assert!(ahead.is_in_recovery().await.unwrap());
    judge(&acks, &behind).await;
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

/// Two failovers in a row, in synchronous mode: the primary's database is SIGKILLed, its
/// synchronous standby is promoted, the last replica follows the new primary (rewound by its
/// agent if it had received WAL past the promotion point) and becomes its synchronous
/// standby; the new primary is SIGKILLed right then, and the last replica is promoted in
/// turn. Every commit any of the primaries acknowledged is on the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_failover_right_after_the_first_loses_no_acknowledged_commit() {
    let ((mut primary, mut one, two), [a, b, c]) = sync_cluster().await;
    b.start().await.unwrap();
    until("b recorded as a's synchronous standby", async || {
        sync_record(&a).await.contains("standbys [b]")
    })
    .await;
    c.start().await.unwrap();

    // First failover: a's database dies under writes; b is promoted.
    let writer = Writer::start(primary.url(), one.url(), 0);
    until("writes on a's primary", async || writer.acked() >= 50).await;
    primary.kill().unwrap();
    until("commits on b's database", async || {
        writer.acked_by_b() >= 20
    })
    .await;
    let first = writer.stop().await;
    assert!(c.is_leader().is_none(), "c was not a synchronous standby");

    // c follows b and becomes its synchronous standby; b dies at once, under writes.
    until("c recorded as b's synchronous standby", async || {
        sync_record(&b).await.contains("primary b, standbys [c]")
    })
    .await;
    // The second writer's row ids start past the first's.
    let last = first.iter().map(|a| a.n).max().unwrap_or(0);
    let writer = Writer::start(one.url(), two.url(), last);
    until("writes on b's primary", async || writer.acked() >= 50).await;
    one.kill().unwrap();
    let deadline = Instant::now() + WAIT;
    while writer.acked_by_b() < 20 {
        if Instant::now() > deadline {
            let (_, bs) = get(&b, "/status").await;
            let (_, cs) = get(&c, "/status").await;
            let log = std::fs::read_to_string(two.data_dir().parent().unwrap().join("pg_ctl.log"))
                .unwrap_or_default();
            panic!(
                "no commits on c's database: b {}\nc {}\n{}",
                bs["replication"]["agent"],
                cs["replication"]["agent"],
                &log[log.len().saturating_sub(3000)..]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = writer.stop().await;
    assert!(c.is_leader().is_some());
    // Every commit acknowledged by a, then by b, is on c.
    judge(&second, &two).await;
    let all: Vec<Ack> = first
        .iter()
        .map(|a| Ack { on_b: false, ..*a })
        .chain(second.iter().copied())
        .collect();
    judge(&all, &two).await;
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}
