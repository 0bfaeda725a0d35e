//! The crate's one error type.

use ha_core::ConfigError;

use crate::breaker::Rejected;

/// Everything that can go wrong in `ha-failover` (outside a protected call's own errors,
/// which [`CallError`](crate::breaker::CallError) carries, and a failover action's, which
/// [`ActionError`](crate::ActionError) carries into the history).
///
/// New variants may be added in any release, so matches need a wildcard arm.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config given to a builder broke one of its rules.
    #[error("invalid {what} config: {source}")]
    Config {
        /// Which config, e.g. `circuit breaker`.
        what: &'static str,
        /// The field and the rule it broke.
        #[source]
        source: ConfigError,
    },
    /// A circuit breaker refused a call.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// A component's config broke one of its rules.
    #[error("invalid config of component `{component}`: {source}")]
    ComponentConfig {
        /// The component.
        component: String,
        /// The field and the rule it broke.
        #[source]
        source: ConfigError,
    },
    /// Two components were registered under one name.
    #[error("two components are named `{component}`; names must be unique")]
    DuplicateComponent {
        /// The repeated name.
        component: String,
    },
    /// A component depends on a name no component has.
    #[error("component `{component}` depends on `{dependency}`, which is not registered")]
    UnknownDependency {
        /// The depending component.
        component: String,
        /// The missing dependency.
        dependency: String,
    },
    /// Components depend on each other in a cycle, so no order can fail dependencies over
    /// first.
    #[error("components depend on each other in a cycle: {}", ha_health::graph::describe_cycle(.cycle))]
    DependencyCycle {
        /// The components on the cycle, each depending on the next and the last on the first.
        cycle: Vec<String>,
    },
    /// A component's step timeout is shorter than its action says it needs
    /// ([`FailoverAction::required_timeout`](crate::FailoverAction::required_timeout)).
    #[error(
        "component `{component}`: timeout {} is shorter than the {} its action needs",
        humantime::format_duration(*.timeout),
        humantime::format_duration(*.required)
    )]
    TimeoutTooShort {
        /// The component.
        component: String,
        /// Its configured `timeout`.
        timeout: std::time::Duration,
        /// What its action needs.
        required: std::time::Duration,
    },
    /// A report named a component that is not registered.
    #[error("no component `{component}` is registered")]
    UnknownComponent {
        /// The name given.
        component: String,
    },
    /// A failover was requested while `capacity` others were waiting; it was not queued (and
    /// was recorded as skipped). It waits outside the queue and asks again while the
    /// component stays down.
    #[error("failover of `{component}` refused: {capacity} failovers are already waiting")]
    QueueFull {
        /// The component.
        component: String,
        /// The queue's capacity (`max_queued_failovers`).
        capacity: usize,
    },
    /// The manager was stopped.
    #[error("the failover manager was shut down")]
    Stopped,
    /// The manager was built but has not been started.
    #[error("the failover manager has not been started")]
    NotStarted,
}

impl Error {
    /// Whether trying the same thing again might succeed: a refused call may pass later, a
    /// bad config never fixes itself.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Config { .. }
            | Error::ComponentConfig { .. }
            | Error::DuplicateComponent { .. }
            | Error::UnknownDependency { .. }
            | Error::DependencyCycle { .. }
            | Error::TimeoutTooShort { .. }
            | Error::UnknownComponent { .. }
            | Error::Stopped => false,
            Error::Rejected(r) => r.is_retryable(),
            // Slots free up as running failovers end; the node starts what it built.
            Error::QueueFull { .. } | Error::NotStarted => true,
        }
    }

    /// The dependency graph's complaint, in terms of components. The graph is ha-health's,
    /// shared with the health checks; its errors speak of checks.
    pub(crate) fn from_graph(error: ha_health::Error) -> Self {
        match error {
            ha_health::Error::DuplicateCheck { name } => {
                Error::DuplicateComponent { component: name }
            }
            ha_health::Error::UnknownDependency { check, dependency } => Error::UnknownDependency {
                component: check,
                dependency,
            },
            ha_health::Error::DependencyCycle { cycle } => Error::DependencyCycle { cycle },
            // The graph reports nothing else; keep the text if that ever changes.
            other => Error::Config {
                what: "failover manager",
                source: ConfigError::new("depends_on", other.to_string()),
            },
        }
    }
}
