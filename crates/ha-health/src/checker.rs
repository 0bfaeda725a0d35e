//! [`HealthChecker`]: runs every check on its own schedule and keeps what they found.
//!
//! Each check runs in its own task: a hung check holds up nobody else, and its run is
//! cancelled at its timeout. Ticks missed while a run was in flight are skipped, never piled
//! up, so runs of one check never overlap. A semaphore bounds how many checks run at the same
//! moment. After the first run, which every check does at once, each check's ticks are
//! offset by a fixed fraction of its interval (golden-ratio spacing by registration order),
//! so ten thousand checks with the same interval do not all fire in the same millisecond.
//!
//! [`HealthCheckerBuilder::build`] validates and returns an unstarted checker, every check
//! `Unknown`; [`Component::start`] with a [`ComponentContext`] spawns the tasks and returns
//! at once; statuses appear as first runs finish. The checker publishes as `ctx.node` on
//! `ctx.bus` and stops when `ctx.shutdown` is cancelled or at [`Component::stop`].
//!
//! ```
//! use std::time::Duration;
//! use ha_core::{Component, ComponentContext, Status};
//! use ha_health::{CheckConfig, CheckResult, HealthCheck, HealthChecker};
//!
//! /// A check that always finds the same thing.
//! struct Fixed(&'static str, CheckResult);
//!
//! #[async_trait::async_trait]
//! impl HealthCheck for Fixed {
//!     fn name(&self) -> &str { self.0 }
//!     async fn check(&self) -> CheckResult { self.1.clone() }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let every_second = CheckConfig::default().interval(Duration::from_secs(1));
//! let checker = HealthChecker::builder()
//!     .check(Fixed("db", CheckResult::unhealthy("connection refused")), every_second.clone())
//!     .check(Fixed("api", CheckResult::healthy("ok")), every_second.depends_on("db"))
//!     .build()?;
//! checker.start(ComponentContext::standalone("n1")).await?;
//! assert_eq!(checker.status(), Status::Unknown); // nothing has run yet
//!
//! tokio::time::sleep(Duration::from_millis(2500)).await; // three failed runs of `db`
//! let report = checker.report();
//! assert_eq!(report.status, Status::Unhealthy);
//! assert_eq!(report.checks[1].name, "api");
//! assert_eq!(report.checks[1].cause.as_deref(), Some("dependency db is unhealthy"));
//! checker.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ha_core::config::Validate;
use ha_core::sync::lock;
use ha_core::{
    Component, ComponentContext, ComponentTasks, EventBus, HaEvent, NodeId, Status, metric,
};
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Error;
use crate::anomaly::{self, Anomaly};
use crate::baseline::{Baseline, Observation};
use crate::check::{CheckResult, HealthCheck};
use crate::config::{CheckConfig, CheckerConfig};
use crate::graph::{DependencyGraph, Resolved};
use crate::phi::{PhiAccrualDetector, Suspicion};
use crate::report::{CheckReport, HealthReport, LatencySummary};
use crate::rollup;
use crate::threshold::ThresholdState;

/// Builds an unstarted [`HealthChecker`].
#[must_use]
pub struct HealthCheckerBuilder {
    config: CheckerConfig,
    checks: Vec<(Arc<dyn HealthCheck>, CheckConfig)>,
}

impl HealthCheckerBuilder {
    /// Checker-wide settings (default [`CheckerConfig::default`]).
    pub fn config(mut self, config: CheckerConfig) -> Self {
        self.config = config;
        self
    }

    /// Registers a check with its settings. Names, dependencies and settings are validated
    /// by [`build`](Self::build).
    pub fn check(self, check: impl HealthCheck, config: CheckConfig) -> Self {
        self.check_arc(Arc::new(check), config)
    }

    /// Registers a check that is already shared.
    pub fn check_arc(mut self, check: Arc<dyn HealthCheck>, config: CheckConfig) -> Self {
        self.checks.push((check, config));
        self
    }

    /// Validates everything and returns the checker, not started: every check `Unknown`
    /// until [`Component::start`] runs it.
    ///
    /// Fails on an invalid config (naming the check and field), a duplicate name, an unknown
    /// dependency or a dependency cycle (naming the checks on it).
    pub fn build(self) -> Result<HealthChecker, Error> {
        self.config
            .validate()
            .map_err(|e| Error::config("health checker", e))?;
        for (check, config) in &self.checks {
            config.validate().map_err(|e| Error::CheckConfig {
                check: check.name().to_owned(),
                source: e,
            })?;
        }
        let graph = DependencyGraph::new(
            self.checks
                .iter()
                .map(|(check, config)| (check.name(), &config.depends_on)),
        )?;
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut entries = Vec::with_capacity(self.checks.len());
        for (i, (check, config)) in self.checks.into_iter().enumerate() {
            for group in &config.groups {
                let members = groups.entry(group.clone()).or_default();
                if !members.contains(&i) {
                    members.push(i);
                }
            }
            entries.push(Entry::new(check, config)?);
        }
        let n = entries.len();
        let shared = Arc::new(Shared {
            resolution: Mutex::new(Resolution {
                own: vec![Status::Unknown; n],
                own_cause: vec![None; n],
                resolved: graph.resolve_all(&vec![Status::Unknown; n]),
            }),
            graph,
            groups,
            entries,
            slots: Semaphore::new(self.config.max_concurrent_checks),
        });
        Ok(HealthChecker {
            shared,
            run: Mutex::new(None),
            tasks: ComponentTasks::default(),
        })
    }
}

/// Runs health checks on their schedules; reports statuses, causes and baselines.
///
/// Built unstarted by [`HealthChecker::builder`]; a [`Component`] named `health`: `start`
/// spawns a task per check, publishing on the context's bus as its node; `stop` (or the
/// context's shutdown) ends them. Queries work at any time; before the first start every
/// check is `Unknown`. Dropping it stops every check task (at their next await point).
pub struct HealthChecker {
    shared: Arc<Shared>,
    /// The latest start's context, kept for the report's node after a stop.
    run: Mutex<Option<Arc<Run>>>,
    tasks: ComponentTasks,
}

impl HealthChecker {
    /// A builder with no checks.
    pub fn builder() -> HealthCheckerBuilder {
        HealthCheckerBuilder {
            config: CheckerConfig::default(),
            checks: Vec::new(),
        }
    }

    /// The overall status: the worst critical check, non-critical ones at most `Degraded`
    /// (see [`rollup`](crate::rollup)).
    pub fn status(&self) -> Status {
        let resolution = lock(&self.shared.resolution);
        self.shared
            .rollup(&resolution, 0..self.shared.entries.len())
    }

    /// The rolled-up status of the checks in `group`; `None` if no check is in it.
    pub fn group_status(&self, group: &str) -> Option<Status> {
        let members = self.shared.groups.get(group)?;
        let resolution = lock(&self.shared.resolution);
        Some(self.shared.rollup(&resolution, members.iter().copied()))
    }

    /// The reported status of one check (dependencies taken into account).
    pub fn check_status(&self, name: &str) -> Option<Status> {
        let i = self.shared.graph.index_of(name)?;
        Some(lock(&self.shared.resolution).resolved[i].status)
    }

    /// Everything known right now, checks in dependency order; serializable to JSON. Its
    /// `node` is the node of the latest start (empty before the first).
    pub fn report(&self) -> HealthReport {
        let now = Instant::now();
        let wall = SystemTime::now();
        let resolution = lock(&self.shared.resolution).clone();
        let shared = &self.shared;
        let checks = shared
            .graph
            .order()
            .iter()
            .map(|&i| {
                let entry = &shared.entries[i];
                let state = lock(&entry.state);
                let resolved = resolution.resolved[i];
                let cause = shared.cause(&resolution, i);
                let since = |at: Instant| wall - now.saturating_duration_since(at);
                CheckReport {
                    name: entry.name.clone(),
                    status: resolved.status,
                    check_status: resolution.own[i],
                    cause,
                    criticality: entry.config.criticality,
                    groups: entry.config.groups.clone(),
                    depends_on: entry.config.depends_on.clone(),
                    suspicion: state.phi.state(now),
                    phi: state.phi.last_heartbeat().map(|_| state.phi.phi(now)),
                    latency_ms: LatencySummary::of(&state.baseline, now),
                    success_rate: state.baseline.success_rate(),
                    consecutive_failures: state.threshold.consecutive_failures(),
                    consecutive_successes: state.threshold.consecutive_successes(),
                    runs: state.runs,
                    last_run: state.last.as_ref().map(|l| since(l.at).into()),
                    last_detail: state.last.as_ref().map(|l| l.detail.clone()),
                    last_error: state.last_error.clone(),
                }
            })
            .collect();
        // Overall and group statuses from the same snapshot as the checks.
        let groups = shared
            .groups
            .iter()
            .map(|(g, members)| {
                (
                    g.clone(),
                    shared.rollup(&resolution, members.iter().copied()),
                )
            })
            .collect();
        HealthReport {
            status: shared.rollup(&resolution, 0..shared.entries.len()),
            node: lock(&self.run)
                .as_ref()
                .map(|run| run.node.to_string())
                .unwrap_or_default(),
            generated_at: wall.into(),
            groups,
            checks,
        }
    }
}

#[ha_core::async_trait]
impl Component for HealthChecker {
    fn name(&self) -> &str {
        "health"
    }

    /// Spawns one task per check; returns at once. Registers the metric handles: install a
    /// `metrics` recorder before. Fails if it runs already.
    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        let cancel = self.tasks.begin(self.name(), &ctx)?;
        let shared = &self.shared;
        let run = Arc::new(Run {
            shared: Arc::clone(shared),
            node: ctx.node,
            bus: ctx.bus,
            metrics: shared.entries.iter().map(CheckMetrics::new).collect(),
            cancel: cancel.clone(),
        });
        *lock(&self.run) = Some(Arc::clone(&run));
        let resolved = lock(&shared.resolution).resolved.clone();
        let start = Instant::now();
        // First runs go in dependency order, so a dependency's first result tends to land
        // before its dependents'.
        for &i in shared.graph.order() {
            run.metrics[i]
                .status
                .set(f64::from(resolved[i].status.badness()));
            let phase = spread(i, shared.entries[i].config.interval);
            self.tasks.spawn(check_loop(
                Arc::clone(&run),
                i,
                start,
                phase,
                cancel.clone(),
            ));
        }
        tracing::info!(checks = shared.entries.len(), node = %run.node, "health checker started");
        Ok(())
    }

    async fn stop(&self) -> Result<(), ha_core::Error> {
        self.tasks.stop().await;
        Ok(())
    }

    /// The overall status, as [`HealthChecker::status`].
    fn status(&self) -> Status {
        HealthChecker::status(self)
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        if let Some(run) = lock(&self.run).as_ref() {
            run.cancel.cancel();
        }
    }
}

/// The fixed offset of check `i`'s ticks within its interval: the golden-ratio sequence
/// spreads any number of checks evenly without knowing how many there are.
fn spread(i: usize, interval: Duration) -> Duration {
    const GOLDEN: f64 = 0.618_033_988_749_895;
    interval.mul_f64((i as f64 * GOLDEN).fract())
}

/// The loop of one check's task.
async fn check_loop(
    run: Arc<Run>,
    i: usize,
    start: Instant,
    phase: Duration,
    cancel: CancellationToken,
) {
    let shared = &run.shared;
    let entry = &shared.entries[i];
    let interval = entry.config.interval;
    let mut ticks = tokio::time::interval_at(start + phase + interval, interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        let span = tracing::debug_span!("health_check", check = %entry.name);
        let finished = async {
            let Ok(_slot) = shared.slots.acquire().await else {
                return None;
            };
            let started = Instant::now();
            let result = tokio::time::timeout(entry.config.timeout, entry.check.check()).await;
            Some((started, result))
        }
        .instrument(span);
        let (started, result) = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            done = finished => match done {
                Some(done) => done,
                None => return,
            },
        };
        let result = result.unwrap_or_else(|_| {
            CheckResult::unhealthy(format!(
                "timed out after {}",
                humantime::format_duration(entry.config.timeout)
            ))
            .with_latency(entry.config.timeout)
        });
        run.record(i, started, result);
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
    }
}

/// What the checker and every check task share, from build on.
struct Shared {
    graph: DependencyGraph,
    groups: BTreeMap<String, Vec<usize>>,
    entries: Vec<Entry>,
    resolution: Mutex<Resolution>,
    slots: Semaphore,
}

/// Own and resolved statuses of every check; changes only on transitions.
#[derive(Clone)]
struct Resolution {
    own: Vec<Status>,
    own_cause: Vec<Option<String>>,
    resolved: Vec<Resolved>,
}

/// What the check tasks of one start share: the context they got and the metric handles.
struct Run {
    shared: Arc<Shared>,
    node: NodeId,
    bus: EventBus,
    /// By check index.
    metrics: Vec<CheckMetrics>,
    /// Ends the tasks of this start.
    cancel: CancellationToken,
}

/// One registered check.
struct Entry {
    name: String,
    check: Arc<dyn HealthCheck>,
    config: CheckConfig,
    state: Mutex<CheckState>,
}

struct CheckState {
    threshold: ThresholdState,
    baseline: Baseline,
    phi: PhiAccrualDetector,
    suspicion: Suspicion,
    runs: u64,
    last: Option<LastRun>,
    last_error: Option<String>,
}

struct LastRun {
    at: Instant,
    detail: String,
}

/// Metric handles, registered once per check at start so a run does not build label sets.
struct CheckMetrics {
    status: metrics::Gauge,
    duration: metrics::Histogram,
    failures: metrics::Counter,
}

impl CheckMetrics {
    fn new(entry: &Entry) -> Self {
        let name = &entry.name;
        Self {
            status: metrics::gauge!(metric::HEALTH_STATUS, "component" => name.clone()),
            duration: metrics::histogram!(metric::HEALTH_CHECK_DURATION_SECONDS, "check" => name.clone()),
            failures: metrics::counter!(metric::HEALTH_CHECK_FAILURES_TOTAL, "check" => name.clone()),
        }
    }
}

impl Entry {
    fn new(check: Arc<dyn HealthCheck>, config: CheckConfig) -> Result<Self, Error> {
        let name = check.name().to_owned();
        let state = CheckState {
            threshold: ThresholdState::new(config.threshold_config())?,
            baseline: Baseline::new(config.baseline.clone())?,
            phi: PhiAccrualDetector::new(config.phi_config())?,
            suspicion: Suspicion::Available,
            runs: 0,
            last: None,
            last_error: None,
        };
        Ok(Self {
            name,
            check,
            config,
            state: Mutex::new(state),
        })
    }
}

impl Shared {
    /// The rolled-up status of the checks `members` in `resolution`.
    fn rollup(&self, resolution: &Resolution, members: impl Iterator<Item = usize>) -> Status {
        rollup::rollup(members.map(|i| {
            (
                self.entries[i].config.criticality,
                resolution.resolved[i].status,
            )
        }))
    }

    /// Why check `n` has its resolved status: the root-cause dependency, else its own last
    /// detail while it is not healthy.
    fn cause(&self, resolution: &Resolution, n: usize) -> Option<String> {
        match resolution.resolved[n].root_cause {
            Some(root) => Some(format!("dependency {} is unhealthy", self.graph.name(root))),
            None => resolution.own_cause[n].clone(),
        }
    }
}

impl Run {
    /// Takes in the result of one run of check `i` that started at `started`.
    fn record(&self, i: usize, started: Instant, result: CheckResult) {
        let shared = &*self.shared;
        let entry = &shared.entries[i];
        let metrics = &self.metrics[i];
        let now = Instant::now();
        let latency = result.latency.unwrap_or_else(|| now - started);
        let observation = Observation {
            latency,
            success: result.outcome.is_pass(),
        };
        metrics.duration.record(latency.as_secs_f64());
        if !observation.success {
            metrics.failures.increment(1);
        }
        let (transition, anomalies, raised) = {
            let mut state = lock(&entry.state);
            // Judge the result against the baseline before it joins the baseline.
            let anomalies = anomaly::check(
                &entry.config.anomaly_rules,
                &state.baseline,
                now,
                &observation,
            );
            state.baseline.record(now, observation);
            if observation.success {
                state.phi.heartbeat(now);
            }
            let suspicion = state.phi.state(now);
            let raised =
                (suspicion > state.suspicion).then(|| phi_anomaly(&state.phi, suspicion, now));
            state.suspicion = suspicion;
            state.runs += 1;
            if !observation.success {
                state.last_error = Some(result.detail.clone());
            }
            let transition = state.threshold.record(result.outcome);
            state.last = Some(LastRun {
                at: now,
                detail: result.detail.clone(),
            });
            (transition, anomalies, raised)
        };
        tracing::trace!(check = %entry.name, outcome = ?result.outcome, ?latency, detail = %result.detail, "check ran");

        let mut resolution = lock(&shared.resolution);
        // Early warnings go out before the status change the same result may cause. A check
        // whose dependency is down fails because of it: its anomalies would be the same
        // outage raised again.
        if resolution.resolved[i].root_cause.is_none() {
            for found in anomalies.into_iter().chain(raised) {
                self.anomaly(entry, found);
            }
        }
        if let Some(t) = transition {
            resolution.own[i] = t.to;
            resolution.own_cause[i] = (t.to != Status::Healthy).then(|| result.detail.clone());
            for n in shared.graph.affected_by(i) {
                let new = shared
                    .graph
                    .resolve(n, resolution.own[n], &resolution.resolved);
                let old = std::mem::replace(&mut resolution.resolved[n], new);
                if old.status != new.status {
                    self.status_changed(&resolution, n, old.status, new.status);
                }
            }
        }
    }

    /// Publishes a resolved status change of check `n`.
    fn status_changed(&self, resolution: &Resolution, n: usize, from: Status, to: Status) {
        let entry = &self.shared.entries[n];
        let cause = self.shared.cause(resolution, n);
        self.metrics[n].status.set(f64::from(to.badness()));
        match to {
            Status::Healthy => {
                tracing::info!(check = %entry.name, %from, %to, "health status changed");
            }
            _ => {
                tracing::warn!(check = %entry.name, %from, %to, cause = cause.as_deref().unwrap_or(""), "health status changed");
            }
        }
        self.publish(HaEvent::HealthChanged {
            at: SystemTime::now(),
            node: self.node.clone(),
            component: entry.name.clone(),
            from,
            to,
            cause,
        });
    }

    fn anomaly(&self, entry: &Entry, found: Anomaly) {
        metrics::counter!(metric::ANOMALIES_TOTAL, "check" => entry.name.clone(), "rule" => found.rule)
            .increment(1);
        tracing::warn!(check = %entry.name, rule = found.rule, detail = %found.detail, "anomaly");
        self.publish(HaEvent::AnomalyDetected {
            at: SystemTime::now(),
            node: self.node.clone(),
            component: entry.name.clone(),
            rule: found.rule.to_owned(),
            detail: found.detail,
        });
    }

    fn publish(&self, event: HaEvent) {
        self.bus.publish(event);
    }
}

/// The anomaly reported when φ rises to `suspicion`: `phi_suspected` or `phi_failed`.
fn phi_anomaly(phi: &PhiAccrualDetector, suspicion: Suspicion, now: Instant) -> Anomaly {
    let rule = match suspicion {
        Suspicion::Failed => "phi_failed",
        Suspicion::Suspected | Suspicion::Available => "phi_suspected",
    };
    let silence = phi
        .last_heartbeat()
        .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
    let config = phi.config();
    Anomaly {
        rule,
        detail: format!(
            "phi {:.1} after {:.3}s without a successful run (suspected at {}, failed at {})",
            phi.phi(now),
            silence.as_secs_f64(),
            config.suspect_threshold,
            config.threshold,
        ),
    }
}
