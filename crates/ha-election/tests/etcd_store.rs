//! `EtcdLeaseStore` against a real 3-member etcd cluster: the conformance suite, then what only
//! etcd can do to a lease store (a lease that vanishes, a member partitioned away, a whole
//! cluster restarted).

use std::time::{Duration, Instant};

use ha_core::NodeId;
use ha_election::testing::{LONG_TTL, OP_TIMEOUT, must_take_over, unique_key};
use ha_election::{Acquire, Error, EtcdLeaseStore, LeaseStore};
use ha_testkit::{EtcdCluster, ProxyMode};

/// A store with the cluster it talks to (through every member's proxy) as its guard.
async fn store_with_cluster() -> (EtcdLeaseStore, EtcdCluster) {
    let cluster = EtcdCluster::start().await.expect("start an etcd cluster");
    let store = EtcdLeaseStore::connect(&cluster.endpoints())
        .await
        .expect("connect");
    (store, cluster)
}

mod conformance {
    ha_election::lease_store_conformance!(super::store_with_cluster());
}

fn node(name: &str) -> NodeId {
    NodeId::new(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_revisions_and_keep_growing_across_a_whole_cluster_restart() {
    let (store, mut cluster) = store_with_cluster().await;
    let key = unique_key("etcd-restart");
    let mut last = None;
    for _ in 0..3 {
        let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
        assert!(last.is_none_or(|l| token > l));
        assert!(
            store
                .release(&key, &node("a"), token, OP_TIMEOUT)
                .await
                .expect("release")
        );
        last = Some(token);
    }
    cluster.restart_all().await.expect("restart the cluster");
    // The tombstone survived (etcd persists it), and the next grant's revision is greater.
    let deadline = Instant::now() + Duration::from_secs(20);
    let token = loop {
        let attempt = async {
            let current = store.read(&key, Duration::from_secs(1)).await?;
            store
                .acquire(
                    &key,
                    &node("b"),
                    LONG_TTL,
                    current.map(|i| i.record()).as_ref(),
                    Duration::from_secs(1),
                )
                .await
        };
        match attempt.await {
            Ok(Acquire::Acquired(token)) => break token,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no grant after the restart: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let last = last.expect("tokens");
    assert!(token > last, "{token} after {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_behind_the_holders_back_ends_the_term() {
    let (store, cluster) = store_with_cluster().await;
    let key = unique_key("etcd-revoked");
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
    let mut client = etcd_client::Client::connect(&cluster.endpoints(), None)
        .await
        .expect("connect a raw client");
    let record = client.get(store.record_key(&key), None).await.expect("get");
    let lease = record.kvs().first().expect("the record").lease();
    assert_ne!(lease, 0, "the record is on an etcd lease");
    client.lease_revoke(lease).await.expect("revoke");
    assert!(
        !store
            .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew"),
        "the lease and its record are gone: not renewed"
    );
    assert_eq!(store.read(&key, OP_TIMEOUT).await.expect("read"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_cluster_turns_an_operation_into_a_timeout_naming_op_and_key() {
    let (store, cluster) = store_with_cluster().await;
    let key = unique_key("etcd-blackhole");
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
    for i in 0..3 {
        cluster.proxy(i).set_mode(ProxyMode::Blackhole);
    }
    let started = Instant::now();
    let err = store
        .renew(
            &key,
            &node("a"),
            token,
            LONG_TTL,
            Duration::from_millis(300),
        )
        .await
        .expect_err("no member answers");
    assert!(
        matches!(&err, Error::Timeout { op: "renew", key: k, .. } if *k == key),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    for i in 0..3 {
        cluster.proxy(i).set_mode(ProxyMode::Pass);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_partitioned_member_does_not_stop_the_store() {
    let (store, cluster) = store_with_cluster().await;
    let key = unique_key("etcd-one-down");
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
    cluster.proxy(0).set_mode(ProxyMode::Blackhole);
    // Every renewal is retried within a second at most; the balancer leaves the dead member.
    let mut failures = 0;
    for _ in 0..20 {
        match store
            .renew(
                &key,
                &node("a"),
                token,
                LONG_TTL,
                Duration::from_millis(500),
            )
            .await
        {
            Ok(renewed) => assert!(renewed),
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                failures += 1;
            }
        }
    }
    assert!(
        failures < 10,
        "{failures} of 20 renewals failed with one member of three cut off"
    );
    let info = store
        .read(&key, OP_TIMEOUT)
        .await
        .expect("read")
        .expect("held");
    assert_eq!((info.holder, info.token), (node("a"), token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_hears_of_grants_and_releases_but_not_of_renewals() {
    let (store, _cluster) = store_with_cluster().await;
    let key = unique_key("etcd-watch");
    let mut watch = store
        .watch(&key)
        .await
        .expect("watch")
        .expect("etcd pushes");
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
    let change = tokio::time::timeout(OP_TIMEOUT, watch.recv())
        .await
        .expect("the grant is pushed")
        .expect("open");
    assert_eq!(change.key, key);
    for _ in 0..3 {
        assert!(
            store
                .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
                .await
                .expect("renew")
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch.recv())
            .await
            .is_err(),
        "renewals are not pushed"
    );
    assert!(
        store
            .release(&key, &node("a"), token, OP_TIMEOUT)
            .await
            .expect("release")
    );
    let change = tokio::time::timeout(OP_TIMEOUT, watch.recv())
        .await
        .expect("the release is pushed")
        .expect("open");
    assert_eq!(change.key, key);
}
