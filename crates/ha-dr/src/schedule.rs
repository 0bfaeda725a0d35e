//! [`BackupScheduler`]: backs named sources up on intervals or cron schedules, on the leader
//! only, verifies each backup, and tracks RPO and RTO per source.
//!
//! Each source has its own task. A tick starts a run unless this node does not lead (asked of
//! the [`LeadershipGate`] at every tick and again before every attempt) or the previous run of
//! that source is still going; either way the tick is skipped and the reason kept in
//! [`SourceStatus::last_skip`], so runs of one source never overlap. A run backs up, then
//! verifies (or, with `restore_test`, restores into a scratch location, which reads and
//! checks every segment too and measures the RTO); only a verified backup moves the source's
//! recovery point. Retryable failures ([`Error::is_retryable`](crate::Error::is_retryable)) are retried with
//! [`Backoff`]; when the attempts run out, or at once for a failure that will not pass (a
//! corrupt backup, a missing key), one `BackupFailed` is published and the source waits for
//! its next tick. After a verified backup, the source's retention policy (if any) is applied
//! to that source's backups.
//!
//! RPO: every `rpo_check_interval`, while this node leads, each source's age — the time
//! since its newest verified backup *started* (or, before the first, since this node began
//! to lead) — is compared with its RPO, plus a grace of as long as that backup's run took
//! (the next run is expected to take as long; without it an RPO equal to the interval would
//! be breached by every run). `RpoBreached` is published on the transition into breach
//! only; a verified backup ends the breach, and a later breach is published again.
//!
//! The scheduler is a [`Component`] named `backups`: built unstarted, started with the
//! node's [`ComponentContext`] (node, bus, leadership gate, shutdown);
//! [`BackupScheduler::backup_now`] runs one backup of a source on demand.
//!
//! ```
//! use std::time::Duration;
//! use ha_core::{Component, ComponentContext};
//! use ha_dr::{BackupScheduler, KeyRing, LocalStore, MasterKey, Repository, ScheduleConfig};
//! use ha_dr::{Source, SourceSchedule};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::write(dir.path().join("app.conf"), "replicas = 3\n").unwrap();
//! let repo = Repository::new(
//!     LocalStore::open(dir.path().join("store"))?,
//!     KeyRing::new(MasterKey::generate()?),
//! );
//!
//! let mut config = ScheduleConfig::default();
//! config.sources.insert("app-config".into(), SourceSchedule {
//!     cron: Some("30 2 * * *".into()), // 02:30 UTC every day; the RPO defaults to 24 h
//!     ..SourceSchedule::default()
//! });
//! let scheduler = BackupScheduler::builder(repo)
//!     .config(config)
//!     .source("app-config", Source::file(dir.path().join("app.conf")))
//!     .build()?;
//! let status = scheduler.status("app-config").unwrap();
//! assert_eq!(status.rpo, Duration::from_secs(24 * 3600));
//!
//! // A node that always leads (the node passes its elector as the gate).
//! scheduler.start(ComponentContext::standalone("n1")).await?;
//! let manifest = scheduler.backup_now("app-config").await?;
//! assert_eq!(scheduler.status("app-config").unwrap().last_verified_id.as_deref(),
//!     Some(manifest.id.as_str()));
//! scheduler.stop().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ha_core::config::{self, ConfigError, Validate};
use ha_core::sync::lock;
use ha_core::{
    Backoff, BackoffConfig, Component, ComponentContext, ComponentTasks, EventBus, HaEvent,
    LeadershipGate, NodeId, Status, metric,
};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Result;
use crate::format::BackupId;
use crate::manifest::{BackupKind, Manifest};
use crate::repo::{Repository, ScratchPostgres};
use crate::retention::RetentionPolicy;
use crate::source::Source;

/// The default interval of a database source.
pub const DEFAULT_DATABASE_INTERVAL: Duration = Duration::from_secs(4 * 3600);
/// The default interval of a directory or file source.
pub const DEFAULT_FILES_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The default interval of a config source.
pub const DEFAULT_CONFIG_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The default RTO target: the longest acceptable restore (test).
pub const DEFAULT_RTO_TARGET: Duration = Duration::from_secs(15 * 60);

/// How far ahead a cron schedule is searched for its longest gap (its default RPO): this
/// span or this many fire times, whichever comes first.
const CRON_GAP_HORIZON: Duration = Duration::from_secs(366 * 24 * 3600);
const CRON_GAP_FIRES: usize = 10_000;

/// The work a scheduled run does. [`Repository`] implements it; tests use fakes.
///
/// To ensure correctness, an implementation must:
/// - return from `backup` only once the backup is durable (a manifest is written);
/// - fail `verify` and `restore_test` unless every segment of the backup authenticated;
/// - not publish events: the scheduler publishes one event per run, after retries.
#[ha_core::async_trait]
pub trait BackupRunner: Send + Sync + Debug + 'static {
    /// Backs `source` up.
    async fn backup(&self, source: &Source, tags: &[String]) -> Result<Manifest>;

    /// Reads and checks every segment of `id`.
    async fn verify(&self, id: &BackupId) -> Result<()>;

    /// Restores `id` into a scratch location, checks what arrived and returns how long it
    /// took (the measured RTO).
    async fn restore_test(
        &self,
        id: &BackupId,
        scratch_pg: Option<&ScratchPostgres>,
    ) -> Result<Duration>;

    /// Applies `policy` to the backups of `source`; returns how many were removed.
    async fn prune(&self, policy: &RetentionPolicy, source: &Source) -> Result<usize>;
}

#[ha_core::async_trait]
impl BackupRunner for Repository {
    async fn backup(&self, source: &Source, tags: &[String]) -> Result<Manifest> {
        self.backup_observed(source, tags, false).await
    }

    async fn verify(&self, id: &BackupId) -> Result<()> {
        Repository::verify(self, id).await.map(|_| ())
    }

    async fn restore_test(
        &self,
        id: &BackupId,
        scratch_pg: Option<&ScratchPostgres>,
    ) -> Result<Duration> {
        self.restore_test_observed(id, scratch_pg, false)
            .await
            .map(|c| c.duration)
    }

    async fn prune(&self, policy: &RetentionPolicy, source: &Source) -> Result<usize> {
        self.prune_source(policy, source, false)
            .await
            .map(|r| r.removed.len())
    }
}

/// Scheduler settings, and per-source schedules by source name.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Retries of a failed run (default: sleeps up to 10 s, 20 s, 40 s; 3 retries, so at most
    /// 4 attempts per tick).
    pub retry: BackoffConfig,
    /// How often each source's age is compared with its RPO (default 30 s).
    #[serde(with = "config::duration")]
    pub rpo_check_interval: Duration,
    /// Schedules by source name; a registered source without an entry gets the defaults.
    pub sources: BTreeMap<String, SourceSchedule>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            retry: BackoffConfig {
                initial: Duration::from_secs(10),
                max: Duration::from_secs(5 * 60),
                multiplier: 2.0,
                max_attempts: Some(3),
            },
            rpo_check_interval: Duration::from_secs(30),
            sources: BTreeMap::new(),
        }
    }
}

impl Validate for ScheduleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.retry.validate().map_err(|e| e.within("retry"))?;
        if self.retry.max_attempts.is_none() {
            return Err(ConfigError::new(
                "retry.max_attempts",
                "must be set: a run gives up and waits for the next tick",
            ));
        }
        config::positive("rpo_check_interval", self.rpo_check_interval)?;
        for (name, source) in &self.sources {
            source
                .validate()
                .map_err(|e| e.within(&format!("sources.{name}")))?;
        }
        Ok(())
    }
}

/// When and how one source is backed up. Give `interval` or `cron` (neither: the default
/// interval of the source's kind).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceSchedule {
    /// Back up every this long (defaults: database 4 h, directory and file 24 h, config 24 h).
    #[serde(with = "config::duration")]
    pub interval: Option<Duration>,
    /// A cron expression, evaluated in UTC: five fields (minute hour day-of-month month
    /// day-of-week) or six with a leading seconds field; `@daily` and friends.
    pub cron: Option<String>,
    /// The recovery point objective: the oldest the newest verified backup may be (default:
    /// the interval; for cron, the longest gap between fire times over the next year).
    #[serde(with = "config::duration")]
    pub rpo: Option<Duration>,
    /// The recovery time objective the restore tests are held to (default 15 min).
    #[serde(with = "config::duration")]
    pub rto_target: Option<Duration>,
    /// Check each backup with a restore test instead of a plain verify (measures the RTO).
    /// A database needs [`BackupSchedulerBuilder::scratch_postgres`].
    pub restore_test: bool,
    /// Applied to this source's backups after each verified backup.
    pub retention: Option<RetentionPolicy>,
    /// Tags written into every scheduled backup of this source.
    pub tags: Vec<String>,
}

impl Validate for SourceSchedule {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(interval) = self.interval {
            config::ensure(self.cron.is_none(), "cron", || {
                "give either `interval` or `cron`, not both".into()
            })?;
            config::positive("interval", interval)?;
        }
        if let Some(cron) = &self.cron {
            CronSchedule::parse(cron)?;
        }
        if let Some(rpo) = self.rpo {
            config::positive("rpo", rpo)?;
        }
        if let Some(rto) = self.rto_target {
            config::positive("rto_target", rto)?;
        }
        if let Some(policy) = &self.retention {
            policy.validate().map_err(|e| e.within("retention"))?;
        }
        Ok(())
    }
}

/// A parsed cron expression, evaluated in UTC.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    text: String,
    cron: croner::Cron,
}

impl CronSchedule {
    /// Parses `text`. Errors are about the field `cron` and name the part of the expression
    /// at fault (e.g. "the minute field `61`").
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let parse = |t: &str| croner::parser::CronParser::new().parse(t);
        match parse(text) {
            Ok(cron) => Ok(Self {
                text: text.to_owned(),
                cron,
            }),
            Err(e) => {
                let parts: Vec<&str> = text.split_whitespace().collect();
                let names: &[&str] = match parts.len() {
                    5 => &["minute", "hour", "day-of-month", "month", "day-of-week"],
                    6 => &[
                        "second",
                        "minute",
                        "hour",
                        "day-of-month",
                        "month",
                        "day-of-week",
                    ],
                    _ if text.trim_start().starts_with('@') => &[],
                    n => {
                        return Err(ConfigError::new(
                            "cron",
                            format!(
                                "{text:?} has {n} fields; expected 5 (minute hour day-of-month \
                                 month day-of-week) or 6 (a leading second field)"
                            ),
                        ));
                    }
                };
                // The field at fault is the first whose replacement by `*` makes the
                // expression parse.
                let culprit = (0..names.len()).find(|&i| {
                    let mut fixed = parts.clone();
                    fixed[i] = "*";
                    parse(&fixed.join(" ")).is_ok()
                });
                let what = match culprit {
                    Some(i) => format!("the {} field `{}`", names[i], parts[i]),
                    None => "the expression".to_owned(),
                };
                Err(ConfigError::new(
                    "cron",
                    format!("{text:?} is not a valid cron expression: {what}: {e}"),
                ))
            }
        }
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first fire time strictly after `after`; `None` if there is none.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        let after = chrono::DateTime::<chrono::Utc>::from(after);
        self.cron
            .find_next_occurrence(&after, false)
            .ok()
            .map(SystemTime::from)
    }

    /// The longest gap between consecutive fire times after `from`, over the next year or
    /// 10 000 fire times, whichever comes first; `None` if it fires fewer than twice.
    pub fn longest_gap(&self, from: SystemTime) -> Option<Duration> {
        let from_utc = chrono::DateTime::<chrono::Utc>::from(from);
        let mut previous: Option<SystemTime> = None;
        let mut longest: Option<Duration> = None;
        for fire in self.cron.iter_after(from_utc).take(CRON_GAP_FIRES) {
            let fire = SystemTime::from(fire);
            if let Some(previous) = previous {
                let gap = fire.duration_since(previous).unwrap_or_default();
                longest = Some(longest.map_or(gap, |l| l.max(gap)));
            }
            previous = Some(fire);
            if fire.duration_since(from).unwrap_or_default() > CRON_GAP_HORIZON {
                break;
            }
        }
        longest
    }
}

/// When a source's runs are due.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Trigger {
    /// Every this long, the first at start.
    Every(Duration),
    /// At the fire times of a cron expression (UTC).
    Cron(Box<CronSchedule>),
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
            Trigger::Cron(c) => write!(f, "cron {}", c.as_str()),
        }
    }
}

/// The default interval of a source kind.
pub fn default_interval(kind: BackupKind) -> Duration {
    match kind {
        BackupKind::Postgres | BackupKind::PgBase => DEFAULT_DATABASE_INTERVAL,
        BackupKind::Dir | BackupKind::File => DEFAULT_FILES_INTERVAL,
        BackupKind::Config | BackupKind::Wal => DEFAULT_CONFIG_INTERVAL,
    }
}

/// What the scheduler knows about one source; serializable.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct SourceStatus {
    /// The source's name.
    pub name: String,
    /// Its kind.
    pub kind: BackupKind,
    /// When runs are due, e.g. `every 4h` or `cron 30 2 * * *`.
    pub schedule: String,
    /// Its recovery point objective.
    #[serde(with = "humantime_serde")]
    pub rpo: Duration,
    /// Its recovery time objective.
    #[serde(with = "humantime_serde")]
    pub rto_target: Duration,
    /// Whether a run is in progress.
    pub running: bool,
    /// Runs started.
    pub runs: u64,
    /// Ticks skipped (not the leader, or the previous run still going).
    pub skipped: u64,
    /// Why the last tick was skipped.
    pub last_skip: Option<String>,
    /// When the last backup was written (verified or not).
    #[serde(with = "humantime_serde")]
    pub last_success: Option<SystemTime>,
    /// When the newest verified backup was verified.
    #[serde(with = "humantime_serde")]
    pub last_verified: Option<SystemTime>,
    /// The newest verified backup.
    pub last_verified_id: Option<String>,
    /// Time since the newest verified backup started (`None`: there is none yet).
    #[serde(with = "humantime_serde")]
    pub age: Option<Duration>,
    /// Whether the RPO is breached (as of the last check).
    pub rpo_breached: bool,
    /// The error that ended the last failed run; cleared by a verified backup.
    pub last_error: Option<String>,
    /// How long the last restore test took (the measured RTO).
    #[serde(with = "humantime_serde")]
    pub last_restore_test: Option<Duration>,
    /// Whether the last restore test met the RTO target (`None`: none ran).
    pub rto_met: Option<bool>,
}

/// Builds a [`BackupScheduler`], unstarted.
#[must_use]
#[derive(Debug)]
pub struct BackupSchedulerBuilder {
    runner: Arc<dyn BackupRunner>,
    config: ScheduleConfig,
    sources: Vec<(String, Source)>,
    scratch_pg: Option<ScratchPostgres>,
}

impl BackupSchedulerBuilder {
    /// Scheduler settings and per-source schedules (default [`ScheduleConfig::default`]).
    pub fn config(mut self, config: ScheduleConfig) -> Self {
        self.config = config;
        self
    }

    /// Registers a source under `name`; its schedule is `config.sources[name]`, or the
    /// defaults.
    pub fn source(mut self, name: impl Into<String>, source: Source) -> Self {
        self.sources.push((name.into(), source));
        self
    }

    /// Where restore tests of database sources restore to.
    pub fn scratch_postgres(mut self, scratch: ScratchPostgres) -> Self {
        self.scratch_pg = Some(scratch);
        self
    }

    /// Validates the config (errors name the field, e.g. `sources.db.cron`) and returns the
    /// scheduler, unstarted: [`Component::start`] starts one task per source plus the RPO
    /// checker. Fails on a duplicate source name, a schedule for an unregistered source, or
    /// no sources.
    pub fn build(self) -> Result<BackupScheduler> {
        self.config.validate()?;
        if self.sources.is_empty() {
            return Err(ConfigError::new("sources", "register at least one source").into());
        }
        for name in self.config.sources.keys() {
            config::ensure(
                self.sources.iter().any(|(n, _)| n == name),
                &format!("sources.{name}"),
                || "names no registered source".into(),
            )?;
        }
        let now = SystemTime::now();
        let mut entries = Vec::with_capacity(self.sources.len());
        for (name, source) in self.sources {
            config::non_empty("sources", &name)?;
            config::ensure(
                !entries.iter().any(|e: &Entry| e.name == name),
                &format!("sources.{name}"),
                || "is registered twice".into(),
            )?;
            let schedule = self.config.sources.get(&name).cloned().unwrap_or_default();
            let kind = source.kind();
            let (trigger, natural_rpo) = match &schedule.cron {
                Some(text) => {
                    let cron = CronSchedule::parse(text)
                        .map_err(|e| e.within(&format!("sources.{name}")))?;
                    let gap = cron.longest_gap(now).ok_or_else(|| {
                        ConfigError::new(
                            format!("sources.{name}.cron"),
                            format!("{text:?} fires fewer than twice in the next year"),
                        )
                    })?;
                    (Trigger::Cron(Box::new(cron)), gap)
                }
                None => {
                    let every = schedule.interval.unwrap_or_else(|| default_interval(kind));
                    (Trigger::Every(every), every)
                }
            };
            entries.push(Entry {
                name,
                kind,
                source,
                trigger,
                rpo: schedule.rpo.unwrap_or(natural_rpo),
                rto_target: schedule.rto_target.unwrap_or(DEFAULT_RTO_TARGET),
                schedule,
                state: Mutex::new(SourceState::default()),
            });
        }
        let shared = Arc::new(Shared {
            runner: self.runner,
            retry: self.config.retry,
            scratch_pg: self.scratch_pg,
            entries,
            leading_since: Mutex::new(None),
        });
        Ok(BackupScheduler {
            shared,
            rpo_check_interval: self.config.rpo_check_interval,
            live: Mutex::new(None),
            tasks: ComponentTasks::default(),
        })
    }
}

/// Runs scheduled backups of named sources while this node leads; tracks RPO and RTO.
///
/// A [`Component`] named `backups`: [`start`](Component::start) takes the node, the bus for
/// its events, the leadership gate (asked at every tick and before every attempt) and the
/// shutdown token from the [`ComponentContext`]. [`stop`](Component::stop) abandons runs in
/// progress (a backup abandoned mid-way leaves no visible backup) and waits for the tasks;
/// dropping a started scheduler stops its tasks at their next await point.
#[derive(Debug)]
pub struct BackupScheduler {
    shared: Arc<Shared>,
    rpo_check_interval: Duration,
    /// What the tasks of the current start run with; `None` while stopped.
    live: Mutex<Option<Arc<Live>>>,
    tasks: ComponentTasks,
}

/// The name of the scheduler as a [`Component`].
const COMPONENT: &str = "backups";

impl BackupScheduler {
    /// A builder over `runner` (a [`Repository`], usually). Runs publish their events on the
    /// bus of the context the scheduler is started with, once per run; a repository's own
    /// bus is not used for them.
    pub fn builder(runner: impl BackupRunner) -> BackupSchedulerBuilder {
        BackupSchedulerBuilder {
            runner: Arc::new(runner),
            config: ScheduleConfig::default(),
            sources: Vec::new(),
            scratch_pg: None,
        }
    }

    /// The status of the source `name`.
    pub fn status(&self, name: &str) -> Option<SourceStatus> {
        let now = Instant::now();
        self.shared
            .entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.status(now))
    }

    /// The status of every source, in registration order (before the first start: every
    /// source as never run).
    pub fn statuses(&self) -> Vec<SourceStatus> {
        let now = Instant::now();
        self.shared.entries.iter().map(|e| e.status(now)).collect()
    }

    /// Runs one backup of the source `source` now, as a scheduled tick would (leader only,
    /// verified or restore-tested, retried, one event, retention applied), and returns its
    /// manifest once verified. A scheduled tick that comes while it runs is skipped.
    ///
    /// Fails with [`Error::NotRun`](crate::Error::NotRun) when the scheduler is not started,
    /// the source is unknown, this node does not lead, a run of the source is in progress,
    /// or the scheduler stops meanwhile (the run is abandoned); otherwise with the run's own
    /// error after its retries.
    pub async fn backup_now(&self, source: &str) -> Result<Manifest> {
        let not_run = |reason: &str, retryable| crate::Error::NotRun {
            name: source.to_owned(),
            reason: reason.to_owned(),
            retryable,
        };
        let live = lock(&self.live)
            .clone()
            .ok_or_else(|| not_run("the scheduler is not started", true))?;
        let i = self
            .shared
            .entries
            .iter()
            .position(|e| e.name == source)
            .ok_or_else(|| not_run("no such source is registered", false))?;
        if live.gate.is_leader().is_none() {
            return Err(not_run("this node is not the leader", true));
        }
        let entry = &self.shared.entries[i];
        {
            let mut state = lock(&entry.state);
            if state.running {
                return Err(not_run("a run of this source is in progress", true));
            }
            state.running = true;
            state.runs += 1;
        }
        let _running = Running(entry);
        tracing::info!(source, "backup asked for now");
        tokio::select! {
            biased;
            () = live.stop.cancelled() => Err(not_run("the scheduler stopped; run abandoned", true)),
            outcome = live.run(i) => outcome,
        }
    }
}

#[ha_core::async_trait]
impl Component for BackupScheduler {
    fn name(&self) -> &str {
        COMPONENT
    }

    /// Starts one task per source plus the RPO checker, as `ctx.node`, publishing on
    /// `ctx.bus`, leader-only by `ctx.leadership`, until `ctx.shutdown` or
    /// [`stop`](Component::stop).
    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        let stop = self.tasks.begin(COMPONENT, &ctx)?;
        // Leadership is judged afresh by this start's gate.
        *lock(&self.shared.leading_since) = None;
        let live = Arc::new(Live {
            shared: Arc::clone(&self.shared),
            node: ctx.node,
            bus: ctx.bus,
            gate: ctx.leadership,
            stop,
            runs: TaskTracker::new(),
        });
        *lock(&self.live) = Some(Arc::clone(&live));
        for i in 0..self.shared.entries.len() {
            self.tasks.spawn(source_loop(Arc::clone(&live), i));
        }
        self.tasks
            .spawn(rpo_loop(Arc::clone(&live), self.rpo_check_interval));
        tracing::info!(
            sources = self.shared.entries.len(),
            "backup scheduler started"
        );
        Ok(())
    }

    /// Abandons runs in progress and waits for every task to end. Idempotent.
    async fn stop(&self) -> Result<(), ha_core::Error> {
        let live = lock(&self.live).take();
        self.tasks.stop().await;
        if live.is_some() {
            tracing::info!("backup scheduler stopped");
        }
        Ok(())
    }

    /// Unknown until a source ticked or ran; then Unhealthy while any source's RPO is
    /// breached, Degraded while any source's last run failed, else Healthy.
    fn status(&self) -> Status {
        let mut observed = false;
        let mut status = Status::Healthy;
        for entry in &self.shared.entries {
            let state = lock(&entry.state);
            observed |= state.runs > 0 || state.skipped > 0;
            if state.rpo_breached {
                status = status.worst(Status::Unhealthy);
            } else if state.last_error.is_some() {
                status = status.worst(Status::Degraded);
            }
        }
        if observed { status } else { Status::Unknown }
    }
}

impl Drop for BackupScheduler {
    fn drop(&mut self) {
        if let Some(live) = lock(&self.live).as_ref() {
            live.stop.cancel();
        }
    }
}

/// What every source needs, started or not.
#[derive(Debug)]
struct Shared {
    runner: Arc<dyn BackupRunner>,
    retry: BackoffConfig,
    scratch_pg: Option<ScratchPostgres>,
    entries: Vec<Entry>,
    /// Since when this node has led without a break, as seen by the RPO checker.
    leading_since: Mutex<Option<Instant>>,
}

#[derive(Debug)]
struct Entry {
    name: String,
    kind: BackupKind,
    source: Source,
    trigger: Trigger,
    rpo: Duration,
    rto_target: Duration,
    schedule: SourceSchedule,
    state: Mutex<SourceState>,
}

#[derive(Debug, Default)]
struct SourceState {
    running: bool,
    runs: u64,
    skipped: u64,
    last_skip: Option<String>,
    last_success: Option<SystemTime>,
    /// The newest verified backup.
    verified: Option<Verified>,
    rpo_breached: bool,
    last_error: Option<String>,
    last_restore_test: Option<Duration>,
}

#[derive(Debug)]
struct Verified {
    /// When its run started: the recovery point.
    started: Instant,
    /// How long backup and verification took.
    took: Duration,
    /// When it was verified.
    at: SystemTime,
    id: BackupId,
}

impl Entry {
    fn status(&self, now: Instant) -> SourceStatus {
        let state = lock(&self.state);
        SourceStatus {
            name: self.name.clone(),
            kind: self.kind,
            schedule: self.trigger.to_string(),
            rpo: self.rpo,
            rto_target: self.rto_target,
            running: state.running,
            runs: state.runs,
            skipped: state.skipped,
            last_skip: state.last_skip.clone(),
            last_success: state.last_success,
            last_verified: state.verified.as_ref().map(|v| v.at),
            last_verified_id: state.verified.as_ref().map(|v| v.id.to_string()),
            age: state
                .verified
                .as_ref()
                .map(|v| now.saturating_duration_since(v.started)),
            rpo_breached: state.rpo_breached,
            last_error: state.last_error.clone(),
            last_restore_test: state.last_restore_test,
            rto_met: state.last_restore_test.map(|d| d <= self.rto_target),
        }
    }

    fn skip(&self, reason: &'static str, why: String) {
        tracing::debug!(source = %self.name, reason, "scheduled backup skipped: {why}");
        metrics::counter!(metric::BACKUP_SKIPPED_TOTAL, "source" => self.name.clone(), "reason" => reason)
            .increment(1);
        let mut state = lock(&self.state);
        state.skipped += 1;
        state.last_skip = Some(why);
    }
}

/// The scheduler as one start runs it: the sources and the context it was started with.
#[derive(Debug)]
struct Live {
    shared: Arc<Shared>,
    node: NodeId,
    bus: EventBus,
    gate: Arc<dyn LeadershipGate>,
    /// A child of the context's shutdown token; cancelled by `stop`.
    stop: CancellationToken,
    /// Scheduled runs in progress; the source loops wait for them when they end.
    runs: TaskTracker,
}

impl Live {
    fn publish(&self, event: impl FnOnce(SystemTime, NodeId) -> HaEvent) {
        self.bus
            .publish(event(SystemTime::now(), self.node.clone()));
    }

    /// Compares source `i`'s age with its RPO (as of `leading_since` when it has no
    /// verified backup) and publishes `RpoBreached` on the transition into breach.
    fn check_rpo(&self, i: usize, leading_since: Instant) {
        let entry = &self.shared.entries[i];
        let now = Instant::now();
        let mut state = lock(&entry.state);
        let recovery_point = state.verified.as_ref().map(|v| v.started);
        // A node that just became leader gets one RPO to make its first backup.
        let since = recovery_point.map_or(leading_since, |p| p.max(leading_since));
        let age = now.saturating_duration_since(since);
        // The next backup is expected to take about as long as the last one: without this
        // grace, an RPO equal to the interval would be breached by every run.
        let grace = state.verified.as_ref().map_or(Duration::ZERO, |v| v.took);
        if let Some(point) = recovery_point {
            metrics::gauge!(metric::RPO_SECONDS, "kind" => entry.kind.as_str(), "source" => entry.name.clone())
                .set(now.saturating_duration_since(point).as_secs_f64());
        }
        let breached = age > entry.rpo + grace;
        if breached == state.rpo_breached {
            return;
        }
        state.rpo_breached = breached;
        drop(state);
        if breached {
            let since_last_backup = recovery_point.map(|p| now.saturating_duration_since(p));
            tracing::warn!(source = %entry.name, age = ?age, rpo = ?entry.rpo, "RPO breached");
            self.publish(|at, node| HaEvent::RpoBreached {
                at,
                node,
                kind: entry.kind.as_str().to_owned(),
                since_last_backup,
                rpo: entry.rpo,
            });
        } else {
            tracing::info!(source = %entry.name, "RPO met again");
        }
    }

    /// One backup + verify (or restore test) of source `i`.
    async fn attempt(&self, i: usize) -> Result<(Manifest, Option<Duration>)> {
        let entry = &self.shared.entries[i];
        let manifest = self
            .shared
            .runner
            .backup(&entry.source, &entry.schedule.tags)
            .await?;
        lock(&entry.state).last_success = Some(SystemTime::now());
        let rto = if entry.schedule.restore_test {
            Some(
                self.shared
                    .runner
                    .restore_test(&manifest.id, self.shared.scratch_pg.as_ref())
                    .await?,
            )
        } else {
            self.shared.runner.verify(&manifest.id).await?;
            None
        };
        Ok((manifest, rto))
    }

    /// A run of source `i`: attempts with backoff, then the bookkeeping. Returns the
    /// verified backup's manifest, or what ended the run.
    async fn run(&self, i: usize) -> Result<Manifest> {
        let entry = &self.shared.entries[i];
        let mut backoff = Backoff::new(self.shared.retry.clone());
        let mut attempts = 0u32;
        let outcome = loop {
            if self.gate.is_leader().is_none() {
                tracing::info!(source = %entry.name, "leadership lost; run abandoned");
                let reason = format!("leadership lost after {attempts} attempts");
                lock(&entry.state).last_error = Some(reason.clone());
                return Err(crate::Error::NotRun {
                    name: entry.name.clone(),
                    reason,
                    retryable: true,
                });
            }
            attempts += 1;
            let started = Instant::now();
            match self.attempt(i).await {
                Ok(done) => break Ok((started, done)),
                Err(e) if e.is_retryable() => match backoff.next() {
                    Some(sleep) => {
                        tracing::warn!(source = %entry.name, attempt = attempts, error = %e, retry_in = ?sleep, "scheduled backup failed; retrying");
                        tokio::time::sleep(sleep).await;
                    }
                    None => break Err(e),
                },
                Err(e) => break Err(e),
            }
        };
        match outcome {
            Ok((started, (manifest, rto))) => {
                self.succeeded(i, started, &manifest, rto).await;
                Ok(manifest)
            }
            Err(e) => {
                let reason = format!("source {}: {e} (attempt {attempts})", entry.name);
                tracing::warn!(source = %entry.name, attempts, error = %e, "scheduled backup failed; waiting for the next tick");
                lock(&entry.state).last_error = Some(reason.clone());
                self.publish(|at, node| HaEvent::BackupFailed {
                    at,
                    node,
                    kind: entry.kind.as_str().to_owned(),
                    reason,
                });
                Err(e)
            }
        }
    }

    async fn succeeded(
        &self,
        i: usize,
        started: Instant,
        manifest: &Manifest,
        rto: Option<Duration>,
    ) {
        let entry = &self.shared.entries[i];
        {
            let mut state = lock(&entry.state);
            state.verified = Some(Verified {
                started,
                took: started.elapsed(),
                at: SystemTime::now(),
                id: manifest.id.clone(),
            });
            state.last_error = None;
            if rto.is_some() {
                state.last_restore_test = rto;
            }
        }
        let created = manifest
            .created
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        metrics::gauge!(metric::BACKUP_LAST_SUCCESS_TIMESTAMP_SECONDS, "kind" => entry.kind.as_str(), "source" => entry.name.clone())
            .set(created.as_secs_f64());
        tracing::info!(source = %entry.name, backup_id = %manifest.id, bytes = manifest.stored_bytes, "scheduled backup verified");
        self.publish(|at, node| HaEvent::BackupCompleted {
            at,
            node,
            backup_id: manifest.id.to_string(),
            kind: entry.kind.as_str().to_owned(),
            bytes: manifest.stored_bytes,
            duration: manifest.duration,
        });
        if let Some(duration) = rto {
            if duration > entry.rto_target {
                tracing::warn!(source = %entry.name, rto = ?duration, target = ?entry.rto_target, "restore test missed the RTO target");
            }
            self.publish(|at, node| HaEvent::RestoreCompleted {
                at,
                node,
                backup_id: manifest.id.to_string(),
                duration,
            });
        }
        let leading_since = *lock(&self.shared.leading_since);
        if let Some(since) = leading_since {
            self.check_rpo(i, since);
        }
        if let Some(policy) = &entry.schedule.retention {
            match self.shared.runner.prune(policy, &entry.source).await {
                Ok(removed) => {
                    tracing::info!(source = %entry.name, removed, "retention applied")
                }
                Err(e) => tracing::warn!(source = %entry.name, error = %e, "retention failed"),
            }
        }
    }
}

/// Clears `running` when a run ends, however it ends.
struct Running<'a>(&'a Entry);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).running = false;
    }
}

/// Waits for the next tick of a source's trigger.
async fn next_tick(trigger: &Trigger, ticks: &mut Option<tokio::time::Interval>) {
    match trigger {
        Trigger::Every(_) => {
            if let Some(ticks) = ticks {
                ticks.tick().await;
            }
        }
        Trigger::Cron(cron) => {
            let now = SystemTime::now();
            // Wall-clock jumps are picked up at the next fire time, which is recomputed on
            // every tick.
            let delay = cron
                .next_after(now)
                .and_then(|next| next.duration_since(now).ok())
                .unwrap_or(CRON_GAP_HORIZON);
            tokio::time::sleep(delay).await;
        }
    }
}

async fn source_loop(live: Arc<Live>, i: usize) {
    let entry = &live.shared.entries[i];
    let mut ticks = match entry.trigger {
        Trigger::Every(every) => {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
            Some(ticks)
        }
        Trigger::Cron(_) => None,
    };
    loop {
        tokio::select! {
            biased;
            () = live.stop.cancelled() => {
                // Runs in progress see the same token; stopping waits for them too.
                live.runs.close();
                live.runs.wait().await;
                return;
            }
            () = next_tick(&entry.trigger, &mut ticks) => {}
        }
        if live.gate.is_leader().is_none() {
            entry.skip("not_leader", "this node is not the leader".into());
            continue;
        }
        {
            let mut state = lock(&entry.state);
            if state.running {
                drop(state);
                entry.skip("running", "the previous run is still in progress".into());
                continue;
            }
            state.running = true;
            state.runs += 1;
        }
        let run = Arc::clone(&live);
        live.runs.spawn(async move {
            let _running = Running(&run.shared.entries[i]);
            tokio::select! {
                biased;
                () = run.stop.cancelled() => {}
                // The outcome is in the source's status and on the bus already.
                _ = run.run(i) => {}
            }
        });
    }
}

async fn rpo_loop(live: Arc<Live>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            () = live.stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // Only the leader backs up, so only the leader's view of the RPO means anything.
        let leading_since = {
            let mut since = lock(&live.shared.leading_since);
            match live.gate.is_leader() {
                Some(_) => *since.get_or_insert_with(Instant::now),
                None => {
                    *since = None;
                    continue;
                }
            }
        };
        for i in 0..live.shared.entries.len() {
            live.check_rpo(i, leading_since);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use ha_core::{FencingToken, Leadership};

    use super::*;
    use crate::error::Error;
    use crate::key::MasterKey;
    use crate::manifest::{Compression, Details};

    /// A gate switched by the test.
    #[derive(Debug, Default)]
    struct Gate(AtomicBool);

    impl LeadershipGate for Gate {
        fn is_leader(&self) -> Option<Leadership> {
            self.0.load(Ordering::SeqCst).then(|| Leadership {
                token: FencingToken(1),
                valid_until: Instant::now() + Duration::from_secs(3600),
            })
        }
    }

    fn leader(leads: bool) -> Arc<Gate> {
        Arc::new(Gate(AtomicBool::new(leads)))
    }

    /// A runner whose backups take `delay` and fail while `failing` (or for the first
    /// `fail_next` attempts).
    #[derive(Debug, Default)]
    struct Fake {
        delay: Duration,
        failing: AtomicBool,
        fail_next: AtomicU32,
        corrupt: AtomicBool,
        backups: AtomicU32,
    }

    fn fake(delay: Duration) -> Arc<Fake> {
        Arc::new(Fake {
            delay,
            ..Fake::default()
        })
    }

    #[ha_core::async_trait]
    impl BackupRunner for Arc<Fake> {
        async fn backup(&self, source: &Source, tags: &[String]) -> Result<Manifest> {
            let n = self.backups.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            let failing = self.failing.load(Ordering::SeqCst)
                || self
                    .fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if failing {
                return Err(Error::Stream {
                    context: "fake".into(),
                    source: std::io::Error::other("disk on fire"),
                });
            }
            Ok(Manifest {
                format_version: 1,
                id: BackupId::parse(&format!("b{n}"))?,
                kind: source.kind(),
                source: source.describe(),
                tags: tags.to_vec(),
                created: SystemTime::now(),
                duration: self.delay,
                plaintext_bytes: 10,
                stored_bytes: 100,
                plaintext_sha256: String::new(),
                compression: Compression {
                    algorithm: "zstd".into(),
                    level: 3,
                },
                cipher: String::new(),
                segment_size: 65536,
                key_id: MasterKey::from_bytes([7; 32]).id().clone(),
                details: Details::None,
            })
        }

        async fn verify(&self, id: &BackupId) -> Result<()> {
            if self.corrupt.load(Ordering::SeqCst) {
                return Err(Error::corrupt(id.as_str(), "bad tag"));
            }
            Ok(())
        }

        async fn restore_test(
            &self,
            _id: &BackupId,
            _scratch_pg: Option<&ScratchPostgres>,
        ) -> Result<Duration> {
            tokio::time::sleep(Duration::from_secs(20 * 60)).await;
            Ok(Duration::from_secs(20 * 60))
        }

        async fn prune(&self, _policy: &RetentionPolicy, _source: &Source) -> Result<usize> {
            Ok(0)
        }
    }

    fn hourly(name: &str) -> ScheduleConfig {
        let mut config = ScheduleConfig {
            rpo_check_interval: Duration::from_secs(60),
            ..ScheduleConfig::default()
        };
        config.sources.insert(
            name.into(),
            SourceSchedule {
                interval: Some(Duration::from_secs(3600)),
                ..SourceSchedule::default()
            },
        );
        config
    }

    async fn start(
        runner: &Arc<Fake>,
        gate: &Arc<Gate>,
        config: ScheduleConfig,
        bus: &EventBus,
    ) -> BackupScheduler {
        let scheduler = BackupScheduler::builder(Arc::clone(runner))
            .config(config)
            .source("db", Source::file("/db"))
            .build()
            .expect("build");
        let ctx = ComponentContext::new(NodeId::new("n1"), bus.clone(), gate.clone());
        scheduler.start(ctx).await.expect("start");
        scheduler
    }

    fn events(sub: &mut ha_core::EventSubscriber) -> Vec<HaEvent> {
        std::iter::from_fn(|| sub.try_recv().ok()).collect()
    }

    const MIN: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn only_the_leader_runs_backups() {
        let (runner, gate, bus) = (fake(MIN), leader(false), EventBus::default());
        let scheduler = start(&runner, &gate, hourly("db"), &bus).await;
        tokio::time::sleep(3 * 60 * MIN + MIN).await;
        assert_eq!(runner.backups.load(Ordering::SeqCst), 0);
        let status = scheduler.status("db").expect("status");
        assert_eq!(status.skipped, 4, "ticks at 0, 1 h, 2 h, 3 h");
        assert_eq!(
            status.last_skip.as_deref(),
            Some("this node is not the leader")
        );
        assert!(!status.rpo_breached, "a follower does not judge the RPO");

        gate.0.store(true, Ordering::SeqCst);
        tokio::time::sleep(62 * MIN).await; // 4 h 3 min: the 4 h run took a minute
        assert_eq!(runner.backups.load(Ordering::SeqCst), 1);
        let status = scheduler.status("db").expect("status");
        assert_eq!(status.last_verified_id.as_deref(), Some("b0"));
        assert_eq!(
            status.age,
            Some(3 * MIN),
            "the recovery point is the start of the run"
        );
        scheduler.stop().await.expect("stop");
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_still_going_makes_the_next_tick_skip() {
        let (runner, gate, bus) = (fake(90 * MIN), leader(true), EventBus::default());
        let scheduler = start(&runner, &gate, hourly("db"), &bus).await;
        tokio::time::sleep(60 * MIN + MIN).await;
        let status = scheduler.status("db").expect("status");
        assert!(status.running);
        assert_eq!((status.runs, status.skipped), (1, 1));
        assert_eq!(
            status.last_skip.as_deref(),
            Some("the previous run is still in progress")
        );
        // The first run ends at 1 h 30; the tick at 2 h starts the second.
        tokio::time::sleep(60 * MIN).await;
        let status = scheduler.status("db").expect("status");
        assert_eq!((status.runs, status.skipped), (2, 1));
        assert!(status.last_verified_id.is_some());
        assert_eq!(runner.backups.load(Ordering::SeqCst), 2);
        scheduler.stop().await.expect("stop");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_with_backoff_then_reported_once() {
        let (runner, gate) = (fake(Duration::ZERO), leader(true));
        runner.fail_next.store(10, Ordering::SeqCst);
        let mut config = hourly("db");
        config.retry = BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
            multiplier: 2.0,
            max_attempts: Some(2),
        };
        let bus = EventBus::default();
        let mut sub = bus.subscribe();
        let scheduler = start(&runner, &gate, config, &bus).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Each sleep is at most 1 s then 2 s: all three attempts are done within 3 s.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(runner.backups.load(Ordering::SeqCst), 3);
        let failed: Vec<_> = events(&mut sub)
            .into_iter()
            .filter_map(|e| match e {
                HaEvent::BackupFailed { kind, reason, .. } => Some((kind, reason)),
                _ => None,
            })
            .collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, "file");
        assert!(failed[0].1.contains("disk on fire"), "{}", failed[0].1);
        assert!(failed[0].1.contains("attempt 3"), "{}", failed[0].1);
        let status = scheduler.status("db").expect("status");
        assert!(!status.running, "waits for the next tick");
        assert!(status.last_error.is_some());

        // A corrupt backup is not retried.
        runner.fail_next.store(0, Ordering::SeqCst);
        runner.corrupt.store(true, Ordering::SeqCst);
        tokio::time::sleep(60 * MIN).await;
        assert_eq!(runner.backups.load(Ordering::SeqCst), 4);
        let status = scheduler.status("db").expect("status");
        assert!(status.last_success.is_some() && status.last_verified.is_none());
        assert!(status.last_error.expect("error").contains("corrupt"));
        scheduler.stop().await.expect("stop");
    }

    #[tokio::test(start_paused = true)]
    async fn rpo_breach_is_published_once_per_breach() {
        let (runner, gate) = (fake(Duration::ZERO), leader(true));
        runner.failing.store(true, Ordering::SeqCst);
        let mut config = hourly("db");
        config.retry.max_attempts = Some(1);
        if let Some(db) = config.sources.get_mut("db") {
            db.rpo = Some(120 * MIN);
        }
        let bus = EventBus::default();
        let mut sub = bus.subscribe();
        let scheduler = start(&runner, &gate, config, &bus).await;
        let breaches = |sub: &mut ha_core::EventSubscriber| {
            events(sub)
                .into_iter()
                .filter(|e| matches!(e, HaEvent::RpoBreached { .. }))
                .collect::<Vec<_>>()
        };
        tokio::time::sleep(210 * MIN).await;
        let first = breaches(&mut sub);
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(matches!(
            first[0],
            HaEvent::RpoBreached { since_last_backup: None, rpo, .. } if rpo == 120 * MIN
        ));
        assert!(scheduler.status("db").expect("status").rpo_breached);

        runner.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(60 * MIN).await; // the 4 h run succeeds
        let status = scheduler.status("db").expect("status");
        assert!(!status.rpo_breached, "{status:?}");
        assert!(breaches(&mut sub).is_empty());

        runner.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(150 * MIN).await; // 6 h 30: 2 h 30 since the 4 h backup
        let second = breaches(&mut sub);
        assert_eq!(second.len(), 1, "{second:?}");
        assert!(matches!(
            second[0],
            HaEvent::RpoBreached { since_last_backup: Some(age), .. } if age > 120 * MIN
        ));
        scheduler.stop().await.expect("stop");
    }

    #[tokio::test(start_paused = true)]
    async fn restore_tests_measure_the_rto_against_its_target() {
        let (runner, gate) = (fake(Duration::ZERO), leader(true));
        let mut config = hourly("db");
        if let Some(db) = config.sources.get_mut("db") {
            db.restore_test = true;
        }
        let bus = EventBus::default();
        let mut sub = bus.subscribe();
        let scheduler = start(&runner, &gate, config, &bus).await;
        tokio::time::sleep(30 * MIN).await;
        let status = scheduler.status("db").expect("status");
        assert_eq!(status.last_restore_test, Some(20 * MIN));
        assert_eq!(status.rto_met, Some(false), "the default target is 15 min");
        let names: Vec<_> = events(&mut sub).iter().map(HaEvent::name).collect();
        assert_eq!(names, ["backup_completed", "restore_completed"]);
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(json["rto_target"], "15m");
        assert_eq!(json["schedule"], "every 1h");
        scheduler.stop().await.expect("stop");
    }

    #[test]
    fn cron_errors_name_the_config_field_and_the_cron_field() {
        let bad = |cron: &str| {
            let mut config = ScheduleConfig::default();
            config.sources.insert(
                "db".into(),
                SourceSchedule {
                    cron: Some(cron.into()),
                    ..SourceSchedule::default()
                },
            );
            config.validate().expect_err(cron)
        };
        let err = bad("61 * * * *");
        assert_eq!(err.field, "sources.db.cron");
        assert!(err.rule.contains("the minute field `61`"), "{}", err.rule);
        let err = bad("0 3 * * mon-xyz");
        assert!(err.rule.contains("day-of-week"), "{}", err.rule);
        let err = bad("0 3 *");
        assert!(err.rule.contains("has 3 fields"), "{}", err.rule);

        let mut both = ScheduleConfig::default();
        both.sources.insert(
            "db".into(),
            SourceSchedule {
                cron: Some("0 3 * * *".into()),
                interval: Some(MIN),
                ..SourceSchedule::default()
            },
        );
        assert_eq!(both.validate().expect_err("both").field, "sources.db.cron");
    }

    #[test]
    fn config_deserializes_with_human_durations() {
        let config: ScheduleConfig = serde_json::from_str(
            r#"{"rpo_check_interval": "1m", "sources": {"db": {"cron": "0 3 * * *",
                "rpo": "26h", "retention": {"keep_daily": 7}}, "files": {"interval": "12h"}}}"#,
        )
        .expect("config");
        assert!(config.validate().is_ok());
        assert_eq!(config.sources["db"].rpo, Some(26 * 60 * MIN));
        assert_eq!(config.sources["files"].interval, Some(12 * 60 * MIN));
        assert!(
            serde_json::from_str::<ScheduleConfig>(r#"{"sources": {"db": {"intervl": "1h"}}}"#)
                .is_err()
        );
    }

    #[test]
    fn the_cron_rpo_is_the_longest_gap_between_fire_times() {
        // Monday 2024-01-01 00:00 UTC; weekdays at 03:00: the longest gap is Friday to Monday.
        let monday = SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200);
        let cron = CronSchedule::parse("0 3 * * 1-5").expect("parse");
        assert_eq!(cron.longest_gap(monday), Some(72 * 60 * MIN));
        assert_eq!(cron.next_after(monday), Some(monday + 3 * 60 * MIN), "UTC");
        let daily = CronSchedule::parse("@daily").expect("parse");
        assert_eq!(daily.longest_gap(monday), Some(24 * 60 * MIN));
    }

    #[tokio::test(start_paused = true)]
    async fn defaults_follow_the_source_kind() {
        let scheduler = BackupScheduler::builder(fake(MIN))
            .source(
                "db",
                Source::postgres("postgresql://h/db", crate::PgTools::default()),
            )
            .source("files", Source::dir("/srv"))
            .build()
            .expect("build");
        let statuses = scheduler.statuses();
        assert_eq!(statuses[0].rpo, 4 * 60 * MIN);
        assert_eq!(statuses[1].rpo, 24 * 60 * MIN);
        assert_eq!(statuses[1].rto_target, 15 * MIN);
        assert_eq!(statuses[0].runs, 0, "unstarted: never run");
        assert_eq!(Component::status(&scheduler), Status::Unknown);

        let unknown = BackupScheduler::builder(fake(MIN))
            .config(hourly("nope"))
            .source("db", Source::dir("/srv"))
            .build()
            .expect_err("unknown source");
        assert!(unknown.to_string().contains("`sources.nope`"), "{unknown}");
    }

    #[tokio::test(start_paused = true)]
    async fn backup_now_runs_one_backup_on_the_leader_only() {
        let (runner, gate, bus) = (fake(MIN), leader(false), EventBus::default());
        let mut config = hourly("db");
        if let Some(db) = config.sources.get_mut("db") {
            db.interval = Some(24 * 60 * MIN);
        }
        let scheduler = BackupScheduler::builder(Arc::clone(&runner))
            .config(config)
            .source("db", Source::file("/db"))
            .build()
            .expect("build");
        let unstarted = scheduler.backup_now("db").await.expect_err("unstarted");
        assert!(matches!(unstarted, Error::NotRun { .. }), "{unstarted}");

        let mut sub = bus.subscribe();
        let ctx = ComponentContext::new(NodeId::new("n1"), bus.clone(), gate.clone());
        scheduler.start(ctx.clone()).await.expect("start");
        assert!(
            scheduler.start(ctx).await.is_err(),
            "a second start is refused"
        );
        let follower = scheduler.backup_now("db").await.expect_err("follower");
        assert!(
            follower.to_string().contains("not the leader"),
            "{follower}"
        );
        assert!(follower.is_retryable());
        let unknown = scheduler.backup_now("nope").await.expect_err("unknown");
        assert!(!unknown.is_retryable(), "{unknown}");

        gate.0.store(true, Ordering::SeqCst);
        let manifest = scheduler.backup_now("db").await.expect("backup now");
        let status = scheduler.status("db").expect("status");
        assert_eq!(
            status.last_verified_id.as_deref(),
            Some(manifest.id.as_str())
        );
        assert_eq!(status.runs, 1);
        assert_eq!(Component::status(&scheduler), Status::Healthy);
        let names: Vec<_> = events(&mut sub).iter().map(HaEvent::name).collect();
        assert_eq!(names, ["backup_completed"]);

        scheduler.stop().await.expect("stop");
        scheduler.stop().await.expect("stop is idempotent");
        assert!(scheduler.backup_now("db").await.is_err(), "stopped");
    }
}
