//! Settings of the checker and of each check, as they appear in a config file.
//!
//! ```
//! use ha_health::{CheckConfig, CheckerConfig};
//! use ha_core::config::Validate;
//!
//! let check: CheckConfig = serde_json::from_str(r#"{
//!     "interval": "5s", "timeout": "1s", "criticality": "critical",
//!     "depends_on": ["postgres"], "groups": ["readiness"], "failure_threshold": 3
//! }"#)?;
//! assert!(check.validate().is_ok());
//!
//! let bad: CheckConfig = serde_json::from_str(r#"{ "interval": "1s", "timeout": "2s" }"#)?;
//! assert_eq!(
//!     bad.validate().unwrap_err().to_string(),
//!     "invalid config: `timeout` must be at most `interval` (1s), got 2s"
//! );
//! # Ok::<(), serde_json::Error>(())
//! ```

use std::time::Duration;

use ha_core::Criticality;
use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;

use crate::anomaly::Rule;
use crate::baseline::BaselineConfig;
use crate::phi::PhiConfig;
use crate::threshold::ThresholdConfig;

/// Settings of one check. Defaults follow Kubernetes probes where they have an equivalent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckConfig {
    /// Time between the starts of two runs (default 10 s, Kubernetes' `periodSeconds`).
    #[serde(with = "config::duration")]
    pub interval: Duration,
    /// A run still going after this long is cancelled and counts as failed (default 1 s,
    /// Kubernetes' `timeoutSeconds`). At most `interval`, so runs never overlap.
    #[serde(with = "config::duration")]
    pub timeout: Duration,
    /// How much the whole system needs this component (default `critical`: a check nobody
    /// classified is assumed to matter). Only critical checks can make the overall status
    /// worse than `degraded`.
    pub criticality: Criticality,
    /// Checks this one depends on; while one of them is unhealthy, this one is reported
    /// unhealthy with that dependency named as the cause.
    pub depends_on: Vec<String>,
    /// Named groups this check belongs to (e.g. `liveness`, `readiness`), each with its own
    /// rolled-up status, as Spring Boot Actuator's health groups.
    pub groups: Vec<String>,
    /// Consecutive failures before the check is `unhealthy` (default 3).
    pub failure_threshold: u32,
    /// Consecutive passes before the check is up again (default 1).
    pub success_threshold: u32,
    /// Latency and success-rate statistics.
    pub baseline: BaselineConfig,
    /// Anomaly rules judged on every result (default: every rule with its default parameter).
    pub anomaly_rules: Vec<Rule>,
    /// The φ-accrual detector over the intervals between successful runs. `None` (default)
    /// derives it from `interval`; see [`CheckConfig::phi_config`].
    pub phi: Option<PhiConfig>,
}

impl Default for CheckConfig {
    fn default() -> Self {
        let threshold = ThresholdConfig::default();
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            criticality: Criticality::Critical,
            depends_on: Vec::new(),
            groups: Vec::new(),
            failure_threshold: threshold.failure_threshold,
            success_threshold: threshold.success_threshold,
            baseline: BaselineConfig::default(),
            anomaly_rules: Rule::defaults(),
            phi: None,
        }
    }
}

impl CheckConfig {
    /// Sets `interval`.
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets `timeout`.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets `criticality`.
    #[must_use]
    pub fn criticality(mut self, criticality: Criticality) -> Self {
        self.criticality = criticality;
        self
    }

    /// Adds a dependency.
    #[must_use]
    pub fn depends_on(mut self, check: impl Into<String>) -> Self {
        self.depends_on.push(check.into());
        self
    }

    /// Adds the check to a group.
    #[must_use]
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.groups.push(group.into());
        self
    }

    /// Sets both thresholds.
    #[must_use]
    pub fn thresholds(mut self, failure: u32, success: u32) -> Self {
        self.failure_threshold = failure;
        self.success_threshold = success;
        self
    }

    /// The debouncing thresholds as a [`ThresholdConfig`].
    pub fn threshold_config(&self) -> ThresholdConfig {
        ThresholdConfig {
            failure_threshold: self.failure_threshold,
            success_threshold: self.success_threshold,
        }
    }

    /// The φ-accrual settings in use: `phi` if set, else Akka's defaults fitted to this
    /// check's schedule — the first expected interval is `interval`, and the standard
    /// deviation floor is a quarter of it. A check that runs like clockwork
    /// is then *suspected* (φ ≈ 4.7 ≥ 3) once one run is missing and *failed* (φ ≥ 8) after
    /// two, while the status waits for `failure_threshold` failed runs: the early warning
    /// comes first.
    pub fn phi_config(&self) -> PhiConfig {
        self.phi.clone().unwrap_or_else(|| PhiConfig {
            first_heartbeat_estimate: self.interval,
            min_std_deviation: (self.interval / 4).max(Duration::from_millis(1)),
            ..PhiConfig::default()
        })
    }
}

impl Validate for CheckConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::positive("interval", self.interval)?;
        config::positive("timeout", self.timeout)?;
        config::ensure(self.timeout <= self.interval, "timeout", || {
            format!(
                "must be at most `interval` ({}), got {}",
                humantime::format_duration(self.interval),
                humantime::format_duration(self.timeout)
            )
        })?;
        for (i, name) in self.depends_on.iter().enumerate() {
            config::non_empty(&format!("depends_on[{i}]"), name)?;
        }
        for (i, name) in self.groups.iter().enumerate() {
            config::non_empty(&format!("groups[{i}]"), name)?;
        }
        self.threshold_config().validate()?;
        self.baseline.validate().map_err(|e| e.within("baseline"))?;
        for (i, rule) in self.anomaly_rules.iter().enumerate() {
            rule.validate()
                .map_err(|e| e.within(&format!("anomaly_rules[{i}]")))?;
        }
        self.phi_config().validate().map_err(|e| e.within("phi"))
    }
}

/// Settings of the checker as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckerConfig {
    /// How many checks may run at the same moment (default 64). The rest wait for a slot; a
    /// hung check holds its slot only until its timeout.
    pub max_concurrent_checks: usize,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_checks: 64,
        }
    }
}

impl Validate for CheckerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::at_least("max_concurrent_checks", self.max_concurrent_checks, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_kubernetes_like() {
        let c = CheckConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!((c.failure_threshold, c.success_threshold), (3, 1));
        assert_eq!(c.phi_config().threshold, 8.0);
        assert!(CheckerConfig::default().validate().is_ok());
    }

    #[test]
    fn errors_name_the_nested_field() {
        let mut c = CheckConfig::default();
        c.baseline.min_samples = 0;
        assert_eq!(c.validate().unwrap_err().field, "baseline.min_samples");
        let c = CheckConfig {
            failure_threshold: 0,
            ..CheckConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "failure_threshold");
        let c = CheckConfig::default().depends_on(" ");
        assert_eq!(c.validate().unwrap_err().field, "depends_on[0]");
        let c: CheckConfig = serde_json::from_str(
            r#"{"anomaly_rules": [{"rule": "success_rate_below", "floor": 2}]}"#,
        )
        .unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .field
                .starts_with("anomaly_rules[0]."),
        );
        let c = CheckerConfig {
            max_concurrent_checks: 0,
        };
        assert_eq!(c.validate().unwrap_err().field, "max_concurrent_checks");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<CheckConfig>(r#"{"intervall": "1s"}"#).unwrap_err();
        assert!(err.to_string().contains("intervall"), "{err}");
    }
}
