//! The breaker's state machine: one atomic word decides admission, a short lock records
//! outcomes and makes every transition.
//!
//! # The state word
//!
//! `word` packs, in one `AtomicU64`: the state (bits 0–7), the number of trial calls in flight
//! (bits 8–23) and an epoch (bits 24–63) that grows by one at every transition.
//!
//! - **Closed admission** is one `Acquire` load: no lock, no allocation, no write to shared
//!   memory (a hot breaker shared by many threads does not bounce a cache line on admission).
//! - **Half-open admission** reserves a trial slot with a compare-and-swap on the word, only
//!   while fewer than `permitted_calls_in_half_open` trials are in flight. A trial gives its
//!   slot back, with another compare-and-swap, exactly once: when it completes or when it is
//!   cancelled (its permit dropped). So the count is always the number of trial permits alive,
//!   and no more than the permitted number of trials ever run at once — also across half-open
//!   periods: a trial that outlives its period (another trial failed and the breaker opened
//!   and came back to half-open) keeps its slot until it ends. Its outcome, though, decides
//!   nothing: only trials of the current epoch move the state.
//! - **Open rejection** reads the clock and the open deadline (`open_until`), no lock.
//! - **Closed successes** are recorded without the lock when they cannot change the state
//!   (see below): one compare-and-swap on a per-thread slot.
//!
//! # Lock-free successes
//!
//! In the closed state, with a count-based window and the slow-call rule off, a success
//! cannot open the breaker once the window holds `minimum_calls` calls and no failure streak
//! is running: it resets no streak, and it can only lower the failure rate (it adds a call and
//! evicts one, perhaps a failure). Only reaching `minimum_calls` can make a success open the
//! breaker (the rate may already be over the threshold), and that is why the rule waits for
//! it. While those conditions hold, the lock holder publishes the epoch in `fast`, and a
//! success admitted in that epoch just adds one to a counter in one of [`SUCCESS_SLOTS`]
//! cache-line-sized slots, picked per thread, so two threads never write the same line. Each
//! slot packs the epoch's low 32 bits (its tag) with the count; the increment is a
//! compare-and-swap that fails over to the locked path if the tag is not the caller's epoch.
//!
//! Every locked section first *drains* the slots (swaps them to zero, tagged with the current
//! epoch) and records the drained successes into the window before anything else, so the
//! lock holder sees every success that completed before it; a success that lands after the
//! drain is ordered after the lock holder's call, which is a valid order for calls that
//! overlapped. A transition clears `fast` and drains and re-tags every slot before it changes
//! the word: a success of the ended epoch that lands after that finds the wrong tag, takes
//! the lock and is counted but decides nothing, as any call that outlives its period.
//!
//! # The lock
//!
//! Recording a failure, a trial's outcome, a timed call or a call while the window is not
//! ready for lock-free successes takes `record` (a `std::sync::Mutex`, held for a few dozen
//! instructions — more when it first records a batch of drained successes, at most one pass
//! over the window — never across an `.await`): the sliding window, the failure streak and the
//! half-open success count change together, and the decision to open must see all of them at
//! once. Every transition happens under this lock too, including the lazy open → half-open
//! one made by the first call after the wait, so a transition is decided once, by one thread,
//! against a word that cannot change state under it (lock-free writers only move the trial
//! count within an epoch). Transition events are published while the lock is held so that
//! subscribers see them in the order they happened. A lock-free window was not worth its
//! complexity: recording is not the path the issue asks to keep lock-free, and std's mutex
//! costs one uncontended atomic on the way in and out; the common case, a success, skips it.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use ha_core::{CircuitState, EventBus, HaEvent, NodeId, metric};
use tokio::time::Instant;

use super::config::{BreakerConfig, MAX_PERMITTED_IN_HALF_OPEN, SlidingWindow};
use super::window::Window;
use super::{BreakerSnapshot, Rejected};

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const STATE_MASK: u64 = 0xff;
const IN_FLIGHT_SHIFT: u32 = 8;
const IN_FLIGHT_ONE: u64 = 1 << IN_FLIGHT_SHIFT;
const IN_FLIGHT_MASK: u64 = 0xffff << IN_FLIGHT_SHIFT;
const EPOCH_SHIFT: u32 = 24;
/// Epochs wrap after 2^40 transitions; a permit would have to outlive that many to be
/// mistaken for a current one.
const EPOCH_MASK: u64 = (1 << 40) - 1;
/// The slots lock-free successes are counted in; threads are spread over them round-robin.
const SUCCESS_SLOTS: usize = 16;
/// A slot: the epoch tag (the epoch's low 32 bits) in the high half, the count in the low.
const TAG_SHIFT: u32 = 32;
const COUNT_MASK: u64 = u32::MAX as u64;
/// `fast` when lock-free successes are off (no tag has its high half set).
const NO_FAST: u64 = u64::MAX;

fn tag_of(epoch: u64) -> u64 {
    epoch & COUNT_MASK
}

/// The tag of `w`'s period if it is a closed one (whose successes go in the window).
fn closed_tag(w: Word) -> Option<u64> {
    (w.state_bits() == CLOSED).then(|| tag_of(w.epoch()))
}

/// An atomic alone on its cache line (two, as adjacent-line prefetchers pair them).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicU64);

/// The slot the calling thread counts its lock-free successes in.
#[inline]
fn slot_index() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        // `const`: a plain thread-local read, no lazy-initialisation check on every call.
        static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SLOT.with(|slot| {
        let mut i = slot.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Relaxed) % SUCCESS_SLOTS;
            slot.set(i);
        }
        i
    })
}

// The trial count must fit its 16 bits, with room for the +1 of a reservation.
const _: () = assert!((MAX_PERMITTED_IN_HALF_OPEN as u64) < (IN_FLIGHT_MASK >> IN_FLIGHT_SHIFT));

/// A decoded state word.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Word(u64);

impl Word {
    fn new(state: u64, in_flight: u64, epoch: u64) -> Self {
        Word(state | (in_flight << IN_FLIGHT_SHIFT) | ((epoch & EPOCH_MASK) << EPOCH_SHIFT))
    }
    fn state_bits(self) -> u64 {
        self.0 & STATE_MASK
    }
    fn state(self) -> CircuitState {
        match self.state_bits() {
            OPEN => CircuitState::Open,
            HALF_OPEN => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        }
    }
    fn in_flight(self) -> u64 {
        (self.0 & IN_FLIGHT_MASK) >> IN_FLIGHT_SHIFT
    }
    fn epoch(self) -> u64 {
        self.0 >> EPOCH_SHIFT
    }
}

/// What an admitted call carries until it completes: which state instance admitted it, as
/// what, and (with the slow-call rule on) since when.
#[derive(Debug)]
pub(super) struct Ticket {
    epoch: u64,
    trial: bool,
    started: Option<Instant>,
}

impl Ticket {
    pub(super) fn is_trial(&self) -> bool {
        self.trial
    }
}

/// The metric handles, all resolved once at build time (so recording is an atomic add, and
/// every metric of a breaker goes to the recorder that was installed when it was built).
struct Handles {
    success: metrics::Counter,
    failure: metrics::Counter,
    slow: metrics::Counter,
    rejected: metrics::Counter,
    cancelled: metrics::Counter,
    state: metrics::Gauge,
    /// The four possible transitions, in the order of [`transition_index`].
    transitions: [metrics::Counter; 4],
}

impl Handles {
    fn register(name: &Arc<str>) -> Self {
        use CircuitState::{Closed, HalfOpen, Open};
        let calls = |outcome: &'static str| {
            metrics::counter!(
                metric::CIRCUIT_CALLS_TOTAL,
                "circuit" => Arc::clone(name),
                "outcome" => outcome
            )
        };
        let transition = |from: CircuitState, to: CircuitState| {
            metrics::counter!(
                metric::CIRCUIT_TRANSITIONS_TOTAL,
                "circuit" => Arc::clone(name),
                "from" => from.as_str(),
                "to" => to.as_str()
            )
        };
        Self {
            success: calls("success"),
            failure: calls("failure"),
            slow: calls("slow"),
            rejected: calls("rejected"),
            cancelled: calls("cancelled"),
            state: metrics::gauge!(metric::CIRCUIT_STATE, "circuit" => Arc::clone(name)),
            transitions: [
                transition(Closed, Open),
                transition(Open, HalfOpen),
                transition(HalfOpen, Open),
                transition(HalfOpen, Closed),
            ],
        }
    }
}

/// Where a transition's counter is in [`Handles::transitions`]; `None` for a move the state
/// machine never makes.
fn transition_index(from: CircuitState, to: CircuitState) -> Option<usize> {
    use CircuitState::{Closed, HalfOpen, Open};
    match (from, to) {
        (Closed, Open) => Some(0),
        (Open, HalfOpen) => Some(1),
        (HalfOpen, Open) => Some(2),
        (HalfOpen, Closed) => Some(3),
        _ => None,
    }
}

/// The `ha_circuit_state` gauge value: 0 closed, 1 half-open, 2 open.
fn gauge_value(state: CircuitState) -> f64 {
    match state {
        CircuitState::Closed => 0.0,
        CircuitState::HalfOpen => 1.0,
        CircuitState::Open => 2.0,
    }
}

/// Everything that changes only under the lock.
struct Record {
    window: Window,
    consecutive_failures: u32,
    half_open_successes: u32,
    /// Opens since the breaker last closed; drives the wait backoff.
    consecutive_opens: u32,
    successful: u64,
    failed: u64,
    slow: u64,
}

/// The shared state of one breaker.
pub(super) struct Core {
    name: Arc<str>,
    node: NodeId,
    bus: Option<EventBus>,
    config: BreakerConfig,
    /// Whether calls are timed (only with the slow-call rule on: no clock read otherwise).
    timed: bool,
    /// Whether successes may ever skip the lock: count window, calls not timed.
    lock_free_successes: bool,
    /// Whether a success can open the breaker at all (the failure-rate rule is on).
    success_can_open: bool,
    /// The epoch tag whose closed-state successes may skip the lock, or [`NO_FAST`].
    fast: Padded,
    /// Lock-free success counts (see the module docs).
    slots: Box<[Padded]>,
    /// The origin of `open_until` and of the time window's seconds.
    base: Instant,
    word: AtomicU64,
    /// When the current open period ends, in nanoseconds since `base`.
    open_until: AtomicU64,
    rejected: AtomicU64,
    cancelled: AtomicU64,
    record: Mutex<Record>,
    handles: Handles,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A closed breaker. `config` must be valid.
    pub(super) fn new(
        name: Arc<str>,
        node: NodeId,
        bus: Option<EventBus>,
        config: BreakerConfig,
    ) -> Self {
        let handles = Handles::register(&name);
        handles.state.set(gauge_value(CircuitState::Closed));
        let timed = config.slow_call_rate_threshold.is_some();
        let lock_free_successes =
            !timed && matches!(config.sliding_window, SlidingWindow::Count(_));
        let core = Self {
            node,
            bus,
            timed,
            lock_free_successes,
            success_can_open: config.failure_rate_threshold.is_some(),
            fast: Padded(AtomicU64::new(NO_FAST)),
            // Every slot starts tagged with epoch 0, the first closed period.
            slots: (0..SUCCESS_SLOTS).map(|_| Padded::default()).collect(),
            base: Instant::now(),
            word: AtomicU64::new(Word::new(CLOSED, 0, 0).0),
            open_until: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            record: Mutex::new(Record {
                window: Window::new(config.sliding_window),
                consecutive_failures: 0,
                half_open_successes: 0,
                consecutive_opens: 0,
                successful: 0,
                failed: 0,
                slow: 0,
            }),
            handles,
            config,
            name,
        };
        let rec = core.lock();
        core.refresh_fast(&rec, Word(core.word.load(Acquire)));
        drop(rec);
        core
    }

    pub(super) fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub(super) fn config(&self) -> &BreakerConfig {
        &self.config
    }

    pub(super) fn state(&self) -> CircuitState {
        Word(self.word.load(Acquire)).state()
    }

    /// Admits a call or says why not.
    #[inline]
    pub(super) fn acquire(&self) -> Result<Ticket, Rejected> {
        let mut cur = self.word.load(Acquire);
        // The closed fast path: one load, one branch.
        if Word(cur).state_bits() == CLOSED {
            return Ok(self.ticket(Word(cur).epoch(), false, None));
        }
        loop {
            let w = Word(cur);
            match w.state_bits() {
                CLOSED => return Ok(self.ticket(w.epoch(), false, None)),
                HALF_OPEN => {
                    if w.in_flight() >= u64::from(self.config.permitted_calls_in_half_open) {
                        return Err(self.reject(CircuitState::HalfOpen, None));
                    }
                    match self
                        .word
                        .compare_exchange_weak(cur, cur + IN_FLIGHT_ONE, AcqRel, Acquire)
                    {
                        Ok(_) => return Ok(self.ticket(w.epoch(), true, None)),
                        Err(actual) => cur = actual,
                    }
                }
                _ => {
                    let now = Instant::now();
                    let until = self.open_until.load(Acquire);
                    let elapsed = self.nanos_since_base(now);
                    if elapsed < until {
                        let left = Duration::from_nanos(until - elapsed);
                        return Err(self.reject(CircuitState::Open, Some(left)));
                    }
                    // The wait is over: the first caller to get here moves the breaker to
                    // half-open and, in the same atomic step, takes a trial slot; the others
                    // then compete for the remaining slots like any half-open caller. Trials
                    // of earlier periods may still hold slots, but never all of them: the
                    // trial whose outcome ended the last half-open period freed its own, and
                    // no trial is admitted outside half-open. The check stays all the same.
                    let mut rec = self.lock();
                    let again = Word(self.word.load(Acquire));
                    if again.epoch() == w.epoch() {
                        let (new, reserved) =
                            self.transition(&mut rec, w, HALF_OPEN, true, now, "wait_elapsed");
                        if reserved {
                            return Ok(self.ticket(new.epoch(), true, Some(now)));
                        }
                        return Err(self.reject(CircuitState::HalfOpen, None));
                    }
                    cur = again.0;
                }
            }
        }
    }

    #[inline]
    fn ticket(&self, epoch: u64, trial: bool, now: Option<Instant>) -> Ticket {
        let started = if self.timed {
            Some(now.unwrap_or_else(Instant::now))
        } else {
            None
        };
        Ticket {
            epoch,
            trial,
            started,
        }
    }

    fn reject(&self, state: CircuitState, retry_after: Option<Duration>) -> Rejected {
        self.rejected.fetch_add(1, Relaxed);
        self.handles.rejected.increment(1);
        Rejected {
            circuit: Arc::clone(&self.name),
            state,
            retry_after,
        }
    }

    /// Records a successful call: without the lock when it cannot change the state, else as
    /// [`finish`](Self::finish) does.
    #[inline]
    pub(super) fn succeed(&self, ticket: &Ticket) {
        if !ticket.trial && ticket.started.is_none() && self.count_success(ticket.epoch) {
            return;
        }
        self.finish(ticket, false);
    }

    /// Counts a closed-state success of `epoch` in this thread's slot, if lock-free successes
    /// are on for that epoch; `false` if the caller must take the lock.
    #[inline]
    fn count_success(&self, epoch: u64) -> bool {
        let tag = tag_of(epoch);
        if self.fast.0.load(Acquire) != tag {
            return false;
        }
        let slot = &self.slots[slot_index()].0;
        let mut cur = slot.load(Relaxed);
        loop {
            if cur >> TAG_SHIFT != tag || cur & COUNT_MASK == COUNT_MASK {
                return false;
            }
            // The tag check and the increment are one step: a drain or re-tag between the
            // load and here makes it fail and look again.
            match slot.compare_exchange_weak(cur, cur + 1, AcqRel, Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.handles.success.increment(1);
        true
    }

    /// Takes every lock-free success counted so far, re-tags the slots with `retag`, and
    /// records the successes: all of them in the totals, and those tagged `window_tag` (the
    /// current closed period, if they may still decide something) in the window, where they
    /// end any failure streak. Under the lock.
    fn drain(&self, rec: &mut Record, window_tag: Option<u64>, retag: u64) {
        if !self.lock_free_successes {
            return;
        }
        let mut current = 0;
        for slot in &*self.slots {
            let old = slot.0.swap(retag << TAG_SHIFT, AcqRel);
            let count = old & COUNT_MASK;
            rec.successful += count;
            if Some(old >> TAG_SHIFT) == window_tag {
                current += count;
            }
        }
        if current > 0 {
            rec.window.record_successes(current);
            rec.consecutive_failures = 0;
        }
    }

    /// Turns lock-free successes on for the closed period `w` if a success cannot change its
    /// state now, else off. Under the lock.
    fn refresh_fast(&self, rec: &Record, w: Word) {
        let on = self.lock_free_successes
            && w.state_bits() == CLOSED
            && rec.consecutive_failures == 0
            && (!self.success_can_open
                || rec
                    .window
                    .count_calls()
                    .is_some_and(|calls| calls >= u64::from(self.config.minimum_calls)));
        let value = if on { tag_of(w.epoch()) } else { NO_FAST };
        if self.fast.0.load(Relaxed) != value {
            self.fast.0.store(value, Release);
        }
    }

    /// Records the outcome of an admitted call.
    pub(super) fn finish(&self, ticket: &Ticket, failed: bool) {
        let mut rec = self.lock();
        let current = Word(self.word.load(Acquire));
        self.drain(&mut rec, closed_tag(current), tag_of(current.epoch()));
        self.record(&mut rec, ticket, failed);
        self.refresh_fast(&rec, Word(self.word.load(Acquire)));
    }

    /// [`finish`](Self::finish) after the drain.
    fn record(&self, rec: &mut Record, ticket: &Ticket, failed: bool) {
        let mut now = (ticket.started.is_some() || rec.window.is_time_based()).then(Instant::now);
        let slow = match (ticket.started, now) {
            (Some(started), Some(now)) => {
                now.saturating_duration_since(started) >= self.config.slow_call_duration
            }
            _ => false,
        };
        if failed {
            rec.failed += 1;
            self.handles.failure.increment(1);
        } else if slow {
            rec.slow += 1;
            self.handles.slow.increment(1);
        } else {
            rec.successful += 1;
            self.handles.success.increment(1);
        }

        if ticket.trial {
            self.release_slot();
        }
        let w = Word(self.word.load(Acquire));
        if w.epoch() != ticket.epoch {
            // Admitted by a state that has ended: counted above, but it decides nothing.
            return;
        }
        if ticket.trial {
            debug_assert_eq!(w.state_bits(), HALF_OPEN);
            let now = *now.get_or_insert_with(Instant::now);
            if failed || slow {
                let reason = if failed {
                    "half_open_failure"
                } else {
                    "half_open_slow_call"
                };
                self.transition(rec, w, OPEN, false, now, reason);
            } else {
                rec.half_open_successes = rec.half_open_successes.saturating_add(1);
                if rec.half_open_successes >= self.config.success_threshold {
                    self.transition(rec, w, CLOSED, false, now, "success_threshold");
                }
            }
            return;
        }

        debug_assert_eq!(w.state_bits(), CLOSED);
        let second = now.map_or(0, |now| self.second(now));
        rec.window.record(second, failed, slow);
        rec.consecutive_failures = if failed {
            rec.consecutive_failures.saturating_add(1)
        } else {
            0
        };
        let totals = rec.window.totals(second);
        let min = self.config.minimum_calls;
        let reason = if self
            .config
            .failure_threshold
            .is_some_and(|n| rec.consecutive_failures >= n)
        {
            Some("consecutive_failures")
        } else if totals.reaches(totals.failures, min, self.config.failure_rate_threshold) {
            Some("failure_rate")
        } else if totals.reaches(totals.slow, min, self.config.slow_call_rate_threshold) {
            Some("slow_call_rate")
        } else {
            None
        };
        if let Some(reason) = reason {
            let now = now.unwrap_or_else(Instant::now);
            self.transition(rec, w, OPEN, false, now, reason);
        }
    }

    /// An admitted call ended without an outcome (its permit was dropped): it counts as
    /// nothing, and a trial gives its slot back.
    pub(super) fn cancel(&self, ticket: &Ticket) {
        self.cancelled.fetch_add(1, Relaxed);
        self.handles.cancelled.increment(1);
        if ticket.trial {
            self.release_slot();
        }
    }

    /// Frees the trial slot of a trial that ended, whatever the state is now.
    fn release_slot(&self) {
        let mut cur = self.word.load(Acquire);
        loop {
            let w = Word(cur);
            debug_assert!(w.in_flight() > 0, "a trial slot was freed twice");
            if w.in_flight() == 0 {
                return;
            }
            match self
                .word
                .compare_exchange_weak(cur, cur - IN_FLIGHT_ONE, AcqRel, Acquire)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Moves from `from` (the current state and epoch, read under the lock) to state `to`,
    /// keeping the trial count and, with `reserve`, taking one more trial slot if one is free.
    /// Reports the change; returns the new word and whether the slot was taken.
    fn transition(
        &self,
        rec: &mut Record,
        from: Word,
        to: u64,
        reserve: bool,
        now: Instant,
        reason: &'static str,
    ) -> (Word, bool) {
        // Lock-free successes of the ending period must not land in the next one. Those that
        // landed since this section's first drain came after the call that decided this
        // transition: they are counted, and decide nothing.
        self.fast.0.store(NO_FAST, Release);
        self.drain(rec, None, tag_of(from.epoch().wrapping_add(1)));
        let mut wait = None;
        match to {
            OPEN => {
                rec.consecutive_opens = rec.consecutive_opens.saturating_add(1);
                let d = self.config.open_wait(rec.consecutive_opens);
                let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                let until = self.nanos_since_base(now).saturating_add(nanos);
                // Stored before the word (Release) so that whoever sees the open word sees
                // this deadline.
                self.open_until.store(until, Release);
                wait = Some(d);
            }
            HALF_OPEN => rec.half_open_successes = 0,
            _ => {
                rec.window.clear();
                rec.consecutive_failures = 0;
                rec.half_open_successes = 0;
                rec.consecutive_opens = 0;
            }
        }
        // Under the lock only the trial count can change concurrently (admissions and
        // releases), so the loop only retries to carry the latest count over.
        let permitted = u64::from(self.config.permitted_calls_in_half_open);
        let mut cur = self.word.load(Acquire);
        let (new, reserved) = loop {
            let in_flight = Word(cur).in_flight();
            let reserved = reserve && in_flight < permitted;
            let new = Word::new(
                to,
                in_flight + u64::from(reserved),
                from.epoch().wrapping_add(1),
            );
            match self.word.compare_exchange_weak(cur, new.0, AcqRel, Acquire) {
                Ok(_) => break (new, reserved),
                Err(actual) => cur = actual,
            }
        };
        self.refresh_fast(rec, new);
        self.report(from.state(), new.state(), reason, wait);
        (new, reserved)
    }

    fn report(
        &self,
        from: CircuitState,
        to: CircuitState,
        reason: &'static str,
        wait: Option<Duration>,
    ) {
        self.handles.state.set(gauge_value(to));
        debug_assert!(transition_index(from, to).is_some(), "{from} -> {to}");
        if let Some(i) = transition_index(from, to) {
            self.handles.transitions[i].increment(1);
        }
        if let Some(wait) = wait {
            tracing::warn!(
                circuit = %self.name, %from, %to, reason,
                wait = %humantime::format_duration(wait),
                "circuit breaker opened"
            );
        } else {
            tracing::info!(circuit = %self.name, %from, %to, reason, "circuit breaker state changed");
        }
        if let Some(bus) = &self.bus {
            bus.publish(HaEvent::CircuitStateChanged {
                at: SystemTime::now(),
                node: self.node.clone(),
                circuit: self.name.to_string(),
                from,
                to,
            });
        }
    }

    pub(super) fn snapshot(&self) -> BreakerSnapshot {
        let mut rec = self.lock();
        let w = Word(self.word.load(Acquire));
        self.drain(&mut rec, closed_tag(w), tag_of(w.epoch()));
        self.refresh_fast(&rec, w);
        let now = Instant::now();
        let totals = rec.window.totals(self.second(now));
        let min = self.config.minimum_calls;
        let retry_after = (w.state_bits() == OPEN).then(|| {
            let until = self.open_until.load(Acquire);
            Duration::from_nanos(until.saturating_sub(self.nanos_since_base(now)))
        });
        BreakerSnapshot {
            state: w.state(),
            window_calls: totals.calls,
            window_failures: totals.failures,
            window_slow_calls: totals.slow,
            failure_rate: totals.rate(totals.failures, min),
            slow_call_rate: totals.rate(totals.slow, min),
            consecutive_failures: rec.consecutive_failures,
            trials_in_flight: u32::try_from(w.in_flight()).unwrap_or(u32::MAX),
            half_open_successes: rec.half_open_successes,
            consecutive_opens: rec.consecutive_opens,
            retry_after,
            successful_calls: rec.successful,
            failed_calls: rec.failed,
            slow_calls: rec.slow,
            rejected_calls: self.rejected.load(Relaxed),
            cancelled_calls: self.cancelled.load(Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Record> {
        // Nothing under the lock calls user code, and every update leaves the record
        // consistent before anything that could panic (a metrics recorder, a subscriber
        // of tracing) runs, so a poisoned lock still guards a usable record.
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nanos_since_base(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_packs_and_unpacks() {
        let w = Word::new(HALF_OPEN, 7, 12345);
        assert_eq!(w.state(), CircuitState::HalfOpen);
        assert_eq!(w.in_flight(), 7);
        assert_eq!(w.epoch(), 12345);
        assert_eq!(Word(w.0 + IN_FLIGHT_ONE).in_flight(), 8);
        let wrapped = Word::new(OPEN, 0, EPOCH_MASK.wrapping_add(1));
        assert_eq!(wrapped.epoch(), 0);
        assert_eq!(wrapped.state(), CircuitState::Open);
    }
}
