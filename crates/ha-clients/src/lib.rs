//! One place for the client settings the `ha` crates share, so that every Redis connection and
//! every HTTP client of the workspace behaves the same way under faults: how long a connect
//! may take, that no command is retried on the caller's behalf, how a silent connection is
//! noticed, how reconnects back off, and that no environment proxy sits in front of a health
//! check or a failover call.
//!
//! It holds settings only — no connection logic, no I/O. Each client library is behind the
//! feature named for it (`redis`: fred; `http`: reqwest); without features the crate is empty.
//!
//! ```
//! # #[cfg(feature = "redis")] {
//! use std::time::Duration;
//! let connection = ha_clients::redis::connection(Duration::from_secs(1), Some(Duration::from_secs(5)));
//! assert_eq!(connection.max_command_attempts, 1);
//! # }
//! ```

#[cfg(feature = "redis")]
pub mod redis {
    //! fred settings for every Redis client: the lease store (`ha-election`), the `redis`
    //! health check (`ha-health`) and the Sentinel monitor (`ha-replication`).

    use std::time::Duration;

    use fred::types::config::{ConnectionConfig, ReconnectPolicy, TcpConfig, UnresponsiveConfig};

    /// How often a connection waiting for an answer is checked against `unresponsive_after`.
    const UNRESPONSIVE_CHECK: Duration = Duration::from_secs(1);

    /// The connection settings: `timeout` bounds connecting and fred's internal commands;
    /// fred never sends a command twice on the caller's behalf (`max_command_attempts = 1`:
    /// a lease write or a failover request is written once or fails); Nagle is off (commands
    /// are tiny); with `unresponsive_after`, a connection that leaves a command unanswered
    /// that long is dropped and reconnected, so a half-open TCP connection is noticed.
    pub fn connection(timeout: Duration, unresponsive_after: Option<Duration>) -> ConnectionConfig {
        ConnectionConfig {
            connection_timeout: timeout,
            internal_command_timeout: timeout,
            max_command_attempts: 1,
            unresponsive: UnresponsiveConfig {
                max_timeout: unresponsive_after,
                interval: UNRESPONSIVE_CHECK,
            },
            tcp: TcpConfig {
                nodelay: Some(true),
                ..TcpConfig::default()
            },
            ..ConnectionConfig::default()
        }
    }

    /// Reconnects without limit, at once first, then backing off exponentially from 50 ms to
    /// at most 2 s, with up to 50 ms of jitter so that many clients of one server do not
    /// reconnect in step.
    pub fn reconnect() -> ReconnectPolicy {
        let mut policy = ReconnectPolicy::new_exponential(0, 50, 2_000, 2);
        policy.set_jitter(50);
        policy
    }
}

#[cfg(feature = "http")]
pub mod http {
    //! The reqwest client for health checks (`ha-health`) and failover actions
    //! (`ha-failover`).

    /// A client builder that ignores `HTTP_PROXY`/`HTTPS_PROXY`: a check or a failover call to
    /// an internal endpoint must reach that endpoint, not a proxy that may itself be down.
    /// Callers add their own timeouts.
    pub fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder().no_proxy()
    }
}
