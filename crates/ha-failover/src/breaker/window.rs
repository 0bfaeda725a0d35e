//! The sliding window of recorded calls that the failure and slow-call rates are computed over.
//!
//! Both kinds keep running totals, so recording a call costs O(1) (amortized, for the time
//! window) however large the window is, and both allocate once, when the breaker is built.

use super::config::SlidingWindow;

/// What the window holds now.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(super) struct Totals {
    /// Calls in the window.
    pub(super) calls: u64,
    /// Of which failed.
    pub(super) failures: u64,
    /// Of which were slow (failed or not).
    pub(super) slow: u64,
}

impl Totals {
    /// `part` as a percentage of the calls, `None` below `minimum_calls`.
    pub(super) fn rate(&self, part: u64, minimum_calls: u32) -> Option<f64> {
        (self.calls >= u64::from(minimum_calls) && self.calls > 0)
            .then(|| part as f64 * 100.0 / self.calls as f64)
    }

    /// Whether `part` is at least `threshold` percent of the calls, with at least
    /// `minimum_calls` calls. Compares `part × 100 ≥ threshold × calls` (no division).
    pub(super) fn reaches(&self, part: u64, minimum_calls: u32, threshold: Option<f64>) -> bool {
        threshold.is_some_and(|t| {
            self.calls >= u64::from(minimum_calls) && part as f64 * 100.0 >= t * self.calls as f64
        })
    }
}

const FAILED: u8 = 1;
const SLOW: u8 = 2;

/// The last `n` calls.
#[derive(Debug)]
struct CountWindow {
    /// One flag byte per call; `next` is where the next call goes.
    ring: Box<[u8]>,
    next: usize,
    len: usize,
    totals: Totals,
}

/// One second of calls.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    calls: u64,
    failures: u64,
    slow: u64,
}

/// The calls of the last `n` seconds, in `n` one-second buckets.
#[derive(Debug)]
struct TimeWindow {
    /// Second `s` lives in `buckets[s % n]`.
    buckets: Box<[Bucket]>,
    /// The newest second seen; the window is `(head − n, head]`.
    head: u64,
    totals: Totals,
}

/// A count- or time-based sliding window.
#[derive(Debug)]
pub(super) struct Window(Kind);

#[derive(Debug)]
enum Kind {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    /// An empty window. The size must be valid (see [`BreakerConfig`](super::BreakerConfig)).
    pub(super) fn new(kind: SlidingWindow) -> Self {
        match kind {
            SlidingWindow::Count(n) => Window(Kind::Count(CountWindow {
                ring: vec![0; n.max(1) as usize].into_boxed_slice(),
                next: 0,
                len: 0,
                totals: Totals::default(),
            })),
            SlidingWindow::Time(d) => Window(Kind::Time(TimeWindow {
                buckets: vec![Bucket::default(); d.as_secs().max(1) as usize].into_boxed_slice(),
                head: 0,
                totals: Totals::default(),
            })),
        }
    }

    /// Whether the window needs the time of each call.
    pub(super) fn is_time_based(&self) -> bool {
        matches!(self.0, Kind::Time(_))
    }

    /// Records one call made at `second` (ignored by a count window).
    pub(super) fn record(&mut self, second: u64, failed: bool, slow: bool) {
        match &mut self.0 {
            Kind::Count(w) => {
                let flags = (u8::from(failed) * FAILED) | (u8::from(slow) * SLOW);
                if w.len == w.ring.len() {
                    let old = w.ring[w.next];
                    w.totals.calls -= 1;
                    w.totals.failures -= u64::from(old & FAILED != 0);
                    w.totals.slow -= u64::from(old & SLOW != 0);
                } else {
                    w.len += 1;
                }
                w.ring[w.next] = flags;
                w.next = (w.next + 1) % w.ring.len();
                w.totals.calls += 1;
                w.totals.failures += u64::from(failed);
                w.totals.slow += u64::from(slow);
            }
            Kind::Time(w) => {
                w.advance(second);
                // A call recorded late (its second already passed the head) joins the head.
                let head = w.head;
                let n = w.buckets.len() as u64;
                let b = &mut w.buckets[(head % n) as usize];
                b.calls += 1;
                b.failures += u64::from(failed);
                b.slow += u64::from(slow);
                w.totals.calls += 1;
                w.totals.failures += u64::from(failed);
                w.totals.slow += u64::from(slow);
            }
        }
    }

    /// Records `n` successful, fast calls at once, as `n` calls to [`record`](Self::record)
    /// would. Count windows only (the successes the breaker records without its lock).
    pub(super) fn record_successes(&mut self, n: u64) {
        match &mut self.0 {
            Kind::Count(w) if n >= w.ring.len() as u64 => {
                // Every call in the window is one of these.
                w.ring.fill(0);
                w.next = 0;
                w.len = w.ring.len();
                w.totals = Totals {
                    calls: w.ring.len() as u64,
                    failures: 0,
                    slow: 0,
                };
            }
            _ => {
                for _ in 0..n {
                    self.record(0, false, false);
                }
            }
        }
    }

    /// Calls in a count window (a time window's count depends on the time: `None`).
    pub(super) fn count_calls(&self) -> Option<u64> {
        match &self.0 {
            Kind::Count(w) => Some(w.totals.calls),
            Kind::Time(_) => None,
        }
    }

    /// The totals as of `second` (a time window first drops the seconds that left it).
    pub(super) fn totals(&mut self, second: u64) -> Totals {
        match &mut self.0 {
            Kind::Count(w) => w.totals,
            Kind::Time(w) => {
                w.advance(second);
                w.totals
            }
        }
    }

    /// Forgets every call.
    pub(super) fn clear(&mut self) {
        match &mut self.0 {
            Kind::Count(w) => {
                w.ring.fill(0);
                w.next = 0;
                w.len = 0;
                w.totals = Totals::default();
            }
            Kind::Time(w) => {
                w.buckets.fill(Bucket::default());
                w.head = 0;
                w.totals = Totals::default();
            }
        }
    }
}

impl TimeWindow {
    /// Moves the head to `second`, emptying the buckets of the seconds that left the window.
    fn advance(&mut self, second: u64) {
        if second <= self.head {
            return;
        }
        let n = self.buckets.len() as u64;
        if second - self.head >= n {
            self.buckets.fill(Bucket::default());
            self.totals = Totals::default();
        } else {
            for s in self.head + 1..=second {
                let b = &mut self.buckets[(s % n) as usize];
                self.totals.calls -= b.calls;
                self.totals.failures -= b.failures;
                self.totals.slow -= b.slow;
                *b = Bucket::default();
            }
        }
        self.head = second;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn totals(calls: u64, failures: u64, slow: u64) -> Totals {
        Totals {
            calls,
            failures,
            slow,
        }
    }

    #[test]
    fn count_window_keeps_the_last_n() {
        let mut w = Window::new(SlidingWindow::Count(3));
        w.record(0, true, false);
        w.record(0, true, true);
        assert_eq!(w.totals(0), totals(2, 2, 1));
        w.record(0, false, false);
        w.record(0, false, false);
        assert_eq!(w.totals(0), totals(3, 1, 1), "the first failure left");
        w.record(0, false, false);
        assert_eq!(w.totals(0), totals(3, 0, 0));
        w.clear();
        assert_eq!(w.totals(0), Totals::default());
    }

    #[test]
    fn successes_in_bulk_match_one_at_a_time() {
        for n in [0, 1, 2, 3, 4, 10] {
            let (mut bulk, mut single) = (
                Window::new(SlidingWindow::Count(3)),
                Window::new(SlidingWindow::Count(3)),
            );
            for w in [&mut bulk, &mut single] {
                w.record(0, true, true);
                w.record(0, true, false);
            }
            bulk.record_successes(n);
            for _ in 0..n {
                single.record(0, false, false);
            }
            assert_eq!(bulk.totals(0), single.totals(0), "{n} successes");
            assert_eq!(bulk.count_calls(), Some(single.totals(0).calls));
            // The ring is in the same order: the next calls evict the same entries.
            for failed in [true, false, true] {
                bulk.record(0, failed, false);
                single.record(0, failed, false);
                assert_eq!(bulk.totals(0), single.totals(0));
            }
        }
    }

    #[test]
    fn time_window_drops_whole_seconds() {
        let mut w = Window::new(SlidingWindow::Time(Duration::from_secs(3)));
        w.record(10, true, false);
        w.record(11, false, true);
        w.record(12, false, false);
        assert_eq!(w.totals(12), totals(3, 1, 1));
        assert_eq!(w.totals(13), totals(2, 0, 1), "second 10 left");
        assert_eq!(w.totals(15), Totals::default());
        w.record(100, true, true);
        assert_eq!(w.totals(100), totals(1, 1, 1));
        assert_eq!(w.totals(90), totals(1, 1, 1), "time does not run backwards");
    }

    #[test]
    fn rates_need_minimum_calls() {
        let t = totals(4, 2, 1);
        assert_eq!(t.rate(t.failures, 5), None);
        assert_eq!(t.rate(t.failures, 4), Some(50.0));
        assert!(t.reaches(t.failures, 4, Some(50.0)));
        assert!(!t.reaches(t.failures, 4, Some(50.1)));
        assert!(!t.reaches(t.failures, 5, Some(1.0)));
        assert!(!t.reaches(t.failures, 1, None));
    }

    proptest! {
        #[test]
        fn time_window_matches_a_list_filter(
            n in 1u64..8,
            calls in proptest::collection::vec((0u64..4, any::<bool>(), any::<bool>()), 0..60),
        ) {
            let mut w = Window::new(SlidingWindow::Time(Duration::from_secs(n)));
            let mut all = Vec::new();
            let mut now = 0;
            for (step, failed, slow) in calls {
                now += step;
                w.record(now, failed, slow);
                all.push((now, failed, slow));
                let inside: Vec<_> = all.iter().filter(|(s, ..)| now - s < n).collect();
                let expected = totals(
                    inside.len() as u64,
                    inside.iter().filter(|c| c.1).count() as u64,
                    inside.iter().filter(|c| c.2).count() as u64,
                );
                prop_assert_eq!(w.totals(now), expected);
            }
        }

        #[test]
        fn count_window_matches_the_last_n(
            n in 1u32..8,
            calls in proptest::collection::vec((any::<bool>(), any::<bool>()), 0..40),
        ) {
            let mut w = Window::new(SlidingWindow::Count(n));
            for (i, &(failed, slow)) in calls.iter().enumerate() {
                w.record(0, failed, slow);
                let last = &calls[(i + 1).saturating_sub(n as usize)..=i];
                let expected = totals(
                    last.len() as u64,
                    last.iter().filter(|c| c.0).count() as u64,
                    last.iter().filter(|c| c.1).count() as u64,
                );
                prop_assert_eq!(w.totals(0), expected);
            }
        }
    }
}
