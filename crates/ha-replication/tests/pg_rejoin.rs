//! Rejoin on real PostgreSQL servers, under a small lease the test runs the way the node's
//! elector does (a holder is renewed while its agent is eligible; a free or expired lease goes
//! to the first eligible member with a greater token; `step_down` frees it): after a
//! failover, the old primary comes back as a streaming replica of the new one through
//! `pg_rewind`, or a re-clone when rewind is impossible, also when it crashed and is down
//! when its agent starts; a led primary that crashed is
//! restarted in place within `primary_start_timeout`, and when it cannot be, its node gives
//! the lease up and a replica takes over. A checker outside the system writes to every server
//! every round and fails the test if two of them take a write in one round. Nothing here
//! helps the agents by hand.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_core::{
    Component, ComponentContext, EventBus, FencingToken, Leadership, LeadershipGate, NodeId,
    StepDown,
};
use ha_replication::pg::{
    AgentAction, PgAgent, PgAgentConfig, PgMember, PgRole, RejoinConfig, RejoinVia, Upstream,
};
use ha_testkit::PostgresServer;
use sqlx::Connection;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(3);

/// The lease: holder (member index), token, deadline.
#[derive(Debug, Default)]
struct Lease {
    held: Mutex<Option<(usize, u64, Instant)>>,
    last_token: AtomicU64,
    /// Members whose renewals do not reach the store (a partition from it).
    cut_off: Mutex<Vec<usize>>,
}

impl Lease {
    fn holder(&self) -> Option<(usize, u64)> {
        let held = *self.held.lock().unwrap();
        held.filter(|(_, _, until)| Instant::now() < *until)
            .map(|(who, token, _)| (who, token))
    }

    fn grant(&self, who: usize) -> u64 {
        let token = self.last_token.fetch_add(1, Ordering::SeqCst) + 1;
        *self.held.lock().unwrap() = Some((who, token, Instant::now() + TTL));
        token
    }
}

/// What one member's agent sees of the lease.
#[derive(Debug)]
struct MemberGate {
    lease: Arc<Lease>,
    me: usize,
}

impl LeadershipGate for MemberGate {
    fn is_leader(&self) -> Option<Leadership> {
        let held = *self.lease.held.lock().unwrap();
        held.filter(|(who, _, until)| *who == self.me && Instant::now() < *until)
            .map(|(_, token, valid_until)| Leadership {
                token: FencingToken(token),
                valid_until,
            })
    }
}

#[ha_core::async_trait]
impl StepDown for MemberGate {
    async fn step_down(&self) -> Result<(), ha_core::Error> {
        let mut held = self.lease.held.lock().unwrap();
        if held.is_some_and(|(who, _, _)| who == self.me) {
            *held = None;
        }
        Ok(())
    }
}

/// The election, as the node's elector runs it with the agent's eligibility: every 100 ms
/// the holder is renewed while eligible (and not cut off); a free lease goes to the first
/// eligible member.
async fn elect(lease: Arc<Lease>, agents: Vec<Arc<PgAgent>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let cut_off = lease.cut_off.lock().unwrap().clone();
        match lease.holder() {
            Some((who, token)) => {
                if agents[who].eligible() && !cut_off.contains(&who) {
                    *lease.held.lock().unwrap() = Some((who, token, Instant::now() + TTL));
                }
            }
            None => {
                if let Some(who) =
                    (0..agents.len()).find(|&i| agents[i].eligible() && !cut_off.contains(&i))
                {
                    lease.grant(who);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One member: its server and agent, following whoever holds the lease.
fn member_agent(
    i: usize,
    server: &PostgresServer,
    ports: Vec<u16>,
    lease: &Arc<Lease>,
    rejoin: RejoinConfig,
    paused: &Arc<AtomicBool>,
) -> Arc<PgAgent> {
    let member = PgMember::new(format!("pg{i}"), &server.url())
        .unwrap()
        .query_timeout(Duration::from_secs(1));
    let config = PgAgentConfig {
        loop_interval: Duration::from_millis(200),
        demote_margin: Duration::from_secs(1),
        demote_timeout: Duration::from_millis(500),
        rejoin,
        ..PgAgentConfig::default()
    };
    let source = Arc::clone(lease);
    let gate = Arc::new(MemberGate {
        lease: Arc::clone(lease),
        me: i,
    });
    Arc::new(
        PgAgent::new(member, config)
            .unwrap()
            .follow(move || {
                let upstream = source.holder().map(|(who, _)| Upstream {
                    host: "127.0.0.1".into(),
                    port: ports[who],
                });
                async move { upstream }
            })
            .step_down_by(gate)
            .paused_by(Arc::clone(paused)),
    )
}

fn rejoin_config(server: &PostgresServer) -> RejoinConfig {
    RejoinConfig {
        enabled: true,
        data_dir: Some(server.data_dir().to_owned()),
        bin_dir: server.bin_dir().to_owned(),
        start_command: server.start_command(),
        run_as: ha_testkit::postgres::server_user().unwrap(),
        command_timeout: Duration::from_secs(60),
        copy_timeout: Duration::from_secs(120),
        retry_interval: Duration::from_secs(1),
        ..RejoinConfig::default()
    }
}

fn context(lease: &Arc<Lease>, i: usize, bus: &EventBus) -> ComponentContext {
    ComponentContext::new(
        NodeId::new(format!("node-{i}")),
        bus.clone(),
        Arc::new(MemberGate {
            lease: Arc::clone(lease),
            me: i,
        }),
    )
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The checker: every round, one write attempt on every server (a fresh connection, 300 ms
/// bound); records which took it. Two in one round is two writable primaries.
#[derive(Default)]
struct Checker {
    writes: Vec<AtomicU64>,
    double: Mutex<Vec<String>>,
    last_note: Mutex<Vec<Option<String>>>,
    stop: AtomicBool,
}

async fn try_write(port: u16, note: &str) -> bool {
    let attempt = async {
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        let r = sqlx::query("INSERT INTO c (note) VALUES ($1)")
            .bind(note)
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        r
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(300), attempt).await,
        Ok(Ok(_))
    )
}

async fn check(ports: Vec<u16>, checker: Arc<Checker>) {
    let mut round = 0u64;
    while !checker.stop.load(Ordering::SeqCst) {
        round += 1;
        let mut took = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let note = format!("pg{i}-{round}");
            if try_write(*port, &note).await {
                checker.writes[i].fetch_add(1, Ordering::SeqCst);
                checker.last_note.lock().unwrap()[i] = Some(note);
                took.push(i);
            }
        }
        if took.len() > 1 {
            checker
                .double
                .lock()
                .unwrap()
                .push(format!("round {round}: {took:?} all took a write"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn checker(n: usize) -> Arc<Checker> {
    Arc::new(Checker {
        writes: (0..n).map(|_| AtomicU64::new(0)).collect(),
        last_note: Mutex::new(vec![None; n]),
        ..Checker::default()
    })
}

/// A two-member cluster: `pg0` primary (leading, token 1), `pg1` its streaming replica,
/// both agents, the election and the checker running.
struct Cluster {
    servers: Vec<PostgresServer>,
    agents: Vec<Arc<PgAgent>>,
    lease: Arc<Lease>,
    checker: Arc<Checker>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Set when the cluster is dropped (a failed test unwinding): the agents' loops then
    /// idle, so none starts a postmaster on a data directory the testkit is removing.
    paused: Arc<AtomicBool>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.paused.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        self.checker.stop.store(true, Ordering::SeqCst);
    }
}

async fn cluster(
    wal_log_hints: bool,
    tweak: impl Fn(usize, RejoinConfig) -> RejoinConfig,
) -> Cluster {
    // pg_rewind reads the target's WAL back to the last common checkpoint: keep it.
    let mut builder = PostgresServer::builder().setting("wal_keep_size", "256MB");
    if wal_log_hints {
        builder = builder.setting("wal_log_hints", "on");
    }
    let primary = builder.start().await.unwrap();
    primary
        .execute("CREATE TABLE c (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();
    let replica = primary.start_replica().await.unwrap();
    let servers = vec![primary, replica];
    let ports: Vec<u16> = servers.iter().map(PostgresServer::port).collect();
    let lease = Arc::new(Lease::default());
    let paused = Arc::new(AtomicBool::new(false));
    let agents: Vec<Arc<PgAgent>> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let rejoin = tweak(i, rejoin_config(s));
            member_agent(i, s, ports.clone(), &lease, rejoin, &paused)
        })
        .collect();
    // Bootstrap: the primary's member holds the first lease.
    assert_eq!(lease.grant(0), 1);
    let bus = EventBus::default();
    for (i, agent) in agents.iter().enumerate() {
        agent.start(context(&lease, i, &bus)).await.unwrap();
    }
    until("a led primary and a streaming replica", || {
        let a = agents[0].agent_status();
        let b = agents[1].agent_status();
        a.leader && a.role == Some(PgRole::Primary) && b.streaming_from.is_some()
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let checker = checker(servers.len());
    let tasks = vec![
        tokio::spawn(elect(Arc::clone(&lease), agents.clone(), Arc::clone(&stop))),
        tokio::spawn(check(ports, Arc::clone(&checker))),
    ];
    until("the checker to write on the primary", || {
        checker.writes[0].load(Ordering::SeqCst) >= 10
    })
    .await;
    Cluster {
        servers,
        agents,
        lease,
        checker,
        tasks,
        stop,
        paused,
    }
}

impl Cluster {
    /// Stops the checker, the election and the agents; asserts the checker never saw two
    /// writable primaries.
    async fn finish(mut self) {
        self.checker.stop.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks.drain(..) {
            task.await.unwrap();
        }
        for agent in &self.agents {
            agent.stop().await.unwrap();
        }
        let double = self.checker.double.lock().unwrap().clone();
        assert!(double.is_empty(), "two writable primaries: {double:?}");
    }
}

/// After the failover to `pg1`: `pg0` comes back as a streaming replica of it, `via`, and
/// has the rows the checker wrote on `pg1`.
async fn failover_then_rejoin(c: &Cluster, via: RejoinVia) {
    let new_port = c.servers[1].port();
    // pg0's renewals stop reaching the store: it must demote before its deadline, pg1 take
    // over, and pg0 rejoin on its own.
    c.lease.cut_off.lock().unwrap().push(0);
    until("pg1 to lead and promote", || {
        c.lease.holder().is_some_and(|(who, _)| who == 1)
            && c.agents[1].agent_status().role == Some(PgRole::Primary)
    })
    .await;
    let after = c.checker.writes[1].load(Ordering::SeqCst);
    until("writes on the new primary", || {
        c.checker.writes[1].load(Ordering::SeqCst) >= after + 10
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while !matches!(
        c.agents[0].agent_status().last_rejoin,
        Some(AgentAction::Rejoined { .. })
    ) {
        assert!(
            Instant::now() < deadline,
            "pg0 did not rejoin: {:?}\n{}",
            c.agents[0].agent_status(),
            log_tail(&c.servers[0])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = c.agents[0].agent_status();
    println!("pg0 rejoined: {:?}", status.last_rejoin);
    assert_eq!(
        status.last_rejoin,
        Some(AgentAction::Rejoined {
            leader: Some(format!("127.0.0.1:{new_port}")),
            via,
        })
    );
    // pg0's database (started by its agent) streams from pg1 and has pg1's latest rows.
    let deadline = Instant::now() + WAIT;
    let old = &c.servers[0];
    loop {
        let streaming: Option<(bool, Option<i32>)> = sqlx::query_as::<_, (bool, Option<i32>)>(
            "SELECT pg_is_in_recovery(), \
             (SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming')",
        )
        .fetch_one(&mut old.connect().await.unwrap_or_else(|e| panic!("{e}")))
        .await
        .ok();
        let note = c.checker.last_note.lock().unwrap()[1].clone().unwrap();
        let has: Option<i64> = old
            .query_scalar(&format!("SELECT count(*) FROM c WHERE note = '{note}'"))
            .await
            .ok();
        if streaming == Some((true, Some(i32::from(new_port)))) && has == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pg0 not streaming pg1's rows: {streaming:?}, {note}: {has:?}; {:?}\n{}",
            c.agents[0].agent_status(),
            log_tail(old)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.checker.writes[0].load(Ordering::SeqCst) >= 10);
    // The agent sees its database as a replica at its next loop after the start.
    let deadline = Instant::now() + WAIT;
    while c.agents[0].agent_status().role != Some(PgRole::Replica) {
        assert!(
            Instant::now() < deadline,
            "pg0's agent does not see a replica: {:?}",
            c.agents[0].agent_status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The end of the log of a postmaster the agent started (`pg_ctl.log`).
fn log_tail(server: &PostgresServer) -> String {
    let path = server.data_dir().with_file_name("pg_ctl.log");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_primary_is_rewound_and_follows_the_new_primary() {
    let c = cluster(true, |_, r| r).await;
    failover_then_rejoin(&c, RejoinVia::Rewind).await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_primary_that_cannot_be_rewound_is_recloned() {
    // No wal_log_hints, no checksums: pg_rewind refuses.
    let c = cluster(false, |_, r| RejoinConfig { reclone: true, ..r }).await;
    failover_then_rejoin(&c, RejoinVia::Reclone).await;
    let old_data = c.servers[0].data_dir().with_file_name("data.rejoin-old");
    assert!(
        old_data.join("PG_VERSION").is_file(),
        "the old data directory is kept at {}",
        old_data.display()
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_led_primary_is_restarted_in_place_and_keeps_leading() {
    let mut c = cluster(true, |_, r| RejoinConfig {
        primary_start_timeout: Duration::from_secs(60),
        ..r
    })
    .await;
    c.servers[0].kill().unwrap();
    until("pg0 restarted in place", || {
        c.agents[0].agent_status().last_rejoin == Some(AgentAction::RestartedInPlace { token: 1 })
    })
    .await;
    let before = c.checker.writes[0].load(Ordering::SeqCst);
    until("writes on pg0 again", || {
        c.checker.writes[0].load(Ordering::SeqCst) >= before + 10
    })
    .await;
    assert_eq!(c.lease.holder(), Some((0, 1)), "the same leadership");
    assert!(
        c.servers[1].is_in_recovery().await.unwrap(),
        "pg1 stays a replica"
    );
    assert_eq!(c.checker.writes[1].load(Ordering::SeqCst), 0);
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_led_primary_that_does_not_come_back_gives_the_lease_up() {
    let mut c = cluster(true, |i, r| {
        if i == 0 {
            RejoinConfig {
                primary_start_timeout: Duration::from_secs(2),
                start_command: vec!["false".into()],
                ..r
            }
        } else {
            r
        }
    })
    .await;
    let killed = Instant::now();
    c.servers[0].kill().unwrap();
    until("pg0 to step down", || {
        matches!(
            c.agents[0].agent_status().last_rejoin,
            Some(AgentAction::SteppedDown { .. })
        )
    })
    .await;
    println!("pg0 stepped down {:?} after the kill", killed.elapsed());
    assert!(killed.elapsed() >= Duration::from_secs(2));
    until("pg1 to lead and promote", || {
        c.lease.holder().is_some_and(|(who, _)| who == 1)
            && c.agents[1].agent_status().role == Some(PgRole::Primary)
    })
    .await;
    let (_, token) = c.lease.holder().unwrap();
    assert!(token > 1);
    until("writes on pg1", || {
        c.checker.writes[1].load(Ordering::SeqCst) >= 10
    })
    .await;
    assert!(!c.agents[0].eligible(), "held off after stepping down");
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_former_primary_that_is_down_when_its_agent_starts_is_rewound() {
    let mut c = cluster(true, |_, r| r).await;
    // The node of pg0 goes away (its agent stops, its renewals stop) and its database
    // crashes; pg1 takes over.
    c.agents[0].stop().await.unwrap();
    c.lease.cut_off.lock().unwrap().push(0);
    c.servers[0].kill().unwrap();
    until("pg1 to lead and promote", || {
        c.lease.holder().is_some_and(|(who, _)| who == 1)
            && c.agents[1].agent_status().role == Some(PgRole::Primary)
    })
    .await;
    until("writes on the new primary", || {
        c.checker.writes[1].load(Ordering::SeqCst) >= 10
    })
    .await;
    // The node comes back: a new agent over a database that is down and was a primary.
    let ports: Vec<u16> = c.servers.iter().map(PostgresServer::port).collect();
    let agent = member_agent(
        0,
        &c.servers[0],
        ports,
        &c.lease,
        rejoin_config(&c.servers[0]),
        &c.paused,
    );
    agent
        .start(context(&c.lease, 0, &EventBus::default()))
        .await
        .unwrap();
    c.agents[0] = Arc::clone(&agent);
    let deadline = Instant::now() + WAIT;
    while agent.agent_status().role != Some(PgRole::Replica) {
        assert!(
            Instant::now() < deadline,
            "pg0 not back as a replica: {:?}\n{}",
            agent.agent_status(),
            log_tail(&c.servers[0])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        agent.agent_status().last_rejoin,
        Some(AgentAction::Rejoined {
            leader: Some(format!("127.0.0.1:{}", c.servers[1].port())),
            via: RejoinVia::Rewind,
        })
    );
    let note = c.checker.last_note.lock().unwrap()[1].clone().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let has: Option<i64> = c.servers[0]
            .query_scalar(&format!("SELECT count(*) FROM c WHERE note = '{note}'"))
            .await
            .ok();
        if has == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "{note} not replayed on pg0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.finish().await;
}
