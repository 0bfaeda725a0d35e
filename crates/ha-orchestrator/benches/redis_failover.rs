//! Redis failover benchmark: how long after a master dies does an application that writes
//! through a `Router` write again, and how much of that is ours on top of Sentinel's own
//! switch. Prints `name value unit` lines, then the target and whether it was met.
//!
//! Each trial starts a fresh topology on loopback: a `redis-server` master with one replica
//! (so the promoted one is known) and three `redis-sentinel`s (quorum 2,
//! `down-after-milliseconds` 1000), and the writer: an in-process `HaNode` whose own
//! `SentinelMonitor` moves a `Router` (`follow_redis_master`), exactly as the `redis-writer`
//! example does, and a task that `INCR`s through `router.current()` every millisecond. Then
//! it SIGKILLs the master and records
//!
//! - `sentinel_switch_ms`: kill → the first `+switch-master` any sentinel publishes (a
//!   separate raw subscription per sentinel: Sentinel's own switch, the reference);
//! - `redis_failover_ms`: kill → the writer's first acknowledged `INCR` (on the new master:
//!   the old one is dead and the replica refuses writes until it is promoted);
//! - `redis_overhead_ms`: the difference, our share: the monitor hearing and judging the
//!   announcement, the router switching, the writer's next attempt and its new connection.
//!
//! Target: `redis_overhead_ms_p50 ≤ 50 ms`. `cargo bench -p ha-orchestrator --bench
//! redis_failover` (`HA_BENCH_TRIALS` sets the trial count, default 10).
#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark prints; setup failures panic

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ha_failover::Router;
use ha_orchestrator::HaNode;
use ha_replication::SentinelMonitor;
use ha_testkit::{RedisReplicaSet, RespConnection, SentinelOptions, SentinelSet};
use tokio_util::sync::CancellationToken;

mod support;
use support::{max, median, ms, report};

const WRITE_EVERY: Duration = Duration::from_millis(1);
const WRITE_TIMEOUT: Duration = Duration::from_millis(200);
const TRIAL_LIMIT: Duration = Duration::from_secs(30);

struct Trial {
    switch: Duration,
    write: Duration,
}

fn main() {
    let trials: usize = std::env::var("HA_BENCH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut switches = Vec::new();
    let mut writes = Vec::new();
    let mut overheads = Vec::new();
    for n in 1..=trials {
        let trial = rt.block_on(trial());
        eprintln!(
            "trial {n}: sentinel switch {:.1} ms, first write {:.1} ms",
            ms(trial.switch),
            ms(trial.write)
        );
        switches.push(trial.switch);
        writes.push(trial.write);
        overheads.push(trial.write.saturating_sub(trial.switch));
    }
    let overhead_p50 = ms(median(&mut overheads));
    report("sentinel_switch_ms_p50", ms(median(&mut switches)), "ms");
    report("sentinel_switch_ms_max", ms(max(&switches)), "ms");
    report("redis_failover_ms_p50", ms(median(&mut writes)), "ms");
    report("redis_failover_ms_max", ms(max(&writes)), "ms");
    report("redis_overhead_ms_p50", overhead_p50, "ms");
    report("redis_overhead_ms_max", ms(max(&overheads)), "ms");
    report(
        "redis_failover_vs_sentinel_ratio_p50",
        (ms(median(&mut writes)) / ms(median(&mut switches)) * 1000.0).round() / 1000.0,
        "x",
    );
    println!(
        "target redis_overhead_ms_p50 <= 50 ms: {}",
        if overhead_p50 <= 50.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}

async fn trial() -> Trial {
    let mut set = RedisReplicaSet::start(1).await.unwrap();
    let sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .unwrap();
    let name = sentinels.master_name().to_owned();
    let master = set.master().addr();
    let replica = set.replicas()[0].addr();

    // Sentinel's own switch, heard on a raw subscription to every sentinel.
    let announced: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stop = CancellationToken::new();
    for addr in sentinels.addrs() {
        let announced = Arc::clone(&announced);
        let stop = stop.clone();
        let mut conn = RespConnection::connect(addr, Duration::from_secs(1))
            .await
            .unwrap();
        conn.request(&["SUBSCRIBE", "+switch-master"])
            .await
            .unwrap();
        conn.set_timeout(TRIAL_LIMIT);
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                message = conn.read_reply() => {
                    if message.is_ok() {
                        let at = Instant::now();
                        let mut first = announced.lock().unwrap();
                        first.get_or_insert(at);
                    }
                }
            }
        });
    }

    // The writer, as the redis-writer example builds it.
    let router = Router::new(master.to_string(), replica.to_string());
    let sentinel_addrs: Vec<String> = sentinels.addrs().iter().map(|a| a.to_string()).collect();
    let monitor = SentinelMonitor::new(name.clone(), &sentinel_addrs)
        .unwrap()
        .keepalive(Duration::from_millis(300));
    let node = HaNode::builder()
        .node_id("writer")
        .single_node()
        .sentinel(monitor)
        .follow_redis_master(name, router.clone(), String::as_str)
        .build()
        .unwrap();
    node.start().await.unwrap();

    let killed: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first_write: Arc<Mutex<Option<Instant>>> = Arc::default();
    let warm = Arc::new(tokio::sync::Notify::new());
    let writer = tokio::spawn(write_loop(
        router.clone(),
        master,
        Arc::clone(&killed),
        Arc::clone(&first_write),
        Arc::clone(&warm),
        stop.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(5), warm.notified())
        .await
        .expect("the writer writes to the master before the kill");

    let at = Instant::now();
    *killed.lock().unwrap() = Some(at);
    set.master_mut().kill().unwrap();

    let deadline = at + TRIAL_LIMIT;
    let (switch, write) = loop {
        let switch = *announced.lock().unwrap();
        let write = *first_write.lock().unwrap();
        if let (Some(switch), Some(write)) = (switch, write) {
            break (switch - at, write - at);
        }
        assert!(
            Instant::now() < deadline,
            "no switch and first write within {TRIAL_LIMIT:?}: announced {switch:?}, write {write:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.cancel();
    writer.await.unwrap();
    node.shutdown().await;
    drop(sentinels);
    drop(set);
    Trial { switch, write }
}

/// `INCR`s through the router's current target every millisecond, on a connection per
/// target kept while it works. Notifies `warm` after the first acknowledged write, and records
/// the first write acknowledged after the kill by another server than the killed master (a
/// write to the old master still in flight at the kill may be acknowledged just after it).
async fn write_loop(
    router: Router<String>,
    old_master: SocketAddr,
    killed: Arc<Mutex<Option<Instant>>>,
    first_write: Arc<Mutex<Option<Instant>>>,
    warm: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut conn: Option<RespConnection> = None;
    let mut warmed = false;
    while !stop.is_cancelled() {
        let target: SocketAddr = router.current().parse().unwrap();
        if conn.as_ref().is_some_and(|c| c.addr() != target) {
            conn = None;
        }
        if conn.is_none() {
            conn = RespConnection::connect(target, WRITE_TIMEOUT).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            match c.request(&["INCR", "bench:writes"]).await {
                Ok(reply) if reply.as_int().is_some() => {
                    let at = Instant::now();
                    if !warmed {
                        warmed = true;
                        warm.notify_one();
                    }
                    if target != old_master && killed.lock().unwrap().is_some_and(|k| at > k) {
                        first_write.lock().unwrap().get_or_insert(at);
                        return;
                    }
                }
                // -READONLY from a replica not yet promoted: keep the connection.
                Ok(_) => {}
                Err(_) => conn = None,
            }
        }
        tokio::time::sleep(WRITE_EVERY).await;
    }
}
