//! Health status, criticality and circuit state: the small enums every crate speaks.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// How well a component is doing.
///
/// `Status` has a total "worse than" order, used to roll many statuses up into one:
/// `Healthy` < `Degraded` < `Unknown` < `Unhealthy` in badness. `Unknown` ranks worse than
/// `Degraded` because a component we cannot see may be down — a rollup must not call a system
/// healthy or merely degraded while part of it is unobserved — and better than `Unhealthy`
/// because it is not known to be down.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Working as expected.
    Healthy,
    /// Working, with reduced capacity or quality (slow, a non-critical part down).
    Degraded,
    /// Not observed yet, or the observation failed in a way that says nothing either way.
    Unknown,
    /// Not working.
    Unhealthy,
}

impl Status {
    /// Every status, from best to worst.
    pub const ALL: [Status; 4] = [
        Status::Healthy,
        Status::Degraded,
        Status::Unknown,
        Status::Unhealthy,
    ];

    /// The rank in the badness order: 0 is best.
    pub const fn badness(self) -> u8 {
        match self {
            Status::Healthy => 0,
            Status::Degraded => 1,
            Status::Unknown => 2,
            Status::Unhealthy => 3,
        }
    }

    /// Whether `self` is strictly worse than `other`.
    pub const fn is_worse_than(self, other: Status) -> bool {
        self.badness() > other.badness()
    }

    /// The worse of two statuses.
    #[must_use]
    pub const fn worst(self, other: Status) -> Status {
        if other.is_worse_than(self) {
            other
        } else {
            self
        }
    }

    /// The worst status of an iterator; `Healthy` for an empty one (nothing is wrong).
    pub fn worst_of(statuses: impl IntoIterator<Item = Status>) -> Status {
        statuses.into_iter().fold(Status::Healthy, Status::worst)
    }

    /// A stable lower-case name, used in logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unknown => "unknown",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// Orders by badness: `a < b` means `a` is better than `b`.
impl Ord for Status {
    fn cmp(&self, other: &Self) -> Ordering {
        self.badness().cmp(&other.badness())
    }
}

impl PartialOrd for Status {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much the whole system depends on a component.
///
/// Ordered from most to least important: `Critical` < `High` < `Medium` < `Low`, so sorting a
/// list puts the components that matter most first.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Criticality {
    /// The system cannot serve without it: its failure makes the system unhealthy.
    Critical,
    /// Its failure degrades the system seriously.
    High,
    /// Its failure degrades the system.
    #[default]
    Medium,
    /// Nice to have: its failure is reported but barely changes the overall status.
    Low,
}

impl Criticality {
    /// A stable lower-case name, used in logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Criticality::Critical => "critical",
            Criticality::High => "high",
            Criticality::Medium => "medium",
            Criticality::Low => "low",
        }
    }
}

impl fmt::Display for Criticality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of a circuit breaker, as reported in events and metrics.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Calls pass; failures are counted.
    Closed,
    /// Calls are rejected until the open wait has passed.
    Open,
    /// A limited number of trial calls pass to probe recovery.
    HalfOpen,
}

impl CircuitState {
    /// A stable snake-case name, used in logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn status() -> impl Strategy<Value = Status> {
        proptest::sample::select(Status::ALL.to_vec())
    }

    #[test]
    fn badness_order_is_healthy_degraded_unknown_unhealthy() {
        assert!(Status::Unhealthy.is_worse_than(Status::Unknown));
        assert!(Status::Unknown.is_worse_than(Status::Degraded));
        assert!(Status::Degraded.is_worse_than(Status::Healthy));
        assert!(!Status::Healthy.is_worse_than(Status::Healthy));
        assert_eq!(Status::worst_of([]), Status::Healthy);
        assert_eq!(
            Status::worst_of([Status::Degraded, Status::Healthy, Status::Unknown]),
            Status::Unknown
        );
    }

    #[test]
    fn criticality_sorts_most_important_first() {
        let mut v = vec![
            Criticality::Low,
            Criticality::Critical,
            Criticality::Medium,
            Criticality::High,
        ];
        v.sort();
        assert_eq!(
            v,
            [
                Criticality::Critical,
                Criticality::High,
                Criticality::Medium,
                Criticality::Low
            ]
        );
    }

    proptest! {
        #[test]
        fn worse_than_is_a_strict_total_order(a in status(), b in status(), c in status()) {
            // Irreflexive, and exactly one of a<b, a=b, a>b.
            prop_assert!(!a.is_worse_than(a));
            let n = [a.is_worse_than(b), b.is_worse_than(a), a == b].iter().filter(|x| **x).count();
            prop_assert_eq!(n, 1);
            // Transitive.
            if a.is_worse_than(b) && b.is_worse_than(c) {
                prop_assert!(a.is_worse_than(c));
            }
            // Ord agrees with is_worse_than.
            prop_assert_eq!(a > b, a.is_worse_than(b));
        }

        #[test]
        fn worst_of_is_an_upper_bound_and_a_member(v in proptest::collection::vec(status(), 1..10)) {
            let w = Status::worst_of(v.iter().copied());
            prop_assert!(v.contains(&w));
            prop_assert!(v.iter().all(|s| !s.is_worse_than(w)));
            // Order of the input does not matter.
            let mut r = v.clone();
            r.reverse();
            prop_assert_eq!(Status::worst_of(r), w);
        }
    }
}
