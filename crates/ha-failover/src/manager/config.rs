//! Settings of the failover manager and of each component, as they appear in a config file.
//!
//! ```
//! use ha_core::config::Validate;
//! use ha_failover::{ComponentConfig, FailoverConfig};
//!
//! let manager: FailoverConfig = serde_json::from_str(r#"{
//!     "max_concurrent_failovers": 2, "max_queued_failovers": 16, "history_capacity": 500,
//!     "leadership_retry_interval": "2s", "health_events": "observations"
//! }"#)?;
//! assert!(manager.validate().is_ok());
//!
//! let db: ComponentConfig = serde_json::from_str(r#"{
//!     "failure_threshold": 5, "recovery_threshold": 3, "depends_on": ["network"],
//!     "timeout": "1m", "cooldown": "10m"
//! }"#)?;
//! assert!(db.validate().is_ok());
//! # Ok::<(), serde_json::Error>(())
//! ```

use std::time::Duration;

use ha_core::backoff::BackoffConfig;
use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;

/// How `HaEvent::HealthChanged` events from the bus count.
///
/// Either way, an event `to: Unhealthy` is a failure and `to: Healthy` or `to: Degraded` a
/// success (a degraded component still serves, so it is no reason to fail over), and `to:
/// Unknown` is ignored: it says nothing either way (a check not run yet, or one whose result
/// could not be judged).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthEvents {
    /// Each event is a status change that its checker has already debounced (ha-health's
    /// checker publishes one only after its own consecutive-failure or -success threshold,
    /// and only when the status changes). A change to `Unhealthy` therefore crosses the
    /// component's failure threshold at once, and a change to `Healthy`/`Degraded` its
    /// recovery threshold; counting such events again would wait for several changes that,
    /// while the component stays down, never come. The default.
    #[default]
    Transitions,
    /// Each event is one observation, counted like a `report_failure`/`report_success` call:
    /// for publishers that send an event per probe.
    Observations,
}

/// Settings of the manager as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    /// Failovers that may run at the same moment (default 3). The others wait in the queue.
    pub max_concurrent_failovers: usize,
    /// Failovers that may wait for a free slot (default 64). A component waits at most once,
    /// so the queue never holds more than the registered components either. When it is full,
    /// a new request is refused — recorded in the history as skipped, published as
    /// `FailoverSkipped`, returned as [`Error::QueueFull`](crate::Error::QueueFull) to a
    /// `report_failure` caller — and the component's failure count starts over, so further
    /// failures ask again.
    pub max_queued_failovers: usize,
    /// Records the audit history keeps, newest first out (default 100).
    pub history_capacity: usize,
    /// How often a failover held back because this node did not lead asks the leadership gate
    /// again (default 1 s). The gate is polled, not watched, so that any implementation works.
    #[serde(with = "config::duration")]
    pub leadership_retry_interval: Duration,
    /// How health events from the bus count (default [`HealthEvents::Transitions`]).
    pub health_events: HealthEvents,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            max_concurrent_failovers: 3,
            max_queued_failovers: 64,
            history_capacity: 100,
            leadership_retry_interval: Duration::from_secs(1),
            health_events: HealthEvents::Transitions,
        }
    }
}

impl Validate for FailoverConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::at_least("max_concurrent_failovers", self.max_concurrent_failovers, 1)?;
        config::at_least("max_queued_failovers", self.max_queued_failovers, 1)?;
        config::at_least("history_capacity", self.history_capacity, 1)?;
        config::positive("leadership_retry_interval", self.leadership_retry_interval)
    }
}

/// Settings of one component.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComponentConfig {
    /// Consecutive failures that ask for a failover (default 3).
    pub failure_threshold: u32,
    /// Consecutive successes after which a failed component counts as recovered (default 2):
    /// only then can new failures ask for another failover.
    pub recovery_threshold: u32,
    /// Components this one depends on. When both are to be failed over, the dependency's
    /// failover ends before this one's starts.
    pub depends_on: Vec<String>,
    /// How long each step — failover, verify, rollback — may take before it is cancelled
    /// (default 30 s).
    #[serde(with = "config::duration")]
    pub timeout: Duration,
    /// How long after a failover of this component ended another may start (default 5 min):
    /// flap protection. A request in the cooldown waits for its end, and is dropped if the
    /// component recovers first. Zero turns it off. Five minutes gives a promoted standby time
    /// to settle (connections move, caches warm) and an operator time to look before the
    /// component is switched again, while a component that stays down still fails over again
    /// within minutes.
    #[serde(with = "config::duration")]
    pub cooldown: Duration,
    /// Tries at one outage (default 3, at least 1). A try that does not complete is tried
    /// again after `retry_backoff` while the component stays down; after the last, the
    /// manager gives up on this outage with one `FailoverFailed` that says so. A new outage
    /// (one success seen, then the failure threshold again) starts over.
    pub max_attempts: u32,
    /// How long to wait before each retry (default: full jitter under a ceiling that starts
    /// at 5 s, doubles, and stops growing at 1 min). Its own `max_attempts` must be unset:
    /// `max_attempts` above bounds the tries. Retries of one outage do not wait for the
    /// cooldown, which is for new outages.
    pub retry_backoff: BackoffConfig,
}

impl Default for ComponentConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            recovery_threshold: 2,
            depends_on: Vec::new(),
            timeout: Duration::from_secs(30),
            cooldown: Duration::from_secs(300),
            max_attempts: 3,
            retry_backoff: BackoffConfig {
                initial: Duration::from_secs(5),
                max: Duration::from_secs(60),
                multiplier: 2.0,
                max_attempts: None,
            },
        }
    }
}

impl ComponentConfig {
    /// Sets both thresholds.
    #[must_use]
    pub fn thresholds(mut self, failure: u32, recovery: u32) -> Self {
        self.failure_threshold = failure;
        self.recovery_threshold = recovery;
        self
    }

    /// Adds a dependency.
    #[must_use]
    pub fn depends_on(mut self, component: impl Into<String>) -> Self {
        self.depends_on.push(component.into());
        self
    }

    /// Sets `timeout`.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets `cooldown`.
    #[must_use]
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// Sets `max_attempts` and `retry_backoff`.
    #[must_use]
    pub fn retry(mut self, max_attempts: u32, backoff: BackoffConfig) -> Self {
        self.max_attempts = max_attempts;
        self.retry_backoff = backoff;
        self
    }
}

impl Validate for ComponentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::at_least("failure_threshold", self.failure_threshold, 1)?;
        config::at_least("recovery_threshold", self.recovery_threshold, 1)?;
        for (i, name) in self.depends_on.iter().enumerate() {
            config::non_empty(&format!("depends_on[{i}]"), name)?;
        }
        config::positive("timeout", self.timeout)?;
        config::at_least("max_attempts", self.max_attempts, 1)?;
        self.retry_backoff
            .validate()
            .map_err(|e| e.within("retry_backoff"))?;
        config::ensure(
            self.retry_backoff.max_attempts.is_none(),
            "retry_backoff.max_attempts",
            || "must be unset: `max_attempts` of the component bounds the tries".to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_docs() {
        let m = FailoverConfig::default();
        m.validate().unwrap();
        assert_eq!(
            (
                m.max_concurrent_failovers,
                m.max_queued_failovers,
                m.history_capacity
            ),
            (3, 64, 100)
        );
        let c = ComponentConfig::default();
        c.validate().unwrap();
        assert_eq!((c.failure_threshold, c.recovery_threshold), (3, 2));
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.cooldown, Duration::from_secs(300));
        assert_eq!(c.max_attempts, 3);
        let none: FailoverConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(none, m);
    }

    #[test]
    fn each_rule_names_its_field() {
        let field = |c: FailoverConfig| c.validate().unwrap_err().field;
        let d = FailoverConfig::default;
        assert_eq!(
            field(FailoverConfig {
                max_concurrent_failovers: 0,
                ..d()
            }),
            "max_concurrent_failovers"
        );
        assert_eq!(
            field(FailoverConfig {
                max_queued_failovers: 0,
                ..d()
            }),
            "max_queued_failovers"
        );
        assert_eq!(
            field(FailoverConfig {
                history_capacity: 0,
                ..d()
            }),
            "history_capacity"
        );
        assert_eq!(
            field(FailoverConfig {
                leadership_retry_interval: Duration::ZERO,
                ..d()
            }),
            "leadership_retry_interval"
        );
        let field = |c: ComponentConfig| c.validate().unwrap_err().field;
        let c = ComponentConfig::default;
        assert_eq!(field(c().thresholds(0, 1)), "failure_threshold");
        assert_eq!(field(c().thresholds(1, 0)), "recovery_threshold");
        assert_eq!(field(c().depends_on(" ")), "depends_on[0]");
        assert_eq!(field(c().timeout(Duration::ZERO)), "timeout");
        assert!(c().cooldown(Duration::ZERO).validate().is_ok());
        let backoff = c().retry_backoff;
        assert_eq!(field(c().retry(0, backoff.clone())), "max_attempts");
        let bounded = BackoffConfig {
            max_attempts: Some(2),
            ..backoff.clone()
        };
        assert_eq!(field(c().retry(2, bounded)), "retry_backoff.max_attempts");
        let zero = BackoffConfig {
            initial: Duration::ZERO,
            ..backoff
        };
        assert_eq!(field(c().retry(2, zero)), "retry_backoff.initial");
        assert!(serde_json::from_str::<ComponentConfig>(r#"{"cooldwn": "1s"}"#).is_err());
    }
}
