//! The error type of the PostgreSQL and Sentinel parts of the crate.

use std::time::Duration;

use ha_core::ConfigError;

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
    #[error("promotion refused: {0}")]
    Refused(Refusal),
    /// A Sentinel operation failed on every sentinel.
    #[error("sentinel `{master}`: {detail}")]
    Sentinel {
        /// The monitored master's name.
        master: String,
        /// What went wrong, per sentinel tried.
        detail: String,
    },
    /// The operation is not possible here; nothing was done.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl Error {
    /// Whether trying again might succeed: connections, queries and timeouts may; a bad
    /// config or an unsupported operation never does; a refusal may, once its reason is gone.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Query { .. }
            | Error::Timeout { .. }
            | Error::Sentinel { .. }
            | Error::Refused(_) => true,
            Error::Config { .. } | Error::Unsupported(_) => false,
        }
    }
}
