//! [`PgAgent`]: the component that runs beside one PostgreSQL instance and keeps its role in
//! line with this node's leadership — promote when leading, demote itself when not.
//!
//! # The loop
//!
//! Every `loop_interval`, in addition at `valid_until - demote_margin` of the last
//! leadership it saw, and at once when this node acquires leadership (so a promotion does not
//! wait for the next tick), the agent asks the [`LeadershipGate`] and its own database
//! (`pg_is_in_recovery()`), then:
//!
//! | leadership | database | action |
//! |---|---|---|
//! | leads | replica | arm the watchdog, then promote it if eligible (see Eligibility below) |
//! | leads | primary | arm the watchdog, then make sure it takes writes (undo the agent's own read-only setting) |
//! | does not lead | primary | **self-demotion** (below) |
//! | does not lead | replica | follow the leader's database (below) |
//!
//! "Leads" means the gate answers *and* its deadline is more than `demote_margin` away: a
//! leadership about to end is treated as already ended, so the demotion lands before the
//! deadline and not after it.
//!
//! # Self-demotion, and the safety property
//!
//! *After the agent's leadership deadline, its database acknowledges no commit* (for clients
//! that do not override `default_transaction_read_only` themselves, see below; with
//! [`DemoteMode::Stop`], for every client). The steps, all bounded by `demote_timeout`
//! (which must be less than `demote_margin`):
//!
//! 1. `ALTER SYSTEM SET default_transaction_read_only = on` and `pg_reload_conf()`;
//! 2. wait until the agent's own session sees the new value: the postmaster has reloaded, so
//!    every session forked after that moment `T` starts read-only;
//! 3. `pg_terminate_backend(pid)` every client backend that started at or before
//!    `T` (walsenders are kept, so replicas keep streaming): this aborts in-flight
//!    transactions and ends sessions that may have been writable;
//! 4. confirm that none of those sessions remains (polled every 5 ms).
//!
//! If any step fails or the budget runs out, the agent **stops PostgreSQL**: it runs
//! `stop_command` (e.g. `pg_ctl stop -D … -m fast`) when one is configured, else it signals
//! the postmaster for a fast shutdown from SQL ([`SqlShutdownFence`]). A database that does
//! not answer while the agent does not lead is stopped the same way (only `stop_command` can
//! stop a server that does not answer).
//!
//! The read-only mode is a setting, not a lock: a client that runs
//! `SET default_transaction_read_only = off` or `BEGIN READ WRITE` after step 2 can still
//! commit. Where such clients exist, use [`DemoteMode::Stop`], which skips the read-only
//! steps and stops PostgreSQL at once (Patroni's behaviour).
//!
//! When the agent leads again over a primary, it undoes the read-only setting, but only the
//! one it set itself (`ALTER SYSTEM`, i.e. `postgresql.auto.conf`): a read-only mode set by
//! the operator in `postgresql.conf` is left alone.
//!
//! # Promotion
//!
//! The gate is asked again right before `pg_promote(wait => true, wait_seconds)`. Whatever
//! `pg_promote` returns — `true`, `false` after its wait, or a client timeout — the agent then
//! re-reads `pg_is_in_recovery()`: a promotion that happened is a promotion, reported with a
//! `ReplicaPromoted` event carrying the leadership's token, and a second loop finds a primary
//! and does not promote again.
//!
//! # Following the leader
//!
//! Given a source of the leader's database ([`PgAgent::follow`]; `ha-orchestrator` reads the
//! leader member's `pg_conninfo` metadata), a replica whose WAL receiver is not `streaming`
//! from that sender host and port gets its `primary_conninfo` rewritten — only `host`,
//! `hostaddr` and `port` change, and `application_name` becomes the member's node id where
//! none is set (always in synchronous mode), so the primary's `pg_stat_replication` names
//! each standby; user, password, passfile, sslmode and the rest stay — by
//! `ALTER SYSTEM` and `pg_reload_conf()` ([`AgentAction::Repointed`]). Success is never
//! assumed: [`AgentStatus::streaming_from`] is what `pg_stat_wal_receiver` says.
//!
//! A database that is a *primary* while another member's database leads is not re-pointed:
//! its timeline has diverged. It stays demoted and is reported
//! ([`AgentStatus::needs_rejoin`], [`AgentAction::NeedsRejoin`], an error log) and, with
//! `rejoin.enabled`, rejoined (below). The led primary keeps a physical slot for each of
//! `replica_slots`.
//!
//! # Rejoin (`rejoin.enabled`)
//!
//! | leadership | database | action |
//! |---|---|---|
//! | does not lead | primary, another member leads | stop it cleanly, `pg_rewind` from the leader's database (re-clone with `pg_basebackup` if that fails and `rejoin.reclone`), standby config, start ([`AgentAction::Rejoined`]) |
//! | does not lead | down (no postmaster), another member leads | the same without the stop for a former primary (no `standby.signal`); a standby is only re-pointed and started |
//! | does not lead | down, no leader known | started as a standby of nobody (it may then campaign and be promoted), except for `step_down_hold` after a step-down |
//! | leads | down | started in place ([`AgentAction::RestartedInPlace`]) until `primary_start_timeout` has passed since first seen down; the member stays eligible meanwhile. Then [`AgentAction::SteppedDown`]: the leadership is given up ([`PgAgent::step_down_by`]) and the member is ineligible for `step_down_hold` |
//!
//! **Never a second primary:** a database the agent starts while it does not lead has
//! `standby.signal` written first, whatever it was; a start without it happens only in the
//! "leads, down" row, under the leadership re-checked (same token, more than `demote_margin`
//! left) right before. A failed step waits `retry_interval`. The commands, who they run as,
//! and what `pg_rewind` needs (`wal_log_hints` or checksums, the target's WAL since the last
//! common checkpoint) are in [`rejoin`](crate::pg::rejoin).
//!
//! # Eligibility
//!
//! [`PgAgent::eligible`] answers from the last loop: a primary with no pending rejoin, a led
//! database that is down within `rejoin.primary_start_timeout` (being restarted in place), or
//! a replica that may be promoted (replay not paused, within `max_lag_on_failover`) and that
//! no more advanced eligible member outranks (the candidate rule, [`candidate`]:
//! members publish role, state, timeline and received/replayed/current WAL positions in their
//! member metadata, [`PgAgent::member_report`], and read each other's, [`PgAgent::peers`]).
//! A member tagged `nofailover` is never eligible; in synchronous mode, neither is a replica
//! the sync record does not name. `ha-orchestrator` makes it part of the elector's
//! eligibility, so an ineligible member neither campaigns nor keeps the lease.
//!
//! The lag bound is judged on the **replayed** position (replay backlog counts) against the
//! freshest primary position known: [`PgAgent::observe_primary_position`], the WAL
//! receiver's `latest_end_lsn`, what other members published (a primary's `pg_wal_lsn`, any
//! member's received position), and at least the replica's own received position — never
//! "no bound".
//!
//! # Pausing
//!
//! The agent is given the elector itself (never a "paused" gate, which would answer "not
//! leader" and make it demote its primary during maintenance) plus a pause flag
//! ([`PgAgent::paused_by`]) that suspends both promotion and demotion, as Patroni's pause;
//! a paused agent also disarms its watchdog.
//!
//! # If the agent dies: the watchdog
//!
//! With `watchdog.enabled`, the agent starts a watchdog process in its own process group
//! and keeps it armed with its leadership deadline (on `CLOCK_BOOTTIME`) whenever the
//! database may be a writable primary; the watchdog stops PostgreSQL (SIGQUIT to the
//! postmaster, or `fence_command`) the moment the agent's pipe closes while armed, or
//! `fence_margin` before the deadline it was last told. The agent arms it before it promotes
//! or makes a primary writable, and refuses both while no watchdog runs (the member is then
//! not eligible). See [`watchdog`] for the protocol and why it is safe.
//!
//! # Synchronous mode
//!
//! With `synchronous_mode` `on` or `strict` (every member must say the same), the leader's
//! agent chooses `synchronous_node_count` streaming replicas not tagged `nosync` and makes
//! its primary wait for all of them (`synchronous_standby_names`), and keeps a record of
//! them in a [`SyncStateStore`] (`ha-orchestrator`: the election's lease store) — shrunk
//! before PostgreSQL stops waiting for a member, grown only once PostgreSQL has waited for it
//! and it flushed everything. Only a member the record names may be promoted (it is otherwise
//! not eligible), and a primary the record does not name stays read-only: no acknowledged
//! commit is lost in a failover. A promoting agent first writes a record of its own term
//! naming only itself. Replicas connect with their member name as `application_name`. See
//! [`sync`](crate::pg::sync) for the protocol.
//!
//! # Switchover
//!
//! [`PgAgent::hand_over_to`] (the node's `POST /switchover[?to=NODE]` and its graceful
//! shutdown) demotes the primary while the lease still runs, then waits until a standby —
//! the named member's, by `application_name` — flushed all of its WAL. The node holds the
//! other members off; a held-off member's report says it is not eligible
//! ([`PgAgent::held_off`]), so the named member does not defer to it even if that one
//! replayed more.
//!
//! # Not done yet
//!
//! A running *standby* whose timeline diverged from the leader's (e.g. a former primary
//! started as a standby of nobody before a leader was known, or an asynchronous replica that
//! received WAL past the promoted member's end of WAL) is detected only by its symptom: with
//! `rejoin.enabled`, a standby pointed at the leader's database that has not streamed from it
//! for `rejoin.standby_stuck_after` is stopped, rewound and started again (a heuristic: a
//! standby that cannot reach the leader is restarted too; `pg_rewind` itself changes nothing
//! where nothing diverged). `pg_rewind --restore-target-wal` (WAL from an archive) is not used.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ha_core::config::{self, ConfigError, Validate};
use ha_core::{
    Component, ComponentContext, ComponentTasks, FencingToken, HaEvent, Leadership, LeadershipGate,
    NodeId, Status, StepDown, metric,
};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pg::candidate::{self, MemberReport};
use crate::pg::member::PgMember;
use crate::pg::promote::{PrimaryFence, SqlShutdownFence};
use crate::pg::rejoin::{RejoinConfig, RejoinVia, Rejoiner};
use crate::pg::sync::{
    self, PendingChange, SyncMode, SyncState, SyncStateStore, SyncStep, Waits, Walsender,
};
use crate::pg::watchdog::{self, Message, WatchdogConfig};
use crate::{Error, Lsn};

/// The name of the agent as a [`Component`].
const COMPONENT: &str = "postgres-agent";

/// How the agent takes writes away from its database when it does not lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DemoteMode {
    /// Read-only default plus terminated sessions; stop PostgreSQL only if that cannot be
    /// confirmed within `demote_timeout` (see the [module docs](self)).
    #[default]
    ReadOnly,
    /// Stop PostgreSQL at once: no client can commit, whatever it sets.
    Stop,
}

/// How a [`PgAgent`] runs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgAgentConfig {
    /// Time between two looks at leadership and the database (default 1 s).
    #[serde(with = "config::duration")]
    pub loop_interval: Duration,
    /// The agent treats leadership as ended this long before its deadline, and demotes then
    /// (default 1 s). Must be less than the elector's renewal slack (its deadline minus its
    /// renew interval), or a healthy leader would demote itself.
    #[serde(with = "config::duration")]
    pub demote_margin: Duration,
    /// Budget of the read-only demotion; past it PostgreSQL is stopped (default 500 ms).
    /// Must be less than `demote_margin`.
    #[serde(with = "config::duration")]
    pub demote_timeout: Duration,
    /// How the database is demoted (default `read_only`).
    pub demote_mode: DemoteMode,
    /// A replica further than this many bytes behind the freshest known primary position is
    /// not promoted (default 1 MiB).
    pub max_lag_on_failover: u64,
    /// `pg_promote`'s wait (default 30 s; whole seconds, at least 1 s).
    #[serde(with = "config::duration")]
    pub promote_timeout: Duration,
    /// Program and arguments (no shell) that stop this PostgreSQL, e.g.
    /// `["pg_ctl", "stop", "-D", "/var/lib/postgresql/15/main", "-m", "fast"]`. Empty: stop
    /// by signalling the postmaster from SQL, which needs a database that answers.
    pub stop_command: Vec<String>,
    /// Physical replication slots the agent keeps on its database while it is the led
    /// primary, one per member that follows it (each replica's `primary_slot_name`). Created
    /// if missing; never dropped by the agent.
    pub replica_slots: Vec<String>,
    /// The watchdog process that fences the database if the agent dies or hangs while it
    /// may be a writable primary (off by default; see [`watchdog`]).
    pub watchdog: WatchdogConfig,
    /// Tag: this member is never promoted and never campaigns (default false).
    pub nofailover: bool,
    /// Tag: this member is never chosen as a synchronous standby (default false).
    pub nosync: bool,
    /// Synchronous replication, managed by the leader's agent (default `off`; see
    /// [`sync`](crate::pg::sync)). Every member of a cluster must say the same.
    pub synchronous_mode: SyncMode,
    /// How many synchronous standbys the leader waits for (default 1).
    pub synchronous_node_count: usize,
    /// Another member's report older than this is ignored by the candidate rule
    /// (default 5 s; see [`candidate`]).
    #[serde(with = "config::duration")]
    pub report_stale_after: Duration,
    /// Rejoin of a former primary, start of a database that is down, restart in place of a
    /// crashed led primary (off by default; see [`rejoin`](crate::pg::rejoin)).
    pub rejoin: RejoinConfig,
}

impl Default for PgAgentConfig {
    fn default() -> Self {
        Self {
            loop_interval: Duration::from_secs(1),
            demote_margin: Duration::from_secs(1),
            demote_timeout: Duration::from_millis(500),
            demote_mode: DemoteMode::ReadOnly,
            max_lag_on_failover: 1024 * 1024,
            promote_timeout: Duration::from_secs(30),
            stop_command: Vec::new(),
            replica_slots: Vec::new(),
            watchdog: WatchdogConfig::default(),
            nofailover: false,
            nosync: false,
            synchronous_mode: SyncMode::Off,
            synchronous_node_count: 1,
            report_stale_after: Duration::from_secs(5),
            rejoin: RejoinConfig::default(),
        }
    }
}

impl Validate for PgAgentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::positive("loop_interval", self.loop_interval)?;
        config::positive("demote_margin", self.demote_margin)?;
        config::positive("demote_timeout", self.demote_timeout)?;
        config::positive("report_stale_after", self.report_stale_after)?;
        config::ensure(
            self.synchronous_node_count >= 1,
            "synchronous_node_count",
            || "must be at least 1".into(),
        )?;
        config::ensure(
            self.demote_timeout < self.demote_margin,
            "demote_timeout",
            || {
                format!(
                    "must be less than `demote_margin` ({:?}), got {:?}",
                    self.demote_margin, self.demote_timeout
                )
            },
        )?;
        config::ensure(
            self.promote_timeout >= Duration::from_secs(1),
            "promote_timeout",
            || "must be at least 1s (pg_promote waits in whole seconds)".into(),
        )?;
        config::ensure(
            self.stop_command.first().is_none_or(|p| !p.is_empty()),
            "stop_command",
            || "the program must not be empty".into(),
        )?;
        self.watchdog.validate().map_err(|e| e.within("watchdog"))?;
        self.rejoin.validate().map_err(|e| e.within("rejoin"))?;
        config::ensure(
            !self.watchdog.enabled || self.watchdog.fence_margin < self.demote_margin,
            "watchdog.fence_margin",
            || {
                format!(
                    "must be less than `demote_margin` ({:?}): the agent's own demotion goes \
                     first, got {:?}",
                    self.demote_margin, self.watchdog.fence_margin
                )
            },
        )
    }
}

/// The database's role as the agent last read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PgRole {
    /// Out of recovery.
    Primary,
    /// In recovery.
    Replica,
    /// It did not answer.
    Unreachable,
}

/// The last thing the agent did to its database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AgentAction {
    /// It promoted its replica, as the leader with this token.
    Promoted {
        /// The leadership's fencing token.
        token: u64,
    },
    /// It did not promote its replica, for this reason.
    NotPromoted {
        /// Why.
        reason: String,
    },
    /// The primary was made read-only and its old sessions ended, this long before the
    /// deadline (`None` when no deadline was known).
    DemotedReadOnly {
        /// From the start of the demotion to its confirmation, in milliseconds.
        took_ms: u64,
        /// Time left before the leadership deadline when confirmed, in milliseconds.
        margin_ms: Option<u64>,
    },
    /// PostgreSQL was stopped.
    Stopped {
        /// Why (the read-only demotion's failure, or the mode).
        reason: String,
    },
    /// The agent's read-only setting was removed: the primary takes writes again.
    MadeWritable,
    /// The replica was pointed at the leader's database (`primary_conninfo` rewritten with
    /// this host and port, every other keyword kept, and reloaded).
    Repointed {
        /// The leader's database host.
        host: String,
        /// Its port.
        port: u16,
    },
    /// The leader's primary was told to wait for these synchronous standbys
    /// (`synchronous_standby_names`, reloaded).
    SyncStandbysConfigured {
        /// The new setting.
        setting: String,
    },
    /// The synchronous-replication record was written (see [`sync`](crate::pg::sync)).
    SyncRecorded {
        /// The record.
        record: String,
    },
    /// The database is a primary while another member leads: its timeline has diverged, so
    /// it cannot simply follow; it needs `pg_rewind` or a re-clone (done by the agent only
    /// with `rejoin.enabled`, [`AgentAction::Rejoined`]).
    NeedsRejoin {
        /// What it would have to follow.
        leader: String,
    },
    /// The database was brought back as a standby and started (`rejoin.enabled`).
    Rejoined {
        /// The leader's database it follows (`None`: no leader was known; it started as a
        /// standby of nobody, which may campaign and be promoted).
        leader: Option<String>,
        /// How.
        via: RejoinVia,
    },
    /// This node leads and its database was down: it was started in place (with no
    /// `standby.signal` added), within `rejoin.primary_start_timeout`.
    RestartedInPlace {
        /// The leadership's fencing token.
        token: u64,
    },
    /// This node gave its leadership up (its database stayed down past
    /// `rejoin.primary_start_timeout`) and stays ineligible for `rejoin.step_down_hold`.
    SteppedDown {
        /// Why.
        reason: String,
    },
}

/// Where a database is reached by its replicas: the leader's side of `primary_conninfo`.
/// Carries no credential (it is published in the election's member metadata); a following
/// replica keeps user, password, `sslmode` and the rest from its own `primary_conninfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upstream {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Upstream {
    /// `host=… port=…`, the form published as member metadata (`pg_conninfo`).
    pub fn conninfo(&self) -> String {
        format!("host={} port={}", quote_value(&self.host), self.port)
    }

    /// The `host` and `port` of a libpq keyword/value conninfo; `None` if either is missing
    /// or the text does not parse.
    pub fn from_conninfo(conninfo: &str) -> Option<Self> {
        let pairs = parse_conninfo(conninfo)?;
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        Some(Self {
            host: get("host")?,
            port: get("port")?.parse().ok()?,
        })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Parses a libpq keyword/value conninfo (`key=value`, values optionally single-quoted with
/// backslash escapes).
fn parse_conninfo(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// A conninfo value, quoted.
pub(crate) fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `current` with its `host`, `hostaddr` and `port` replaced by `upstream`'s (and its
/// `application_name` by `name`, when given), every other keyword (user, password, passfile,
/// sslmode, …) kept.
pub(crate) fn repoint_conninfo(
    current: &str,
    upstream: &Upstream,
    name: Option<&str>,
) -> Option<String> {
    let pairs = parse_conninfo(current)?;
    let mut out: Vec<String> = pairs
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "host" | "hostaddr" | "port"))
        .filter(|(k, _)| name.is_none() || k != "application_name")
        .map(|(k, v)| format!("{k}={}", quote_value(&v)))
        .collect();
    out.push(format!("host={}", quote_value(&upstream.host)));
    out.push(format!("port={}", upstream.port));
    if let Some(name) = name {
        out.push(format!("application_name={}", quote_value(name)));
    }
    Some(out.join(" "))
}

/// The value of `key` in a libpq keyword/value conninfo.
fn conninfo_value(conninfo: &str, key: &str) -> Option<String> {
    parse_conninfo(conninfo)?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Where the leader's database is, asked by a following agent every loop: `None` while no
/// leader is known (the replica is left as it is).
pub type LeaderSource = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Upstream>> + Send>>
        + Send
        + Sync,
>;

/// What the agent reports about itself (in the node's `/status`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentStatus {
    /// The database's name.
    pub member: String,
    /// Its role at the last loop (`None` before the first).
    pub role: Option<PgRole>,
    /// Whether the agent led at the last loop.
    pub leader: bool,
    /// Whether the database is a primary the agent demoted (read-only or stopped).
    pub demoted: bool,
    /// The freshest primary WAL position known (for the lag bound).
    pub reference: Option<Lsn>,
    /// A primary whose `default_transaction_read_only` is on (the agent's or the operator's).
    pub read_only: bool,
    /// A replica's WAL receiver, when `pg_stat_wal_receiver` says `streaming`: the server it
    /// streams from (sender host and port).
    pub streaming_from: Option<Upstream>,
    /// Why this replica may not be promoted now (replay paused, too far behind, …).
    pub ineligible: Option<String>,
    /// Set on a primary that another member's agent leads over: it must be rewound or
    /// re-cloned before it can follow (see [`AgentAction::NeedsRejoin`]).
    pub needs_rejoin: Option<String>,
    /// The last action and when it was taken.
    pub last_action: Option<AgentAction>,
    /// The last rejoin action ([`AgentAction::Rejoined`], [`AgentAction::RestartedInPlace`] or
    /// [`AgentAction::SteppedDown`]), kept while later actions replace `last_action`.
    pub last_rejoin: Option<AgentAction>,
    /// When the last action was taken.
    #[serde(skip)]
    pub last_action_at: Option<SystemTime>,
    /// The last error, cleared by a loop without one.
    pub last_error: Option<String>,
    /// The watchdog (`None` when not enabled): `armed`, `disarmed`, or why it does not run.
    pub watchdog: Option<String>,
    /// The timeline at the last loop.
    pub timeline: Option<u32>,
    /// A replica's received WAL position at the last loop.
    pub received: Option<Lsn>,
    /// A replica's replayed WAL position at the last loop.
    pub replayed: Option<Lsn>,
    /// A primary's current WAL position at the last loop.
    pub wal: Option<Lsn>,
    /// In synchronous mode: the latest sync record seen (token, primary, standbys).
    pub sync_record: Option<String>,
    /// A replica the latest sync record it read names as a synchronous standby.
    pub sync_standby: bool,
}

/// The other members' reports, asked by an agent every loop while its database is a
/// replica (see [`PgAgent::peers`]).
pub type PeerSource = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<MemberReport>> + Send>>
        + Send
        + Sync,
>;

/// Keeps one PostgreSQL instance's role in line with this node's leadership: a
/// [`Component`] named `postgres-agent` (see the [module docs](self)).
pub struct PgAgent {
    inner: Arc<Inner>,
    tasks: ComponentTasks,
}

struct Inner {
    member: PgMember,
    config: PgAgentConfig,
    state: Mutex<State>,
    /// Maintenance: while set, the agent changes nothing (no promotion, no demotion).
    paused: Arc<std::sync::atomic::AtomicBool>,
    /// Where the leader's database is, for a following replica.
    leader: Option<LeaderSource>,
    /// The other members' reports, for the candidate rule.
    peers: Option<PeerSource>,
    /// Where the synchronous-replication record lives (synchronous mode).
    sync_store: Option<Arc<dyn SyncStateStore>>,
    /// Whether the node keeps out of the election now (see [`PgAgent::held_off`]).
    held_off: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// The watchdog process, while one runs.
    watchdog: tokio::sync::Mutex<Option<WatchdogProcess>>,
    /// Whether the watchdog ran and took the last message (eligibility needs it).
    watchdog_up: std::sync::atomic::AtomicBool,
    /// A planned handover ([`PgAgent::hand_over`]): the loop treats this node as not leading
    /// (demotes its primary, promotes nothing) until the gate stops answering.
    handing_over: std::sync::atomic::AtomicBool,
    /// Wakes the loop for a handover.
    wake: tokio::sync::Notify,
    /// The rejoin's commands, with `rejoin.enabled`.
    rejoiner: Option<Rejoiner>,
    /// How this node gives its leadership up when its crashed primary does not come back.
    step_down: Option<Arc<dyn StepDown>>,
}

/// A running watchdog and the write end of its pipe.
struct WatchdogProcess {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    armed: bool,
}

struct State {
    status: AgentStatus,
    /// When the last loop looked at the database.
    looked_at: Option<Instant>,
    /// The replica is eligible on its own merits and only defers to a better member.
    deferring: bool,
    /// The deadline of the last leadership seen, while it may still need a demotion.
    deadline: Option<Instant>,
    /// When this database was demoted by a handover: it stays out of the election for
    /// [`HANDOVER_HOLD`], so that a replica, not the old primary, takes the lease.
    handed_over_at: Option<Instant>,
    /// The replica's `primary_conninfo` carries the member's name (checked once it streams
    /// from the leader, so a streaming replica is not asked again every loop).
    conninfo_named: bool,
    /// Synchronous mode: the record this term wrote last, and when.
    sync_written: Option<(SyncState, Instant)>,
    /// Synchronous mode: a setting change not yet confirmed.
    sync_pending: Option<PendingChange>,
    /// Since when this node leads over a database that is down (`primary_start_timeout`).
    down_since: Option<Instant>,
    /// When this node gave its leadership up because its database stayed down: ineligible
    /// for `rejoin.step_down_hold`.
    stepped_down_at: Option<Instant>,
    /// No rejoin or start before this (after a failed one: `rejoin.retry_interval`).
    retry_at: Option<Instant>,
    /// Since when the replica, pointed at the leader's database, has not streamed from it
    /// (`rejoin.standby_stuck_after`).
    not_streaming_since: Option<Instant>,
}

/// How long a primary demoted by [`PgAgent::hand_over`] stays ineligible: long enough for a
/// replica to campaign and lead (the candidate rule otherwise ranks a primary first); if none
/// did, the old primary may lead again afterwards.
const HANDOVER_HOLD: Duration = Duration::from_secs(30);

/// How often the leader writes its unchanged sync record again (a [`SyncStateStore`] may
/// forget records not written for much longer than this).
const SYNC_REFRESH: Duration = Duration::from_secs(600);

/// How long a handover waits for a standby to flush the demoted primary's last WAL.
const HANDOVER_CATCH_UP: Duration = Duration::from_secs(5);

impl fmt::Debug for PgAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgAgent")
            .field("member", &self.inner.member)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl PgAgent {
    /// An agent for `member`, the database beside this node; fails if `config` is invalid.
    /// The member needs a superuser (`ALTER SYSTEM`, `pg_terminate_backend`, `pg_promote`).
    pub fn new(member: PgMember, config: PgAgentConfig) -> Result<Self, Error> {
        config.validate().map_err(|source| Error::Config {
            what: "postgres agent",
            source,
        })?;
        let rejoiner = Rejoiner::new(&config.rejoin, member.name());
        let status = AgentStatus {
            member: member.name().to_owned(),
            role: None,
            leader: false,
            demoted: false,
            reference: None,
            read_only: false,
            streaming_from: None,
            ineligible: None,
            needs_rejoin: None,
            last_action: None,
            last_rejoin: None,
            last_action_at: None,
            last_error: None,
            watchdog: config.watchdog.enabled.then(|| "not started".to_owned()),
            timeline: None,
            received: None,
            replayed: None,
            wal: None,
            sync_record: None,
            sync_standby: false,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                member,
                config,
                state: Mutex::new(State {
                    status,
                    looked_at: None,
                    deferring: false,
                    deadline: None,
                    handed_over_at: None,
                    conninfo_named: false,
                    sync_written: None,
                    sync_pending: None,
                    down_since: None,
                    stepped_down_at: None,
                    retry_at: None,
                    not_streaming_since: None,
                }),
                paused: Arc::default(),
                leader: None,
                peers: None,
                sync_store: None,
                held_off: None,
                watchdog: tokio::sync::Mutex::new(None),
                watchdog_up: std::sync::atomic::AtomicBool::new(false),
                handing_over: std::sync::atomic::AtomicBool::new(false),
                wake: tokio::sync::Notify::new(),
                rejoiner,
                step_down: None,
            }),
            tasks: ComponentTasks::default(),
        })
    }

    /// Applies a builder setting; only before the agent started (its inner state is then
    /// shared with its tasks): afterwards it is ignored, with an error log.
    fn configure(mut self, what: &str, set: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => set(inner),
            None => tracing::error!("{what} after the agent started: ignored"),
        }
        self
    }

    /// Pauses the agent while `flag` is set (maintenance, as Patroni's pause): it neither
    /// promotes nor demotes its database, whatever the leadership says — so an operator who
    /// pauses a cluster owns split-brain safety until resuming. `ha-orchestrator` passes its
    /// node's pause flag here.
    #[must_use]
    pub fn paused_by(self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.configure("paused_by", |inner| inner.paused = flag)
    }

    /// Makes a replica follow the leader: while the agent does not lead and its database is
    /// a replica, it asks `leader` where the leader's database is and, when the replica does
    /// not stream from there, rewrites `primary_conninfo` (host and port only) and reloads.
    /// `ha-orchestrator` answers from the election's member metadata (`pg_conninfo`).
    #[must_use]
    pub fn follow<F>(self, leader: impl Fn() -> F + Send + Sync + 'static) -> Self
    where
        F: std::future::Future<Output = Option<Upstream>> + Send + 'static,
    {
        let source: LeaderSource = Arc::new(move || Box::pin(leader()));
        self.configure("follow", |inner| inner.leader = Some(source))
    }

    /// Gives the agent the other members' reports (`ha-orchestrator` reads them from the
    /// election's member metadata, [`MemberReport::from_meta`]): a replica then defers while
    /// a more advanced eligible member exists, and judges its lag against the freshest
    /// primary position any of them proves (see [`candidate`]).
    #[must_use]
    pub fn peers<F>(self, peers: impl Fn() -> F + Send + Sync + 'static) -> Self
    where
        F: std::future::Future<Output = Vec<MemberReport>> + Send + 'static,
    {
        let source: PeerSource = Arc::new(move || Box::pin(peers()));
        self.configure("peers", |inner| inner.peers = Some(source))
    }

    /// Tells the agent when its node keeps out of the election (a switchover to another
    /// member held it off): its report then says it is not eligible, so the member the
    /// operator named does not defer to it. `ha-orchestrator` passes its hold-off.
    #[must_use]
    pub fn held_off(self, held: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.configure("held_off", |inner| inner.held_off = Some(Box::new(held)))
    }

    /// Where the synchronous-replication record lives (see [`sync`](crate::pg::sync));
    /// needed when `synchronous_mode` is not `off`. `ha-orchestrator` keeps it in the
    /// election's lease store.
    #[must_use]
    pub fn sync_state(self, store: Arc<dyn SyncStateStore>) -> Self {
        self.configure("sync_state", |inner| inner.sync_store = Some(store))
    }

    /// How this node gives its leadership up when its database, crashed while it led, is
    /// not back within `rejoin.primary_start_timeout` (`ha-orchestrator` passes its
    /// elector). Without it the agent only becomes ineligible, which an elector that asks
    /// [`eligible`](Self::eligible) turns into a step-down at its next renewal.
    #[must_use]
    pub fn step_down_by(self, handle: Arc<dyn StepDown>) -> Self {
        self.configure("step_down_by", |inner| inner.step_down = Some(handle))
    }

    /// This member's report as of the last loop (`None` before the first), for its member
    /// metadata ([`MemberReport::to_meta`]); `member` is the database's name.
    pub fn member_report(&self) -> Option<MemberReport> {
        let eligible = self.eligible();
        let held = self.inner.held_off.as_ref().is_some_and(|held| held());
        let state = self.inner.lock();
        // A held-off member will not campaign: nobody should defer to it.
        let eligible = (eligible || state.deferring) && !held;
        let s = &state.status;
        let role = s.role?;
        let word = match role {
            PgRole::Primary if s.demoted => "demoted",
            PgRole::Primary if s.read_only => "read_only",
            PgRole::Primary => "writable",
            PgRole::Replica if s.streaming_from.is_some() => "streaming",
            PgRole::Replica => "not_streaming",
            PgRole::Unreachable => "unreachable",
        };
        Some(MemberReport {
            member: s.member.clone(),
            role,
            state: word.to_owned(),
            timeline: s.timeline,
            received: s.received,
            replayed: s.replayed,
            wal: s.wal,
            eligible,
            nofailover: self.inner.config.nofailover,
            nosync: self.inner.config.nosync,
            sync_standby: s.sync_standby,
            age: state.looked_at.map_or(Duration::MAX, |t| t.elapsed()),
        })
    }

    /// Where this agent's database is reached (host and port of its member), the value a
    /// node publishes as its `pg_conninfo` member metadata.
    pub fn upstream(&self) -> Upstream {
        Upstream {
            host: self.inner.member.host().to_owned(),
            port: self.inner.member.port(),
        }
    }

    /// Whether this member may campaign for leadership, judged at the last loop: its
    /// database answered and is either a primary that needs no rejoin, or a replica that may
    /// be promoted (replay not paused, within `max_lag_on_failover` of the freshest known
    /// primary position), or, with `rejoin.enabled`, a database that is down while this node
    /// leads, within `rejoin.primary_start_timeout` — and, with the watchdog enabled, whose
    /// watchdog runs. Never during `rejoin.step_down_hold` after giving the leadership up.
    /// False before the first loop. `ha-orchestrator` makes it part of
    /// the elector's eligibility, so an ineligible leader also gives the lease up.
    pub fn eligible(&self) -> bool {
        if self.inner.config.nofailover {
            return false;
        }
        if self.inner.config.watchdog.enabled
            && !self
                .inner
                .watchdog_up
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return false;
        }
        let state = self.inner.lock();
        if state
            .handed_over_at
            .is_some_and(|at| at.elapsed() < HANDOVER_HOLD)
        {
            return false;
        }
        let hold = self.inner.config.rejoin.step_down_hold;
        if state.stepped_down_at.is_some_and(|at| at.elapsed() < hold) {
            return false;
        }
        let s = &state.status;
        match s.role {
            Some(PgRole::Primary) => s.needs_rejoin.is_none(),
            Some(PgRole::Replica) => s.ineligible.is_none(),
            // A led primary that crashed, within its grace period to restart in place.
            Some(PgRole::Unreachable) => {
                self.inner.rejoiner.is_some()
                    && s.leader
                    && state.down_since.is_some_and(|at| {
                        at.elapsed() < self.inner.config.rejoin.primary_start_timeout
                    })
            }
            None => false,
        }
    }

    /// At the last loop: a primary that takes writes (not read-only, not demoted) while the
    /// agent led. Callers that serve `GET /primary` also check the leadership now.
    pub fn is_writable_primary(&self) -> bool {
        let state = self.inner.lock();
        let s = &state.status;
        s.role == Some(PgRole::Primary) && s.leader && !s.demoted && !s.read_only
    }

    /// A planned handover, **before** the node gives its lease up (switchover, graceful
    /// shutdown): the agent demotes its database now — read-only with its sessions ended, or
    /// stopped when that cannot be confirmed in `demote_timeout` — while the lease is still
    /// held, so no other member can be promoted while this database still takes writes. From
    /// then on the loop treats this node as not leading until the gate stops answering (the
    /// step-down happened), or until [`abort_hand_over`](Self::abort_hand_over).
    ///
    /// Returns once the database takes no writes and a standby has flushed all of its WAL (so
    /// the promotion after the step-down loses no acknowledged commit; with several standbys,
    /// the candidate rule then elects the most advanced). For 30 s afterwards the member is
    /// not eligible, so a replica rather than the demoted primary takes the
    /// lease. Fails with [`Error::Timeout`] when the loop could not confirm the demotion
    /// within `demote_timeout` plus one second, or no standby caught up within 5 s. Then, and when
    /// the step-down itself fails, the caller ends the handover with
    /// [`abort_hand_over`](Self::abort_hand_over) to keep leading. A paused agent changes
    /// nothing and fails at once.
    pub async fn hand_over(&self) -> Result<(), Error> {
        self.hand_over_to(None).await
    }

    /// [`hand_over`](Self::hand_over) to a chosen member: the wait is for *its* standby
    /// (`application_name` = `target`, which following agents set) to flush every WAL byte,
    /// so the member the operator named can be promoted without losing a commit. When no
    /// standby of that name streams (an operator's own `application_name`), any standby's
    /// flush is waited for, as without a target.
    pub async fn hand_over_to(&self, target: Option<&str>) -> Result<(), Error> {
        if self.is_paused() {
            return Err(Error::Timeout {
                member: self.inner.member.name().to_owned(),
                what: "handing over: the agent is paused and leaves its database as it is",
                after: Duration::ZERO,
            });
        }
        self.inner
            .handing_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.wake.notify_one();
        tracing::info!(
            member = self.inner.member.name(),
            "handing over: demoting first"
        );
        let limit = self.inner.config.demote_timeout + Duration::from_secs(1);
        let deadline = Instant::now() + limit;
        loop {
            {
                let mut state = self.inner.lock();
                let s = &state.status;
                let quiet = match s.role {
                    Some(PgRole::Primary) => s.demoted && s.read_only && !s.leader,
                    Some(PgRole::Replica) => !s.leader,
                    Some(PgRole::Unreachable) => s.demoted,
                    None => false,
                };
                if quiet {
                    state.handed_over_at = Some(Instant::now());
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    member: self.inner.member.name().to_owned(),
                    what: "handing over: demoting the database before the step-down",
                    after: limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.wait_for_a_standby(target).await
    }

    /// After a handover's demotion: waits (at most 5 s) until a standby has
    /// flushed every WAL byte this demoted primary wrote, so the promotion that follows the
    /// step-down loses no acknowledged commit (`pg_promote` replays all it has flushed). A
    /// database that is not a primary, or does not answer, has nothing to wait for.
    async fn wait_for_a_standby(&self, target: Option<&str>) -> Result<(), Error> {
        if self.inner.lock().status.role != Some(PgRole::Primary) {
            return Ok(());
        }
        let deadline = Instant::now() + HANDOVER_CATCH_UP;
        loop {
            let target = target.map(str::to_owned);
            let caught_up: Result<bool, Error> = self
                .inner
                .member
                .run(
                    "waiting for a standby to flush the last WAL",
                    |pool| async move {
                        sqlx::query_scalar(
                            "SELECT count(*) > 0 FROM pg_stat_replication \
                             WHERE flush_lsn >= pg_current_wal_lsn() \
                             AND ($1::text IS NULL OR application_name = $1 \
                             OR NOT EXISTS (SELECT 1 FROM pg_stat_replication \
                             WHERE application_name = $1))",
                        )
                        .bind(target)
                        .fetch_one(&pool)
                        .await
                    },
                )
                .await;
            match caught_up {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => {}
                Ok(false) => {
                    return Err(Error::Timeout {
                        member: self.inner.member.name().to_owned(),
                        what: "handing over: no standby flushed the demoted primary's last WAL",
                        after: HANDOVER_CATCH_UP,
                    });
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Ends a handover that will not happen (the step-down failed): the loop treats this
    /// node's leadership as its own again and makes its primary writable once more.
    pub fn abort_hand_over(&self) {
        self.inner.lock().handed_over_at = None;
        if self
            .inner
            .handing_over
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::warn!(member = self.inner.member.name(), "handover aborted");
            self.inner.wake.notify_one();
        }
    }

    /// Whether the agent is paused now.
    pub fn is_paused(&self) -> bool {
        self.inner.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The database.
    pub fn member(&self) -> &PgMember {
        &self.inner.member
    }

    /// The agent's own report.
    pub fn agent_status(&self) -> AgentStatus {
        self.inner.lock().status.clone()
    }

    /// Tells the agent a primary WAL position seen elsewhere (e.g. by the replication
    /// monitor): the lag bound is judged against the freshest one known.
    pub fn observe_primary_position(&self, lsn: Lsn) {
        let mut state = self.inner.lock();
        state.status.reference = state.status.reference.max(Some(lsn));
    }

    /// Runs one loop iteration now, as `node`, asking `gate` (what the started component
    /// does every `loop_interval`). Events go to `ctx.bus`.
    pub async fn run_once(&self, ctx: &ComponentContext) {
        self.inner.iteration(ctx).await;
    }
}

#[ha_core::async_trait]
impl Component for PgAgent {
    fn name(&self) -> &str {
        COMPONENT
    }

    /// Loops every `loop_interval`, at each leadership deadline minus `demote_margin`, and at
    /// once when this node acquires leadership (a `LeadershipAcquired` event of `ctx.node`
    /// on `ctx.bus`: the promotion does not wait for the next tick), until `ctx.shutdown` or
    /// [`stop`](Component::stop).
    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        if self.inner.config.synchronous_mode != SyncMode::Off && self.inner.sync_store.is_none() {
            return Err(ha_core::Error::Component {
                component: COMPONENT.into(),
                action: "start",
                source: Box::new(Error::Unsupported(
                    "synchronous_mode needs a sync-state store (PgAgent::sync_state)".into(),
                )),
                retryable: false,
            });
        }
        let stop = self.tasks.begin(COMPONENT, &ctx)?;
        if self.inner.config.watchdog.enabled {
            self.tasks.spawn(watchdog_heartbeat(
                Arc::clone(&self.inner),
                Arc::clone(&ctx.leadership),
                stop.clone(),
            ));
        }
        self.tasks
            .spawn(agent_loop(Arc::clone(&self.inner), ctx, stop));
        Ok(())
    }

    /// Stops the loop, waiting for an iteration in progress (a demotion is never abandoned
    /// half-way). A primary the agent does not lead any more (the node released its lease
    /// first) is demoted by one last iteration unless paused; then the watchdog's pipe is
    /// closed — it exits if disarmed, and fences a database still armed. Idempotent.
    async fn stop(&self) -> Result<(), ha_core::Error> {
        self.tasks.stop().await;
        Ok(())
    }

    /// Unknown before the first loop; Unhealthy when the database does not answer; Degraded
    /// when the last loop had an error or the role does not match the leadership yet;
    /// Healthy otherwise.
    fn status(&self) -> Status {
        let state = self.inner.lock();
        let s = &state.status;
        match s.role {
            None => Status::Unknown,
            Some(PgRole::Unreachable) => Status::Unhealthy,
            Some(_) if s.last_error.is_some() => Status::Degraded,
            Some(PgRole::Primary) if !s.leader && !s.demoted => Status::Degraded,
            Some(PgRole::Replica) if s.leader => Status::Degraded,
            Some(_) => Status::Healthy,
        }
    }
}

async fn agent_loop(inner: Arc<Inner>, ctx: ComponentContext, stop: CancellationToken) {
    let mut next_tick = Instant::now();
    // Subscribed before the first look, so no acquisition after it is missed.
    let mut events = Some(ctx.bus.subscribe());
    loop {
        let demote_at = inner
            .lock()
            .deadline
            .map(|d| d.checked_sub(inner.config.demote_margin).unwrap_or(d));
        let wake = demote_at.map_or(next_tick, |d| d.min(next_tick));
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                inner.final_iteration(&ctx).await;
                return;
            }
            () = tokio::time::sleep_until(wake) => {}
            acquired = acquisition(&mut events, &ctx.node) => {
                tracing::debug!(token = ?acquired, "leadership acquired: looking now");
            }
            () = inner.wake.notified() => {}
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + inner.config.loop_interval;
        }
        if inner.paused.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::debug!("paused: the agent leaves its database as it is");
            continue;
        }
        // An iteration is not abandoned at stop: a demotion half done is worse than a stop
        // that waits for it; every step has its own time limit.
        inner.iteration(&ctx).await;
    }
}

/// Waits for this node's next `LeadershipAcquired` (its token), or for a lag on the bus (the
/// acquisition may be among the missed events: `None`). Pends for ever once the bus closed.
async fn acquisition(
    events: &mut Option<ha_core::bus::EventSubscriber>,
    node: &ha_core::NodeId,
) -> Option<ha_core::FencingToken> {
    loop {
        let Some(subscriber) = events.as_mut() else {
            return std::future::pending().await;
        };
        match subscriber.recv().await {
            Ok(ha_core::HaEvent::LeadershipAcquired {
                node: who, token, ..
            }) if &who == node => {
                return Some(token);
            }
            Ok(_) => {}
            Err(ha_core::bus::RecvError::Lagged { .. }) => return None,
            Err(_) => *events = None,
        }
    }
}

/// Every `heartbeat`: an armed watchdog learns the current leadership deadline (never armed
/// from here: the loop arms before it makes a primary); a paused agent disarms it.
async fn watchdog_heartbeat(
    inner: Arc<Inner>,
    gate: Arc<dyn LeadershipGate>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(inner.config.watchdog.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut slot = inner.watchdog.lock().await;
        if inner.paused.load(std::sync::atomic::Ordering::SeqCst) {
            inner.send_locked(&mut slot, Message::Disarm).await;
            continue;
        }
        if !slot.as_ref().is_some_and(|p| p.armed) {
            continue;
        }
        // Asked under the lock, so no older deadline can overtake a newer message.
        if let Some(lead) = gate.is_leader()
            && let Some(deadline) = boottime_deadline(lead.valid_until)
        {
            inner.send_locked(&mut slot, Message::Arm(deadline)).await;
        }
    }
}

/// `valid_until` on `CLOCK_BOOTTIME`: the boot clock read first, the time left second, so
/// the result can only be early.
fn boottime_deadline(valid_until: Instant) -> Option<Duration> {
    let boot = watchdog::boottime()?;
    Some(boot + valid_until.saturating_duration_since(Instant::now()))
}

/// Leadership that is more than `margin` from its deadline.
fn effective(gate: &dyn LeadershipGate, margin: Duration) -> Option<Leadership> {
    gate.is_leader().filter(|l| {
        l.valid_until
            .checked_sub(margin)
            .is_some_and(|t| Instant::now() < t)
    })
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        ha_core::sync::lock(&self.state)
    }

    fn record(&self, action: AgentAction) {
        let mut state = self.lock();
        if state.status.last_action.as_ref() != Some(&action) {
            tracing::info!(member = self.member.name(), ?action, "postgres agent acted");
        }
        state.status.last_action = Some(action);
        state.status.last_action_at = Some(SystemTime::now());
    }

    async fn iteration(&self, ctx: &ComponentContext) {
        let lead = effective(ctx.leadership.as_ref(), self.config.demote_margin);
        let handing_over = self.handing_over.load(std::sync::atomic::Ordering::SeqCst);
        if handing_over && ctx.leadership.is_leader().is_none() {
            // The step-down happened (or the term ended): the handover is over.
            self.handing_over
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        // Handing over: this node's lease still runs, but its database must stop first.
        let lead = if handing_over { None } else { lead };
        let deadline = {
            let mut state = self.lock();
            if let Some(l) = lead {
                state.deadline = Some(l.valid_until);
            }
            if state.status.leader != lead.is_some() {
                tracing::info!(
                    member = self.member.name(),
                    leader = lead.is_some(),
                    "postgres agent: leadership changed"
                );
            }
            state.status.leader = lead.is_some();
            state.deadline
        };
        if self.config.watchdog.enabled {
            self.ensure_watchdog().await;
        }
        let role = self.read_role(ctx.node.as_str()).await;
        let result = match (lead, &role) {
            // Armed before anything can make the database writable: no watchdog, no primary.
            (Some(l), Ok(Observed::Replica { .. })) => match self.watchdog_arm(&l).await {
                Ok(()) => self.promote(ctx, l).await,
                Err(e) => Err(e),
            },
            (Some(l), Ok(Observed::Primary { .. })) => match self.watchdog_arm(&l).await {
                Ok(()) => {
                    // Synchronous mode: writable only once this term's record names it.
                    let writable = match self.manage_sync(ctx, &l).await {
                        Ok(()) => self.ensure_writable(ctx).await,
                        Err(e) => Err(e),
                    };
                    let slots = self.ensure_slots().await;
                    writable.and(slots)
                }
                Err(e) => Err(e),
            },
            (None, Ok(Observed::Primary { read_only })) => {
                let demoted = self.lock().status.demoted;
                let demotion = if demoted && *read_only {
                    Ok(())
                } else {
                    self.demote(deadline).await
                };
                let rejoin = self.check_rejoin().await;
                demotion.and(rejoin)
            }
            (None, Ok(Observed::Replica { streaming_from })) => {
                self.follow_leader(ctx.node.as_str(), streaming_from.as_ref())
                    .await
            }
            (None, Err(e)) => {
                self.lock().down_since = None;
                let was_primary = self.lock().status.role == Some(PgRole::Primary);
                let demoted = self.lock().status.demoted;
                let stopped = if was_primary && !demoted && !self.config.stop_command.is_empty() {
                    self.stop_postgres(&format!("unreachable while not leading: {e}"))
                        .await
                        .map_err(|stop| format!("{e}; {stop}"))
                } else {
                    Err(e.to_string())
                };
                match self.start_down().await {
                    Some(Ok(())) => Ok(()),
                    Some(Err(rejoin)) => Err(format!("{e}; {rejoin}")),
                    None => stopped,
                }
            }
            (Some(l), Err(e)) => match self.restart_in_place(ctx, l).await {
                Some(Ok(())) => Ok(()),
                Some(Err(restart)) => Err(format!("{e}; {restart}")),
                None => Err(e.to_string()),
            },
        };
        if role.is_ok() {
            self.lock().down_since = None;
        }
        if self.settle(lead.is_some(), &role, result) {
            self.watchdog_send(Message::Disarm).await;
        }
    }

    /// Records what the loop found and did; true when the database takes no writes and the
    /// agent does not lead (nothing for the watchdog to guard).
    fn settle(
        &self,
        leads: bool,
        role: &Result<Observed, Error>,
        result: Result<(), String>,
    ) -> bool {
        let mut state = self.lock();
        let new_role = match role {
            Ok(Observed::Primary { read_only }) => {
                state.status.read_only = *read_only;
                state.status.streaming_from = None;
                state.status.ineligible = None;
                PgRole::Primary
            }
            Ok(Observed::Replica { streaming_from }) => {
                state.status.read_only = true;
                state.status.streaming_from = streaming_from.clone();
                state.status.needs_rejoin = None;
                PgRole::Replica
            }
            Err(_) => {
                state.status.streaming_from = None;
                PgRole::Unreachable
            }
        };
        if state.status.role != Some(new_role) {
            tracing::info!(member = self.member.name(), role = ?new_role, "postgres agent: role");
        }
        // A stopped primary stays "unreachable" but demoted: keep both facts.
        if new_role != PgRole::Unreachable && state.status.role == Some(PgRole::Unreachable) {
            state.status.demoted = false;
        }
        state.status.role = Some(new_role);
        if !leads && (state.status.demoted || new_role == PgRole::Replica) {
            // Demoted (or nothing to demote): no wake-up at an old deadline any more.
            state.deadline = None;
        }
        match result {
            Ok(()) => state.status.last_error = None,
            Err(e) => {
                tracing::warn!(member = self.member.name(), error = %e, "postgres agent loop");
                state.status.last_error = Some(e);
            }
        }
        // Not leading, and the database takes no writes: nothing for the watchdog to guard.
        !leads && (state.status.demoted || new_role == PgRole::Replica)
    }

    /// The last iteration at stop: a primary not led any more is demoted (unless paused),
    /// then the watchdog's pipe is closed.
    async fn final_iteration(&self, ctx: &ComponentContext) {
        let paused = self.paused.load(std::sync::atomic::Ordering::SeqCst);
        let (role, demoted) = {
            let state = self.lock();
            (state.status.role, state.status.demoted)
        };
        if !paused && role == Some(PgRole::Primary) && !demoted {
            self.iteration(ctx).await;
        }
        let process = self.watchdog.lock().await.take();
        if let Some(WatchdogProcess {
            mut child,
            stdin,
            armed,
        }) = process
        {
            drop(stdin);
            if armed {
                tracing::warn!(
                    member = self.member.name(),
                    "agent stopping while its watchdog is armed: the watchdog fences the database"
                );
            }
            let wait = self.config.watchdog.fence_timeout + Duration::from_secs(1);
            let _ = tokio::time::timeout(wait, child.wait()).await;
        }
        self.watchdog_up
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn watchdog_gauge(&self, value: f64) {
        metrics::gauge!(metric::PG_AGENT_WATCHDOG, "member" => self.member.name().to_owned())
            .set(value);
    }

    /// Starts the watchdog if it does not run (or has exited).
    async fn ensure_watchdog(&self) {
        let mut slot = self.watchdog.lock().await;
        if let Some(process) = slot.as_mut() {
            match process.child.try_wait() {
                Ok(None) => return,
                Ok(Some(status)) => {
                    tracing::error!(member = self.member.name(), %status, "watchdog exited");
                }
                Err(e) => tracing::error!(member = self.member.name(), error = %e, "watchdog"),
            }
            *slot = None;
        }
        self.watchdog_up
            .store(false, std::sync::atomic::Ordering::SeqCst);
        match self.spawn_watchdog().await {
            Ok(process) => {
                tracing::info!(
                    member = self.member.name(),
                    pid = process.child.id(),
                    "watchdog started"
                );
                *slot = Some(process);
                self.watchdog_up
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                self.lock().status.watchdog = Some("disarmed".into());
                self.watchdog_gauge(0.0);
            }
            Err(e) => {
                tracing::error!(member = self.member.name(), error = %e, "cannot start the watchdog");
                self.lock().status.watchdog = Some(format!("not running: {e}"));
                self.watchdog_gauge(-1.0);
            }
        }
    }

    async fn spawn_watchdog(&self) -> Result<WatchdogProcess, String> {
        let config = &self.config.watchdog;
        let data_dir = match (&config.data_dir, config.fence_command.is_empty()) {
            (Some(dir), _) => Some(dir.clone()),
            (None, false) => None,
            (None, true) => Some(
                self.member
                    .run("reading data_directory", |pool| async move {
                        sqlx::query_scalar::<_, String>("SHOW data_directory")
                            .fetch_one(&pool)
                            .await
                    })
                    .await
                    .map_err(|e| format!("data directory unknown: {e}"))?
                    .into(),
            ),
        };
        let (program, lead) = match config.program.split_first() {
            Some((program, lead)) => (std::path::PathBuf::from(program), lead.to_vec()),
            None => {
                let beside = std::env::current_exe()
                    .ok()
                    .and_then(|exe| exe.parent().map(|d| d.join(watchdog::WATCHDOG_BINARY)))
                    .filter(|p| p.is_file());
                (
                    beside.unwrap_or_else(|| watchdog::WATCHDOG_BINARY.into()),
                    Vec::new(),
                )
            }
        };
        let mut child = tokio::process::Command::new(&program)
            .args(lead)
            .args(watchdog::command_args(config, data_dir.as_deref()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            // Its own process group: a signal to the node's group must not reach it.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| "the watchdog has no stdin".to_owned())?;
        Ok(WatchdogProcess {
            child,
            stdin,
            armed: false,
        })
    }

    /// Arms the watchdog with this leadership's deadline (a no-op without a watchdog);
    /// an error when enabled but not running.
    async fn watchdog_arm(&self, lead: &Leadership) -> Result<(), String> {
        if !self.config.watchdog.enabled {
            return Ok(());
        }
        let deadline = boottime_deadline(lead.valid_until)
            .ok_or_else(|| "CLOCK_BOOTTIME unreadable: cannot arm the watchdog".to_owned())?;
        if self.watchdog_send(Message::Arm(deadline)).await {
            Ok(())
        } else {
            Err("the watchdog does not run: not acting as primary".into())
        }
    }

    /// Sends one message; false if no watchdog runs or it did not take the message (it is
    /// then dropped, which closes its pipe, and restarted at the next loop).
    async fn watchdog_send(&self, message: Message) -> bool {
        if !self.config.watchdog.enabled {
            return true;
        }
        let mut slot = self.watchdog.lock().await;
        self.send_locked(&mut slot, message).await
    }

    async fn send_locked(&self, slot: &mut Option<WatchdogProcess>, message: Message) -> bool {
        use tokio::io::AsyncWriteExt;
        let Some(process) = slot.as_mut() else {
            return false;
        };
        if message == Message::Disarm && !process.armed {
            return true;
        }
        let line = format!("{}\n", message.line());
        let sent = tokio::time::timeout(
            Duration::from_millis(200),
            process.stdin.write_all(line.as_bytes()),
        )
        .await;
        if let Ok(Ok(())) = sent {
            let armed = matches!(message, Message::Arm(_));
            if armed != process.armed {
                tracing::info!(member = self.member.name(), armed, "watchdog");
                self.lock().status.watchdog =
                    Some(if armed { "armed" } else { "disarmed" }.to_owned());
                self.watchdog_gauge(if armed { 1.0 } else { 0.0 });
            }
            process.armed = armed;
            return true;
        }
        tracing::error!(
            member = self.member.name(),
            ?sent,
            "the watchdog did not take a message"
        );
        *slot = None;
        self.watchdog_up
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.lock().status.watchdog = Some("not running: it did not take a message".into());
        self.watchdog_gauge(-1.0);
        false
    }

    /// Reads the role, the positions and (a replica) the eligibility; `node` is this member's
    /// name among the election's members (the candidate rule's tie-break).
    async fn read_role(&self, node: &str) -> Result<Observed, Error> {
        type Row7 = (
            bool,
            String,
            Option<String>,
            Option<String>,
            Option<i32>,
            Option<String>,
            Option<String>,
        );
        let (in_recovery, read_only, latest_end, sender_host, sender_port, wal, walfile): Row7 =
            self.member
                .run("reading the database's role", |pool| async move {
                    let row = sqlx::query(
                        "SELECT pg_is_in_recovery() AS r, \
                     current_setting('default_transaction_read_only') AS ro, \
                     w.latest_end_lsn::text AS latest_end, \
                     CASE WHEN w.status = 'streaming' THEN w.sender_host END AS sender_host, \
                     CASE WHEN w.status = 'streaming' THEN w.sender_port END AS sender_port, \
                     CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn()::text END \
                     AS wal, \
                     CASE WHEN NOT pg_is_in_recovery() \
                     THEN pg_walfile_name(pg_current_wal_lsn()) END AS walfile \
                     FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS w ON true",
                    )
                    .fetch_one(&pool)
                    .await?;
                    Ok((
                        row.try_get("r")?,
                        row.try_get("ro")?,
                        row.try_get("latest_end")?,
                        row.try_get("sender_host")?,
                        row.try_get("sender_port")?,
                        row.try_get("wal")?,
                        row.try_get("walfile")?,
                    ))
                })
                .await?;
        if in_recovery {
            let streaming_from = match (sender_host, sender_port) {
                (Some(host), Some(port)) => {
                    u16::try_from(port).ok().map(|port| Upstream { host, port })
                }
                _ => None,
            };
            // The primary's end of WAL as its walsender last reported it: a reference that
            // survives the primary's death.
            if let Some(lsn) = latest_end.and_then(|t| t.parse::<Lsn>().ok()) {
                let mut state = self.lock();
                state.status.reference = state.status.reference.max(Some(lsn));
            }
            // Eligibility, judged every loop (the elector asks between loops).
            let peers = match &self.peers {
                Some(source) => source().await,
                None => Vec::new(),
            };
            let stale_after = self.config.report_stale_after;
            let counted: Vec<MemberReport> = peers
                .into_iter()
                .filter(|p| p.member != node && p.counts(stale_after))
                .collect();
            {
                // Every position a counted member proves the primary reached.
                let mut state = self.lock();
                for peer in &counted {
                    state.status.reference = state.status.reference.max(peer.proves_primary_at());
                }
            }
            let (ineligible, deferring) = match self.member.replica_status().await {
                Ok(status) => {
                    let reference = {
                        let mut state = self.lock();
                        state.status.timeline = status.timeline;
                        state.status.received = status.receive_lsn;
                        state.status.replayed = status.replay_lsn;
                        state.status.wal = None;
                        state.status.reference
                    };
                    match ineligible(&status, reference, self.config.max_lag_on_failover) {
                        Some(reason) => (Some(reason), false),
                        None if self.config.nofailover => (Some("tagged nofailover".into()), false),
                        None => {
                            let me = MemberReport {
                                member: node.to_owned(),
                                role: PgRole::Replica,
                                state: String::new(),
                                timeline: status.timeline,
                                received: status.receive_lsn,
                                replayed: status.replay_lsn,
                                wal: None,
                                eligible: true,
                                nofailover: false,
                                nosync: false,
                                sync_standby: false,
                                age: Duration::ZERO,
                            };
                            let defer = candidate::defer_to(&me, &counted, stale_after);
                            let deferring = defer.is_some();
                            (defer, deferring)
                        }
                    }
                }
                Err(e) => (Some(format!("replica status unknown: {e}")), false),
            };
            // Synchronous mode: only a member the sync record names may be promoted.
            let (ineligible, deferring) = if ineligible.is_none() || deferring {
                match self.sync_refusal(node).await {
                    Some(refusal) => (Some(refusal), false),
                    None => (ineligible, deferring),
                }
            } else {
                (ineligible, deferring)
            };
            let mut state = self.lock();
            state.status.ineligible = ineligible;
            state.deferring = deferring;
            state.looked_at = Some(Instant::now());
            Ok(Observed::Replica { streaming_from })
        } else {
            let mut state = self.lock();
            state.status.wal = wal.and_then(|t| t.parse::<Lsn>().ok());
            state.status.timeline = walfile
                .as_deref()
                .and_then(|f| f.get(..8))
                .and_then(|t| u32::from_str_radix(t, 16).ok());
            state.status.received = None;
            state.status.replayed = None;
            state.deferring = false;
            state.looked_at = Some(Instant::now());
            drop(state);
            Ok(Observed::Primary {
                read_only: read_only == "on",
            })
        }
    }

    async fn promote(&self, ctx: &ComponentContext, lead: Leadership) -> Result<(), String> {
        let status = self
            .member
            .replica_status()
            .await
            .map_err(|e| e.to_string())?;
        let reference = self.lock().status.reference;
        if let Some(reason) = ineligible(&status, reference, self.config.max_lag_on_failover) {
            self.record(AgentAction::NotPromoted { reason });
            return Ok(());
        }
        // The candidate rule as judged by this loop's look at the other members.
        let deferral = {
            let state = self.lock();
            state
                .deferring
                .then(|| state.status.ineligible.clone())
                .flatten()
        };
        if let Some(reason) = deferral {
            self.record(AgentAction::NotPromoted { reason });
            return Ok(());
        }
        if self.config.nofailover {
            self.record(AgentAction::NotPromoted {
                reason: "tagged nofailover".into(),
            });
            return Ok(());
        }
        if self.config.synchronous_mode != SyncMode::Off {
            // Asked again now, then this term's record names only this member before it
            // promotes: a deposed leader's late record has a smaller token and is ignored.
            if let Some(reason) = self.sync_refusal(ctx.node.as_str()).await {
                self.record(AgentAction::NotPromoted { reason });
                return Ok(());
            }
            self.write_sync(SyncState {
                token: lead.token.get(),
                primary: ctx.node.to_string(),
                standbys: BTreeSet::new(),
            })
            .await?;
        }
        // The last moment a deposed leader could stop itself.
        let Some(lead) = effective(ctx.leadership.as_ref(), self.config.demote_margin)
            .filter(|l| l.token == lead.token)
        else {
            self.record(AgentAction::NotPromoted {
                reason: "leadership ended before promoting".into(),
            });
            return Ok(());
        };
        let wait = i32::try_from(self.config.promote_timeout.as_secs().max(1)).unwrap_or(i32::MAX);
        tracing::info!(member = self.member.name(), token = %lead.token, "promoting");
        let answer = self
            .member
            .run_within(
                "pg_promote",
                self.config.promote_timeout + Duration::from_secs(2),
                |pool| async move {
                    sqlx::query_scalar::<_, bool>("SELECT pg_promote(true, $1)")
                        .bind(wait)
                        .fetch_one(&pool)
                        .await
                },
            )
            .await;
        // pg_promote's answer is not the truth: a promotion that finished after its wait, or
        // whose reply was lost, still happened. The database says.
        let in_recovery: bool = self
            .member
            .run("re-reading pg_is_in_recovery()", |pool| async move {
                sqlx::query_scalar("SELECT pg_is_in_recovery()")
                    .fetch_one(&pool)
                    .await
            })
            .await
            .map_err(|e| format!("promotion requested ({answer:?}), state unknown: {e}"))?;
        if in_recovery {
            metrics::counter!(metric::PROMOTIONS_TOTAL, "outcome" => "failed").increment(1);
            return Err(format!(
                "pg_promote answered {answer:?}; still in recovery (retried next loop)"
            ));
        }
        metrics::counter!(metric::PROMOTIONS_TOTAL, "outcome" => "promoted").increment(1);
        self.record(AgentAction::Promoted {
            token: lead.token.get(),
        });
        self.lock().status.demoted = false;
        publish_promoted(ctx, self.member.name(), lead.token);
        Ok(())
    }

    async fn ensure_writable(&self, ctx: &ComponentContext) -> Result<(), String> {
        let ours: bool = self
            .member
            .run("reading where read-only is set", |pool| async move {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_file_settings \
                     WHERE name = 'default_transaction_read_only' \
                     AND sourcefile LIKE '%postgresql.auto.conf')",
                )
                .fetch_one(&pool)
                .await
            })
            .await
            .map_err(|e| e.to_string())?;
        if !ours {
            self.lock().status.demoted = false;
            return Ok(());
        }
        // Re-check right before the change lands: writable only under a valid leadership.
        if effective(ctx.leadership.as_ref(), self.config.demote_margin).is_none() {
            return Ok(());
        }
        self.member
            .run("removing read-only", |pool| async move {
                sqlx::query("ALTER SYSTEM RESET default_transaction_read_only")
                    .execute(&pool)
                    .await?;
                sqlx::query("SELECT pg_reload_conf()").execute(&pool).await
            })
            .await
            .map_err(|e| e.to_string())?;
        self.lock().status.demoted = false;
        self.record(AgentAction::MadeWritable);
        Ok(())
    }

    /// The led primary keeps a physical slot for each of `replica_slots`.
    async fn ensure_slots(&self) -> Result<(), String> {
        if self.config.replica_slots.is_empty() {
            return Ok(());
        }
        let slots = self.config.replica_slots.clone();
        self.member
            .run("creating replica slots", |pool| async move {
                sqlx::query(
                    "SELECT pg_create_physical_replication_slot(name, true) \
                     FROM unnest($1::text[]) AS name \
                     WHERE name NOT IN (SELECT slot_name FROM pg_replication_slots)",
                )
                .bind(slots)
                .execute(&pool)
                .await
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Where the leader's database is, if a source is set and knows; never this database.
    async fn leader_upstream(&self) -> Option<Upstream> {
        let source = self.leader.as_ref()?;
        let upstream = source().await?;
        let own = upstream.host == self.member.host() && upstream.port == self.member.port();
        (!own).then_some(upstream)
    }

    /// A replica that does not stream from the leader's database is pointed at it, with its
    /// member name `node` as `application_name` (forced in synchronous mode, where the
    /// leader's `synchronous_standby_names` uses it; otherwise only where none is set).
    async fn follow_leader(
        &self,
        node: &str,
        streaming_from: Option<&Upstream>,
    ) -> Result<(), String> {
        let Some(leader) = self.leader_upstream().await else {
            return Ok(());
        };
        if streaming_from == Some(&leader) {
            let mut state = self.lock();
            state.not_streaming_since = None;
            if state.conninfo_named {
                return Ok(());
            }
        }
        let sync = self.config.synchronous_mode != SyncMode::Off;
        let current: String = self
            .member
            .run("reading primary_conninfo", |pool| async move {
                sqlx::query_scalar("SELECT current_setting('primary_conninfo')")
                    .fetch_one(&pool)
                    .await
            })
            .await
            .map_err(|e| e.to_string())?;
        // The member's name as `application_name` (the name `pg_stat_replication` shows and
        // `synchronous_standby_names` uses): forced in synchronous mode, otherwise only set
        // where the operator set none.
        let app_name = conninfo_value(&current, "application_name");
        let name = if sync {
            (app_name.as_deref() != Some(node)).then_some(node)
        } else {
            app_name.is_none().then_some(node)
        };
        self.lock().conninfo_named = name.is_none();
        if name.is_none() && streaming_from == Some(&leader) {
            return Ok(());
        }
        if name.is_none() && Upstream::from_conninfo(&current).as_ref() == Some(&leader) {
            // Already pointed there; the WAL receiver is (re)connecting. Confirmed only by
            // pg_stat_wal_receiver on a later loop — or it never connects: diverged.
            let since = *self
                .lock()
                .not_streaming_since
                .get_or_insert_with(Instant::now);
            if let Some(rejoiner) = &self.rejoiner
                && since.elapsed() >= rejoiner.config().standby_stuck_after
                && !self.waiting_to_retry()
            {
                return self.rewind_standby(rejoiner, leader).await;
            }
            return Ok(());
        }
        self.lock().not_streaming_since = None;
        let conninfo = repoint_conninfo(&current, &leader, name)
            .ok_or_else(|| "cannot parse the replica's primary_conninfo".to_owned())?;
        tracing::info!(member = self.member.name(), %leader, "re-pointing the replica");
        self.member
            .set_primary_conninfo(&conninfo)
            .await
            .map_err(|e| e.to_string())?;
        self.record(AgentAction::Repointed {
            host: leader.host,
            port: leader.port,
        });
        Ok(())
    }

    /// In synchronous mode, why `node` may not be promoted (or stay primary): the latest
    /// sync record does not name it, there is none, or it cannot be read. `None` otherwise.
    async fn sync_refusal(&self, node: &str) -> Option<String> {
        if self.config.synchronous_mode == SyncMode::Off {
            return None;
        }
        let store = match self.sync_store() {
            Ok(store) => store,
            Err(e) => return Some(e),
        };
        match store.read().await {
            Ok(Some(record)) => {
                let named = record.names(node);
                {
                    let mut state = self.lock();
                    state.status.sync_record = Some(record.to_string());
                    state.status.sync_standby = record.standbys.contains(node);
                }
                (!named).then(|| format!("not a synchronous standby (sync record {record})"))
            }
            Ok(None) => Some("synchronous mode: no sync record in the store".into()),
            Err(e) => Some(format!("synchronous mode: {e}")),
        }
    }

    /// The sync-state store (synchronous mode cannot run without one; `start` refuses it).
    fn sync_store(&self) -> Result<&Arc<dyn SyncStateStore>, String> {
        self.sync_store
            .as_ref()
            .ok_or_else(|| "synchronous mode without a sync-state store".to_owned())
    }

    /// Writes `record` (this term's) and remembers it.
    async fn write_sync(&self, record: SyncState) -> Result<(), String> {
        let store = self.sync_store()?;
        store.write(&record).await.map_err(|e| e.to_string())?;
        tracing::info!(member = self.member.name(), %record, "sync record written");
        metrics::counter!(metric::PG_AGENT_SYNC_RECORDS, "member" => self.member.name().to_owned())
            .increment(1);
        {
            let mut state = self.lock();
            state.status.sync_record = Some(record.to_string());
            state.sync_written = Some((record.clone(), Instant::now()));
        }
        self.record(AgentAction::SyncRecorded {
            record: record.to_string(),
        });
        Ok(())
    }

    /// The leader's synchronous replication, once per loop over its primary (see
    /// [`sync`](crate::pg::sync)): this term's record first (the primary may take writes only
    /// once a record of its term names it), then at most a few steps of [`sync::next_step`].
    async fn manage_sync(&self, ctx: &ComponentContext, lead: &Leadership) -> Result<(), String> {
        let mode = self.config.synchronous_mode;
        if mode == SyncMode::Off {
            return Ok(());
        }
        let node = ctx.node.as_str();
        let store = self.sync_store()?;
        let token = lead.token.get();
        let latest = store.read().await.map_err(|e| e.to_string())?;
        if let Some(r) = &latest {
            self.lock().status.sync_record = Some(r.to_string());
            if r.token > token {
                return Err(format!("a later term wrote the sync record ({r})"));
            }
        }
        let written = self
            .lock()
            .sync_written
            .clone()
            .filter(|(w, _)| w.token == token);
        let mut record = match written {
            // The store lost it (or never took it), or it is due for a refresh (a store may
            // forget an entry not written for a long time): written again.
            Some((w, at)) if latest.as_ref() != Some(&w) || at.elapsed() >= SYNC_REFRESH => {
                self.write_sync(w.clone()).await?;
                w
            }
            Some((w, _)) => w,
            None => {
                let standbys = match &latest {
                    // This member's own earlier term: no other primary since.
                    Some(r) if r.primary == node => r.standbys.clone(),
                    Some(r) if r.standbys.contains(node) => BTreeSet::new(),
                    Some(r) => {
                        return Err(format!(
                            "synchronous mode: the sync record ({r}) does not name this \
                             primary; it may lack acknowledged commits, so it stays read-only"
                        ));
                    }
                    None => BTreeSet::new(),
                };
                let record = SyncState {
                    token,
                    primary: node.to_owned(),
                    standbys,
                };
                self.write_sync(record.clone()).await?;
                record
            }
        };
        let (setting, wal, senders) = self.read_walsenders().await.map_err(|e| e.to_string())?;
        let mut configured = Waits::parse(&setting).unwrap_or(Waits::For(BTreeSet::new()));
        let eligible: BTreeSet<String> = match &self.peers {
            Some(source) => source()
                .await
                .into_iter()
                .filter(|p| {
                    p.member != node
                        && p.role == PgRole::Replica
                        && !p.nosync
                        && p.age <= self.config.report_stale_after
                })
                .map(|p| p.member)
                .collect(),
            None => senders.iter().map(|w| w.name.clone()).collect(),
        };
        let desired = sync::choose(
            mode,
            self.config.synchronous_node_count,
            &configured,
            &senders,
            &eligible,
        );
        let mut pending = self.lock().sync_pending;
        if pending.is_none() && !configured.members().is_subset(&record.standbys) {
            // Waited for but not recorded (an agent restart): confirm from now on.
            pending = Some(PendingChange::now());
        }
        if let Some(p) = pending.as_mut() {
            p.observe(wal);
        }
        let mut result = Ok(());
        for _ in 0..3 {
            let confirmed = pending.map(|p| p.confirmed(&senders)).unwrap_or_default();
            match sync::next_step(&record.standbys, &configured, &desired, &confirmed) {
                SyncStep::Keep => break,
                SyncStep::Record(standbys) => {
                    let next = SyncState {
                        standbys,
                        ..record.clone()
                    };
                    if let Err(e) = self.write_sync(next.clone()).await {
                        result = Err(e);
                        break;
                    }
                    record = next;
                }
                SyncStep::Configure(waits) => {
                    // Only the leader changes what its primary waits for.
                    if effective(ctx.leadership.as_ref(), self.config.demote_margin).is_none() {
                        break;
                    }
                    let value = waits.setting();
                    let alter = format!(
                        "ALTER SYSTEM SET synchronous_standby_names = '{}'",
                        value.replace('\'', "''")
                    );
                    let applied = self
                        .member
                        .run("setting synchronous_standby_names", |pool| async move {
                            sqlx::query(&alter).execute(&pool).await?;
                            sqlx::query("SELECT pg_reload_conf()").execute(&pool).await
                        })
                        .await;
                    if let Err(e) = applied {
                        result = Err(e.to_string());
                        break;
                    }
                    tracing::info!(member = self.member.name(), setting = %value, "synchronous standbys");
                    self.record(AgentAction::SyncStandbysConfigured { setting: value });
                    configured = waits;
                    pending = Some(PendingChange::now());
                }
            }
        }
        if record.standbys == configured.members() && configured == desired {
            pending = None;
        }
        self.lock().sync_pending = pending;
        result
    }

    /// The primary's `synchronous_standby_names`, its current WAL position and its
    /// walsenders.
    async fn read_walsenders(&self) -> Result<(String, Option<Lsn>, Vec<Walsender>), Error> {
        type Row4 = (String, String, String, Option<String>);
        let (setting, wal, rows) = self
            .member
            .run("reading the walsenders", |pool| async move {
                let (setting, wal): (String, String) = sqlx::query_as(
                    "SELECT current_setting('synchronous_standby_names'), \
                     pg_current_wal_lsn()::text",
                )
                .fetch_one(&pool)
                .await?;
                let rows: Vec<Row4> = sqlx::query_as(
                    "SELECT application_name, state, sync_state, flush_lsn::text \
                     FROM pg_stat_replication",
                )
                .fetch_all(&pool)
                .await?;
                Ok((setting, wal, rows))
            })
            .await?;
        let senders = rows
            .into_iter()
            .map(|(name, state, sync_state, flush)| Walsender {
                name,
                streaming: state == "streaming",
                synchronous: matches!(sync_state.as_str(), "sync" | "quorum"),
                flush: flush.and_then(|f| f.parse().ok()),
            })
            .collect();
        Ok((setting, wal.parse().ok(), senders))
    }

    /// A primary that does not lead while the leader's database is elsewhere: its timeline
    /// diverged; reported, never re-pointed as it is. With `rejoin.enabled` it is then
    /// stopped cleanly, rewound (or re-cloned) and started as a standby of the leader's.
    async fn check_rejoin(&self) -> Result<(), String> {
        let Some(leader) = self.leader_upstream().await else {
            return Ok(());
        };
        let first = self.lock().status.needs_rejoin.is_none();
        if first {
            tracing::error!(
                member = self.member.name(),
                %leader,
                rejoin = self.rejoiner.is_some(),
                "a former primary while another member leads: needs pg_rewind or a re-clone \
                 before it can follow; demoted"
            );
        }
        self.lock().status.needs_rejoin = Some(format!(
            "former primary; the leader's database is {leader}: needs pg_rewind or a re-clone"
        ));
        self.record(AgentAction::NeedsRejoin {
            leader: leader.to_string(),
        });
        let Some(rejoiner) = &self.rejoiner else {
            return Ok(());
        };
        if self.waiting_to_retry() {
            return Ok(());
        }
        // Not before the leader's promotion has finished: until then the timelines do not
        // differ yet, and a rewind would leave this database ahead of the leader's.
        match rejoiner.leader_is_primary(&leader).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(member = self.member.name(), %leader, "rejoin: the leader's database is not promoted yet");
                return Ok(());
            }
            Err(e) => return Err(self.rejoin_failed(format!("rejoin: {e}"))),
        }
        tracing::warn!(member = self.member.name(), %leader, "rejoin: stopping the former primary");
        if let Err(e) = rejoiner.stop().await {
            return Err(self.rejoin_failed(format!("rejoin: {e}")));
        }
        self.lock().status.demoted = true;
        self.rejoin_stopped(rejoiner, Some(leader)).await
    }

    /// A database that is down while this node does not lead (`rejoin.enabled`; `None`
    /// otherwise, or when there is nothing to do): a former primary is rewound (or re-cloned)
    /// from the leader's database, a standby only re-pointed, and both started as standbys.
    /// With no leader known it starts as a standby of nobody (`standby.signal` first), except
    /// during `step_down_hold` after this node gave its leadership up, when a successor is
    /// waited for.
    async fn start_down(&self) -> Option<Result<(), String>> {
        let rejoiner = self.rejoiner.as_ref()?;
        if self.waiting_to_retry() {
            return None;
        }
        match rejoiner.is_running().await {
            // Starting, in recovery, or hung: not this path's business (the stop path's).
            Ok(true) => return None,
            Ok(false) => {}
            Err(e) => return Some(Err(self.rejoin_failed(format!("rejoin: {e}")))),
        }
        let leader = self.leader_upstream().await;
        let hold = rejoiner.config().step_down_hold;
        let held = self
            .lock()
            .stepped_down_at
            .is_some_and(|at| at.elapsed() < hold);
        if leader.is_none() && held {
            tracing::debug!(
                member = self.member.name(),
                "down after a step-down: waiting for a successor before starting as a standby"
            );
            return None;
        }
        Some(self.rejoin_stopped(rejoiner, leader).await)
    }

    /// Steps 2–5 of a rejoin on a stopped database (see [`rejoin`](crate::pg::rejoin)):
    /// whatever it was, it starts as a standby.
    async fn rejoin_stopped(
        &self,
        rejoiner: &Rejoiner,
        leader: Option<Upstream>,
    ) -> Result<(), String> {
        let standby = rejoiner.is_standby();
        let cluster_state = rejoiner
            .cluster_state()
            .await
            .unwrap_or_else(|e| format!("unknown: {e}"));
        tracing::info!(
            member = self.member.name(),
            leader = ?leader.as_ref().map(ToString::to_string),
            standby,
            %cluster_state,
            "rejoin: bringing the database back as a standby"
        );
        let prepared = match (&leader, standby) {
            // A former primary (no standby.signal, "in production" or "shut down"): its
            // timeline may have diverged from the leader's — once the leader is promoted.
            (Some(leader), false) => match rejoiner.leader_is_primary(leader).await {
                Ok(true) => rejoiner.rewind_or_reclone(leader).await,
                Ok(false) => {
                    tracing::info!(member = self.member.name(), %leader, "rejoin: the leader's database is not promoted yet");
                    return Ok(());
                }
                Err(e) => Err(e),
            },
            (leader, _) => rejoiner
                .make_standby(leader.as_ref())
                .map(|()| RejoinVia::Start),
        };
        let via = match prepared {
            Ok(via) => via,
            Err(e) => return Err(self.rejoin_failed(format!("rejoin: {e}"))),
        };
        // standby.signal is written: whatever the leadership now, it cannot start writable.
        self.start_rejoined(rejoiner, leader, via).await?;
        self.lock().status.demoted = true;
        Ok(())
    }

    /// The last step of every rejoin: starts the prepared standby (`standby.signal`
    /// written), then counts and records the rejoin.
    async fn start_rejoined(
        &self,
        rejoiner: &Rejoiner,
        leader: Option<Upstream>,
        via: RejoinVia,
    ) -> Result<(), String> {
        if let Err(e) = rejoiner.start().await {
            return Err(self.rejoin_failed(format!("rejoin ({via:?} done): {e}")));
        }
        metrics::counter!(metric::PG_AGENT_REJOINS_TOTAL, "outcome" => via.outcome()).increment(1);
        {
            let mut state = self.lock();
            state.retry_at = None;
            state.not_streaming_since = None;
        }
        self.record_rejoin(AgentAction::Rejoined {
            leader: leader.map(|l| l.to_string()),
            via,
        });
        Ok(())
    }

    /// This node leads and its database is down (`rejoin.enabled`; `None` otherwise, or when
    /// there is nothing to do now): started in place until `primary_start_timeout` has
    /// passed since it was first seen down, then the leadership is given up.
    async fn restart_in_place(
        &self,
        ctx: &ComponentContext,
        lead: Leadership,
    ) -> Option<Result<(), String>> {
        let rejoiner = self.rejoiner.as_ref()?;
        let timeout = rejoiner.config().primary_start_timeout;
        let since = *self.lock().down_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= timeout {
            return Some(self.give_up_leadership(since.elapsed(), timeout).await);
        }
        if self.waiting_to_retry() {
            return None;
        }
        match rejoiner.is_running().await {
            // Crash recovery in progress: it answers when done.
            Ok(true) => return None,
            Ok(false) => {}
            Err(e) => return Some(Err(self.rejoin_failed(format!("restart in place: {e}")))),
        }
        // Started without standby.signal only under this very leadership.
        effective(ctx.leadership.as_ref(), self.config.demote_margin)
            .filter(|l| l.token == lead.token)?;
        tracing::warn!(
            member = self.member.name(),
            token = %lead.token,
            down_for = ?since.elapsed(),
            "leading over a database that is down: restarting it in place"
        );
        match rejoiner.start().await {
            Ok(()) => {
                metrics::counter!(metric::PG_AGENT_RESTARTS_TOTAL, "outcome" => "restarted")
                    .increment(1);
                self.lock().retry_at = None;
                self.record_rejoin(AgentAction::RestartedInPlace {
                    token: lead.token.get(),
                });
                Some(Ok(()))
            }
            Err(e) => {
                metrics::counter!(metric::PG_AGENT_RESTARTS_TOTAL, "outcome" => "failed")
                    .increment(1);
                Some(Err(self.rejoin_failed(format!("restart in place: {e}"))))
            }
        }
    }

    /// `primary_start_timeout` passed: ineligible for `step_down_hold`, and the leadership
    /// given up through the step-down handle when there is one.
    async fn give_up_leadership(
        &self,
        down_for: Duration,
        timeout: Duration,
    ) -> Result<(), String> {
        let reason = format!(
            "the database stayed down for {down_for:?} while leading \
             (primary_start_timeout {timeout:?})"
        );
        {
            let mut state = self.lock();
            state.stepped_down_at = Some(Instant::now());
            state.down_since = None;
        }
        tracing::error!(member = self.member.name(), %reason, "giving the leadership up");
        metrics::counter!(metric::PG_AGENT_RESTARTS_TOTAL, "outcome" => "stepped_down")
            .increment(1);
        self.record_rejoin(AgentAction::SteppedDown {
            reason: reason.clone(),
        });
        match &self.step_down {
            Some(handle) => handle
                .step_down()
                .await
                .map_err(|e| format!("{reason}; stepping down failed: {e}")),
            None => Ok(()),
        }
    }

    /// Whether a failed rejoin or start is still waiting for `rejoin.retry_interval`.
    fn waiting_to_retry(&self) -> bool {
        self.lock().retry_at.is_some_and(|at| Instant::now() < at)
    }

    /// A standby pointed at the leader's database that does not stream from it for
    /// `rejoin.standby_stuck_after`: taken for diverged, stopped, rewound (or re-cloned) from
    /// the leader's database and started again — once that database is a primary.
    async fn rewind_standby(&self, rejoiner: &Rejoiner, leader: Upstream) -> Result<(), String> {
        match rejoiner.leader_is_primary(&leader).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return Err(self.rejoin_failed(format!("rejoin: {e}"))),
        }
        tracing::warn!(
            member = self.member.name(),
            %leader,
            "rejoin: the standby does not stream from the leader's database; rewinding it"
        );
        if let Err(e) = rejoiner.stop().await {
            return Err(self.rejoin_failed(format!("rejoin: {e}")));
        }
        let via = match rejoiner.rewind_or_reclone(&leader).await {
            Ok(via) => via,
            Err(e) => {
                // Stopped, with its standby.signal: started again as it was, retried later.
                let _ = rejoiner.start().await;
                return Err(self.rejoin_failed(format!("rejoin: {e}")));
            }
        };
        self.start_rejoined(rejoiner, Some(leader), via).await
    }

    /// Counts and paces a failed rejoin or start; returns the error.
    fn rejoin_failed(&self, error: String) -> String {
        metrics::counter!(metric::PG_AGENT_REJOINS_TOTAL, "outcome" => "failed").increment(1);
        let retry = self
            .rejoiner
            .as_ref()
            .map_or(Duration::from_secs(10), |r| r.config().retry_interval);
        self.lock().retry_at = Some(Instant::now() + retry);
        tracing::error!(member = self.member.name(), %error, ?retry, "rejoin failed");
        error
    }

    fn record_rejoin(&self, action: AgentAction) {
        self.lock().status.last_rejoin = Some(action.clone());
        self.record(action);
    }

    /// Self-demotion (see the module docs); `deadline` is the end of the last leadership.
    async fn demote(&self, deadline: Option<Instant>) -> Result<(), String> {
        let started = Instant::now();
        tracing::warn!(
            member = self.member.name(),
            before_deadline = ?deadline.map(|d| d.saturating_duration_since(started)),
            "not leading over a primary: demoting"
        );
        let outcome = match self.config.demote_mode {
            DemoteMode::Stop => Err("demote_mode is stop".to_owned()),
            DemoteMode::ReadOnly => {
                match tokio::time::timeout(self.config.demote_timeout, self.read_only()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("read-only demotion failed: {e}")),
                    Err(_) => Err(format!(
                        "read-only demotion not confirmed within {:?}",
                        self.config.demote_timeout
                    )),
                }
            }
        };
        match outcome {
            Ok(()) => {
                let done = Instant::now();
                metrics::counter!(metric::PG_AGENT_DEMOTIONS_TOTAL, "outcome" => "read_only")
                    .increment(1);
                self.lock().status.demoted = true;
                self.record(AgentAction::DemotedReadOnly {
                    took_ms: millis(done - started),
                    margin_ms: deadline.map(|d| millis(d.saturating_duration_since(done))),
                });
                Ok(())
            }
            Err(reason) => self.stop_postgres(&reason).await,
        }
    }

    /// Steps 1–4 of the read-only demotion.
    async fn read_only(&self) -> Result<(), Error> {
        self.member
            .run("setting read-only", |pool| async move {
                sqlx::query("ALTER SYSTEM SET default_transaction_read_only = on")
                    .execute(&pool)
                    .await?;
                sqlx::query("SELECT pg_reload_conf()").execute(&pool).await
            })
            .await?;
        // The moment the reload is visible: sessions forked later start read-only.
        let cut = loop {
            let (ro, at): (String, String) = self
                .member
                .run("waiting for the reload", |pool| async move {
                    let row = sqlx::query(
                        "SELECT current_setting('default_transaction_read_only') AS ro, \
                         clock_timestamp()::text AS at",
                    )
                    .fetch_one(&pool)
                    .await?;
                    Ok((row.try_get("ro")?, row.try_get("at")?))
                })
                .await?;
            if ro == "on" {
                break at;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        loop {
            let cut = cut.clone();
            let left: Result<i64, Error> = self
                .member
                .run("ending writable sessions", |pool| async move {
                    // Both statements on one connection: "this session" must be the same in
                    // both, or the count (on another pooled connection) would keep seeing
                    // the agent's own older session, which the terminating one spares, and
                    // the demotion could never be confirmed.
                    let mut conn = pool.acquire().await?;
                    // No wait argument: pg_terminate_backend(pid, timeout) sleeps in steps of
                    // 100 ms per backend; the count below polls every 5 ms instead.
                    // Materialized first, so no plan can call pg_terminate_backend on a
                    // row the filter would have excluded (walsenders, this session).
                    sqlx::query(
                        "WITH victims AS MATERIALIZED (SELECT pid FROM pg_stat_activity \
                         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
                         AND backend_start <= $1::timestamptz) \
                         SELECT count(*) FILTER (WHERE NOT pg_terminate_backend(pid)) \
                         FROM victims",
                    )
                    .bind(&cut)
                    .execute(&mut *conn)
                    .await?;
                    sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
                         AND backend_start <= $1::timestamptz",
                    )
                    .bind(&cut)
                    .fetch_one(&mut *conn)
                    .await
                })
                .await;
            match left {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // The pool may hand out one of the agent's own older connections that the
                // previous round terminated: try again, within the caller's budget.
                Err(e) => tracing::debug!(error = %e, "ending writable sessions: retrying"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop_postgres(&self, reason: &str) -> Result<(), String> {
        tracing::warn!(member = self.member.name(), %reason, "stopping PostgreSQL");
        let result = match self.config.stop_command.split_first() {
            Some((program, args)) => {
                let output = tokio::process::Command::new(program)
                    .args(args)
                    .kill_on_drop(true)
                    .output()
                    .await
                    .map_err(|e| format!("cannot run {program}: {e}"))?;
                if output.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{program} exited with {}: {}",
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    ))
                }
            }
            None => SqlShutdownFence.fence(&self.member).await,
        };
        let outcome = if result.is_ok() { "stopped" } else { "failed" };
        metrics::counter!(metric::PG_AGENT_DEMOTIONS_TOTAL, "outcome" => outcome).increment(1);
        match result {
            Ok(()) => {
                self.lock().status.demoted = true;
                self.record(AgentAction::Stopped {
                    reason: reason.to_owned(),
                });
                Ok(())
            }
            Err(e) => Err(format!("{reason}; stopping PostgreSQL failed: {e}")),
        }
    }
}

/// What one look at the database found.
#[derive(Debug, Clone)]
enum Observed {
    Primary { read_only: bool },
    Replica { streaming_from: Option<Upstream> },
}

/// Why this replica may not be promoted, if it may not.
fn ineligible(
    status: &crate::pg::ReplicaStatus,
    reference: Option<Lsn>,
    max_lag: u64,
) -> Option<String> {
    if !status.in_recovery {
        return Some("not in recovery".into());
    }
    if status.replay_paused {
        return Some("replay is paused".into());
    }
    // Replay backlog counts: judge the replayed position, else the received one.
    let Some(position) = status.replay_lsn.or(status.receive_lsn) else {
        return Some("no WAL position".into());
    };
    // Never "no bound": the replica's own received position is a reference too.
    let behind = reference
        .max(status.receive_lsn)
        .map_or(0, |r| r.bytes_since(position));
    (behind > max_lag).then(|| format!("{behind} bytes behind the primary, more than {max_lag}"))
}

fn publish_promoted(ctx: &ComponentContext, member: &str, token: FencingToken) {
    ctx.bus.publish(HaEvent::ReplicaPromoted {
        at: SystemTime::now(),
        node: NodeId::clone(&ctx.node),
        replica: member.to_owned(),
        token: Some(token),
    });
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(replay: Option<u64>, paused: bool) -> crate::pg::ReplicaStatus {
        crate::pg::ReplicaStatus {
            in_recovery: true,
            receive_lsn: replay.map(|r| Lsn(r + 100)),
            replay_lsn: replay.map(Lsn),
            last_replay_age: None,
            replay_paused: paused,
            receiver: None,
            timeline: Some(1),
        }
    }

    #[test]
    fn eligibility_counts_replay_backlog_and_pause() {
        // Received 1100, replayed 1000: within a 100-byte bound.
        assert_eq!(
            ineligible(&replica(Some(1000), false), Some(Lsn(1000)), 100),
            None
        );
        // No reference known: the replica's own received position is one (never "no
        // bound"), so its 100 bytes of replay backlog break a 10-byte bound.
        assert!(ineligible(&replica(Some(1000), false), None, 10).is_some());
        assert!(ineligible(&replica(Some(1000), true), None, 10).is_some());
        // Received 1100, replayed 1000: 100 bytes of backlog count against a 10-byte bound.
        assert!(ineligible(&replica(Some(1000), false), Some(Lsn(1100)), 10).is_some());
        assert!(ineligible(&replica(None, false), None, 10).is_some());
    }

    #[test]
    fn repointing_keeps_every_keyword_but_host_and_port() {
        let current = "user=postgres passfile='/root/.pg pass' channel_binding=prefer \
                       host=127.0.0.1 port=5432 sslmode=require password='it\\'s x'";
        let up = Upstream {
            host: "10.0.0.2".into(),
            port: 6543,
        };
        let new = repoint_conninfo(current, &up, None).unwrap();
        assert_eq!(Upstream::from_conninfo(&new), Some(up.clone()));
        let pairs = parse_conninfo(&new).unwrap();
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("passfile"), Some("/root/.pg pass"));
        assert_eq!(get("sslmode"), Some("require"));
        assert_eq!(get("user"), Some("postgres"));
        assert_eq!(get("password"), Some("it's x"));
        assert_eq!(pairs.iter().filter(|(k, _)| k == "host").count(), 1);
        assert_eq!(Upstream::from_conninfo(&up.conninfo()), Some(up.clone()));
        let named = repoint_conninfo(&new, &up, Some("node 2")).unwrap();
        assert_eq!(
            conninfo_value(&named, "application_name").as_deref(),
            Some("node 2")
        );
        assert_eq!(
            conninfo_value(&named, "passfile").as_deref(),
            Some("/root/.pg pass")
        );
        assert_eq!(parse_conninfo("host"), None);
        assert_eq!(parse_conninfo("host='open"), None);
    }

    #[test]
    fn config_rules_name_the_field() {
        PgAgentConfig::default().validate().unwrap();
        let c = PgAgentConfig {
            demote_timeout: Duration::from_secs(2),
            ..PgAgentConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "demote_timeout");
        let c = PgAgentConfig {
            stop_command: vec![String::new()],
            ..PgAgentConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "stop_command");
    }
}
