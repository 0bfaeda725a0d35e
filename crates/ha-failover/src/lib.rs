//! Circuit breakers, and automated failover that only the leader runs.
//!
//! A breaker in front of a dependency, and a failover manager that switches the application
//! to the standby when the primary keeps failing:
//!
//! ```
//! use std::sync::Arc;
//! use ha_core::{
//!     AlwaysLeader, CircuitState, Component, ComponentContext, FencingToken, HaEvent, NodeId,
//! };
//! use ha_failover::{
//!     BreakerConfig, CircuitBreaker, ComponentConfig, FailoverManager, Outcome, Router,
//!     RouterSwitch,
//! };
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The node's one context: who runs, where events go, who leads, when to stop.
//! let ctx = ComponentContext::standalone("node-a")
//!     .with_leadership(Arc::new(AlwaysLeader::new(FencingToken(1)))); // or the node's elector
//! let bus = ctx.bus.clone();
//! let mut events = bus.subscribe();
//!
//! // Application code reads the router on every request.
//! let router = Router::new("10.0.0.1:5432", "10.0.0.2:5432");
//! let manager = FailoverManager::builder()
//!     .component("postgres", RouterSwitch::new(router.clone()), ComponentConfig::default())
//!     .build()?;
//! manager.start(ctx).await?;
//!
//! // A breaker stops calling the primary after 2 failures in a row; each failure is also
//! // reported to the manager, which fails over after 3.
//! let breaker = CircuitBreaker::builder("postgres")
//!     .config(BreakerConfig { failure_threshold: Some(2), ..BreakerConfig::default() })
//!     .bus(bus)
//!     .node(NodeId::new("node-a"))
//!     .build()?;
//! for _ in 0..3 {
//!     match breaker.try_acquire() {
//!         Ok(permit) => permit.record_failure(), // the query failed
//!         Err(rejected) => assert_eq!(rejected.state, CircuitState::Open),
//!     }
//!     manager.report_failure("postgres")?;
//! }
//! assert_eq!(breaker.state(), CircuitState::Open);
//!
//! // The manager's events follow the breaker's on the bus.
//! loop {
//!     match events.recv().await.unwrap() {
//!         HaEvent::CircuitStateChanged { to, .. } => assert_eq!(to, CircuitState::Open),
//!         HaEvent::FailoverStarted { token, .. } => assert_eq!(token, Some(FencingToken(1))),
//!         HaEvent::FailoverCompleted { component, .. } => {
//!             assert_eq!(component, "postgres");
//!             break;
//!         }
//!         other => panic!("unexpected {other:?}"),
//!     }
//! }
//! assert_eq!(*router.current(), "10.0.0.2:5432");
//! assert_eq!(manager.history()[0].outcome, Outcome::Completed);
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
//!   allocation-free closed path (admission, and recording a success); events, logs and
//!   metrics on every transition; and a [`CircuitBreakerLayer`] for `tower` services.
//! - [`manager`] — [`FailoverManager`]: built unstarted, an [`ha_core::Component`] started
//!   with the node's `ComponentContext` (node, bus, leadership gate, shutdown); components
//!   registered with a [`FailoverAction`] and a
//!   [`ComponentConfig`]; consecutive failure and recovery thresholds fed by
//!   `report_failure`/`report_success` or by `HealthChanged` events; failovers only while the
//!   [`ha_core::LeadershipGate`] says this node leads, with its fencing token; dependencies
//!   first (ha-health's dependency graph); at most `max_concurrent_failovers` at once, the
//!   rest in a bounded queue; a timeout per step that cancels the action; rollback on failure,
//!   timeout or failed verification; a cooldown against flapping; events, tracing spans and
//!   metrics; and a bounded audit history of what really happened.
//! - [`action`] — the [`FailoverAction`] trait and built-in actions that do real work:
//!   [`CommandAction`] (a program, no shell), [`HttpAction`] (a 2xx answer),
//!   [`RouterSwitch`] over a lock-free [`Router`] that application code reads, and
//!   [`StepDownAction`] (a forced re-election through [`ha_core::StepDown`], which
//!   ha-election's elector implements). What an action cannot do is
//!   [`ActionError::Unsupported`], never a faked success.
//! - [`Error`] — the crate's one error type.
//!
//! # Features
//!
//! The built-in actions that reach outside the process are behind features, both on by
//! default:
//! - `http`: [`HttpAction`] (reqwest);
//! - `command`: [`CommandAction`] (tokio's process support, nix process groups on Unix).
//!
//! The crate depends on ha-health without its default features (only its dependency graph),
//! so with `--no-default-features` it is the circuit breaker, the failover manager,
//! [`RouterSwitch`] and [`StepDownAction`], and compiles no client.
//!
//! # Benchmark
//!
//! `cargo bench -p ha-failover --bench breaker` prints the cost of a closed-state call and of
//! an open-state rejection, single-threaded and with two threads, beside failsafe-rs's breaker
//! in the same run.

pub mod action;
pub mod breaker;
pub mod error;
pub mod manager;

#[cfg(feature = "command")]
pub use action::CommandAction;
pub use action::{
    ActionContext, ActionError, FailoverAction, Router, RouterSwitch, StepDownAction, Target,
};
#[cfg(feature = "http")]
pub use action::{HttpAction, HttpMethod};
pub use breaker::{
    BreakerConfig, BreakerSnapshot, CallError, CircuitBreaker, CircuitBreakerLayer, OwnedPermit,
    Permit, Rejected, SlidingWindow,
};
pub use error::Error;
pub use manager::{
    ComponentConfig, ComponentState, FailoverConfig, FailoverManager, FailoverManagerBuilder,
    FailoverRecord, FailureKind, HealthEvents, Outcome, Phase, SkipReason, Step, StepFailure,
    Trigger, TriggerSource,
};
