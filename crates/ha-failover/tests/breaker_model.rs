//! The breaker against a reference model: random sequences of calls (succeeding, failing,
//! slow, cancelled, held open and finished later) and time steps, applied one after another
//! to a real breaker on paused time and to a plain model written from the documented rules.
//! After every step both must agree on the admission decision, the state, the trial slots in
//! flight and the window.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::future::{Future, pending, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use ha_core::CircuitState;
use ha_failover::breaker::{
    BreakerConfig, CallError, CircuitBreaker, OwnedPermit, SlidingWindow, WaitBackoff,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fail {
    /// Counts as a failure.
    Counted,
    /// The predicate says it does not count (so the call is a success).
    Ignored,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Success,
    Failure,
    Ignored,
    /// Succeeds after `slow_call_duration`.
    Slow,
}

#[derive(Clone, Debug)]
enum Op {
    /// A whole call through `call`.
    Call(Kind),
    /// A call admitted (or not) and dropped before it completes.
    Cancel,
    /// Take a permit and keep it.
    Hold,
    /// Report on a held permit.
    Finish { index: usize, failed: bool },
    /// Drop a held permit unrecorded.
    Drop { index: usize },
    /// Let time pass (ms).
    Advance(u64),
}

/// The rules, restated as directly as possible: explicit state, a list of every recorded call
/// since the breaker last closed, times in milliseconds since the breaker was built.
#[derive(Debug)]
struct Model {
    cfg: BreakerConfig,
    now: u64,
    state: CircuitState,
    /// Grows at every transition; a permit's outcome only counts in the period that
    /// admitted it.
    period: u64,
    /// Trial permits alive, from any period.
    in_flight: u32,
    successes: u32,
    opens: u32,
    open_until: u64,
    streak: u32,
    calls: Vec<(u64, bool, bool)>,
}

#[derive(Clone, Copy, Debug)]
struct ModelPermit {
    period: u64,
    trial: bool,
    started: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap()
}

impl Model {
    fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            now: 0,
            state: CircuitState::Closed,
            period: 0,
            in_flight: 0,
            successes: 0,
            opens: 0,
            open_until: 0,
            streak: 0,
            calls: Vec::new(),
        }
    }

    /// `Err(Some(ms))`: open, retry in `ms`; `Err(None)`: half-open and full.
    fn acquire(&mut self) -> Result<ModelPermit, Option<u64>> {
        let trial = match self.state {
            CircuitState::Closed => false,
            CircuitState::HalfOpen => {
                if self.in_flight >= self.cfg.permitted_calls_in_half_open {
                    return Err(None);
                }
                self.in_flight += 1;
                true
            }
            CircuitState::Open => {
                if self.now < self.open_until {
                    return Err(Some(self.open_until - self.now));
                }
                self.go(CircuitState::HalfOpen);
                // Trials of an earlier period may still hold every slot.
                if self.in_flight >= self.cfg.permitted_calls_in_half_open {
                    return Err(None);
                }
                self.in_flight += 1;
                true
            }
        };
        Ok(ModelPermit {
            period: self.period,
            trial,
            started: self.now,
        })
    }

    fn finish(&mut self, p: ModelPermit, failed: bool) {
        let slow = self.cfg.slow_call_rate_threshold.is_some()
            && self.now - p.started >= ms(self.cfg.slow_call_duration);
        if p.trial {
            // A trial holds its slot until it ends, whatever happened meanwhile.
            self.in_flight -= 1;
        }
        if p.period != self.period {
            return;
        }
        if p.trial {
            if failed || slow {
                self.go(CircuitState::Open);
            } else {
                self.successes += 1;
                if self.successes >= self.cfg.success_threshold {
                    self.go(CircuitState::Closed);
                }
            }
            return;
        }
        self.calls.push((self.now / 1000, failed, slow));
        self.streak = if failed { self.streak + 1 } else { 0 };
        let (calls, failures, slows) = self.window();
        let reaches = |part: u64, threshold: Option<f64>| {
            threshold.is_some_and(|t| {
                calls >= u64::from(self.cfg.minimum_calls)
                    && part as f64 * 100.0 >= t * calls as f64
            })
        };
        if self.cfg.failure_threshold.is_some_and(|n| self.streak >= n)
            || reaches(failures, self.cfg.failure_rate_threshold)
            || reaches(slows, self.cfg.slow_call_rate_threshold)
        {
            self.go(CircuitState::Open);
        }
    }

    fn cancel(&mut self, p: ModelPermit) {
        if p.trial {
            self.in_flight -= 1;
        }
    }

    /// (calls, failures, slow calls) in the sliding window now.
    fn window(&self) -> (u64, u64, u64) {
        let inside: Vec<_> = match self.cfg.sliding_window {
            SlidingWindow::Count(n) => {
                let skip = self.calls.len().saturating_sub(n as usize);
                self.calls[skip..].to_vec()
            }
            SlidingWindow::Time(d) => {
                let now = self.now / 1000;
                self.calls
                    .iter()
                    .copied()
                    .filter(|&(s, ..)| now - s < d.as_secs())
                    .collect()
            }
        };
        let count = |f: fn(&(u64, bool, bool)) -> bool| inside.iter().filter(|c| f(c)).count();
        (
            inside.len() as u64,
            count(|c| c.1) as u64,
            count(|c| c.2) as u64,
        )
    }

    fn go(&mut self, to: CircuitState) {
        self.period += 1;
        match to {
            CircuitState::Open => {
                self.opens += 1;
                let wait = ms(self.cfg.wait_duration);
                let wait = match self.cfg.wait_backoff {
                    // The generated configs use multiplier 2: a shift, in whole milliseconds.
                    Some(b) => wait
                        .checked_shl(self.opens - 1)
                        .filter(|w| *w >> (self.opens - 1) == wait)
                        .map_or(ms(b.max), |w| w.min(ms(b.max))),
                    None => wait,
                };
                self.open_until = self.now + wait;
            }
            CircuitState::HalfOpen => self.successes = 0,
            CircuitState::Closed => {
                self.calls.clear();
                self.streak = 0;
                self.opens = 0;
                self.successes = 0;
            }
        }
        self.state = to;
    }
}

fn config() -> impl Strategy<Value = BreakerConfig> {
    let rate = || {
        proptest::option::of(prop_oneof![
            Just(25.0),
            Just(33.3),
            Just(50.0),
            Just(75.0),
            Just(100.0)
        ])
    };
    let window = prop_oneof![
        (1u32..8).prop_map(SlidingWindow::Count),
        (1u64..6).prop_map(|s| SlidingWindow::Time(Duration::from_secs(s))),
    ];
    (
        proptest::option::of(1u32..5),
        rate(),
        rate(),
        1u64..4,
        window,
        1u32..8,
        1u64..5,
        proptest::option::of(1u64..6),
        1u32..4,
        1u32..4,
    )
        .prop_map(
            |(
                failure_threshold,
                failure_rate_threshold,
                slow_call_rate_threshold,
                slow_secs,
                sliding_window,
                minimum_calls,
                wait_secs,
                backoff_factor,
                permitted_calls_in_half_open,
                success_threshold,
            )| {
                let minimum_calls = match sliding_window {
                    SlidingWindow::Count(n) => minimum_calls.min(n),
                    SlidingWindow::Time(_) => minimum_calls,
                };
                let wait_duration = Duration::from_secs(wait_secs);
                BreakerConfig {
                    failure_threshold: if failure_rate_threshold.is_none()
                        && slow_call_rate_threshold.is_none()
                    {
                        failure_threshold.or(Some(2))
                    } else {
                        failure_threshold
                    },
                    failure_rate_threshold,
                    slow_call_rate_threshold,
                    slow_call_duration: Duration::from_secs(slow_secs),
                    sliding_window,
                    minimum_calls,
                    wait_duration,
                    wait_backoff: backoff_factor.map(|f| WaitBackoff {
                        multiplier: 2.0,
                        max: wait_duration * u32::try_from(f).unwrap(),
                    }),
                    permitted_calls_in_half_open,
                    success_threshold,
                }
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        3 => Just(Kind::Success),
        3 => Just(Kind::Failure),
        1 => Just(Kind::Ignored),
        2 => Just(Kind::Slow),
    ];
    prop_oneof![
        6 => kind.prop_map(Op::Call),
        1 => Just(Op::Cancel),
        2 => Just(Op::Hold),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(index, failed)| Op::Finish { index, failed }),
        1 => any::<usize>().prop_map(|index| Op::Drop { index }),
        4 => prop_oneof![4 => (0u64..=16).prop_map(|k| k * 250), 1 => Just(60_000)].prop_map(Op::Advance),
    ]
}

/// Compares an admission decision: `Ok` against a model permit, `Err` against its reason.
fn same_decision(
    step: usize,
    real: Result<(), &ha_failover::Rejected>,
    model: &Result<ModelPermit, Option<u64>>,
) -> Result<(), TestCaseError> {
    match (real, model) {
        (Ok(()), Ok(_)) => Ok(()),
        (Err(r), Err(retry)) => {
            prop_assert_eq!(
                r.retry_after,
                retry.map(Duration::from_millis),
                "step {}",
                step
            );
            let state = if retry.is_some() {
                CircuitState::Open
            } else {
                CircuitState::HalfOpen
            };
            prop_assert_eq!(r.state, state, "step {}", step);
            Ok(())
        }
        (real, model) => Err(TestCaseError::fail(format!(
            "step {step}: breaker admitted: {}, model admitted: {}",
            real.is_ok(),
            model.is_ok()
        ))),
    }
}

async fn run(cfg: BreakerConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let breaker = CircuitBreaker::builder("model")
        .config(cfg.clone())
        .record_error(|e: &Fail| *e == Fail::Counted)
        .build()
        .unwrap();
    let slow = cfg.slow_call_duration;
    let mut model = Model::new(cfg);
    let mut held: Vec<(OwnedPermit, ModelPermit)> = Vec::new();

    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Call(kind) => {
                let expected = model.acquire();
                let result = breaker
                    .call(async move {
                        match kind {
                            Kind::Success => Ok(()),
                            Kind::Failure => Err(Fail::Counted),
                            Kind::Ignored => Err(Fail::Ignored),
                            Kind::Slow => {
                                tokio::time::advance(slow).await;
                                Ok(())
                            }
                        }
                    })
                    .await;
                let real = match &result {
                    Err(CallError::Rejected(r)) => Err(r),
                    _ => Ok(()),
                };
                same_decision(step, real, &expected)?;
                if let Ok(p) = expected {
                    if matches!(kind, Kind::Slow) {
                        model.now += ms(slow);
                    }
                    model.finish(p, matches!(kind, Kind::Failure));
                }
            }
            Op::Cancel => {
                let expected = model.acquire();
                let mut call = pin!(breaker.call(pending::<Result<(), Fail>>()));
                let first = poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
                let real = match &first {
                    Poll::Pending => Ok(()),
                    Poll::Ready(Err(CallError::Rejected(r))) => Err(r),
                    Poll::Ready(other) => panic!("a pending call finished: {other:?}"),
                };
                same_decision(step, real, &expected)?;
                if let Ok(p) = expected {
                    model.cancel(p);
                }
            }
            Op::Hold => {
                let expected = model.acquire();
                let permit = breaker.try_acquire_owned();
                same_decision(step, permit.as_ref().map(|_| ()), &expected)?;
                if let (Ok(permit), Ok(p)) = (permit, expected) {
                    prop_assert_eq!(permit.is_trial(), p.trial, "step {}", step);
                    held.push((permit, p));
                }
            }
            Op::Finish { index, failed } => {
                if !held.is_empty() {
                    let (permit, p) = held.swap_remove(index % held.len());
                    if failed {
                        permit.record_failure();
                    } else {
                        permit.record_success();
                    }
                    model.finish(p, failed);
                }
            }
            Op::Drop { index } => {
                if !held.is_empty() {
                    let (permit, p) = held.swap_remove(index % held.len());
                    drop(permit);
                    model.cancel(p);
                }
            }
            Op::Advance(d) => {
                tokio::time::advance(Duration::from_millis(d)).await;
                model.now += d;
            }
        }

        let s = breaker.snapshot();
        prop_assert_eq!(s.state, model.state, "step {}: {:?}", step, model);
        prop_assert_eq!(s.trials_in_flight, model.in_flight, "step {}", step);
        prop_assert_eq!(s.consecutive_failures, model.streak, "step {}", step);
        prop_assert_eq!(s.consecutive_opens, model.opens, "step {}", step);
        let (calls, failures, slows) = model.window();
        prop_assert_eq!(
            (s.window_calls, s.window_failures, s.window_slow_calls),
            (calls, failures, slows),
            "step {}",
            step
        );
        if model.state == CircuitState::Open {
            let left = model.open_until.saturating_sub(model.now);
            prop_assert_eq!(s.retry_after, Some(Duration::from_millis(left)));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn breaker_matches_the_reference_model(
        cfg in config(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(cfg, ops))?;
    }
}
