//! `SentinelMonitor` against three real sentinels watching a master and a replica: the
//! confirmed master, replicas and sentinels by field, the quorum, falling through a dead
//! sentinel, and a killed master announced as `+switch-master` and then reported as the new
//! master.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_core::{Component, ComponentContext, EventBus, HaEvent, NodeId, Status};
use ha_replication::SentinelMonitor;
use ha_testkit::{RedisReplicaSet, SentinelOptions, SentinelSet};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_the_cluster_and_follows_a_failover() {
    let mut set = RedisReplicaSet::start(1).await.unwrap();
    let mut sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .unwrap();
    let addrs: Vec<String> = sentinels.addrs().iter().map(ToString::to_string).collect();
    let monitor = SentinelMonitor::new(sentinels.master_name(), &addrs).unwrap();

    let master = monitor.master().await.unwrap();
    assert_eq!(master.addr, set.master().addr().to_string());
    assert_eq!(master.role, "master");
    let replicas = monitor.replicas().await.unwrap();
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0].addr, set.replicas()[0].addr().to_string());
    assert!(
        replicas[0].flags.contains(&"slave".to_owned()),
        "{:?}",
        replicas[0].flags
    );
    assert!(!replicas[0].is_down());
    assert_eq!(
        monitor.sentinels().await.unwrap().len(),
        2,
        "the other two sentinels"
    );
    let quorum = monitor.ckquorum().await.unwrap();
    assert!(quorum.ok, "{quorum:?}");

    // The first sentinel is down: queries fall through to the next.
    sentinels.sentinels_mut()[0].kill().unwrap();
    assert_eq!(monitor.master().await.unwrap().addr, master.addr);

    let bus = EventBus::default();
    let mut events = bus.subscribe();
    assert_eq!(monitor.status(), Status::Unknown, "not started");
    let ctx = ComponentContext::standalone(NodeId::new("n1")).with_bus(bus.clone());
    monitor.start(ctx.clone()).await.unwrap();
    assert!(
        monitor.start(ctx).await.is_err(),
        "a second start is refused"
    );
    // Let the watcher subscribe before the fault: the subscription succeeds within a second
    // or two, and any switch it missed would be caught up anyway.
    let old = set.master().addr();
    set.master_mut().kill().unwrap();

    let deadline = Instant::now() + WAIT;
    let (from, to) = loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("no +switch-master within the deadline")
            .unwrap();
        if let HaEvent::RedisMasterSwitched {
            from, to, master, ..
        } = event
        {
            assert_eq!(master, sentinels.master_name());
            break (from, to);
        }
    };
    assert_eq!(from, old.to_string());
    assert_eq!(to, set.replicas()[0].addr().to_string());
    assert_eq!(
        monitor.status(),
        Status::Healthy,
        "subscribed to a live sentinel"
    );
    let now = monitor.master().await.unwrap();
    assert_eq!(now.addr, to);
    assert_eq!(now.role, "master");
    monitor.stop().await.unwrap();
    monitor.stop().await.unwrap();
}
