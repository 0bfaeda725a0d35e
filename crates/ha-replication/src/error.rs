//! The error type of the PostgreSQL and Sentinel parts of the crate.

use std::time::Duration;

use ha_core::ConfigError;

#[cfg(feature = "postgres")]
use crate::pg::promote::Refusal;

/// Everything that can go wrong in replication monitoring and promotion.
///
/// New variants may be added in any release, so matches need a wildcard arm.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config broke one of its rules.
    #[error("invalid {what} config: {source}")]
    Config {
        /// Which config.
        what: &'static str,
        /// The field and the rule it broke.
        #[source]
        source: ConfigError,
    },
    /// A server could not be reached or refused the connection.
    #[error("{member}: cannot connect: {detail}")]
    Connect {
        /// The server's name.
        member: String,
        /// The client's error.
        detail: String,
    },
    /// A query failed.
    #[error("{member}: {what} failed: {detail}")]
    Query {
        /// The server's name.
        member: String,
        /// What was asked, in words.
        what: &'static str,
        /// The server's or client's error.
        detail: String,
    },
    /// A query or wait did not finish in time.
    #[error("{member}: {what} timed out after {after:?}")]
    Timeout {
        /// The server's name.
        member: String,
        /// What was asked, in words.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// A promotion was refused; nothing was promoted.
    #[cfg(feature = "postgres")]
    #[error("promotion refused: {0}")]
    Refused(Refusal),
    /// A Sentinel operation failed on every sentinel, the sentinels hold no quorum view, or
    /// a sentinel refused a failover.
    #[error("sentinel `{master}`: {detail}")]
    Sentinel {
        /// The monitored master's name.
        master: String,
        /// What went wrong, per sentinel tried.
        detail: String,
    },
    /// `SENTINEL FAILOVER` was sent but its outcome is unknown (no answer in time, or the
    /// connection was lost): a failover may be running. Not retryable: asking again, or
    /// another sentinel, could start a second failover; watch for the master switch instead.
    #[error("sentinel `{master}`: failover requested from {sentinel}, outcome unknown: {detail}")]
    FailoverOutcomeUnknown {
        /// The monitored master's name.
        master: String,
        /// The sentinel the request went to.
        sentinel: String,
        /// Why the outcome is unknown.
        detail: String,
    },
    /// The synchronous-replication record could not be read or written (see
    /// `pg::sync::SyncStateStore`).
    #[error("sync-state record: {what} failed: {detail}")]
    SyncState {
        /// `read` or `write`.
        what: &'static str,
        /// The store's error.
        detail: String,
    },
    /// The operation is not possible here; nothing was done.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl Error {
    /// Whether trying again might succeed: connections, queries and timeouts may; a bad
    /// config, an unsupported operation or a failover of unknown outcome never does; a refusal may, once its reason is gone.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Query { .. }
            | Error::Timeout { .. }
            | Error::Sentinel { .. }
            | Error::SyncState { .. } => true,
            #[cfg(feature = "postgres")]
            Error::Refused(_) => true,
            Error::Config { .. } | Error::Unsupported(_) | Error::FailoverOutcomeUnknown { .. } => {
                false
            }
        }
    }
}
