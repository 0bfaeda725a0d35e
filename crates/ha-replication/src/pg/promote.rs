//! Safe promotion: [`Promoter::promote_best`] promotes the most advanced eligible replica,
//! only on the leader, only once the old primary is down or fenced, and says why whenever it
//! refuses.
//!
//! The steps, each of which can refuse (nothing is promoted then):
//!
//! 1. **Leader only.** The [`LeadershipGate`] must say this node leads; its fencing token is
//!    carried in the report and the `ReplicaPromoted` event. The gate is asked again just
//!    before `pg_promote`, since fencing may take a while.
//! 2. **Old primary fenced.** If it still answers, the [`PrimaryFence`] must stop it
//!    (e.g. [`SqlShutdownFence`]) and it must then stop answering within `fence_timeout`;
//!    with [`NoFence`] a reachable primary is a refusal. A primary that does *not* answer
//!    (within the member's query timeout) is not thereby down: it may be partitioned from
//!    this node while its clients still write to it, paused, or in crash recovery. So it
//!    is fenced too, by a fence that can stop a server that does not answer
//!    ([`PrimaryFence::fences_unreachable`]: a [`CommandFence`] that cuts power or network,
//!    STONITH); without one the promotion is refused ([`Refusal::PrimaryUnreachable`]),
//!    unless the operator set `assume_unreachable_is_down` — which risks two primaries
//!    taking writes when the old one was only cut off from this node. Where possible, run a
//!    [`PgAgent`](crate::pg::PgAgent) beside each database instead: it demotes its own.
//! 3. **Best candidate.** Each candidate must answer, be in recovery, not have replay paused,
//!    not be marked never-to-promote (priority 0), be on the expected timeline, and be within
//!    `max_lag_on_failover` bytes of the reference position (the old primary's last known
//!    position, else the most advanced candidate's). The candidate with the highest position
//!    (max of received and replayed), then priority, then name wins.
//! 4. **Promote and prove it.** `pg_promote(true, …)`, then the new primary must be out of
//!    recovery and assign a transaction id (a write that leaves no data behind). Measured
//!    (`benches/promote.rs`): about 0.1 s from the call to the first accepted write, but now
//!    and then 5.1 s — a replica whose WAL receiver just lost its primary may be sleeping for
//!    `wal_retrieve_retry_interval` (5 s by default) before it notices the promotion request.
//!    With that setting at 500 ms on the replicas, no trial took more than 0.12 s.
//! 5. **Re-point the others.** Each remaining replica gets its slot created on the new
//!    primary (if it uses one), `primary_conninfo` set with `ALTER SYSTEM` and a reload
//!    (PostgreSQL ≥ 13 applies it without restart), and is watched until it streams from the
//!    new primary; the report says per replica whether it does.
//! 6. **Old primary.** Reported as needing `pg_rewind` before it can rejoin as a replica.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use ha_core::config::{self, ConfigError, Validate};
use ha_core::{EventBus, HaEvent, LeadershipGate, NodeId, metric};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tracing::Instrument;

use crate::pg::member::PgMember;
use crate::pg::status::{PrimaryStatus, ReplicaStatus};
use crate::{Error, Lsn};

/// Promotion bounds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromoteConfig {
    /// A candidate further behind the reference position than this is not promoted (default
    /// 1 MiB, Patroni's `maximum_lag_on_failover`).
    pub max_lag_on_failover: u64,
    /// How long `pg_promote` may take (default 30 s).
    #[serde(with = "config::duration")]
    pub promote_timeout: Duration,
    /// How long a fenced primary may keep answering before the fence counts as failed
    /// (default 10 s).
    #[serde(with = "config::duration")]
    pub fence_timeout: Duration,
    /// How long to wait for each re-pointed replica to stream from the new primary (default
    /// 10 s).
    #[serde(with = "config::duration")]
    pub repoint_timeout: Duration,
    /// Treat an old primary that does not answer as down when no fence can stop it (default
    /// false: refuse). **Risk:** a primary cut off from this node but not from its clients
    /// keeps taking writes after the promotion — two primaries, and writes lost when one is
    /// discarded. Set it only where nothing but this node can reach the database.
    pub assume_unreachable_is_down: bool,
}

impl Default for PromoteConfig {
    fn default() -> Self {
        Self {
            max_lag_on_failover: 1024 * 1024,
            promote_timeout: Duration::from_secs(30),
            fence_timeout: Duration::from_secs(10),
            repoint_timeout: Duration::from_secs(10),
            assume_unreachable_is_down: false,
        }
    }
}

impl Validate for PromoteConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::positive("promote_timeout", self.promote_timeout)?;
        config::ensure(
            self.promote_timeout >= Duration::from_secs(1),
            "promote_timeout",
            || "must be at least 1s (pg_promote waits in whole seconds)".into(),
        )?;
        config::positive("fence_timeout", self.fence_timeout)?;
        config::positive("repoint_timeout", self.repoint_timeout)
    }
}

/// Stops an old primary from accepting writes. `Ok` means it is fenced.
#[async_trait]
pub trait PrimaryFence: Send + Sync {
    /// Fences `primary`; the error says why it could not.
    async fn fence(&self, primary: &PgMember) -> Result<(), String>;

    /// Whether this fence can stop a primary that does not answer (it acts outside
    /// PostgreSQL: power, network, the host). Only such a fence makes an unreachable primary
    /// safe to replace. Default false.
    fn fences_unreachable(&self) -> bool {
        false
    }
}

/// No fence: a primary that still answers blocks promotion.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFence;

#[async_trait]
impl PrimaryFence for NoFence {
    async fn fence(&self, primary: &PgMember) -> Result<(), String> {
        Err(format!(
            "{} still answers and no fence is configured",
            primary.name()
        ))
    }
}

/// Shuts a reachable primary down from SQL: signals its postmaster (pid from
/// `postmaster.pid` in its data directory) for a fast shutdown with
/// `COPY … TO PROGRAM 'kill -INT …'`. Needs a superuser or `pg_execute_server_program`,
/// and `kill` on the server's host. It stops the server; it cannot stop one that does not
/// answer (for that, use a [`CommandFence`] that cuts power or network).
#[derive(Debug, Clone, Copy, Default)]
pub struct SqlShutdownFence;

#[async_trait]
impl PrimaryFence for SqlShutdownFence {
    async fn fence(&self, primary: &PgMember) -> Result<(), String> {
        let data_dir: String = primary
            .run("reading data_directory", |pool| async move {
                sqlx::query_scalar("SELECT current_setting('data_directory')")
                    .fetch_one(&pool)
                    .await
            })
            .await
            .map_err(|e| e.to_string())?;
        if data_dir.contains(['\'', '\\']) {
            return Err(format!(
                "cannot quote data_directory {data_dir:?} for the shell"
            ));
        }
        // The first line of postmaster.pid is the postmaster's pid; SIGINT = fast shutdown.
        let copy = format!(
            "COPY (SELECT 1) TO PROGRAM 'kill -INT $(head -n 1 ''{data_dir}/postmaster.pid'')'"
        );
        primary
            .run("signalling the postmaster", |pool| async move {
                sqlx::query(&copy).execute(&pool).await
            })
            .await
            .map(drop)
            // The connection may die with the server before the reply: the check that it
            // stopped answering decides.
            .or_else(|e| match e {
                Error::Query { .. } | Error::Timeout { .. } => Ok(()),
                other => Err(other.to_string()),
            })
    }
}

/// Runs a command (no shell) that fences the primary, e.g. a STONITH script; exit status 0
/// means fenced. The primary's name is passed as the last argument.
#[derive(Debug, Clone)]
pub struct CommandFence {
    program: String,
    args: Vec<String>,
}

impl CommandFence {
    /// A fence running `program args… <primary name>`.
    pub fn new(
        program: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }
}

#[async_trait]
impl PrimaryFence for CommandFence {
    async fn fence(&self, primary: &PgMember) -> Result<(), String> {
        let output = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .arg(primary.name())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} exited with {}: {}",
                self.program,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// A command acts outside PostgreSQL (STONITH): it can stop a primary that does not
    /// answer.
    fn fences_unreachable(&self) -> bool {
        true
    }
}

/// Why a candidate cannot be promoted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Ineligible {
    /// It did not answer.
    Unreachable {
        /// The error.
        detail: String,
    },
    /// It is not a replica (already promoted, or a primary).
    NotInRecovery,
    /// Its replay is paused (`pg_wal_replay_pause()`), as repmgr refuses too.
    ReplayPaused,
    /// Priority 0: never to be promoted.
    NoFailover,
    /// It replays another timeline than the cluster's.
    TimelineMismatch {
        /// The cluster's timeline.
        expected: u32,
        /// The candidate's.
        found: Option<u32>,
    },
    /// It is too far behind.
    LagTooHigh {
        /// Bytes behind the reference position.
        bytes: u64,
        /// The bound.
        max: u64,
    },
    /// It reports no WAL position.
    PositionUnknown,
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::Unreachable { detail } => write!(f, "unreachable ({detail})"),
            Ineligible::NotInRecovery => f.write_str("not in recovery"),
            Ineligible::ReplayPaused => f.write_str("replay is paused"),
            Ineligible::NoFailover => f.write_str("priority 0 (never promoted)"),
            Ineligible::TimelineMismatch { expected, found } => {
                write!(f, "on timeline {found:?}, not {expected}")
            }
            Ineligible::LagTooHigh { bytes, max } => {
                write!(f, "{bytes} bytes behind, more than {max}")
            }
            Ineligible::PositionUnknown => f.write_str("no WAL position"),
        }
    }
}

/// Why a promotion was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Refusal {
    /// This node does not lead.
    NotLeader,
    /// Leadership ended while fencing; nothing was promoted.
    LeadershipLost,
    /// The old primary still answers and could not be fenced.
    PrimaryReachable {
        /// Its name.
        primary: String,
        /// What the fence said.
        detail: String,
    },
    /// The old primary does not answer, and no fence can stop a primary that does not answer
    /// (see [`PrimaryFence::fences_unreachable`] and `assume_unreachable_is_down`).
    PrimaryUnreachable {
        /// Its name.
        primary: String,
        /// Why it was not fenced.
        detail: String,
    },
    /// No candidate may be promoted.
    NoEligibleReplica {
        /// Every candidate with its reason.
        candidates: Vec<(String, Ineligible)>,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotLeader => f.write_str("this node is not the leader"),
            Refusal::LeadershipLost => f.write_str("leadership was lost before promoting"),
            Refusal::PrimaryReachable { primary, detail } => {
                write!(f, "old primary {primary} still answers: {detail}")
            }
            Refusal::PrimaryUnreachable { primary, detail } => {
                write!(
                    f,
                    "old primary {primary} does not answer and is not fenced: {detail}"
                )
            }
            Refusal::NoEligibleReplica { candidates } => {
                f.write_str("no eligible replica")?;
                for (i, (name, why)) in candidates.iter().enumerate() {
                    write!(f, "{} {name}: {why}", if i == 0 { ":" } else { ";" })?;
                }
                Ok(())
            }
        }
    }
}

/// What happened to a replica that was re-pointed at the new primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RepointOutcome {
    /// It streams from the new primary.
    Streaming,
    /// The new `primary_conninfo` is set and loaded, but it did not stream within the
    /// timeout; it may need a restart, or `pg_rewind` if it was ahead of the new primary.
    NotStreaming {
        /// Its WAL receiver's state when the wait ended.
        receiver: Option<String>,
    },
    /// It could not be re-pointed.
    Failed {
        /// The error.
        detail: String,
    },
}

/// What a promotion did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromotionReport {
    /// The promoted replica.
    pub promoted: String,
    /// The leader's fencing token.
    pub token: Option<u64>,
    /// Its WAL position when chosen.
    pub position: Lsn,
    /// The position candidates were compared against.
    pub reference: Lsn,
    /// Every candidate and its verdict (`None` = eligible).
    pub candidates: Vec<(String, Option<Ineligible>)>,
    /// Whether the old primary had to be fenced (it still answered).
    pub fenced: bool,
    /// The old primary, which needs `pg_rewind` before it can follow the new one.
    pub needs_rewind: String,
    /// Each other replica and what re-pointing it achieved.
    pub repointed: Vec<(String, RepointOutcome)>,
    /// From the call to the first accepted write.
    pub promote_time: Duration,
}

/// Promotes replicas safely. See the [module docs](self).
pub struct Promoter {
    config: PromoteConfig,
    gate: Arc<dyn LeadershipGate>,
    fence: Arc<dyn PrimaryFence>,
    node: NodeId,
    bus: Option<EventBus>,
}

struct Candidate<'a> {
    member: &'a PgMember,
    status: Result<ReplicaStatus, Error>,
}

impl Promoter {
    /// A promoter acting while `gate` says this node leads, fencing with `fence`.
    pub fn new(
        config: PromoteConfig,
        gate: Arc<dyn LeadershipGate>,
        fence: Arc<dyn PrimaryFence>,
    ) -> Result<Self, Error> {
        config.validate().map_err(|source| Error::Config {
            what: "promotion",
            source,
        })?;
        Ok(Self {
            config,
            gate,
            fence,
            node: NodeId::new("local"),
            bus: None,
        })
    }

    /// Publishes `ReplicaPromoted` on `bus` as `node`.
    #[must_use]
    pub fn with_bus(mut self, node: NodeId, bus: EventBus) -> Self {
        self.node = node;
        self.bus = Some(bus);
        self
    }

    /// Promotes the best of `candidates` to replace `old_primary`. `last_known` is the old
    /// primary's last sampled state ([`PgReplicationMonitor::last_sample`]), giving the
    /// reference position and timeline; without it the most advanced candidate sets both.
    ///
    /// [`PgReplicationMonitor::last_sample`]: crate::pg::PgReplicationMonitor::last_sample
    pub async fn promote_best(
        &self,
        old_primary: &PgMember,
        candidates: &[PgMember],
        last_known: Option<&PrimaryStatus>,
    ) -> Result<PromotionReport, Error> {
        let started = Instant::now();
        let span = tracing::info_span!("promote_best", old_primary = old_primary.name());
        let result = self
            .promote_inner(old_primary, candidates, last_known, started)
            .instrument(span)
            .await;
        let outcome = match &result {
            Ok(_) => "promoted",
            Err(Error::Refused(_)) => "refused",
            Err(_) => "failed",
        };
        metrics::counter!(metric::PROMOTIONS_TOTAL, "outcome" => outcome).increment(1);
        match &result {
            Ok(r) => tracing::info!(promoted = %r.promoted, token = ?r.token, "replica promoted"),
            Err(e) => tracing::warn!(error = %e, "promotion not done"),
        }
        result
    }

    async fn promote_inner(
        &self,
        old_primary: &PgMember,
        candidates: &[PgMember],
        last_known: Option<&PrimaryStatus>,
        started: Instant,
    ) -> Result<PromotionReport, Error> {
        let refuse = |r: Refusal| Err(Error::Refused(r));
        if self.gate.is_leader().is_none() {
            return refuse(Refusal::NotLeader);
        }

        // 2. The old primary must be down, or fenced and then down.
        let mut fenced = false;
        if old_primary.is_reachable().await {
            if let Err(detail) = self.fence.fence(old_primary).await {
                return refuse(Refusal::PrimaryReachable {
                    primary: old_primary.name().to_owned(),
                    detail,
                });
            }
            let deadline = Instant::now() + self.config.fence_timeout;
            while old_primary.is_reachable().await {
                if Instant::now() >= deadline {
                    return refuse(Refusal::PrimaryReachable {
                        primary: old_primary.name().to_owned(),
                        detail: format!(
                            "fenced, but still answering after {:?}",
                            self.config.fence_timeout
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            fenced = true;
            tracing::info!(primary = old_primary.name(), "old primary fenced");
        } else if self.fence.fences_unreachable() {
            if let Err(detail) = self.fence.fence(old_primary).await {
                return refuse(Refusal::PrimaryUnreachable {
                    primary: old_primary.name().to_owned(),
                    detail: format!("the fence failed: {detail}"),
                });
            }
            fenced = true;
            tracing::info!(
                primary = old_primary.name(),
                "unreachable old primary fenced"
            );
        } else if self.config.assume_unreachable_is_down {
            tracing::warn!(
                primary = old_primary.name(),
                "old primary does not answer and no fence can stop it: assumed down \
                 (assume_unreachable_is_down)"
            );
        } else {
            return refuse(Refusal::PrimaryUnreachable {
                primary: old_primary.name().to_owned(),
                detail: "no fence can stop a primary that does not answer: configure a \
                         CommandFence (STONITH), or set assume_unreachable_is_down and accept \
                         the risk of two primaries"
                    .to_owned(),
            });
        }

        // 3. Survey the candidates concurrently.
        let surveyed: Vec<Candidate<'_>> =
            futures_util::future::join_all(candidates.iter().map(|member| async move {
                Candidate {
                    member,
                    status: member.replica_status().await,
                }
            }))
            .await;
        let reference = last_known
            .map(|p| p.current_lsn)
            .into_iter()
            .chain(
                surveyed
                    .iter()
                    .filter_map(|c| c.status.as_ref().ok().and_then(ReplicaStatus::position)),
            )
            .max()
            .unwrap_or_default();
        let timeline = last_known.map(|p| p.timeline).or_else(|| {
            surveyed
                .iter()
                .filter_map(|c| c.status.as_ref().ok())
                .max_by_key(|s| s.position())
                .and_then(|s| s.timeline)
        });
        let verdicts: Vec<Option<Ineligible>> = surveyed
            .iter()
            .map(|c| self.judge(c, reference, timeline))
            .collect();
        let best = surveyed
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_none())
            .filter_map(|(c, _)| {
                let status = c.status.as_ref().ok()?;
                Some((c.member, status.position()?))
            })
            .max_by(|(a, pa), (b, pb)| {
                pa.cmp(pb)
                    .then(a.failover_priority().cmp(&b.failover_priority()))
                    .then(b.name().cmp(a.name()))
            });
        let candidates_report: Vec<(String, Option<Ineligible>)> = surveyed
            .iter()
            .zip(&verdicts)
            .map(|(c, v)| (c.member.name().to_owned(), v.clone()))
            .collect();
        let Some((chosen, chosen_position)) = best else {
            return refuse(Refusal::NoEligibleReplica {
                candidates: candidates_report
                    .into_iter()
                    .filter_map(|(n, v)| Some((n, v?)))
                    .collect(),
            });
        };

        // 4. Promote, still as the leader, and prove the new primary takes writes.
        let Some(leadership) = self.gate.is_leader() else {
            return refuse(Refusal::LeadershipLost);
        };
        let wait = self.config.promote_timeout.as_secs().max(1);
        let promoted: bool = chosen
            .run_within(
                "pg_promote",
                self.config.promote_timeout + Duration::from_secs(2),
                |pool| async move {
                    sqlx::query_scalar("SELECT pg_promote(true, $1)")
                        .bind(i32::try_from(wait).unwrap_or(i32::MAX))
                        .fetch_one(&pool)
                        .await
                },
            )
            .await?;
        if !promoted {
            return Err(Error::Query {
                member: chosen.name().to_owned(),
                what: "pg_promote",
                detail: format!("did not finish within {wait}s"),
            });
        }
        let (in_recovery, xid): (bool, String) = chosen
            .run("proving the new primary takes writes", |pool| async move {
                let row =
                    sqlx::query("SELECT pg_is_in_recovery() AS r, pg_current_xact_id()::text AS x")
                        .fetch_one(&pool)
                        .await?;
                Ok((row.try_get("r")?, row.try_get("x")?))
            })
            .await?;
        if in_recovery {
            return Err(Error::Query {
                member: chosen.name().to_owned(),
                what: "pg_promote",
                detail: "still in recovery after promotion".into(),
            });
        }
        let promote_time = started.elapsed();
        tracing::info!(promoted = chosen.name(), %xid, ?promote_time, "new primary accepts writes");
        if let Some(bus) = &self.bus {
            bus.publish(HaEvent::ReplicaPromoted {
                at: SystemTime::now(),
                node: self.node.clone(),
                replica: chosen.name().to_owned(),
                token: Some(leadership.token),
            });
        }

        // 5. Re-point every other reachable replica.
        let others = surveyed
            .iter()
            .filter(|c| c.member.name() != chosen.name() && c.status.is_ok());
        let repointed = futures_util::future::join_all(others.map(|c| async move {
            (
                c.member.name().to_owned(),
                self.repoint(c.member, chosen).await,
            )
        }))
        .await;

        Ok(PromotionReport {
            promoted: chosen.name().to_owned(),
            token: Some(leadership.token.get()),
            position: chosen_position,
            reference,
            candidates: candidates_report,
            fenced,
            needs_rewind: old_primary.name().to_owned(),
            repointed,
            promote_time,
        })
    }

    fn judge(
        &self,
        c: &Candidate<'_>,
        reference: Lsn,
        timeline: Option<u32>,
    ) -> Option<Ineligible> {
        let status = match &c.status {
            Ok(s) => s,
            Err(e) => {
                return Some(Ineligible::Unreachable {
                    detail: e.to_string(),
                });
            }
        };
        if c.member.failover_priority() == 0 {
            return Some(Ineligible::NoFailover);
        }
        if !status.in_recovery {
            return Some(Ineligible::NotInRecovery);
        }
        if status.replay_paused {
            return Some(Ineligible::ReplayPaused);
        }
        if let Some(expected) = timeline
            && status.timeline != Some(expected)
        {
            return Some(Ineligible::TimelineMismatch {
                expected,
                found: status.timeline,
            });
        }
        let Some(position) = status.position() else {
            return Some(Ineligible::PositionUnknown);
        };
        let behind = reference.bytes_since(position);
        (behind > self.config.max_lag_on_failover).then_some(Ineligible::LagTooHigh {
            bytes: behind,
            max: self.config.max_lag_on_failover,
        })
    }

    /// Points `replica` at `primary`: its slot on the new primary, `primary_conninfo`, reload,
    /// then waits until it streams from there.
    async fn repoint(&self, replica: &PgMember, primary: &PgMember) -> RepointOutcome {
        let conninfo = primary.conninfo(replica.name());
        let step = async {
            let slot: String = replica
                .run("reading primary_slot_name", |pool| async move {
                    sqlx::query_scalar("SELECT current_setting('primary_slot_name')")
                        .fetch_one(&pool)
                        .await
                })
                .await?;
            if !slot.is_empty() {
                let slot_for_query = slot.clone();
                primary
                    .run("creating the replica's slot", |pool| async move {
                        sqlx::query(
                            "SELECT pg_create_physical_replication_slot($1, true) \
                             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots \
                             WHERE slot_name = $1)",
                        )
                        .bind(slot_for_query)
                        .execute(&pool)
                        .await
                    })
                    .await?;
            }
            replica.set_primary_conninfo(&conninfo).await
        };
        if let Err(e) = step.await {
            return RepointOutcome::Failed {
                detail: e.to_string(),
            };
        }
        let deadline = Instant::now() + self.config.repoint_timeout;
        let mut last = None;
        loop {
            if let Ok(status) = replica.replica_status().await {
                last = status.receiver.as_ref().map(|r| r.status.clone());
                if status.receiver.as_ref().is_some_and(|r| {
                    r.status == "streaming" && r.sender_port == Some(primary.port())
                }) {
                    return RepointOutcome::Streaming;
                }
            }
            if Instant::now() >= deadline {
                return RepointOutcome::NotStreaming { receiver: last };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
