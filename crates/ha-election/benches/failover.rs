//! Failover benchmark: three electors on a real server (redis-server, then PostgreSQL, then —
//! with the `etcd` feature — a 3-member etcd cluster), each through fault proxies of its own
//! (one per server or member), ttl 2 s, retry 200 ms. Prints `name value unit` lines:
//! crash failover and graceful handover times over many trials, split-brain violations seen by
//! a 1 ms invariant checker across all trials, and store round trips per renewal.
//!
//! `cargo bench -p ha-election --bench failover` (set `HA_BENCH_TRIALS` to change the trial
//! count, default 20; `HA_BENCH_STORES=redis`, `=pg` or `=etcd` to run one store; the etcd
//! part needs `--features etcd`).
#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark prints; setup failures panic

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ha_core::{Component, ComponentContext, NodeId};
use ha_election::{Elector, ElectorConfig, LeaseStore, PostgresLeaseStore, RedisLeaseStore};
use ha_testkit::{FaultProxy, PostgresServer, ProxyMode, RedisServer};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(200);

/// Connects a store to the given addresses (a node's proxies, one per upstream).
type Connect = Arc<
    dyn Fn(Vec<SocketAddr>) -> Pin<Box<dyn Future<Output = Arc<dyn LeaseStore>> + Send>>
        + Send
        + Sync,
>;

struct Node {
    proxies: Vec<FaultProxy>,
    elector: Elector,
}

struct Bench {
    upstreams: Vec<SocketAddr>,
    connect: Connect,
    key: String,
    nodes: Vec<Node>,
    next_id: usize,
    violations: u64,
}

impl Bench {
    async fn add(&mut self) {
        let proxies: Vec<FaultProxy> = self
            .upstreams
            .iter()
            .map(|upstream| FaultProxy::start(*upstream).unwrap())
            .collect();
        let store = (self.connect)(proxies.iter().map(FaultProxy::addr).collect()).await;
        let elector = Elector::builder(store)
            .config(ElectorConfig::with_ttl(self.key.clone(), TTL, RETRY))
            .build()
            .unwrap();
        elector
            .start(ComponentContext::standalone(format!("n{}", self.next_id)))
            .await
            .unwrap();
        self.next_id += 1;
        self.nodes.push(Node { proxies, elector });
    }

    /// One invariant check; returns the leader's index.
    fn check(&mut self) -> Option<usize> {
        let leaders: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].elector.is_leader().is_some())
            .collect();
        if leaders.len() > 1 {
            self.violations += 1;
        }
        leaders.first().copied()
    }

    async fn wait_leader(&mut self, except: Option<&NodeId>) -> (usize, Duration) {
        let started = Instant::now();
        loop {
            if let Some(i) = self.check()
                && self.nodes[i].elector.node() != except
            {
                return (i, started.elapsed());
            }
            assert!(
                started.elapsed() < TTL * 5,
                "no leader after {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn crash_trial(&mut self) -> Duration {
        let (leader, _) = self.wait_leader(None).await;
        let node = self.nodes.remove(leader);
        let id = node.elector.node().cloned().unwrap();
        for proxy in &node.proxies {
            proxy.set_mode(ProxyMode::Blackhole);
        }
        let crashed_at = Instant::now();
        // Drop without a reachable store: its release is lost, like a killed process.
        let shutdown = tokio::spawn(async move {
            node.elector.shutdown().await;
            drop(node.proxies);
        });
        let (_, _) = self.wait_leader(Some(&id)).await;
        let took = crashed_at.elapsed();
        shutdown.await.unwrap();
        self.add().await;
        took
    }

    async fn graceful_trial(&mut self) -> Duration {
        let (leader, _) = self.wait_leader(None).await;
        let node = self.nodes.remove(leader);
        let id = node.elector.node().cloned().unwrap();
        let started = Instant::now();
        node.elector.shutdown().await;
        let (_, _) = self.wait_leader(Some(&id)).await;
        let took = started.elapsed();
        drop(node.proxies);
        self.add().await;
        took
    }
}

/// Round trips per renewal: N direct renewals through a fresh proxy, counting the requests it
/// forwards to the server.
async fn roundtrips_per_renewal(upstreams: &[SocketAddr], connect: &Connect) -> f64 {
    const N: u64 = 50;
    let proxies: Vec<FaultProxy> = upstreams
        .iter()
        .map(|upstream| FaultProxy::start(*upstream).unwrap())
        .collect();
    let forwarded = || -> u64 { proxies.iter().map(FaultProxy::requests_forwarded).sum() };
    let store = connect(proxies.iter().map(FaultProxy::addr).collect()).await;
    let node = NodeId::new("rt");
    let key = "bench/roundtrips";
    let timeout = Duration::from_secs(2);
    let current = store.read(key, timeout).await.unwrap().map(|i| i.record());
    let ha_election::Acquire::Acquired(token) = store
        .acquire(key, &node, TTL, current.as_ref(), timeout)
        .await
        .unwrap()
    else {
        panic!("the key's current record must be taken over");
    };
    let before = forwarded();
    for _ in 0..N {
        assert!(store.renew(key, &node, token, TTL, timeout).await.unwrap());
    }
    let used = forwarded() - before;
    store.release(key, &node, token, timeout).await.unwrap();
    used as f64 / N as f64
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn run(
    prefix: &str,
    store: &str,
    upstreams: Vec<SocketAddr>,
    connect: Connect,
    trials: usize,
) {
    let roundtrips = roundtrips_per_renewal(&upstreams, &connect).await;
    let mut bench = Bench {
        upstreams,
        connect,
        key: format!("bench/{prefix}"),
        nodes: Vec::new(),
        next_id: 0,
        violations: 0,
    };
    for _ in 0..3 {
        bench.add().await;
    }
    let mut crash = Vec::new();
    let mut graceful = Vec::new();
    for _ in 0..trials {
        crash.push(bench.crash_trial().await);
        graceful.push(bench.graceful_trial().await);
    }
    crash.sort();
    graceful.sort();
    println!(
        "{prefix}failover_crash_ms_p50 {} ms",
        ms(percentile(&crash, 0.5))
    );
    println!(
        "{prefix}failover_crash_ms_max {} ms",
        ms(*crash.last().unwrap())
    );
    println!(
        "{prefix}handover_graceful_ms_p50 {} ms",
        ms(percentile(&graceful, 0.5))
    );
    println!(
        "{prefix}handover_graceful_ms_max {} ms",
        ms(*graceful.last().unwrap())
    );
    println!("{prefix}split_brain_violations {} count", bench.violations);
    println!("{store}_roundtrips_per_renewal {roundtrips:.2} count");
    println!("{prefix}trials {trials} count");
}

#[tokio::main]
async fn main() {
    let trials: usize = std::env::var("HA_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);

    let stores = std::env::var("HA_BENCH_STORES").unwrap_or_else(|_| "redis,pg,etcd".into());
    if stores.split(',').any(|s| s == "redis") {
        bench_redis(trials).await;
    }
    if stores.split(',').any(|s| s == "pg") {
        bench_pg(trials).await;
    }
    #[cfg(feature = "etcd")]
    if stores.split(',').any(|s| s == "etcd") {
        bench_etcd(trials).await;
    }
}

/// A 3-member etcd cluster; each elector reaches every member through its own proxy, and its
/// store uses one member at a time (moving on after a failure).
#[cfg(feature = "etcd")]
async fn bench_etcd(trials: usize) {
    let etcd = ha_testkit::EtcdCluster::start().await.unwrap();
    let upstreams: Vec<SocketAddr> = (0..etcd.members().len())
        .map(|m| etcd.member(m).client_addr())
        .collect();
    let connect: Connect = Arc::new(|addrs| {
        Box::pin(async move {
            let endpoints: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            Arc::new(
                ha_election::EtcdLeaseStore::connect(&endpoints)
                    .await
                    .unwrap(),
            ) as Arc<dyn LeaseStore>
        })
    });
    run("etcd_", "etcd", upstreams, connect, trials).await;
}

async fn bench_redis(trials: usize) {
    let redis = RedisServer::start().await.unwrap();
    let connect: Connect = Arc::new(|addrs| {
        Box::pin(async move {
            Arc::new(
                RedisLeaseStore::connect(&format!("redis://{}", addrs[0]))
                    .await
                    .unwrap(),
            ) as Arc<dyn LeaseStore>
        })
    });
    run("", "redis", vec![redis.addr()], connect, trials).await;
}

async fn bench_pg(trials: usize) {
    let pg = PostgresServer::start().await.unwrap();
    let connect: Connect = Arc::new(|addrs| {
        Box::pin(async move {
            Arc::new(
                PostgresLeaseStore::connect(&format!("postgres://postgres@{}/postgres", addrs[0]))
                    .await
                    .unwrap(),
            ) as Arc<dyn LeaseStore>
        })
    });
    run("pg_", "pg", vec![pg.addr()], connect, trials).await;
}
