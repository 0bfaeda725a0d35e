//! Criticality-aware aggregation: many check statuses rolled up into one.
//!
//! The overall status is the worst status among critical checks; a non-critical check can
//! make it at most `Degraded`, whatever its own status (including `Unknown`: a non-critical
//! part we cannot see degrades the picture, it does not make it unknown). With no checks at
//! all, nothing is wrong: `Healthy`, as Spring Boot Actuator's empty composite is `UP`.
//!
//! ```
//! use ha_core::{Criticality, Status};
//! use ha_health::rollup::rollup;
//!
//! let all = [
//!     (Criticality::Critical, Status::Healthy),
//!     (Criticality::Low, Status::Unhealthy),
//! ];
//! assert_eq!(rollup(all), Status::Degraded);
//! assert_eq!(rollup([(Criticality::Critical, Status::Unknown)]), Status::Unknown);
//! ```

use ha_core::{Criticality, Status};

/// What one check contributes to the overall status.
pub const fn contribution(criticality: Criticality, status: Status) -> Status {
    match criticality {
        Criticality::Critical => status,
        Criticality::High | Criticality::Medium | Criticality::Low => {
            if status.is_worse_than(Status::Degraded) {
                Status::Degraded
            } else {
                status
            }
        }
    }
}

/// The overall status of checks given as (criticality, status) pairs.
pub fn rollup(checks: impl IntoIterator<Item = (Criticality, Status)>) -> Status {
    Status::worst_of(checks.into_iter().map(|(c, s)| contribution(c, s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn criticality() -> impl Strategy<Value = Criticality> {
        proptest::sample::select(vec![
            Criticality::Critical,
            Criticality::High,
            Criticality::Medium,
            Criticality::Low,
        ])
    }

    fn status() -> impl Strategy<Value = Status> {
        proptest::sample::select(Status::ALL.to_vec())
    }

    #[test]
    fn empty_is_healthy() {
        assert_eq!(rollup([]), Status::Healthy);
    }

    proptest! {
        #[test]
        fn overall_is_worst_critical_capped_by_degraded_for_the_rest(
            checks in proptest::collection::vec((criticality(), status()), 0..20)
        ) {
            let overall = rollup(checks.iter().copied());
            let worst_critical = Status::worst_of(
                checks.iter().filter(|(c, _)| *c == Criticality::Critical).map(|(_, s)| *s),
            );
            let any_other_bad = checks
                .iter()
                .any(|(c, s)| *c != Criticality::Critical && *s != Status::Healthy);
            let expected = if any_other_bad {
                worst_critical.worst(Status::Degraded)
            } else {
                worst_critical
            };
            prop_assert_eq!(overall, expected);
            // Order of the checks does not matter, and a worse input never improves the result.
            let mut reversed = checks.clone();
            reversed.reverse();
            prop_assert_eq!(rollup(reversed), overall);
        }

        #[test]
        fn a_worse_check_never_improves_the_rollup(
            checks in proptest::collection::vec((criticality(), status()), 1..20),
            pick in any::<proptest::sample::Index>(),
            worse in status(),
        ) {
            let before = rollup(checks.iter().copied());
            let mut after = checks.clone();
            let i = pick.index(after.len());
            after[i].1 = after[i].1.worst(worse);
            prop_assert!(!before.is_worse_than(rollup(after)));
        }
    }
}
