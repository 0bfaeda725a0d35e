//! The conformance suite and PostgreSQL-specific cases (crash recovery, partitions, concurrent
//! migrations, notifications) against real PostgreSQL servers from `ha-testkit`.
//!
//! Cases that do not kill or restart their server share one: [`shared_server`] hands out an
//! `Arc` and keeps only a `Weak` itself, so the server lives while any case uses it and is
//! stopped (and its directory removed) by the last user's drop — nothing outlives the test
//! process. Under `cargo test` the cases run as threads of one process and mostly share one
//! server; under nextest every case is its own process and starts its own, which is correct,
//! just slower. Every case uses its own keys (or table).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ha_core::{FencingToken, NodeId};
use ha_election::testing::{LONG_TTL, OP_TIMEOUT, must_take_over, unique_key};
use ha_election::{
    Acquire, Error, LeaseChange, LeaseStore, LeaseWatch, PostgresLeaseStore,
    PostgresLeaseStoreOptions,
};
use ha_testkit::{FaultProxy, PostgresServer, ProxyMode};

static SHARED: tokio::sync::Mutex<Weak<PostgresServer>> =
    tokio::sync::Mutex::const_new(Weak::new());

/// The server shared by the cases that leave it running, started by the first that needs it.
async fn shared_server() -> Arc<PostgresServer> {
    let mut shared = SHARED.lock().await;
    if let Some(server) = shared.upgrade() {
        return server;
    }
    let server = Arc::new(PostgresServer::start().await.expect("start PostgreSQL"));
    *shared = Arc::downgrade(&server);
    server
}

/// A store on the shared server, with the server as the guard that keeps it alive.
async fn shared_store() -> (PostgresLeaseStore, Arc<PostgresServer>) {
    let server = shared_server().await;
    let store = PostgresLeaseStore::connect(&server.url())
        .await
        .expect("connect and migrate");
    (store, server)
}

mod conformance {
    ha_election::lease_store_conformance!(super::shared_store());
}

fn node(name: &str) -> NodeId {
    NodeId::new(name)
}

/// Waits for a change of `key` on `watch`, skipping other keys, until `deadline`.
async fn next_change_of(watch: &mut LeaseWatch, key: &str, deadline: tokio::time::Instant) {
    loop {
        let change: LeaseChange = tokio::time::timeout_at(deadline, watch.recv())
            .await
            .unwrap_or_else(|_| panic!("no change of {key} was pushed in time"))
            .expect("watch channel open");
        if change.key == key {
            return;
        }
    }
}

/// Retries a takeover of the key's current record until the store answers (a restarted server
/// breaks pooled connections).
async fn acquire_when_up(store: &PostgresLeaseStore, key: &str, holder: &NodeId) -> Acquire {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let current = match store.read(key, OP_TIMEOUT).await {
            Ok(current) => current.map(|info| info.record()),
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => panic!("store never came back: {e}"),
        };
        match store
            .acquire(key, holder, LONG_TTL, current.as_ref(), OP_TIMEOUT)
            .await
        {
            Ok(outcome) => return outcome,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("store never came back: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_increasing_after_the_server_is_killed_and_restarted() {
    let mut server = PostgresServer::start().await.expect("start PostgreSQL");
    let store = PostgresLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    let key = unique_key("crash");
    let held_key = unique_key("crash-held");
    let mut highest = FencingToken(0);
    let held = must_take_over(&store, &held_key, &node("a"), LONG_TTL).await;
    for round in 0..3 {
        for _ in 0..5 {
            let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
            assert!(token > highest, "round {round}: {token} after {highest}");
            highest = token;
            assert!(
                store
                    .release(&key, &node("a"), token, OP_TIMEOUT)
                    .await
                    .expect("release")
            );
        }
        // Refused acquires draw sequence values too; none of them was ever handed out.
        for _ in 0..3 {
            assert!(matches!(
                store
                    .acquire(&held_key, &node("b"), LONG_TTL, None, OP_TIMEOUT)
                    .await
                    .expect("acquire"),
                Acquire::Held(_)
            ));
        }
        server.kill().expect("kill PostgreSQL");
        server.restart().await.expect("crash recovery");

        match acquire_when_up(&store, &key, &node("b")).await {
            Acquire::Acquired(token) => {
                assert!(
                    token > highest,
                    "after crash {round}: {token} after {highest}"
                );
                assert!(token > held, "{token} must exceed every token, also {held}");
                highest = token;
                assert!(
                    store
                        .release(&key, &node("b"), token, OP_TIMEOUT)
                        .await
                        .expect("release")
                );
            }
            other => panic!("a released key's tombstone must be taken after a crash: {other:?}"),
        }
        let info = store
            .read(&held_key, OP_TIMEOUT)
            .await
            .expect("read")
            .expect("a committed grant survives the crash");
        assert_eq!((info.holder, info.token), (node("a"), held));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_through_a_blackholed_proxy_times_out_naming_op_and_key() {
    let server = shared_server().await;
    let proxy = FaultProxy::start(server.addr()).expect("start proxy");
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    let store = PostgresLeaseStore::connect(&url).await.expect("connect");
    let key = unique_key("blackhole");
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;

    proxy.set_mode(ProxyMode::Blackhole);
    let timeout = Duration::from_millis(300);
    let slack = Duration::from_secs(1);
    for op in ["acquire", "renew", "release", "read"] {
        let started = Instant::now();
        let result = match op {
            "acquire" => store
                .acquire(&key, &node("b"), LONG_TTL, None, timeout)
                .await
                .map(drop),
            "renew" => store
                .renew(&key, &node("a"), token, LONG_TTL, timeout)
                .await
                .map(drop),
            "release" => store
                .release(&key, &node("a"), token, timeout)
                .await
                .map(drop),
            _ => store.read(&key, timeout).await.map(drop),
        };
        let elapsed = started.elapsed();
        match result {
            Err(Error::Timeout {
                store: "postgres",
                op: got_op,
                key: got_key,
                after,
            }) => {
                assert_eq!(
                    (got_op, got_key.as_str(), after),
                    (op, key.as_str(), timeout)
                );
            }
            other => panic!("{op} through a partition must time out, got {other:?}"),
        }
        assert!(
            elapsed >= timeout && elapsed < timeout + slack,
            "{op} took {elapsed:?} for a {timeout:?} timeout"
        );
    }

    // When the partition heals, the store works again (with whatever connections it has).
    proxy.set_mode(ProxyMode::Pass);
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        match store.read(&key, OP_TIMEOUT).await {
            Ok(info) => break info,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(%e, "store not back yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("store never recovered after the partition healed: {e}"),
        }
    };
    let info = info.expect("the lease is still held: nothing reached the server");
    assert_eq!((info.holder, info.token), (node("a"), token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_from_many_stores_succeed() {
    let server = shared_server().await;
    let table = format!("leases_migrate_{}", std::process::id());
    let options = PostgresLeaseStoreOptions::new()
        .schema(format!("ha_migrate_{}", std::process::id()))
        .table(&table)
        .max_connections(1);
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let url = server.url();
            let options = options.clone();
            tokio::spawn(async move { PostgresLeaseStore::connect_with(&url, options).await })
        })
        .collect();
    let mut stores = Vec::new();
    for start in starts {
        stores.push(
            start
                .await
                .expect("task")
                .expect("every concurrent migrate succeeds"),
        );
    }
    // Once more, now that everything exists: still fine, still one version row.
    stores[0].migrate().await.expect("migrate is idempotent");
    let versions: i64 = server
        .query_scalar(&format!(
            "SELECT count(*) FROM ha_migrate_{}.{table}_schema_version",
            std::process::id()
        ))
        .await
        .expect("count versions");
    assert_eq!(
        versions, 3,
        "each of the three migrations is recorded exactly once"
    );

    // All stores work on the same table.
    let key = unique_key("migrated");
    let token = must_take_over(&stores[3], &key, &node("a"), LONG_TTL).await;
    let info = stores[7]
        .read(&key, OP_TIMEOUT)
        .await
        .expect("read")
        .expect("held");
    assert_eq!(info.token, token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_receives_a_release_made_by_another_store() {
    let server = shared_server().await;
    let leader = PostgresLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    let follower = PostgresLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    let key = unique_key("watch-release");
    let token = must_take_over(&leader, &key, &node("a"), LONG_TTL).await;
    // Subscribed after the grant committed, so the only change of `key` it can see is the
    // release below.
    let mut watch = follower
        .watch(&key)
        .await
        .expect("watch")
        .expect("postgres pushes changes");
    assert!(
        !leader
            .release(&key, &node("b"), token, OP_TIMEOUT)
            .await
            .expect("release"),
        "a refused release changes nothing"
    );
    assert!(
        watch.try_recv().is_err(),
        "nothing was pushed for a refused release"
    );
    assert!(
        leader
            .release(&key, &node("a"), token, OP_TIMEOUT)
            .await
            .expect("release")
    );
    next_change_of(&mut watch, &key, tokio::time::Instant::now() + OP_TIMEOUT).await;
    let tombstone = follower
        .read(&key, OP_TIMEOUT)
        .await
        .expect("read")
        .expect("a tombstone");
    assert!(
        tombstone.released && tombstone.token == token,
        "{tombstone:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_when_the_store_is_dropped() {
    let server = shared_server().await;
    let store = PostgresLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    let key = unique_key("watch-drop");
    let mut watch = store.watch(&key).await.expect("watch").expect("pushes");
    drop(store);
    let closed = tokio::time::timeout(OP_TIMEOUT, async {
        loop {
            match watch.recv().await {
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) | Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the listener task must end with its store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resyncs_and_keeps_listening_after_the_server_restarts() {
    let mut server = PostgresServer::start().await.expect("start PostgreSQL");
    let store = PostgresLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    let key = unique_key("watch-restart");
    let mut watch = store.watch(&key).await.expect("watch").expect("pushes");
    server.kill().expect("kill");
    server.restart().await.expect("restart");
    // Changes made while the listener was down are lost; the store says "re-read" instead.
    next_change_of(
        &mut watch,
        &key,
        tokio::time::Instant::now() + Duration::from_secs(30),
    )
    .await;
    // And it listens again: a grant after the restart is pushed.
    assert!(matches!(
        acquire_when_up(&store, &key, &node("a")).await,
        Acquire::Acquired(_)
    ));
    next_change_of(&mut watch, &key, tokio::time::Instant::now() + OP_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_growing_after_the_sequence_is_reset() {
    let server = shared_server().await;
    let table = format!("leases_rewind_{}", std::process::id());
    let store = PostgresLeaseStore::connect_with(
        &server.url(),
        PostgresLeaseStoreOptions::new().table(&table),
    )
    .await
    .expect("connect");
    let key = unique_key("rewind");
    let mut last = FencingToken(0);
    for _ in 0..10 {
        last = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
        assert!(
            store
                .release(&key, &node("a"), last, OP_TIMEOUT)
                .await
                .expect("release")
        );
    }
    // A sequence reset (a restore, a move to another database, a late `nextval`) must not
    // lower tokens: the grant is floored by every row's token and by the database's clock.
    server
        .execute(&format!("ALTER SEQUENCE {table}_token_seq RESTART WITH 1"))
        .await
        .expect("rewind the sequence");
    let next = must_take_over(&store, &key, &node("b"), LONG_TTL).await;
    assert!(next > last, "{next} after {last}");
    // The clock floor: tokens are at least the database's time in microseconds.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros();
    assert!(
        u128::from(next.get()) + 60_000_000 > now_us,
        "{next} is floored by the clock ({now_us} µs)"
    );
    // Another key in the same table, after a reset, still gets a token above every row's.
    server
        .execute(&format!("ALTER SEQUENCE {table}_token_seq RESTART WITH 1"))
        .await
        .expect("rewind the sequence again");
    let other = must_take_over(&store, &unique_key("rewind-other"), &node("c"), LONG_TTL).await;
    assert!(other > next, "{other} after {next}");
}
