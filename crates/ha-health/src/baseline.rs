//! Per-check latency and success statistics: the "normal" that anomaly rules compare against.
//!
//! A [`Baseline`] keeps three views of a check's recent results, each bounded:
//!
//! - **Latency percentiles** (p50/p95/p99) over a *time* window, from a ring of
//!   [`hdrhistogram`] histograms, one per slot of `percentile_window / percentile_slots`. A
//!   slot is cleared when the clock (the `now` passed in) reaches it again, so a quantile
//!   covers between `percentile_window - slot` and `percentile_window` of history, and old
//!   latencies age out even if the check runs rarely. Histograms keep 2 significant digits
//!   (1 % precision, plenty to compare against a factor like 2×) from 1 µs to 1 h; bigger
//!   values are clamped to 1 h.
//! - **EWMA** of latency with an exponentially weighted variance (Finch, "Incremental
//!   calculation of weighted mean and variance", 2009), for z-scores of a new latency.
//! - **The last `sample_window` results** (latency and pass/fail) in order, for the success
//!   rate, the current failure streak and the latency trend.
//!
//! Latency statistics (percentiles, EWMA, trend) use successful results only: a failure's
//! latency is a timeout or an instant "connection refused", which says nothing about how fast
//! the dependency answers when it works. The success rate uses every result.
//!
//! This is plain statistics, not machine learning: every number can be recomputed by hand.
//!
//! ```
//! use std::time::Duration;
//! use ha_health::baseline::{Baseline, BaselineConfig, Observation};
//! use tokio::time::Instant;
//!
//! let mut baseline = Baseline::new(BaselineConfig::default())?;
//! let start = Instant::now();
//! for i in 0..30u32 {
//!     let latency = Duration::from_millis(10 + u64::from(i % 5));
//!     baseline.record(start + Duration::from_secs(i.into()), Observation::success(latency));
//! }
//! let now = start + Duration::from_secs(30);
//! assert!(baseline.is_established());
//! let p95 = baseline.p95(now).unwrap();
//! assert!(p95 >= Duration::from_millis(13) && p95 <= Duration::from_millis(15));
//! assert_eq!(baseline.success_rate(), Some(1.0));
//! # Ok::<(), ha_health::Error>(())
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use ha_core::config::{self, ConfigError, Validate};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::time::Instant;

use crate::Error;

/// Highest latency a histogram tracks, in microseconds (1 h); larger values are clamped.
const HIGHEST_MICROS: u64 = 3_600_000_000;
/// Significant digits kept by the histograms: 1 % precision at ~27 KiB per slot.
const SIGNIFICANT_DIGITS: u8 = 2;

/// Settings of a [`Baseline`]. Durations are written the human way (`"5m"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BaselineConfig {
    /// How many recent results to keep for the success rate, failure streak and trend
    /// (default 100).
    pub sample_window: usize,
    /// Results needed before the baseline counts as established and anomaly rules may fire
    /// (default 20). At most `sample_window`.
    pub min_samples: usize,
    /// Weight of the newest latency in the EWMA, in `(0, 1]` (default 0.2: the last ~10
    /// results carry most of the weight).
    pub ewma_alpha: f64,
    /// How far back latency percentiles look (default 5 min).
    #[serde(with = "config::duration")]
    pub percentile_window: Duration,
    /// Into how many slots the percentile window is cut (default 5); more slots age data out
    /// more smoothly at the cost of one histogram each.
    pub percentile_slots: usize,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            sample_window: 100,
            min_samples: 20,
            ewma_alpha: 0.2,
            percentile_window: Duration::from_secs(300),
            percentile_slots: 5,
        }
    }
}

impl Validate for BaselineConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::at_least("min_samples", self.min_samples, 1)?;
        config::ensure(
            self.min_samples <= self.sample_window,
            "min_samples",
            || {
                format!(
                    "must be at most `sample_window` ({}), got {}",
                    self.sample_window, self.min_samples
                )
            },
        )?;
        config::ensure(
            self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0,
            "ewma_alpha",
            || format!("must be in (0, 1], got {}", self.ewma_alpha),
        )?;
        config::at_least("percentile_slots", self.percentile_slots, 1)?;
        config::positive("percentile_window", self.percentile_window)?;
        config::ensure(
            u32::try_from(self.percentile_slots)
                .is_ok_and(|n| !(self.percentile_window / n).is_zero()),
            "percentile_slots",
            || "must cut `percentile_window` into slots of at least 1ns".into(),
        )
    }
}

/// One result of a check, as the baseline sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Observation {
    /// How long the check took.
    pub latency: Duration,
    /// Whether it passed (a degraded result counts as passed).
    pub success: bool,
}

impl Observation {
    /// A passed check that took `latency`.
    pub const fn success(latency: Duration) -> Self {
        Self {
            latency,
            success: true,
        }
    }

    /// A failed check that took `latency`.
    pub const fn failure(latency: Duration) -> Self {
        Self {
            latency,
            success: false,
        }
    }
}

/// The recent statistics of one check. See the [module docs](self) for what each view covers.
#[derive(Debug, Clone)]
pub struct Baseline {
    config: BaselineConfig,
    recent: VecDeque<Observation>,
    successes_in_window: usize,
    failure_streak: u32,
    ewma: Option<Ewma>,
    ring: LatencyRing,
}

impl Baseline {
    /// An empty baseline; fails if `config` is invalid.
    pub fn new(config: BaselineConfig) -> Result<Self, Error> {
        config
            .validate()
            .map_err(|e| Error::config("baseline", e))?;
        let ring = LatencyRing::new(config.percentile_window, config.percentile_slots);
        Ok(Self {
            recent: VecDeque::with_capacity(config.sample_window.min(1024)),
            successes_in_window: 0,
            failure_streak: 0,
            ewma: None,
            ring,
            config,
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &BaselineConfig {
        &self.config
    }

    /// Adds the result of a check that finished at `now`.
    pub fn record(&mut self, now: Instant, observation: Observation) {
        if self.recent.len() >= self.config.sample_window
            && let Some(old) = self.recent.pop_front()
            && old.success
        {
            self.successes_in_window -= 1;
        }
        self.recent.push_back(observation);
        if observation.success {
            self.successes_in_window += 1;
            self.failure_streak = 0;
            let ms = duration_ms(observation.latency);
            match &mut self.ewma {
                Some(e) => e.update(ms, self.config.ewma_alpha),
                None => self.ewma = Some(Ewma::first(ms)),
            }
            self.ring.record(now, observation.latency);
        } else {
            self.failure_streak = self.failure_streak.saturating_add(1);
        }
    }

    /// Whether at least `min_samples` results are in the window, so anomaly rules may judge.
    pub fn is_established(&self) -> bool {
        self.recent.len() >= self.config.min_samples
    }

    /// How many results the window holds (at most `sample_window`).
    pub fn sample_count(&self) -> usize {
        self.recent.len()
    }

    /// The results in the window, oldest first.
    pub fn recent(&self) -> impl ExactSizeIterator<Item = &Observation> + DoubleEndedIterator {
        self.recent.iter()
    }

    /// The latency at quantile `q` (0.0..=1.0) of successful results in the percentile window
    /// ending at `now`; `None` if there are none.
    pub fn latency_quantile(&self, now: Instant, q: f64) -> Option<Duration> {
        self.ring.quantile(now, q)
    }

    /// The median latency (see [`latency_quantile`](Self::latency_quantile)).
    pub fn p50(&self, now: Instant) -> Option<Duration> {
        self.latency_quantile(now, 0.50)
    }

    /// The 95th-percentile latency.
    pub fn p95(&self, now: Instant) -> Option<Duration> {
        self.latency_quantile(now, 0.95)
    }

    /// The 99th-percentile latency.
    pub fn p99(&self, now: Instant) -> Option<Duration> {
        self.latency_quantile(now, 0.99)
    }

    /// The exponentially weighted moving average of successful latencies.
    pub fn ewma_latency(&self) -> Option<Duration> {
        self.ewma.map(|e| ms_to_duration(e.mean_ms))
    }

    /// The exponentially weighted standard deviation of successful latencies.
    pub fn ewma_std_dev(&self) -> Option<Duration> {
        self.ewma.map(|e| ms_to_duration(e.variance_ms2.sqrt()))
    }

    /// How many EWMA standard deviations `latency` lies above (positive) or below the EWMA.
    ///
    /// The standard deviation is floored at 1 % of the mean (and 1 µs): a perfectly steady
    /// check has none, and every microsecond of jitter would otherwise be infinitely unusual.
    pub fn z_score(&self, latency: Duration) -> Option<f64> {
        let e = self.ewma?;
        let std_dev = e.variance_ms2.sqrt().max(e.mean_ms * 0.01).max(0.001);
        Some((duration_ms(latency) - e.mean_ms) / std_dev)
    }

    /// The share of passed results in the window; `None` if it is empty.
    pub fn success_rate(&self) -> Option<f64> {
        (!self.recent.is_empty())
            .then(|| self.successes_in_window as f64 / self.recent.len() as f64)
    }

    /// The success rate the window would have after recording `latest` (the oldest result
    /// drops out when the window is full), without recording it.
    pub fn success_rate_with(&self, latest: &Observation) -> f64 {
        let mut ok = self.successes_in_window + usize::from(latest.success);
        let mut n = self.recent.len() + 1;
        if self.recent.len() >= self.config.sample_window
            && let Some(old) = self.recent.front()
        {
            ok -= usize::from(old.success);
            n -= 1;
        }
        ok as f64 / n as f64
    }

    /// Failed results in a row at the end of the window (0 if the last one passed).
    pub fn consecutive_failures(&self) -> u32 {
        self.failure_streak
    }
}

/// Exponentially weighted mean and variance, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Ewma {
    mean_ms: f64,
    variance_ms2: f64,
}

impl Ewma {
    fn first(x: f64) -> Self {
        Self {
            mean_ms: x,
            variance_ms2: 0.0,
        }
    }

    /// Finch (2009): `diff = x - mean; mean += α·diff; var = (1-α)(var + α·diff²)`.
    fn update(&mut self, x: f64, alpha: f64) {
        let diff = x - self.mean_ms;
        self.mean_ms += alpha * diff;
        self.variance_ms2 = (1.0 - alpha) * (self.variance_ms2 + alpha * diff * diff);
    }
}

/// A ring of per-slot latency histograms (microseconds), indexed by absolute slot number.
#[derive(Debug, Clone)]
struct LatencyRing {
    slots: Vec<Slot>,
    slot_len: Duration,
    origin: Option<Instant>,
    latest: u64,
}

#[derive(Debug, Clone)]
struct Slot {
    index: u64,
    histogram: Histogram<u64>,
}

impl LatencyRing {
    fn new(window: Duration, slots: usize) -> Self {
        let n = u32::try_from(slots).unwrap_or(u32::MAX);
        Self {
            slots: (0..slots)
                .map(|_| Slot {
                    index: 0,
                    histogram: empty_histogram(),
                })
                .collect(),
            slot_len: window / n,
            origin: None,
            latest: 0,
        }
    }

    fn slot_index(&self, now: Instant) -> u64 {
        let Some(origin) = self.origin else {
            return 0;
        };
        let n = now.saturating_duration_since(origin).as_nanos() / self.slot_len.as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    fn record(&mut self, now: Instant, latency: Duration) {
        if self.origin.is_none() {
            self.origin = Some(now);
        }
        // A `now` older than the newest slot goes into the newest slot: clearing the slot it
        // maps to would throw away newer data.
        let index = self.slot_index(now).max(self.latest);
        self.latest = index;
        let len = self.slots.len() as u64;
        let Some(slot) = self.slots.get_mut((index % len) as usize) else {
            return;
        };
        if slot.index != index {
            slot.histogram.reset();
            slot.index = index;
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        slot.histogram.saturating_record(micros.min(HIGHEST_MICROS));
    }

    fn quantile(&self, now: Instant, q: f64) -> Option<Duration> {
        let current = self.slot_index(now).max(self.latest);
        let len = self.slots.len() as u64;
        let mut merged = empty_histogram();
        for slot in &self.slots {
            let live = slot.index <= current && current - slot.index < len;
            if live && !slot.histogram.is_empty() {
                // Same bounds on both sides, so adding cannot fail.
                merged.add(&slot.histogram).ok()?;
            }
        }
        if merged.is_empty() {
            return None;
        }
        Some(Duration::from_micros(
            merged.value_at_quantile(q.clamp(0.0, 1.0)),
        ))
    }
}

fn empty_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low ≥ 1, high ≥ 2·low, 2 digits).
    Histogram::new_with_bounds(1, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Milliseconds back to a `Duration`, saturating: an absurd latency (say `Duration::MAX` from a
/// caller's sentinel) must not panic the baseline.
fn ms_to_duration(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(if ms > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn baseline(config: BaselineConfig) -> Baseline {
        Baseline::new(config).unwrap()
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut b = baseline(BaselineConfig::default());
        let t0 = Instant::now();
        // 1..=100 ms once each.
        for i in 1..=100 {
            b.record(t0 + ms(i), Observation::success(ms(i)));
        }
        let now = t0 + ms(200);
        let near = |got: Option<Duration>, want: u64| {
            let got = got.unwrap().as_secs_f64() * 1000.0;
            assert!(
                (got - want as f64).abs() <= want as f64 * 0.02,
                "{got} vs {want}"
            );
        };
        near(b.p50(now), 50);
        near(b.p95(now), 95);
        near(b.p99(now), 99);
    }

    #[test]
    fn old_slots_age_out_of_the_percentiles() {
        let mut b = baseline(BaselineConfig {
            percentile_window: Duration::from_secs(10),
            percentile_slots: 5,
            ..BaselineConfig::default()
        });
        let t0 = Instant::now();
        b.record(t0, Observation::success(ms(500)));
        b.record(t0 + ms(100), Observation::success(ms(500)));
        assert_eq!(
            // hdrhistogram answers the top of the 1 %-wide bucket.
            b.p50(t0 + Duration::from_secs(9))
                .map(|d| d.as_millis() / 10),
            Some(50)
        );
        // Ten seconds later the slot holding them is out of the window.
        assert_eq!(b.p50(t0 + Duration::from_secs(10)), None);
        b.record(t0 + Duration::from_secs(12), Observation::success(ms(5)));
        assert_eq!(
            b.p99(t0 + Duration::from_secs(12)).map(|d| d.as_millis()),
            Some(5)
        );
    }

    #[test]
    fn ewma_follows_finch_recurrence() {
        let mut b = baseline(BaselineConfig {
            ewma_alpha: 0.5,
            ..BaselineConfig::default()
        });
        let t0 = Instant::now();
        b.record(t0, Observation::success(ms(10)));
        b.record(t0, Observation::success(ms(20)));
        // mean = 10 + 0.5·10 = 15; var = 0.5·(0 + 0.5·100) = 25, std = 5.
        let mean = b.ewma_latency().unwrap().as_secs_f64() * 1000.0;
        let std = b.ewma_std_dev().unwrap().as_secs_f64() * 1000.0;
        assert!((mean - 15.0).abs() < 1e-9, "{mean}");
        assert!((std - 5.0).abs() < 1e-9, "{std}");
        assert!((b.z_score(ms(30)).unwrap() - 3.0).abs() < 1e-9);
        // Failures do not move latency statistics.
        b.record(t0, Observation::failure(Duration::from_secs(30)));
        assert!((b.ewma_latency().unwrap().as_secs_f64() * 1000.0 - 15.0).abs() < 1e-9);
    }

    #[test]
    fn success_rate_and_streak_over_the_window() {
        let mut b = baseline(BaselineConfig {
            sample_window: 4,
            min_samples: 4,
            ..BaselineConfig::default()
        });
        let t0 = Instant::now();
        assert_eq!(b.success_rate(), None);
        for ok in [true, true, false, false] {
            b.record(
                t0,
                Observation {
                    latency: ms(1),
                    success: ok,
                },
            );
        }
        assert!(b.is_established());
        assert_eq!(b.success_rate(), Some(0.5));
        assert_eq!(b.consecutive_failures(), 2);
        // A pass pushes the oldest pass out: 1 of 4.
        let next = Observation::failure(ms(1));
        assert_eq!(b.success_rate_with(&next), 0.25);
        b.record(t0, next);
        assert_eq!(b.success_rate(), Some(0.25));
        assert_eq!(b.sample_count(), 4);
        b.record(t0, Observation::success(ms(1)));
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[test]
    fn config_rules_name_the_field() {
        let ok = BaselineConfig::default();
        let field = |c: BaselineConfig| c.validate().unwrap_err().field;
        assert!(ok.validate().is_ok());
        assert_eq!(
            field(BaselineConfig {
                min_samples: 101,
                ..ok.clone()
            }),
            "min_samples"
        );
        assert_eq!(
            field(BaselineConfig {
                ewma_alpha: 0.0,
                ..ok.clone()
            }),
            "ewma_alpha"
        );
        assert_eq!(
            field(BaselineConfig {
                percentile_slots: 0,
                ..ok.clone()
            }),
            "percentile_slots"
        );
        let c: BaselineConfig =
            serde_json::from_str(r#"{"percentile_window": "1m", "min_samples": 5}"#).unwrap();
        assert_eq!(c.percentile_window, Duration::from_secs(60));
        assert_eq!(c.min_samples, 5);
        assert_eq!(c.sample_window, 100);
    }

    proptest! {
        #[test]
        fn window_is_bounded_and_rate_is_a_share(
            window in 1usize..30,
            results in proptest::collection::vec((0u64..2000, any::<bool>()), 0..100),
        ) {
            let mut b = baseline(BaselineConfig {
                sample_window: window,
                min_samples: 1,
                ..BaselineConfig::default()
            });
            let t0 = Instant::now();
            for (i, (latency, ok)) in results.iter().enumerate() {
                let obs = Observation { latency: ms(*latency), success: *ok };
                let predicted = b.success_rate_with(&obs);
                b.record(t0 + ms(i as u64 * 100), obs);
                prop_assert_eq!(b.success_rate(), Some(predicted));
            }
            prop_assert!(b.sample_count() <= window);
            let ok = b.recent().filter(|o| o.success).count();
            if let Some(rate) = b.success_rate() {
                prop_assert!((rate - ok as f64 / b.sample_count() as f64).abs() < 1e-12);
            }
            let streak = b.recent().rev().take_while(|o| !o.success).count();
            if streak < window {
                prop_assert_eq!(b.consecutive_failures() as usize, streak);
            }
        }

        #[test]
        fn ewma_stays_within_the_successful_latencies(
            latencies in proptest::collection::vec(0u64..10_000_000, 1..100),
            alpha in 0.01f64..=1.0,
        ) {
            let mut b = baseline(BaselineConfig { ewma_alpha: alpha, ..BaselineConfig::default() });
            let t0 = Instant::now();
            for l in &latencies {
                b.record(t0, Observation::success(Duration::from_micros(*l)));
                b.record(t0, Observation::failure(Duration::MAX));
            }
            let (lo, hi) = (latencies.iter().min().unwrap(), latencies.iter().max().unwrap());
            let mean = b.ewma_latency().unwrap();
            // One microsecond of slack for float rounding.
            prop_assert!(mean + Duration::from_micros(1) >= Duration::from_micros(*lo));
            prop_assert!(mean <= Duration::from_micros(*hi + 1));
            prop_assert!(b.z_score(Duration::MAX).unwrap().is_finite());
            // An absurd success does not panic either.
            b.record(t0, Observation::success(Duration::MAX));
            prop_assert!(b.ewma_latency().is_some() && b.p99(t0).is_some());
        }

        #[test]
        fn percentiles_are_ordered(latencies in proptest::collection::vec(1u64..100_000, 1..200)) {
            let mut b = baseline(BaselineConfig::default());
            let t0 = Instant::now();
            for l in &latencies {
                b.record(t0, Observation::success(Duration::from_micros(*l)));
            }
            let (p50, p95, p99) = (b.p50(t0).unwrap(), b.p95(t0).unwrap(), b.p99(t0).unwrap());
            prop_assert!(p50 <= p95 && p95 <= p99);
        }
    }
}
