//! Named anomaly rules: simple statistics that compare a check's latest result with its
//! [`Baseline`].
//!
//! An anomaly is reported, not acted on: it does not change a component's status (that is the
//! [`threshold`](crate::threshold) state machine's job); it becomes an
//! `HaEvent::AnomalyDetected` so people and dashboards see a dependency going bad before it
//! fails. Every rule is plain statistics — percentiles, an EWMA z-score, counts, a
//! least-squares slope — not machine learning, so every firing can be explained by hand.
//!
//! Rules judge the latest result *against the baseline before it*: call [`check`] (or
//! [`Rule::evaluate`]) first, then [`Baseline::record`] the result. Otherwise a slow result
//! would raise the p95 and the EWMA it is compared with. No rule fires until the baseline
//! [`is_established`](Baseline::is_established). A rule fires on every result for which its
//! condition holds; deduplication and rate limits belong to whoever publishes the events.
//!
//! ```
//! use std::time::Duration;
//! use ha_health::anomaly::{self, Rule};
//! use ha_health::baseline::{Baseline, BaselineConfig, Observation};
//! use tokio::time::Instant;
//!
//! let mut baseline = Baseline::new(BaselineConfig::default())?;
//! let now = Instant::now();
//! for _ in 0..50 {
//!     baseline.record(now, Observation::success(Duration::from_millis(10)));
//! }
//! let slow = Observation::success(Duration::from_millis(80));
//! let found = anomaly::check(&Rule::defaults(), &baseline, now, &slow);
//! let names: Vec<_> = found.iter().map(|a| a.rule).collect();
//! assert_eq!(names, ["latency_over_p95", "ewma_z_score"]);
//! # Ok::<(), ha_health::Error>(())
//! ```

use std::fmt;
use std::time::Duration;

use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;
use tokio::time::Instant;

use crate::baseline::{Baseline, Observation};

/// A rule fired: which, and what it saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    /// The rule's stable snake-case name, e.g. `latency_over_p95` (the `rule` metric label).
    pub rule: &'static str,
    /// What was observed, in words, with the numbers compared.
    pub detail: String,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.detail)
    }
}

/// One anomaly rule with its parameter. In config: `{"rule": "latency_over_p95", "factor": 2}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Rule {
    /// A successful result took more than `factor` × the baseline's p95 (default 2.0).
    LatencyOverP95 {
        /// Multiple of the p95 that counts as anomalous.
        #[serde(default = "default_p95_factor")]
        factor: f64,
        /// And by at least this much (default 1 ms), so sub-millisecond jitter of a fast check
        /// is not an anomaly.
        #[serde(default = "default_min_excess", with = "config::duration")]
        min_excess: Duration,
    },
    /// A successful result's latency is more than `z` EWMA standard deviations above the
    /// EWMA (default 3.0). See [`Baseline::z_score`] for the standard deviation's floor.
    EwmaZScore {
        /// The z-score threshold.
        #[serde(default = "default_z")]
        z: f64,
        /// And by at least this much above the EWMA (default 1 ms).
        #[serde(default = "default_min_excess", with = "config::duration")]
        min_excess: Duration,
    },
    /// The latest result failed and it is the `n`-th or later failure in a row (default 3).
    ConsecutiveFailures {
        /// Failures in a row, the latest included.
        #[serde(default = "default_failures")]
        n: u32,
    },
    /// The success rate over the window, the latest result included, is below `floor`
    /// (default 0.9).
    SuccessRateBelow {
        /// Lowest acceptable share of passed results, in `(0, 1]`.
        #[serde(default = "default_floor")]
        floor: f64,
    },
    /// Latency is rising across the window: the least-squares slope of successful latencies
    /// (in result order, the latest included) is positive *and* the median of the newest
    /// quarter is more than `factor` × the median of the oldest quarter (default 1.5). The
    /// slope alone fires on noise; medians (not means) keep one slow result at the end from
    /// looking like a trend — that is what the latency rules are for.
    Trend {
        /// How much slower the newest quarter must be than the oldest.
        #[serde(default = "default_trend_factor")]
        factor: f64,
        /// And by at least this much (default 1 ms).
        #[serde(default = "default_min_excess", with = "config::duration")]
        min_excess: Duration,
    },
}

fn default_p95_factor() -> f64 {
    2.0
}
fn default_z() -> f64 {
    3.0
}
fn default_failures() -> u32 {
    3
}
fn default_floor() -> f64 {
    0.9
}
fn default_trend_factor() -> f64 {
    1.5
}
fn default_min_excess() -> Duration {
    Duration::from_millis(1)
}

impl Rule {
    /// Every rule with its default parameter.
    pub fn defaults() -> Vec<Rule> {
        vec![
            Rule::LatencyOverP95 {
                factor: default_p95_factor(),
                min_excess: default_min_excess(),
            },
            Rule::EwmaZScore {
                z: default_z(),
                min_excess: default_min_excess(),
            },
            Rule::ConsecutiveFailures {
                n: default_failures(),
            },
            Rule::SuccessRateBelow {
                floor: default_floor(),
            },
            Rule::Trend {
                factor: default_trend_factor(),
                min_excess: default_min_excess(),
            },
        ]
    }

    /// The rule's stable snake-case name, as in [`Anomaly::rule`] and in config.
    pub const fn name(&self) -> &'static str {
        match self {
            Rule::LatencyOverP95 { .. } => "latency_over_p95",
            Rule::EwmaZScore { .. } => "ewma_z_score",
            Rule::ConsecutiveFailures { .. } => "consecutive_failures",
            Rule::SuccessRateBelow { .. } => "success_rate_below",
            Rule::Trend { .. } => "trend",
        }
    }

    /// Judges `latest` (finished at `now`, not yet recorded) against `baseline`.
    pub fn evaluate(
        &self,
        baseline: &Baseline,
        now: Instant,
        latest: &Observation,
    ) -> Option<Anomaly> {
        if !baseline.is_established() {
            return None;
        }
        let fired = |detail: String| {
            Some(Anomaly {
                rule: self.name(),
                detail,
            })
        };
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        match *self {
            Rule::LatencyOverP95 { factor, min_excess } => {
                let p95 = baseline.p95(now)?;
                if latest.success
                    && ms(latest.latency) > factor * ms(p95)
                    && latest.latency.saturating_sub(p95) >= min_excess
                {
                    return fired(format!(
                        "latency {:.1} ms is over {factor} × p95 ({:.1} ms)",
                        ms(latest.latency),
                        ms(p95)
                    ));
                }
                None
            }
            Rule::EwmaZScore { z, min_excess } => {
                let score = baseline.z_score(latest.latency)?;
                let mean = baseline.ewma_latency()?;
                if latest.success && score > z && latest.latency.saturating_sub(mean) >= min_excess
                {
                    let mean = ms(mean);
                    return fired(format!(
                        "latency {:.1} ms is {score:.1} standard deviations above the EWMA \
                         ({mean:.1} ms), limit {z}",
                        ms(latest.latency)
                    ));
                }
                None
            }
            Rule::ConsecutiveFailures { n } => {
                let streak = baseline.consecutive_failures().saturating_add(1);
                if !latest.success && streak >= n {
                    return fired(format!("{streak} failures in a row (limit {n})"));
                }
                None
            }
            Rule::SuccessRateBelow { floor } => {
                let rate = baseline.success_rate_with(latest);
                if rate < floor {
                    return fired(format!(
                        "success rate {:.1} % over the last results is below {:.1} %",
                        rate * 100.0,
                        floor * 100.0
                    ));
                }
                None
            }
            Rule::Trend { factor, min_excess } => {
                let series: Vec<f64> = baseline
                    .recent()
                    .chain(std::iter::once(latest))
                    .filter(|o| o.success)
                    .map(|o| ms(o.latency))
                    .collect();
                let (slope, first, last) = trend(&series)?;
                if slope > 0.0 && last > factor * first && last - first >= ms(min_excess) {
                    return fired(format!(
                        "latency rising: {slope:.3} ms per result, median of the newest quarter \
                         {last:.1} ms vs {first:.1} ms for the oldest (limit {factor} ×)"
                    ));
                }
                None
            }
        }
    }
}

impl Validate for Rule {
    fn validate(&self) -> Result<(), ConfigError> {
        let finite_positive = |field: &str, v: f64| {
            config::ensure(v.is_finite() && v > 0.0, field, || {
                format!("must be a finite number greater than zero, got {v}")
            })
        };
        let result = match *self {
            Rule::LatencyOverP95 { factor, .. } | Rule::Trend { factor, .. } => {
                finite_positive("factor", factor)
            }
            Rule::EwmaZScore { z, .. } => finite_positive("z", z),
            Rule::ConsecutiveFailures { n } => config::at_least("n", n, 1),
            Rule::SuccessRateBelow { floor } => {
                config::ensure(floor > 0.0 && floor <= 1.0, "floor", || {
                    format!("must be in (0, 1], got {floor}")
                })
            }
        };
        result.map_err(|e| e.within(self.name()))
    }
}

/// Runs every rule in `rules`; returns those that fired, in rule order.
pub fn check(
    rules: &[Rule],
    baseline: &Baseline,
    now: Instant,
    latest: &Observation,
) -> Vec<Anomaly> {
    rules
        .iter()
        .filter_map(|r| r.evaluate(baseline, now, latest))
        .collect()
}

/// Least-squares slope of `ys` against their index, and the medians of the oldest and newest
/// quarters; `None` with fewer than 4 points (a quarter must hold one).
fn trend(ys: &[f64]) -> Option<(f64, f64, f64)> {
    let n = ys.len();
    if n < 4 {
        return None;
    }
    let nf = n as f64;
    let mean_x = (nf - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / nf;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
    }
    let quarter = n / 4;
    Some((
        sxy / sxx,
        median(&ys[..quarter]),
        median(&ys[n - quarter..]),
    ))
}

/// The median of a non-empty slice (mean of the middle two for an even length).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::BaselineConfig;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn steady(n: usize, latency: Duration) -> (Baseline, Instant) {
        let mut b = Baseline::new(BaselineConfig::default()).unwrap();
        let now = Instant::now();
        for _ in 0..n {
            b.record(now, Observation::success(latency));
        }
        (b, now)
    }

    fn fired(rule: Rule, b: &Baseline, now: Instant, latest: Observation) -> bool {
        rule.evaluate(b, now, &latest).is_some()
    }

    #[test]
    fn nothing_fires_before_the_baseline_is_established() {
        let (b, now) = steady(19, ms(10));
        let awful = Observation::failure(Duration::from_secs(60));
        assert!(check(&Rule::defaults(), &b, now, &awful).is_empty());
    }

    #[test]
    fn sub_millisecond_jitter_is_not_an_anomaly() {
        let us = Duration::from_micros;
        let mut b = Baseline::new(BaselineConfig::default()).unwrap();
        let now = Instant::now();
        for i in 0..30 {
            b.record(now, Observation::success(us(100 + (i % 3) * 10)));
        }
        // 0.9 ms is 7 × the p95 and far above the EWMA, yet only 0.8 ms slower: noise.
        assert!(check(&Rule::defaults(), &b, now, &Observation::success(us(900))).is_empty());
        let found = check(&Rule::defaults(), &b, now, &Observation::success(us(2500)));
        assert_eq!(found[0].rule, "latency_over_p95", "{found:?}");
    }

    #[test]
    fn latency_over_p95() {
        let (b, now) = steady(30, ms(10));
        let rule = Rule::LatencyOverP95 {
            factor: 2.0,
            min_excess: ms(1),
        };
        assert!(!fired(rule.clone(), &b, now, Observation::success(ms(19))));
        let a = rule
            .evaluate(&b, now, &Observation::success(ms(25)))
            .unwrap();
        assert_eq!(a.rule, "latency_over_p95");
        assert!(a.detail.contains("25.0 ms"), "{a}");
        // A slow failure is the failure rules' business.
        assert!(!fired(rule, &b, now, Observation::failure(ms(25))));
    }

    #[test]
    fn ewma_z_score() {
        let mut b = Baseline::new(BaselineConfig {
            ewma_alpha: 0.5,
            ..BaselineConfig::default()
        })
        .unwrap();
        let now = Instant::now();
        for i in 0..40 {
            b.record(
                now,
                Observation::success(ms(if i % 2 == 0 { 10 } else { 20 })),
            );
        }
        let z = Rule::EwmaZScore {
            z: 3.0,
            min_excess: ms(1),
        };
        assert!(!fired(z.clone(), &b, now, Observation::success(ms(20))));
        assert!(fired(z, &b, now, Observation::success(ms(60))));
    }

    #[test]
    fn consecutive_failures_counts_the_latest() {
        let (mut b, now) = steady(30, ms(10));
        let rule = Rule::ConsecutiveFailures { n: 3 };
        let fail = Observation::failure(ms(10));
        assert!(!fired(rule.clone(), &b, now, fail));
        b.record(now, fail);
        assert!(!fired(rule.clone(), &b, now, fail));
        b.record(now, fail);
        let a = rule.evaluate(&b, now, &fail).unwrap();
        assert_eq!(a.detail, "3 failures in a row (limit 3)");
        assert!(!fired(rule, &b, now, Observation::success(ms(10))));
    }

    #[test]
    fn success_rate_below_floor() {
        let (mut b, now) = steady(20, ms(10));
        let rule = Rule::SuccessRateBelow { floor: 0.9 };
        let fail = Observation::failure(ms(10));
        // 20 passes + the 2nd failure: 20/22 = 0.909; the 3rd: 20/23 = 0.87.
        b.record(now, fail);
        assert!(!fired(rule.clone(), &b, now, fail));
        b.record(now, fail);
        assert!(fired(rule, &b, now, fail));
    }

    #[test]
    fn trend_needs_a_rising_slope_and_a_slower_newest_quarter() {
        let now = Instant::now();
        let rule = Rule::Trend {
            factor: 1.5,
            min_excess: ms(1),
        };
        // Rising from 10 ms to 29 ms over 20 results: fires.
        let mut rising = Baseline::new(BaselineConfig::default()).unwrap();
        for i in 0..20 {
            rising.record(now, Observation::success(ms(10 + i)));
        }
        let a = rule
            .evaluate(&rising, now, &Observation::success(ms(30)))
            .unwrap();
        assert_eq!(a.rule, "trend");
        // One slow result after a flat history is not a trend.
        let (steady, _) = steady(40, ms(10));
        assert!(!fired(
            rule.clone(),
            &steady,
            now,
            Observation::success(ms(80))
        ));
        // Noisy but flat: does not fire.
        let mut flat = Baseline::new(BaselineConfig::default()).unwrap();
        for i in 0..40 {
            flat.record(
                now,
                Observation::success(ms(if i % 3 == 0 { 30 } else { 10 })),
            );
        }
        assert!(!fired(
            rule.clone(),
            &flat,
            now,
            Observation::success(ms(10))
        ));
        // Falling: does not fire.
        let mut falling = Baseline::new(BaselineConfig::default()).unwrap();
        for i in 0..20 {
            falling.record(now, Observation::success(ms(40 - i)));
        }
        assert!(!fired(rule, &falling, now, Observation::success(ms(20))));
    }

    #[test]
    fn trend_slope_is_least_squares() {
        let (slope, first, last) = trend(&[1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0]).unwrap();
        assert!((slope - 2.0).abs() < 1e-12);
        assert_eq!((first, last), (2.0, 14.0));
        assert_eq!(trend(&[1.0, 2.0, 3.0]), None);
    }

    proptest::proptest! {
        #[test]
        fn no_rule_fires_before_the_baseline_is_established(
            min_samples in 1usize..30,
            history in proptest::collection::vec((0u64..5000, proptest::bool::ANY), 0..30),
            latest in (0u64..1_000_000, proptest::bool::ANY),
        ) {
            let mut b = Baseline::new(BaselineConfig { min_samples, ..BaselineConfig::default() })
                .unwrap();
            let now = Instant::now();
            for (latency, success) in history.iter().take(min_samples - 1) {
                b.record(now, Observation { latency: ms(*latency), success: *success });
            }
            let latest = Observation { latency: ms(latest.0), success: latest.1 };
            proptest::prop_assert!(check(&Rule::defaults(), &b, now, &latest).is_empty());
        }
    }

    #[test]
    fn rules_deserialize_by_name_with_defaults_and_validate() {
        let rules: Vec<Rule> = serde_json::from_str(
            r#"[{"rule": "latency_over_p95", "factor": 3},
                {"rule": "ewma_z_score"},
                {"rule": "consecutive_failures", "n": 5},
                {"rule": "success_rate_below", "floor": 0.99},
                {"rule": "trend"}]"#,
        )
        .unwrap();
        assert_eq!(
            rules[0],
            Rule::LatencyOverP95 {
                factor: 3.0,
                min_excess: ms(1)
            }
        );
        assert_eq!(
            rules[1],
            Rule::EwmaZScore {
                z: 3.0,
                min_excess: ms(1)
            }
        );
        assert_eq!(
            rules[4],
            Rule::Trend {
                factor: 1.5,
                min_excess: ms(1)
            }
        );
        for (rule, default) in rules.iter().zip(Rule::defaults()) {
            assert_eq!(rule.name(), default.name());
            assert!(rule.validate().is_ok());
        }
        let err = Rule::SuccessRateBelow { floor: 1.5 }
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "success_rate_below.floor");
    }
}
