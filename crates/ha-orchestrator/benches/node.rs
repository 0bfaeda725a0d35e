//! Node benchmark. Prints `name value unit` lines, then each target and whether it was met:
//!
//! - `node_start_ms`: builder → ready, in process (a single node with two `FnCheck`s and the
//!   HTTP API), median of 20;
//! - `status_p99_us`: `GET /status` from 10 concurrent keep-alive clients for 2 s against that
//!   in-process node; `status_election_p99_us` the same against an `ha-node` process in an
//!   election (each `/status` reads the members from Redis);
//! - `switchover_ms_p50` / `_max`: three `ha-node` processes on a testkit `redis-server`,
//!   `POST /switchover` to the leader until another node's `GET /leader` answers 200 (trials
//!   2 × retry apart: see the loop);
//! - `crash_failover_ms_max` / `_p50`: the same cluster (ttl 2 s, retry 200 ms): SIGKILL the
//!   leader until another leads; the killed node is restarted between trials;
//! - `node_rss_mb`: the largest VmRSS of the three idle `ha-node` processes after 3 s.
//!
//! `cargo bench -p ha-orchestrator --bench node` (`HA_BENCH_TRIALS` sets the process trial
//! count, default 10).
#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark prints; setup failures panic

use std::time::{Duration, Instant};

use ha_health::{CheckConfig, CheckResult, FnCheck};
use ha_orchestrator::HaNode;
use ha_testkit::{HaNodeCluster, HaNodeOptions, RedisServer};

mod support;
use support::{max, median, ms, report, target};

const TTL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(200);
const TOKEN: &str = "bench-admin-token-0123456789";
const START_RUNS: usize = 20;
const STATUS_CLIENTS: usize = 10;
const STATUS_FOR: Duration = Duration::from_secs(2);

fn main() {
    let trials: usize = std::env::var("HA_BENCH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(10);
    // The node's runtime looks like ha-node's (two workers); the load comes from another.
    let node_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut starts = Vec::new();
    let mut node = None;
    for _ in 0..START_RUNS {
        if let Some(previous) = node.take() {
            node_rt.block_on(HaNode::shutdown(&previous));
        }
        let (took, started) = node_rt.block_on(start_in_process());
        starts.push(took);
        node = Some(started);
    }
    let node = node.unwrap();
    report("node_start_ms", ms(median(&mut starts)), "ms");

    let url = format!("http://{}", node.http_addr().unwrap());
    let status_p99 = client_rt.block_on(status_load(&url));
    report("status_p99_us", status_p99.as_micros() as f64, "us");
    node_rt.block_on(node.shutdown());

    let redis = client_rt.block_on(RedisServer::start()).unwrap();
    let options = HaNodeOptions {
        ttl: TTL,
        retry: RETRY,
        heartbeat: Duration::from_millis(500),
        admin_token: TOKEN.into(),
        ..HaNodeOptions::default()
    };
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_ha-node"));
    let mut cluster = HaNodeCluster::start(binary, &redis.url(), &["a", "b", "c"], &options)
        .unwrap_or_else(|e| panic!("{e}"));
    let wait = |cluster: &HaNodeCluster, except: Option<&str>| {
        cluster
            .wait_leader(except, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    wait(&cluster, None);

    // Idle memory first, before any load has grown the heaps.
    let idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_kib = cluster
        .nodes()
        .iter()
        .filter_map(|n| n.pid().and_then(vm_rss_kib))
        .max()
        .unwrap();
    let rss_mb = (rss_kib as f64 / 1024.0 * 10.0).round() / 10.0;
    report("node_rss_mb", rss_mb, "MiB");

    let (leader, _) = wait(&cluster, None);
    let status_election_p99 = client_rt.block_on(status_load(&cluster.node(&leader).url()));
    report(
        "status_election_p99_us",
        status_election_p99.as_micros() as f64,
        "us",
    );

    let mut switchovers = Vec::new();
    for _ in 0..trials {
        // A node that stepped down stays out of the next campaign for two retries: back to
        // back, three switchovers in that time would leave no node eligible, and measure the
        // hold-off instead of the handover.
        std::thread::sleep(2 * RETRY + Duration::from_millis(100));
        let (leader, _) = wait(&cluster, None);
        let sent = Instant::now();
        let (code, body) = cluster
            .node(&leader)
            .post("/switchover", Some(TOKEN))
            .unwrap();
        assert_eq!(code, 200, "{body}");
        let (_, seen) = wait(&cluster, Some(&leader));
        switchovers.push(seen - sent);
    }
    let switchover_p50 = median(&mut switchovers);
    report("switchover_ms_p50", ms(switchover_p50), "ms");
    report("switchover_ms_max", ms(max(&switchovers)), "ms");

    let mut crashes = Vec::new();
    for _ in 0..trials {
        let (leader, _) = wait(&cluster, None);
        let killed = Instant::now();
        cluster.node_mut(&leader).kill().unwrap();
        let (_, seen) = wait(&cluster, Some(&leader));
        crashes.push(seen - killed);
        cluster
            .node_mut(&leader)
            .restart()
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let crash_max = max(&crashes);
    report("crash_failover_ms_max", ms(crash_max), "ms");
    report("crash_failover_ms_p50", ms(median(&mut crashes)), "ms");
    drop(cluster);
    drop(redis);

    let crash_bound = TTL + 2 * RETRY + Duration::from_millis(300);
    target(
        &format!("crash_failover_ms_max <= {} ms", ms(crash_bound)),
        crash_max <= crash_bound,
    );
    target(
        "switchover_ms_p50 < 100 ms",
        switchover_p50 < Duration::from_millis(100),
    );
    target("node_rss_mb < 30 MiB", rss_mb < 30.0);
}

/// Builds and starts a single node with two checks and the API; returns how long until it
/// was ready.
async fn start_in_process() -> (Duration, HaNode) {
    let began = Instant::now();
    let node = HaNode::builder()
        .node_id("bench")
        .cluster("bench")
        .single_node()
        .http(([127, 0, 0, 1], 0).into())
        .admin_token(TOKEN)
        .check(
            FnCheck::new("api", || async { CheckResult::healthy("ok") }),
            CheckConfig::default().interval(Duration::from_secs(1)),
        )
        .check(
            FnCheck::new("queue", || async { CheckResult::healthy("12 queued") }),
            CheckConfig::default().interval(Duration::from_secs(1)),
        )
        .build()
        .unwrap();
    node.start().await.unwrap();
    while !node.is_ready() {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    (began.elapsed(), node)
}

/// `GET /status` from [`STATUS_CLIENTS`] keep-alive clients for [`STATUS_FOR`]: the p99.
async fn status_load(url: &str) -> Duration {
    let client = reqwest::Client::new();
    let until = Instant::now() + STATUS_FOR;
    let mut tasks = Vec::new();
    for _ in 0..STATUS_CLIENTS {
        let client = client.clone();
        let url = format!("{url}/status");
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < until {
                let sent = Instant::now();
                let response = client.get(&url).send().await.unwrap();
                assert!(response.status().is_success());
                response.bytes().await.unwrap();
                samples.push(sent.elapsed());
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    all[(all.len() * 99 / 100).min(all.len() - 1)]
}

/// VmRSS of process `pid`, in KiB.
fn vm_rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
