//! [`FailoverManager`]: decides when a component is failed over, runs its
//! [`FailoverAction`] — only on the leader, in dependency order, a few at a time, with a
//! timeout that cancels it, a rollback when it fails and a cooldown against flapping — and
//! keeps an audit history of what really happened.
//!
//! ```
//! use std::sync::Arc;
//! use ha_core::{AlwaysLeader, Component, ComponentContext, FencingToken, HaEvent};
//! use ha_failover::{ComponentConfig, FailoverManager, Outcome, Router, RouterSwitch};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let router = Router::new("10.0.0.1:6379", "10.0.0.2:6379");
//! let manager = FailoverManager::builder()
//!     .component("redis", RouterSwitch::new(router.clone()), ComponentConfig::default())
//!     .build()?; // validated, not started
//! // A single node always leads; a cluster passes its elector instead.
//! let ctx = ComponentContext::standalone("node-a")
//!     .with_leadership(Arc::new(AlwaysLeader::new(FencingToken(1))));
//! let mut events = ctx.bus.subscribe();
//! manager.start(ctx).await?;
//!
//! for _ in 0..3 {
//!     manager.report_failure("redis")?; // the third in a row asks for a failover
//! }
//! while !matches!(events.recv().await, Ok(HaEvent::FailoverCompleted { .. })) {}
//! assert_eq!(*router.current(), "10.0.0.2:6379");
//! assert_eq!(manager.history()[0].outcome, Outcome::Completed);
//! manager.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # From failures to a failover
//!
//! Failures of a component come from [`FailoverManager::report_failure`] /
//! [`report_success`](FailoverManager::report_success), or from `HaEvent::HealthChanged`
//! events on the bus of the [`ComponentContext`] it was started with — where ha-health's
//! checker publishes in the same node; a component's events are those whose `component` is
//! its name (`Unhealthy` is a failure,
//! `Healthy` and `Degraded` are successes, `Unknown` is ignored; see [`HealthEvents`] for how
//! they count). `failure_threshold` failures in a row (default 3) *request* a failover; the
//! component then counts as failed until `recovery_threshold` successes in a row (default 2),
//! and only after that can new failures request another: one outage, one failover.
//!
//! A request waits in the queue for a free slot: at most `max_concurrent_failovers` (default
//! 3) run at once. Queued requests start dependencies first (a component's failover starts
//! only once no failover of a component it depends on, directly or not, is queued or
//! running), then in registration order. The queue holds at most `max_queued_failovers`
//! requests (default 64, and never more than one per component); a request that finds it
//! full is recorded, published as `FailoverSkipped` and returned as [`Error::QueueFull`]
//! (once), then waits outside the queue and asks again every `leadership_retry_interval`
//! while its component stays down — so a request from a health *transition*, after which no
//! further event comes, is not lost. Every queued request runs, even if its component
//! recovers meanwhile (the recovery may be its dependency's failover working).
//!
//! A request that comes within a component's `cooldown` (default 5 min) after its last
//! failover that may have switched it — or while one runs — is recorded as skipped and
//! published as `FailoverSkipped`, and waits for the cooldown's end; it is dropped if the
//! component recovers first. So a flapping component fails over at most once per cooldown,
//! and one that stays down is still failed over once it has passed. A cleanly rolled-back
//! failover switched nothing and starts no cooldown. A dependency waiting for its cooldown
//! (or its retry) holds its dependents back, so a shorter cooldown never reorders them.
//!
//! # Retries and giving up
//!
//! A failover that does not complete is tried again while its component stays down (it has
//! not recovered), after a [`Backoff`](ha_core::backoff::Backoff) sleep (`retry_backoff`:
//! full jitter under a growing ceiling), up to `max_attempts` tries (default 3), each its own
//! attempt with its own record (`try_number`). A try that will be retried publishes no
//! `FailoverFailed`; the last publishes one whose reason starts `gave up after N of N
//! tries`, and its record says `gave_up`. After giving up, one success ends the outage, so
//! the next failures are a new outage, handled afresh.
//!
//! # Only the leader acts
//!
//! Before starting each failover the manager asks the [`LeadershipGate`] of its context
//! (`ComponentContext::leadership`: the node's elector, or `AlwaysLeader` for a single node). If this node does
//! not lead, nothing starts: the request is recorded as skipped (once), and waits, asking the
//! gate again every `leadership_retry_interval` (default 1 s) while the component stays
//! failed, so a node that becomes leader takes over what is still to do — but only what is
//! still to do: a request that waited for leadership starts only while its component's
//! latest report is still a failure. Otherwise (the leader of the time handled the outage,
//! or it ended below the recovery threshold) it is dropped and recorded as
//! [`SkipReason::Stale`], and the next failure streak asks afresh. The failover runs
//! with the fencing token of the leadership that started it, in its
//! [`ActionContext`](crate::ActionContext).
//!
//! The gate is asked again before each step — failover, verify, rollback — under the token the
//! failover started with: a node that lost it skips that step and every later one, and
//! records [`Outcome::StoppedLeading`] naming the skipped step, so a deposed leader never
//! verifies or rolls back over the new leader's work. The request then waits for this node
//! to lead again (a new term), while the component stays down.
//!
//! Leadership lost while an action runs does not cancel it (cancelling midway can leave more
//! damage than finishing), but nothing new starts, and the action can see it:
//! [`ActionContext::ensure_leader`](crate::ActionContext::ensure_leader) fails once the gate
//! no longer grants the same token, and downstream systems that fence reject the old token
//! once a new leader has used a newer one. A failed step is rolled back under the same token,
//! if this node still holds it.
//! The built-in [`RouterSwitch`](crate::RouterSwitch) checks just before it switches;
//! [`CommandAction`](crate::CommandAction) and [`HttpAction`](crate::HttpAction) hand the
//! token to the program or endpoint.
//!
//! # One failover
//!
//! `failover`, then `verify`, each under the component's `timeout` (default 30 s): at the
//! timeout the step's future is dropped, which cancels the local work. If either fails,
//! times out or panics, `rollback` runs (under the same timeout) — unless the action declares
//! it cannot undo ([`FailoverAction::can_roll_back`];
//! recorded as [`Outcome::Irreversible`], as is a rollback that answers `Unsupported`).
//! Dropping a future does not stop an effect already sent elsewhere, so a timed-out failover
//! step is recorded as [`Outcome::EffectUnknown`], never as rolled back, whatever the
//! rollback said. An action states the timeout it needs
//! ([`FailoverAction::required_timeout`]), and
//! `build()` refuses a shorter component `timeout` ([`Error::TimeoutTooShort`]). Events, in
//! order: `FailoverStarted`; then `FailoverCompleted`, or `FailoverRolledBack` (if the
//! rollback succeeded) and — on the last try — `FailoverFailed` with the reason. A record is in [`FailoverManager::history`] before the
//! event that ends its failover is published. Each failover runs in a `failover` tracing span
//! (component, attempt, token, node), and is counted in the `ha_failover*` metrics of
//! [`ha_core::metric`].
//!
//! [`LeadershipGate`]: ha_core::LeadershipGate

pub mod config;
mod driver;
pub mod history;
mod tracker;
mod unwind;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_core::config::{ConfigError, Validate};
use ha_core::sync::lock;
use ha_core::{Component, ComponentContext, ComponentTasks, NodeId, Status};
use ha_health::DependencyGraph;

pub use self::config::{ComponentConfig, FailoverConfig, HealthEvents};
pub use self::history::{
    FailoverRecord, FailureKind, Outcome, SkipReason, Step, StepFailure, Trigger, TriggerSource,
};

use self::driver::Shared;
use crate::Error;
use crate::action::FailoverAction;

/// Runs failovers; see the [module docs](self). Cheap to clone: clones share one manager,
/// which stops when the last clone is dropped (or at [`Component::stop`]).
///
/// Built unstarted by [`FailoverManager::builder`]; a [`Component`] named `failover`:
/// `start` runs it as the context's node, publishing on and taking `HealthChanged` events
/// from the context's bus, asking the context's leadership gate before every failover, until
/// `stop` or the context's shutdown. Before the first start reports are refused
/// ([`Error::NotStarted`]) and queries return the idle, empty view; a restart begins with
/// fresh counters and history.
#[derive(Clone)]
pub struct FailoverManager {
    inner: Arc<Inner>,
}

/// What every clone shares.
struct Inner {
    plan: Plan,
    /// The latest start's state; kept after a stop for the history.
    run: Mutex<Option<Arc<Shared>>>,
    tasks: ComponentTasks,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(shared) = lock(&self.run).as_ref() {
            shared.shutdown.cancel();
        }
    }
}

/// What [`FailoverManagerBuilder::build`] validated: everything but the context.
pub(crate) struct Plan {
    pub(crate) config: FailoverConfig,
    pub(crate) components: Vec<(Arc<str>, Arc<dyn FailoverAction>, ComponentConfig)>,
    pub(crate) index: HashMap<Arc<str>, usize>,
    /// Every component, dependencies first (then registration order).
    pub(crate) order: Vec<usize>,
    /// Every component each one depends on, directly or not.
    pub(crate) ancestors: Vec<Vec<usize>>,
}

/// Where a component is in the failover machinery.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Phase {
    /// Nothing requested.
    Idle,
    /// A failover waits in the queue for a slot (or for its dependencies' failovers).
    Queued,
    /// A failover runs.
    Running,
    /// A request waits for the end of the component's cooldown.
    WaitingForCooldown {
        /// The time left.
        left: Duration,
    },
    /// A request waits for this node to lead.
    WaitingForLeadership,
    /// A try that did not complete waits to be tried again (the component is still down).
    WaitingToRetry {
        /// The time left.
        left: Duration,
    },
    /// A request found the queue full and waits to ask again.
    WaitingForQueue,
}

/// What the manager knows about one component now.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ComponentState {
    /// Failures reported in a row.
    pub consecutive_failures: u32,
    /// Successes reported in a row.
    pub consecutive_successes: u32,
    /// Whether it crossed its failure threshold and has not recovered since.
    pub failed: bool,
    /// Where its failover is.
    pub phase: Phase,
}

impl FailoverManager {
    /// Starts building a manager.
    pub fn builder() -> FailoverManagerBuilder {
        FailoverManagerBuilder {
            config: FailoverConfig::default(),
            components: Vec::new(),
        }
    }

    fn index(&self, component: &str) -> Result<usize, Error> {
        self.inner
            .plan
            .index
            .get(component)
            .copied()
            .ok_or_else(|| Error::UnknownComponent {
                component: component.to_owned(),
            })
    }

    /// The latest start's state; `None` before the first.
    fn shared(&self) -> Option<Arc<Shared>> {
        lock(&self.inner.run).clone()
    }

    fn observe(&self, component: &str, failed: bool) -> Result<(), Error> {
        let idx = self.index(component)?;
        let shared = self.shared().ok_or(Error::NotStarted)?;
        shared.observe(idx, failed, false, TriggerSource::Report, None)
    }

    /// One failed observation of `component` (a failed probe, a refused connection). Fails
    /// if the component is not registered, if this report crossed the threshold and the
    /// queue was full ([`Error::QueueFull`]), before start ([`Error::NotStarted`]) or after
    /// stop ([`Error::Stopped`]).
    pub fn report_failure(&self, component: &str) -> Result<(), Error> {
        self.observe(component, true)
    }

    /// One successful observation of `component`.
    pub fn report_success(&self, component: &str) -> Result<(), Error> {
        self.observe(component, false)
    }

    /// The audit history, oldest first: every failover run (with its start, end, outcome,
    /// error and fencing token) and every request skipped, up to `history_capacity` records.
    /// Empty before start.
    pub fn history(&self) -> Vec<FailoverRecord> {
        self.shared().map(|s| s.history()).unwrap_or_default()
    }

    /// What the manager knows about `component`; `None` if it is not registered.
    pub fn component_state(&self, component: &str) -> Option<ComponentState> {
        let idx = self.index(component).ok()?;
        Some(match self.shared() {
            Some(shared) => shared.component_state(idx),
            None => ComponentState {
                consecutive_failures: 0,
                consecutive_successes: 0,
                failed: false,
                phase: Phase::Idle,
            },
        })
    }

    /// The registered components, in registration order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.inner.plan.components.iter().map(|c| &*c.0)
    }

    /// Failovers running now.
    pub fn in_flight(&self) -> usize {
        self.shared().map_or(0, |s| s.counts().0)
    }

    /// Failovers waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.shared().map_or(0, |s| s.counts().1)
    }

    /// The config in use.
    pub fn config(&self) -> &FailoverConfig {
        &self.inner.plan.config
    }

    /// The node it runs as (the latest start's); `None` before the first start.
    pub fn node(&self) -> Option<NodeId> {
        self.shared().map(|s| s.node().clone())
    }
}

#[ha_core::async_trait]
impl Component for FailoverManager {
    fn name(&self) -> &str {
        "failover"
    }

    /// Starts the manager's task in `ctx`; returns at once, already subscribed to `ctx.bus`
    /// (no `HealthChanged` published after it returns is missed). Registers the metric
    /// handles: install a `metrics` recorder before. Fails if it runs already.
    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        let stop = self.inner.tasks.begin(self.name(), &ctx)?;
        let health = ctx.bus.subscribe();
        let shared = Arc::new(Shared::new(&self.inner.plan, ctx, stop));
        *lock(&self.inner.run) = Some(Arc::clone(&shared));
        self.inner.tasks.spawn(shared.drive(Some(health)));
        Ok(())
    }

    /// Stops: no new request is taken, requests that have not started are recorded as
    /// skipped, and running failovers are waited for (each of their steps is bounded by its
    /// timeout). Reports after this fail with [`Error::Stopped`]. Idempotent.
    async fn stop(&self) -> Result<(), ha_core::Error> {
        self.inner.tasks.stop().await;
        Ok(())
    }

    /// `Healthy` while it runs, `Unknown` otherwise.
    fn status(&self) -> Status {
        let stopping = self.shared().is_none_or(|s| s.shutdown.is_cancelled());
        if self.inner.tasks.is_running() && !stopping {
            Status::Healthy
        } else {
            Status::Unknown
        }
    }
}

impl fmt::Debug for FailoverManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverManager")
            .field("node", &self.node())
            .field("components", &self.components().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Builds an unstarted [`FailoverManager`].
#[must_use]
pub struct FailoverManagerBuilder {
    config: FailoverConfig,
    components: Vec<(String, Arc<dyn FailoverAction>, ComponentConfig)>,
}

impl FailoverManagerBuilder {
    /// Manager-wide settings (default [`FailoverConfig::default`]).
    pub fn config(mut self, config: FailoverConfig) -> Self {
        self.config = config;
        self
    }

    /// Registers `component`, failed over by `action`.
    pub fn component(
        self,
        component: impl Into<String>,
        action: impl FailoverAction,
        config: ComponentConfig,
    ) -> Self {
        self.component_arc(component, Arc::new(action), config)
    }

    /// Registers `component` with an action that is already shared.
    pub fn component_arc(
        mut self,
        component: impl Into<String>,
        action: Arc<dyn FailoverAction>,
        config: ComponentConfig,
    ) -> Self {
        self.components.push((component.into(), action, config));
        self
    }

    /// Validates everything and returns the manager, not started.
    ///
    /// Fails on an invalid config (naming the component and field), an empty or repeated
    /// name, an unknown dependency, a dependency cycle (naming the components on it), or a
    /// component `timeout` shorter than its action's
    /// [`required_timeout`](crate::FailoverAction::required_timeout) (naming both).
    pub fn build(self) -> Result<FailoverManager, Error> {
        let invalid = |source: ConfigError| Error::Config {
            what: "failover manager",
            source,
        };
        self.config.validate().map_err(invalid)?;
        for (name, _, config) in &self.components {
            ha_core::config::non_empty("component", name).map_err(invalid)?;
            config.validate().map_err(|source| Error::ComponentConfig {
                component: name.clone(),
                source,
            })?;
        }
        for (name, action, config) in &self.components {
            if let Some(required) = action.required_timeout()
                && config.timeout < required
            {
                return Err(Error::TimeoutTooShort {
                    component: name.clone(),
                    timeout: config.timeout,
                    required,
                });
            }
        }
        let graph = DependencyGraph::new(
            self.components
                .iter()
                .map(|(name, _, config)| (name.as_str(), &config.depends_on)),
        )
        .map_err(Error::from_graph)?;
        let components: Vec<_> = self
            .components
            .into_iter()
            .map(|(name, action, config)| (Arc::<str>::from(name), action, config))
            .collect();
        let plan = Plan {
            config: self.config,
            index: components
                .iter()
                .enumerate()
                .map(|(i, c)| (Arc::clone(&c.0), i))
                .collect(),
            order: graph.order().to_vec(),
            ancestors: (0..graph.len()).map(|i| graph.ancestors(i)).collect(),
            components,
        };
        Ok(FailoverManager {
            inner: Arc::new(Inner {
                plan,
                run: Mutex::new(None),
                tasks: ComponentTasks::default(),
            }),
        })
    }
}

impl fmt::Debug for FailoverManagerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverManagerBuilder")
            .field("config", &self.config)
            .field(
                "components",
                &self.components.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}
