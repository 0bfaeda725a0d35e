//! Redis grants and renewals that must reach a replica (`require_replica_ack`: `WAIT 1`
//! pipelined with the script), on a real master with one real replica; and operations the
//! caller gave up on are not written once the connection comes back (fred's own command
//! timeout).

use std::sync::Arc;
use std::time::Duration;

use ha_core::{Component, ComponentContext, NodeId};
use ha_election::redis::record_key;
use ha_election::testing::{LONG_TTL, OP_TIMEOUT, unique_key};
use ha_election::{
    Acquire, Elector, ElectorConfig, ElectorEvent, Error, LeaseStore, RedisLeaseStore,
    RedisLeaseStoreOptions, Role,
};
use ha_testkit::{FaultProxy, ProxyMode, RedisReplicaSet};
use tokio::time::Instant;

fn node(name: &str) -> NodeId {
    NodeId::new(name)
}

async fn acked_store(set: &RedisReplicaSet) -> RedisLeaseStore {
    RedisLeaseStore::connect_with(
        &set.master().url(),
        RedisLeaseStoreOptions::new().require_replica_ack(true),
    )
    .await
    .expect("connect to the master")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_renewals_count_only_when_a_replica_acknowledges_them() {
    let mut set = RedisReplicaSet::start(1).await.expect("master + replica");
    let store = acked_store(&set).await;
    let key = unique_key("replica-ack");
    let token = match store
        .acquire(&key, &node("a"), LONG_TTL, None, OP_TIMEOUT)
        .await
        .expect("granted with a replica up")
    {
        Acquire::Acquired(token) => token,
        other => panic!("a fresh key is granted: {other:?}"),
    };
    assert!(
        store
            .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renewed with a replica up")
    );

    set.replicas_mut()[0].pause().expect("SIGSTOP the replica");
    let err = store
        .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
        .await
        .expect_err("a renewal no replica acknowledged must not count");
    assert!(
        matches!(
            err,
            Error::NotReplicated {
                op: "renew",
                acked: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());
    let other = unique_key("replica-ack-grant");
    let err = store
        .acquire(&other, &node("a"), LONG_TTL, None, OP_TIMEOUT)
        .await
        .expect_err("a grant no replica acknowledged must not count");
    assert!(
        matches!(err, Error::NotReplicated { op: "acquire", .. }),
        "{err}"
    );
    // Reads and releases do not wait for replicas.
    assert!(store.read(&key, OP_TIMEOUT).await.expect("read").is_some());

    set.replicas_mut()[0].resume().expect("SIGCONT the replica");
    assert!(
        store
            .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renewals count again once the replica acknowledges")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_master_reaches_no_replica_loses_leadership_by_its_deadline() {
    let mut set = RedisReplicaSet::start(1).await.expect("master + replica");
    let store: Arc<dyn LeaseStore> = Arc::new(acked_store(&set).await);
    let ttl = Duration::from_secs(2);
    let config = ElectorConfig::with_ttl(unique_key("replica-ack-leader"), ttl, ttl / 20);
    let renew_deadline = config.renew_deadline;
    let elector = Elector::builder(store)
        .config(config)
        .build()
        .expect("valid config");
    elector
        .start(ComponentContext::standalone("a"))
        .await
        .expect("starts");
    let mut role = elector.subscribe();
    tokio::time::timeout(ttl * 5, role.wait_for(|r| matches!(r, Role::Leader(_))))
        .await
        .expect("leads within 5 ttl")
        .expect("elector alive");
    // Renewals count while the replica acknowledges them: still leading after several.
    let mut events = elector.events();
    let mut renewals = 0;
    while renewals < 3 {
        let event = tokio::time::timeout(ttl, events.recv())
            .await
            .expect("renewals go on")
            .expect("events open");
        if matches!(event, ElectorEvent::Renewed { .. }) {
            renewals += 1;
        }
    }
    assert!(
        elector.is_leader().is_some(),
        "renewals with a replica count"
    );

    set.replicas_mut()[0].pause().expect("SIGSTOP the replica");
    let paused = Instant::now();
    tokio::time::timeout(
        renew_deadline + Duration::from_millis(500),
        role.wait_for(|r| matches!(r, Role::Follower)),
    )
    .await
    .expect("leadership ends by the deadline of the last acknowledged renewal")
    .expect("elector alive");
    let lost_after = paused.elapsed();
    assert!(elector.is_leader().is_none());
    assert!(
        lost_after <= renew_deadline + Duration::from_millis(500),
        "lost after {lost_after:?}"
    );
    set.replicas_mut()[0].resume().expect("SIGCONT the replica");
    elector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_the_caller_gave_up_on_is_not_written_after_a_reconnect() {
    let set = RedisReplicaSet::start(0).await.expect("a lone master");
    let proxy = FaultProxy::start(set.master().addr()).expect("proxy");
    let store = RedisLeaseStore::connect(&format!("redis://{}", proxy.addr()))
        .await
        .expect("connect through the proxy");
    let key = unique_key("gave-up");
    // The connection drops and every reconnect is refused: commands queue inside fred.
    proxy.set_mode(ProxyMode::DropNew);
    proxy.cut_connections();
    // The first command finds the connection closed; from then on fred is reconnecting.
    store
        .read(&key, OP_TIMEOUT)
        .await
        .expect_err("the connection was cut");
    let err = store
        .acquire(&key, &node("a"), LONG_TTL, None, Duration::from_millis(300))
        .await
        .expect_err("no server to answer");
    // fred's own timeout ends first (it marks the queued command as not to be written).
    assert!(err.is_retryable(), "{err}");

    proxy.set_mode(ProxyMode::Pass);
    // Sent after the abandoned acquire on the same connection: it would see its write.
    let seen = loop {
        match store.read(&key, OP_TIMEOUT).await {
            Ok(seen) => break seen,
            Err(e) if e.is_retryable() => continue,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(seen, None, "the abandoned acquire was written after all");
    let direct = set
        .master()
        .command(&["EXISTS", &record_key(&key)])
        .await
        .expect("EXISTS");
    assert_eq!(direct.as_int(), Some(0), "no record on the server");
}
