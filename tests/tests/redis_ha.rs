//! The Redis deployment of `examples/config/redis-ha/`, through ha-testkit: one master, two
//! replicas, three sentinels, three `ha-node` processes monitoring the sentinels
//! (`[replication.sentinel]`, leases on the same Redis through the sentinels), and a writer
//! that writes through a `Router` fed by its own sentinel monitor. The master is killed; the
//! writes resume on the new master, and every node observed the switch.
//!
//! The `ha-node` binary comes from `cargo build -p ha-orchestrator --bins`; a missing one
//! fails the test with that command.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::net::SocketAddr;
use std::time::Duration;

use ha_failover::{Router, Target};
use ha_orchestrator::HaNode;
use ha_replication::SentinelMonitor;
use ha_testkit::{
    HaNodeCluster, HaNodeOptions, RedisReplicaSet, RespValue, SentinelOptions, SentinelSet,
};
use tokio::time::Instant;

const BUILD_HINT: &str = "cargo build -p ha-orchestrator --bins";
const WAIT: Duration = Duration::from_secs(40);

/// One `INCR` through the router's current target; the address it went to and the count.
async fn write(router: &Router<String>) -> Result<(SocketAddr, i64), String> {
    let addr: SocketAddr = router.current().parse().map_err(|e| format!("{e}"))?;
    match ha_testkit::redis::command(addr, &["INCR", "writes"], Duration::from_millis(300)).await {
        Ok(RespValue::Integer(n)) => Ok((addr, n)),
        Ok(other) => Err(format!("{addr}: {other}")),
        Err(e) => Err(format!("{addr}: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_on_the_new_master_through_a_router_fed_by_the_sentinels() {
    let binary =
        ha_testkit::ha_node::built_binary("ha-node", BUILD_HINT).unwrap_or_else(|e| panic!("{e}"));
    let mut set = RedisReplicaSet::start(2).await.unwrap();
    let sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .unwrap();
    let name = sentinels.master_name().to_owned();
    // A two-target router: the second replica is never promoted (replica-priority 0, as the
    // example does), so the first replica is the only other master there can be.
    let never = set.replicas()[1].addr();
    set.replicas()[1]
        .command(&["CONFIG", "SET", "replica-priority", "0"])
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    for sentinel in sentinels.sentinels() {
        loop {
            let reply = sentinel
                .command(&["SENTINEL", "REPLICAS", &name])
                .await
                .unwrap();
            let seen = reply.as_array().unwrap_or_default().iter().any(|r| {
                r.field("ip").and_then(RespValue::as_str).is_some()
                    && r.field("port").and_then(RespValue::as_str)
                        == Some(never.port().to_string().as_str())
                    && r.field("slave-priority").and_then(RespValue::as_str) == Some("0")
            });
            if seen {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels never saw replica-priority 0"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let addrs: Vec<String> = sentinels.addrs().iter().map(ToString::to_string).collect();
    let store = format!("redis+sentinel://{}/{name}", addrs.join(","));
    let options = HaNodeOptions {
        extra_toml: format!(
            "[replication.sentinel]\nmaster = \"{name}\"\nsentinels = [{}]\nkeepalive = \"300ms\"\n",
            addrs
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        ..HaNodeOptions::default()
    };
    let cluster = HaNodeCluster::start(&binary, &store, &["a", "b", "c"], &options)
        .unwrap_or_else(|e| panic!("cannot start the nodes: {e}"));

    // The writer: its own sentinel monitor moves its own router.
    let old = set.master().addr();
    let new = set.replicas()[0].addr();
    let router = Router::new(old.to_string(), new.to_string());
    let monitor = SentinelMonitor::new(&name, &addrs)
        .unwrap()
        .keepalive(Duration::from_millis(300));
    let writer = HaNode::builder()
        .node_id("writer")
        .single_node()
        .sentinel(monitor)
        .follow_redis_master(&name, router.clone(), String::as_str)
        .build()
        .unwrap();
    writer.start().await.unwrap();
    let deadline = Instant::now() + WAIT;
    let mut last = loop {
        match write(&router).await {
            Ok((addr, n)) => break (addr, n),
            Err(e) => assert!(Instant::now() < deadline, "no write before the fault: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(last.0, old);
    set.master_mut().kill().unwrap();
    let deadline = Instant::now() + WAIT;
    let resumed = loop {
        match write(&router).await {
            Ok((addr, n)) if addr != old => break (addr, n),
            Ok(ok) => last = ok,
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "writes never resumed on a new master (router at {}, last write {last:?})",
            router.current()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(resumed.0, new, "the only promotable replica");
    assert_eq!(router.active(), Target::Secondary);
    assert_eq!(
        set.replicas()[0].role().await.unwrap(),
        "master",
        "writes go to a master"
    );
    assert!(resumed.1 >= 1);

    // Every ha-node observed the switch through its own monitor.
    let deadline = Instant::now() + WAIT;
    for node in cluster.nodes() {
        loop {
            let (code, body) = node.get("/status").unwrap();
            if code == 200
                && body.contains("redis_master_switched")
                && body.contains(&new.to_string())
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never reported the switch: {code} {body}",
                node.id()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    writer.shutdown().await;
    drop(cluster);
}
