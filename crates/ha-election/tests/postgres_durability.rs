//! `PostgresLeaseStore` against servers with replicas (each case starts its own: a replica
//! changes what every store on that server may do), and its connection rules: asynchronous
//! replication refused unless allowed, standbys refused, `statement_timeout` from the
//! operation's timeout, a bounded number of connections.

use std::time::Duration;

use ha_core::NodeId;
use ha_election::testing::{LONG_TTL, unique_key};
use ha_election::{
    Acquire, Durability, Error, LeaseStore, PostgresLeaseStore, PostgresLeaseStoreOptions,
};
use ha_testkit::PostgresServer;
use sqlx::Connection;
use tokio::time::Instant;

/// Polls `probe` until it is true, failing after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !probe().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_server_is_accepted_as_single() {
    let server = PostgresServer::start().await.unwrap();
    let store = PostgresLeaseStore::connect(&server.url()).await.unwrap();
    assert_eq!(store.durability(), Some(Durability::Single));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_replication_is_refused_unless_allowed_and_a_standby_always() {
    let primary = PostgresServer::start().await.unwrap();
    let replica = primary.start_replica().await.unwrap();
    let err = PostgresLeaseStore::connect(&primary.url())
        .await
        .expect_err("an asynchronous replica loses grants on failover");
    match &err {
        Error::UnsafeSetting { setting, why, .. } => {
            assert_eq!(*setting, "synchronous_standby_names");
            assert!(why.contains("asynchronous"), "{err}");
        }
        other => panic!("expected UnsafeSetting, got {other}"),
    }
    let allowed = PostgresLeaseStore::connect_with(
        &primary.url(),
        PostgresLeaseStoreOptions::new().allow_async_replication(true),
    )
    .await
    .expect("allowed explicitly");
    assert_eq!(
        allowed.durability(),
        Some(Durability::Asynchronous { replicas: 1 })
    );
    let on_standby = PostgresLeaseStore::connect_with(
        &replica.url(),
        PostgresLeaseStoreOptions::new().allow_async_replication(true),
    )
    .await
    .expect_err("a standby cannot hold leases");
    assert!(on_standby.to_string().contains("recovery"), "{on_standby}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_is_accepted() {
    let primary = PostgresServer::start().await.unwrap();
    let _replica = primary.start_replica().await.unwrap();
    primary
        .execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await
        .unwrap();
    primary.execute("SELECT pg_reload_conf()").await.unwrap();
    eventually(
        "the standby is synchronous",
        Duration::from_secs(10),
        || {
            let primary = &primary;
            async move {
                primary
                    .query_scalar::<i64>(
                        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                    )
                    .await
                    .unwrap()
                    == 1
            }
        },
    )
    .await;
    let store = PostgresLeaseStore::connect(&primary.url()).await.unwrap();
    assert_eq!(
        store.durability(),
        Some(Durability::Synchronous {
            standbys: 1,
            replicas: 1
        })
    );
}

/// Backends of the store (application `ha-election`) in `state`-filtered `pg_stat_activity`.
async fn store_backends(server: &PostgresServer, filter: &str) -> i64 {
    server
        .query_scalar::<i64>(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ha-election' {filter}"
        ))
        .await
        .expect("pg_stat_activity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_the_client_gave_up_on_is_cancelled_not_committed() {
    let server = PostgresServer::start().await.unwrap();
    let store = PostgresLeaseStore::connect(&server.url()).await.unwrap();
    let key = unique_key("pg-statement-timeout");
    let a = NodeId::new("a");
    let Acquire::Acquired(token) = store
        .acquire(&key, &a, LONG_TTL, None, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("vacant key granted");
    };
    assert!(
        store
            .release(&key, &a, token, Duration::from_secs(5))
            .await
            .unwrap()
    );
    let tombstone = store
        .read(&key, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap()
        .record();
    // Another session holds the row: the takeover's statement waits for its lock.
    let mut locker = server.connect().await.unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM ha_leases WHERE key = $1 FOR UPDATE")
        .bind(&key)
        .execute(&mut *tx)
        .await
        .unwrap();
    let b = NodeId::new("b");
    let err = store
        .acquire(
            &key,
            &b,
            LONG_TTL,
            Some(&tombstone),
            Duration::from_millis(300),
        )
        .await
        .expect_err("blocked by the row lock");
    // The client's timeout and the server's statement_timeout race: either may answer.
    assert!(
        matches!(err, Error::Timeout { .. }) || err.to_string().contains("statement timeout"),
        "{err}"
    );
    // The backend cancels its statement on its own (statement_timeout), while the lock is
    // still held; without it, it would wait and grant when the lock goes.
    eventually(
        "the backend stopped waiting for the lock",
        Duration::from_secs(5),
        || async { store_backends(&server, "AND wait_event_type = 'Lock'").await == 0 },
    )
    .await;
    tx.commit().await.unwrap();
    let now = store
        .read(&key, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        now.record(),
        tombstone,
        "the abandoned takeover did not commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_in_number() {
    let server = PostgresServer::start().await.unwrap();
    let store = PostgresLeaseStore::connect_with(
        &server.url(),
        PostgresLeaseStoreOptions::new().max_connections(1),
    )
    .await
    .unwrap();
    let key = unique_key("pg-bounded");
    let a = NodeId::new("a");
    let Acquire::Acquired(token) = store
        .acquire(&key, &a, LONG_TTL, None, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("vacant key granted");
    };
    let mut locker = server.connect().await.unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM ha_leases WHERE key = $1 FOR UPDATE")
        .bind(&key)
        .execute(&mut *tx)
        .await
        .unwrap();
    // One renewal waits on the row lock, holding the one connection …
    let blocked = {
        let (store, key, a) = (store.clone(), key.clone(), a.clone());
        tokio::spawn(async move {
            store
                .renew(&key, &a, token, LONG_TTL, Duration::from_secs(20))
                .await
        })
    };
    eventually(
        "the renewal waits for the lock",
        Duration::from_secs(5),
        || async { store_backends(&server, "AND wait_event_type = 'Lock'").await == 1 },
    )
    .await;
    // … so others wait for it instead of opening more.
    let (r1, r2) = tokio::join!(
        store.read(&key, Duration::from_millis(300)),
        store.read(&key, Duration::from_millis(300)),
    );
    assert!(matches!(r1, Err(Error::Timeout { .. })), "{r1:?}");
    assert!(matches!(r2, Err(Error::Timeout { .. })), "{r2:?}");
    assert_eq!(store_backends(&server, "").await, 1);
    tx.commit().await.unwrap();
    assert!(
        blocked.await.unwrap().unwrap(),
        "renewed once the lock went"
    );
}
