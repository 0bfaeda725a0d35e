//! The elector on the in-memory store under paused tokio time: deterministic timing of
//! acquisition, renewal, handover, partitions and eligibility.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{FaultyStore, Invariants};
use ha_core::{
    Component, ComponentContext, EventBus, HaEvent, LeadershipGate, LossReason, NodeId, StepDown,
};
use ha_election::{Elector, ElectorConfig, ElectorEvent, LeaseStore, MemoryLeaseStore, Role};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(200);
/// A node that has seen nothing watches the key for a full TTL before it takes it.
const COLD_START: Duration = Duration::from_millis(2_300);

fn config() -> ElectorConfig {
    ElectorConfig::with_ttl("test/leader", TTL, RETRY)
}

async fn elector(store: Arc<dyn LeaseStore>, name: &str) -> Elector {
    let e = Elector::builder(store)
        .config(config())
        .build()
        .expect("valid config");
    e.start(ComponentContext::standalone(name))
        .await
        .expect("starts");
    e
}

/// Advances paused time in small steps until `done`, checking the invariants at every step.
async fn run_until(
    inv: &mut Invariants,
    electors: &[&Elector],
    limit: Duration,
    mut done: impl FnMut(Option<usize>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let leader = inv.check(electors);
        if done(leader) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not done within {limit:?}; terms {:?}",
            inv.terms()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Advances paused time in small steps for `span`, checking the invariants at every step;
/// returns the leader seen at each step.
async fn run_for(
    inv: &mut Invariants,
    electors: &[&Elector],
    span: Duration,
) -> Vec<Option<usize>> {
    let until = Instant::now() + span;
    let mut seen = Vec::new();
    while Instant::now() < until {
        seen.push(inv.check(electors));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn one_node_leads_and_keeps_renewing() {
    let store = Arc::new(MemoryLeaseStore::new());
    let a = elector(store.clone(), "a").await;
    let mut events = a.events();
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    let first = a.is_leader().unwrap();
    // Ten TTLs later it still leads, on the same term, with a later deadline.
    tokio::time::sleep(TTL * 10).await;
    let later = a.is_leader().expect("renewals keep leadership");
    assert_eq!(later.token, first.token);
    assert!(later.valid_until > first.valid_until);
    assert!(matches!(
        events.recv().await.unwrap(),
        ElectorEvent::Acquired { .. }
    ));
    assert!(matches!(
        events.recv().await.unwrap(),
        ElectorEvent::Renewed { .. }
    ));
    assert_eq!(a.leader().unwrap().node, NodeId::new("a"));
}

#[tokio::test(start_paused = true)]
async fn a_fresh_node_watches_a_vacant_key_for_a_ttl_before_taking_it() {
    let store = Arc::new(MemoryLeaseStore::new());
    let a = elector(store.clone(), "a").await;
    let mut inv = Invariants::default();
    let took = run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    assert!(
        took >= TTL,
        "a node that saw nothing must wait a TTL: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_clock_step_does_not_end_a_term() {
    let store = Arc::new(MemoryLeaseStore::new());
    let (a, b) = (
        elector(store.clone(), "a").await,
        elector(store.clone(), "b").await,
    );
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a, &b], COLD_START, |l| l.is_some()).await;
    let leader = inv.check(&[&a, &b]).unwrap();
    let term = [&a, &b][leader].is_leader().unwrap().token;
    // The store's clock jumps past the lease's expiry (not far enough to forget the record):
    // by the store's clock the term lapsed, yet followers judge on their own clocks and the
    // leader keeps renewing by compare-and-set.
    ha_election::testing::step_store_clock(&store, TTL * 3 / 2);
    let seen = run_for(&mut inv, &[&a, &b], TTL * 3).await;
    assert!(
        seen.iter().all(|l| *l == Some(leader)),
        "the same node led throughout: {:?}",
        inv.terms()
    );
    assert_eq!([&a, &b][leader].is_leader().unwrap().token, term);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_lost_its_data_does_not_grant_a_running_term() {
    let store = Arc::new(MemoryLeaseStore::new());
    let (a, b) = (
        elector(store.clone(), "a").await,
        elector(store.clone(), "b").await,
    );
    let all = [&a, &b];
    let mut inv = Invariants::default();
    run_until(&mut inv, &all, COLD_START, |l| l.is_some()).await;
    let leader = inv.check(&all).unwrap();
    let old = all[leader].is_leader().unwrap();
    ha_election::testing::lose_records(&store);
    let lost_at = Instant::now();
    // The leader's next renewal finds nothing and it stops; the follower saw the record
    // vanish and waits a full TTL from then. The invariants hold at every step.
    let took = run_until(&mut inv, &all, TTL * 3, |l| {
        l.is_some_and(|_| inv_token_differs(&all, old.token))
    })
    .await;
    assert!(
        took >= TTL,
        "nobody may take over sooner than a TTL after the data loss: {took:?} (lost at {lost_at:?})"
    );
    let new = all.iter().find_map(|e| e.is_leader()).unwrap();
    assert!(
        new.token > old.token,
        "{:?} after {:?}",
        new.token,
        old.token
    );
}

fn inv_token_differs(electors: &[&Elector], token: ha_core::FencingToken) -> bool {
    electors
        .iter()
        .any(|e| e.is_leader().is_some_and(|l| l.token != token))
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_adopts_its_own_lease() {
    let memory: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let fa = FaultyStore::new(memory.clone());
    let a = elector(fa.clone(), "a").await;
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    let term = a.is_leader().unwrap().token;
    // The old process dies silently; a new one with the same identity starts.
    fa.partition(true);
    std::mem::forget(a);
    let again = elector(memory.clone(), "a").await;
    let mut inv = Invariants::default();
    let took = run_until(&mut inv, &[&again], TTL, |l| l == Some(0)).await;
    assert!(
        took < RETRY,
        "the store said this node holds the lease: {took:?}"
    );
    assert_eq!(again.is_leader().unwrap().token, term, "same term, adopted");
}

#[tokio::test(start_paused = true)]
async fn followers_learn_who_leads() {
    let store = Arc::new(MemoryLeaseStore::new());
    let a = elector(store.clone(), "a").await;
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    let b = elector(store.clone(), "b").await;
    let mut seen = b.watch_leader();
    seen.wait_for(|l| l.is_some()).await.unwrap();
    let info = b.leader().unwrap();
    assert_eq!(info.node, NodeId::new("a"));
    assert_eq!(info.token, a.is_leader().unwrap().token);
    assert!(b.is_leader().is_none());
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_hands_over_in_milliseconds() {
    let store = Arc::new(MemoryLeaseStore::new());
    let (a, b, c) = (
        elector(store.clone(), "a").await,
        elector(store.clone(), "b").await,
        elector(store.clone(), "c").await,
    );
    let all = [&a, &b, &c];
    let mut inv = Invariants::default();
    run_until(&mut inv, &all, COLD_START, |l| l.is_some()).await;
    let leader = inv.check(&all).unwrap();
    all[leader].shutdown().await;
    let handover = run_until(&mut inv, &all, TTL * 2, |l| l.is_some_and(|i| i != leader)).await;
    // The store pushes the release: followers do not wait for their retry interval.
    assert!(
        handover <= Duration::from_millis(10),
        "handover took {handover:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn crashed_leader_is_replaced_within_ttl_plus_retry() {
    let memory: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let fa = FaultyStore::new(memory.clone());
    let a = elector(fa.clone(), "a").await;
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    let b = elector(memory.clone(), "b").await;
    // A crash as the store sees it: no more renewals and no release, ever. (Process kills are
    // in the real-server tests; here the node's link dies and the node is never heard again.)
    fa.partition(true);
    let crashed_at = Instant::now();
    std::mem::forget(a);
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&b], TTL * 3, |l| l == Some(0)).await;
    let took = crashed_at.elapsed();
    // b takes over a TTL after it first saw a's last renewal, which it sees within a retry.
    assert!(took <= TTL + RETRY * 2, "failover took {took:?}");
    assert!(
        took >= TTL - config().renew_interval,
        "b cannot win before a TTL has passed since a's last renewal: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn partitioned_leader_stops_before_the_store_lets_another_lead() {
    let memory: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let (fa, fb) = (
        FaultyStore::new(memory.clone()),
        FaultyStore::new(memory.clone()),
    );
    let a = elector(fa.clone(), "a").await;
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    let b = elector(fb.clone(), "b").await;
    fa.partition(true);
    let cut_at = Instant::now();
    let mut a_lost_at = None;
    let mut b_won_at = None;
    run_until(&mut inv, &[&a, &b], TTL * 3, |leader| {
        if a_lost_at.is_none() && a.is_leader().is_none() {
            a_lost_at = Some(Instant::now());
        }
        if leader == Some(1) && b_won_at.is_none() {
            b_won_at = Some(Instant::now());
        }
        b_won_at.is_some()
    })
    .await;
    let (lost, won) = (a_lost_at.unwrap(), b_won_at.unwrap());
    assert!(lost < won, "a must stop before b starts");
    assert!(
        lost - cut_at <= config().renew_deadline,
        "a stopped {:?} after the cut",
        lost - cut_at
    );
    assert!(matches!(*a.subscribe().borrow(), Role::Follower));
}

#[tokio::test(start_paused = true)]
async fn paused_leader_is_not_leader_when_it_wakes() {
    // A leader whose renewal answers arrive late (a process pause around the request) must
    // check the clock, not its last belief.
    let memory: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let fa = FaultyStore::new(memory.clone());
    let a = elector(fa.clone(), "a").await;
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    let lead = a.is_leader().unwrap();
    fa.set_delays(Duration::ZERO, TTL * 2);
    tokio::time::sleep_until(lead.valid_until).await;
    assert!(
        a.is_leader().is_none(),
        "past its deadline a node does not lead, whatever it last heard"
    );
}

#[tokio::test(start_paused = true)]
async fn step_down_lets_another_node_win() {
    let store = Arc::new(MemoryLeaseStore::new());
    let (a, b) = (
        elector(store.clone(), "a").await,
        elector(store.clone(), "b").await,
    );
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a, &b], COLD_START, |l| l.is_some()).await;
    let leader = inv.check(&[&a, &b]).unwrap();
    let (old, new) = if leader == 0 { (&a, &b) } else { (&b, &a) };
    assert!(old.step_down().await);
    assert!(old.is_leader().is_none());
    run_until(&mut inv, &[&a, &b], Duration::from_millis(50), |l| {
        l == Some(1 - leader)
    })
    .await;
    assert!(new.is_leader().is_some());
    assert!(
        !old.step_down().await,
        "a follower has nothing to step down from"
    );
    // The same through ha-core's trait, as ha-failover's step-down action calls it.
    let err = StepDown::step_down(old).await.unwrap_err();
    assert!(matches!(err, ha_core::Error::NotLeader { .. }), "{err}");
    let as_trait: &dyn StepDown = new;
    as_trait.step_down().await.unwrap();
    assert!(new.is_leader().is_none());
}

#[tokio::test(start_paused = true)]
async fn ineligible_node_steps_down_and_does_not_campaign() {
    let store = Arc::new(MemoryLeaseStore::new());
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = healthy.clone();
    let bus = EventBus::default();
    let mut bus_events = bus.subscribe();
    let a = Elector::builder(store.clone())
        .config(config())
        .eligibility(move || flag.load(Ordering::SeqCst))
        .build()
        .unwrap();
    a.start(ComponentContext::standalone("a").with_bus(bus))
        .await
        .unwrap();
    let b = elector(store.clone(), "b").await;
    let mut inv = Invariants::default();
    // Make sure `a` leads first: b starts after a won.
    run_until(&mut inv, &[&a, &b], TTL * 3, |l| l.is_some()).await;
    if inv.check(&[&a, &b]) == Some(1) {
        b.step_down().await;
        run_until(&mut inv, &[&a, &b], TTL, |l| l == Some(0)).await;
    }
    healthy.store(false, Ordering::SeqCst);
    run_until(&mut inv, &[&a, &b], TTL, |l| l == Some(1)).await;
    // Long after, the ineligible node still does not campaign even when b steps down.
    b.step_down().await;
    tokio::time::sleep(TTL * 3).await;
    assert!(a.is_leader().is_none());
    let mut reasons = Vec::new();
    while let Ok(event) = bus_events.try_recv() {
        if let HaEvent::LeadershipLost { reason, .. } = event {
            reasons.push(reason);
        }
    }
    assert!(reasons.contains(&LossReason::NotEligible), "{reasons:?}");
}

#[tokio::test(start_paused = true)]
async fn an_ineligible_follower_keeps_watching_at_the_retry_pace_after_a_crash() {
    let memory: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let fa = FaultyStore::new(memory.clone());
    let a = elector(fa.clone(), "a").await;
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    let b = Elector::builder(memory.clone())
        .config(config())
        .eligibility(|| false)
        .build()
        .unwrap();
    b.start(ComponentContext::standalone("b")).await.unwrap();
    fa.partition(true);
    std::mem::forget(a);
    // Long past the point where b could take over, it neither leads nor spins: paused time
    // only advances while every task waits, so a busy loop would hang this test.
    let seen = run_for(&mut inv, &[&b], TTL * 3).await;
    assert!(seen.iter().all(Option::is_none), "{:?}", inv.terms());
    assert_eq!(b.leader().map(|l| l.node), Some(NodeId::new("a")));
}

#[tokio::test(start_paused = true)]
async fn bus_reports_acquired_then_lost_with_the_same_token() {
    let store = Arc::new(MemoryLeaseStore::new());
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let a = Elector::builder(store).config(config()).build().unwrap();
    a.start(ComponentContext::standalone("a").with_bus(bus))
        .await
        .unwrap();
    let HaEvent::LeadershipAcquired {
        token, key, node, ..
    } = events.recv().await.unwrap()
    else {
        panic!("first event must be the acquisition");
    };
    assert_eq!((key.as_str(), node.as_str()), ("test/leader", "a"));
    a.shutdown().await;
    match events.recv().await.unwrap() {
        HaEvent::LeadershipLost {
            token: lost,
            reason,
            ..
        } => {
            assert_eq!(lost, token);
            assert_eq!(reason, LossReason::SteppedDown);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_deposed_leaders_fenced_write_is_rejected() {
    let memory: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let fa = FaultyStore::new(memory.clone());
    let a = elector(fa.clone(), "a").await;
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    let fence = ha_election::MemoryFence::default();
    // `a` checks it leads and prepares a write with its token... then stalls.
    let stale = a.is_leader().unwrap().token;
    fence.admit("orders", stale).unwrap();
    fa.partition(true);
    let b = elector(memory.clone(), "b").await;
    run_until(&mut inv, &[&a, &b], TTL * 3, |l| l == Some(1)).await;
    let fresh = b.is_leader().unwrap().token;
    fence.admit("orders", fresh).unwrap();
    // `a` wakes and its in-flight write arrives: refused, naming both tokens.
    let err = fence.admit("orders", stale).unwrap_err();
    assert!(
        matches!(err, ha_election::Error::StaleToken { token, highest, .. } if token == stale && highest == fresh)
    );
}

#[tokio::test(start_paused = true)]
async fn members_lists_live_electors_and_drops_dead_ones_within_ttl() {
    let memory: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let fb = FaultyStore::new(memory.clone());
    let a = Elector::builder(memory.clone())
        .config(config())
        .member_meta([("addr".to_owned(), "10.0.0.1:80".to_owned())].into())
        .build()
        .unwrap();
    a.start(ComponentContext::standalone("a")).await.unwrap();
    let b = elector(fb.clone(), "b").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let names = |m: Vec<ha_election::Member>| {
        m.into_iter()
            .map(|m| m.node.to_string())
            .collect::<Vec<_>>()
    };
    let members = a.members().await.unwrap();
    assert_eq!(members[0].meta["addr"], "10.0.0.1:80");
    assert_eq!(names(members), ["a", "b"]);
    fb.partition(true); // b goes silent
    let silent_at = Instant::now();
    loop {
        if names(a.members().await.unwrap()) == ["a"] {
            break;
        }
        assert!(
            silent_at.elapsed() <= TTL + Duration::from_millis(10),
            "b still listed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = b;
}

/// `heartbeat_now` publishes a changed member report at once, not at the next `ttl / 3`
/// beat (which is what happens without it).
#[tokio::test(start_paused = true)]
async fn heartbeat_now_publishes_changed_metadata_at_once() {
    use std::sync::atomic::AtomicU64;
    let memory: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let version = Arc::new(AtomicU64::new(0));
    let source = Arc::clone(&version);
    let a = Elector::builder(memory)
        .config(config())
        .member_meta_source(move || {
            [("v".to_owned(), source.load(Ordering::SeqCst).to_string())].into()
        })
        .build()
        .unwrap();
    a.start(ComponentContext::standalone("a")).await.unwrap();
    let published = || async { a.members().await.unwrap()[0].meta["v"].clone() };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(published().await, "0");
    // Changed, not yet beaten: the store still says 0 well before the next beat (ttl / 3).
    version.store(1, Ordering::SeqCst);
    tokio::time::sleep(TTL / 6).await;
    assert_eq!(published().await, "0", "no beat before ttl / 3");
    let asked = Instant::now();
    a.heartbeat_now();
    loop {
        if published().await == "1" {
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_millis(50),
            "not published at once"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A suspend clock that runs with tokio's plus the time the test says the machine spent
/// suspended (in ns): tokio's paused clock stands still meanwhile, as `CLOCK_MONOTONIC` does
/// while a machine is suspended.
fn suspend_clock() -> (
    Arc<std::sync::atomic::AtomicU64>,
    impl Fn() -> Option<Duration>,
) {
    let suspended = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read = Arc::clone(&suspended);
    let origin = Instant::now();
    (suspended, move || {
        Some(origin.elapsed() + Duration::from_nanos(read.load(Ordering::SeqCst)))
    })
}

#[tokio::test(start_paused = true)]
async fn a_leader_resumed_from_suspend_is_not_leader() {
    let (suspended, clock) = suspend_clock();
    let a = Elector::builder(Arc::new(MemoryLeaseStore::new()))
        .config(config())
        .suspend_clock(clock)
        .build()
        .expect("valid config");
    a.start(ComponentContext::standalone("a")).await.unwrap();
    let mut events = a.events();
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    // Renewals go on while the suspend clock runs with tokio's.
    run_for(&mut inv, &[&a], config().renew_deadline * 2).await;
    let lead = a.is_leader().expect("leads while awake");
    // A suspend just shorter than the term's rest does not end it …
    let left = u64::try_from((lead.valid_until - Instant::now()).as_nanos()).unwrap();
    suspended.store(left - 1, Ordering::SeqCst);
    assert!(
        a.is_leader().is_some(),
        "still inside the term on both clocks"
    );
    // … one that reaches the deadline does, at once, although tokio's clock has not moved.
    suspended.fetch_add(1, Ordering::SeqCst);
    assert!(
        lead.is_valid_at(Instant::now()),
        "tokio's clock stood still"
    );
    assert!(a.is_leader().is_none(), "the suspended time counts");
    assert!(!a.still_leads(&lead));
    // The task ends the term at its next wake-up instead of renewing on.
    let lost = tokio::time::timeout(config().renew_interval * 2, async {
        loop {
            match events.recv().await.unwrap() {
                ElectorEvent::Lost { token, reason } => return (token, reason),
                _ => continue,
            }
        }
    })
    .await
    .expect("the term ends when the task wakes");
    assert_eq!(lost, (lead.token, LossReason::Expired));
}

#[tokio::test(start_paused = true)]
async fn a_leadership_handed_out_before_a_step_down_no_longer_leads() {
    let store = Arc::new(MemoryLeaseStore::new());
    let a = elector(store.clone(), "a").await;
    let mut inv = Invariants::default();
    run_until(&mut inv, &[&a], COLD_START, |l| l == Some(0)).await;
    let lead = a.is_leader().unwrap();
    assert!(a.still_leads(&lead));
    assert!(a.step_down().await);
    // The snapshot still reads as valid: only the gate knows the term ended.
    assert!(lead.is_valid_at(Instant::now()));
    assert!(!a.still_leads(&lead), "the gate says the term ended");
    // A later term of the same node is not the one the work started under.
    run_until(&mut inv, &[&a], TTL * 3, |l| l == Some(0)).await;
    let again = a.is_leader().unwrap();
    assert!(again.token > lead.token);
    assert!(a.still_leads(&again));
    assert!(
        !a.still_leads(&lead),
        "a later term does not revive an earlier one"
    );
}

#[test]
fn boottime_reads_a_clock_that_moves_forward() {
    let first = ha_election::elector::boottime();
    if cfg!(target_os = "linux") {
        let first = first.expect("CLOCK_BOOTTIME is readable on Linux");
        let second = ha_election::elector::boottime().unwrap();
        assert!(second >= first);
    }
}

/// `put_entry` keeps a small record per node in a group beside the lease: listed by
/// `entries`, replaced by the next write of the same node, never mixed with the members, and
/// kept for its own ttl.
#[tokio::test(start_paused = true)]
async fn entries_live_in_their_own_group_one_per_node() {
    let memory: Arc<dyn LeaseStore> = Arc::new(MemoryLeaseStore::new());
    let a = elector(memory.clone(), "a").await;
    // Paused time: the first heartbeat runs.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let meta = |v: &str| std::collections::BTreeMap::from([("v".to_owned(), v.to_owned())]);
    let day = Duration::from_secs(86_400);
    a.put_entry("sync", &NodeId::new("a"), &meta("1"), day)
        .await
        .unwrap();
    a.put_entry("sync", &NodeId::new("b"), &meta("2"), day)
        .await
        .unwrap();
    a.put_entry("sync", &NodeId::new("a"), &meta("3"), day)
        .await
        .unwrap();
    let entries: Vec<(String, String)> = a
        .entries("sync")
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.node.to_string(), m.meta["v"].clone()))
        .collect();
    assert_eq!(
        entries,
        [
            ("a".to_owned(), "3".to_owned()),
            ("b".to_owned(), "2".to_owned())
        ]
    );
    let members: Vec<String> = a
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.node.to_string())
        .collect();
    assert_eq!(members, ["a"], "entries are not members");
    // Far past the members' ttl, the entries are still there.
    tokio::time::sleep(TTL * 10).await;
    assert_eq!(a.entries("sync").await.unwrap().len(), 2);
    assert!(a.entries("other").await.unwrap().is_empty());
}
