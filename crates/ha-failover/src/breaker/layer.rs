//! `CircuitBreakerLayer`: a breaker in front of any `tower::Service`.
//!
//! See [`CircuitBreakerService`] for where the permit is taken and why.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::call::{AllErrors, CallError, FailurePredicate};
use super::{CircuitBreaker, OwnedPermit, Rejected};

/// Wraps services in a [`CircuitBreakerService`] sharing one breaker.
///
/// ```
/// use ha_failover::breaker::{CallError, CircuitBreaker, CircuitBreakerLayer};
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let breaker = CircuitBreaker::builder("backend").build().unwrap();
/// let service = CircuitBreakerLayer::new(breaker.clone())
///     .layer(service_fn(|n: u32| async move { if n > 0 { Ok(n) } else { Err("zero") } }));
/// assert_eq!(service.clone().oneshot(1).await, Ok(1));
/// for _ in 0..3 {
///     assert_eq!(service.clone().oneshot(0).await, Err(CallError::Inner("zero")));
/// }
/// assert!(service.oneshot(2).await.unwrap_err().is_rejected());
/// # }
/// ```
#[derive(Clone)]
pub struct CircuitBreakerLayer<P = AllErrors> {
    breaker: CircuitBreaker<P>,
}

impl<P> CircuitBreakerLayer<P> {
    /// A layer for `breaker`; its predicate decides which service errors are failures.
    pub fn new(breaker: CircuitBreaker<P>) -> Self {
        Self { breaker }
    }
}

impl<S, P: Clone> Layer<S> for CircuitBreakerLayer<P> {
    type Service = CircuitBreakerService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::new(inner, self.breaker.clone())
    }
}

impl<P> fmt::Debug for CircuitBreakerLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.breaker)
            .finish()
    }
}

/// A service that calls `S` only while the breaker lets it, and records every response.
///
/// Errors are [`CallError`]s: `Rejected` when the breaker refused, `Inner` for the inner
/// service's own errors (from `poll_ready` too, which are not recorded: no call was made).
///
/// # Where the permit is taken
///
/// In `call`, not in `poll_ready`. A permit reserved in `poll_ready` (a half-open trial slot)
/// would be held by the service until its next `call`, and leaked if the caller drops the
/// service or never calls, which tower allows. So `poll_ready` only asks the inner service;
/// `call` asks the breaker and, if refused, returns a future that resolves at once to
/// [`CallError::Rejected`] without calling the inner service. The readiness the inner
/// service granted is then left for the next `call`, as tower's contract permits.
#[derive(Clone)]
pub struct CircuitBreakerService<S, P = AllErrors> {
    inner: S,
    breaker: CircuitBreaker<P>,
}

impl<S, P> CircuitBreakerService<S, P> {
    /// `inner` behind `breaker`.
    pub fn new(inner: S, breaker: CircuitBreaker<P>) -> Self {
        Self { inner, breaker }
    }

    /// The breaker.
    pub fn breaker(&self) -> &CircuitBreaker<P> {
        &self.breaker
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug, P> fmt::Debug for CircuitBreakerService<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl<S, Req, P> Service<Req> for CircuitBreakerService<S, P>
where
    S: Service<Req>,
    P: FailurePredicate<S::Error> + Clone,
{
    type Response = S::Response;
    type Error = CallError<S::Error>;
    type Future = ResponseFuture<S::Future, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(CallError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let state = match self.breaker.try_acquire_owned() {
            Ok(permit) => State::Admitted {
                future: self.inner.call(req),
                permit: Some(permit),
                predicate: self.breaker.predicate().clone(),
            },
            Err(rejected) => State::Rejected {
                rejected: Some(rejected),
            },
        };
        ResponseFuture { state }
    }
}

pin_project! {
    /// The response of a [`CircuitBreakerService`]. Dropping it before it completes counts
    /// the call as cancelled (a half-open trial slot is freed).
    pub struct ResponseFuture<F, P> {
        #[pin]
        state: State<F, P>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, P> {
        Admitted {
            #[pin]
            future: F,
            permit: Option<OwnedPermit>,
            predicate: P,
        },
        Rejected {
            rejected: Option<Rejected>,
        },
    }
}

impl<F, P> fmt::Debug for ResponseFuture<F, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<F, T, E, P> Future for ResponseFuture<F, P>
where
    F: Future<Output = Result<T, E>>,
    P: FailurePredicate<E>,
{
    type Output = Result<T, CallError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Admitted {
                future,
                permit,
                predicate,
            } => {
                let output = ready!(future.poll(cx));
                if let Some(permit) = permit.take() {
                    match &output {
                        Err(e) if predicate.is_failure(e) => permit.record_failure(),
                        _ => permit.record_success(),
                    }
                }
                Poll::Ready(output.map_err(CallError::Inner))
            }
            StateProj::Rejected { rejected } => match rejected.take() {
                Some(r) => Poll::Ready(Err(CallError::Rejected(r))),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use ha_core::CircuitState;
    use tokio::sync::Notify;
    use tokio::time::advance;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::breaker::BreakerConfig;

    fn breaker() -> CircuitBreaker<fn(&&'static str) -> bool> {
        fn counts(e: &&'static str) -> bool {
            *e != "bad request"
        }
        CircuitBreaker::builder("svc")
            .config(BreakerConfig {
                failure_threshold: Some(2),
                failure_rate_threshold: None,
                wait_duration: Duration::from_secs(5),
                success_threshold: 1,
                ..BreakerConfig::default()
            })
            .record_error(counts as fn(&&'static str) -> bool)
            .build()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_without_calling_the_inner_service_and_recovers() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let inner = service_fn(move |req: &'static str| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match req {
                    "ok" => Ok("done"),
                    other => Err(other),
                }
            }
        });
        let b = breaker();
        let svc = CircuitBreakerLayer::new(b.clone()).layer(inner);

        for _ in 0..3 {
            let r = svc.clone().oneshot("bad request").await;
            assert_eq!(r, Err(CallError::Inner("bad request")));
        }
        assert_eq!(
            b.state(),
            CircuitState::Closed,
            "not a failure by the predicate"
        );
        svc.clone().oneshot("down").await.unwrap_err();
        svc.clone().oneshot("down").await.unwrap_err();
        assert_eq!(b.state(), CircuitState::Open);

        let before = calls.load(Ordering::SeqCst);
        let err = svc.clone().oneshot("ok").await.unwrap_err();
        assert!(err.is_rejected());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before,
            "the inner service was not called"
        );

        advance(Duration::from_secs(5)).await;
        assert_eq!(svc.clone().oneshot("ok").await, Ok("done"));
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_response_frees_the_trial_slot() {
        let gate = Arc::new(Notify::new());
        let waiting = Arc::clone(&gate);
        let inner = service_fn(move |req: &'static str| {
            let gate = Arc::clone(&waiting);
            async move {
                if req == "hang" {
                    gate.notified().await;
                }
                if req == "down" { Err(req) } else { Ok(req) }
            }
        });
        let b = breaker();
        let mut svc = CircuitBreakerLayer::new(b.clone()).layer(inner);
        svc.ready().await.unwrap().call("down").await.unwrap_err();
        svc.ready().await.unwrap().call("down").await.unwrap_err();
        advance(Duration::from_secs(5)).await;

        // poll_ready takes no slot: being ready twice admits nothing.
        poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        assert_eq!(b.state(), CircuitState::Open);

        let mut hanging = Box::pin(svc.call("hang"));
        assert!(
            poll_fn(|cx| Poll::Ready(hanging.as_mut().poll(cx).is_pending())).await,
            "the trial runs"
        );
        assert_eq!(b.snapshot().trials_in_flight, 1);
        let r = svc.ready().await.unwrap().call("ok").await;
        assert!(r.unwrap_err().is_rejected(), "the only slot is taken");
        drop(hanging);
        assert_eq!(b.snapshot().trials_in_flight, 0);
        assert_eq!(svc.ready().await.unwrap().call("ok").await, Ok("ok"));
        assert_eq!(b.state(), CircuitState::Closed);
    }
}
