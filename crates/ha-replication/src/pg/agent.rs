//! [`PgAgent`]: the component that runs beside one PostgreSQL instance and keeps its role in
//! line with this node's leadership — promote when leading, demote itself when not.
//!
//! # The loop
//!
//! Every `loop_interval`, and in addition at `valid_until - demote_margin` of the last
//! leadership it saw, the agent asks the [`LeadershipGate`] and its own database
//! (`pg_is_in_recovery()`), then:
//!
//! | leadership | database | action |
//! |---|---|---|
//! | leads | replica | promote it if eligible (reachable, replay not paused, replay position within `max_lag_on_failover` of the freshest primary position known: [`PgAgent::observe_primary_position`], or the WAL receiver's `latest_end_lsn`, which PostgreSQL fills only from the primary's keepalives) |
//! | leads | primary | make sure it takes writes (undo the agent's own read-only setting) |
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
//! `hostaddr` and `port` change; user, password, passfile, sslmode and the rest stay — by
//! `ALTER SYSTEM` and `pg_reload_conf()` ([`AgentAction::Repointed`]). Success is never
//! assumed: [`AgentStatus::streaming_from`] is what `pg_stat_wal_receiver` says.
//!
//! A database that is a *primary* while another member's database leads is not re-pointed:
//! its timeline has diverged. It stays demoted and is reported
//! ([`AgentStatus::needs_rejoin`], [`AgentAction::NeedsRejoin`], an error log) for
//! `pg_rewind` or a re-clone, which the agent does not do yet. The led primary keeps a
//! physical slot for each of `replica_slots`.
//!
//! # Eligibility
//!
//! [`PgAgent::eligible`] answers from the last loop: a primary with no pending rejoin, or a
//! replica that may be promoted (replay not paused, within `max_lag_on_failover`).
//! `ha-orchestrator` makes it part of the elector's eligibility, so an ineligible member
//! neither campaigns nor keeps the lease.
//!
//! # Open items
//!
//! - Members do not yet publish WAL positions, so an agent does not defer to a more advanced
//!   eligible member; eligibility is judged on the member alone.
//! - Without any known primary position the lag bound is not applied (the issue wants a
//!   missing reference never to mean "no bound": members must publish their positions).
//! - Pausing: the agent is given the elector itself (never a "paused" gate, which would
//!   answer "not leader" and make it demote its primary during maintenance) plus a pause flag
//!   ([`PgAgent::paused_by`]) that suspends both promotion and demotion, as Patroni's pause.
//!
//! # If the agent dies (open item)
//!
//! Nothing here stops a primary whose agent process dies while it leads: the database stays a
//! writable primary past the lease. No mechanism inside PostgreSQL can do it without the
//! agent (`default_transaction_read_only` needs a session to set it; `archive_command` or
//! `statement_timeout` tricks do not stop commits). What is left to build, outside the
//! agent's process: a watchdog — the agent writes its leadership deadline (monotonic clocks
//! do not cross processes: wall-clock, minus a drift margin) to a file beside the data
//! directory on every renew, and a tiny separate supervisor (or systemd unit with
//! `BindsTo=`/a timer) runs `pg_ctl stop -m immediate` when the deadline in the file has
//! passed; or the postmaster run as the agent's child with `PR_SET_PDEATHSIG`.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ha_core::config::{self, ConfigError, Validate};
use ha_core::{
    Component, ComponentContext, ComponentTasks, FencingToken, HaEvent, Leadership, LeadershipGate,
    NodeId, Status, metric,
};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pg::member::PgMember;
use crate::pg::promote::{PrimaryFence, SqlShutdownFence};
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
        }
    }
}

impl Validate for PgAgentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::positive("loop_interval", self.loop_interval)?;
        config::positive("demote_margin", self.demote_margin)?;
        config::positive("demote_timeout", self.demote_timeout)?;
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
    /// The database is a primary while another member leads: its timeline has diverged, so
    /// it cannot simply follow; it needs `pg_rewind` or a re-clone (not done by the agent yet).
    NeedsRejoin {
        /// What it would have to follow.
        leader: String,
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
fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `current` with its `host`, `hostaddr` and `port` replaced by `upstream`'s, every other
/// keyword (user, password, passfile, sslmode, application_name, …) kept.
fn repoint_conninfo(current: &str, upstream: &Upstream) -> Option<String> {
    let pairs = parse_conninfo(current)?;
    let mut out: Vec<String> = pairs
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "host" | "hostaddr" | "port"))
        .map(|(k, v)| format!("{k}={}", quote_value(&v)))
        .collect();
    out.push(format!("host={}", quote_value(&upstream.host)));
    out.push(format!("port={}", upstream.port));
    Some(out.join(" "))
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
    /// When the last action was taken.
    #[serde(skip)]
    pub last_action_at: Option<SystemTime>,
    /// The last error, cleared by a loop without one.
    pub last_error: Option<String>,
}

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
}

struct State {
    status: AgentStatus,
    /// The deadline of the last leadership seen, while it may still need a demotion.
    deadline: Option<Instant>,
}

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
            last_action_at: None,
            last_error: None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                member,
                config,
                state: Mutex::new(State {
                    status,
                    deadline: None,
                }),
                paused: Arc::default(),
                leader: None,
            }),
            tasks: ComponentTasks::default(),
        })
    }

    /// Pauses the agent while `flag` is set (maintenance, as Patroni's pause): it neither
    /// promotes nor demotes its database, whatever the leadership says — so an operator who
    /// pauses a cluster owns split-brain safety until resuming. `ha-orchestrator` passes its
    /// node's pause flag here.
    #[must_use]
    pub fn paused_by(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.paused = flag,
            None => tracing::error!("paused_by after the agent started: ignored"),
        }
        self
    }

    /// Makes a replica follow the leader: while the agent does not lead and its database is
    /// a replica, it asks `leader` where the leader's database is and, when the replica does
    /// not stream from there, rewrites `primary_conninfo` (host and port only) and reloads.
    /// `ha-orchestrator` answers from the election's member metadata (`pg_conninfo`).
    #[must_use]
    pub fn follow<F>(mut self, leader: impl Fn() -> F + Send + Sync + 'static) -> Self
    where
        F: std::future::Future<Output = Option<Upstream>> + Send + 'static,
    {
        let source: LeaderSource = Arc::new(move || Box::pin(leader()));
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.leader = Some(source),
            None => tracing::error!("follow after the agent started: ignored"),
        }
        self
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
    /// primary position). False before the first loop. `ha-orchestrator` makes it part of
    /// the elector's eligibility, so an ineligible leader also gives the lease up.
    pub fn eligible(&self) -> bool {
        let state = self.inner.lock();
        let s = &state.status;
        match s.role {
            Some(PgRole::Primary) => s.needs_rejoin.is_none(),
            Some(PgRole::Replica) => s.ineligible.is_none(),
            Some(PgRole::Unreachable) | None => false,
        }
    }

    /// At the last loop: a primary that takes writes (not read-only, not demoted) while the
    /// agent led. Callers that serve `GET /primary` also check the leadership now.
    pub fn is_writable_primary(&self) -> bool {
        let state = self.inner.lock();
        let s = &state.status;
        s.role == Some(PgRole::Primary) && s.leader && !s.demoted && !s.read_only
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

    /// Loops every `loop_interval` (and at each leadership deadline minus `demote_margin`)
    /// until `ctx.shutdown` or [`stop`](Component::stop).
    async fn start(&self, ctx: ComponentContext) -> Result<(), ha_core::Error> {
        let stop = self.tasks.begin(COMPONENT, &ctx)?;
        self.tasks
            .spawn(agent_loop(Arc::clone(&self.inner), ctx, stop));
        Ok(())
    }

    /// Stops the loop, waiting for an iteration in progress (a demotion is never abandoned
    /// half-way). Idempotent.
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
    loop {
        let demote_at = inner
            .lock()
            .deadline
            .map(|d| d.checked_sub(inner.config.demote_margin).unwrap_or(d));
        let wake = demote_at.map_or(next_tick, |d| d.min(next_tick));
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(wake) => {}
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
        let role = self.read_role().await;
        let result = match (lead, &role) {
            (Some(l), Ok(Observed::Replica { .. })) => self.promote(ctx, l).await,
            (Some(_), Ok(Observed::Primary { .. })) => {
                let writable = self.ensure_writable(ctx).await;
                let slots = self.ensure_slots().await;
                writable.and(slots)
            }
            (None, Ok(Observed::Primary { read_only })) => {
                let demoted = self.lock().status.demoted;
                let demotion = if demoted && *read_only {
                    Ok(())
                } else {
                    self.demote(deadline).await
                };
                self.check_rejoin().await;
                demotion
            }
            (None, Ok(Observed::Replica { streaming_from })) => {
                self.follow_leader(streaming_from.as_ref()).await
            }
            (None, Err(e)) => {
                let was_primary = self.lock().status.role == Some(PgRole::Primary);
                let demoted = self.lock().status.demoted;
                if was_primary && !demoted && !self.config.stop_command.is_empty() {
                    self.stop_postgres(&format!("unreachable while not leading: {e}"))
                        .await
                        .map_err(|stop| format!("{e}; {stop}"))
                } else {
                    Err(e.to_string())
                }
            }
            (Some(_), Err(e)) => Err(e.to_string()),
        };
        let mut state = self.lock();
        let new_role = match &role {
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
        if lead.is_none() && (state.status.demoted || new_role == PgRole::Replica) {
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
    }

    async fn read_role(&self) -> Result<Observed, Error> {
        type Row5 = (bool, String, Option<String>, Option<String>, Option<i32>);
        let (in_recovery, read_only, latest_end, sender_host, sender_port): Row5 = self
            .member
            .run("reading the database's role", |pool| async move {
                let row = sqlx::query(
                    "SELECT pg_is_in_recovery() AS r, \
                     current_setting('default_transaction_read_only') AS ro, \
                     w.latest_end_lsn::text AS latest_end, \
                     CASE WHEN w.status = 'streaming' THEN w.sender_host END AS sender_host, \
                     CASE WHEN w.status = 'streaming' THEN w.sender_port END AS sender_port \
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
            let ineligible = match self.member.replica_status().await {
                Ok(status) => {
                    let reference = self.lock().status.reference;
                    ineligible(&status, reference, self.config.max_lag_on_failover)
                }
                Err(e) => Some(format!("replica status unknown: {e}")),
            };
            self.lock().status.ineligible = ineligible;
            Ok(Observed::Replica { streaming_from })
        } else {
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

    /// A replica that does not stream from the leader's database is pointed at it.
    async fn follow_leader(&self, streaming_from: Option<&Upstream>) -> Result<(), String> {
        let Some(leader) = self.leader_upstream().await else {
            return Ok(());
        };
        if streaming_from == Some(&leader) {
            return Ok(());
        }
        let current: String = self
            .member
            .run("reading primary_conninfo", |pool| async move {
                sqlx::query_scalar("SELECT current_setting('primary_conninfo')")
                    .fetch_one(&pool)
                    .await
            })
            .await
            .map_err(|e| e.to_string())?;
        if Upstream::from_conninfo(&current).as_ref() == Some(&leader) {
            // Already pointed there; the WAL receiver is (re)connecting. Confirmed only by
            // pg_stat_wal_receiver on a later loop.
            return Ok(());
        }
        let conninfo = repoint_conninfo(&current, &leader)
            .ok_or_else(|| "cannot parse the replica's primary_conninfo".to_owned())?;
        let statement = format!(
            "ALTER SYSTEM SET primary_conninfo = '{}'",
            conninfo.replace('\'', "''")
        );
        tracing::info!(member = self.member.name(), %leader, "re-pointing the replica");
        self.member
            .run("re-pointing primary_conninfo", |pool| async move {
                sqlx::query(&statement).execute(&pool).await?;
                sqlx::query("SELECT pg_reload_conf()").execute(&pool).await
            })
            .await
            .map_err(|e| e.to_string())?;
        self.record(AgentAction::Repointed {
            host: leader.host,
            port: leader.port,
        });
        Ok(())
    }

    /// A primary that does not lead while the leader's database is elsewhere: its timeline
    /// diverged; reported, never re-pointed as it is.
    async fn check_rejoin(&self) {
        let Some(leader) = self.leader_upstream().await else {
            return;
        };
        let first = self.lock().status.needs_rejoin.is_none();
        if first {
            tracing::error!(
                member = self.member.name(),
                %leader,
                "a former primary while another member leads: needs pg_rewind or a re-clone \
                 before it can follow; left demoted"
            );
        }
        self.lock().status.needs_rejoin = Some(format!(
            "former primary; the leader's database is {leader}: needs pg_rewind or a re-clone"
        ));
        self.record(AgentAction::NeedsRejoin {
            leader: leader.to_string(),
        });
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
    let behind = reference.map_or(0, |r| r.bytes_since(position));
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
        assert_eq!(
            ineligible(&replica(Some(1000), false), Some(Lsn(1000)), 10),
            None
        );
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
        let new = repoint_conninfo(current, &up).unwrap();
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
        assert_eq!(Upstream::from_conninfo(&up.conninfo()), Some(up));
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
