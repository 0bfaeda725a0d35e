//! The failover manager on paused tokio time, with scripted actions: thresholds, dependency
//! order, the concurrency limit and its queue, timeouts that cancel (effect unknown),
//! rollback, retries and giving up, cooldown, the leadership gate before every step, health
//! events and the audit history.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ha_core::{
    AlwaysLeader, Component, ComponentContext, EventBus, EventSubscriber, FencingToken, HaEvent,
    Leadership, LeadershipGate, NodeId, Status, TryRecvError,
};
use ha_failover::{
    ActionContext, ActionError, ComponentConfig, Error, FailoverAction, FailoverConfig,
    FailoverManager, FailureKind, HealthEvents, Outcome, Phase, SkipReason, Step, TriggerSource,
};
use tokio::time::{Instant, sleep};

const S: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Scripted actions and a settable gate
// ---------------------------------------------------------------------------------------------

/// What a scripted step does. Only the failover step takes `work`; verify and rollback take
/// no time.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Does {
    /// Succeeds.
    Succeed,
    /// Fails.
    Fail,
    /// Never finishes.
    Hang,
    /// Panics.
    Panic,
    /// Says it cannot.
    Unsupported,
    /// Works for `work`, then checks that it still leads.
    CheckLeader,
}

/// Shared by every scripted action of a test: a log of what ran, in order, and how many
/// failovers ran at once.
#[derive(Clone, Default)]
struct Probe {
    log: Arc<Mutex<Vec<String>>>,
    inside: Arc<AtomicUsize>,
    max_inside: Arc<AtomicUsize>,
    tokens: Arc<Mutex<Vec<FencingToken>>>,
}

impl Probe {
    fn note(&self, line: String) {
        self.log.lock().unwrap().push(line);
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn position(&self, line: &str) -> usize {
        self.log()
            .iter()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("`{line}` not in {:?}", self.log()))
    }

    fn max_inside(&self) -> usize {
        self.max_inside.load(Ordering::SeqCst)
    }
}

/// Counts a running failover while alive.
struct Inside(Arc<AtomicUsize>);

impl Inside {
    fn enter(probe: &Probe) -> Self {
        let now = probe.inside.fetch_add(1, Ordering::SeqCst) + 1;
        probe.max_inside.fetch_max(now, Ordering::SeqCst);
        Self(Arc::clone(&probe.inside))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets its flag when dropped: proof that a future holding it was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct Scripted {
    probe: Probe,
    work: Duration,
    failover: Does,
    verify: Does,
    rollback: Does,
    /// Set when a hanging failover's future is dropped.
    dropped: Arc<AtomicBool>,
    /// Whether the failover's future had been dropped when the rollback started.
    dropped_before_rollback: Arc<AtomicBool>,
    /// Failovers that fail before the script applies (each takes one).
    fail_first: Arc<AtomicUsize>,
}

impl Scripted {
    fn new(probe: &Probe) -> Self {
        Self {
            probe: probe.clone(),
            work: S,
            failover: Does::Succeed,
            verify: Does::Succeed,
            rollback: Does::Succeed,
            dropped: Arc::default(),
            dropped_before_rollback: Arc::default(),
            fail_first: Arc::default(),
        }
    }

    fn fail_first(self, n: usize) -> Self {
        self.fail_first.store(n, Ordering::SeqCst);
        self
    }

    fn work(mut self, work: Duration) -> Self {
        self.work = work;
        self
    }

    fn failover(mut self, does: Does) -> Self {
        self.failover = does;
        self
    }

    fn verify(mut self, does: Does) -> Self {
        self.verify = does;
        self
    }

    fn rollback(mut self, does: Does) -> Self {
        self.rollback = does;
        self
    }

    async fn act(&self, does: Does, what: &str, ctx: &ActionContext) -> Result<(), ActionError> {
        if what == "failover" && does != Does::CheckLeader {
            sleep(self.work).await;
        }
        match does {
            Does::Succeed => Ok(()),
            Does::Fail => Err(ActionError::failed(format!(
                "{what} of {} broke",
                ctx.component()
            ))),
            Does::Hang => {
                let _flag = DropFlag(Arc::clone(&self.dropped));
                std::future::pending().await
            }
            Does::Panic => panic!("{what} of {} panicked", ctx.component()),
            Does::Unsupported => Err(ActionError::unsupported(format!("no {what}"))),
            Does::CheckLeader => {
                sleep(self.work).await;
                ctx.ensure_leader()
            }
        }
    }
}

#[async_trait]
impl FailoverAction for Scripted {
    async fn failover(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        let _inside = Inside::enter(&self.probe);
        self.probe.tokens.lock().unwrap().push(ctx.token());
        self.probe.note(format!("start {}", ctx.component()));
        let failing = self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let does = if failing { Does::Fail } else { self.failover };
        let result = self.act(does, "failover", ctx).await;
        self.probe.note(format!("end {}", ctx.component()));
        result
    }

    async fn rollback(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        self.dropped_before_rollback
            .store(self.dropped.load(Ordering::SeqCst), Ordering::SeqCst);
        self.probe.note(format!("rollback {}", ctx.component()));
        self.act(self.rollback, "rollback", ctx).await
    }

    async fn verify(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        self.probe.note(format!("verify {}", ctx.component()));
        self.act(self.verify, "verify", ctx).await
    }
}

/// A gate the test flips.
#[derive(Debug, Default)]
struct Gate(Mutex<Option<FencingToken>>);

impl Gate {
    fn lead(&self, token: u64) {
        *self.0.lock().unwrap() = Some(FencingToken(token));
    }

    fn follow(&self) {
        *self.0.lock().unwrap() = None;
    }
}

impl LeadershipGate for Gate {
    fn is_leader(&self) -> Option<Leadership> {
        self.0.lock().unwrap().map(|token| Leadership {
            token,
            valid_until: Instant::now() + Duration::from_secs(3600),
        })
    }
}

fn leader() -> Arc<dyn LeadershipGate> {
    Arc::new(AlwaysLeader::new(FencingToken(1)))
}

/// No cooldown and one try, so tests that are not about them can fail a component over
/// again and see one run per outage.
fn component() -> ComponentConfig {
    let backoff = ComponentConfig::default().retry_backoff;
    ComponentConfig::default()
        .cooldown(Duration::ZERO)
        .retry(1, backoff)
}

fn fail(manager: &FailoverManager, component: &str, times: usize) {
    for _ in 0..times {
        manager.report_failure(component).unwrap();
    }
}

fn succeed(manager: &FailoverManager, component: &str, times: usize) {
    for _ in 0..times {
        manager.report_success(component).unwrap();
    }
}

/// Polls `cond` every 10 ms of (paused) time, for up to `limit`.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// The next failover event (others skipped), within `limit`.
async fn next_failover_event(events: &mut EventSubscriber, limit: Duration) -> HaEvent {
    let deadline = Instant::now() + limit;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("a failover event in time")
            .unwrap();
        if event.name().starts_with("failover_") {
            return event;
        }
    }
}

/// Every failover event waiting now, as `name component`.
fn drain(events: &mut EventSubscriber) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        match events.try_recv() {
            Ok(event) => {
                if let Some(component) = failover_component(&event) {
                    out.push(format!("{} {component}", event.name()));
                }
            }
            Err(TryRecvError::Empty | TryRecvError::Closed) => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

fn failover_component(event: &HaEvent) -> Option<&str> {
    match event {
        HaEvent::FailoverStarted { component, .. }
        | HaEvent::FailoverCompleted { component, .. }
        | HaEvent::FailoverFailed { component, .. }
        | HaEvent::FailoverRolledBack { component, .. }
        | HaEvent::FailoverSkipped { component, .. } => Some(component),
        _ => None,
    }
}

fn outcomes(manager: &FailoverManager) -> Vec<(String, Outcome)> {
    manager
        .history()
        .into_iter()
        .map(|r| (r.component, r.outcome))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Thresholds
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn fails_over_at_the_nth_consecutive_failure_once_per_episode() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .component("db", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            bus.clone(),
            leader(),
        ))
        .await
        .unwrap();

    fail(&manager, "db", 2);
    succeed(&manager, "db", 1);
    fail(&manager, "db", 2);
    sleep(10 * S).await;
    assert!(probe.log().is_empty(), "2 failures in a row are not 3");
    let state = manager.component_state("db").unwrap();
    assert_eq!((state.consecutive_failures, state.failed), (2, false));

    let asked = Instant::now();
    fail(&manager, "db", 1);
    let HaEvent::FailoverStarted { token, .. } = next_failover_event(&mut events, S).await else {
        panic!("started first")
    };
    assert_eq!(token, Some(FencingToken(1)));
    assert_eq!(
        Instant::now(),
        asked,
        "started at once, not after a poll interval"
    );
    let HaEvent::FailoverCompleted { duration, .. } = next_failover_event(&mut events, 5 * S).await
    else {
        panic!("then completed")
    };
    assert_eq!(
        duration, S,
        "failover and verify each take no time but the 1 s of work"
    );
    assert_eq!(probe.log(), ["start db", "end db", "verify db"]);

    // Still failing: the same episode, no second failover.
    fail(&manager, "db", 10);
    sleep(10 * S).await;
    assert_eq!(manager.history().len(), 1);
    assert!(manager.component_state("db").unwrap().failed);

    // Two successes in a row end the episode; three more failures start another.
    succeed(&manager, "db", 1);
    fail(&manager, "db", 1);
    succeed(&manager, "db", 2);
    assert!(!manager.component_state("db").unwrap().failed);
    fail(&manager, "db", 3);
    next_failover_event(&mut events, S).await;
    next_failover_event(&mut events, 5 * S).await;
    let history = manager.history();
    assert_eq!(history.len(), 2);
    assert!(history.iter().all(|r| r.outcome == Outcome::Completed));
    assert_eq!(history[0].trigger.source, TriggerSource::Report);
    assert_eq!(history[0].trigger.consecutive_failures, 3);
    assert_ne!(history[0].id, history[1].id);
    assert!(matches!(
        manager.report_failure("nope"),
        Err(Error::UnknownComponent { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Dependency order and the concurrency limit
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn simultaneous_failovers_run_dependencies_first() {
    let probe = Probe::default();
    // Registered dependents first, so registration order alone would get it wrong.
    let manager = FailoverManager::builder()
        .component("web", Scripted::new(&probe), component().depends_on("api"))
        .component("api", Scripted::new(&probe), component().depends_on("db"))
        .component("cache", Scripted::new(&probe).work(3 * S), component())
        .component("db", Scripted::new(&probe).work(2 * S), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            EventBus::default(),
            leader(),
        ))
        .await
        .unwrap();

    for name in ["web", "api", "cache", "db"] {
        fail(&manager, name, 3);
    }
    eventually("every failover ended", 30 * S, || {
        manager.history().len() == 4
    })
    .await;

    // db and cache (independent) start together; api only after db's failover ended, web
    // only after api's.
    let log = probe.log();
    assert_eq!(&log[..2], ["start cache", "start db"], "{log:?}");
    assert!(
        probe.position("verify db") < probe.position("start api"),
        "{log:?}"
    );
    assert!(
        probe.position("verify api") < probe.position("start web"),
        "{log:?}"
    );
    assert!(
        probe.position("start api") < probe.position("end cache"),
        "api does not wait for cache, which it does not depend on: {log:?}"
    );
    assert!(
        outcomes(&manager)
            .iter()
            .all(|(_, o)| *o == Outcome::Completed)
    );
}

#[tokio::test(start_paused = true)]
async fn at_most_the_limit_run_and_every_queued_failover_completes() {
    const N: usize = 8;
    let probe = Probe::default();
    let mut builder = FailoverManager::builder();
    for i in 0..N {
        builder = builder.component(
            format!("c{i}"),
            Scripted::new(&probe).work(10 * S),
            component(),
        );
    }
    let manager = builder.build().unwrap();
    manager
        .start(ComponentContext::standalone("local").with_leadership(leader()))
        .await
        .unwrap();
    assert_eq!(manager.config().max_concurrent_failovers, 3);

    let asked = Instant::now();
    for i in 0..N {
        fail(&manager, &format!("c{i}"), 3);
    }
    assert_eq!(
        manager.queued(),
        N,
        "all queued before the manager's task ran"
    );
    eventually("three run", S, || manager.in_flight() == 3).await;
    assert_eq!(manager.queued(), N - 3, "the rest wait");
    assert_eq!(manager.component_state("c7").unwrap().phase, Phase::Queued);

    eventually("every failover ended", 60 * S, || {
        manager.history().len() == N
    })
    .await;
    assert_eq!(probe.max_inside(), 3, "never more than the limit at once");
    assert_eq!((manager.in_flight(), manager.queued()), (0, 0));
    let mut done: Vec<String> = manager.history().into_iter().map(|r| r.component).collect();
    done.sort();
    assert_eq!(done, (0..N).map(|i| format!("c{i}")).collect::<Vec<_>>());
    assert!(
        outcomes(&manager)
            .iter()
            .all(|(_, o)| *o == Outcome::Completed)
    );
    // Three rounds of 10 s: 3 + 3 + 2.
    let took = Instant::now() - asked;
    assert!((30 * S..31 * S).contains(&took), "{took:?}");
}

/// A request that finds the queue full is recorded and reported once, and runs when a slot
/// frees — even when it came from a health transition, after which no further event comes
/// while the component stays down.
#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_loudly_and_the_request_runs_when_a_slot_frees() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .config(FailoverConfig {
            max_concurrent_failovers: 1,
            max_queued_failovers: 1,
            ..FailoverConfig::default()
        })
        .component("a", Scripted::new(&probe).work(10 * S), component())
        .component("b", Scripted::new(&probe).work(10 * S), component())
        .component("c", Scripted::new(&probe).work(10 * S), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            bus.clone(),
            leader(),
        ))
        .await
        .unwrap();
    fail(&manager, "a", 3);
    eventually("a runs", S, || manager.in_flight() == 1).await;
    fail(&manager, "b", 3);
    fail(&manager, "c", 2);
    let err = manager.report_failure("c").unwrap_err();
    assert_eq!(
        err,
        Error::QueueFull {
            component: "c".into(),
            capacity: 1
        }
    );
    assert!(err.is_retryable());
    let c = manager.component_state("c").unwrap();
    assert_eq!((c.failed, c.phase), (true, Phase::WaitingForQueue));
    let skipped = drain(&mut events);
    assert_eq!(skipped, ["failover_started a", "failover_skipped c"]);

    // Nothing more is reported about c, yet it runs once a slot frees; its skip is recorded
    // once, however often it asked again.
    eventually("a, b and c completed", 60 * S, || {
        manager.history().len() == 4
    })
    .await;
    let got = outcomes(&manager);
    assert_eq!(
        got.iter()
            .map(|(c, o)| (c.as_str(), o.as_str()))
            .collect::<Vec<_>>(),
        [
            ("c", "skipped"),
            ("a", "completed"),
            ("b", "completed"),
            ("c", "completed")
        ]
    );
    assert_eq!(
        got[0].1,
        Outcome::Skipped {
            reason: SkipReason::QueueFull
        }
    );

    // The same through a health transition, the only event while the component stays down.
    for name in ["a", "b", "c"] {
        succeed(&manager, name, 2);
    }
    fail(&manager, "a", 3);
    eventually("a runs again", S, || manager.in_flight() == 1).await;
    fail(&manager, "b", 3);
    bus.publish(health("c", Status::Healthy, Status::Unhealthy));
    eventually("c waits for the queue", S, || {
        manager.component_state("c").unwrap().phase == Phase::WaitingForQueue
    })
    .await;
    eventually("c completed again", 60 * S, || manager.history().len() == 8).await;
    assert_eq!(
        outcomes(&manager)[7],
        ("c".to_owned(), Outcome::Completed),
        "{:?}",
        outcomes(&manager)
    );
}

// ---------------------------------------------------------------------------------------------
// Timeouts, rollback and the truth of the history
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_timeout_cancels_the_action_and_its_effect_is_unknown() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let action = Scripted::new(&probe).failover(Does::Hang);
    let (dropped, dropped_first) = (
        Arc::clone(&action.dropped),
        Arc::clone(&action.dropped_before_rollback),
    );
    let manager = FailoverManager::builder()
        .component("db", action, component().timeout(5 * S))
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            bus.clone(),
            leader(),
        ))
        .await
        .unwrap();
    fail(&manager, "db", 3);
    let started = Instant::now();
    assert_eq!(
        next_failover_event(&mut events, S).await.name(),
        "failover_started"
    );
    let HaEvent::FailoverFailed { reason, token, .. } =
        next_failover_event(&mut events, 10 * S).await
    else {
        panic!("failed, and not reported as rolled back")
    };
    assert_eq!(
        Instant::now() - started,
        5 * S,
        "the timeout, then an instant rollback"
    );
    assert_eq!(
        reason,
        "gave up after 1 of 1 tries: failover timed out after 5s and was cancelled: effect \
         unknown (it may still land); rollback reported success"
    );
    assert_eq!(token, Some(FencingToken(1)));
    assert!(
        dropped.load(Ordering::SeqCst),
        "the hanging future was dropped"
    );
    assert!(
        dropped_first.load(Ordering::SeqCst),
        "it was dropped before the rollback started"
    );
    assert_eq!(probe.log(), ["start db", "rollback db"], "verify never ran");
    let record = manager.history().pop().unwrap();
    assert_eq!(
        record.outcome,
        Outcome::EffectUnknown {
            failure: ha_failover::StepFailure {
                step: Step::Failover,
                kind: FailureKind::TimedOut(5 * S),
            },
            rollback: None,
        }
    );
    assert!(record.gave_up, "one try, still down: given up");
    assert_eq!(record.duration, 5 * S);
    assert_eq!(record.token, Some(FencingToken(1)));
}

#[tokio::test(start_paused = true)]
async fn the_history_says_what_really_happened() {
    let probe = Probe::default();
    let manager = FailoverManager::builder()
        .config(FailoverConfig {
            max_concurrent_failovers: 10,
            ..FailoverConfig::default()
        })
        .component("ok", Scripted::new(&probe), component())
        .component(
            "broken",
            Scripted::new(&probe).failover(Does::Fail),
            component(),
        )
        .component(
            "unverified",
            Scripted::new(&probe).verify(Does::Fail),
            component(),
        )
        .component(
            "stuck",
            Scripted::new(&probe)
                .failover(Does::Fail)
                .rollback(Does::Hang),
            component().timeout(2 * S),
        )
        .component(
            "one-way",
            Scripted::new(&probe)
                .failover(Does::Fail)
                .rollback(Does::Unsupported),
            component(),
        )
        .component(
            "panicky",
            Scripted::new(&probe).failover(Does::Panic),
            component(),
        )
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            EventBus::default(),
            leader(),
        ))
        .await
        .unwrap();
    for name in ["ok", "broken", "unverified", "stuck", "one-way", "panicky"] {
        fail(&manager, name, 3);
    }
    eventually("every failover ended", 30 * S, || {
        manager.history().len() == 6
    })
    .await;

    let by_name = |name: &str| {
        manager
            .history()
            .into_iter()
            .find(|r| r.component == name)
            .unwrap()
    };
    assert_eq!(by_name("ok").outcome, Outcome::Completed);
    assert_eq!(by_name("ok").error(), None);
    assert_eq!(
        by_name("broken").error().unwrap(),
        "failover failed: failover of broken broke; rolled back"
    );
    let unverified = by_name("unverified");
    assert_eq!(unverified.outcome.failure().unwrap().step, Step::Verify);
    assert_eq!(unverified.outcome.as_str(), "rolled_back");
    assert_eq!(
        by_name("stuck").error().unwrap(),
        "failover failed: failover of stuck broke; not rolled back: rollback timed out after \
         2s and was cancelled"
    );
    assert_eq!(
        by_name("one-way").error().unwrap(),
        "failover failed: failover of one-way broke; not rolled back: rollback unsupported: no \
         rollback"
    );
    let panicky = by_name("panicky");
    assert_eq!(
        panicky.outcome.failure().unwrap().kind,
        FailureKind::Panicked("failover of panicky panicked".into())
    );
    assert_eq!(panicky.outcome.as_str(), "rolled_back");
    for record in manager.history() {
        assert!(record.started_at.unwrap() <= record.ended_at);
        assert_eq!(record.token, Some(FencingToken(1)));
    }
    // The manager is still fine after a panicking action.
    assert_eq!((manager.in_flight(), manager.queued()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Cooldown
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn cooldown_suppresses_flapping_and_still_acts_on_a_lasting_failure() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .component(
            "db",
            Scripted::new(&probe),
            ComponentConfig::default().cooldown(60 * S),
        )
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            bus.clone(),
            leader(),
        ))
        .await
        .unwrap();
    fail(&manager, "db", 3);
    next_failover_event(&mut events, S).await;
    next_failover_event(&mut events, 5 * S).await; // completed at t = 1 s

    // It flaps: up, down within the cooldown — skipped, waiting — up again before its end.
    sleep(10 * S).await;
    succeed(&manager, "db", 2);
    fail(&manager, "db", 3);
    let HaEvent::FailoverSkipped { reason, .. } = next_failover_event(&mut events, S).await else {
        panic!("skipped")
    };
    assert!(reason.contains("cooldown"), "{reason}");
    assert_eq!(
        manager.component_state("db").unwrap().phase,
        Phase::WaitingForCooldown { left: 50 * S }
    );
    succeed(&manager, "db", 2);
    assert_eq!(manager.component_state("db").unwrap().phase, Phase::Idle);
    sleep(120 * S).await;
    assert_eq!(
        probe.log().len(),
        3,
        "no second failover: {:?}",
        probe.log()
    );

    // Down again long after the cooldown: it runs at once.
    fail(&manager, "db", 3);
    let asked = Instant::now();
    assert_eq!(
        next_failover_event(&mut events, S).await.name(),
        "failover_started"
    );
    assert_eq!(Instant::now(), asked);
    next_failover_event(&mut events, 5 * S).await;
    let end_of_second = Instant::now();

    // A flap within the cooldown of the second one, that stays down: deferred to its end.
    succeed(&manager, "db", 2);
    fail(&manager, "db", 3);
    assert_eq!(
        next_failover_event(&mut events, S).await.name(),
        "failover_skipped"
    );
    let HaEvent::FailoverStarted { .. } = next_failover_event(&mut events, 120 * S).await else {
        panic!("started at the end of the cooldown")
    };
    assert_eq!(Instant::now() - end_of_second, 60 * S);
    next_failover_event(&mut events, 5 * S).await;

    let got: Vec<&str> = manager
        .history()
        .iter()
        .map(|r| match &r.outcome {
            Outcome::Skipped { reason } => reason.as_str(),
            other => other.as_str(),
        })
        .collect();
    assert_eq!(
        got,
        [
            "completed",
            "cooldown",
            "completed",
            "cooldown",
            "completed"
        ]
    );
    // The deferred request and its run share one id.
    let h = manager.history();
    assert_eq!(h[3].id, h[4].id);
}

// ---------------------------------------------------------------------------------------------
// Leadership
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_follower_never_acts_and_acts_once_it_leads() {
    let probe = Probe::default();
    let gate = Arc::new(Gate::default());
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .component("db", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("b"),
            bus.clone(),
            gate.clone(),
        ))
        .await
        .unwrap();
    fail(&manager, "db", 3);
    let HaEvent::FailoverSkipped { reason, node, .. } = next_failover_event(&mut events, S).await
    else {
        panic!("skipped")
    };
    assert_eq!(node.as_str(), "b");
    assert!(reason.contains("does not lead"), "{reason}");
    // Long after, many retries later: still nothing done, and one record only.
    sleep(30 * S).await;
    assert!(probe.log().is_empty(), "a follower never acts");
    assert_eq!(drain(&mut events), Vec::<String>::new());
    assert_eq!(
        outcomes(&manager),
        [(
            "db".to_owned(),
            Outcome::Skipped {
                reason: SkipReason::NotLeader
            }
        )]
    );
    assert_eq!(
        manager.component_state("db").unwrap().phase,
        Phase::WaitingForLeadership
    );

    // It becomes the leader: within one retry interval it fails over, with its token.
    gate.lead(7);
    let became = Instant::now();
    let HaEvent::FailoverStarted { token, .. } = next_failover_event(&mut events, 2 * S).await
    else {
        panic!("started")
    };
    assert!(Instant::now() - became <= S);
    assert_eq!(token, Some(FencingToken(7)));
    next_failover_event(&mut events, 5 * S).await;
    assert_eq!(*probe.tokens.lock().unwrap(), [FencingToken(7)]);
    let record = manager.history().pop().unwrap();
    assert_eq!(
        (record.outcome, record.token),
        (Outcome::Completed, Some(FencingToken(7)))
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_by_recovery_while_following_never_runs() {
    let probe = Probe::default();
    let gate = Arc::new(Gate::default());
    let manager = FailoverManager::builder()
        .component("db", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            EventBus::default(),
            gate.clone(),
        ))
        .await
        .unwrap();
    fail(&manager, "db", 3);
    sleep(5 * S).await;
    succeed(&manager, "db", 2);
    gate.lead(1);
    sleep(10 * S).await;
    assert!(probe.log().is_empty());
    assert_eq!(manager.history().len(), 1, "the skip, nothing else");
}

#[tokio::test(start_paused = true)]
async fn a_parked_request_whose_component_reports_healthy_again_is_dropped_when_leading() {
    let probe = Probe::default();
    let gate = Arc::new(Gate::default());
    let manager = FailoverManager::builder()
        .component("db", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            EventBus::default(),
            gate.clone(),
        ))
        .await
        .unwrap();
    fail(&manager, "db", 3);
    sleep(5 * S).await;
    // The leader of the time handled it: one success, below the recovery threshold of 2, so
    // the outage is not over by the count — but the latest report is no failure.
    succeed(&manager, "db", 1);
    gate.lead(4);
    sleep(10 * S).await;
    assert!(probe.log().is_empty(), "acted on a state that had gone");
    assert_eq!(
        outcomes(&manager),
        [
            (
                "db".to_owned(),
                Outcome::Skipped {
                    reason: SkipReason::NotLeader
                }
            ),
            (
                "db".to_owned(),
                Outcome::Skipped {
                    reason: SkipReason::Stale
                }
            )
        ]
    );
    assert_eq!(manager.component_state("db").unwrap().phase, Phase::Idle);
    // A new failure streak is a new outage, and this node now leads: it fails over.
    fail(&manager, "db", 3);
    eventually("the new outage's failover ran", 10 * S, || {
        manager.history().len() == 3
    })
    .await;
    assert_eq!(probe.log(), ["start db", "end db", "verify db"]);
    assert_eq!(manager.history()[2].outcome, Outcome::Completed);
}

#[tokio::test(start_paused = true)]
async fn a_parked_request_whose_component_still_fails_runs_when_leading() {
    let probe = Probe::default();
    let gate = Arc::new(Gate::default());
    let manager = FailoverManager::builder()
        .component("db", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            EventBus::default(),
            gate.clone(),
        ))
        .await
        .unwrap();
    fail(&manager, "db", 3);
    sleep(5 * S).await;
    // A flap: one success, then failing again — the latest report is a failure.
    succeed(&manager, "db", 1);
    fail(&manager, "db", 1);
    gate.lead(4);
    eventually("the parked failover ran", 10 * S, || {
        manager.history().len() == 2
    })
    .await;
    assert_eq!(probe.log(), ["start db", "end db", "verify db"]);
    assert_eq!(manager.history()[1].outcome, Outcome::Completed);
}

#[tokio::test(start_paused = true)]
async fn leadership_lost_mid_action_starts_nothing_new_and_the_action_can_see_it() {
    let probe = Probe::default();
    let gate = Arc::new(Gate::default());
    gate.lead(3);
    let manager = FailoverManager::builder()
        .config(FailoverConfig {
            max_concurrent_failovers: 1,
            ..FailoverConfig::default()
        })
        .component(
            "db",
            Scripted::new(&probe)
                .work(10 * S)
                .failover(Does::CheckLeader),
            component(),
        )
        .component("cache", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            EventBus::default(),
            gate.clone(),
        ))
        .await
        .unwrap();
    fail(&manager, "db", 3);
    fail(&manager, "cache", 3);
    eventually("db runs", S, || manager.in_flight() == 1).await;
    // Another node takes over while db's failover runs.
    gate.follow();
    eventually("db's failover ended", 30 * S, || {
        !manager.history().is_empty()
    })
    .await;
    let db = manager.history()[0].clone();
    assert_eq!(db.component, "db");
    assert_eq!(
        db.error().unwrap(),
        "failover failed: node `local` no longer leads with fencing token 3; this node \
         stopped leading; rollback skipped"
    );
    sleep(10 * S).await;
    assert_eq!(
        probe.log(),
        ["start db", "end db"],
        "no rollback by a deposed leader, and cache never started"
    );
    assert_eq!(
        manager.history()[1].outcome,
        Outcome::Skipped {
            reason: SkipReason::NotLeader
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Health events
// ---------------------------------------------------------------------------------------------

fn health(component: &str, from: Status, to: Status) -> HaEvent {
    HaEvent::HealthChanged {
        at: std::time::SystemTime::now(),
        node: NodeId::new("a"),
        component: component.into(),
        from,
        to,
        cause: Some(format!("{component} is {to}")),
    }
}

#[tokio::test(start_paused = true)]
async fn a_health_transition_to_unhealthy_fails_over_at_once() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .component("db", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            bus.clone(),
            leader(),
        ))
        .await
        .unwrap();
    bus.publish(health("other", Status::Healthy, Status::Unhealthy));
    bus.publish(health("db", Status::Healthy, Status::Unknown));
    bus.publish(health("db", Status::Unknown, Status::Degraded));
    sleep(S).await;
    assert!(
        probe.log().is_empty(),
        "unknown says nothing, degraded still serves"
    );
    bus.publish(health("db", Status::Degraded, Status::Unhealthy));
    assert_eq!(
        next_failover_event(&mut events, S).await.name(),
        "failover_started"
    );
    next_failover_event(&mut events, 5 * S).await;
    let record = manager.history().pop().unwrap();
    assert_eq!(record.trigger.source, TriggerSource::HealthEvent);
    assert_eq!(record.trigger.cause.as_deref(), Some("db is unhealthy"));
    // Degraded counts as up: the episode ends, and the next Unhealthy fails over again.
    bus.publish(health("db", Status::Unhealthy, Status::Degraded));
    bus.publish(health("db", Status::Degraded, Status::Unhealthy));
    assert_eq!(
        next_failover_event(&mut events, S).await.name(),
        "failover_started"
    );
    next_failover_event(&mut events, 5 * S).await;
    assert_eq!(manager.history().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn health_events_as_observations_count_against_the_threshold() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let manager = FailoverManager::builder()
        .config(FailoverConfig {
            health_events: HealthEvents::Observations,
            ..FailoverConfig::default()
        })
        .component("db", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            bus.clone(),
            leader(),
        ))
        .await
        .unwrap();
    for _ in 0..2 {
        bus.publish(health("db", Status::Unhealthy, Status::Unhealthy));
    }
    sleep(S).await;
    assert_eq!(
        manager.component_state("db").unwrap().consecutive_failures,
        2
    );
    assert!(probe.log().is_empty());
    bus.publish(health("db", Status::Unhealthy, Status::Unhealthy));
    eventually("failed over", 5 * S, || manager.history().len() == 1).await;
}

#[tokio::test(start_paused = true)]
async fn unhealthy_dependency_and_dependent_reported_together_fail_over_in_order() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let manager = FailoverManager::builder()
        .component("app", Scripted::new(&probe), component().depends_on("db"))
        .component("db", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            bus.clone(),
            leader(),
        ))
        .await
        .unwrap();
    // As a health checker publishes them: the dependent first, in one burst.
    bus.publish(health("app", Status::Healthy, Status::Unhealthy));
    bus.publish(health("db", Status::Healthy, Status::Unhealthy));
    eventually("both failed over", 10 * S, || manager.history().len() == 2).await;
    assert_eq!(
        probe.log(),
        [
            "start db",
            "end db",
            "verify db",
            "start app",
            "end app",
            "verify app"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown and building
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn shutdown_lets_running_failovers_finish_and_records_the_rest() {
    let probe = Probe::default();
    let manager = FailoverManager::builder()
        .config(FailoverConfig {
            max_concurrent_failovers: 1,
            ..FailoverConfig::default()
        })
        .component("a", Scripted::new(&probe).work(5 * S), component())
        .component("b", Scripted::new(&probe), component())
        .build()
        .unwrap();
    manager
        .start(ComponentContext::new(
            NodeId::new("local"),
            EventBus::default(),
            leader(),
        ))
        .await
        .unwrap();
    let started = Instant::now();
    fail(&manager, "a", 3);
    fail(&manager, "b", 3);
    eventually("a runs", S, || manager.in_flight() == 1).await;
    manager.stop().await.unwrap();
    assert_eq!(Instant::now() - started, 5 * S, "waited for a to finish");
    assert_eq!(
        outcomes(&manager),
        [
            (
                "b".to_owned(),
                Outcome::Skipped {
                    reason: SkipReason::Shutdown
                }
            ),
            ("a".to_owned(), Outcome::Completed),
        ]
    );
    assert_eq!(manager.report_failure("a"), Err(Error::Stopped));
    manager.stop().await.unwrap(); // twice is fine
    assert_eq!(manager.status(), Status::Unknown);
}

#[tokio::test]
async fn bad_registrations_are_refused_by_name() {
    let probe = Probe::default();
    let start = |build: fn(
        ha_failover::FailoverManagerBuilder,
        &Probe,
    ) -> ha_failover::FailoverManagerBuilder| {
        build(FailoverManager::builder(), &probe)
            .build()
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        start(
            |b, p| b.component("a", Scripted::new(p), component()).component(
                "a",
                Scripted::new(p),
                component()
            )
        ),
        "two components are named `a`; names must be unique"
    );
    assert_eq!(
        start(|b, p| b.component("a", Scripted::new(p), component().depends_on("db"))),
        "component `a` depends on `db`, which is not registered"
    );
    assert_eq!(
        start(|b, p| b
            .component("a", Scripted::new(p), component().depends_on("b"))
            .component("b", Scripted::new(p), component().depends_on("a"))),
        "components depend on each other in a cycle: a -> b -> a"
    );
    assert_eq!(
        start(|b, p| b.component("a", Scripted::new(p), component().thresholds(0, 1))),
        "invalid config of component `a`: invalid config: `failure_threshold` must be at least \
         1, got 0"
    );
}

#[tokio::test(start_paused = true)]
async fn built_it_waits_for_its_start_which_runs_once() {
    let probe = Probe::default();
    let manager = FailoverManager::builder()
        .component("a", Scripted::new(&probe), component())
        .build()
        .unwrap();
    assert_eq!(manager.name(), "failover");
    assert_eq!(manager.status(), Status::Unknown);
    assert_eq!(manager.node(), None);
    assert_eq!(manager.report_failure("a"), Err(Error::NotStarted));
    assert_eq!(manager.component_state("a").unwrap().phase, Phase::Idle);
    assert!(manager.history().is_empty());

    let ctx = ComponentContext::standalone("n1").with_leadership(leader());
    manager.start(ctx.clone()).await.unwrap();
    assert_eq!(manager.status(), Status::Healthy);
    assert_eq!(manager.node(), Some(NodeId::new("n1")));
    assert!(
        manager.start(ctx.clone()).await.is_err(),
        "a second start is refused"
    );

    // The node's shutdown stops it as `stop` does.
    ctx.shutdown.cancel();
    assert_eq!(manager.status(), Status::Unknown);
    manager.stop().await.unwrap();
    assert_eq!(manager.report_failure("a"), Err(Error::Stopped));
}

// ---------------------------------------------------------------------------------------------
// Retries, giving up, new outages (issue 15, items 5–8)
// ---------------------------------------------------------------------------------------------

/// Full jitter under a ceiling of `initial`, doubling, at most `max`.
fn backoff(initial: Duration, max: Duration) -> ha_core::backoff::BackoffConfig {
    ha_core::backoff::BackoffConfig {
        initial,
        max,
        multiplier: 2.0,
        max_attempts: None,
    }
}

/// Every failover event published so far, as `name component` (the caller has waited for
/// the history, which is written before each event).
fn names(events: &mut EventSubscriber) -> Vec<String> {
    drain(events)
}

async fn started(manager: &FailoverManager, ctx: ComponentContext) {
    manager.start(ctx).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_try_is_retried_with_backoff_while_the_component_stays_down() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .component(
            "db",
            Scripted::new(&probe).fail_first(1),
            component().retry(3, backoff(2 * S, 10 * S)),
        )
        .build()
        .unwrap();
    started(
        &manager,
        ComponentContext::new(NodeId::new("local"), bus.clone(), leader()),
    )
    .await;
    fail(&manager, "db", 3);
    eventually("the first try ended", 5 * S, || {
        manager.history().len() == 1
    })
    .await;
    let first_end = Instant::now();
    match manager.component_state("db").unwrap().phase {
        Phase::WaitingToRetry { left } => assert!(left <= 2 * S, "{left:?}"),
        other => panic!("waits to retry, not {other:?}"),
    }
    eventually("the second try ended", 10 * S, || {
        manager.history().len() == 2
    })
    .await;
    let h = manager.history();
    assert_eq!(
        h.iter()
            .map(|r| (r.outcome.as_str(), r.try_number, r.gave_up))
            .collect::<Vec<_>>(),
        [("rolled_back", 1, false), ("completed", 2, false)]
    );
    assert_ne!(h[0].id, h[1].id, "each try is its own attempt");
    let second_start = probe.position("verify db");
    assert!(second_start > probe.position("rollback db"));
    // The retry came within the first ceiling (2 s) plus the 1 s of work.
    assert!(Instant::now() - first_end <= 3 * S);
    assert_eq!(
        names(&mut events),
        [
            "failover_started db",
            "failover_rolled_back db",
            "failover_started db",
            "failover_completed db"
        ],
        "a try that is retried does not report the outage failed"
    );
}

#[tokio::test(start_paused = true)]
async fn it_gives_up_after_the_last_try_with_one_failed_event() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .component(
            "db",
            Scripted::new(&probe).failover(Does::Fail),
            component().retry(3, backoff(S, 4 * S)),
        )
        .build()
        .unwrap();
    started(
        &manager,
        ComponentContext::new(NodeId::new("local"), bus.clone(), leader()),
    )
    .await;
    fail(&manager, "db", 3);
    eventually("three tries", 30 * S, || manager.history().len() == 3).await;
    // Long after, still down: nothing more.
    fail(&manager, "db", 10);
    sleep(600 * S).await;
    let h = manager.history();
    assert_eq!(
        h.iter()
            .map(|r| (r.try_number, r.gave_up))
            .collect::<Vec<_>>(),
        [(1, false), (2, false), (3, true)]
    );
    let got = names(&mut events);
    assert_eq!(
        got.iter().filter(|e| *e == "failover_started db").count(),
        3
    );
    assert_eq!(
        got.iter().filter(|e| *e == "failover_failed db").count(),
        1,
        "{got:?}"
    );
    assert_eq!(got.last().unwrap(), "failover_failed db");
    assert_eq!(manager.component_state("db").unwrap().phase, Phase::Idle);
}

#[tokio::test(start_paused = true)]
async fn the_give_up_event_says_so() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .component(
            "db",
            Scripted::new(&probe).failover(Does::Fail),
            component().retry(2, backoff(S, S)),
        )
        .build()
        .unwrap();
    started(
        &manager,
        ComponentContext::new(NodeId::new("local"), bus.clone(), leader()),
    )
    .await;
    fail(&manager, "db", 3);
    loop {
        if let HaEvent::FailoverFailed { reason, .. } =
            next_failover_event(&mut events, 30 * S).await
        {
            assert_eq!(
                reason,
                "gave up after 2 of 2 tries: failover failed: failover of db broke; rolled back"
            );
            break;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_outage_after_a_failed_one_is_handled() {
    let probe = Probe::default();
    let manager = FailoverManager::builder()
        .component(
            "db",
            Scripted::new(&probe).fail_first(2),
            // A long cooldown: a cleanly rolled-back failover switched nothing, so it does
            // not hold the next outage back.
            ComponentConfig::default().retry(2, backoff(S, S)),
        )
        .build()
        .unwrap();
    started(
        &manager,
        ComponentContext::standalone("local").with_leadership(leader()),
    )
    .await;
    fail(&manager, "db", 3);
    eventually("both tries failed", 30 * S, || manager.history().len() == 2).await;
    assert!(manager.history()[1].gave_up);
    // One success (fewer than the recovery threshold of 2), then the threshold of failures:
    // a new outage, handled at once.
    succeed(&manager, "db", 1);
    fail(&manager, "db", 3);
    assert_eq!(manager.component_state("db").unwrap().phase, Phase::Queued);
    eventually("the new outage's failover ended", 5 * S, || {
        manager.history().len() == 3
    })
    .await;
    let last = manager.history().pop().unwrap();
    assert_eq!((last.outcome, last.try_number), (Outcome::Completed, 1));
}

#[tokio::test(start_paused = true)]
async fn leadership_lost_between_failover_and_verify_skips_verify_and_rollback() {
    let probe = Probe::default();
    let gate = Arc::new(Gate::default());
    gate.lead(3);
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .component(
            "db",
            // Verify would fail, and a rollback follow, if they ran.
            Scripted::new(&probe).work(5 * S).verify(Does::Fail),
            ComponentConfig::default(),
        )
        .build()
        .unwrap();
    started(
        &manager,
        ComponentContext::new(NodeId::new("local"), bus.clone(), gate.clone()),
    )
    .await;
    fail(&manager, "db", 3);
    eventually("db runs", S, || manager.in_flight() == 1).await;
    // Deposed while the failover step runs.
    gate.follow();
    eventually("db's failover ended", 30 * S, || {
        !manager.history().is_empty()
    })
    .await;
    sleep(60 * S).await;
    assert_eq!(
        probe.log(),
        ["start db", "end db"],
        "no verify, no rollback"
    );
    let h = manager.history();
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(
        h[0].outcome,
        Outcome::StoppedLeading {
            skipped: Step::Verify,
            failure: None
        }
    );
    assert_eq!(h[0].token, Some(FencingToken(3)));
    assert_eq!(
        h[0].error().unwrap(),
        "this node stopped leading; verify skipped"
    );
    assert_eq!(
        names(&mut events),
        ["failover_started db", "failover_failed db"]
    );
    // Still down: it waits to lead again rather than retry under the stale term.
    assert_eq!(
        manager.component_state("db").unwrap().phase,
        Phase::WaitingForLeadership
    );
}

/// Its failover sends a change that lands `lands_after` later, whatever happens to the call,
/// and then hangs; its rollback reports success.
struct LateEffect {
    lands_after: Duration,
    landed: Arc<AtomicBool>,
    rolled_back: Arc<AtomicBool>,
    reversible: bool,
}

#[async_trait]
impl FailoverAction for LateEffect {
    async fn failover(&self, _ctx: &ActionContext) -> Result<(), ActionError> {
        let (landed, after) = (Arc::clone(&self.landed), self.lands_after);
        // The remote side: not cancelled by dropping this future.
        tokio::spawn(async move {
            sleep(after).await;
            landed.store(true, Ordering::SeqCst);
        });
        std::future::pending().await
    }

    async fn rollback(&self, _ctx: &ActionContext) -> Result<(), ActionError> {
        self.rolled_back.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn can_roll_back(&self) -> bool {
        self.reversible
    }

    fn required_timeout(&self) -> Option<Duration> {
        Some(5 * S)
    }
}

#[tokio::test(start_paused = true)]
async fn a_timeout_whose_effect_lands_later_is_recorded_as_effect_unknown() {
    let late = |reversible| LateEffect {
        lands_after: 8 * S,
        landed: Arc::default(),
        rolled_back: Arc::default(),
        reversible,
    };
    let (db, one_way) = (late(true), late(false));
    let (landed, rolled_back) = (Arc::clone(&db.landed), Arc::clone(&db.rolled_back));
    let one_way_rolled_back = Arc::clone(&one_way.rolled_back);
    let manager = FailoverManager::builder()
        .component("db", db, component().timeout(5 * S))
        .component("one-way", one_way, component().timeout(5 * S))
        .build()
        .unwrap();
    started(
        &manager,
        ComponentContext::standalone("local").with_leadership(leader()),
    )
    .await;
    fail(&manager, "db", 3);
    fail(&manager, "one-way", 3);
    eventually("both timed out", 10 * S, || manager.history().len() == 2).await;
    assert!(!landed.load(Ordering::SeqCst), "not yet");
    assert!(rolled_back.load(Ordering::SeqCst));
    assert!(
        !one_way_rolled_back.load(Ordering::SeqCst),
        "an action that declares it cannot undo is not asked to"
    );
    sleep(10 * S).await;
    assert!(landed.load(Ordering::SeqCst), "the change landed after all");
    let by = |name: &str| {
        manager
            .history()
            .into_iter()
            .find(|r| r.component == name)
            .unwrap()
    };
    let db = by("db");
    assert_eq!(db.outcome.as_str(), "effect_unknown");
    assert_eq!(
        db.outcome,
        Outcome::EffectUnknown {
            failure: ha_failover::StepFailure {
                step: Step::Failover,
                kind: FailureKind::TimedOut(5 * S)
            },
            rollback: None
        }
    );
    let one_way = by("one-way");
    assert_eq!(
        one_way.error().unwrap(),
        "failover timed out after 5s and was cancelled: effect unknown (it may still land); \
         not rolled back: rollback unsupported: the action declares that its effect cannot \
         be undone"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_of_an_irreversible_action_is_not_reported_as_rolled_back() {
    let probe = Probe::default();
    /// Fails, and cannot undo.
    struct OneWay(Probe);
    #[async_trait]
    impl FailoverAction for OneWay {
        async fn failover(&self, _: &ActionContext) -> Result<(), ActionError> {
            Err(ActionError::failed("half done"))
        }
        async fn rollback(&self, _: &ActionContext) -> Result<(), ActionError> {
            self.0.note("rollback".into());
            Ok(())
        }
        fn can_roll_back(&self) -> bool {
            false
        }
    }
    let manager = FailoverManager::builder()
        .component("lb", OneWay(probe.clone()), component())
        .build()
        .unwrap();
    started(
        &manager,
        ComponentContext::standalone("local").with_leadership(leader()),
    )
    .await;
    fail(&manager, "lb", 3);
    eventually("it ended", 5 * S, || manager.history().len() == 1).await;
    let record = manager.history().pop().unwrap();
    assert_eq!(record.outcome.as_str(), "irreversible");
    assert!(probe.log().is_empty(), "rollback never called");
}

#[tokio::test]
async fn a_component_timeout_shorter_than_its_action_needs_is_refused() {
    let late = LateEffect {
        lands_after: S,
        landed: Arc::default(),
        rolled_back: Arc::default(),
        reversible: true,
    };
    let err = FailoverManager::builder()
        .component("db", late, component().timeout(2 * S))
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        Error::TimeoutTooShort {
            component: "db".into(),
            timeout: 2 * S,
            required: 5 * S
        }
    );
    assert_eq!(
        err.to_string(),
        "component `db`: timeout 2s is shorter than the 5s its action needs"
    );
    #[cfg(feature = "command")]
    {
        let ok = ha_failover::CommandAction::new("true", Vec::<String>::new())
            .with_required_timeout(60 * S);
        assert!(
            FailoverManager::builder()
                .component("pg", ok, component().timeout(60 * S))
                .build()
                .is_ok()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_cooldown_of_a_dependency_holds_its_dependents_back() {
    let probe = Probe::default();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let manager = FailoverManager::builder()
        .component(
            "api",
            Scripted::new(&probe),
            component().depends_on("db").cooldown(10 * S),
        )
        .component("db", Scripted::new(&probe), component().cooldown(120 * S))
        .build()
        .unwrap();
    started(
        &manager,
        ComponentContext::new(NodeId::new("local"), bus.clone(), leader()),
    )
    .await;
    fail(&manager, "db", 3);
    fail(&manager, "api", 3);
    eventually("both failed over", 10 * S, || manager.history().len() == 2).await;
    drain(&mut events);

    // Both up, then both down again: a second genuine outage, inside both cooldowns.
    for name in ["db", "api"] {
        succeed(&manager, name, 2);
    }
    fail(&manager, "db", 3);
    fail(&manager, "api", 3);
    assert_eq!(
        names(&mut events),
        ["failover_skipped db", "failover_skipped api"],
        "the second outage is reported, not silently suppressed"
    );
    // api's cooldown is over, db's is not: api waits in the queue behind db.
    sleep(20 * S).await;
    assert_eq!(manager.component_state("api").unwrap().phase, Phase::Queued);
    assert!(matches!(
        manager.component_state("db").unwrap().phase,
        Phase::WaitingForCooldown { .. }
    ));
    eventually("both failed over again", 300 * S, || {
        manager.history().len() == 6
    })
    .await;
    let log = probe.log();
    let starts: Vec<&str> = log
        .iter()
        .filter_map(|l| l.strip_prefix("start "))
        .collect();
    assert_eq!(
        starts,
        ["db", "api", "db", "api"],
        "api's shorter cooldown does not let it run before db: {log:?}"
    );
    let h = manager.history();
    assert_eq!(
        h.iter()
            .map(|r| (r.component.as_str(), r.outcome.as_str()))
            .collect::<Vec<_>>(),
        [
            ("db", "completed"),
            ("api", "completed"),
            ("db", "skipped"),
            ("api", "skipped"),
            ("db", "completed"),
            ("api", "completed")
        ]
    );
}
