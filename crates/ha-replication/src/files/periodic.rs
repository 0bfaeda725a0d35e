//! [`FileSync`]: a [`FileReplicator`] run every interval as a [`Component`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ha_core::config;
use ha_core::sync::lock;
use ha_core::{CancellationToken, Component, ComponentContext, ComponentTasks, Status};

use super::error::FileSyncError;
use super::replicator::FileReplicator;
use super::report::SyncReport;

/// Runs [`FileReplicator::sync`] every `interval`, on Tokio's blocking pool, as a
/// [`Component`] (named `file-sync-<config name>` unless [`named`](Self::named)).
///
/// It runs on every node unless [`leader_only`](Self::leader_only): then a node that does not
/// lead (as the context's leadership gate says at each tick) skips the tick. The first run is
/// at start. A run is never abandoned half-way: [`stop`](Component::stop) waits for a run in
/// progress to end, so nothing writes to the target after it returns. Each run's report (or
/// error) is kept for [`last_report`](Self::last_report), [`last_error`](Self::last_error) and
/// the status; the replicator records the `ha_replication_file_*` metrics of every run. No
/// event is published.
///
/// ```
/// use std::time::Duration;
/// use ha_core::{Component, ComponentContext};
/// use ha_replication::files::{FileReplicator, FileSync, FileSyncConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (source, target) = (tempfile::tempdir()?, tempfile::tempdir()?);
/// std::fs::write(source.path().join("app.toml"), "port = 8080\n")?;
/// let replicator = FileReplicator::local(source.path(), target.path(), FileSyncConfig::default())?;
/// let sync = FileSync::new(replicator, Duration::from_secs(30))?;
/// sync.start(ComponentContext::standalone("n1")).await?;
/// while sync.runs() == 0 {
///     tokio::time::sleep(Duration::from_millis(10)).await;
/// }
/// sync.stop().await?;
/// assert!(target.path().join("app.toml").exists());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FileSync {
    replicator: FileReplicator,
    name: String,
    interval: Duration,
    leader_only: bool,
    state: Arc<Mutex<SyncState>>,
    tasks: ComponentTasks,
}

#[derive(Debug, Default)]
struct SyncState {
    runs: u64,
    last_run: Option<SystemTime>,
    last: Option<Result<SyncReport, String>>,
}

impl FileSync {
    /// Syncs with `replicator` every `interval` (must be positive), on every node.
    pub fn new(replicator: FileReplicator, interval: Duration) -> Result<Self, FileSyncError> {
        config::positive("interval", interval)?;
        Ok(Self {
            name: format!("file-sync-{}", replicator.config().name),
            replicator,
            interval,
            leader_only: false,
            state: Arc::default(),
            tasks: ComponentTasks::default(),
        })
    }

    /// The component's name (default `file-sync-<config name>`).
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sync only while this node leads (default false: every node syncs).
    #[must_use]
    pub fn leader_only(mut self, leader_only: bool) -> Self {
        self.leader_only = leader_only;
        self
    }

    /// The replicator.
    pub fn replicator(&self) -> &FileReplicator {
        &self.replicator
    }

    /// Runs finished (successful or not) since construction.
    pub fn runs(&self) -> u64 {
        lock(&self.state).runs
    }

    /// When the last run finished.
    pub fn last_run(&self) -> Option<SystemTime> {
        lock(&self.state).last_run
    }

    /// The report of the last run, if it completed.
    pub fn last_report(&self) -> Option<SyncReport> {
        match &lock(&self.state).last {
            Some(Ok(report)) => Some(report.clone()),
            _ => None,
        }
    }

    /// Why the last run failed as a whole, if it did.
    pub fn last_error(&self) -> Option<String> {
        match &lock(&self.state).last {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }
}

#[ha_core::async_trait]
impl Component for FileSync {
    fn name(&self) -> &str {
        &self.name
    }

    /// Syncs every interval (the first at once) until `ctx.shutdown` or
    /// [`stop`](Component::stop); leader-only runs ask `ctx.leadership` at each tick.
    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        let stop = self.tasks.begin(&self.name, &ctx)?;
        let leadership = self.leader_only.then(|| Arc::clone(&ctx.leadership));
        self.tasks.spawn(sync_loop(
            self.replicator.clone(),
            self.name.clone(),
            self.interval,
            leadership,
            Arc::clone(&self.state),
            stop,
        ));
        tracing::info!(sync = %self.name, interval = ?self.interval, leader_only = self.leader_only, "file sync started");
        Ok(())
    }

    /// Stops the ticks and waits for a run in progress to finish. Idempotent.
    async fn stop(&self) -> Result<(), ha_core::Error> {
        self.tasks.stop().await;
        Ok(())
    }

    /// Unknown before the first run; Unhealthy when the last run failed as a whole; Degraded
    /// when entries failed or deletions were held back; else Healthy.
    fn status(&self) -> Status {
        match &lock(&self.state).last {
            None => Status::Unknown,
            Some(Err(_)) => Status::Unhealthy,
            Some(Ok(r)) if !r.failed.is_empty() || r.deletions_refused.is_some() => {
                Status::Degraded
            }
            Some(Ok(_)) => Status::Healthy,
        }
    }
}

async fn sync_loop(
    replicator: FileReplicator,
    name: String,
    interval: Duration,
    leadership: Option<Arc<dyn ha_core::LeadershipGate>>,
    state: Arc<Mutex<SyncState>>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if leadership
            .as_ref()
            .is_some_and(|gate| gate.is_leader().is_none())
        {
            tracing::debug!(sync = %name, "file sync skipped: this node is not the leader");
            continue;
        }
        // Awaited to the end, even at stop: a blocking run cannot be interrupted, and stop
        // promises that nothing writes to the target once it returns.
        let outcome = replicator.sync().await;
        match &outcome {
            Ok(report) if report.is_clean() => {
                tracing::debug!(sync = %name, copied = report.files_copied, deleted = report.deleted, "file sync done");
            }
            Ok(report) => {
                tracing::warn!(sync = %name, failed = report.failed.len(), refused = report.refused.len(), deletions_refused = report.deletions_refused.is_some(), "file sync incomplete");
            }
            Err(e) => tracing::warn!(sync = %name, error = %e, "file sync failed"),
        }
        let mut state = lock(&state);
        state.runs += 1;
        state.last_run = Some(SystemTime::now());
        state.last = Some(outcome.map_err(|e| e.to_string()));
    }
}
