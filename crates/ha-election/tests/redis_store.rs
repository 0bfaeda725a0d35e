//! `RedisLeaseStore` against real `redis-server` and `redis-sentinel` processes: the conformance
//! suite, then what only Redis can do to a lease store (data loss, script loss, partitions,
//! failover).

use std::time::{Duration, Instant};

use ha_core::{FencingToken, NodeId};
use ha_election::redis::{counter_key, record_key};
use ha_election::testing::{LONG_TTL, OP_TIMEOUT, must_take_over, unique_key};
use ha_election::{Acquire, Error, LeaseStore, RedisLeaseStore, RedisLeaseStoreOptions};
use ha_testkit::{
    FaultProxy, ProxyMode, RedisReplicaSet, RedisServer, RespValue, SentinelOptions, SentinelSet,
};

/// A store with the server it talks to as its guard.
async fn store_with_server() -> (RedisLeaseStore, RedisServer) {
    let server = RedisServer::start().await.expect("start redis-server");
    let store = RedisLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    (store, server)
}

mod conformance {
    ha_election::lease_store_conformance!(super::store_with_server());
}

fn node(name: &str) -> NodeId {
    NodeId::new(name)
}

/// The `field` of `INFO commandstats`' line for `command`, e.g. `calls` of `evalsha`.
async fn command_stat(server: &RedisServer, command: &str, field: &str) -> u64 {
    let info = server
        .command(&["INFO", "commandstats"])
        .await
        .expect("INFO commandstats");
    let text = info.as_str().expect("INFO is text").to_owned();
    let prefix = format!("cmdstat_{command}:");
    let Some(line) = text.lines().find_map(|l| l.strip_prefix(&prefix)) else {
        return 0;
    };
    line.trim_end()
        .split(',')
        .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {line:?}"))
}

/// EVALSHA commands the server received: executed (including failed) plus rejected ones.
async fn evalsha_received(server: &RedisServer) -> u64 {
    command_stat(server, "evalsha", "calls").await
        + command_stat(server, "evalsha", "rejected_calls").await
}

/// Polls `acquire` until granted, tolerating errors while the client reconnects.
async fn acquire_eventually(
    store: &RedisLeaseStore,
    key: &str,
    holder: &NodeId,
    within: Duration,
) -> FencingToken {
    let deadline = Instant::now() + within;
    // Takes over whatever record it last saw (a store-level test: no follower's wait).
    let mut expected = None;
    loop {
        let last = match store
            .acquire(
                key,
                holder,
                LONG_TTL,
                expected.as_ref(),
                Duration::from_secs(1),
            )
            .await
        {
            Ok(Acquire::Acquired(token)) => return token,
            // An earlier attempt was granted but its answer was lost (a timeout or a dropped
            // connection mid-failover): the grant is ours all the same.
            Ok(Acquire::Held(info)) if info.holder == *holder && !info.released => {
                return info.token;
            }
            Ok(Acquire::Held(info)) => {
                expected = Some(info.record());
                format!("held: {info:?}")
            }
            Ok(Acquire::Vacant) => {
                expected = None;
                "vacant".to_owned()
            }
            Err(e) => format!("error: {e}"),
        };
        assert!(
            Instant::now() < deadline,
            "{key} not granted to {holder} within {within:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_growing_after_a_restart_that_lost_all_data() {
    let mut server = RedisServer::builder()
        .persistence(false)
        .start()
        .await
        .expect("start");
    let store = RedisLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    let key = unique_key("restart");
    let mut earlier = Vec::new();
    for _ in 0..5 {
        let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
        assert!(
            store
                .release(&key, &node("a"), token, OP_TIMEOUT)
                .await
                .expect("release")
        );
        earlier.push(token);
    }
    // A counter far ahead of the clock wins over the clock floor (max, not just TIME).
    let ahead = earlier.last().expect("tokens").get() + 1_000_000_000;
    server
        .command(&["SET", &counter_key(&key), &ahead.to_string()])
        .await
        .expect("SET counter");
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
    assert_eq!(
        token,
        FencingToken(ahead + 1),
        "counter + 1 when ahead of TIME"
    );
    assert!(
        store
            .release(&key, &node("a"), token, OP_TIMEOUT)
            .await
            .expect("release")
    );
    // Back to clock-based tokens for the data-loss part: forget the inflated counter.
    server
        .command(&["DEL", &counter_key(&key)])
        .await
        .expect("DEL counter");
    let before_restart = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
    earlier.push(before_restart);

    server.restart().await.expect("restart without persistence");
    assert!(
        server
            .command(&["EXISTS", &counter_key(&key), &record_key(&key)])
            .await
            .expect("EXISTS")
            .as_int()
            == Some(0),
        "the restart lost the counter and the lease"
    );
    let after = acquire_eventually(&store, &key, &node("b"), Duration::from_secs(15)).await;
    for token in &earlier {
        assert!(
            after > *token,
            "{after} after a data-losing restart must exceed {token}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_is_reloaded_once_and_costs_round_trips_only_then() {
    let server = RedisServer::start().await.expect("start");
    let store = RedisLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    let key = unique_key("noscript");
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
    let reply = server
        .command(&["SCRIPT", "FLUSH"])
        .await
        .expect("SCRIPT FLUSH");
    assert_eq!(reply, RespValue::Simple("OK".into()));

    let (evals, loads) = (
        evalsha_received(&server).await,
        command_stat(&server, "script|load", "calls").await,
    );
    assert!(
        store
            .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew after SCRIPT FLUSH")
    );
    assert_eq!(
        evalsha_received(&server).await - evals,
        2,
        "NOSCRIPT, then the retry"
    );
    assert_eq!(
        command_stat(&server, "script|load", "calls").await - loads,
        1
    );

    let (evals, loads) = (
        evalsha_received(&server).await,
        command_stat(&server, "script|load", "calls").await,
    );
    assert!(
        store
            .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew")
    );
    assert_eq!(evalsha_received(&server).await - evals, 1, "back to one");
    assert_eq!(
        command_stat(&server, "script|load", "calls").await - loads,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_server_turns_an_operation_into_a_timeout_naming_op_and_key() {
    let server = RedisServer::start().await.expect("start");
    let proxy = FaultProxy::start(server.addr()).expect("proxy");
    let store = RedisLeaseStore::connect(&format!("redis://{}", proxy.addr()))
        .await
        .expect("connect through the proxy");
    let key = unique_key("blackhole");
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;

    proxy.set_mode(ProxyMode::Blackhole);
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = store
        .renew(&key, &node("a"), token, LONG_TTL, timeout)
        .await
        .expect_err("nothing answers behind a blackhole");
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "gave up after {took:?}"
    );
    match &err {
        Error::Timeout {
            store,
            op,
            key: k,
            after,
        } => {
            assert_eq!(
                (*store, *op, k.as_str(), *after),
                ("redis", "renew", key.as_str(), timeout)
            );
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(err.is_retryable());

    // Healed, the store works again (fred replaces the unresponsive connection if needed).
    proxy.set_mode(ProxyMode::Pass);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.read(&key, Duration::from_secs(1)).await {
            Ok(Some(info)) => {
                assert_eq!((info.holder, info.token), (node("a"), token));
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "no recovery after the partition healed: {other:?}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_can_evict_leases_is_refused_unless_allowed() {
    let server = RedisServer::start().await.expect("start");
    for policy in ["volatile-ttl", "allkeys-lru"] {
        server
            .command(&["CONFIG", "SET", "maxmemory-policy", policy])
            .await
            .expect("CONFIG SET");
        match RedisLeaseStore::connect(&server.url()).await {
            Err(Error::UnsafeSetting { setting, value, .. }) => {
                assert_eq!((setting, value.as_str()), ("maxmemory-policy", policy));
            }
            other => panic!("{policy} must be refused, got {other:?}"),
        }
        let store = RedisLeaseStore::connect_with(
            &server.url(),
            RedisLeaseStoreOptions::new().allow_eviction(true),
        )
        .await
        .expect("an explicit opt-out connects");
        must_take_over(&store, &unique_key("evictable"), &node("a"), LONG_TTL).await;
    }
    server
        .command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await
        .expect("CONFIG SET");
    RedisLeaseStore::connect(&server.url())
        .await
        .expect("noeviction is fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_is_exactly_one_round_trip() {
    const RENEWALS: u64 = 25;
    let server = RedisServer::start().await.expect("start");
    let store = RedisLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    let key = unique_key("round-trips");
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
    let evals_before = command_stat(&server, "evalsha", "calls").await;
    for _ in 0..RENEWALS {
        assert!(
            store
                .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
                .await
                .expect("renew")
        );
    }
    assert_eq!(
        command_stat(&server, "evalsha", "calls").await - evals_before,
        RENEWALS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_hears_of_a_release_and_of_a_grant_but_not_of_other_keys() {
    let server = RedisServer::start().await.expect("start");
    let store = RedisLeaseStore::connect(&server.url())
        .await
        .expect("connect");
    let (key, other) = (unique_key("watch"), unique_key("watch-other"));
    let mut watch = store
        .watch(&key)
        .await
        .expect("watch")
        .expect("redis pushes");
    let other_token = must_take_over(&store, &other, &node("z"), LONG_TTL).await;
    let token = must_take_over(&store, &key, &node("a"), LONG_TTL).await;
    assert!(
        store
            .release(&key, &node("a"), token, OP_TIMEOUT)
            .await
            .expect("release")
    );
    assert!(
        store
            .release(&other, &node("z"), other_token, OP_TIMEOUT)
            .await
            .expect("release")
    );
    for what in ["grant", "release"] {
        let change = tokio::time::timeout(OP_TIMEOUT, watch.recv())
            .await
            .unwrap_or_else(|_| panic!("the {what} was not pushed"))
            .expect("open");
        assert_eq!(change.key, key, "{what}: only the watched key is reported");
    }
    assert!(
        watch.try_recv().is_err(),
        "nothing else: the other key is not reported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sentinel_failover_the_lease_is_granted_on_the_new_master_with_a_greater_token() {
    // Two replicas: behind Sentinel a grant counts only once a replica acknowledged it, so the
    // new master needs one of its own after the failover.
    let mut set = RedisReplicaSet::start(2).await.expect("replica set");
    let sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .expect("sentinels");
    let store = RedisLeaseStore::connect_sentinel(&sentinels.addrs(), set.master_name())
        .await
        .expect("connect via sentinel");
    let key = unique_key("failover");
    let ttl = Duration::from_secs(2);
    let old = match store
        .acquire(&key, &node("a"), ttl, None, OP_TIMEOUT)
        .await
        .expect("acquire on the first master")
    {
        Acquire::Acquired(token) => token,
        held => panic!("fresh key must be granted: {held:?}"),
    };
    let old_master = set.master().addr();
    let record = set
        .master()
        .command(&["GET", &record_key(&key)])
        .await
        .expect("GET");
    assert!(
        record
            .as_str()
            .is_some_and(|r| r.starts_with(&old.to_string())),
        "the lease was written to the first master: {record}"
    );

    set.master_mut().kill().expect("kill the master");
    let new_master = sentinels
        .wait_for_failover(old_master, Duration::from_secs(30))
        .await
        .expect("failover");
    // Granted by compare-and-set on the record the new master has (or at once if it lost it).
    let new = acquire_eventually(&store, &key, &node("b"), Duration::from_secs(30)).await;
    assert!(new > old, "token after failover {new} must exceed {old}");
    let record = set
        .node(new_master)
        .expect("the new master is one of ours")
        .command(&["GET", &record_key(&key)])
        .await
        .expect("GET on the new master");
    assert_eq!(
        record.as_str(),
        Some(format!("{new} 0 {}\nb", LONG_TTL.as_millis()).as_str()),
        "the new lease lives on the new master"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_switch_master_the_store_moves_to_the_new_master_while_the_old_one_hangs() {
    let mut set = RedisReplicaSet::start(2).await.expect("replica set");
    let sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .expect("sentinels");
    let store = RedisLeaseStore::connect_sentinel(&sentinels.addrs(), set.master_name())
        .await
        .expect("connect via sentinel");
    // The store subscribes in the background: wait until every sentinel has its subscriber
    // (sentinels have no `PUBSUB`; a subscribed client shows `flags=P` in `CLIENT LIST`).
    let deadline = Instant::now() + Duration::from_secs(10);
    for sentinel in sentinels.sentinels() {
        loop {
            let clients = sentinel
                .command(&["CLIENT", "LIST"])
                .await
                .expect("CLIENT LIST");
            let clients = clients.as_str().unwrap_or_default().to_owned();
            if clients
                .lines()
                .any(|c| c.contains(" flags=P ") && c.contains(" sub=1 "))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no +switch-master subscriber: {clients}"
            );
            tokio::task::yield_now().await;
        }
    }
    let key = unique_key("switch-master");
    store
        .read(&key, OP_TIMEOUT)
        .await
        .expect("read on the first master");

    let old_master = set.master().addr();
    // A hung master (not a dead one): fred's connection to it stays open.
    set.master_mut().pause().expect("SIGSTOP the master");
    let new_master = sentinels
        .wait_for_failover(old_master, Duration::from_secs(30))
        .await
        .expect("failover");
    let switched = Instant::now();
    // A read is answered only by a live master; the old one hangs.
    loop {
        match store.read(&key, Duration::from_millis(500)).await {
            Ok(_) => break,
            Err(e) if e.is_retryable() => {
                assert!(
                    switched.elapsed() < Duration::from_secs(20),
                    "still failing: {e}"
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    let took = switched.elapsed();
    let token = acquire_eventually(&store, &key, &node("a"), Duration::from_secs(30)).await;
    let record = set
        .node(new_master)
        .expect("one of ours")
        .command(&["GET", &record_key(&key)])
        .await
        .expect("GET on the new master");
    assert!(
        record
            .as_str()
            .is_some_and(|r| r.starts_with(&token.to_string())),
        "granted on the new master: {record}"
    );
    // Without following +switch-master fred leaves the hung connection only after
    // UNRESPONSIVE_AFTER of an unanswered command.
    assert!(
        took < ha_election::redis::UNRESPONSIVE_AFTER,
        "the store reached the new master {took:?} after the failover"
    );
    set.master_mut().resume().expect("SIGCONT the old master");
}
