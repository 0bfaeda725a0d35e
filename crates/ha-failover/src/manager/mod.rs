//! [`FailoverManager`]: decides when a component is failed over, runs its
//! [`FailoverAction`] — only on the leader, in dependency order, a few at a time, with a
//! timeout that cancels it, a rollback when it fails and a cooldown against flapping — and
//! keeps an audit history of what really happened.
//!
//! ```
//! use std::sync::Arc;
//! use ha_core::{AlwaysLeader, EventBus, FencingToken, HaEvent};
//! use ha_failover::{ComponentConfig, FailoverManager, Outcome, Router, RouterSwitch};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), ha_failover::Error> {
//! let router = Router::new("10.0.0.1:6379", "10.0.0.2:6379");
//! let bus = EventBus::default();
//! let mut events = bus.subscribe();
//! let manager = FailoverManager::builder()
//!     .gate(Arc::new(AlwaysLeader::new(FencingToken(1)))) // single node: always leads
//!     .bus(bus)
//!     .component("redis", RouterSwitch::new(router.clone()), ComponentConfig::default())
//!     .start()?;
//!
//! for _ in 0..3 {
//!     manager.report_failure("redis")?; // the third in a row asks for a failover
//! }
//! while !matches!(events.recv().await, Ok(HaEvent::FailoverCompleted { .. })) {}
//! assert_eq!(*router.current(), "10.0.0.2:6379");
//! assert_eq!(manager.history()[0].outcome, Outcome::Completed);
//! manager.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # From failures to a failover
//!
//! Failures of a component come from [`FailoverManager::report_failure`] /
//! [`report_success`](FailoverManager::report_success), or from `HaEvent::HealthChanged`
//! events on a bus given to [`FailoverManagerBuilder::health_bus`] (`Unhealthy` is a failure,
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
//! full is refused — recorded, published as `FailoverSkipped`, and returned as
//! [`Error::QueueFull`] — never dropped silently. Every queued request runs, even if its
//! component recovers meanwhile (the recovery may be its dependency's failover working).
//!
//! A request that comes within a component's `cooldown` (default 5 min) after its last
//! failover ended — or while one runs — is recorded as skipped and waits for the cooldown's
//! end; it is dropped if the component recovers first. So a flapping component fails over at
//! most once per cooldown, and one that stays down is still failed over once it has passed.
//!
//! # Only the leader acts
//!
//! Before starting each failover the manager asks the [`LeadershipGate`]. If this node does
//! not lead, nothing starts: the request is recorded as skipped (once), and waits, asking the
//! gate again every `leadership_retry_interval` (default 1 s) while the component stays
//! failed, so a node that becomes leader takes over what is still to do. The failover runs
//! with the fencing token of the leadership that started it, in its
//! [`ActionContext`](crate::ActionContext).
//!
//! Leadership lost while an action runs does not cancel it (cancelling midway can leave more
//! damage than finishing), but nothing new starts, and the action can see it:
//! [`ActionContext::ensure_leader`](crate::ActionContext::ensure_leader) fails once the gate
//! no longer grants the same token, and downstream systems that fence reject the old token
//! once a new leader has used a newer one. A failed step is rolled back under the same token.
//! The built-in [`RouterSwitch`](crate::RouterSwitch) checks just before it switches;
//! [`CommandAction`](crate::CommandAction) and [`HttpAction`](crate::HttpAction) hand the
//! token to the program or endpoint.
//!
//! # One failover
//!
//! `failover`, then `verify`, each under the component's `timeout` (default 30 s): at the
//! timeout the step's future is dropped, which cancels it. If either fails, times out or
//! panics, `rollback` runs (under the same timeout). Events, in order: `FailoverStarted`;
//! then `FailoverCompleted`, or `FailoverRolledBack` (if the rollback succeeded) and
//! `FailoverFailed` with the reason. A record is in [`FailoverManager::history`] before the
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

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ha_core::config::{ConfigError, Validate};
use ha_core::{EventBus, LeadershipGate, NodeId};
use ha_health::DependencyGraph;
use tokio::task::JoinHandle;
use tokio_util::sync::DropGuard;

pub use self::config::{ComponentConfig, FailoverConfig, HealthEvents};
pub use self::history::{
    FailoverRecord, FailureKind, Outcome, SkipReason, Step, StepFailure, Trigger, TriggerSource,
};

use self::driver::{Entry, Shared};
use crate::Error;
use crate::action::FailoverAction;

/// Runs failovers; see the [module docs](self). Cheap to clone: clones share one manager,
/// which stops when the last clone is dropped (or at [`shutdown`](Self::shutdown)).
#[derive(Clone)]
pub struct FailoverManager {
    shared: Arc<Shared>,
    driver: Arc<Mutex<Option<JoinHandle<()>>>>,
    _stop_on_drop: Arc<DropGuard>,
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
            node: NodeId::new("local"),
            bus: None,
            health: None,
            gate: None,
            components: Vec::new(),
        }
    }

    fn index(&self, component: &str) -> Result<usize, Error> {
        self.shared
            .index
            .get(component)
            .copied()
            .ok_or_else(|| Error::UnknownComponent {
                component: component.to_owned(),
            })
    }

    /// One failed observation of `component` (a failed probe, a refused connection). Fails
    /// if the component is not registered, if this report crossed the threshold and the
    /// queue was full ([`Error::QueueFull`]), or after shutdown.
    pub fn report_failure(&self, component: &str) -> Result<(), Error> {
        let idx = self.index(component)?;
        self.shared
            .observe(idx, true, false, TriggerSource::Report, None)
    }

    /// One successful observation of `component`.
    pub fn report_success(&self, component: &str) -> Result<(), Error> {
        let idx = self.index(component)?;
        self.shared
            .observe(idx, false, false, TriggerSource::Report, None)
    }

    /// The audit history, oldest first: every failover run (with its start, end, outcome,
    /// error and fencing token) and every request skipped, up to `history_capacity` records.
    pub fn history(&self) -> Vec<FailoverRecord> {
        self.shared.history()
    }

    /// What the manager knows about `component`; `None` if it is not registered.
    pub fn component_state(&self, component: &str) -> Option<ComponentState> {
        let idx = self.index(component).ok()?;
        Some(self.shared.component_state(idx))
    }

    /// The registered components, in registration order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.shared.components.iter().map(|e| &*e.name)
    }

    /// Failovers running now.
    pub fn in_flight(&self) -> usize {
        self.shared.counts().0
    }

    /// Failovers waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.shared.counts().1
    }

    /// The config in use.
    pub fn config(&self) -> &FailoverConfig {
        &self.shared.config
    }

    /// The node named in events.
    pub fn node(&self) -> &NodeId {
        &self.shared.node
    }

    /// Stops: no new request is taken, requests that have not started are recorded as
    /// skipped, and running failovers are waited for (each of their steps is bounded by its
    /// timeout). Reports after this fail with [`Error::Stopped`].
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let driver = self
            .driver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(driver) = driver {
            let _ = driver.await;
        }
        self.shared.tasks.wait().await;
    }
}

impl fmt::Debug for FailoverManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverManager")
            .field("node", &self.shared.node)
            .field("components", &self.components().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Builds and starts a [`FailoverManager`].
#[must_use]
pub struct FailoverManagerBuilder {
    config: FailoverConfig,
    node: NodeId,
    bus: Option<EventBus>,
    health: Option<EventBus>,
    gate: Option<Arc<dyn LeadershipGate>>,
    components: Vec<(String, Arc<dyn FailoverAction>, ComponentConfig)>,
}

impl FailoverManagerBuilder {
    /// Manager-wide settings (default [`FailoverConfig::default`]).
    pub fn config(mut self, config: FailoverConfig) -> Self {
        self.config = config;
        self
    }

    /// The node named in events (default `local`).
    pub fn node(mut self, node: NodeId) -> Self {
        self.node = node;
        self
    }

    /// Where failover events go (default: nowhere).
    pub fn bus(mut self, bus: EventBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Where `HealthChanged` events come from (e.g. the bus ha-health's checker publishes
    /// on); a component's events are those whose `component` is its name. May be the same bus
    /// as [`bus`](Self::bus).
    pub fn health_bus(mut self, bus: EventBus) -> Self {
        self.health = Some(bus);
        self
    }

    /// Asked before every failover: required. Pass the node's elector, or
    /// [`ha_core::AlwaysLeader`] for a single node — there is no default, so that a cluster
    /// cannot forget it and fail over from every node at once.
    pub fn gate(mut self, gate: Arc<dyn LeadershipGate>) -> Self {
        self.gate = Some(gate);
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

    /// Validates everything and starts the manager's task; returns at once.
    ///
    /// Fails on an invalid config (naming the component and field), a missing gate, an empty
    /// or repeated name, an unknown dependency or a dependency cycle (naming the components
    /// on it). Must be called inside a Tokio runtime. Install a `metrics` recorder before:
    /// metric handles are registered here.
    pub fn start(self) -> Result<FailoverManager, Error> {
        let invalid = |source: ConfigError| Error::Config {
            what: "failover manager",
            source,
        };
        self.config.validate().map_err(invalid)?;
        let gate = self.gate.ok_or_else(|| {
            invalid(ConfigError::new(
                "gate",
                "must be set: the node's elector, or AlwaysLeader for a single node",
            ))
        })?;
        for (name, _, config) in &self.components {
            ha_core::config::non_empty("component", name).map_err(invalid)?;
            config.validate().map_err(|source| Error::ComponentConfig {
                component: name.clone(),
                source,
            })?;
        }
        let graph = DependencyGraph::new(
            self.components
                .iter()
                .map(|(name, _, config)| (name.as_str(), &config.depends_on)),
        )
        .map_err(Error::from_graph)?;
        let ancestors = (0..graph.len()).map(|i| graph.ancestors(i)).collect();
        let order = graph.order().to_vec();
        let entries: Vec<Entry> = self
            .components
            .into_iter()
            .map(|(name, action, config)| Entry::new(Arc::from(name), action, config))
            .collect();
        let shared = Arc::new(Shared::new(
            self.node,
            self.bus,
            gate,
            self.config,
            entries,
            order,
            ancestors,
        ));
        // Subscribed here, before `start` returns: no event published after it is missed.
        let health = self.health.map(|bus| bus.subscribe());
        let driver = tokio::spawn(Arc::clone(&shared).drive(health));
        let stop_on_drop = shared.shutdown.clone().drop_guard();
        Ok(FailoverManager {
            shared,
            driver: Arc::new(Mutex::new(Some(driver))),
            _stop_on_drop: Arc::new(stop_on_drop),
        })
    }
}

impl fmt::Debug for FailoverManagerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverManagerBuilder")
            .field("config", &self.config)
            .field("node", &self.node)
            .field(
                "components",
                &self.components.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}
