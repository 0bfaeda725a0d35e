//! Client routing moves in every process that observes a change, leader or not.

use std::sync::Arc;
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
