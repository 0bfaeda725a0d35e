//! Exponential backoff with full jitter and a ceiling, for every retry loop.
//!
//! Attempt `n` (from 0) sleeps a uniformly random time in `[0, min(max, initial × multiplierⁿ)]`
//! — "full jitter" in the sense of the AWS Architecture Blog's *Exponential Backoff and
//! Jitter*: it spreads a crowd of retrying clients best and never exceeds the ceiling. We keep
//! our own because it is a few lines and the usual crates' jitter differs: `backon` adds a
//! random `(0, delay)` on top of the delay, so its sleeps lie in `[d, 2d)` and can pass its
//! `max_delay`; the `backoff` crate is unmaintained.

use std::time::Duration;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use crate::config::{self, ConfigError, Validate};

/// How a retry loop backs off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// The ceiling of the first sleep (default 100 ms).
    #[serde(with = "config::duration")]
    pub initial: Duration,
    /// The ceiling no sleep ever exceeds (default 30 s).
    #[serde(with = "config::duration")]
    pub max: Duration,
    /// How much the ceiling grows per attempt (default 2.0; at least 1.0).
    pub multiplier: f64,
    /// Give up after this many attempts (`None`, the default: never give up).
    pub max_attempts: Option<u32>,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            max_attempts: None,
        }
    }
}

impl Validate for BackoffConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::positive("initial", self.initial)?;
        config::ensure(self.max >= self.initial, "max", || {
            format!(
                "must be at least `initial` ({}), got {}",
                humantime::format_duration(self.initial),
                humantime::format_duration(self.max)
            )
        })?;
        config::ensure(
            self.multiplier.is_finite() && self.multiplier >= 1.0,
            "multiplier",
            || format!("must be a finite number >= 1.0, got {}", self.multiplier),
        )?;
        if let Some(n) = self.max_attempts {
            config::at_least("max_attempts", n, 1)?;
        }
        Ok(())
    }
}

/// The state of one retry loop: which attempt comes next.
///
/// ```
/// use std::time::Duration;
/// use ha_core::backoff::{Backoff, BackoffConfig};
///
/// let mut backoff = Backoff::new(BackoffConfig {
///     initial: Duration::from_millis(10),
///     max: Duration::from_secs(1),
///     max_attempts: Some(3),
///     ..BackoffConfig::default()
/// });
/// let sleeps: Vec<Duration> = backoff.by_ref().collect();
/// assert_eq!(sleeps.len(), 3);
/// assert!(sleeps[2] <= Duration::from_millis(40));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    /// A fresh loop. The config should have passed [`Validate::validate`]; an invalid one is
    /// clamped (multiplier below 1 acts as 1, `max` below `initial` acts as `initial`).
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// How many sleeps have been handed out since the start or the last [`reset`](Self::reset).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over, e.g. after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The ceiling of the sleep for `attempt` (from 0): `min(max, initial × multiplier^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let max = self.config.max.max(self.config.initial);
        let exponent = i32::try_from(attempt).unwrap_or(i32::MAX);
        let grown =
            self.config.initial.as_secs_f64() * self.config.multiplier.max(1.0).powi(exponent);
        // Overflow and NaN both end at the ceiling.
        Duration::try_from_secs_f64(grown).map_or(max, |d| d.min(max))
    }

    /// The next sleep, drawn with `rng`; `None` once `max_attempts` sleeps were handed out.
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Option<Duration> {
        if self.config.max_attempts.is_some_and(|n| self.attempt >= n) {
            return None;
        }
        let ceiling = self.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(rng.random_range(0..=nanos)))
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    /// The next sleep, drawn from the thread's random generator.
    fn next(&mut self) -> Option<Duration> {
        self.next_delay_with(&mut rand::rng())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn ceilings_double_then_stop_at_max() {
        let b = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
            ..BackoffConfig::default()
        });
        let ms = |a| b.ceiling(a).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(60), ms(u32::MAX)],
            [100, 200, 400, 500, 500, 500]
        );
    }

    #[test]
    fn jitter_is_full_not_additive() {
        // Over many draws the sleeps for one attempt spread over [0, ceiling].
        let mut rng = StdRng::seed_from_u64(1);
        let config = BackoffConfig {
            initial: Duration::from_secs(1),
            ..BackoffConfig::default()
        };
        let draws: Vec<Duration> = (0..1000)
            .map(|_| {
                Backoff::new(config.clone())
                    .next_delay_with(&mut rng)
                    .unwrap()
            })
            .collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(900)));
    }

    #[test]
    fn validate_names_the_field() {
        let bad = |c: BackoffConfig| c.validate().unwrap_err().field;
        let ok = BackoffConfig::default();
        assert!(ok.validate().is_ok());
        assert_eq!(
            bad(BackoffConfig {
                initial: Duration::ZERO,
                ..ok.clone()
            }),
            "initial"
        );
        assert_eq!(
            bad(BackoffConfig {
                max: Duration::from_millis(1),
                ..ok.clone()
            }),
            "max"
        );
        assert_eq!(
            bad(BackoffConfig {
                multiplier: 0.5,
                ..ok.clone()
            }),
            "multiplier"
        );
        assert_eq!(
            bad(BackoffConfig {
                multiplier: f64::NAN,
                ..ok.clone()
            }),
            "multiplier"
        );
        assert_eq!(
            bad(BackoffConfig {
                max_attempts: Some(0),
                ..ok
            }),
            "max_attempts"
        );
    }

    #[test]
    fn deserializes_human_durations() {
        let c: BackoffConfig =
            serde_json::from_str(r#"{"initial": "50ms", "max": "10s", "max_attempts": 5}"#)
                .unwrap();
        assert_eq!(c.initial, Duration::from_millis(50));
        assert_eq!(c.max, Duration::from_secs(10));
        assert_eq!(c.multiplier, 2.0);
        assert!(serde_json::from_str::<BackoffConfig>(r#"{"initail": "1s"}"#).is_err());
    }

    proptest! {
        #[test]
        fn every_sleep_is_within_its_ceiling_and_the_max(
            initial_ms in 1u64..10_000,
            extra_ms in 0u64..100_000,
            multiplier in 1.0f64..10.0,
            attempts in 1u32..200,
            seed: u64,
        ) {
            let config = BackoffConfig {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(initial_ms + extra_ms),
                multiplier,
                max_attempts: Some(attempts),
            };
            prop_assert!(config.validate().is_ok());
            let mut backoff = Backoff::new(config.clone());
            let mut rng = StdRng::seed_from_u64(seed);
            let mut previous_ceiling = Duration::ZERO;
            let mut n = 0;
            while let Some(sleep) = backoff.next_delay_with(&mut rng) {
                let ceiling = backoff.ceiling(n);
                prop_assert!(sleep <= ceiling);
                prop_assert!(ceiling <= config.max);
                prop_assert!(ceiling >= previous_ceiling, "ceilings never shrink");
                previous_ceiling = ceiling;
                n += 1;
            }
            prop_assert_eq!(n, attempts, "stops exactly at max_attempts");
            backoff.reset();
            prop_assert!(backoff.next_delay_with(&mut rng).is_some());
        }
    }
}
