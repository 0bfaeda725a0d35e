//! The crate's one error type.

use ha_core::ConfigError;

/// Everything that can go wrong in `ha-health`.
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
            Error::Config { .. } => false,
            Error::Connect { .. } => true,
        }
    }

    /// Wraps a config error with the name of the config it came from.
    pub(crate) fn config(what: &'static str, source: ConfigError) -> Self {
        Error::Config { what, source }
    }
}
