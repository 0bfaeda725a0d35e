//! Config conventions: human durations in serde, and `validate()` errors that name the field
//! and the rule it broke.
//!
//! Every config struct in the ha crates is `Deserialize + Default` and implements
//! [`Validate`]. Durations are written the human way (`"5s"`, `"250ms"`, `"1m 30s"`):
//!
//! ```
//! use std::time::Duration;
//! use ha_core::config::{self, ConfigError, Validate};
//!
//! #[derive(serde::Deserialize)]
//! struct Lease {
//!     #[serde(with = "ha_core::config::duration")]
//!     ttl: Duration,
//!     #[serde(with = "ha_core::config::duration")]
//!     renew_interval: Duration,
//! }
//!
//! impl Validate for Lease {
//!     fn validate(&self) -> Result<(), ConfigError> {
//!         config::strictly_increasing(&[("renew_interval", self.renew_interval), ("ttl", self.ttl)])
//!     }
//! }
//!
//! let bad: Lease = serde_json::from_str(r#"{"ttl": "2s", "renew_interval": "5s"}"#).unwrap();
//! let err = bad.validate().unwrap_err();
//! assert_eq!(err.field, "renew_interval");
//! assert!(err.to_string().contains("must be less than `ttl` (2s)"));
//! ```

use std::fmt::Display;
use std::time::Duration;

/// Serde adapter for [`Duration`] fields in human form (`"5s"`, `"250ms"`).
///
/// Use as `#[serde(with = "ha_core::config::duration")]`.
pub use humantime_serde as duration;

/// A config value broke a rule. Says which field (a dotted path for nested configs) and what
/// the rule is, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: `{field}` {rule}")]
pub struct ConfigError {
    /// The field, e.g. `election.renew_deadline`.
    pub field: String,
    /// The rule it broke, e.g. "must be less than `ttl` (10s), got 15s".
    pub rule: String,
}

impl ConfigError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// The same error, about a field of a nested config called `parent`.
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

/// A config that can check itself.
pub trait Validate {
    /// `Ok` if every field and every relation between fields holds; otherwise the first
    /// violation found.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Fails with `rule` about `field` unless `ok`.
pub fn ensure(ok: bool, field: &str, rule: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(field, rule()))
    }
}

/// `field` must be a non-zero duration.
pub fn positive(field: &str, value: Duration) -> Result<(), ConfigError> {
    ensure(!value.is_zero(), field, || {
        "must be greater than zero".into()
    })
}

/// `field` must be at least `min`.
pub fn at_least<T: PartialOrd + Display>(field: &str, value: T, min: T) -> Result<(), ConfigError> {
    ensure(value >= min, field, || {
        format!("must be at least {min}, got {value}")
    })
}

/// `field` must not be empty.
pub fn non_empty(field: &str, value: &str) -> Result<(), ConfigError> {
    ensure(!value.trim().is_empty(), field, || {
        "must not be empty".into()
    })
}

/// The named durations must grow strictly from left to right, e.g.
/// `renew_interval < renew_deadline < ttl`. The error names the first field out of order and
/// the one it must be less than, with both values.
pub fn strictly_increasing(fields: &[(&str, Duration)]) -> Result<(), ConfigError> {
    for pair in fields.windows(2) {
        let [(lo_name, lo), (hi_name, hi)] = pair else {
            continue;
        };
        ensure(lo < hi, lo_name, || {
            format!(
                "must be less than `{hi_name}` ({}), got {}",
                humantime::format_duration(*hi),
                humantime::format_duration(*lo)
            )
        })?;
    }
    Ok(())
}

/// Parses a human duration (`"5s"`), naming `field` if it is not one.
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text)
        .map_err(|e| ConfigError::new(field, format!("must be a duration like \"5s\": {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_names_the_first_offender() {
        let s = Duration::from_secs;
        assert!(strictly_increasing(&[("a", s(1)), ("b", s(2)), ("c", s(3))]).is_ok());
        let err = strictly_increasing(&[("a", s(1)), ("b", s(3)), ("c", s(3))]).unwrap_err();
        assert_eq!(err.field, "b");
        assert_eq!(err.rule, "must be less than `c` (3s), got 3s");
    }

    #[test]
    fn nested_errors_get_a_dotted_path() {
        let err = positive("ttl", Duration::ZERO)
            .unwrap_err()
            .within("election");
        assert_eq!(
            err.to_string(),
            "invalid config: `election.ttl` must be greater than zero"
        );
    }

    #[test]
    fn bad_duration_text_names_the_field() {
        let err = parse_duration("ttl", "five").unwrap_err();
        assert_eq!(err.field, "ttl");
        assert_eq!(
            parse_duration("ttl", "1m 30s").unwrap(),
            Duration::from_secs(90)
        );
    }

    #[test]
    fn at_least_and_non_empty() {
        assert!(at_least("n", 3, 1).is_ok());
        assert_eq!(
            at_least("n", 0, 1).unwrap_err().rule,
            "must be at least 1, got 0"
        );
        assert!(non_empty("key", " ").is_err());
    }
}
