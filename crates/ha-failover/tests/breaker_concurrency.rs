//! Half-open accounting under real concurrency (multi-thread runtime, real time): never more
//! trial calls in flight than permitted, and cancelled trials give their slots back, so the
//! breaker never sticks in half-open.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ha_core::CircuitState;
use ha_failover::breaker::{BreakerConfig, CallError, CircuitBreaker};
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep, timeout};

/// Counts itself in `inside` while alive and keeps `max` up to date.
struct Inside {
    inside: Arc<AtomicUsize>,
}

impl Inside {
    fn enter(inside: &Arc<AtomicUsize>, max: &AtomicUsize) -> Self {
        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        Self {
            inside: Arc::clone(inside),
        }
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Polls `cond` every millisecond for up to 10 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_permitted_trials_run_and_cancelled_ones_free_their_slots() {
    const PERMITTED: usize = 3;
    const TASKS: usize = 32;
    let breaker = CircuitBreaker::builder("concurrent")
        .config(BreakerConfig {
            failure_threshold: Some(1),
            failure_rate_threshold: None,
            wait_duration: Duration::from_millis(30),
            permitted_calls_in_half_open: PERMITTED as u32,
            success_threshold: 2,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    let _ = breaker.call(async { Err::<(), _>("down") }).await;
    assert_eq!(breaker.state(), CircuitState::Open);

    let inside = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let entered: Arc<Vec<AtomicBool>> =
        Arc::new((0..TASKS).map(|_| AtomicBool::new(false)).collect());

    // Every task hammers the breaker from the open state, across the move to half-open,
    // until one call of its own gets through and completes.
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let (breaker, inside, max, gate, entered) = (
            breaker.clone(),
            Arc::clone(&inside),
            Arc::clone(&max),
            Arc::clone(&gate),
            Arc::clone(&entered),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let call = breaker.call(async {
                    let _inside = Inside::enter(&inside, &max);
                    entered[i].store(true, Ordering::SeqCst);
                    gate.acquire().await.unwrap().forget();
                    Ok::<_, &str>(())
                });
                match call.await {
                    Ok(()) => return,
                    Err(CallError::Rejected(_)) => sleep(Duration::from_millis(1)).await,
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
        }));
    }

    eventually("the trial slots fill", || {
        inside.load(Ordering::SeqCst) == PERMITTED
    })
    .await;
    // Keep hammering for a while: nobody else gets in.
    sleep(Duration::from_millis(50)).await;
    assert_eq!(inside.load(Ordering::SeqCst), PERMITTED);
    assert_eq!(max.load(Ordering::SeqCst), PERMITTED);
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
    let first: Vec<usize> = (0..TASKS)
        .filter(|&i| entered[i].load(Ordering::SeqCst))
        .collect();
    assert_eq!(first.len(), PERMITTED);

    // Cancel the running trials mid-call: their slots must come back.
    for &i in &first {
        tasks[i].abort();
    }
    for &i in &first {
        assert!((&mut tasks[i]).await.unwrap_err().is_cancelled());
    }
    eventually("new trials take the freed slots", || {
        inside.load(Ordering::SeqCst) == PERMITTED
            && (0..TASKS)
                .filter(|&i| entered[i].load(Ordering::SeqCst))
                .count()
                == 2 * PERMITTED
    })
    .await;
    assert_eq!(
        max.load(Ordering::SeqCst),
        PERMITTED,
        "never more than permitted"
    );
    assert_eq!(breaker.snapshot().cancelled_calls, PERMITTED as u64);

    // Let the trials succeed: two successes close the breaker and everyone gets through.
    gate.add_permits(TASKS);
    for (i, task) in tasks.into_iter().enumerate() {
        if !first.contains(&i) {
            timeout(Duration::from_secs(10), task)
                .await
                .expect("every remaining task completes")
                .unwrap();
        }
    }
    let s = breaker.snapshot();
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(s.trials_in_flight, 0);
    assert_eq!(inside.load(Ordering::SeqCst), 0);
}

/// A tiny xorshift, so each task has its own reproducible randomness.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_outcomes_and_cancellations_never_exceed_the_trial_limit_nor_stick() {
    const PERMITTED: usize = 2;
    const TASKS: u64 = 16;
    let breaker = CircuitBreaker::builder("stress")
        .config(BreakerConfig {
            failure_threshold: Some(2),
            failure_rate_threshold: None,
            wait_duration: Duration::from_millis(2),
            permitted_calls_in_half_open: PERMITTED as u32,
            success_threshold: 2,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    let trials = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let total_trials = Arc::new(AtomicUsize::new(0));

    let mut tasks = Vec::new();
    for seed in 1..=TASKS {
        let (breaker, trials, max, total_trials) = (
            breaker.clone(),
            Arc::clone(&trials),
            Arc::clone(&max),
            Arc::clone(&total_trials),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for _ in 0..150 {
                let Ok(permit) = breaker.try_acquire_owned() else {
                    sleep(Duration::from_millis(1)).await;
                    continue;
                };
                // Counted after the slot is taken and uncounted before it is given back, so
                // this count never exceeds the breaker's own.
                let counted = permit.is_trial().then(|| {
                    total_trials.fetch_add(1, Ordering::SeqCst);
                    Inside::enter(&trials, &max)
                });
                sleep(Duration::from_micros(rng.below(1500))).await;
                drop(counted);
                match rng.below(4) {
                    0 => drop(permit), // cancelled mid-call
                    1 => permit.record_failure(),
                    _ => permit.record_success(),
                }
            }
        }));
    }
    for task in tasks {
        timeout(Duration::from_secs(30), task)
            .await
            .expect("stress task finishes")
            .unwrap();
    }
    assert!(
        total_trials.load(Ordering::SeqCst) > 10,
        "the breaker went through half-open often enough to test it"
    );
    assert!(max.load(Ordering::SeqCst) <= PERMITTED);
    let s = breaker.snapshot();
    assert_eq!(s.trials_in_flight, 0, "no slot leaked: {s:?}");

    // Not stuck: once the wait is over, calls get through and two successes close it.
    eventually("the breaker closes again", || {
        if let Ok(permit) = breaker.try_acquire() {
            permit.record_success();
        }
        breaker.state() == CircuitState::Closed
    })
    .await;
}

/// Closed-state successes skip the lock once the window holds `minimum_calls` calls; threads
/// racing failures (which take the lock and may open the breaker) against them must lose no
/// call and leak no success of an ended period into the next.
#[test]
fn lock_free_successes_are_all_counted_across_transitions() {
    const THREADS: u64 = 4;
    const CALLS: u64 = 20_000;
    let breaker = CircuitBreaker::builder("lock-free")
        .config(BreakerConfig {
            failure_threshold: Some(3),
            failure_rate_threshold: Some(50.0),
            sliding_window: ha_failover::SlidingWindow::Count(20),
            minimum_calls: 10,
            wait_duration: Duration::from_millis(1),
            permitted_calls_in_half_open: 2,
            success_threshold: 1,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    let (succeeded, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (breaker, succeeded, failed) = (&breaker, &succeeded, &failed);
            s.spawn(move || {
                let mut rng = Rng((t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut held = Vec::new();
                for _ in 0..CALLS {
                    if let Ok(permit) = breaker.try_acquire() {
                        held.push(permit);
                    }
                    // Finish calls out of order, some after the period that admitted them.
                    if held.len() > 3 || rng.below(2) == 0 {
                        let Some(permit) = held.pop() else { continue };
                        if rng.below(10) == 0 {
                            failed.fetch_add(1, Ordering::SeqCst);
                            permit.record_failure();
                        } else {
                            succeeded.fetch_add(1, Ordering::SeqCst);
                            permit.record_success();
                        }
                    }
                }
                for permit in held {
                    succeeded.fetch_add(1, Ordering::SeqCst);
                    permit.record_success();
                }
            });
        }
    });
    let s = breaker.snapshot();
    assert_eq!(s.successful_calls, succeeded.load(Ordering::SeqCst) as u64);
    assert_eq!(s.failed_calls, failed.load(Ordering::SeqCst) as u64);
    assert_eq!(s.trials_in_flight, 0);
    assert!(s.window_calls <= 20);
    assert!(s.window_failures <= s.window_calls);
    // Quiet again: the window fills with successes only, so no failure is left in it and a
    // burst of lock-free successes is all recorded.
    std::thread::sleep(Duration::from_millis(2));
    for _ in 0..100 {
        if let Ok(permit) = breaker.try_acquire() {
            permit.record_success();
        }
    }
    let s = breaker.snapshot();
    assert_eq!(s.state, CircuitState::Closed, "{s:?}");
    assert_eq!((s.window_calls, s.window_failures), (20, 0), "{s:?}");
    assert_eq!(s.consecutive_failures, 0);
}
