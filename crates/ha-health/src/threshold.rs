//! The check-result state machine: a status changes only after enough consecutive results
//! agree, as Kubernetes probes do with `failureThreshold` and `successThreshold`.
//!
//! One failed check is often a blip (a dropped packet, a GC pause); flipping a component to
//! unhealthy on it would trigger failovers for nothing. So [`ThresholdState`] turns a stream
//! of [`Outcome`]s into a [`Status`] that becomes `Unhealthy` only at the N-th consecutive
//! failure and passing (`Healthy` or `Degraded`) only at the M-th consecutive pass.
//!
//! `Degraded` counts as a pass: the component works, so it extends the success streak and
//! resets the failure streak. Once the streak has reached the success threshold, the status
//! follows the latest passing outcome at once, so `Healthy` ↔ `Degraded` changes need no
//! streak of their own (both are "up"; only up ↔ down is worth debouncing).
//!
//! ```
//! use ha_core::Status;
//! use ha_health::threshold::{Outcome, ThresholdConfig, ThresholdState, Transition};
//!
//! let mut state = ThresholdState::new(ThresholdConfig::default()).unwrap(); // 3 failures, 1 success
//! assert_eq!(state.record(Outcome::Healthy), Some(Transition { from: Status::Unknown, to: Status::Healthy }));
//! assert_eq!(state.record(Outcome::Unhealthy), None);
//! assert_eq!(state.record(Outcome::Unhealthy), None);
//! assert_eq!(state.record(Outcome::Unhealthy), Some(Transition { from: Status::Healthy, to: Status::Unhealthy }));
//! ```

use ha_core::Status;
use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;

use crate::Error;

/// The result of one run of a check.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Outcome {
    /// The check passed.
    Healthy,
    /// The check passed with reduced quality (slow, partly working). Counts as a pass.
    Degraded,
    /// The check failed.
    Unhealthy,
}

impl Outcome {
    /// Whether the outcome counts towards the success streak.
    pub const fn is_pass(self) -> bool {
        !matches!(self, Outcome::Unhealthy)
    }

    /// The status this outcome leads to once its streak is long enough.
    pub const fn status(self) -> Status {
        match self {
            Outcome::Healthy => Status::Healthy,
            Outcome::Degraded => Status::Degraded,
            Outcome::Unhealthy => Status::Unhealthy,
        }
    }
}

/// A status change reported by [`ThresholdState::record`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Transition {
    /// The status before.
    pub from: Status,
    /// The status now; never equal to `from`.
    pub to: Status,
}

/// How many consecutive results it takes to change the status.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThresholdConfig {
    /// Consecutive failures before the status becomes `Unhealthy` (default 3, as Kubernetes).
    pub failure_threshold: u32,
    /// Consecutive passes before the status becomes `Healthy`/`Degraded` (default 1, as
    /// Kubernetes).
    pub success_threshold: u32,
}

impl Default for ThresholdConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            success_threshold: 1,
        }
    }
}

impl Validate for ThresholdConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::at_least("failure_threshold", self.failure_threshold, 1)?;
        config::at_least("success_threshold", self.success_threshold, 1)
    }
}

/// The debounced status of one check. Starts `Unknown`: nothing has been observed.
#[derive(Debug, Clone)]
pub struct ThresholdState {
    config: ThresholdConfig,
    status: Status,
    failures: u32,
    successes: u32,
}

impl ThresholdState {
    /// A state at `Unknown` with empty streaks; fails if `config` is invalid.
    pub fn new(config: ThresholdConfig) -> Result<Self, Error> {
        config
            .validate()
            .map_err(|e| Error::config("threshold", e))?;
        Ok(Self {
            config,
            status: Status::Unknown,
            failures: 0,
            successes: 0,
        })
    }

    /// Records one result; returns the change of status it caused, if any.
    pub fn record(&mut self, outcome: Outcome) -> Option<Transition> {
        // Streaks saturate: a check failing for years must not wrap around to "no failures".
        let target = if outcome.is_pass() {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.successes >= self.config.success_threshold).then_some(outcome.status())
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.failures >= self.config.failure_threshold).then_some(Status::Unhealthy)
        }?;
        if target == self.status {
            return None;
        }
        let from = std::mem::replace(&mut self.status, target);
        Some(Transition { from, to: target })
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Failures in a row up to now (0 after a pass).
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Passes in a row up to now (0 after a failure).
    pub fn consecutive_successes(&self) -> u32 {
        self.successes
    }

    /// The thresholds in use.
    pub fn config(&self) -> &ThresholdConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state(failure_threshold: u32, success_threshold: u32) -> ThresholdState {
        ThresholdState::new(ThresholdConfig {
            failure_threshold,
            success_threshold,
        })
        .unwrap()
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            Just(Outcome::Healthy),
            Just(Outcome::Degraded),
            Just(Outcome::Unhealthy)
        ]
    }

    #[test]
    fn starts_unknown_and_needs_m_successes() {
        let mut s = state(3, 2);
        assert_eq!(s.status(), Status::Unknown);
        assert_eq!(s.record(Outcome::Healthy), None);
        assert_eq!(
            s.record(Outcome::Healthy),
            Some(Transition {
                from: Status::Unknown,
                to: Status::Healthy
            })
        );
        assert_eq!(s.record(Outcome::Healthy), None);
    }

    #[test]
    fn degraded_counts_as_a_pass_and_switches_at_once_when_up() {
        let mut s = state(3, 2);
        s.record(Outcome::Degraded);
        assert_eq!(
            s.record(Outcome::Healthy),
            Some(Transition {
                from: Status::Unknown,
                to: Status::Healthy
            })
        );
        assert_eq!(
            s.record(Outcome::Degraded),
            Some(Transition {
                from: Status::Healthy,
                to: Status::Degraded
            })
        );
        // A degraded result also breaks a failure streak.
        s.record(Outcome::Unhealthy);
        s.record(Outcome::Unhealthy);
        s.record(Outcome::Degraded);
        s.record(Outcome::Unhealthy);
        s.record(Outcome::Unhealthy);
        assert_eq!(s.status(), Status::Degraded);
    }

    #[test]
    fn zero_thresholds_are_rejected() {
        let err = ThresholdState::new(ThresholdConfig {
            failure_threshold: 0,
            success_threshold: 1,
        })
        .unwrap_err();
        assert!(err.to_string().contains("failure_threshold"), "{err}");
    }

    proptest! {
        #[test]
        fn unhealthy_exactly_at_the_nth_consecutive_failure(
            n in 1u32..6,
            m in 1u32..4,
            prefix in proptest::collection::vec(outcome(), 0..20),
        ) {
            let mut s = state(n, m);
            for o in &prefix {
                s.record(*o);
            }
            // End the prefix with a pass so the failure streak starts at zero.
            s.record(Outcome::Healthy);
            let before = s.status();
            for i in 1..=n {
                let t = s.record(Outcome::Unhealthy);
                if i < n {
                    prop_assert_eq!(t, None);
                    prop_assert_eq!(s.status(), before);
                } else if before == Status::Unhealthy {
                    prop_assert_eq!(t, None);
                } else {
                    prop_assert_eq!(t, Some(Transition { from: before, to: Status::Unhealthy }));
                }
            }
            prop_assert_eq!(s.status(), Status::Unhealthy);
        }

        #[test]
        fn a_pass_resets_the_failure_streak(
            n in 2u32..6,
            pass in prop_oneof![Just(Outcome::Healthy), Just(Outcome::Degraded)],
        ) {
            let mut s = state(n, 1);
            s.record(Outcome::Healthy);
            for _ in 0..n - 1 {
                s.record(Outcome::Unhealthy);
            }
            s.record(pass);
            prop_assert_eq!(s.consecutive_failures(), 0);
            for _ in 0..n - 1 {
                prop_assert_eq!(s.record(Outcome::Unhealthy), None);
            }
            prop_assert_ne!(s.status(), Status::Unhealthy);
        }

        #[test]
        fn transitions_are_reported_exactly_on_change(
            n in 1u32..5,
            m in 1u32..5,
            outcomes in proptest::collection::vec(outcome(), 0..60),
        ) {
            let mut s = state(n, m);
            for o in outcomes {
                let before = s.status();
                let t = s.record(o);
                let after = s.status();
                match t {
                    Some(t) => {
                        prop_assert_ne!(t.from, t.to);
                        prop_assert_eq!((t.from, t.to), (before, after));
                    }
                    None => prop_assert_eq!(before, after),
                }
                // Unhealthy only with a long enough failure streak; up only with enough passes.
                if after == Status::Unhealthy && before != Status::Unhealthy {
                    prop_assert!(s.consecutive_failures() >= n);
                }
                if !after.is_worse_than(Status::Degraded) && before != after {
                    prop_assert!(s.consecutive_successes() >= m);
                }
            }
        }
    }
}
