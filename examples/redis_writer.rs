//! A writer that follows the Redis master: it `INCR`s a counter every 100 ms through a
//! `Router` that its own sentinel monitor moves (`follow_redis_master`), so it writes to the
//! new master as soon as the sentinels announce it — in this process, leader or not. Part of
//! `examples/config/redis-ha/` (see `run.sh` there).
//!
//! ```text
//! cargo run --example redis-writer -- MASTER_NAME SENTINEL[,SENTINEL…] FIRST_ADDR SECOND_ADDR
//! ```
//!
//! `FIRST_ADDR` is the master now, `SECOND_ADDR` the replica that may replace it (a `Router`
//! has two targets; the example's other replica has `replica-priority 0`). One line per
//! write: `ok <count> on <addr> (+<ms> ms)` or `failed on <addr>: <why>`. Ctrl-C stops it.
#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is what this program is for

use std::process::ExitCode;
use std::time::{Duration, Instant};

use fred::prelude::{Client, ClientLike, Config, ConnectionConfig, ServerConfig};
use fred::types::{ClusterHash, CustomCommand};
use ha_failover::Router;
use ha_orchestrator::HaNode;
use ha_replication::SentinelMonitor;

/// A client for `addr` that gives up quickly, so a dead master shows as failed writes.
async fn connect(addr: &str) -> Result<Client, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("`{addr}` is not host:port"))?;
    let config = Config {
        server: ServerConfig::new_centralized(host, port),
        fail_fast: true,
        ..Config::default()
    };
    let connection = ConnectionConfig {
        connection_timeout: Duration::from_millis(300),
        internal_command_timeout: Duration::from_millis(300),
        max_command_attempts: 1,
        ..ConnectionConfig::default()
    };
    let client = Client::new(config, None, Some(connection), None);
    drop(client.connect());
    tokio::time::timeout(Duration::from_millis(500), client.wait_for_connect())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(client)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [master, sentinels, first, second] = args.as_slice() else {
        eprintln!("usage: redis-writer MASTER_NAME SENTINEL[,SENTINEL…] FIRST_ADDR SECOND_ADDR");
        return ExitCode::from(2);
    };
    let sentinels: Vec<&str> = sentinels.split(',').collect();
    let router = Router::new(first.clone(), second.clone());
    let monitor = match SentinelMonitor::new(master.clone(), &sentinels) {
        Ok(m) => m.keepalive(Duration::from_millis(300)),
        Err(e) => {
            eprintln!("redis-writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let node = HaNode::builder()
        .node_id("writer")
        .single_node()
        .sentinel(monitor)
        .follow_redis_master(master.clone(), router.clone(), String::as_str)
        .build();
    let node = match node {
        Ok(node) => node,
        Err(e) => {
            eprintln!("redis-writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = node.start().await {
        eprintln!("redis-writer: {e}");
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    let mut client: Option<(String, Client)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
        }
        let addr = router.current().as_ref().clone();
        if client.as_ref().is_none_or(|(a, _)| *a != addr) {
            client = match connect(&addr).await {
                Ok(c) => Some((addr.clone(), c)),
                Err(e) => {
                    println!("failed on {addr}: {e}");
                    continue;
                }
            };
        }
        let Some((_, c)) = &client else { continue };
        let cmd = CustomCommand::new_static("INCR", ClusterHash::FirstKey, false);
        let write = c.custom::<i64, &str>(cmd, vec!["writes"]);
        let ms = started.elapsed().as_millis();
        match tokio::time::timeout(Duration::from_millis(300), write).await {
            Ok(Ok(n)) => println!("ok {n} on {addr} (+{ms} ms)"),
            Ok(Err(e)) => println!("failed on {addr}: {e}"),
            Err(_) => {
                println!("failed on {addr}: timed out");
                client = None;
            }
        }
    }
    node.shutdown().await;
    ExitCode::SUCCESS
}
