//! Client routing moves in every process that observes a change, leader or not.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use ha_core::{HaEvent, NodeId};
use ha_election::{ElectorConfig, MemoryLeaseStore};
use ha_failover::{Router, Target};
use ha_orchestrator::HaNode;

fn to_new_master(event: &HaEvent) -> Option<Target> {
    matches!(event, HaEvent::RedisMasterSwitched { .. }).then_some(Target::Secondary)
}

#[tokio::test]
async fn a_follower_moves_its_own_router_when_it_observes_a_master_switch() {
    let store = Arc::new(MemoryLeaseStore::new());
    let config = ElectorConfig::with_ttl("-", Duration::from_secs(2), Duration::from_millis(200));
    let leader_router = Router::new("10.0.0.1:6379".to_owned(), "10.0.0.2:6379".to_owned());
    // Two processes: two routers, each moved only by what its own process observes.
    let follower_router = Router::new("10.0.0.1:6379".to_owned(), "10.0.0.2:6379".to_owned());
    let a = HaNode::builder()
        .node_id("a")
        .election_with(store.clone(), config.clone())
        .route(leader_router.clone(), to_new_master)
        .build()
        .unwrap();
    let b = HaNode::builder()
        .node_id("b")
        .election_with(store, config)
        .route(follower_router.clone(), to_new_master)
        .build()
        .unwrap();
    a.start().await.unwrap();
    b.start().await.unwrap();

    // Whichever node follows observes the switch on its own bus (as its own sentinel
    // monitor would publish it) and moves its own router.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (follower, router, other) = loop {
        if a.is_leader().is_some() {
            break (&b, &follower_router, &leader_router);
        }
        if b.is_leader().is_some() {
            break (&a, &leader_router, &follower_router);
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(follower.is_leader().is_none());
    assert_eq!(router.active(), Target::Primary);
    follower.bus().publish(HaEvent::RedisMasterSwitched {
        at: SystemTime::now(),
        node: NodeId::new(follower.node_id().as_str()),
        master: "cache".into(),
        from: "10.0.0.1:6379".into(),
        to: "10.0.0.2:6379".into(),
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while router.active() != Target::Secondary {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the follower's router never moved"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        other.active(),
        Target::Primary,
        "a process moves only on what it observes"
    );
    a.shutdown().await;
    b.shutdown().await;
}

fn switch(node: &HaNode, master: &str, from: &str, to: &str) {
    node.bus().publish(HaEvent::RedisMasterSwitched {
        at: SystemTime::now(),
        node: NodeId::new(node.node_id().as_str()),
        master: master.into(),
        from: from.into(),
        to: to.into(),
    });
}

async fn wait_for(router: &Router<String>, target: Target, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while router.active() != target {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_follower_follows_the_redis_master_its_sentinel_monitor_names_and_back() {
    let store = Arc::new(MemoryLeaseStore::new());
    let config = ElectorConfig::with_ttl("-", Duration::from_secs(2), Duration::from_millis(200));
    let routers = [
        Router::new("10.0.0.1:6379".to_owned(), "10.0.0.2:6379".to_owned()),
        Router::new("10.0.0.1:6379".to_owned(), "10.0.0.2:6379".to_owned()),
    ];
    // Hooks run in order: once `seen` counts an event, the router has acted on it.
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = |seen: &Arc<AtomicUsize>| {
        let seen = Arc::clone(seen);
        move |event: &HaEvent| {
            if matches!(event, HaEvent::RedisMasterSwitched { .. }) {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let nodes = [
        HaNode::builder()
            .node_id("a")
            .election_with(store.clone(), config.clone())
            .follow_redis_master("cache", routers[0].clone(), String::as_str)
            .on_event(counted(&seen))
            .build()
            .unwrap(),
        HaNode::builder()
            .node_id("b")
            .election_with(store, config)
            .follow_redis_master("cache", routers[1].clone(), String::as_str)
            .on_event(counted(&seen))
            .build()
            .unwrap(),
    ];
    for node in &nodes {
        node.start().await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let follower = loop {
        if let Some(i) = nodes.iter().position(|n| n.is_leader().is_some()) {
            break 1 - i;
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (node, router) = (&nodes[follower], &routers[follower]);
    assert!(node.is_leader().is_none());

    // Another master's switch is not ours; then ours, to the secondary and back.
    switch(node, "other", "10.0.0.1:6379", "10.0.0.2:6379");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen.load(Ordering::SeqCst) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event was never observed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        router.active(),
        Target::Primary,
        "another master's switch moved it"
    );
    switch(node, "cache", "10.0.0.1:6379", "10.0.0.2:6379");
    wait_for(
        router,
        Target::Secondary,
        "the follower's router never followed the master",
    )
    .await;
    switch(node, "cache", "10.0.0.2:6379", "10.0.0.1:6379");
    wait_for(
        router,
        Target::Primary,
        "the follower's router never followed the master back",
    )
    .await;
    assert_eq!(
        routers[1 - follower].active(),
        Target::Primary,
        "a process moves only on what it observes"
    );
    // A switch to an address neither target has moves nothing.
    let before = seen.load(Ordering::SeqCst);
    switch(node, "cache", "10.0.0.1:6379", "10.0.0.9:6379");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen.load(Ordering::SeqCst) <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event was never observed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        router.active(),
        Target::Primary,
        "an unknown address moved it"
    );
    for node in &nodes {
        node.shutdown().await;
    }
}
