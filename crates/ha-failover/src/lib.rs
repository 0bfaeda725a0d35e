//! Circuit breakers and (to come) automated failover.
//!
//! ```
//! use ha_core::{CircuitState, EventBus, HaEvent, NodeId};
//! use ha_failover::{BreakerConfig, CircuitBreaker};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), ha_failover::Error> {
//! let bus = EventBus::default();
//! let mut events = bus.subscribe();
//! let breaker = CircuitBreaker::builder("postgres")
//!     .config(BreakerConfig { failure_threshold: Some(2), ..BreakerConfig::default() })
//!     .bus(bus)
//!     .node(NodeId::new("node-a"))
//!     .build()?;
//!
//! // Callers that cannot hand over a future take a permit and report on it.
//! for _ in 0..2 {
//!     let permit = breaker.try_acquire()?;
//!     permit.record_failure();
//! }
//! assert_eq!(breaker.state(), CircuitState::Open);
//! assert!(breaker.try_acquire().is_err());
//!
//! let HaEvent::CircuitStateChanged { circuit, from, to, .. } = events.recv().await.unwrap() else {
//!     unreachable!("the only event published");
//! };
//! assert_eq!((circuit.as_str(), from, to), ("postgres", CircuitState::Closed, CircuitState::Open));
//! # Ok(())
//! # }
//! ```
//!
//! # What is here
//!
//! - [`breaker`] — [`CircuitBreaker`]: closed / open / half-open, opening on consecutive
//!   failures, a failure rate or a slow-call rate over a count- or time-based sliding window
//!   (resilience4j's semantics), a wait in open with optional exponential backoff, and exact
//!   half-open accounting under concurrency (a trial slot is reserved atomically and freed
//!   when the call completes or is cancelled). `call(future)`, or `try_acquire()` and a
//!   [`Permit`] to report on; a predicate choosing which errors count; a lock-free,
//!   allocation-free closed path; events, logs and metrics on every transition; and a
//!   [`CircuitBreakerLayer`] for `tower` services.
//! - [`Error`] — the crate's one error type.
//!
//! # Not built yet (issue 7)
//!
//! The `FailoverManager`: components registered with a `FailoverAction` (failover, rollback,
//! verify), failure and recovery thresholds fed by health events, dependency-ordered
//! failovers, a concurrency limit with a bounded waiting queue, per-action timeouts that
//! cancel the action, cooldown, rollback, a bounded audit history, built-in actions (command,
//! HTTP, router swap, forced re-election), and acting only while a
//! [`ha_core::LeadershipGate`] says this node leads.

pub mod breaker;
pub mod error;

pub use breaker::{
    BreakerConfig, BreakerSnapshot, CallError, CircuitBreaker, CircuitBreakerLayer, OwnedPermit,
    Permit, Rejected, SlidingWindow,
};
pub use error::Error;
