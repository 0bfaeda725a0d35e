//! Add HA to your own axum service: the node's builder, your routes beside the node's
//! `/status`, and a leader-only job that passes its fencing token to every write.
//!
//! Run it with `cargo run --example embedded` (it ends after 5 s; `-- --for 60` for longer)
//! and try `curl localhost:3000/orders` and `curl localhost:3000/ha/status` meanwhile.
#![allow(clippy::print_stdout)] // printing is what this program is for

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use ha_election::{MemoryFence, MemoryLeaseStore};
use ha_health::{CheckConfig, CheckResult, FnCheck};
use ha_orchestrator::HaNode;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    ha_examples::init_tracing_quiet();
    let seconds: u64 = std::env::args()
        .skip_while(|a| a != "--for")
        .nth(1)
        .map_or(Ok(5), |s| s.parse())?;

    // 1. The node: an election (in memory here; `RedisLeaseStore::connect(url)` across
    //    processes) and a health check of something this service needs.
    let node = HaNode::builder()
        .node_id("orders-1")
        .cluster("orders")
        .election(Arc::new(MemoryLeaseStore::new()))
        .check(
            FnCheck::new("database", || async {
                CheckResult::healthy("SELECT 1 answered")
            }),
            CheckConfig::default().interval(Duration::from_secs(1)),
        )
        .build()?;
    node.start().await?;

    // 2. Your routes, with the node's API mounted under /ha (/ha/status, /ha/ready, …).
    let orders = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&orders);
    let app = Router::new()
        .route(
            "/orders",
            get(move || {
                let count = Arc::clone(&count);
                async move { format!("{} orders written\n", count.load(Ordering::SeqCst)) }
            }),
        )
        .nest("/ha", ha_orchestrator::http::router(node.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!(
        "serving http://{}/orders and /ha/status",
        listener.local_addr()?
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // 3. Leader-only work: ask the gate before each write and pass the term's token to the
    //    write, where a fence refuses any token older than one it has seen.
    let fence = MemoryFence::default();
    let gate = node.leadership();
    let stop = tokio::time::sleep(Duration::from_secs(seconds));
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = tick.tick() => {}
        }
        let Some(lead) = gate.is_leader() else {
            continue; // a follower does nothing
        };
        fence.admit("orders-table", lead.token)?;
        let n = orders.fetch_add(1, Ordering::SeqCst) + 1;
        println!("order {n} written under fencing token {}", lead.token);
    }

    node.shutdown().await; // not ready → leadership released → components stopped
    server.abort();
    println!("status after shutdown: {:?}", node.phase());
    Ok(())
}
