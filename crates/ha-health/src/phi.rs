//! The phi-accrual failure detector: how suspicious is the silence since the last heartbeat?
//!
//! This follows Hayashibara et al., "The φ Accrual Failure Detector" (2004), as Akka implements
//! it (`akka.remote.PhiAccrualFailureDetector`): the detector keeps a bounded window of the
//! intervals between heartbeats, models them as a normal distribution and reports
//! `φ = -log10(P(a heartbeat arrives later than now))`. φ = 1 means a 10 % chance that the
//! peer is still alive and merely late, φ = 3 a 0.1 % chance, φ = 8 one in 10⁸.
//!
//! Like Akka, the normal CDF is approximated by the logistic function
//! `1 / (1 + e^(-y (1.5976 + 0.070566 y²)))` with `y = (t - mean) / std_dev`, where `mean` has the
//! acceptable heartbeat pause added and `std_dev` is floored at `min_std_deviation`.
//!
//! The detector is a pure state machine: every method takes `now`, nothing reads a clock, so
//! tests are deterministic and the scheduler can drive it with `tokio::time`'s pausable clock.
//!
//! ```
//! use std::time::Duration;
//! use ha_health::phi::{PhiAccrualDetector, PhiConfig, Suspicion};
//! use tokio::time::Instant;
//!
//! let mut detector = PhiAccrualDetector::new(PhiConfig::default()).unwrap();
//! let start = Instant::now();
//! let second = Duration::from_secs(1);
//! for i in 0..10 {
//!     detector.heartbeat(start + second * i);
//! }
//! let last = start + second * 9;
//! assert_eq!(detector.state(last + Duration::from_millis(500)), Suspicion::Available);
//! assert_eq!(detector.state(last + Duration::from_secs(30)), Suspicion::Failed);
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;
use tokio::time::Instant;

use crate::Error;

/// Settings of a [`PhiAccrualDetector`]. Durations are written the human way (`"100ms"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhiConfig {
    /// φ at and above which the peer is considered failed (default 8.0, Akka's default: one
    /// chance in 10⁸ of a false positive under the model).
    pub threshold: f64,
    /// φ at and above which the peer is suspected, an early warning below `threshold`
    /// (default 3.0: one chance in a thousand that a heartbeat this late is normal).
    pub suspect_threshold: f64,
    /// How many inter-arrival intervals to keep (default 1000, at most 2²⁰); older ones are
    /// dropped.
    pub max_sample_size: usize,
    /// Floor for the standard deviation (default 100 ms), so that very regular heartbeats do
    /// not make a slightly late one look like a failure.
    #[serde(with = "config::duration")]
    pub min_std_deviation: Duration,
    /// Extra silence tolerated on top of the mean interval (default 0 s). Akka's generic
    /// default is 0; its cluster and remote-watch detectors set seconds here to ride out GC
    /// pauses and network blips. Set it to the longest pause a healthy peer can take.
    #[serde(with = "config::duration")]
    pub acceptable_heartbeat_pause: Duration,
    /// Expected interval before any has been measured (default 1 s). The history starts with
    /// two intervals around it (± a quarter), as Akka does, so φ is meaningful from the second
    /// heartbeat on.
    #[serde(with = "config::duration")]
    pub first_heartbeat_estimate: Duration,
}

impl Default for PhiConfig {
    fn default() -> Self {
        Self {
            threshold: 8.0,
            suspect_threshold: 3.0,
            max_sample_size: 1000,
            min_std_deviation: Duration::from_millis(100),
            acceptable_heartbeat_pause: Duration::ZERO,
            first_heartbeat_estimate: Duration::from_secs(1),
        }
    }
}

impl Validate for PhiConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::ensure(
            self.threshold.is_finite() && self.threshold > 0.0,
            "threshold",
            || {
                format!(
                    "must be a finite number greater than zero, got {}",
                    self.threshold
                )
            },
        )?;
        config::ensure(
            self.suspect_threshold.is_finite()
                && self.suspect_threshold > 0.0
                && self.suspect_threshold < self.threshold,
            "suspect_threshold",
            || {
                format!(
                    "must be greater than zero and less than `threshold` ({}), got {}",
                    self.threshold, self.suspect_threshold
                )
            },
        )?;
        config::ensure(
            (1..=MAX_SAMPLE_SIZE).contains(&self.max_sample_size),
            "max_sample_size",
            || {
                format!(
                    "must be between 1 and {MAX_SAMPLE_SIZE}, got {}",
                    self.max_sample_size
                )
            },
        )?;
        config::positive("min_std_deviation", self.min_std_deviation)?;
        config::positive("first_heartbeat_estimate", self.first_heartbeat_estimate)
    }
}

/// What the detector thinks of the peer at some instant, from least to most alarming.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Suspicion {
    /// φ is below the suspect threshold.
    Available,
    /// φ is at or above the suspect threshold but below the failure threshold.
    Suspected,
    /// φ is at or above the failure threshold.
    Failed,
}

impl Suspicion {
    /// A stable lower-case name, used in logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Suspicion::Available => "available",
            Suspicion::Suspected => "suspected",
            Suspicion::Failed => "failed",
        }
    }
}

impl fmt::Display for Suspicion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// φ for a silence of `elapsed_ms` when intervals are normal with `mean_ms` and `std_dev_ms`.
///
/// This is Akka's formula, `-log10(1 - F(elapsed))` with the logistic approximation `F` of the
/// normal CDF. Akka evaluates it in two branches (`elapsed > mean` or not) to limit rounding;
/// both equal `softplus(x) / ln 10` with `x = y (1.5976 + 0.070566 y²)`, which is computed here
/// in the stable form, so φ stays finite (and keeps growing) far in the tail where Akka's
/// branch reaches `-log10(0) = ∞`.
pub fn phi(elapsed_ms: f64, mean_ms: f64, std_dev_ms: f64) -> f64 {
    let y = (elapsed_ms - mean_ms) / std_dev_ms;
    let x = y * (1.5976 + 0.070566 * y * y);
    // softplus(x) = ln(1 + e^x), without overflow for large |x|.
    let softplus = if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    };
    softplus / std::f64::consts::LN_10
}

/// A phi-accrual failure detector for one peer (one heartbeat source).
#[derive(Debug, Clone)]
pub struct PhiAccrualDetector {
    config: PhiConfig,
    history: History,
    last: Option<Instant>,
}

impl PhiAccrualDetector {
    /// A detector that has seen no heartbeat yet; fails if `config` is invalid.
    pub fn new(config: PhiConfig) -> Result<Self, Error> {
        config
            .validate()
            .map_err(|e| Error::config("phi accrual", e))?;
        let history = History::seeded(&config);
        Ok(Self {
            config,
            history,
            last: None,
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &PhiConfig {
        &self.config
    }

    /// Records a heartbeat that arrived at `now`.
    ///
    /// As in Akka, the interval that ends a silence long enough to count as failed is not
    /// added to the history: one long outage would otherwise widen the distribution and make
    /// the detector slow to notice the next one. A `now` earlier than the last heartbeat counts
    /// as an interval of zero.
    pub fn heartbeat(&mut self, now: Instant) {
        if let Some(last) = self.last
            && self.is_available(now)
        {
            self.history.push(now.saturating_duration_since(last));
        }
        self.last = Some(match self.last {
            Some(last) if last > now => last,
            _ => now,
        });
    }

    /// φ at `now`: 0 before the first heartbeat (an unobserved peer is not suspected, as in
    /// Akka), then growing with the time since the last heartbeat.
    pub fn phi(&self, now: Instant) -> f64 {
        let Some(last) = self.last else {
            return 0.0;
        };
        let elapsed = now.saturating_duration_since(last);
        let mean = self.history.mean_ms() + duration_ms(self.config.acceptable_heartbeat_pause);
        let std_dev = self
            .history
            .std_dev_ms()
            .max(duration_ms(self.config.min_std_deviation));
        phi(duration_ms(elapsed), mean, std_dev)
    }

    /// Whether φ at `now` is below the failure threshold (Akka's `isAvailable`).
    pub fn is_available(&self, now: Instant) -> bool {
        self.phi(now) < self.config.threshold
    }

    /// The suspicion level at `now`. As time passes without a heartbeat it only rises, and it
    /// passes through [`Suspicion::Suspected`] before [`Suspicion::Failed`].
    pub fn state(&self, now: Instant) -> Suspicion {
        let phi = self.phi(now);
        if phi >= self.config.threshold {
            Suspicion::Failed
        } else if phi >= self.config.suspect_threshold {
            Suspicion::Suspected
        } else {
            Suspicion::Available
        }
    }

    /// When the last heartbeat arrived, if any has.
    pub fn last_heartbeat(&self) -> Option<Instant> {
        self.last
    }

    /// How many intervals the window holds (at most `max_sample_size`).
    pub fn sample_count(&self) -> usize {
        self.history.intervals.len()
    }

    /// Mean of the intervals in the window, in milliseconds (without the acceptable pause).
    pub fn mean_interval_ms(&self) -> f64 {
        self.history.mean_ms()
    }

    /// Standard deviation of the intervals in the window, in milliseconds (before the floor).
    pub fn std_dev_interval_ms(&self) -> f64 {
        self.history.std_dev_ms()
    }
}

/// Longest interval recorded, in microseconds (2⁴⁰ µs ≈ 12.7 days).
const MAX_INTERVAL_MICROS: u64 = 1 << 40;
/// Largest allowed `max_sample_size` (2²⁰), which keeps the window's integer sums in range.
const MAX_SAMPLE_SIZE: usize = 1 << 20;

/// The sliding window of intervals, with running sums so mean and variance cost O(1).
///
/// Sums are integers (microseconds, `u128`) rather than floats: a detector runs for months,
/// and adding and subtracting floats that long lets the variance drift, even below zero.
#[derive(Debug, Clone)]
struct History {
    max: usize,
    intervals: VecDeque<u64>,
    sum: u128,
    sum_sq: u128,
}

impl History {
    /// Akka's seed: two intervals at `estimate ± estimate/4`, so mean = estimate and the
    /// standard deviation is a quarter of it.
    fn seeded(config: &PhiConfig) -> Self {
        let mut h = Self {
            max: config.max_sample_size,
            intervals: VecDeque::with_capacity(config.max_sample_size.min(1024)),
            sum: 0,
            sum_sq: 0,
        };
        let estimate = config.first_heartbeat_estimate;
        h.push(estimate.saturating_sub(estimate / 4));
        h.push(estimate + estimate / 4);
        h
    }

    fn push(&mut self, interval: Duration) {
        // Capped at ~12.7 days, so with at most 2²⁰ samples `n · Σx²` stays below 2¹²⁰ and the
        // integer sums cannot overflow; a longer gap is a failure whatever its exact length.
        let micros = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .min(MAX_INTERVAL_MICROS);
        if self.intervals.len() >= self.max
            && let Some(old) = self.intervals.pop_front()
        {
            self.sum -= u128::from(old);
            self.sum_sq -= u128::from(old) * u128::from(old);
        }
        self.intervals.push_back(micros);
        self.sum += u128::from(micros);
        self.sum_sq += u128::from(micros) * u128::from(micros);
    }

    fn mean_ms(&self) -> f64 {
        if self.intervals.is_empty() {
            return 0.0;
        }
        self.sum as f64 / self.intervals.len() as f64 / 1000.0
    }

    fn std_dev_ms(&self) -> f64 {
        let n = self.intervals.len() as u128;
        if n == 0 {
            return 0.0;
        }
        // n² · variance = n · Σx² − (Σx)², exact in integers; never negative.
        let scaled = (n * self.sum_sq).saturating_sub(self.sum * self.sum);
        (scaled as f64).sqrt() / n as f64 / 1000.0
    }
}

fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn millis(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn detector(config: PhiConfig) -> PhiAccrualDetector {
        PhiAccrualDetector::new(config).unwrap()
    }

    /// Akka's `PhiAccrualFailureDetectorSpec` "must return realistic phi values": mean 1000 ms,
    /// std 100 ms. The constants were computed by hand from the two-branch formula.
    #[test]
    fn phi_matches_akka_formula_values() {
        let cases = [
            (0.0, 0.0),
            (500.0, 0.0),
            (900.0, 0.075_033),
            (1000.0, std::f64::consts::LOG10_2), // -log10(0.5) = 0.301030: at the mean, a coin flip
            (1100.0, 0.799_508),
            (1200.0, 1.642_828),
            (1300.0, 2.909_475),
            (1400.0, 4.736_695),
            (1600.0, 10.782_601),
            (1700.0, 15.368_526),
        ];
        for (t, expected) in cases {
            let got = phi(t, 1000.0, 100.0);
            assert!(
                (got - expected).abs() < 1e-3,
                "phi({t}) = {got}, want {expected}"
            );
            // And the stable form agrees with Akka's two-branch form.
            let y = (t - 1000.0) / 100.0;
            let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
            let akka = if t > 1000.0 {
                -(e / (1.0 + e)).log10()
            } else {
                -(1.0 - 1.0 / (1.0 + e)).log10()
            };
            assert!((got - akka).abs() < 1e-9, "t={t}: {got} vs {akka}");
        }
    }

    #[test]
    fn phi_stays_finite_far_in_the_tail() {
        let far = phi(100_000.0, 1000.0, 100.0);
        assert!(far.is_finite() && far > 1e6, "{far}");
    }

    #[test]
    fn detector_uses_the_window_mean_and_std_dev() {
        // A window of two holds exactly 900 ms and 1100 ms: mean 1000, std 100.
        let mut d = detector(PhiConfig {
            max_sample_size: 2,
            ..PhiConfig::default()
        });
        let t0 = Instant::now();
        d.heartbeat(t0);
        d.heartbeat(t0 + millis(900));
        d.heartbeat(t0 + millis(2000));
        assert_eq!(d.sample_count(), 2);
        assert!((d.mean_interval_ms() - 1000.0).abs() < 1e-9);
        assert!((d.std_dev_interval_ms() - 100.0).abs() < 1e-9);
        let last = t0 + millis(2000);
        assert!((d.phi(last + millis(1000)) - std::f64::consts::LOG10_2).abs() < 1e-3);
        assert!((d.phi(last + millis(1200)) - 1.642_828).abs() < 1e-3);
        assert_eq!(d.state(last + millis(1200)), Suspicion::Available);
        assert_eq!(d.state(last + millis(1300)), Suspicion::Available); // 2.91 < 3
        assert_eq!(d.state(last + millis(1400)), Suspicion::Suspected); // 4.74
        assert_eq!(d.state(last + millis(1600)), Suspicion::Failed); // 10.78
        assert!(!d.is_available(last + millis(1600)));
    }

    #[test]
    fn seed_history_is_the_first_estimate_plus_minus_a_quarter() {
        let d = detector(PhiConfig::default());
        assert_eq!(d.sample_count(), 2);
        assert!((d.mean_interval_ms() - 1000.0).abs() < 1e-9);
        assert!((d.std_dev_interval_ms() - 250.0).abs() < 1e-9);
        // Before the first heartbeat nothing is suspected.
        assert_eq!(d.phi(Instant::now() + Duration::from_secs(3600)), 0.0);
    }

    #[test]
    fn acceptable_pause_shifts_the_mean() {
        let t0 = Instant::now();
        let mut plain = detector(PhiConfig::default());
        let mut paused = detector(PhiConfig {
            acceptable_heartbeat_pause: Duration::from_secs(3),
            ..PhiConfig::default()
        });
        for d in [&mut plain, &mut paused] {
            d.heartbeat(t0);
        }
        let later = t0 + Duration::from_secs(4);
        assert_eq!(plain.state(later), Suspicion::Failed);
        assert_eq!(paused.state(later), Suspicion::Available);
        assert!((paused.phi(later) - plain.phi(t0 + Duration::from_secs(1))).abs() < 1e-9);
    }

    #[test]
    fn the_heartbeat_ending_a_failure_is_not_recorded() {
        let t0 = Instant::now();
        let mut d = detector(PhiConfig::default());
        d.heartbeat(t0);
        d.heartbeat(t0 + Duration::from_secs(60));
        assert_eq!(d.sample_count(), 2);
        assert_eq!(d.state(t0 + Duration::from_secs(60)), Suspicion::Available);
    }

    #[test]
    fn config_rules_name_the_field() {
        let bad = |c: PhiConfig| c.validate().unwrap_err().field;
        let ok = PhiConfig::default();
        assert!(ok.validate().is_ok());
        assert_eq!(
            bad(PhiConfig {
                threshold: 0.0,
                ..ok.clone()
            }),
            "threshold"
        );
        assert_eq!(
            bad(PhiConfig {
                suspect_threshold: 8.0,
                ..ok.clone()
            }),
            "suspect_threshold"
        );
        assert_eq!(
            bad(PhiConfig {
                max_sample_size: 0,
                ..ok.clone()
            }),
            "max_sample_size"
        );
        assert_eq!(
            bad(PhiConfig {
                min_std_deviation: Duration::ZERO,
                ..ok.clone()
            }),
            "min_std_deviation"
        );
        assert_eq!(
            bad(PhiConfig {
                max_sample_size: MAX_SAMPLE_SIZE + 1,
                ..ok.clone()
            }),
            "max_sample_size"
        );
        let err = PhiAccrualDetector::new(PhiConfig {
            threshold: f64::NAN,
            ..ok
        })
        .unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("`threshold`"), "{err}");
    }

    #[test]
    fn config_deserializes_human_durations_with_defaults() {
        let c: PhiConfig = serde_json::from_str(
            r#"{"threshold": 10, "acceptable_heartbeat_pause": "3s", "min_std_deviation": "50ms"}"#,
        )
        .unwrap();
        assert_eq!(c.threshold, 10.0);
        assert_eq!(c.acceptable_heartbeat_pause, Duration::from_secs(3));
        assert_eq!(c.min_std_deviation, Duration::from_millis(50));
        assert_eq!(c.max_sample_size, 1000);
    }

    fn intervals() -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::vec(1u64..3000, 1..60)
    }

    fn fed(intervals: &[u64], max: usize) -> (PhiAccrualDetector, Instant) {
        let mut d = detector(PhiConfig {
            max_sample_size: max,
            ..PhiConfig::default()
        });
        let mut t = Instant::now();
        d.heartbeat(t);
        for ms in intervals {
            t += millis(*ms);
            d.heartbeat(t);
        }
        (d, t)
    }

    proptest! {
        #[test]
        fn phi_never_decreases_while_silent(
            history in intervals(),
            a in 0u64..20_000,
            b in 0u64..20_000,
        ) {
            let (d, last) = fed(&history, 1000);
            let (early, late) = (a.min(b), a.max(b));
            prop_assert!(d.phi(last + millis(early)) <= d.phi(last + millis(late)));
        }

        #[test]
        fn window_is_bounded(history in intervals(), max in 1usize..20) {
            let (d, _) = fed(&history, max);
            prop_assert!(d.sample_count() <= max);
            prop_assert!(d.std_dev_interval_ms() >= 0.0);
        }

        #[test]
        fn suspected_comes_strictly_before_failed(history in intervals()) {
            let (d, last) = fed(&history, 1000);
            let mut seen = Suspicion::Available;
            let mut was_suspected = false;
            let mut ms = 0u64;
            while seen != Suspicion::Failed {
                let now = d.state(last + millis(ms));
                prop_assert!(now >= seen, "went back from {seen} to {now} at {ms} ms");
                if now == Suspicion::Suspected {
                    was_suspected = true;
                }
                if now == Suspicion::Failed {
                    prop_assert!(was_suspected, "failed at {ms} ms without being suspected");
                }
                seen = now;
                ms += 1;
                prop_assert!(ms < 3_600_000, "never failed");
            }
        }
    }
}
