//! The manager's state and the task that drives it: requests, the queue, dispatch in
//! dependency order under the concurrency limit and the leadership gate, the run of one
//! failover, and the bookkeeping when it ends.
//!
//! One mutex guards the whole state (per-component counters and phases, the queue counts, the
//! history). It is held for bookkeeping only — never across an `.await`, never while an
//! action runs — and events are published while it is held, so subscribers see them in the
//! order the state changed, and a record is in the history before the event announcing it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use ha_core::backoff::Backoff;
use ha_core::{
    ComponentContext, EventBus, EventSubscriber, FencingToken, HaEvent, Leadership, LeadershipGate,
    NodeId, RecvError, Status, TryRecvError, metric,
};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::config::{ComponentConfig, FailoverConfig, HealthEvents};
use super::history::{
    FailoverRecord, FailureKind, History, Outcome, SkipReason, Step, StepFailure, Trigger,
    TriggerSource,
};
use super::tracker::{Edge, Tracker};
use super::unwind::CatchUnwind;
use super::{ComponentState, Phase as PublicPhase, Plan};
use crate::Error;
use crate::action::{ActionContext, ActionError, FailoverAction};

/// A registered component.
struct Entry {
    name: Arc<str>,
    action: Arc<dyn FailoverAction>,
    config: ComponentConfig,
    metrics: ComponentMetrics,
}

impl Entry {
    fn new(name: Arc<str>, action: Arc<dyn FailoverAction>, config: ComponentConfig) -> Self {
        let metrics = ComponentMetrics::register(&name);
        Self {
            name,
            action,
            config,
            metrics,
        }
    }
}

/// Metric handles of one component, registered when the manager starts.
struct ComponentMetrics {
    triggers: metrics::Counter,
    /// By [`SkipReason`], in the order of [`skip_index`].
    skipped: [metrics::Counter; 5],
    /// `completed`, `failed`, `timed_out`, `verify_failed`, `stopped_leading`.
    runs: [metrics::Counter; 5],
    /// `rolled_back`, `failed`, `timed_out`, `unsupported`.
    rollbacks: [metrics::Counter; 4],
    duration: metrics::Histogram,
}

impl ComponentMetrics {
    fn register(name: &Arc<str>) -> Self {
        let labelled = |metric: &'static str, label: &'static str, value: &'static str| metrics::counter!(metric, "component" => Arc::clone(name), label => value);
        let skipped = [
            SkipReason::NotLeader,
            SkipReason::Cooldown,
            SkipReason::QueueFull,
            SkipReason::Shutdown,
            SkipReason::Stale,
        ]
        .map(|r| labelled(metric::FAILOVER_SKIPPED_TOTAL, "reason", r.as_str()));
        Self {
            triggers: metrics::counter!(metric::FAILOVER_TRIGGERS_TOTAL, "component" => Arc::clone(name)),
            skipped,
            runs: [
                "completed",
                "failed",
                "timed_out",
                "verify_failed",
                "stopped_leading",
            ]
            .map(|o| labelled(metric::FAILOVERS_TOTAL, "outcome", o)),
            rollbacks: ["rolled_back", "failed", "timed_out", "unsupported"]
                .map(|o| labelled(metric::FAILOVER_ROLLBACKS_TOTAL, "outcome", o)),
            duration: metrics::histogram!(metric::FAILOVER_DURATION_SECONDS, "component" => Arc::clone(name)),
        }
    }
}

fn skip_index(reason: SkipReason) -> usize {
    match reason {
        SkipReason::NotLeader => 0,
        SkipReason::Cooldown => 1,
        SkipReason::QueueFull => 2,
        SkipReason::Shutdown => 3,
        SkipReason::Stale => 4,
    }
}

/// A failover asked for and not yet run.
#[derive(Debug)]
struct Request {
    id: u64,
    trigger: Trigger,
    /// Which try at this outage it is (from 1).
    try_number: u32,
    /// The sleeps before its retries.
    backoff: Backoff,
    /// Whether its wait for leadership is in the history already (one record per request).
    noted_not_leader: bool,
    /// Whether its wait for room in the queue is in the history already.
    noted_queue_full: bool,
}

/// Why a request waits outside the queue.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wait {
    Cooldown,
    Leadership,
    /// A try that did not complete, before the next.
    Retry,
    /// The queue was full.
    QueueFull,
}

impl Wait {
    /// Whether a dependent must wait for this request's failover: it is still to run in its
    /// turn. A wait for room in the queue does not hold dependents back, or a queue full of
    /// dependents would never let their dependencies in.
    fn holds_dependents(self) -> bool {
        matches!(self, Wait::Cooldown | Wait::Retry | Wait::Leadership)
    }
}

/// Where a component is in the failover machinery.
#[derive(Debug)]
enum Phase {
    Idle,
    /// In the queue, waiting for a slot (and for its dependencies' failovers).
    Queued(Request),
    /// A failover runs. `deferred`: the component recovered and failed again meanwhile; that
    /// request waits for the cooldown after this run.
    Running {
        deferred: Option<Request>,
    },
    /// Waiting for `until`, then back to the queue.
    Waiting {
        request: Request,
        until: Instant,
        why: Wait,
    },
}

/// Everything that changes, under one lock.
struct State {
    trackers: Vec<Tracker>,
    phases: Vec<Phase>,
    /// When the last failover of each component that ran ended.
    last_end: Vec<Option<Instant>>,
    queued: usize,
    running: usize,
    next_id: u64,
    history: History,
    stopped: bool,
}

impl State {
    fn next_deadline(&self) -> Option<Instant> {
        self.phases
            .iter()
            .filter_map(|p| match p {
                Phase::Waiting { until, .. } => Some(*until),
                _ => None,
            })
            .min()
    }
}

/// What the manager handle and the tasks of one start share.
pub(crate) struct Shared {
    node: NodeId,
    bus: EventBus,
    gate: Arc<dyn LeadershipGate>,
    config: FailoverConfig,
    components: Vec<Entry>,
    index: HashMap<Arc<str>, usize>,
    /// Every component, dependencies first (then registration order).
    order: Vec<usize>,
    /// Every component each one depends on, directly or not.
    ancestors: Vec<Vec<usize>>,
    state: Mutex<State>,
    wake: Notify,
    pub(crate) shutdown: CancellationToken,
    tasks: TaskTracker,
    in_flight_gauge: metrics::Gauge,
    queued_gauge: metrics::Gauge,
}

impl Shared {
    /// The state of one start of `plan`, in `ctx`, ending when `shutdown` is cancelled.
    /// Registers the metric handles.
    pub(crate) fn new(plan: &Plan, ctx: ComponentContext, shutdown: CancellationToken) -> Self {
        let config = plan.config.clone();
        let components: Vec<Entry> = plan
            .components
            .iter()
            .map(|(name, action, config)| {
                Entry::new(Arc::clone(name), Arc::clone(action), config.clone())
            })
            .collect();
        let state = State {
            trackers: components
                .iter()
                .map(|e| Tracker::new(e.config.failure_threshold, e.config.recovery_threshold))
                .collect(),
            phases: components.iter().map(|_| Phase::Idle).collect(),
            last_end: vec![None; components.len()],
            queued: 0,
            running: 0,
            next_id: 1,
            history: History::new(config.history_capacity),
            stopped: false,
        };
        let in_flight_gauge = metrics::gauge!(metric::FAILOVER_IN_FLIGHT);
        let queued_gauge = metrics::gauge!(metric::FAILOVER_QUEUED);
        in_flight_gauge.set(0.0);
        queued_gauge.set(0.0);
        Self {
            node: ctx.node,
            bus: ctx.bus,
            gate: ctx.leadership,
            config,
            components,
            index: plan.index.clone(),
            order: plan.order.clone(),
            ancestors: plan.ancestors.clone(),
            state: Mutex::new(state),
            wake: Notify::new(),
            shutdown,
            tasks: TaskTracker::new(),
            in_flight_gauge,
            queued_gauge,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock calls an action; every update leaves the state consistent
        // before anything that could panic (a metrics recorder, a tracing subscriber) runs.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, event: HaEvent) {
        self.bus.publish(event);
    }

    fn set_gauges(&self, st: &State) {
        self.in_flight_gauge.set(st.running as f64);
        self.queued_gauge.set(st.queued as f64);
    }

    // -----------------------------------------------------------------------------------------
    // Reports and requests
    // -----------------------------------------------------------------------------------------

    /// One report (or health event) about component `idx`.
    pub(crate) fn observe(
        &self,
        idx: usize,
        failed: bool,
        confirmed: bool,
        source: TriggerSource,
        cause: Option<String>,
    ) -> Result<(), Error> {
        let mut st = self.lock();
        if st.stopped {
            return Err(Error::Stopped);
        }
        let tracker = &mut st.trackers[idx];
        let edge = if confirmed {
            tracker.observe_confirmed(failed)
        } else {
            tracker.observe(failed)
        };
        let consecutive_failures = tracker.failures();
        let entry = &self.components[idx];
        let result = match edge {
            Some(Edge::Tripped) => {
                entry.metrics.triggers.increment(1);
                let id = st.next_id;
                st.next_id += 1;
                tracing::warn!(
                    component = %entry.name, attempt = id, consecutive_failures,
                    source = ?source, cause = cause.as_deref().unwrap_or(""),
                    "failure threshold crossed: failover requested"
                );
                let request = Request {
                    id,
                    trigger: Trigger {
                        at: SystemTime::now(),
                        source,
                        consecutive_failures,
                        cause,
                    },
                    try_number: 1,
                    backoff: Backoff::new(entry.config.retry_backoff.clone()),
                    noted_not_leader: false,
                    noted_queue_full: false,
                };
                self.request(&mut st, idx, request)
            }
            Some(Edge::Recovered) => {
                self.recovered(&mut st, idx);
                Ok(())
            }
            None => Ok(()),
        };
        drop(st);
        self.wake.notify_one();
        result
    }

    /// A new request for component `idx`.
    fn request(&self, st: &mut State, idx: usize, request: Request) -> Result<(), Error> {
        let now = Instant::now();
        match &st.phases[idx] {
            Phase::Idle => {
                let cooldown = self.components[idx].config.cooldown;
                match st.last_end[idx].map(|end| end + cooldown) {
                    Some(until) if until > now => {
                        let left = humantime::format_duration(round_ms(until - now));
                        self.skip(
                            st,
                            idx,
                            &request,
                            SkipReason::Cooldown,
                            format!("in its cooldown after the last failover; waits {left}"),
                        );
                        st.phases[idx] = Phase::Waiting {
                            request,
                            until,
                            why: Wait::Cooldown,
                        };
                        Ok(())
                    }
                    _ => self.enqueue(st, idx, request),
                }
            }
            Phase::Running { .. } => {
                self.skip(
                    st,
                    idx,
                    &request,
                    SkipReason::Cooldown,
                    "a failover of it is running; waits for the cooldown after it".into(),
                );
                if let Phase::Running { deferred } = &mut st.phases[idx] {
                    *deferred = Some(request);
                }
                Ok(())
            }
            // Asked already (it failed, recovered and failed again before that request ran):
            // the request in place covers this episode too.
            Phase::Queued(_) | Phase::Waiting { .. } => Ok(()),
        }
    }

    /// Puts `request` in the queue; if the queue is full, it waits outside and asks again
    /// every `leadership_retry_interval` (recorded, and returned as an error, the first time
    /// only).
    fn enqueue(&self, st: &mut State, idx: usize, mut request: Request) -> Result<(), Error> {
        let capacity = self.config.max_queued_failovers;
        if st.queued >= capacity {
            let first = !request.noted_queue_full;
            if first {
                request.noted_queue_full = true;
                self.skip(
                    st,
                    idx,
                    &request,
                    SkipReason::QueueFull,
                    format!(
                        "the failover queue is full ({capacity} waiting); waits outside it and \
                         asks again while the component stays down"
                    ),
                );
            }
            st.phases[idx] = Phase::Waiting {
                request,
                until: Instant::now() + self.config.leadership_retry_interval,
                why: Wait::QueueFull,
            };
            return if first {
                Err(Error::QueueFull {
                    component: self.components[idx].name.to_string(),
                    capacity,
                })
            } else {
                Ok(())
            };
        }
        st.phases[idx] = Phase::Queued(request);
        st.queued += 1;
        self.set_gauges(st);
        Ok(())
    }

    fn recovered(&self, st: &mut State, idx: usize) {
        let name = &self.components[idx].name;
        match &mut st.phases[idx] {
            Phase::Waiting { request, .. } => {
                tracing::info!(
                    component = %name, attempt = request.id,
                    "component recovered: the failover waiting for it is no longer needed"
                );
                st.phases[idx] = Phase::Idle;
            }
            Phase::Running { deferred } => {
                *deferred = None;
                tracing::info!(component = %name, "component recovered");
            }
            // A queued failover still runs: it was accepted, and the recovery may be its
            // dependency's failover taking effect.
            Phase::Queued(_) | Phase::Idle => {
                tracing::info!(component = %name, "component recovered");
            }
        }
    }

    /// Records that `request` did not run, and why.
    fn skip(
        &self,
        st: &mut State,
        idx: usize,
        request: &Request,
        reason: SkipReason,
        detail: String,
    ) {
        let entry = &self.components[idx];
        entry.metrics.skipped[skip_index(reason)].increment(1);
        tracing::warn!(
            component = %entry.name, attempt = request.id, reason = reason.as_str(), %detail,
            "failover skipped"
        );
        let at = SystemTime::now();
        st.history.push(FailoverRecord {
            id: request.id,
            component: entry.name.to_string(),
            trigger: request.trigger.clone(),
            started_at: None,
            ended_at: at,
            duration: Duration::ZERO,
            outcome: Outcome::Skipped { reason },
            token: None,
            try_number: request.try_number,
            gave_up: false,
        });
        self.publish(HaEvent::FailoverSkipped {
            at,
            node: self.node.clone(),
            component: entry.name.to_string(),
            reason: detail,
        });
    }

    // -----------------------------------------------------------------------------------------
    // Dispatch
    // -----------------------------------------------------------------------------------------

    /// Moves due waits back to the queue, then starts queued failovers while slots are free.
    fn dispatch(self: &Arc<Self>, st: &mut State) {
        let now = Instant::now();
        for idx in 0..st.phases.len() {
            if matches!(&st.phases[idx], Phase::Waiting { until, .. } if *until <= now) {
                let Phase::Waiting { request, .. } =
                    std::mem::replace(&mut st.phases[idx], Phase::Idle)
                else {
                    continue;
                };
                // A refusal is recorded where it happens.
                let _ = self.enqueue(st, idx, request);
            }
        }
        while st.running < self.config.max_concurrent_failovers {
            let Some(idx) = self.next_ready(st) else {
                break;
            };
            // Checked before every start: a node that stopped leading starts nothing.
            let Some(leadership) = self.gate.is_leader() else {
                self.park_for_leadership(st, now);
                break;
            };
            if self.drop_if_stale(st, idx) {
                continue;
            }
            self.start(st, idx, leadership);
        }
    }

    /// The first queued component, in dependency order, none of whose dependencies (direct or
    /// not) has a failover still to run: queued, running, or waiting for its cooldown, its
    /// retry or leadership. A cooldown of a dependency therefore holds its dependents back.
    fn next_ready(&self, st: &State) -> Option<usize> {
        self.order.iter().copied().find(|&i| {
            matches!(st.phases[i], Phase::Queued(_))
                && self.ancestors[i].iter().all(|&a| match &st.phases[a] {
                    Phase::Idle => true,
                    Phase::Queued(_) | Phase::Running { .. } => false,
                    Phase::Waiting { why, .. } => !why.holds_dependents(),
                })
        })
    }

    /// This node does not lead: every queued request waits and asks the gate again later.
    fn park_for_leadership(&self, st: &mut State, now: Instant) {
        let until = now + self.config.leadership_retry_interval;
        for idx in 0..st.phases.len() {
            if !matches!(st.phases[idx], Phase::Queued(_)) {
                continue;
            }
            let Phase::Queued(mut request) = std::mem::replace(&mut st.phases[idx], Phase::Idle)
            else {
                continue;
            };
            st.queued -= 1;
            if !request.noted_not_leader {
                request.noted_not_leader = true;
                self.skip(
                    st,
                    idx,
                    &request,
                    SkipReason::NotLeader,
                    "this node does not lead; waits until it does".into(),
                );
            }
            st.phases[idx] = Phase::Waiting {
                request,
                until,
                why: Wait::Leadership,
            };
        }
        self.set_gauges(st);
    }

    /// A request that waited for leadership acts on the state it was asked in; by the time this
    /// node leads, that state may be gone (the previous leader handled the outage, or it
    /// ended below the recovery threshold). Such a request starts only while the
    /// component's latest report is still a failure; otherwise it is dropped and recorded as
    /// [`SkipReason::Stale`]. Returns whether it was dropped.
    fn drop_if_stale(&self, st: &mut State, idx: usize) -> bool {
        let stale = matches!(&st.phases[idx], Phase::Queued(request) if request.noted_not_leader)
            && st.trackers[idx].failures() == 0;
        if !stale {
            return false;
        }
        let Phase::Queued(request) = std::mem::replace(&mut st.phases[idx], Phase::Idle) else {
            return false;
        };
        st.queued -= 1;
        st.trackers[idx].stand_down();
        self.skip(
            st,
            idx,
            &request,
            SkipReason::Stale,
            "waited for leadership, and the component's latest report is no longer a failure: \
             the outage ended or was handled meanwhile; a new failure streak asks afresh"
                .into(),
        );
        self.set_gauges(st);
        true
    }

    fn start(self: &Arc<Self>, st: &mut State, idx: usize, leadership: Leadership) {
        let Phase::Queued(request) =
            std::mem::replace(&mut st.phases[idx], Phase::Running { deferred: None })
        else {
            unreachable!("only queued components are started");
        };
        st.queued -= 1;
        st.running += 1;
        self.set_gauges(st);
        let entry = &self.components[idx];
        let token = leadership.token;
        tracing::info!(component = %entry.name, attempt = request.id, %token, "failover started");
        self.publish(HaEvent::FailoverStarted {
            at: SystemTime::now(),
            node: self.node.clone(),
            component: entry.name.to_string(),
            token: Some(token),
        });
        let ctx = ActionContext::new(
            Arc::clone(&entry.name),
            self.node.clone(),
            request.id,
            leadership,
            Arc::clone(&self.gate),
        );
        let span = tracing::info_span!(
            "failover",
            component = %entry.name,
            attempt = request.id,
            %token,
            node = %self.node
        );
        let shared = Arc::clone(self);
        self.tasks
            .spawn(async move { shared.run(idx, request, ctx).await }.instrument(span));
    }

    // -----------------------------------------------------------------------------------------
    // One failover
    // -----------------------------------------------------------------------------------------

    async fn run(self: Arc<Self>, idx: usize, request: Request, ctx: ActionContext) {
        let entry = &self.components[idx];
        let (action, timeout) = (&entry.action, entry.config.timeout);
        let started_at = SystemTime::now();
        let started = Instant::now();
        // The gate is asked before every step: a deposed leader neither verifies nor undoes
        // what the new leader may already be doing.
        let leads = || ctx.ensure_leader().is_ok();
        let outcome = if !leads() {
            Outcome::StoppedLeading {
                skipped: Step::Failover,
                failure: None,
            }
        } else {
            match step(Step::Failover, timeout, action.failover(&ctx)).await {
                Ok(()) if !leads() => Outcome::StoppedLeading {
                    skipped: Step::Verify,
                    failure: None,
                },
                Ok(()) => match step(Step::Verify, timeout, action.verify(&ctx)).await {
                    Ok(()) => Outcome::Completed,
                    Err(failure) => undo(action.as_ref(), &ctx, timeout, failure).await,
                },
                Err(failure) if failure.is_timeout() => {
                    tracing::warn!(%failure, "failover timed out: its effect is unknown");
                    match undo(action.as_ref(), &ctx, timeout, failure).await {
                        Outcome::RolledBack { failure } => Outcome::EffectUnknown {
                            failure,
                            rollback: None,
                        },
                        Outcome::RollbackFailed { failure, rollback }
                        | Outcome::Irreversible { failure, rollback } => Outcome::EffectUnknown {
                            failure,
                            rollback: Some(rollback),
                        },
                        other => other,
                    }
                }
                Err(failure) => undo(action.as_ref(), &ctx, timeout, failure).await,
            }
        };
        self.finish(
            idx,
            request,
            ctx.token(),
            started_at,
            started.elapsed(),
            outcome,
        );
    }

    fn finish(
        &self,
        idx: usize,
        request: Request,
        token: FencingToken,
        started_at: SystemTime,
        duration: Duration,
        outcome: Outcome,
    ) {
        let entry = &self.components[idx];
        let mut st = self.lock();
        st.running -= 1;
        self.set_gauges(&st);
        let now = Instant::now();
        // The cooldown guards against switching a component that was just switched; a run
        // that was cleanly rolled back switched nothing.
        let changed = outcome.may_have_changed();
        if changed {
            st.last_end[idx] = Some(now);
        }
        entry.metrics.duration.record(duration.as_secs_f64());
        entry.metrics.runs[run_index(&outcome)].increment(1);
        let rollback = match &outcome {
            Outcome::RolledBack { .. } | Outcome::EffectUnknown { rollback: None, .. } => Some(0),
            Outcome::RollbackFailed { rollback, .. }
            | Outcome::Irreversible { rollback, .. }
            | Outcome::EffectUnknown {
                rollback: Some(rollback),
                ..
            } => Some(match rollback.kind {
                FailureKind::TimedOut(_) => 2,
                FailureKind::Unsupported(_) => 3,
                FailureKind::Error(_) | FailureKind::Panicked(_) => 1,
            }),
            Outcome::Completed | Outcome::StoppedLeading { .. } | Outcome::Skipped { .. } => None,
        };
        if let Some(i) = rollback {
            entry.metrics.rollbacks[i].increment(1);
        }

        let deferred = match std::mem::replace(&mut st.phases[idx], Phase::Idle) {
            Phase::Running { deferred } => deferred,
            other => {
                debug_assert!(false, "finished a failover that was not running: {other:?}");
                None
            }
        };
        let still_down = st.trackers[idx].is_tripped();
        let completed = outcome == Outcome::Completed;
        let stopped_leading = matches!(outcome, Outcome::StoppedLeading { .. });
        let try_number = request.try_number;
        let max_attempts = entry.config.max_attempts;
        // What comes next for this component: a new outage seen during the run (it waits for
        // the cooldown if this run may have changed something), else another try at this
        // one while it stays down.
        let mut retry_in = None;
        let mut next = None;
        if let Some(request) = deferred {
            let until = if changed {
                now + entry.config.cooldown
            } else {
                now
            };
            next = Some((request, until, Wait::Cooldown));
        } else if still_down && !completed {
            let id = st.next_id;
            st.next_id += 1;
            let mut retry = Request {
                id,
                trigger: request.trigger.clone(),
                try_number,
                backoff: request.backoff.clone(),
                noted_not_leader: stopped_leading,
                noted_queue_full: false,
            };
            if stopped_leading {
                // Not this node's to finish: it waits to lead again, as a new try's record
                // would say nothing new.
                let until = now + self.config.leadership_retry_interval;
                next = Some((retry, until, Wait::Leadership));
            } else if try_number < max_attempts {
                retry.try_number += 1;
                let delay = retry.backoff.next().unwrap_or(Duration::ZERO);
                retry_in = Some(delay);
                next = Some((retry, now + delay, Wait::Retry));
            }
        }
        let gave_up = !completed && !stopped_leading && still_down && next.is_none();
        if gave_up {
            // One success now ends this outage, so the next failures are a new one.
            st.trackers[idx].give_up();
        }
        if let Some((request, until, why)) = next {
            st.phases[idx] = Phase::Waiting {
                request,
                until,
                why,
            };
        }

        let record = FailoverRecord {
            id: request.id,
            component: entry.name.to_string(),
            trigger: request.trigger,
            started_at: Some(started_at),
            ended_at: SystemTime::now(),
            duration,
            outcome,
            token: Some(token),
            try_number,
            gave_up,
        };
        let error = record.error();
        let outcome = record.outcome.clone();
        st.history.push(record);

        let (at, node, component) = (SystemTime::now(), self.node.clone(), entry.name.to_string());
        let took = humantime::format_duration(round_ms(duration));
        let mut reason = error.unwrap_or_default();
        if gave_up {
            reason = format!("gave up after {try_number} of {max_attempts} tries: {reason}");
        }
        match outcome {
            Outcome::Completed => {
                tracing::info!(took = %took, "failover completed");
                self.publish(HaEvent::FailoverCompleted {
                    at,
                    node,
                    component,
                    token: Some(token),
                    duration,
                });
                drop(st);
                self.wake.notify_one();
                return;
            }
            Outcome::RolledBack { failure } => {
                tracing::warn!(took = %took, %reason, "failover failed and was rolled back");
                self.publish(HaEvent::FailoverRolledBack {
                    at,
                    node: node.clone(),
                    component: component.clone(),
                    token: Some(token),
                    reason: failure.to_string(),
                });
            }
            _ => tracing::error!(took = %took, %reason, "failover failed and was not rolled back"),
        }
        match retry_in {
            // The outage is not over and another try follows: the event that ends it comes
            // with the last try, so one outage that is never fixed reports one failure.
            Some(delay) => tracing::warn!(
                try_number, max_attempts,
                retry_in = %humantime::format_duration(round_ms(delay)),
                "failover will be tried again"
            ),
            None => self.publish(HaEvent::FailoverFailed {
                at,
                node,
                component,
                token: Some(token),
                reason,
            }),
        }
        drop(st);
        self.wake.notify_one();
    }

    // -----------------------------------------------------------------------------------------
    // The driver task
    // -----------------------------------------------------------------------------------------

    /// Runs until shutdown: dispatches after every change, wakes for due waits, and turns
    /// health events into reports.
    pub(crate) async fn drive(self: Arc<Self>, mut health: Option<EventSubscriber>) {
        loop {
            let next = {
                let mut st = self.lock();
                self.dispatch(&mut st);
                st.next_deadline()
            };
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                event = next_event(&mut health) => self.on_event(event, &mut health),
                () = sleep_until(next) => {}
            }
        }
        self.stop().await;
    }

    /// Handles `first` and every event already waiting behind it, so that failures reported
    /// together are queued together and started in dependency order.
    fn on_event(&self, first: Result<HaEvent, RecvError>, health: &mut Option<EventSubscriber>) {
        let mut next = Some(first);
        while let Some(event) = next.take() {
            match event {
                Ok(event) => self.on_health(&event),
                Err(RecvError::Lagged { missed }) => tracing::warn!(
                    missed,
                    "the failover manager missed health events; statuses may be stale until \
                     the next change"
                ),
                Err(_) => {
                    tracing::warn!("the health event bus closed; only reports count from now on");
                    *health = None;
                    return;
                }
            }
            next = match health.as_mut().map(EventSubscriber::try_recv) {
                None | Some(Err(TryRecvError::Empty)) => None,
                Some(Ok(event)) => Some(Ok(event)),
                Some(Err(TryRecvError::Lagged { missed })) => {
                    Some(Err(RecvError::Lagged { missed }))
                }
                Some(Err(_)) => Some(Err(RecvError::Closed)),
            };
        }
    }

    fn on_health(&self, event: &HaEvent) {
        let HaEvent::HealthChanged {
            component,
            to,
            cause,
            ..
        } = event
        else {
            return;
        };
        let Some(&idx) = self.index.get(component.as_str()) else {
            return;
        };
        let failed = match to {
            Status::Unhealthy => true,
            Status::Healthy | Status::Degraded => false,
            // Says nothing either way.
            Status::Unknown => return,
        };
        let confirmed = self.config.health_events == HealthEvents::Transitions;
        // A refusal is recorded and published where it happens; there is no caller to tell.
        let _ = self.observe(
            idx,
            failed,
            confirmed,
            TriggerSource::HealthEvent,
            cause.clone(),
        );
    }

    /// Stops taking requests, records the ones that will not run, and waits for running
    /// failovers to end (each step is bounded by its timeout).
    async fn stop(&self) {
        {
            let mut st = self.lock();
            st.stopped = true;
            for idx in 0..st.phases.len() {
                let request = match std::mem::replace(&mut st.phases[idx], Phase::Idle) {
                    Phase::Queued(request) | Phase::Waiting { request, .. } => request,
                    running @ Phase::Running { .. } => {
                        st.phases[idx] = running;
                        continue;
                    }
                    Phase::Idle => continue,
                };
                self.skip(
                    &mut st,
                    idx,
                    &request,
                    SkipReason::Shutdown,
                    "the failover manager shut down before it ran".into(),
                );
            }
            st.queued = 0;
            self.set_gauges(&st);
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    // -----------------------------------------------------------------------------------------
    // Reading
    // -----------------------------------------------------------------------------------------

    pub(crate) fn node(&self) -> &NodeId {
        &self.node
    }

    pub(crate) fn history(&self) -> Vec<FailoverRecord> {
        self.lock().history.to_vec()
    }

    pub(crate) fn component_state(&self, idx: usize) -> ComponentState {
        let st = self.lock();
        let tracker = &st.trackers[idx];
        let phase = match &st.phases[idx] {
            Phase::Idle => PublicPhase::Idle,
            Phase::Queued(_) => PublicPhase::Queued,
            Phase::Running { .. } => PublicPhase::Running,
            Phase::Waiting { until, why, .. } => {
                let left = until.saturating_duration_since(Instant::now());
                match why {
                    Wait::Cooldown => PublicPhase::WaitingForCooldown { left },
                    Wait::Leadership => PublicPhase::WaitingForLeadership,
                    Wait::Retry => PublicPhase::WaitingToRetry { left },
                    Wait::QueueFull => PublicPhase::WaitingForQueue,
                }
            }
        };
        ComponentState {
            consecutive_failures: tracker.failures(),
            consecutive_successes: tracker.successes(),
            failed: tracker.is_tripped(),
            phase,
        }
    }

    pub(crate) fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.running, st.queued)
    }
}

/// The `ha_failovers_total` outcome label of a run.
fn run_index(outcome: &Outcome) -> usize {
    if matches!(outcome, Outcome::StoppedLeading { .. }) {
        return 4;
    }
    match outcome.failure() {
        None => 0,
        Some(f) if f.is_timeout() => 2,
        Some(f) if f.step == Step::Verify => 3,
        Some(_) => 1,
    }
}

/// After `failure`: the rollback, unless the action declares it cannot undo its effect or
/// this node no longer leads under the failover's token.
async fn undo(
    action: &dyn FailoverAction,
    ctx: &ActionContext,
    timeout: Duration,
    failure: StepFailure,
) -> Outcome {
    if !action.can_roll_back() {
        return Outcome::Irreversible {
            failure,
            rollback: StepFailure {
                step: Step::Rollback,
                kind: FailureKind::Unsupported(
                    "the action declares that its effect cannot be undone".into(),
                ),
            },
        };
    }
    if ctx.ensure_leader().is_err() {
        return Outcome::StoppedLeading {
            skipped: Step::Rollback,
            failure: Some(failure),
        };
    }
    tracing::warn!(%failure, "failover did not complete; rolling back");
    match step(Step::Rollback, timeout, action.rollback(ctx)).await {
        Ok(()) => Outcome::RolledBack { failure },
        Err(rollback) if matches!(rollback.kind, FailureKind::Unsupported(_)) => {
            Outcome::Irreversible { failure, rollback }
        }
        Err(rollback) => Outcome::RollbackFailed { failure, rollback },
    }
}

/// Runs one step under `timeout`. At the timeout the step's future is dropped — the action
/// is cancelled — before this returns.
async fn step(
    step: Step,
    timeout: Duration,
    action: impl Future<Output = Result<(), ActionError>>,
) -> Result<(), StepFailure> {
    let kind = match tokio::time::timeout(timeout, CatchUnwind::new(action)).await {
        Ok(Ok(Ok(()))) => return Ok(()),
        Ok(Ok(Err(ActionError::Unsupported { what }))) => FailureKind::Unsupported(what),
        Ok(Ok(Err(e))) => FailureKind::Error(e.chain()),
        Ok(Err(panic)) => FailureKind::Panicked(panic),
        Err(_) => FailureKind::TimedOut(timeout),
    };
    Err(StepFailure { step, kind })
}

async fn next_event(health: &mut Option<EventSubscriber>) -> Result<HaEvent, RecvError> {
    match health {
        Some(subscriber) => subscriber.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// `d` to the millisecond, for messages.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
