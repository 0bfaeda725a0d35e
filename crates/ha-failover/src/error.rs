//! The crate's one error type.

use ha_core::ConfigError;

use crate::breaker::Rejected;

/// Everything that can go wrong in `ha-failover` (outside a protected call's own errors,
/// which [`CallError`](crate::breaker::CallError) carries).
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
}

impl Error {
    /// Whether trying the same thing again might succeed: a refused call may pass later, a
    /// bad config never fixes itself.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Config { .. } => false,
            Error::Rejected(r) => r.is_retryable(),
        }
    }
}
