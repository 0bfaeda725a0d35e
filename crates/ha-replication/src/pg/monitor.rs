//! [`PgReplicationMonitor`]: samples the primary and each replica, turns the figures into a
//! lag per replica, and reports bound breaches and recoveries as events.
//!
//! # Lag, and the idle primary
//!
//! `now() - pg_last_xact_replay_timestamp()` on a replica is *not* lag: while the primary
//! writes nothing it grows forever on a replica that is fully caught up (the seed's monitor
//! flagged every idle replica this way). Here lag is measured from WAL positions:
//!
//! - **bytes** — `pg_current_wal_lsn() - replay_lsn` from the primary's `pg_stat_replication`
//!   row for the replica (or from the replica's own replay position when it has no row);
//! - **time** — zero when no WAL is outstanding (an idle primary gives no lag); otherwise
//!   PostgreSQL's own `replay_lag` (measured on WAL positions, not on commit timestamps), and
//!   at least the age of the standby's last reply: a standby that stopped answering (SIGSTOP,
//!   a hung disk) while WAL is outstanding is behind by at least that long, even though its
//!   last measured `replay_lag` stays small.
//!
//! A replica is *breached* when either figure is over its bound, or when it has no
//! replication connection while WAL is outstanding or its position is unknown. A state
//! change needs `consecutive_samples` agreeing samples (default 2), so one sample taken in the
//! millisecond between a write and the standby's reply does not flap.
//!
//! The monitor is a [`Component`] named `postgres-replication`: started with the node's
//! [`ComponentContext`], it samples every `interval` and publishes breaches and recoveries on
//! the context's bus as the context's node, until the context's shutdown or
//! [`stop`](Component::stop). [`PgReplicationMonitor::sample`] takes one sample on demand (it
//! publishes only while the monitor is started).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use ha_core::config::{self, ConfigError, Validate};
use ha_core::{
    Component, ComponentContext, ComponentTasks, EventBus, HaEvent, NodeId, Status, metric,
};
use serde::{Deserialize, Serialize};

use crate::pg::member::PgMember;
use crate::pg::status::{PrimaryStatus, ReplicaStatus, StandbyStatus};
use crate::{Error, Lsn};

/// Lag bounds and sampling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LagConfig {
    /// Time lag above which a replica is breached (default 5 s).
    #[serde(with = "config::duration")]
    pub max_lag: Duration,
    /// WAL bytes behind above which a replica is breached (default 16 MiB, one WAL segment).
    pub max_lag_bytes: u64,
    /// Time between samples once the monitor is started (default 1 s).
    #[serde(with = "config::duration")]
    pub interval: Duration,
    /// Agreeing samples needed to change a replica's breached state (default 2).
    pub consecutive_samples: u32,
}

impl Default for LagConfig {
    fn default() -> Self {
        Self {
            max_lag: Duration::from_secs(5),
            max_lag_bytes: 16 * 1024 * 1024,
            interval: Duration::from_secs(1),
            consecutive_samples: 2,
        }
    }
}

impl Validate for LagConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::positive("max_lag", self.max_lag)?;
        config::at_least("max_lag_bytes", self.max_lag_bytes, 1)?;
        config::positive("interval", self.interval)?;
        config::at_least("consecutive_samples", self.consecutive_samples, 1)
    }
}

/// How a replica is connected, as far as one sample can tell.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// The primary lists it in `pg_stat_replication`.
    Connected,
    /// It answers, but the primary does not list it (receiver down or reconnecting).
    Disconnected,
    /// It does not answer, and the primary does not list it.
    Unreachable,
    /// The primary lists it, but it does not answer queries itself (e.g. paused).
    ConnectedUnresponsive,
}

/// One replica in one sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaLag {
    /// The replica's name.
    pub replica: String,
    /// How it is connected.
    pub link: Link,
    /// WAL bytes behind the primary, when known.
    pub lag_bytes: Option<u64>,
    /// Time behind, when known (see the module docs).
    pub lag: Option<Duration>,
    /// Whether this sample alone is over a bound (the reported state also needs
    /// `consecutive_samples`).
    pub over_bound: bool,
    /// The reported state after this sample.
    pub breached: bool,
    /// The primary's row for it.
    pub standby: Option<StandbyStatus>,
    /// Its own view, when it answered.
    pub status: Option<ReplicaStatus>,
    /// Its error, when it did not.
    pub error: Option<String>,
}

/// One round of the monitor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken.
    #[serde(skip)]
    pub at: SystemTime,
    /// The primary's state.
    pub primary: PrimaryStatus,
    /// Every configured replica, in configuration order.
    pub replicas: Vec<ReplicaLag>,
}

/// Lag of one replica from the primary's row and the replica's own view (see the module docs).
pub fn estimate(
    primary: &PrimaryStatus,
    standby: Option<&StandbyStatus>,
    replica: Option<&ReplicaStatus>,
) -> (Option<u64>, Option<Duration>) {
    let bytes = standby.and_then(|s| s.lag_bytes).or_else(|| {
        replica
            .and_then(|r| r.replay_lsn)
            .map(|replayed| primary.current_lsn.bytes_since(replayed))
    });
    let time = match (bytes, standby) {
        (Some(0), _) => Some(Duration::ZERO),
        (_, Some(s)) => Some(
            s.replay_lag
                .unwrap_or(Duration::ZERO)
                .max(s.reply_age.unwrap_or(Duration::ZERO)),
        ),
        (_, None) => None,
    };
    (bytes, time)
}

/// Whether one sample of a replica is over the bounds of `config`.
pub fn over_bound(
    config: &LagConfig,
    link: Link,
    bytes: Option<u64>,
    time: Option<Duration>,
) -> bool {
    let caught_up = bytes == Some(0);
    bytes.is_some_and(|b| b > config.max_lag_bytes)
        || time.is_some_and(|t| t > config.max_lag)
        || (!caught_up && !matches!(link, Link::Connected | Link::ConnectedUnresponsive))
        || bytes.is_none()
}

/// Watches a primary and its replicas: a [`Component`] named `postgres-replication` (see the
/// [module docs](self)).
pub struct PgReplicationMonitor {
    inner: Arc<Inner>,
    tasks: ComponentTasks,
}

/// The name of the monitor as a [`Component`].
const COMPONENT: &str = "postgres-replication";

struct Inner {
    primary: PgMember,
    replicas: Vec<PgMember>,
    config: LagConfig,
    /// Who publishes changes, and where: set by `start` from the context, cleared by `stop`.
    publisher: Mutex<Option<(NodeId, EventBus)>>,
    state: Mutex<State>,
}

struct State {
    trackers: Vec<Tracker>,
    last: Option<Arc<Sample>>,
    /// What the last sample said: unknown before the first.
    status: Status,
}

#[derive(Default, Clone)]
struct Tracker {
    breached: bool,
    streak: u32,
    /// The replica's slot, learned from its WAL receiver, so its row on the primary can be
    /// found while it does not answer itself.
    slot: Option<String>,
}

impl PgReplicationMonitor {
    /// A monitor of `primary` and `replicas`; fails if `config` is invalid.
    pub fn new(
        primary: PgMember,
        replicas: Vec<PgMember>,
        config: LagConfig,
    ) -> Result<Self, Error> {
        config.validate().map_err(|source| Error::Config {
            what: "replication lag",
            source,
        })?;
        let trackers = vec![Tracker::default(); replicas.len()];
        Ok(Self {
            inner: Arc::new(Inner {
                primary,
                replicas,
                config,
                publisher: Mutex::new(None),
                state: Mutex::new(State {
                    trackers,
                    last: None,
                    status: Status::Unknown,
                }),
            }),
            tasks: ComponentTasks::default(),
        })
    }

    /// The primary.
    pub fn primary(&self) -> &PgMember {
        &self.inner.primary
    }

    /// The replicas.
    pub fn replicas(&self) -> &[PgMember] {
        &self.inner.replicas
    }

    /// The latest sample, if any.
    pub fn last_sample(&self) -> Option<Arc<Sample>> {
        self.inner.lock().last.clone()
    }

    /// The primary's WAL position at the latest sample: what a promotion compares candidates
    /// against once the primary is gone.
    pub fn last_primary_lsn(&self) -> Option<Lsn> {
        self.inner
            .lock()
            .last
            .as_ref()
            .map(|s| s.primary.current_lsn)
    }

    /// Takes one sample of every server (replicas queried concurrently) and updates breach
    /// states; while the monitor is started, publishes the changes on its context's bus.
    /// Fails only if the primary cannot be read.
    pub async fn sample(&self) -> Result<Arc<Sample>, Error> {
        self.inner.sample().await
    }
}

#[ha_core::async_trait]
impl Component for PgReplicationMonitor {
    fn name(&self) -> &str {
        COMPONENT
    }

    /// Samples every `interval` as `ctx.node`, publishing breaches and recoveries on
    /// `ctx.bus`, until `ctx.shutdown` or [`stop`](Component::stop). A failed sample is
    /// logged and the loop goes on.
    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        let stop = self.tasks.begin(COMPONENT, &ctx)?;
        *ha_core::sync::lock(&self.inner.publisher) = Some((ctx.node, ctx.bus));
        self.tasks.spawn(sample_loop(Arc::clone(&self.inner), stop));
        Ok(())
    }

    /// Stops sampling and waits for a sample in progress to end. Idempotent.
    async fn stop(&self) -> Result<(), ha_core::Error> {
        self.tasks.stop().await;
        *ha_core::sync::lock(&self.inner.publisher) = None;
        Ok(())
    }

    /// Unknown before the first sample; Unhealthy when the last sample could not read the
    /// primary; Degraded while a replica is breached; else Healthy.
    fn status(&self) -> Status {
        self.inner.lock().status
    }
}

/// Samples every `interval` until `stop` fires.
async fn sample_loop(inner: Arc<Inner>, stop: tokio_util::sync::CancellationToken) {
    let mut ticks = tokio::time::interval(inner.config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // A sample in progress is abandoned at stop: its queries have their own timeouts,
        // but stop should not wait for them.
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            result = inner.sample() => if let Err(e) = result {
                tracing::warn!(primary = inner.primary.name(), error = %e, "replication sample failed");
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        ha_core::sync::lock(&self.state)
    }

    async fn sample(&self) -> Result<Arc<Sample>, Error> {
        let (primary, replicas) = tokio::join!(
            self.primary.primary_status(),
            join_all(self.replicas.iter().map(PgMember::replica_status)),
        );
        let primary = match primary {
            Ok(primary) => primary,
            Err(e) => {
                self.lock().status = Status::Unhealthy;
                return Err(e);
            }
        };
        let mut state = self.lock();
        let mut lags = Vec::with_capacity(self.replicas.len());
        for (i, (member, own)) in self.replicas.iter().zip(replicas).enumerate() {
            let (status, error) = match own {
                Ok(s) => (Some(s), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let tracker = &mut state.trackers[i];
            if let Some(slot) = status
                .as_ref()
                .and_then(|s| s.receiver.as_ref())
                .and_then(|r| r.slot_name.clone())
            {
                tracker.slot = Some(slot);
            }
            let standby = find_standby(&primary, member, tracker.slot.as_deref()).cloned();
            let link = match (&standby, &status) {
                (Some(_), Some(_)) => Link::Connected,
                (Some(_), None) => Link::ConnectedUnresponsive,
                (None, Some(_)) => Link::Disconnected,
                (None, None) => Link::Unreachable,
            };
            let (lag_bytes, lag) = estimate(&primary, standby.as_ref(), status.as_ref());
            let over = over_bound(&self.config, link, lag_bytes, lag);
            if over == tracker.breached {
                tracker.streak = 0;
            } else {
                tracker.streak += 1;
                if tracker.streak >= self.config.consecutive_samples {
                    tracker.breached = over;
                    tracker.streak = 0;
                    self.publish_change(member.name(), over, lag_bytes, lag, link);
                }
            }
            record_metrics(member.name(), lag_bytes, lag);
            lags.push(ReplicaLag {
                replica: member.name().to_owned(),
                link,
                lag_bytes,
                lag,
                over_bound: over,
                breached: tracker.breached,
                standby,
                status,
                error,
            });
        }
        let sample = Arc::new(Sample {
            at: SystemTime::now(),
            primary,
            replicas: lags,
        });
        state.status = if sample.replicas.iter().any(|r| r.breached) {
            Status::Degraded
        } else {
            Status::Healthy
        };
        state.last = Some(sample.clone());
        Ok(sample)
    }

    fn publish_change(
        &self,
        replica: &str,
        breached: bool,
        lag_bytes: Option<u64>,
        lag: Option<Duration>,
        link: Link,
    ) {
        let at = SystemTime::now();
        let publisher = ha_core::sync::lock(&self.publisher).clone();
        let node = publisher
            .as_ref()
            .map_or_else(|| NodeId::new("local"), |(node, _)| node.clone());
        let replica = replica.to_owned();
        let event = if breached {
            tracing::warn!(%replica, ?lag_bytes, ?lag, ?link, "replication lag over bound");
            HaEvent::ReplicationLagBreached {
                at,
                node,
                replica,
                lag_bytes,
                lag,
            }
        } else {
            tracing::info!(%replica, ?lag_bytes, ?lag, "replication lag back within bound");
            HaEvent::ReplicationLagRecovered {
                at,
                node,
                replica,
                lag_bytes,
                lag,
            }
        };
        if let Some((_, bus)) = publisher {
            bus.publish(event);
        }
    }
}

/// The primary's row for `member`: by its slot when known, else by `application_name` equal
/// to the member's name.
fn find_standby<'a>(
    primary: &'a PrimaryStatus,
    member: &PgMember,
    slot: Option<&str>,
) -> Option<&'a StandbyStatus> {
    primary.standbys.iter().find(|s| match slot {
        Some(slot) => s.slot_name.as_deref() == Some(slot),
        None => s.application_name == member.name(),
    })
}

fn record_metrics(replica: &str, lag_bytes: Option<u64>, lag: Option<Duration>) {
    if let Some(b) = lag_bytes {
        metrics::gauge!(metric::REPLICATION_LAG_BYTES, "replica" => replica.to_owned())
            .set(b as f64);
    }
    if let Some(t) = lag {
        metrics::gauge!(metric::REPLICATION_LAG_SECONDS, "replica" => replica.to_owned())
            .set(t.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(current: u64) -> PrimaryStatus {
        PrimaryStatus {
            current_lsn: Lsn(current),
            timeline: 1,
            standbys: Vec::new(),
        }
    }

    fn standby(lag_bytes: u64, replay_lag: Option<u64>, reply_age_ms: u64) -> StandbyStatus {
        StandbyStatus {
            application_name: "r1".into(),
            client_addr: None,
            state: "streaming".into(),
            sync_state: "async".into(),
            sent_lsn: None,
            write_lsn: None,
            flush_lsn: None,
            replay_lsn: None,
            lag_bytes: Some(lag_bytes),
            write_lag: None,
            flush_lag: None,
            replay_lag: replay_lag.map(Duration::from_millis),
            reply_age: Some(Duration::from_millis(reply_age_ms)),
            slot_name: None,
            slot_retained_bytes: None,
        }
    }

    #[test]
    fn an_idle_caught_up_replica_has_no_lag_however_old_its_last_replay() {
        // Nothing outstanding; the last reply was 9 s ago (idle status interval).
        let (bytes, time) = estimate(&primary(100), Some(&standby(0, None, 9000)), None);
        assert_eq!((bytes, time), (Some(0), Some(Duration::ZERO)));
        let config = LagConfig::default();
        assert!(!over_bound(&config, Link::Connected, bytes, time));
    }

    #[test]
    fn a_silent_standby_behind_the_primary_lags_at_least_its_silence() {
        let (bytes, time) = estimate(&primary(100), Some(&standby(4096, Some(3), 7000)), None);
        assert_eq!(bytes, Some(4096));
        assert_eq!(time, Some(Duration::from_secs(7)));
        assert!(over_bound(
            &LagConfig::default(),
            Link::Connected,
            bytes,
            time
        ));
    }

    #[test]
    fn unknown_or_disconnected_and_behind_is_over_bound() {
        let config = LagConfig::default();
        assert!(over_bound(&config, Link::Unreachable, None, None));
        assert!(over_bound(&config, Link::Disconnected, Some(10), None));
        assert!(!over_bound(
            &config,
            Link::Disconnected,
            Some(0),
            Some(Duration::ZERO)
        ));
        assert!(over_bound(
            &config,
            Link::Connected,
            Some(config.max_lag_bytes + 1),
            Some(Duration::ZERO)
        ));
    }

    #[test]
    fn config_rules_name_the_field() {
        let c = LagConfig {
            consecutive_samples: 0,
            ..LagConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "consecutive_samples");
    }
}
