//! `SentinelMonitor` against real sentinels: the confirmed master, replicas and sentinels by
//! field, the quorum, falling through a dead sentinel, a killed master announced as
//! `+switch-master`; a minority sentinel stranded with an old master outvoted; a forced
//! failover whose answer times out sent once; a half-open subscription noticed within the
//! keepalive bound and the missed switch caught up; a sentinel that forgot the master passed
//! over.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_core::{Component, ComponentContext, EventBus, HaEvent, NodeId, Status};
use ha_replication::{Error, SentinelMonitor};
use ha_testkit::{FaultProxy, ProxyMode, RedisReplicaSet, SentinelOptions, SentinelSet};
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
    assert_eq!(
        quorum.answers.len(),
        3,
        "every sentinel is asked: {quorum:?}"
    );
    assert!(quorum.answers.iter().all(|(_, a)| a.is_ok()), "{quorum:?}");

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

/// Polls `check` every 20 ms until it holds or `within` passes.
async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next `RedisMasterSwitched` on `events` before `deadline`, as `(from, to)`.
async fn next_switch(events: &mut ha_core::EventSubscriber, deadline: Instant) -> (String, String) {
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("no RedisMasterSwitched within the deadline")
            .unwrap();
        if let HaEvent::RedisMasterSwitched { from, to, .. } = event {
            return (from, to);
        }
    }
}

/// `config-epoch` of the master according to one sentinel.
async fn config_epoch(sentinel: &ha_testkit::RedisServer, master: &str) -> Option<i64> {
    let reply = sentinel
        .command(&["SENTINEL", "MASTER", master])
        .await
        .ok()?;
    reply
        .field("config-epoch")
        .and_then(|v| v.as_int().or_else(|| v.as_str()?.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_sentinel_stranded_with_the_old_master_is_outvoted() {
    let set = RedisReplicaSet::start(1).await.unwrap();
    let sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .unwrap();
    // A sentinel cut off with a master that still says it is master: it monitors a server
    // of its own, so it never hears the majority, and names it at the first epoch.
    let stranded = RedisReplicaSet::start(0).await.unwrap();
    let stale = SentinelSet::start(
        &stranded,
        SentinelOptions {
            count: 1,
            quorum: 1,
            ..SentinelOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(stranded.master().role().await.unwrap(), "master");
    // The stale sentinel answers first; four sentinels, so the view quorum is three.
    let addrs: Vec<String> = stale
        .addrs()
        .into_iter()
        .chain(sentinels.addrs())
        .map(|a| a.to_string())
        .collect();
    let monitor = SentinelMonitor::new(sentinels.master_name(), &addrs)
        .unwrap()
        .reconcile(Duration::from_millis(300));

    let old = set.master().addr();
    let master = monitor.master().await.unwrap();
    assert_eq!(master.addr, old.to_string(), "the majority's master");
    assert_eq!(master.config_epoch, 0);
    let view = monitor.view().await.unwrap();
    assert_eq!(view.held_by.len(), 3, "{view:?}");
    assert!(
        view.answers.iter().any(|(_, a)| a
            .as_ref()
            .is_ok_and(|v| v.starts_with(&stranded.master().addr().to_string()))),
        "the stale sentinel was asked and outvoted: {view:?}"
    );

    // The majority fails over; the watcher listens to the stale sentinel (first in the list),
    // which never announces it, so the switch comes from reconciling with the quorum view.
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let ctx = ComponentContext::standalone(NodeId::new("n1")).with_bus(bus.clone());
    monitor.start(ctx).await.unwrap();
    sentinels.sentinels()[0]
        .command(&["SENTINEL", "FAILOVER", sentinels.master_name()])
        .await
        .unwrap();
    let new = sentinels.wait_for_failover(old, WAIT).await.unwrap();
    let (from, to) = next_switch(&mut events, Instant::now() + WAIT).await;
    assert_eq!(
        (from.as_str(), to.as_str()),
        (old.to_string().as_str(), new.to_string().as_str())
    );
    let master = monitor.master().await.unwrap();
    assert_eq!(master.addr, new.to_string());
    assert!(master.config_epoch >= 1, "{master:?}");
    // Nothing ever names the stranded master, though it is alive and says it is master.
    while let Ok(event) = events.try_recv() {
        if let HaEvent::RedisMasterSwitched { to, .. } = event {
            assert_ne!(to, stranded.master().addr().to_string());
        }
    }
    monitor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_failover_whose_answer_times_out_is_requested_once() {
    let set = RedisReplicaSet::start(2).await.unwrap();
    let sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .unwrap();
    let proxies: Vec<FaultProxy> = sentinels
        .addrs()
        .into_iter()
        .map(|a| FaultProxy::start(a).unwrap())
        .collect();
    let addrs: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let monitor = SentinelMonitor::new(sentinels.master_name(), &addrs).unwrap();
    let old = set.master().addr();
    assert_eq!(monitor.master().await.unwrap().addr, old.to_string());

    // The first sentinel gets the request late and answers later than the 1 s timeout: the
    // failover starts, but the monitor cannot know.
    proxies[0].set_mode(ProxyMode::Latency(Duration::from_millis(1500)));
    let others_before: Vec<u64> = proxies[1..]
        .iter()
        .map(FaultProxy::requests_forwarded)
        .collect();
    let err = monitor.failover().await.unwrap_err();
    assert!(
        matches!(&err, Error::FailoverOutcomeUnknown { sentinel, .. } if *sentinel == addrs[0]),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let others_after: Vec<u64> = proxies[1..]
        .iter()
        .map(FaultProxy::requests_forwarded)
        .collect();
    assert_eq!(others_before, others_after, "no other sentinel was asked");

    // The one failover happens, and only one: every sentinel ends at config epoch 1.
    let new = sentinels.wait_for_failover(old, WAIT).await.unwrap();
    assert_ne!(new, old);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut epochs = Vec::new();
        for s in sentinels.sentinels() {
            epochs.push(config_epoch(s, sentinels.master_name()).await);
        }
        if epochs.iter().all(|e| *e == Some(1)) {
            break;
        }
        assert!(
            epochs.iter().all(|e| e.is_none_or(|e| e <= 1)),
            "a second failover: {epochs:?}"
        );
        assert!(
            Instant::now() < deadline,
            "epochs never settled: {epochs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxies[0].set_mode(ProxyMode::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_subscription_is_noticed_and_the_missed_switch_caught_up() {
    let mut set = RedisReplicaSet::start(1).await.unwrap();
    let sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .unwrap();
    let proxies: Vec<FaultProxy> = sentinels
        .addrs()
        .into_iter()
        .map(|a| FaultProxy::start(a).unwrap())
        .collect();
    let addrs: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    const KEEPALIVE: Duration = Duration::from_millis(300);
    // No periodic reconcile during the test: the catch-up must come from resubscribing.
    let monitor = SentinelMonitor::new(sentinels.master_name(), &addrs)
        .unwrap()
        .keepalive(KEEPALIVE)
        .reconcile(Duration::from_secs(3600));
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let ctx = ComponentContext::standalone(NodeId::new("n1")).with_bus(bus.clone());
    monitor.start(ctx).await.unwrap();
    // Subscribed through the first proxy (the query connections are already up to all).
    eventually(WAIT, "subscribed", || monitor.status() == Status::Healthy).await;
    assert_eq!(monitor.lost_subscriptions(), 0);

    // The first sentinel's link goes silent without closing; the others refuse new
    // connections, so the watcher cannot resubscribe before the switch is announced.
    let cut = Instant::now();
    proxies[0].set_mode(ProxyMode::Blackhole);
    proxies[1].set_mode(ProxyMode::DropNew);
    proxies[2].set_mode(ProxyMode::DropNew);
    let bound = KEEPALIVE + SentinelMonitor::DEFAULT_TIMEOUT;
    eventually(
        bound + Duration::from_millis(700),
        "the half-open subscription is noticed",
        || monitor.lost_subscriptions() >= 1,
    )
    .await;
    assert!(cut.elapsed() <= bound + Duration::from_millis(700));
    assert_ne!(monitor.status(), Status::Healthy);

    let old = set.master().addr();
    set.master_mut().kill().unwrap();
    let new = sentinels.wait_for_failover(old, WAIT).await.unwrap();
    assert!(
        events.try_recv().is_err(),
        "nothing was heard during the outage"
    );

    // The links come back: the watcher resubscribes and announces the switch it missed.
    proxies[1].set_mode(ProxyMode::Pass);
    proxies[2].set_mode(ProxyMode::Pass);
    let (from, to) = next_switch(&mut events, Instant::now() + WAIT).await;
    assert_eq!((from, to), (old.to_string(), new.to_string()));
    eventually(WAIT, "resubscribed", || monitor.status() == Status::Healthy).await;
    monitor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_that_forgot_the_master_is_passed_over() {
    let set = RedisReplicaSet::start(1).await.unwrap();
    let sentinels = SentinelSet::start(&set, SentinelOptions::default())
        .await
        .unwrap();
    sentinels.sentinels()[0]
        .command(&["SENTINEL", "REMOVE", sentinels.master_name()])
        .await
        .unwrap();
    let addrs: Vec<String> = sentinels.addrs().iter().map(ToString::to_string).collect();
    let monitor = SentinelMonitor::new(sentinels.master_name(), &addrs).unwrap();
    assert_eq!(
        monitor.master().await.unwrap().addr,
        set.master().addr().to_string()
    );
    assert_eq!(
        monitor.master_addr().await.unwrap().0,
        set.master().addr().to_string()
    );
    assert_eq!(monitor.replicas().await.unwrap().len(), 1);
    let quorum = monitor.ckquorum().await.unwrap();
    assert!(quorum.ok, "two of three say OK: {quorum:?}");
    assert_eq!(quorum.answers.len(), 3);
    assert!(quorum.answers[0].1.is_err(), "the first forgot: {quorum:?}");
    assert!(
        quorum.answers[1..].iter().all(|(_, a)| a.is_ok()),
        "{quorum:?}"
    );
}
