//! The crate's one error type.

use ha_core::ConfigError;

/// Everything that can go wrong in `ha-health`: bad config and bad check registrations.
///
/// New variants may be added in any release, so matches need a wildcard arm.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config given to a constructor broke one of its rules.
    #[error("invalid {what} config: {source}")]
    Config {
        /// Which config, e.g. `phi accrual` or `baseline`.
        what: &'static str,
        /// The field and the rule it broke.
        #[source]
        source: ConfigError,
    },
    /// A check's config broke one of its rules.
    #[error("invalid config of check `{check}`: {source}")]
    CheckConfig {
        /// The check's name.
        check: String,
        /// The field and the rule it broke.
        #[source]
        source: ConfigError,
    },
    /// Two checks were registered under one name.
    #[error("two checks are named `{name}`; names must be unique")]
    DuplicateCheck {
        /// The repeated name.
        name: String,
    },
    /// A check depends on a name no check has.
    #[error("check `{check}` depends on `{dependency}`, which is not registered")]
    UnknownDependency {
        /// The depending check.
        check: String,
        /// The missing dependency.
        dependency: String,
    },
    /// Checks depend on each other in a cycle, so no order can run dependencies first.
    #[error("checks depend on each other in a cycle: {}", crate::graph::describe_cycle(.cycle))]
    DependencyCycle {
        /// The checks on the cycle, each depending on the next and the last on the first.
        cycle: Vec<String>,
    },
    /// A check's constructor could not reach what the check is to watch (e.g.
    /// `RedisCheck::connect` got no first connection).
    #[error("check `{check}` could not connect to {target}: {detail}")]
    Connect {
        /// The check's name.
        check: String,
        /// What it tried to reach, without credentials, e.g. `127.0.0.1:6379`.
        target: String,
        /// The client's error.
        detail: String,
    },
}

impl Error {
    /// Whether trying the same thing again might succeed. A bad config never fixes itself; a
    /// server that did not answer may answer later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Config { .. }
            | Error::CheckConfig { .. }
            | Error::DuplicateCheck { .. }
            | Error::UnknownDependency { .. }
            | Error::DependencyCycle { .. } => false,
            Error::Connect { .. } => true,
        }
    }

    /// Wraps a config error with the name of the config it came from.
    pub(crate) fn config(what: &'static str, source: ConfigError) -> Self {
        Error::Config { what, source }
    }
}
