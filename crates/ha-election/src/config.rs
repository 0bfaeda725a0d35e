//! `ElectorConfig`: lease timing, with the rules that keep a single leader checked up front.

use std::time::Duration;

use ha_core::config::{self, ConfigError, Validate};
use serde::{Deserialize, Serialize};

/// How an [`Elector`](crate::Elector) times its lease.
///
/// The leader's local deadline is `sent + renew_deadline`, where `sent` is when its last
/// successful acquire/renew request was *sent*. A follower may take the lease over only `ttl`
/// after it first *received* an answer showing that renewal (client-go's rule: expiry is
/// judged on the follower's own monotonic clock, never the store's), which is later;
/// requiring `renew_deadline + drift_margin <= ttl` therefore makes the leader stop acting at
/// least `drift_margin` before any follower can take over, whatever the network delay and
/// whatever the store's clock does. `drift_margin` absorbs the two nodes' clocks running at
/// different rates.
///
/// ```
/// use ha_election::ElectorConfig;
/// use ha_core::Validate;
///
/// let config: ElectorConfig = serde_json::from_str(
///     r#"{"key": "orders/leader", "ttl": "2s", "renew_interval": "500ms",
///         "renew_deadline": "1500ms", "retry_interval": "200ms", "drift_margin": "100ms"}"#,
/// ).unwrap();
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ElectorConfig {
    /// The lease key: which leadership this is (default `ha/leader`).
    pub key: String,
    /// Lease lifetime (default 10 s). A follower takes over only after it watched the same
    /// record stay unchanged for `ttl` on its own monotonic clock, so a crashed leader is
    /// replaced after about `ttl + retry_interval` past its last renewal; a node that has seen
    /// nothing yet (a cold start) watches for `ttl` before it takes a vacant key.
    #[serde(with = "config::duration")]
    pub ttl: Duration,
    /// How often the leader renews (default 2 s).
    #[serde(with = "config::duration")]
    pub renew_interval: Duration,
    /// How long after sending its last successful renewal the leader may keep acting
    /// (default 8 s). Must be more than `renew_interval` (so a renewal can land in time) and
    /// at most `ttl - drift_margin`.
    #[serde(with = "config::duration")]
    pub renew_deadline: Duration,
    /// How often a follower tries to acquire, jittered down to half (default 500 ms). With a
    /// store that pushes releases, followers also try at once when the lease is freed.
    #[serde(with = "config::duration")]
    pub retry_interval: Duration,
    /// Safety margin for clock rate differences between this node and the store (default
    /// 500 ms).
    #[serde(with = "config::duration")]
    pub drift_margin: Duration,
    /// Upper bound for one store request (default 1 s); a renewal is also cut off at the
    /// leadership deadline. At most `renew_deadline - renew_interval`.
    #[serde(with = "config::duration")]
    pub request_timeout: Duration,
}

impl Default for ElectorConfig {
    fn default() -> Self {
        Self {
            key: "ha/leader".into(),
            ttl: Duration::from_secs(10),
            renew_interval: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(8),
            retry_interval: Duration::from_millis(500),
            drift_margin: Duration::from_millis(500),
            request_timeout: Duration::from_secs(1),
        }
    }
}

impl ElectorConfig {
    /// A config with `ttl` and `retry_interval` and the other timings derived from them the
    /// way the defaults are: renew every `ttl/5`, deadline `ttl × 0.8`, drift `ttl/20`,
    /// request timeout `ttl/10`.
    pub fn with_ttl(key: impl Into<String>, ttl: Duration, retry_interval: Duration) -> Self {
        Self {
            key: key.into(),
            ttl,
            renew_interval: ttl / 5,
            renew_deadline: ttl * 4 / 5,
            retry_interval,
            drift_margin: ttl / 20,
            request_timeout: ttl / 10,
        }
    }
}

impl Validate for ElectorConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::non_empty("key", &self.key)?;
        for (field, value) in [
            ("ttl", self.ttl),
            ("renew_interval", self.renew_interval),
            ("renew_deadline", self.renew_deadline),
            ("retry_interval", self.retry_interval),
            ("drift_margin", self.drift_margin),
            ("request_timeout", self.request_timeout),
        ] {
            config::positive(field, value)?;
        }
        config::strictly_increasing(&[
            ("renew_interval", self.renew_interval),
            ("renew_deadline", self.renew_deadline),
            ("ttl", self.ttl),
        ])?;
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        config::ensure(
            self.renew_interval + self.request_timeout <= self.renew_deadline,
            "request_timeout",
            || {
                format!(
                    "must let a renewal sent at `renew_interval` ({}) be answered before \
                     `renew_deadline` ({}): at most {}, got {}",
                    fmt(self.renew_interval),
                    fmt(self.renew_deadline),
                    fmt(self.renew_deadline.saturating_sub(self.renew_interval)),
                    fmt(self.request_timeout)
                )
            },
        )?;
        config::ensure(
            self.renew_deadline + self.drift_margin <= self.ttl,
            "renew_deadline",
            || {
                format!(
                    "must leave `drift_margin` ({}) before `ttl` ({}), so the leader stops before the \
                 store can grant the lease to another node: at most {}, got {}",
                    fmt(self.drift_margin),
                    fmt(self.ttl),
                    fmt(self.ttl.saturating_sub(self.drift_margin)),
                    fmt(self.renew_deadline)
                )
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_derived_configs_are_valid() {
        ElectorConfig::default().validate().unwrap();
        ElectorConfig::with_ttl("k", Duration::from_secs(2), Duration::from_millis(200))
            .validate()
            .unwrap();
    }

    #[test]
    fn timing_rules_name_the_field_and_explain() {
        let base = ElectorConfig::default();
        let err = ElectorConfig {
            renew_interval: Duration::from_secs(9),
            ..base.clone()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "renew_interval");
        assert_eq!(err.rule, "must be less than `renew_deadline` (8s), got 9s");

        let err = ElectorConfig {
            renew_deadline: Duration::from_secs(10),
            ..base.clone()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "renew_deadline");
        assert!(err.rule.contains("less than `ttl` (10s)"), "{}", err.rule);

        let err = ElectorConfig {
            renew_deadline: Duration::from_millis(9800),
            ..base.clone()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "renew_deadline");
        assert!(
            err.rule.contains("at most 9s 500ms, got 9s 800ms"),
            "{}",
            err.rule
        );

        let err = ElectorConfig {
            request_timeout: Duration::from_millis(6001),
            ..base.clone()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "request_timeout");
        assert!(err.rule.contains("at most 6s, got 6s 1ms"), "{}", err.rule);

        let err = ElectorConfig {
            key: String::new(),
            ..base.clone()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "key");
        let err = ElectorConfig {
            retry_interval: Duration::ZERO,
            ..base
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "retry_interval");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<ElectorConfig>(r#"{"tll": "1s"}"#).is_err());
    }
}
