//! The conformance suite every [`LeaseStore`] runs: in-memory, Redis and PostgreSQL alike.
//!
//! Each case is a public async function taking the store under test; the
//! [`lease_store_conformance!`](crate::lease_store_conformance) macro turns them into one
//! `#[tokio::test]` per case for a store factory. The factory yields the store and a guard
//! (e.g. the test server) that lives until the case ends:
//!
//! ```
//! mod memory_conformance {
//!     ha_election::lease_store_conformance!(async { (ha_election::MemoryLeaseStore::new(), ()) });
//! }
//! ```
//!
//! Every case uses its own random key, so cases may share one server. Expiry cases use real
//! time with short TTLs (hundreds of milliseconds) and poll with deadlines, never sleep to
//! synchronise.

use std::time::Duration;

use ha_core::{FencingToken, NodeId};

use crate::memory::MemoryLeaseStore;
use crate::store::{Acquire, LeaseInfo, LeaseRecord, LeaseStore};

/// Generous bound for one store operation in the suite.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// A TTL no case waits out.
pub const LONG_TTL: Duration = Duration::from_secs(60);
/// A TTL the expiry cases wait out.
pub const SHORT_TTL: Duration = Duration::from_millis(300);

/// A key no other case (or run) uses.
pub fn unique_key(case: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "ha-conformance/{case}/{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn node(name: &str) -> NodeId {
    NodeId::new(name)
}

/// Fault injection for model tests: `store` forgets every lease record, as a Redis restarted
/// without persistence or flushed does. Token counters survive (the real stores floor their
/// tokens so that they keep growing across data loss).
pub fn lose_records(store: &MemoryLeaseStore) {
    store.lose_records();
}

/// Fault injection for model tests: `store`'s clock steps forward by `by` (an NTP step on the
/// store's host): terms lapse early by its clock, and records are forgotten early.
pub fn step_store_clock(store: &MemoryLeaseStore, by: Duration) {
    store.step_clock(by);
}

/// Acquires a free `key` for `holder`, panicking unless it was granted.
pub async fn must_acquire(
    store: &dyn LeaseStore,
    key: &str,
    holder: &NodeId,
    ttl: Duration,
) -> FencingToken {
    must_take(store, key, holder, ttl, None).await
}

/// Takes `key` over for `holder` conditional on `expected`, panicking unless it was granted.
pub async fn must_take(
    store: &dyn LeaseStore,
    key: &str,
    holder: &NodeId,
    ttl: Duration,
    expected: Option<&LeaseRecord>,
) -> FencingToken {
    match store.acquire(key, holder, ttl, expected, OP_TIMEOUT).await {
        Ok(Acquire::Acquired(token)) => token,
        other => panic!(
            "{}: acquire of {key} by {holder} expecting {expected:?} must succeed, got {other:?}",
            store.kind()
        ),
    }
}

/// Takes `key` over for `holder` from whatever record it has now (read, then acquire
/// conditional on what was read), panicking unless it was granted. For tests that reuse a key
/// whose last term left a tombstone.
pub async fn must_take_over(
    store: &dyn LeaseStore,
    key: &str,
    holder: &NodeId,
    ttl: Duration,
) -> FencingToken {
    let current = store
        .read(key, OP_TIMEOUT)
        .await
        .expect("read")
        .map(|info| info.record());
    must_take(store, key, holder, ttl, current.as_ref()).await
}

/// The record of `key`, panicking if there is none.
pub async fn must_read(store: &dyn LeaseStore, key: &str) -> LeaseInfo {
    store
        .read(key, OP_TIMEOUT)
        .await
        .expect("read")
        .unwrap_or_else(|| panic!("{}: {key} must have a record", store.kind()))
}

/// A free key is granted; a read then names the holder and token.
pub async fn acquire_free_key_then_read(store: &dyn LeaseStore) {
    let key = unique_key("acquire-read");
    assert_eq!(
        store.read(&key, OP_TIMEOUT).await.expect("read"),
        None,
        "fresh key is free"
    );
    let token = must_acquire(store, &key, &node("a"), LONG_TTL).await;
    let info = store
        .read(&key, OP_TIMEOUT)
        .await
        .expect("read")
        .expect("held");
    assert_eq!(info.holder, node("a"));
    assert_eq!(info.token, token);
    assert_eq!((info.renewals, info.released), (0, false), "{info:?}");
    assert!(
        info.remaining <= LONG_TTL && info.remaining > LONG_TTL / 2,
        "{info:?}"
    );
}

/// A held key is refused to everyone, including its own holder (no re-entry: a restarted node
/// waits out its old lease), and the refusal says who holds it.
pub async fn acquire_refused_while_held(store: &dyn LeaseStore) {
    let key = unique_key("refused");
    let token = must_acquire(store, &key, &node("a"), LONG_TTL).await;
    for who in ["b", "a"] {
        match store
            .acquire(&key, &node(who), LONG_TTL, None, OP_TIMEOUT)
            .await
            .expect("acquire")
        {
            Acquire::Held(info) => {
                assert_eq!(info.holder, node("a"));
                assert_eq!(info.token, token);
            }
            other => panic!("{who} must not get a held lease: {other:?}"),
        }
    }
}

/// Renewal succeeds only for the exact (holder, token), and counts itself in the record.
pub async fn renew_requires_holder_and_token(store: &dyn LeaseStore) {
    let key = unique_key("renew-cas");
    let token = must_acquire(store, &key, &node("a"), LONG_TTL).await;
    let wrong_token = FencingToken(token.get() + 1);
    assert!(
        !store
            .renew(&key, &node("a"), wrong_token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew")
    );
    assert!(
        !store
            .renew(&key, &node("b"), token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew")
    );
    assert!(
        store
            .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew")
    );
    let info = store
        .read(&key, OP_TIMEOUT)
        .await
        .expect("read")
        .expect("held");
    assert_eq!(
        (info.holder, info.token, info.renewals),
        (node("a"), token, 1),
        "failed renewals change nothing; the successful one is counted"
    );
}

/// Release succeeds only for the exact (holder, token) and leaves a tombstone; a refused
/// release changes nothing.
pub async fn release_requires_holder_and_token(store: &dyn LeaseStore) {
    let key = unique_key("release-cas");
    let token = must_acquire(store, &key, &node("a"), LONG_TTL).await;
    let wrong_token = FencingToken(token.get() + 1);
    assert!(
        !store
            .release(&key, &node("a"), wrong_token, OP_TIMEOUT)
            .await
            .expect("release")
    );
    assert!(
        !store
            .release(&key, &node("b"), token, OP_TIMEOUT)
            .await
            .expect("release")
    );
    assert!(
        store.read(&key, OP_TIMEOUT).await.expect("read").is_some(),
        "still held"
    );
    assert!(
        store
            .release(&key, &node("a"), token, OP_TIMEOUT)
            .await
            .expect("release")
    );
    let tombstone = must_read(store, &key).await;
    assert_eq!(
        (&tombstone.holder, tombstone.token, tombstone.released),
        (&node("a"), token, true),
        "a release leaves a tombstone naming the ended term: {tombstone:?}"
    );
    assert_eq!(tombstone.remaining, Duration::ZERO);
    assert!(
        !store
            .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew"),
        "a released term cannot be renewed"
    );
    assert!(
        !store
            .release(&key, &node("a"), token, OP_TIMEOUT)
            .await
            .expect("release"),
        "a second release finds nothing to release"
    );
}

/// After a release the key is granted again, with a greater token.
pub async fn released_key_is_granted_with_a_greater_token(store: &dyn LeaseStore) {
    let key = unique_key("handover");
    let first = must_acquire(store, &key, &node("a"), LONG_TTL).await;
    assert!(
        store
            .release(&key, &node("a"), first, OP_TIMEOUT)
            .await
            .expect("release")
    );
    let tombstone = must_read(store, &key).await;
    match store
        .acquire(&key, &node("c"), LONG_TTL, None, OP_TIMEOUT)
        .await
        .expect("acquire")
    {
        Acquire::Held(info) => assert_eq!(info, tombstone),
        other => {
            panic!("a tombstone is a record: acquiring expecting none must fail, got {other:?}")
        }
    }
    let second = must_take(store, &key, &node("b"), LONG_TTL, Some(&tombstone.record())).await;
    assert!(second > first, "{second} must be greater than {first}");
    assert!(
        !store
            .renew(&key, &node("a"), first, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew"),
        "the old term cannot renew"
    );
}

/// A takeover conditional on the observed record is granted whatever the store's clock says:
/// the lease is still live by the store's clock here, and is taken anyway (the follower judged
/// its expiry on its own clock). The old holder can neither renew nor release it any more.
pub async fn takeover_compares_the_observed_record(store: &dyn LeaseStore) {
    let key = unique_key("takeover");
    let old = must_acquire(store, &key, &node("a"), LONG_TTL).await;
    let observed = must_read(store, &key).await;
    assert!(observed.remaining > Duration::ZERO, "{observed:?}");
    let new = must_take(store, &key, &node("b"), LONG_TTL, Some(&observed.record())).await;
    assert!(new > old, "{new} must be greater than {old}");
    assert!(
        !store
            .renew(&key, &node("a"), old, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew")
    );
    assert!(
        !store
            .release(&key, &node("a"), old, OP_TIMEOUT)
            .await
            .expect("release")
    );
    let info = must_read(store, &key).await;
    assert_eq!(
        (info.holder, info.token, info.renewals),
        (node("b"), new, 0)
    );
}

/// A takeover is refused if the holder renewed since the follower looked: the answer is the
/// renewed record, so the follower starts watching afresh.
pub async fn takeover_refused_after_a_renewal(store: &dyn LeaseStore) {
    let key = unique_key("takeover-renewed");
    let token = must_acquire(store, &key, &node("a"), LONG_TTL).await;
    let observed = must_read(store, &key).await.record();
    assert!(
        store
            .renew(&key, &node("a"), token, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("renew")
    );
    match store
        .acquire(&key, &node("b"), LONG_TTL, Some(&observed), OP_TIMEOUT)
        .await
        .expect("acquire")
    {
        Acquire::Held(info) => {
            assert_eq!(
                (info.holder, info.token, info.renewals),
                (node("a"), token, 1)
            );
        }
        other => panic!("a renewed lease must not be taken over, got {other:?}"),
    }
    // Nor with a record nobody ever wrote (a wrong holder or a released flag).
    for wrong in [
        LeaseRecord {
            holder: node("x"),
            ..observed.clone()
        },
        LeaseRecord {
            released: true,
            renewals: 1,
            ..observed.clone()
        },
    ] {
        assert!(matches!(
            store
                .acquire(&key, &node("b"), LONG_TTL, Some(&wrong), OP_TIMEOUT)
                .await
                .expect("acquire"),
            Acquire::Held(_)
        ));
    }
}

/// A takeover that expects a record the key does not have (the store lost it) is refused as
/// `Vacant`, and changes nothing.
pub async fn takeover_of_a_vanished_record_is_vacant(store: &dyn LeaseStore) {
    let key = unique_key("vanished");
    let ghost = LeaseRecord {
        holder: node("a"),
        token: FencingToken(7),
        renewals: 3,
        released: false,
    };
    assert_eq!(
        store
            .acquire(&key, &node("b"), LONG_TTL, Some(&ghost), OP_TIMEOUT)
            .await
            .expect("acquire"),
        Acquire::Vacant
    );
    assert_eq!(store.read(&key, OP_TIMEOUT).await.expect("read"), None);
}

/// Of many simultaneous takeovers of the same observed record exactly one wins.
pub async fn concurrent_takeovers_have_one_winner(store: &dyn LeaseStore) {
    let key = unique_key("takeover-race");
    must_acquire(store, &key, &node("a"), LONG_TTL).await;
    let observed = must_read(store, &key).await.record();
    let nodes: Vec<NodeId> = (0..8).map(|i| node(&format!("n{i}"))).collect();
    let attempts = nodes
        .iter()
        .map(|n| store.acquire(&key, n, LONG_TTL, Some(&observed), OP_TIMEOUT));
    let outcomes = futures_join_all(attempts).await;
    let winners = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Acquire::Acquired(_))))
        .count();
    assert_eq!(winners, 1, "exactly one winner: {outcomes:?}");
}

/// A term that lapsed by the store's clock keeps its record (remaining zero), so a follower
/// that watched it can take it over by compare-and-set; its holder may still renew it until
/// then (the store's clock decides nothing).
pub async fn lapsed_record_is_kept_for_takeover(store: &dyn LeaseStore) {
    let ttl = SHORT_TTL * 2;
    let key = unique_key("lapsed");
    let old = must_acquire(store, &key, &node("a"), ttl).await;
    let deadline = std::time::Instant::now() + ttl * 20;
    let lapsed = loop {
        let info = must_read(store, &key).await;
        assert_eq!((&info.holder, info.token), (&node("a"), old), "{info:?}");
        if info.remaining == Duration::ZERO {
            break info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never lapsed: {info:?}"
        );
        tokio::time::sleep(ttl / 20).await;
    };
    assert!(!lapsed.released);
    let new = must_take(store, &key, &node("b"), LONG_TTL, Some(&lapsed.record())).await;
    assert!(new > old);
}

/// Renewing keeps a lease alive past its original TTL.
pub async fn renewal_keeps_the_lease(store: &dyn LeaseStore) {
    // A TTL of a second renewed every 100 ms: a loaded machine may stall a loop iteration by
    // several hundred milliseconds without the lease lapsing, and the loop still runs past
    // twice the TTL, so only renewals can explain the lease surviving.
    let ttl = SHORT_TTL * 4;
    let key = unique_key("renewal");
    let token = must_acquire(store, &key, &node("a"), ttl).await;
    let until = std::time::Instant::now() + ttl * 2 + SHORT_TTL;
    while std::time::Instant::now() < until {
        let renewed = store
            .renew(&key, &node("a"), token, ttl, OP_TIMEOUT)
            .await
            .expect("renew");
        assert!(renewed, "renewal within the TTL must succeed");
        assert!(matches!(
            store
                .acquire(&key, &node("b"), LONG_TTL, None, OP_TIMEOUT)
                .await
                .expect("acquire"),
            Acquire::Held(_)
        ));
        tokio::time::sleep(SHORT_TTL / 3).await;
    }
}

/// Tokens grow strictly over many terms of alternating holders, each taking over the
/// previous term's tombstone.
pub async fn tokens_strictly_increase(store: &dyn LeaseStore) {
    let key = unique_key("monotonic");
    let mut last = None;
    let mut tombstone = None;
    for term in 0..20 {
        let holder = node(if term % 2 == 0 { "a" } else { "b" });
        let token = must_take(store, &key, &holder, LONG_TTL, tombstone.as_ref()).await;
        assert!(
            last.is_none_or(|l| token > l),
            "term {term}: {token} after {last:?}"
        );
        last = Some(token);
        assert!(
            store
                .release(&key, &holder, token, OP_TIMEOUT)
                .await
                .expect("release")
        );
        tombstone = Some(must_read(store, &key).await.record());
    }
}

/// Of many simultaneous acquires of a free key exactly one wins.
pub async fn concurrent_acquires_have_one_winner(store: &dyn LeaseStore) {
    let key = unique_key("race");
    let nodes: Vec<NodeId> = (0..8).map(|i| node(&format!("n{i}"))).collect();
    let attempts = nodes
        .iter()
        .map(|n| store.acquire(&key, n, LONG_TTL, None, OP_TIMEOUT));
    let outcomes = futures_join_all(attempts).await;
    let winners: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Acquire::Acquired(_))))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one winner: {outcomes:?}");
}

/// A store that can push changes tells a watcher about a release.
pub async fn watch_reports_release(store: &dyn LeaseStore) {
    let key = unique_key("watch");
    // Subscribe after the grant, so only the release can satisfy the case.
    let token = must_acquire(store, &key, &node("a"), LONG_TTL).await;
    let Some(mut watch) = store.watch(&key).await.expect("watch") else {
        // The store polls; nothing to check here. Its docs must say so.
        return;
    };
    assert!(
        store
            .release(&key, &node("a"), token, OP_TIMEOUT)
            .await
            .expect("release")
    );
    let deadline = tokio::time::Instant::now() + OP_TIMEOUT;
    loop {
        let change = tokio::time::timeout_at(deadline, watch.recv())
            .await
            .expect("a release must be pushed to watchers")
            .expect("watch channel open");
        if change.key == key {
            break;
        }
    }
}

/// Heartbeats list members with their latest meta, sorted by node id.
pub async fn heartbeats_list_members_with_meta(store: &dyn LeaseStore) {
    let group = unique_key("members");
    let meta =
        |zone: &str| std::collections::BTreeMap::from([("zone".to_owned(), zone.to_owned())]);
    assert!(
        store
            .members(&group, OP_TIMEOUT)
            .await
            .expect("members")
            .is_empty()
    );
    store
        .heartbeat(&group, &node("b"), &meta("z2"), LONG_TTL, OP_TIMEOUT)
        .await
        .expect("beat");
    store
        .heartbeat(&group, &node("a"), &meta("z1"), LONG_TTL, OP_TIMEOUT)
        .await
        .expect("beat");
    store
        .heartbeat(&group, &node("a"), &meta("z3"), LONG_TTL, OP_TIMEOUT)
        .await
        .expect("beat");
    let members = store.members(&group, OP_TIMEOUT).await.expect("members");
    let seen: Vec<(String, String)> = members
        .iter()
        .map(|m| (m.node.to_string(), m.meta["zone"].clone()))
        .collect();
    assert_eq!(seen, [("a".into(), "z3".into()), ("b".into(), "z2".into())]);
    assert!(
        members
            .iter()
            .all(|m| m.remaining <= LONG_TTL && m.remaining > LONG_TTL / 2)
    );
    assert!(
        store
            .members(&unique_key("other-group"), OP_TIMEOUT)
            .await
            .expect("members")
            .is_empty(),
        "groups are separate"
    );
}

/// A member that stops beating drops out within its TTL; one that keeps beating stays.
pub async fn silent_members_drop_out(store: &dyn LeaseStore) {
    let group = unique_key("members-expiry");
    let none = std::collections::BTreeMap::new();
    store
        .heartbeat(&group, &node("quiet"), &none, SHORT_TTL, OP_TIMEOUT)
        .await
        .expect("beat");
    let deadline = std::time::Instant::now() + SHORT_TTL * 20;
    loop {
        store
            .heartbeat(&group, &node("alive"), &none, LONG_TTL, OP_TIMEOUT)
            .await
            .expect("beat");
        let members = store.members(&group, OP_TIMEOUT).await.expect("members");
        let names: Vec<&str> = members.iter().map(|m| m.node.as_str()).collect();
        assert!(names.contains(&"alive"), "{names:?}");
        if !names.contains(&"quiet") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "silent member never dropped out"
        );
        tokio::time::sleep(SHORT_TTL / 10).await;
    }
}

/// Polls all futures concurrently on the current task (no extra dependency for a join_all).
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut outputs: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, out) in set.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Generates one `#[tokio::test]` per conformance case for a store factory: an expression
/// evaluating to a future of `(store, guard)`, where `store` implements [`LeaseStore`] and
/// `guard` (a server, a temp dir, `()`) is kept alive until the case ends. The expression is
/// evaluated afresh per case.
#[macro_export]
macro_rules! lease_store_conformance {
    ($make:expr) => {
        $crate::lease_store_conformance!(@cases $make;
            acquire_free_key_then_read,
            acquire_refused_while_held,
            renew_requires_holder_and_token,
            release_requires_holder_and_token,
            released_key_is_granted_with_a_greater_token,
            takeover_compares_the_observed_record,
            takeover_refused_after_a_renewal,
            takeover_of_a_vanished_record_is_vacant,
            concurrent_takeovers_have_one_winner,
            lapsed_record_is_kept_for_takeover,
            renewal_keeps_the_lease,
            tokens_strictly_increase,
            concurrent_acquires_have_one_winner,
            watch_reports_release,
            heartbeats_list_members_with_meta,
            silent_members_drop_out,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _guard) = $make.await;
                $crate::testing::$case(&store).await;
            }
        )*
    };
}
