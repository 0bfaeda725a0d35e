//! The consecutive-failure and -success counter of one component: when to ask for a failover,
//! and when the component has recovered. Pure: no clock, no I/O.

/// What a report changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Edge {
    /// The failure threshold was crossed: ask for a failover.
    Tripped,
    /// A tripped component passed its recovery threshold.
    Recovered,
}

/// Counts consecutive failures and successes of one component.
///
/// A component *trips* when `failure_threshold` failures come in a row while it is not
/// tripped, and *recovers* when `recovery_threshold` successes come in a row while it is. One
/// failure episode therefore asks for one failover, however long it lasts.
#[derive(Clone, Debug)]
pub(crate) struct Tracker {
    failure_threshold: u32,
    recovery_threshold: u32,
    failures: u32,
    successes: u32,
    tripped: bool,
    /// Set when the manager gave up on the current outage: then one success ends it, so that
    /// the next failures are a new outage, handled afresh.
    gave_up: bool,
}

impl Tracker {
    pub(crate) fn new(failure_threshold: u32, recovery_threshold: u32) -> Self {
        Self {
            failure_threshold,
            recovery_threshold,
            failures: 0,
            successes: 0,
            tripped: false,
            gave_up: false,
        }
    }

    /// One observation.
    pub(crate) fn observe(&mut self, failed: bool) -> Option<Edge> {
        self.apply(failed, 1)
    }

    /// A status change already debounced elsewhere: as many observations as the threshold
    /// wants at once.
    pub(crate) fn observe_confirmed(&mut self, failed: bool) -> Option<Edge> {
        let n = if failed {
            self.failure_threshold
        } else {
            self.recovery_threshold
        };
        self.apply(failed, n)
    }

    fn apply(&mut self, failed: bool, n: u32) -> Option<Edge> {
        if failed {
            self.successes = 0;
            self.failures = self.failures.saturating_add(n);
            if !self.tripped && self.failures >= self.failure_threshold {
                self.tripped = true;
                return Some(Edge::Tripped);
            }
        } else {
            self.failures = 0;
            self.successes = self.successes.saturating_add(n);
            if self.tripped && (self.gave_up || self.successes >= self.recovery_threshold) {
                self.tripped = false;
                self.gave_up = false;
                return Some(Edge::Recovered);
            }
        }
        None
    }

    /// Forgets the episode, as if the component had never failed.
    #[cfg(test)]
    pub(crate) fn rearm(&mut self) {
        self.failures = 0;
        self.successes = 0;
        self.tripped = false;
        self.gave_up = false;
    }

    /// The manager gave up on this outage: the next success ends it.
    pub(crate) fn give_up(&mut self) {
        if self.tripped {
            self.gave_up = true;
        }
    }

    /// The request for this outage was dropped because the component's latest report is no
    /// longer a failure: forget the outage, so that the next failure streak trips afresh.
    pub(crate) fn stand_down(&mut self) {
        self.tripped = false;
        self.gave_up = false;
        self.failures = 0;
    }

    pub(crate) fn is_tripped(&self) -> bool {
        self.tripped
    }

    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    pub(crate) fn successes(&self) -> u32 {
        self.successes
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn trips_at_the_threshold_and_recovers_after_enough_successes() {
        let mut t = Tracker::new(3, 2);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None, "a success breaks the streak");
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(Edge::Tripped));
        assert_eq!(t.observe(true), None, "one episode, one trip");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(Edge::Recovered));
        assert_eq!(t.observe_confirmed(true), Some(Edge::Tripped));
        assert_eq!(t.observe_confirmed(false), Some(Edge::Recovered));
        t.observe_confirmed(true);
        t.give_up();
        assert_eq!(
            t.observe(false),
            Some(Edge::Recovered),
            "one success ends a given-up outage"
        );
        assert_eq!(t.observe_confirmed(true), Some(Edge::Tripped));
        assert_eq!(t.observe(false), None, "not given up: the threshold holds");
        t.rearm();
        assert!(!t.is_tripped());
        assert_eq!((t.failures(), t.successes()), (0, 0));
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Report(bool),
        Confirmed(bool),
        Rearm,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<bool>().prop_map(Op::Report),
            2 => any::<bool>().prop_map(Op::Confirmed),
            1 => Just(Op::Rearm),
        ]
    }

    /// The rule restated over the whole list of observations since the last re-arm: trip
    /// when the last `f` are all failures, recover when the last `r` are all successes. A
    /// confirmed status counts as `f` (or `r`) observations at once.
    #[derive(Default)]
    struct Reference {
        seen: Vec<bool>,
        tripped: bool,
    }

    impl Reference {
        fn last_all(&self, n: u32, failed: bool) -> bool {
            let n = n as usize;
            self.seen.len() >= n
                && self.seen[self.seen.len() - n..]
                    .iter()
                    .all(|&f| f == failed)
        }

        fn push(&mut self, failed: bool, times: u32, f: u32, r: u32) -> Option<Edge> {
            let mut edge = None;
            for _ in 0..times {
                self.seen.push(failed);
                if !self.tripped && self.last_all(f, true) {
                    self.tripped = true;
                    edge = Some(Edge::Tripped);
                } else if self.tripped && self.last_all(r, false) {
                    self.tripped = false;
                    edge = Some(Edge::Recovered);
                }
            }
            edge
        }
    }

    proptest! {
        #[test]
        fn matches_the_reference(f in 1u32..5, r in 1u32..5, ops in proptest::collection::vec(op(), 0..80)) {
            let mut t = Tracker::new(f, r);
            let mut model = Reference::default();
            for op in ops {
                let (got, want) = match op {
                    Op::Report(failed) => (t.observe(failed), model.push(failed, 1, f, r)),
                    Op::Confirmed(failed) => (
                        t.observe_confirmed(failed),
                        model.push(failed, if failed { f } else { r }, f, r),
                    ),
                    Op::Rearm => {
                        t.rearm();
                        model = Reference::default();
                        (None, None)
                    }
                };
                prop_assert_eq!(got, want, "after {:?}", op);
                prop_assert_eq!(t.is_tripped(), model.tripped);
            }
        }
    }
}
