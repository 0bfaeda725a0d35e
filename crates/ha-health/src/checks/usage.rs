//! Usage percentages (disk, memory, CPU): the thresholds that judge them and how they are shown.

use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;

use crate::threshold::Outcome;

/// When a usage percentage matters: at or above `degraded_at_percent` a check is `Degraded`,
/// at or above `unhealthy_at_percent` it is `Unhealthy`.
///
/// Valid when `0 < degraded_at_percent < unhealthy_at_percent ≤ 100`.
///
/// ```
/// use ha_core::config::Validate;
/// use ha_health::checks::UsageThresholds;
///
/// assert!(UsageThresholds::new(85.0, 90.0).validate().is_ok());
/// let err = UsageThresholds::new(90.0, 90.0).validate().unwrap_err();
/// assert_eq!(err.field, "degraded_at_percent");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageThresholds {
    /// Usage (percent) from which the check reports `Degraded`.
    pub degraded_at_percent: f64,
    /// Usage (percent) from which the check reports `Unhealthy`.
    pub unhealthy_at_percent: f64,
}

impl UsageThresholds {
    /// Thresholds in percent; see [`Validate`] for the rules they must keep.
    pub const fn new(degraded_at_percent: f64, unhealthy_at_percent: f64) -> Self {
        Self {
            degraded_at_percent,
            unhealthy_at_percent,
        }
    }

    /// The outcome for a usage of `used_percent`.
    pub fn outcome(&self, used_percent: f64) -> Outcome {
        if used_percent >= self.unhealthy_at_percent {
            Outcome::Unhealthy
        } else if used_percent >= self.degraded_at_percent {
            Outcome::Degraded
        } else {
            Outcome::Healthy
        }
    }

    /// What a non-healthy outcome crossed, e.g. `; degraded at 85%`; empty when healthy.
    pub(crate) fn crossed(&self, outcome: Outcome) -> String {
        match outcome {
            Outcome::Healthy => String::new(),
            Outcome::Degraded => format!("; degraded at {}%", self.degraded_at_percent),
            Outcome::Unhealthy => format!("; unhealthy at {}%", self.unhealthy_at_percent),
        }
    }
}

impl Validate for UsageThresholds {
    fn validate(&self) -> Result<(), ConfigError> {
        let (d, u) = (self.degraded_at_percent, self.unhealthy_at_percent);
        config::ensure(d.is_finite() && d > 0.0, "degraded_at_percent", || {
            format!("must be a number greater than 0, got {d}")
        })?;
        config::ensure(u.is_finite() && u <= 100.0, "unhealthy_at_percent", || {
            format!("must be a number of at most 100, got {u}")
        })?;
        config::ensure(d < u, "degraded_at_percent", || {
            format!("must be less than `unhealthy_at_percent` ({u}), got {d}")
        })
    }
}

/// A byte count for people: `12.1 GiB`, `512.0 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let n = n as f64;
    if n >= KIB * KIB * KIB {
        format!("{:.1} GiB", n / (KIB * KIB * KIB))
    } else {
        format!("{:.1} MiB", n / (KIB * KIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_switch_at_the_thresholds() {
        let t = UsageThresholds::new(80.0, 90.0);
        assert_eq!(t.outcome(79.9), Outcome::Healthy);
        assert_eq!(t.outcome(80.0), Outcome::Degraded);
        assert_eq!(t.outcome(89.9), Outcome::Degraded);
        assert_eq!(t.outcome(90.0), Outcome::Unhealthy);
        assert_eq!(t.outcome(100.0), Outcome::Unhealthy);
    }

    #[test]
    fn invalid_thresholds_name_their_field() {
        let field = |d, u| UsageThresholds::new(d, u).validate().unwrap_err().field;
        assert_eq!(field(0.0, 90.0), "degraded_at_percent");
        assert_eq!(field(f64::NAN, 90.0), "degraded_at_percent");
        assert_eq!(field(80.0, 100.5), "unhealthy_at_percent");
        assert_eq!(field(95.0, 90.0), "degraded_at_percent");
        assert!(UsageThresholds::new(99.0, 100.0).validate().is_ok());
    }

    #[test]
    fn bytes_pick_a_readable_unit() {
        assert_eq!(bytes(512 * 1024 * 1024), "512.0 MiB");
        assert_eq!(bytes(12_992_000_000), "12.1 GiB");
    }
}
