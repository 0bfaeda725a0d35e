//! `BreakerConfig`: when a circuit breaker opens, how long it stays open, and how it closes.
//!
//! The names and semantics follow resilience4j's `CircuitBreakerConfig`, plus a
//! consecutive-failure rule and a success threshold for closing. In YAML:
//!
//! ```yaml
//! failure_threshold: 3            # consecutive failures (null: rule off)
//! failure_rate_threshold: 50      # percent of the window (null: rule off)
//! slow_call_rate_threshold: 80    # percent of the window (null: rule off, the default)
//! slow_call_duration: 2s
//! sliding_window: { count: 100 }  # or { time: 60s }
//! minimum_calls: 10
//! wait_duration: 60s
//! wait_backoff: { multiplier: 2.0, max: 10m }
//! permitted_calls_in_half_open: 1
//! success_threshold: 2
//! ```

use std::time::Duration;

use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;

/// The largest count-based window: its ring takes one byte per call.
pub const MAX_COUNT_WINDOW: u32 = 1 << 20;
/// The longest time-based window: one bucket per second.
pub const MAX_TIME_WINDOW: Duration = Duration::from_secs(3600);
/// The most trial calls half-open may let through at once (the count lives in 16 bits of the
/// breaker's state word; the cap leaves room).
pub const MAX_PERMITTED_IN_HALF_OPEN: u32 = 10_000;

/// Over which calls the failure and slow-call rates are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SlidingWindow {
    /// The last `n` calls recorded in the closed state (`{count: 100}`).
    Count(u32),
    /// The calls recorded in the last `d` (`{time: "60s"}`), in one-second buckets: the
    /// window holds the current, partly elapsed second and the `d − 1` whole seconds before
    /// it, as resilience4j's time-based window does. `d` must be a whole number of seconds.
    Time(#[serde(with = "config::duration")] Duration),
}

impl Default for SlidingWindow {
    fn default() -> Self {
        SlidingWindow::Count(100)
    }
}

/// Exponential growth of the open wait when the breaker opens again and again without
/// closing in between (a half-open probe failed).
///
/// The `k`-th consecutive open waits `min(max, wait_duration × multiplierᵏ⁻¹)`; closing resets
/// `k`. There is no jitter: the wait only decides when the next probe may pass, and at most
/// `permitted_calls_in_half_open` probes pass however many callers are waiting.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WaitBackoff {
    /// Growth per consecutive open (default 2.0; at least 1.0).
    pub multiplier: f64,
    /// The longest wait (default 10 min; at least `wait_duration`).
    #[serde(with = "config::duration")]
    pub max: Duration,
}

impl Default for WaitBackoff {
    fn default() -> Self {
        Self {
            multiplier: 2.0,
            max: Duration::from_secs(600),
        }
    }
}

/// When a [`CircuitBreaker`](super::CircuitBreaker) opens, how long it stays open, and how it
/// closes again.
///
/// In the closed state every completed call is recorded. The breaker opens as soon as one
/// enabled rule holds after a recorded call:
///
/// - `failure_threshold` failures in a row;
/// - at least `minimum_calls` calls in the sliding window, of which at least
///   `failure_rate_threshold` percent failed;
/// - at least `minimum_calls` calls in the sliding window, of which at least
///   `slow_call_rate_threshold` percent took `slow_call_duration` or longer (failed or not).
///
/// Open, it rejects every call for `wait_duration` (grown by `wait_backoff` on repeated
/// opens). The first call after the wait moves it to half-open, where at most
/// `permitted_calls_in_half_open` trial calls run at once: `success_threshold` successful
/// trials close it, one failed (or, with the slow-call rule on, slow) trial opens it again.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (default 3; `None`: rule off).
    pub failure_threshold: Option<u32>,
    /// Percentage of failed calls in the window that opens the breaker, in (0, 100]
    /// (default 50; `None`: rule off).
    pub failure_rate_threshold: Option<f64>,
    /// Percentage of slow calls in the window that opens the breaker, in (0, 100]
    /// (default `None`: rule off, and no call is timed).
    pub slow_call_rate_threshold: Option<f64>,
    /// A call that takes at least this long is slow (default 60 s). Only used with
    /// `slow_call_rate_threshold`.
    #[serde(with = "config::duration")]
    pub slow_call_duration: Duration,
    /// The calls the rates are computed over (default the last 100).
    pub sliding_window: SlidingWindow,
    /// Calls the window must hold before either rate counts (default 10; at most the size of a
    /// count-based window).
    pub minimum_calls: u32,
    /// How long the breaker stays open before it lets a trial call through (default 60 s).
    #[serde(with = "config::duration")]
    pub wait_duration: Duration,
    /// Growth of the wait on repeated opens (default `None`: always `wait_duration`).
    pub wait_backoff: Option<WaitBackoff>,
    /// Trial calls allowed in flight at once in half-open (default 1). A trial that completes
    /// or is cancelled frees its slot.
    pub permitted_calls_in_half_open: u32,
    /// Successful trial calls that close the breaker (default 2).
    pub success_threshold: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: Some(3),
            failure_rate_threshold: Some(50.0),
            slow_call_rate_threshold: None,
            slow_call_duration: Duration::from_secs(60),
            sliding_window: SlidingWindow::default(),
            minimum_calls: 10,
            wait_duration: Duration::from_secs(60),
            wait_backoff: None,
            permitted_calls_in_half_open: 1,
            success_threshold: 2,
        }
    }
}

impl BreakerConfig {
    /// How long the `opens`-th consecutive open (from 1) lasts.
    pub fn open_wait(&self, opens: u32) -> Duration {
        let Some(backoff) = self.wait_backoff else {
            return self.wait_duration;
        };
        // The same growth as every other backoff: min(max, wait × multiplier^(opens - 1)).
        ha_core::Backoff::new(ha_core::BackoffConfig {
            initial: self.wait_duration,
            max: backoff.max,
            multiplier: backoff.multiplier,
            max_attempts: None,
        })
        .ceiling(opens.saturating_sub(1))
    }
}

fn percentage(field: &str, value: Option<f64>) -> Result<(), ConfigError> {
    match value {
        None => Ok(()),
        Some(v) => config::ensure(v.is_finite() && v > 0.0 && v <= 100.0, field, || {
            format!("must be a percentage in (0, 100], got {v}")
        }),
    }
}

impl Validate for BreakerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::ensure(
            self.failure_threshold.is_some()
                || self.failure_rate_threshold.is_some()
                || self.slow_call_rate_threshold.is_some(),
            "failure_threshold",
            || {
                "must be set when `failure_rate_threshold` and `slow_call_rate_threshold` are \
                 both off (the breaker could never open)"
                    .into()
            },
        )?;
        if let Some(n) = self.failure_threshold {
            config::at_least("failure_threshold", n, 1)?;
        }
        percentage("failure_rate_threshold", self.failure_rate_threshold)?;
        percentage("slow_call_rate_threshold", self.slow_call_rate_threshold)?;
        config::positive("slow_call_duration", self.slow_call_duration)?;
        config::at_least("minimum_calls", self.minimum_calls, 1)?;
        match self.sliding_window {
            SlidingWindow::Count(n) => {
                config::ensure(
                    (1..=MAX_COUNT_WINDOW).contains(&n),
                    "sliding_window.count",
                    || format!("must be between 1 and {MAX_COUNT_WINDOW}, got {n}"),
                )?;
                config::ensure(self.minimum_calls <= n, "minimum_calls", || {
                    format!(
                        "must be at most `sliding_window.count` ({n}), got {}",
                        self.minimum_calls
                    )
                })?;
            }
            SlidingWindow::Time(d) => {
                config::ensure(
                    d.subsec_nanos() == 0 && d >= Duration::from_secs(1) && d <= MAX_TIME_WINDOW,
                    "sliding_window.time",
                    || {
                        format!(
                            "must be a whole number of seconds between 1s and {}, got {}",
                            humantime::format_duration(MAX_TIME_WINDOW),
                            humantime::format_duration(d)
                        )
                    },
                )?;
            }
        }
        config::positive("wait_duration", self.wait_duration)?;
        if let Some(backoff) = &self.wait_backoff {
            config::ensure(
                backoff.multiplier.is_finite() && backoff.multiplier >= 1.0,
                "wait_backoff.multiplier",
                || format!("must be a finite number >= 1.0, got {}", backoff.multiplier),
            )?;
            config::ensure(
                backoff.max >= self.wait_duration,
                "wait_backoff.max",
                || {
                    format!(
                        "must be at least `wait_duration` ({}), got {}",
                        humantime::format_duration(self.wait_duration),
                        humantime::format_duration(backoff.max)
                    )
                },
            )?;
        }
        config::ensure(
            (1..=MAX_PERMITTED_IN_HALF_OPEN).contains(&self.permitted_calls_in_half_open),
            "permitted_calls_in_half_open",
            || {
                format!(
                    "must be between 1 and {MAX_PERMITTED_IN_HALF_OPEN}, got {}",
                    self.permitted_calls_in_half_open
                )
            },
        )?;
        config::at_least("success_threshold", self.success_threshold, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(cfg: BreakerConfig) -> String {
        cfg.validate().unwrap_err().field
    }

    #[test]
    fn defaults_are_valid_and_match_the_docs() {
        let cfg = BreakerConfig::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.failure_threshold, Some(3));
        assert_eq!(cfg.success_threshold, 2);
        assert_eq!(cfg.wait_duration, Duration::from_secs(60));
        assert_eq!(cfg.sliding_window, SlidingWindow::Count(100));
    }

    #[test]
    fn deserializes_the_human_form() {
        let cfg: BreakerConfig = serde_json::from_str(
            r#"{
                "failure_threshold": null,
                "slow_call_rate_threshold": 80,
                "slow_call_duration": "2s",
                "sliding_window": {"time": "30s"},
                "wait_duration": "5s",
                "wait_backoff": {"max": "1m"},
                "permitted_calls_in_half_open": 3
            }"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.failure_threshold, None);
        assert_eq!(cfg.failure_rate_threshold, Some(50.0));
        assert_eq!(cfg.slow_call_rate_threshold, Some(80.0));
        assert_eq!(
            cfg.sliding_window,
            SlidingWindow::Time(Duration::from_secs(30))
        );
        assert_eq!(
            cfg.wait_backoff,
            Some(WaitBackoff {
                multiplier: 2.0,
                max: Duration::from_secs(60)
            })
        );
        let count: SlidingWindow = serde_json::from_str(r#"{"count": 20}"#).unwrap();
        assert_eq!(count, SlidingWindow::Count(20));
        assert!(serde_json::from_str::<BreakerConfig>(r#"{"wait": "5s"}"#).is_err());
    }

    #[test]
    fn each_rule_names_its_field() {
        let d = BreakerConfig::default;
        assert_eq!(
            field_of(BreakerConfig {
                failure_threshold: None,
                failure_rate_threshold: None,
                ..d()
            }),
            "failure_threshold"
        );
        assert_eq!(
            field_of(BreakerConfig {
                failure_threshold: Some(0),
                ..d()
            }),
            "failure_threshold"
        );
        for bad in [0.0, -1.0, 100.5, f64::NAN] {
            assert_eq!(
                field_of(BreakerConfig {
                    failure_rate_threshold: Some(bad),
                    ..d()
                }),
                "failure_rate_threshold"
            );
            assert_eq!(
                field_of(BreakerConfig {
                    slow_call_rate_threshold: Some(bad),
                    ..d()
                }),
                "slow_call_rate_threshold"
            );
        }
        assert_eq!(
            field_of(BreakerConfig {
                slow_call_duration: Duration::ZERO,
                ..d()
            }),
            "slow_call_duration"
        );
        assert_eq!(
            field_of(BreakerConfig {
                sliding_window: SlidingWindow::Count(0),
                minimum_calls: 1,
                ..d()
            }),
            "sliding_window.count"
        );
        let err = BreakerConfig {
            sliding_window: SlidingWindow::Count(5),
            minimum_calls: 6,
            ..d()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "minimum_calls");
        assert_eq!(
            err.rule,
            "must be at most `sliding_window.count` (5), got 6"
        );
        for bad in [
            Duration::from_millis(1500),
            Duration::ZERO,
            Duration::from_secs(3601),
        ] {
            assert_eq!(
                field_of(BreakerConfig {
                    sliding_window: SlidingWindow::Time(bad),
                    ..d()
                }),
                "sliding_window.time"
            );
        }
        assert_eq!(
            field_of(BreakerConfig {
                minimum_calls: 0,
                ..d()
            }),
            "minimum_calls"
        );
        assert_eq!(
            field_of(BreakerConfig {
                wait_duration: Duration::ZERO,
                ..d()
            }),
            "wait_duration"
        );
        assert_eq!(
            field_of(BreakerConfig {
                wait_backoff: Some(WaitBackoff {
                    multiplier: 0.5,
                    ..WaitBackoff::default()
                }),
                ..d()
            }),
            "wait_backoff.multiplier"
        );
        assert_eq!(
            field_of(BreakerConfig {
                wait_backoff: Some(WaitBackoff {
                    max: Duration::from_secs(1),
                    ..WaitBackoff::default()
                }),
                ..d()
            }),
            "wait_backoff.max"
        );
        for bad in [0, MAX_PERMITTED_IN_HALF_OPEN + 1] {
            assert_eq!(
                field_of(BreakerConfig {
                    permitted_calls_in_half_open: bad,
                    ..d()
                }),
                "permitted_calls_in_half_open"
            );
        }
        assert_eq!(
            field_of(BreakerConfig {
                success_threshold: 0,
                ..d()
            }),
            "success_threshold"
        );
    }

    #[test]
    fn open_wait_grows_and_is_capped() {
        let s = Duration::from_secs;
        let mut cfg = BreakerConfig {
            wait_duration: s(10),
            ..BreakerConfig::default()
        };
        assert_eq!(cfg.open_wait(5), s(10), "no backoff: constant");
        cfg.wait_backoff = Some(WaitBackoff {
            multiplier: 1.5,
            max: s(30),
        });
        assert_eq!(cfg.open_wait(1), s(10));
        assert_eq!(cfg.open_wait(2), s(15));
        assert_eq!(cfg.open_wait(3), Duration::from_millis(22_500));
        assert_eq!(cfg.open_wait(4), s(30));
        assert_eq!(cfg.open_wait(u32::MAX), s(30));
    }
}
