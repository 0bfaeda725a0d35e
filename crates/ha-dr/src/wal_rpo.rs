//! [`WalRpoMonitor`]: the recovery point of a PostgreSQL cluster archived with `wal-push`
//! is its newest archived WAL segment; this component watches that segment's age and
//! publishes `RpoBreached` (kind `wal`) when it exceeds the objective (default 5 min).
//!
//! Base backups are scheduled like any source ([`crate::Source::pg_base`] in a
//! [`crate::BackupScheduler`]); between them, the archive is what bounds the data a loss
//! costs. An `archive_command` that keeps failing (a full disk, a lost key) shows here as a
//! growing age long before anyone needs a restore. Set `archive_timeout` below the RPO, so
//! that an idle-but-not-silent server still switches segments often enough.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ha_core::config::{self, ConfigError, Validate};
use ha_core::sync::lock;
use ha_core::{Component, ComponentContext, ComponentTasks, HaEvent, Status, metric};
use serde::{Deserialize, Serialize};
use tokio::time::MissedTickBehavior;

use crate::repo::Repository;

const COMPONENT: &str = "wal_rpo";

/// How the WAL archive's recovery point is watched.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalRpoConfig {
    /// The objective: the newest archived segment may be at most this old (default 5 min).
    #[serde(with = "config::duration")]
    pub rpo: Duration,
    /// How often the archive is looked at (default 30 s); at most the RPO.
    #[serde(with = "config::duration")]
    pub check_interval: Duration,
}

impl Default for WalRpoConfig {
    fn default() -> Self {
        Self {
            rpo: Duration::from_secs(5 * 60),
            check_interval: Duration::from_secs(30),
        }
    }
}

impl Validate for WalRpoConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::positive("rpo", self.rpo)?;
        config::positive("check_interval", self.check_interval)?;
        config::ensure(self.check_interval <= self.rpo, "check_interval", || {
            format!(
                "must be at most `rpo` ({}): a breach would go unseen for longer than the \
                 objective",
                humantime::format_duration(self.rpo)
            )
        })
    }
}

/// What the monitor saw at its last check.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct WalRpoStatus {
    /// The newest archived segment, if any.
    pub newest: Option<String>,
    /// When it was archived.
    #[serde(with = "humantime_serde")]
    pub archived_at: Option<SystemTime>,
    /// How old it was (or, with none, how long this node has led) at the last check.
    #[serde(with = "humantime_serde")]
    pub age: Option<Duration>,
    /// Whether the RPO was breached at the last check.
    pub breached: bool,
    /// When the last check ran (`None`: not yet, or not the leader).
    #[serde(with = "humantime_serde")]
    pub checked_at: Option<SystemTime>,
    /// Why the last check could not read the archive, if it could not.
    pub error: Option<String>,
}

/// The age of the recovery point and whether it breaches `rpo`. Without any archived segment
/// the clock runs from `leading_since`: a new leader gets one RPO to see the first one.
pub fn judge(
    newest: Option<SystemTime>,
    leading_since: SystemTime,
    now: SystemTime,
    rpo: Duration,
) -> (Duration, bool) {
    let since = newest.unwrap_or(leading_since);
    let age = now.duration_since(since).unwrap_or_default();
    (age, age > rpo)
}

/// Watches the age of the newest archived WAL segment on the leader; see the
/// [module docs](self).
#[derive(Debug)]
pub struct WalRpoMonitor {
    repo: Repository,
    config: WalRpoConfig,
    status: Arc<Mutex<WalRpoStatus>>,
    tasks: ComponentTasks,
}

impl WalRpoMonitor {
    /// A monitor of `repo`'s archive, unstarted; fails if `config` does not validate.
    pub fn new(repo: Repository, config: WalRpoConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            repo,
            config,
            status: Arc::default(),
            tasks: ComponentTasks::default(),
        })
    }

    /// The last check's view.
    pub fn status(&self) -> WalRpoStatus {
        lock(&self.status).clone()
    }
}

#[ha_core::async_trait]
impl Component for WalRpoMonitor {
    fn name(&self) -> &str {
        COMPONENT
    }

    /// Checks every `check_interval` while `ctx.leadership` says this node leads,
    /// publishing on `ctx.bus` as `ctx.node`, until `ctx.shutdown` or
    /// [`stop`](Component::stop).
    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        let stop = self.tasks.begin(COMPONENT, &ctx)?;
        let (repo, config, status) = (
            self.repo.clone(),
            self.config.clone(),
            Arc::clone(&self.status),
        );
        self.tasks.spawn(async move {
            let mut ticks = tokio::time::interval(config.check_interval);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut leading_since: Option<SystemTime> = None;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                if ctx.leadership.is_leader().is_none() {
                    // Only the leader's archive view counts; a new term starts a new clock.
                    leading_since = None;
                    lock(&status).checked_at = None;
                    continue;
                }
                let since = *leading_since.get_or_insert_with(SystemTime::now);
                let newest = repo.newest_wal().await;
                let now = SystemTime::now();
                let mut st = lock(&status);
                st.checked_at = Some(now);
                let (name, archived) = match newest {
                    Ok(Some((name, at))) => {
                        st.error = None;
                        (Some(name), Some(at))
                    }
                    Ok(None) => {
                        st.error = None;
                        (None, None)
                    }
                    Err(e) => {
                        // Unreadable: the RPO cannot be shown to hold; it is judged from the
                        // last segment seen (or the start of the term).
                        tracing::warn!(error = %e, "WAL archive could not be read");
                        st.error = Some(e.to_string());
                        (st.newest.clone(), st.archived_at)
                    }
                };
                let (age, breached) = judge(archived, since, now, config.rpo);
                metrics::gauge!(metric::RPO_SECONDS, "kind" => "wal", "source" => "pg_wal")
                    .set(age.as_secs_f64());
                st.newest = name;
                st.archived_at = archived;
                st.age = Some(age);
                if breached != st.breached {
                    st.breached = breached;
                    if breached {
                        tracing::warn!(age = ?age, rpo = ?config.rpo, newest = ?st.newest, "WAL RPO breached");
                        ctx.bus.publish(HaEvent::RpoBreached {
                            at: now,
                            node: ctx.node.clone(),
                            kind: "wal".into(),
                            since_last_backup: archived.map(|_| age),
                            rpo: config.rpo,
                        });
                    } else {
                        tracing::info!(age = ?age, newest = ?st.newest, "WAL RPO met again");
                    }
                }
            }
        });
        tracing::info!(rpo = ?self.config.rpo, "WAL RPO monitor started");
        Ok(())
    }

    /// Stops checking and waits for the task to end. Idempotent.
    async fn stop(&self) -> Result<(), ha_core::Error> {
        self.tasks.stop().await;
        Ok(())
    }

    /// Unknown before a check as the leader; Unhealthy while the RPO is breached.
    fn status(&self) -> Status {
        let st = lock(&self.status);
        match (st.checked_at, st.breached) {
            (None, _) => Status::Unknown,
            (Some(_), true) => Status::Unhealthy,
            (Some(_), false) => Status::Healthy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_measures_from_the_newest_segment_or_the_term() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let rpo = Duration::from_secs(300);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(judge(Some(at(0)), at(0), at(300), rpo), (rpo, false));
        assert_eq!(
            judge(Some(at(0)), at(0), at(301), rpo),
            (Duration::from_secs(301), true)
        );
        // No segment: a new leader gets one RPO.
        assert!(!judge(None, at(100), at(400), rpo).1);
        assert!(judge(None, at(100), at(401), rpo).1);
        // A segment from "the future" (clock step) is age zero, not a panic.
        assert_eq!(
            judge(Some(at(10)), at(0), at(5), rpo),
            (Duration::ZERO, false)
        );
    }

    #[test]
    fn config_rules_name_the_field() {
        assert!(WalRpoConfig::default().validate().is_ok());
        let bad = WalRpoConfig {
            rpo: Duration::from_secs(10),
            check_interval: Duration::from_secs(30),
        };
        let err = bad.validate().unwrap_err();
        assert!(err.to_string().contains("check_interval"), "{err}");
        let parsed: WalRpoConfig =
            serde_json::from_str(r#"{"rpo": "2m", "check_interval": "10s"}"#).unwrap();
        assert_eq!(parsed.rpo, Duration::from_secs(120));
    }
}
