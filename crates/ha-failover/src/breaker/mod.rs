//! `CircuitBreaker`: stops calling a dependency that keeps failing, and probes it carefully
//! until it recovers.
//!
//! ```
//! use std::time::Duration;
//! use ha_core::CircuitState;
//! use ha_failover::breaker::{BreakerConfig, CallError, CircuitBreaker};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), ha_failover::Error> {
//! let breaker = CircuitBreaker::builder("payments")
//!     .config(BreakerConfig {
//!         wait_duration: Duration::from_secs(10),
//!         ..BreakerConfig::default() // 3 failures in a row open it, 2 good trials close it
//!     })
//!     .build()?;
//!
//! for _ in 0..3 {
//!     let r = breaker.call(async { Err::<(), _>("connection refused") }).await;
//!     assert!(matches!(r, Err(CallError::Inner("connection refused"))));
//! }
//! assert_eq!(breaker.state(), CircuitState::Open);
//!
//! // Open: the call is not even started.
//! let Err(CallError::Rejected(rejected)) = breaker.call(async { Ok::<_, &str>(1) }).await else {
//!     panic!("an open breaker lets nothing through");
//! };
//! assert_eq!(rejected.retry_after, Some(Duration::from_secs(10)));
//!
//! // After the wait, trial calls pass one at a time; two successes close the breaker.
//! tokio::time::advance(Duration::from_secs(10)).await;
//! assert!(matches!(breaker.call(async { Ok::<_, &str>(1) }).await, Ok(1)));
//! assert_eq!(breaker.state(), CircuitState::HalfOpen);
//! assert!(matches!(breaker.call(async { Ok::<_, &str>(2) }).await, Ok(2)));
//! assert_eq!(breaker.state(), CircuitState::Closed);
//! # Ok(())
//! # }
//! ```
//!
//! # The states
//!
//! - **Closed**: every call passes; completed calls are recorded, and the breaker opens when
//!   a rule of [`BreakerConfig`] holds (consecutive failures, failure rate, slow-call rate
//!   over a count- or time-based [`SlidingWindow`]).
//! - **Open**: every call is [`Rejected`] with the time left, for `wait_duration` (grown by
//!   `wait_backoff` when it opens again without having closed).
//! - **Half-open**: the first call after the wait moves the breaker here. At most
//!   `permitted_calls_in_half_open` trial calls are in flight at once; `success_threshold`
//!   successful trials close it, one failed trial opens it again. The move is lazy (no timer
//!   task runs), so [`CircuitBreaker::state`] says `Open` until that first call.
//!
//! # Exact half-open accounting
//!
//! A trial slot is reserved atomically when the call is admitted, before the call starts, and
//! given back when the call completes — or when its [`Permit`] is dropped unrecorded, which is
//! what happens when a [`call`](CircuitBreaker::call) future is cancelled. So concurrent
//! callers never run more trials than permitted, and a cancelled trial cannot leave the
//! breaker stuck in half-open. A trial still running when its half-open period ends (another
//! trial failed, or enough succeeded) keeps its slot until it ends — the limit holds across
//! periods too — but its outcome changes nothing. Calls admitted while closed are not trials
//! and do not count against the limit, even if they are still running in half-open (their
//! outcomes, too, change nothing once the closed period they belong to has ended).
//! Cancelling is the only way out of a call that hangs: wrap calls in a timeout.
//!
//! # Cost
//!
//! Admission in the closed state is one atomic load: no lock, no allocation (and no clock
//! read unless the slow-call rule is on). Recording a success in the closed state is one
//! compare-and-swap on a per-thread slot, also without lock, allocation or clock read, once
//! the window holds `minimum_calls` calls and no failure streak runs — with a count-based
//! window and the slow-call rule off (the defaults). Failures, trials, timed calls and calls
//! of a time-based window take a short lock; see the `core` module source for why. The
//! `breaker` benchmark measures both paths beside failsafe-rs.
//!
//! # What is reported
//!
//! Every transition publishes [`HaEvent::CircuitStateChanged`](ha_core::HaEvent) on the
//! [`EventBus`] (when one is set), logs a `tracing` event (`warn` when opening, `info`
//! otherwise), sets the `ha_circuit_state` gauge and counts `ha_circuit_transitions_total`.
//! Every call is counted in `ha_circuit_calls_total` by outcome: `success`, `failure`,
//! `slow` (succeeded, slowly), `rejected`, `cancelled`. The metric handles are registered
//! when the breaker is built, with the recorder installed then: install the recorder first.

mod call;
pub mod config;
mod core;
mod layer;
mod window;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ha_core::config::{ConfigError, Validate};
use ha_core::{CircuitState, EventBus, NodeId};

pub use self::call::{AllErrors, CallError, FailurePredicate};
pub use self::config::{BreakerConfig, SlidingWindow, WaitBackoff};
pub use self::layer::{CircuitBreakerLayer, CircuitBreakerService, ResponseFuture};

use self::core::{Core, Ticket};
use crate::Error;

/// A circuit breaker. Cheap to clone: clones share one state.
///
/// `P` decides which errors of [`call`](Self::call) count as failures ([`AllErrors`] unless
/// the builder was given [`record_error`](CircuitBreakerBuilder::record_error)).
#[derive(Clone)]
pub struct CircuitBreaker<P = AllErrors> {
    core: Arc<Core>,
    predicate: P,
}

impl CircuitBreaker {
    /// Starts building a breaker called `name` (used in events, logs and metric labels).
    pub fn builder(name: impl Into<String>) -> CircuitBreakerBuilder {
        CircuitBreakerBuilder {
            name: name.into(),
            config: BreakerConfig::default(),
            bus: None,
            node: None,
            predicate: AllErrors,
        }
    }
}

impl<P> CircuitBreaker<P> {
    /// The breaker's name.
    pub fn name(&self) -> &str {
        self.core.name()
    }

    /// The config in use.
    pub fn config(&self) -> &BreakerConfig {
        self.core.config()
    }

    /// The current state. `Open` stays `Open` past the wait until a call arrives.
    pub fn state(&self) -> CircuitState {
        self.core.state()
    }

    /// The error predicate.
    pub fn predicate(&self) -> &P {
        &self.predicate
    }

    /// Asks to make one call, for callers that cannot hand over a future.
    ///
    /// Returns a [`Permit`] to report the call's outcome on, or [`Rejected`] when the breaker
    /// is open or every half-open trial slot is taken. Dropping the permit without recording
    /// counts as a cancelled call (it frees the trial slot and records nothing).
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_>, Rejected> {
        let ticket = self.core.acquire()?;
        Ok(Permit {
            core: &self.core,
            ticket,
            done: false,
        })
    }

    /// Like [`try_acquire`](Self::try_acquire), with a permit that owns a handle to the
    /// breaker (for `'static` futures and tasks).
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, Rejected> {
        let ticket = self.core.acquire()?;
        Ok(OwnedPermit {
            core: Arc::clone(&self.core),
            ticket,
            done: false,
        })
    }

    /// Counters and the window's contents, read at once under the record lock.
    pub fn snapshot(&self) -> BreakerSnapshot {
        self.core.snapshot()
    }
}

impl<P> fmt::Debug for CircuitBreaker<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.core.fmt(f)
    }
}

/// Builds a [`CircuitBreaker`]; [`build`](Self::build) checks the config.
#[must_use]
pub struct CircuitBreakerBuilder<P = AllErrors> {
    name: String,
    config: BreakerConfig,
    bus: Option<EventBus>,
    node: Option<NodeId>,
    predicate: P,
}

impl<P> CircuitBreakerBuilder<P> {
    /// The rules (default [`BreakerConfig::default`]).
    pub fn config(mut self, config: BreakerConfig) -> Self {
        self.config = config;
        self
    }

    /// Publishes every state change on `bus` (requires [`node`](Self::node)).
    pub fn bus(mut self, bus: EventBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// The node named in the events.
    pub fn node(mut self, node: NodeId) -> Self {
        self.node = Some(node);
        self
    }

    /// Which errors of [`CircuitBreaker::call`] count as failures: those for which
    /// `predicate` returns `true`. The others count as successes (the dependency answered,
    /// e.g. "not found"), as resilience4j's `recordException` does. Default: every error.
    ///
    /// ```
    /// # use ha_failover::breaker::CircuitBreaker;
    /// let breaker = CircuitBreaker::builder("files")
    ///     .record_error(|e: &std::io::Error| e.kind() != std::io::ErrorKind::NotFound)
    ///     .build()
    ///     .unwrap();
    /// # drop(breaker);
    /// ```
    pub fn record_error<F>(self, predicate: F) -> CircuitBreakerBuilder<F> {
        CircuitBreakerBuilder {
            name: self.name,
            config: self.config,
            bus: self.bus,
            node: self.node,
            predicate,
        }
    }

    /// The breaker, closed; fails if the name is empty, the config breaks a rule, or a bus
    /// was set without a node.
    pub fn build(self) -> Result<CircuitBreaker<P>, Error> {
        let invalid = |source: ConfigError| Error::Config {
            what: "circuit breaker",
            source,
        };
        ha_core::config::non_empty("name", &self.name).map_err(invalid)?;
        self.config.validate().map_err(invalid)?;
        let node = match (self.node, &self.bus) {
            (Some(node), _) => node,
            (None, None) => NodeId::new("local"),
            (None, Some(_)) => {
                return Err(invalid(ConfigError::new(
                    "node",
                    "must be set when a bus is set (events name their node)",
                )));
            }
        };
        let core = Core::new(Arc::from(self.name), node, self.bus, self.config);
        Ok(CircuitBreaker {
            core: Arc::new(core),
            predicate: self.predicate,
        })
    }
}

impl<P> fmt::Debug for CircuitBreakerBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Leave to make one call through a breaker, borrowed from it; see
/// [`CircuitBreaker::try_acquire`].
///
/// Report the outcome with [`record_success`](Self::record_success) or
/// [`record_failure`](Self::record_failure). Dropped unrecorded, the call counts as
/// cancelled: it frees its trial slot, if it had one, and records nothing.
#[must_use = "dropping a permit unrecorded counts the call as cancelled"]
pub struct Permit<'a> {
    core: &'a Core,
    ticket: Ticket,
    done: bool,
}

impl Permit<'_> {
    /// The call succeeded (with the slow-call rule on, it may still count as slow).
    #[inline]
    pub fn record_success(mut self) {
        self.done = true;
        self.core.succeed(&self.ticket);
    }

    /// The call failed.
    pub fn record_failure(mut self) {
        self.done = true;
        self.core.finish(&self.ticket, true);
    }

    /// Whether this is a half-open trial call.
    pub fn is_trial(&self) -> bool {
        self.ticket.is_trial()
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.core.cancel(&self.ticket);
        }
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("circuit", self.core.name())
            .field("trial", &self.ticket.is_trial())
            .finish_non_exhaustive()
    }
}

/// A [`Permit`] that holds its own handle to the breaker; see
/// [`CircuitBreaker::try_acquire_owned`].
#[must_use = "dropping a permit unrecorded counts the call as cancelled"]
pub struct OwnedPermit {
    core: Arc<Core>,
    ticket: Ticket,
    done: bool,
}

impl OwnedPermit {
    /// The call succeeded (with the slow-call rule on, it may still count as slow).
    #[inline]
    pub fn record_success(mut self) {
        self.done = true;
        self.core.succeed(&self.ticket);
    }

    /// The call failed.
    pub fn record_failure(mut self) {
        self.done = true;
        self.core.finish(&self.ticket, true);
    }

    /// Whether this is a half-open trial call.
    pub fn is_trial(&self) -> bool {
        self.ticket.is_trial()
    }
}

impl Drop for OwnedPermit {
    fn drop(&mut self) {
        if !self.done {
            self.core.cancel(&self.ticket);
        }
    }
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit")
            .field("circuit", self.core.name())
            .field("trial", &self.ticket.is_trial())
            .finish_non_exhaustive()
    }
}

/// A call the breaker did not let through. Always worth retrying later.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Rejected {
    /// The breaker's name.
    pub circuit: Arc<str>,
    /// `Open`, or `HalfOpen` with every trial slot taken.
    pub state: CircuitState,
    /// When open: the time left until a trial call may pass. `None` in half-open (a slot
    /// frees when a running trial ends).
    pub retry_after: Option<Duration>,
}

impl Rejected {
    /// Always `true`: the breaker will let calls through again.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.state, self.retry_after) {
            (CircuitState::HalfOpen, _) => write!(
                f,
                "circuit `{}` is half-open and every trial slot is taken",
                self.circuit
            ),
            (state, Some(after)) => write!(
                f,
                "circuit `{}` is {state}; retry in {}",
                self.circuit,
                humantime::format_duration(after)
            ),
            (state, None) => write!(f, "circuit `{}` is {state}", self.circuit),
        }
    }
}

impl std::error::Error for Rejected {}

/// A consistent view of a breaker's counters, from [`CircuitBreaker::snapshot`].
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct BreakerSnapshot {
    /// The state.
    pub state: CircuitState,
    /// Calls in the sliding window (emptied when the breaker closes).
    pub window_calls: u64,
    /// Of which failed.
    pub window_failures: u64,
    /// Of which were slow (failed or not).
    pub window_slow_calls: u64,
    /// Failed calls as a percentage of the window; `None` below `minimum_calls`.
    pub failure_rate: Option<f64>,
    /// Slow calls as a percentage of the window; `None` below `minimum_calls`.
    pub slow_call_rate: Option<f64>,
    /// Failures in a row, in the closed state.
    pub consecutive_failures: u32,
    /// Trial calls admitted and not yet finished or cancelled; never more than
    /// `permitted_calls_in_half_open`. May be non-zero outside half-open: a trial keeps its
    /// slot until it ends, even after its half-open period ended.
    pub trials_in_flight: u32,
    /// Successful trials in the current half-open period.
    pub half_open_successes: u32,
    /// Opens since the breaker last closed (drives the wait backoff).
    pub consecutive_opens: u32,
    /// When open: time left until a trial call may pass (zero once the wait is over).
    pub retry_after: Option<Duration>,
    /// Since the breaker was built: calls that succeeded in time.
    pub successful_calls: u64,
    /// Calls that failed.
    pub failed_calls: u64,
    /// Calls that succeeded, slowly.
    pub slow_calls: u64,
    /// Calls rejected.
    pub rejected_calls: u64,
    /// Admitted calls dropped before they completed.
    pub cancelled_calls: u64,
}
