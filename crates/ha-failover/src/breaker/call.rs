//! `CircuitBreaker::call`: runs a future through the breaker, and `CallError`, what it
//! returns when the future did not succeed.

use std::future::Future;

use super::{CircuitBreaker, Rejected};

/// Decides whether an error counts as a failure of the protected dependency.
///
/// Implemented by [`AllErrors`] (the default) and by every `Fn(&E) -> bool`.
pub trait FailurePredicate<E> {
    /// `true`: the error counts as a failure; `false`: as a success.
    fn is_failure(&self, error: &E) -> bool;
}

/// The default predicate: every error is a failure.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct AllErrors;

impl<E> FailurePredicate<E> for AllErrors {
    #[inline]
    fn is_failure(&self, _error: &E) -> bool {
        true
    }
}

impl<E, F: Fn(&E) -> bool> FailurePredicate<E> for F {
    #[inline]
    fn is_failure(&self, error: &E) -> bool {
        self(error)
    }
}

/// Why a call through a breaker returned no value: the breaker refused it, or the call
/// itself failed.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The breaker did not let the call through (it never started).
    #[error(transparent)]
    Rejected(Rejected),
    /// The call ran and returned this error (recorded as a failure or not, by the
    /// breaker's [`FailurePredicate`]).
    #[error(transparent)]
    Inner(E),
}

impl<E> CallError<E> {
    /// Whether the breaker refused the call.
    pub fn is_rejected(&self) -> bool {
        matches!(self, CallError::Rejected(_))
    }

    /// The call's own error, if it ran.
    pub fn into_inner(self) -> Option<E> {
        match self {
            CallError::Inner(e) => Some(e),
            CallError::Rejected(_) => None,
        }
    }

    /// Maps the call's own error.
    pub fn map_inner<F>(self, f: impl FnOnce(E) -> F) -> CallError<F> {
        match self {
            CallError::Inner(e) => CallError::Inner(f(e)),
            CallError::Rejected(r) => CallError::Rejected(r),
        }
    }
}

impl<E> From<Rejected> for CallError<E> {
    fn from(r: Rejected) -> Self {
        CallError::Rejected(r)
    }
}

impl<P> CircuitBreaker<P> {
    /// Runs `future` if the breaker lets it through, and records its outcome.
    ///
    /// Admission happens when the returned future is first polled; if rejected, `future` is
    /// dropped without being polled. `Ok` is a success; `Err(e)` is a failure if the
    /// predicate says so, else a success. With the slow-call rule on, a call lasting
    /// `slow_call_duration` or longer also counts as slow. Dropping the returned future
    /// before it completes counts as a cancelled call: nothing is recorded and a half-open
    /// trial slot is freed at once.
    pub async fn call<T, E, F>(&self, future: F) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
        P: FailurePredicate<E>,
    {
        let permit = self.try_acquire()?;
        match future.await {
            Ok(value) => {
                permit.record_success();
                Ok(value)
            }
            Err(error) => {
                if self.predicate.is_failure(&error) {
                    permit.record_failure();
                } else {
                    permit.record_success();
                }
                Err(CallError::Inner(error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::{Future, pending, poll_fn};
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::task::Poll;
    use std::time::Duration;

    use ha_core::{CircuitState, EventBus, HaEvent, NodeId};
    use tokio::time::advance;

    use super::*;
    use crate::breaker::{BreakerConfig, SlidingWindow, WaitBackoff};

    const S: Duration = Duration::from_secs(1);

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: Some(3),
            failure_rate_threshold: None,
            wait_duration: 10 * S,
            permitted_calls_in_half_open: 1,
            success_threshold: 2,
            ..BreakerConfig::default()
        }
    }

    fn breaker(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker::builder("test")
            .config(config)
            .build()
            .unwrap()
    }

    async fn ok(b: &CircuitBreaker) -> Result<(), CallError<&'static str>> {
        b.call(async { Ok(()) }).await
    }

    async fn fail(b: &CircuitBreaker) -> Result<(), CallError<&'static str>> {
        b.call(async { Err("boom") }).await
    }

    async fn slow(b: &CircuitBreaker, d: Duration) -> Result<(), CallError<&'static str>> {
        b.call(async move {
            advance(d).await;
            Ok(())
        })
        .await
    }

    /// Polls `f` once; `Some` if it finished.
    async fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut f = f;
        poll_fn(|cx| match f.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }

    async fn trip(b: &CircuitBreaker) {
        for _ in 0..3 {
            let _ = fail(b).await;
        }
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_the_nth_consecutive_failure_only() {
        let b = breaker(config());
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        ok(&b).await.unwrap();
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        assert_eq!(
            b.state(),
            CircuitState::Closed,
            "a success resets the streak"
        );
        let err = fail(&b).await.unwrap_err();
        assert_eq!(err, CallError::Inner("boom"), "the tripping call ran");
        assert_eq!(b.state(), CircuitState::Open);
        let err = ok(&b).await.unwrap_err();
        assert!(err.is_rejected());
        assert_eq!(b.snapshot().rejected_calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_after_minimum_calls() {
        let b = breaker(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: Some(50.0),
            sliding_window: SlidingWindow::Count(4),
            minimum_calls: 4,
            ..config()
        });
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        ok(&b).await.unwrap();
        assert_eq!(b.snapshot().failure_rate, None, "below minimum_calls");
        assert_eq!(
            b.state(),
            CircuitState::Closed,
            "2 of 3 failed, but only 3 calls"
        );
        ok(&b).await.unwrap();
        assert_eq!(b.state(), CircuitState::Open, "2 of 4 = 50%");
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_over_a_count_window_forgets_old_calls() {
        let b = breaker(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: Some(75.0),
            sliding_window: SlidingWindow::Count(4),
            minimum_calls: 2,
            ..config()
        });
        for _ in 0..2 {
            fail(&b).await.unwrap_err();
            ok(&b).await.unwrap();
        }
        let s = b.snapshot();
        assert_eq!((s.window_calls, s.window_failures), (4, 2));
        assert_eq!(s.failure_rate, Some(50.0));
        fail(&b).await.unwrap_err();
        assert_eq!(
            b.state(),
            CircuitState::Closed,
            "o f o f: the oldest failure left"
        );
        fail(&b).await.unwrap_err();
        assert_eq!(b.state(), CircuitState::Open, "f o f f: 3 of 4 = 75%");
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_over_a_time_window_forgets_old_seconds() {
        let b = breaker(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: Some(60.0),
            sliding_window: SlidingWindow::Time(10 * S),
            minimum_calls: 3,
            ..config()
        });
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        advance(10 * S).await;
        assert_eq!(
            b.snapshot().window_calls,
            0,
            "both failures left the window"
        );
        ok(&b).await.unwrap();
        fail(&b).await.unwrap_err();
        assert_eq!(b.state(), CircuitState::Closed, "2 calls < minimum 3");
        advance(9 * S).await;
        fail(&b).await.unwrap_err();
        assert_eq!(b.state(), CircuitState::Open, "2 of 3 in the last 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_slow_call_rate() {
        let b = breaker(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: None,
            slow_call_rate_threshold: Some(50.0),
            slow_call_duration: 2 * S,
            sliding_window: SlidingWindow::Count(10),
            minimum_calls: 4,
            ..config()
        });
        slow(&b, 2 * S).await.unwrap();
        slow(&b, Duration::from_millis(1999)).await.unwrap();
        ok(&b).await.unwrap();
        let s = b.snapshot();
        assert_eq!(
            (s.slow_calls, s.successful_calls, s.window_slow_calls),
            (1, 2, 1)
        );
        slow(&b, 5 * S).await.unwrap();
        assert_eq!(b.state(), CircuitState::Open, "2 of 4 took 2 s or more");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_then_admits_one_trial_and_closes_after_the_success_threshold() {
        let b = breaker(config());
        trip(&b).await;
        advance(10 * S - Duration::from_millis(1)).await;
        let Err(CallError::Rejected(r)) = ok(&b).await else {
            panic!("still open")
        };
        assert_eq!(r.retry_after, Some(Duration::from_millis(1)));
        assert_eq!(r.state, CircuitState::Open);
        advance(Duration::from_millis(1)).await;

        let first = b.try_acquire().unwrap();
        assert!(first.is_trial());
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let r = b.try_acquire().unwrap_err();
        assert_eq!((r.state, r.retry_after), (CircuitState::HalfOpen, None));
        first.record_success();
        assert_eq!(b.state(), CircuitState::HalfOpen, "1 of 2 successes");
        ok(&b).await.unwrap();
        assert_eq!(b.state(), CircuitState::Closed);
        let s = b.snapshot();
        assert_eq!((s.consecutive_opens, s.consecutive_failures), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_reopens_with_backoff_and_closing_resets_it() {
        let b = breaker(BreakerConfig {
            wait_backoff: Some(WaitBackoff {
                multiplier: 2.0,
                max: 30 * S,
            }),
            ..config()
        });
        trip(&b).await;
        for expected in [20 * S, 30 * S, 30 * S] {
            advance(b.snapshot().retry_after.unwrap()).await;
            fail(&b).await.unwrap_err();
            assert_eq!(b.state(), CircuitState::Open);
            assert_eq!(b.snapshot().retry_after, Some(expected));
        }
        advance(30 * S).await;
        ok(&b).await.unwrap();
        ok(&b).await.unwrap();
        assert_eq!(b.state(), CircuitState::Closed);
        trip(&b).await;
        assert_eq!(
            b.snapshot().retry_after,
            Some(10 * S),
            "backoff starts over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_trial_reopens_when_the_slow_rule_is_on() {
        let b = breaker(BreakerConfig {
            slow_call_rate_threshold: Some(100.0),
            slow_call_duration: S,
            sliding_window: SlidingWindow::Count(10),
            minimum_calls: 10,
            ..config()
        });
        trip(&b).await;
        advance(10 * S).await;
        slow(&b, S).await.unwrap();
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn the_predicate_decides_which_errors_count() {
        let b = CircuitBreaker::builder("p")
            .config(config())
            .record_error(|e: &&str| *e != "not found")
            .build()
            .unwrap();
        for _ in 0..5 {
            let r = b.call(async { Err::<(), _>("not found") }).await;
            assert_eq!(r, Err(CallError::Inner("not found")));
        }
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.snapshot().successful_calls, 5);
        for _ in 0..3 {
            let _ = b.call(async { Err::<(), _>("refused") }).await;
        }
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_trial_frees_its_slot_and_records_nothing() {
        let b = breaker(config());
        trip(&b).await;
        advance(10 * S).await;
        {
            let mut call = pin!(b.call(pending::<Result<(), &str>>()));
            assert!(
                poll_once(call.as_mut()).await.is_none(),
                "admitted, running"
            );
            assert_eq!(b.snapshot().trials_in_flight, 1);
            assert!(
                ok(&b).await.unwrap_err().is_rejected(),
                "the one slot is taken"
            );
        } // dropped mid-call
        let s = b.snapshot();
        assert_eq!((s.state, s.trials_in_flight), (CircuitState::HalfOpen, 0));
        assert_eq!((s.cancelled_calls, s.half_open_successes), (1, 0));
        ok(&b).await.unwrap();
        ok(&b).await.unwrap();
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_call_in_closed_records_nothing() {
        let b = breaker(config());
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        drop(b.try_acquire().unwrap());
        let s = b.snapshot();
        assert_eq!(
            (s.consecutive_failures, s.cancelled_calls, s.window_calls),
            (2, 1, 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_trial_decides_nothing() {
        let b = breaker(BreakerConfig {
            permitted_calls_in_half_open: 2,
            success_threshold: 1,
            ..config()
        });
        trip(&b).await;
        advance(10 * S).await;
        let late = b.try_acquire_owned().unwrap();
        let closer = b.try_acquire().unwrap();
        closer.record_success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(
            b.snapshot().trials_in_flight,
            1,
            "the late trial still runs"
        );
        late.record_failure();
        let s = b.snapshot();
        assert_eq!(
            s.state,
            CircuitState::Closed,
            "a trial of an ended period is ignored"
        );
        assert_eq!((s.window_calls, s.failed_calls), (0, 4));
        assert_eq!(s.trials_in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trial_keeps_its_slot_into_the_next_half_open_period() {
        let b = breaker(BreakerConfig {
            permitted_calls_in_half_open: 2,
            ..config()
        });
        trip(&b).await;
        advance(10 * S).await;
        let failing = b.try_acquire().unwrap();
        let slow = b.try_acquire().unwrap();
        failing.record_failure();
        assert_eq!(b.state(), CircuitState::Open);
        advance(10 * S).await;

        let next = b.try_acquire().unwrap();
        assert!(next.is_trial());
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let r = b.try_acquire().unwrap_err();
        assert_eq!(
            r.state,
            CircuitState::HalfOpen,
            "the old trial holds the other slot"
        );
        slow.record_success();
        assert_eq!(
            b.snapshot().half_open_successes,
            0,
            "its success decides nothing"
        );
        let second = b.try_acquire().unwrap();
        next.record_success();
        second.record_success();
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_are_published_in_order() {
        let bus = EventBus::new(16);
        let mut events = bus.subscribe();
        let b = CircuitBreaker::builder("db")
            .config(config())
            .bus(bus)
            .node(NodeId::new("n1"))
            .build()
            .unwrap();
        trip(&b).await;
        advance(10 * S).await;
        fail(&b).await.unwrap_err();
        advance(10 * S).await;
        ok(&b).await.unwrap();
        ok(&b).await.unwrap();
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            match e {
                HaEvent::CircuitStateChanged {
                    node,
                    circuit,
                    from,
                    to,
                    ..
                } => {
                    assert_eq!((node.as_str(), circuit.as_str()), ("n1", "db"));
                    seen.push((from, to));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        use CircuitState::*;
        assert_eq!(
            seen,
            [
                (Closed, Open),
                (Open, HalfOpen),
                (HalfOpen, Open),
                (Open, HalfOpen),
                (HalfOpen, Closed)
            ]
        );
    }

    /// A recorder that keeps every counter and gauge as an atomic, keyed by
    /// `name{label=value,...}` with labels sorted.
    #[derive(Default)]
    struct TestRecorder {
        values: std::sync::Mutex<std::collections::HashMap<String, Arc<AtomicU64>>>,
    }

    impl TestRecorder {
        fn slot(&self, key: &metrics::Key) -> Arc<AtomicU64> {
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            Arc::clone(self.values.lock().unwrap().entry(name).or_default())
        }

        fn get(&self, name: &str) -> u64 {
            self.values
                .lock()
                .unwrap()
                .get(name)
                .map_or(0, |v| v.load(Ordering::SeqCst))
        }
    }

    impl metrics::Recorder for TestRecorder {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            metrics::Counter::from_arc(self.slot(key))
        }
        fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::from_arc(self.slot(key))
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_and_transitions_are_counted_and_the_state_gauge_follows() {
        let rec = TestRecorder::default();
        let b = metrics::with_local_recorder(&rec, || breaker(config()));
        let state = || f64::from_bits(rec.get("ha_circuit_state{circuit=test}"));
        let calls = |outcome: &str| {
            rec.get(&format!(
                "ha_circuit_calls_total{{circuit=test,outcome={outcome}}}"
            ))
        };
        let moves = |from: &str, to: &str| {
            rec.get(&format!(
                "ha_circuit_transitions_total{{circuit=test,from={from},to={to}}}"
            ))
        };
        assert_eq!(state(), 0.0);
        ok(&b).await.unwrap();
        trip(&b).await;
        assert_eq!(state(), 2.0);
        ok(&b).await.unwrap_err();
        advance(10 * S).await;
        let trial = b.try_acquire().unwrap();
        assert_eq!(state(), 1.0);
        drop(trial);
        ok(&b).await.unwrap();
        ok(&b).await.unwrap();
        assert_eq!(state(), 0.0);
        assert_eq!(
            [
                calls("success"),
                calls("failure"),
                calls("slow"),
                calls("rejected"),
                calls("cancelled")
            ],
            [3, 3, 0, 1, 1]
        );
        assert_eq!(
            [
                moves("closed", "open"),
                moves("open", "half_open"),
                moves("half_open", "open"),
                moves("half_open", "closed")
            ],
            [1, 1, 0, 1]
        );
    }

    #[test]
    fn build_checks_name_config_and_node() {
        let err = CircuitBreaker::builder(" ").build().unwrap_err();
        assert!(err.to_string().contains("`name`"), "{err}");
        let err = CircuitBreaker::builder("x")
            .config(BreakerConfig {
                success_threshold: 0,
                ..config()
            })
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("`success_threshold`"), "{err}");
        assert!(!err.is_retryable());
        let err = CircuitBreaker::builder("x")
            .bus(EventBus::default())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("`node`"), "{err}");
    }

    #[test]
    fn rejected_says_what_and_when() {
        let r = Rejected {
            circuit: "db".into(),
            state: CircuitState::Open,
            retry_after: Some(Duration::from_millis(1500)),
        };
        assert_eq!(r.to_string(), "circuit `db` is open; retry in 1s 500ms");
        assert!(r.is_retryable());
        let e: CallError<std::io::Error> = r.clone().into();
        assert_eq!(e.to_string(), r.to_string());
        assert!(e.into_inner().is_none());
    }
}
