//! `Elector`: campaigns for a lease, renews it while leading, and stops leading at a local
//! deadline computed from when its last successful request was sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use ha_core::backoff::{Backoff, BackoffConfig};
use ha_core::component::already_started;
use ha_core::sync::lock;
use ha_core::{
    Component, ComponentContext, ComponentTasks, EventBus, FencingToken, HaEvent, Leadership,
    LeadershipGate, LossReason, NodeId, Status, StepDown, Validate, metric,
};
use rand::RngExt;
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ElectorConfig;
use crate::error::{Error, Result};
use crate::store::{Acquire, LeaseInfo, LeaseRecord, LeaseStore, LeaseWatch, Member};

/// Decides whether this node may lead right now (e.g. "am I healthy?"). Called before every
/// campaign attempt and every renewal, so it must be cheap and must not block.
pub type Eligibility = Arc<dyn Fn() -> bool + Send + Sync>;

/// A clock that keeps counting while the machine is suspended or the VM is paused, as a
/// duration since some fixed origin; `None` if it cannot be read. See
/// [`ElectorBuilder::suspend_clock`].
pub type SuspendClock = Arc<dyn Fn() -> Option<Duration> + Send + Sync>;

pub use ha_core::clock::boottime;

/// A running term as [`Elector::is_leader`] checks it: the leadership handed out, and the
/// same deadline on the [`SuspendClock`] (`None`: that clock could not be read at send time).
#[derive(Clone, Copy, Debug)]
struct Term {
    lead: Leadership,
    suspend_deadline: Option<Duration>,
}

impl Term {
    /// Valid on both clocks: tokio's (which stops while the machine sleeps) and the suspend
    /// clock (which does not). A suspend clock readable at send time but not now refuses.
    fn is_valid(&self, now: Instant, clock: &SuspendClock) -> bool {
        self.lead.is_valid_at(now)
            && self
                .suspend_deadline
                .is_none_or(|deadline| clock().is_some_and(|t| t < deadline))
    }
}

/// When a request was sent, on both clocks.
#[derive(Clone, Copy, Debug)]
struct Sent {
    at: Instant,
    suspend: Option<Duration>,
}

impl Sent {
    fn now(clock: &SuspendClock) -> Self {
        Self {
            // The suspend clock is read first: the pair may only understate the send time
            // on it, which can only shorten leadership.
            suspend: clock(),
            at: Instant::now(),
        }
    }
}

/// This node's role, as published on [`Elector::subscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not leading.
    Follower,
    /// Leading, until `valid_until` unless renewed. Check [`Elector::is_leader`] before acting:
    /// it compares the deadline with the clock at call time.
    Leader(Leadership),
}

/// Who leads, as this node last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The leader.
    pub node: NodeId,
    /// Its fencing token.
    pub token: FencingToken,
    /// When this node first saw that (node, token) lead.
    pub since: SystemTime,
}

/// A change of this node's leadership, on [`Elector::events`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ElectorEvent {
    /// This node became leader.
    Acquired {
        /// The term's token.
        token: FencingToken,
        /// The local deadline.
        valid_until: Instant,
    },
    /// The leader renewed; its deadline moved.
    Renewed {
        /// The term's token.
        token: FencingToken,
        /// The new local deadline.
        valid_until: Instant,
    },
    /// This node stopped leading.
    Lost {
        /// The ended term's token.
        token: FencingToken,
        /// Why.
        reason: LossReason,
    },
}

enum Command {
    StepDown(oneshot::Sender<bool>),
}

/// Builds an [`Elector`].
#[must_use]
pub struct ElectorBuilder {
    store: Arc<dyn LeaseStore>,
    config: ElectorConfig,
    eligibility: Option<Eligibility>,
    meta: BTreeMap<String, String>,
    meta_source: Option<MetaSource>,
    suspend_clock: SuspendClock,
}

/// Metadata read again at every membership heartbeat (see
/// [`ElectorBuilder::member_meta_source`]).
pub type MetaSource = Arc<dyn Fn() -> BTreeMap<String, String> + Send + Sync>;

impl std::fmt::Debug for ElectorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElectorBuilder")
            .field("store", &self.store.kind())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ElectorBuilder {
    /// Lease timing and key (default: [`ElectorConfig::default`]).
    pub fn config(mut self, config: ElectorConfig) -> Self {
        self.config = config;
        self
    }

    /// Only campaigns, and only keeps leading, while `eligible()` says so.
    pub fn eligibility(mut self, eligible: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.eligibility = Some(Arc::new(eligible));
        self
    }

    /// What this node says about itself in its membership heartbeats (address, version, …).
    pub fn member_meta(mut self, meta: BTreeMap<String, String>) -> Self {
        self.meta = meta;
        self
    }

    /// Metadata that changes (a database's WAL position, its role): `source()` is called
    /// at every membership heartbeat (every `ttl / 3`) and its entries are published over
    /// those of [`member_meta`](Self::member_meta). It must be cheap and must not block.
    pub fn member_meta_source(
        mut self,
        source: impl Fn() -> BTreeMap<String, String> + Send + Sync + 'static,
    ) -> Self {
        self.meta_source = Some(Arc::new(source));
        self
    }

    /// The clock that counts suspended time, checked alongside tokio's (default:
    /// [`boottime`]). Tokio's clock is `CLOCK_MONOTONIC`, which stops while the machine is
    /// suspended or the VM paused, so a resumed leader would believe its deadline still runs;
    /// the elector also records this clock at each send and refuses leadership once
    /// `renew_deadline` has passed on it. It can only shorten leadership. Tests inject a
    /// clock here to simulate a suspend (tokio's paused clock does not move `CLOCK_BOOTTIME`).
    pub fn suspend_clock(
        mut self,
        clock: impl Fn() -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        self.suspend_clock = Arc::new(clock);
        self
    }

    /// Validates the config and builds the elector, not yet running: starting it as a
    /// [`Component`] (with the node's [`ComponentContext`]) sets it campaigning as
    /// `ctx.node`, publishing `LeadershipAcquired`/`LeadershipLost` on `ctx.bus`.
    pub fn build(self) -> Result<Elector> {
        self.config.validate()?;
        let (commands, receiver) = mpsc::channel(8);
        let (events, _) = broadcast::channel(64);
        Ok(Elector {
            config: self.config,
            store: self.store,
            role: Arc::new(watch::Sender::new(Role::Follower)),
            term: Arc::new(Mutex::new(None)),
            suspend_clock: self.suspend_clock,
            leader: Arc::new(watch::Sender::new(None)),
            events,
            commands,
            pending: Mutex::new(Some(Pending {
                commands: receiver,
                eligibility: self.eligibility,
                meta: self.meta,
                meta_source: self.meta_source,
            })),
            beat_now: Arc::new(Notify::new()),
            shared: OnceLock::new(),
            tasks: ComponentTasks::default(),
        })
    }
}

/// What the campaign needs that only [`Component::start`] can give or take.
struct Pending {
    commands: mpsc::Receiver<Command>,
    eligibility: Option<Eligibility>,
    meta: BTreeMap<String, String>,
    meta_source: Option<MetaSource>,
}

/// The running elector's state, made at start from the built parts and the context.
struct Shared {
    node: NodeId,
    config: ElectorConfig,
    store: Arc<dyn LeaseStore>,
    bus: EventBus,
    eligibility: Option<Eligibility>,
    meta: BTreeMap<String, String>,
    meta_source: Option<MetaSource>,
    /// [`Elector::heartbeat_now`]: beat at once.
    beat_now: Arc<Notify>,
    role: Arc<watch::Sender<Role>>,
    term: Arc<Mutex<Option<Term>>>,
    suspend_clock: SuspendClock,
    leader: Arc<watch::Sender<Option<LeaderInfo>>>,
    events: broadcast::Sender<ElectorEvent>,
}

/// Leader election for one key on one [`LeaseStore`].
///
/// **Followers judge expiry on their own clocks** (Kubernetes client-go's rule). A follower
/// reads the key's record every `retry_interval` (jittered) and takes the lease over only
/// after it has seen the *same* record — holder, token and renewal count — stay unchanged for
/// a full `ttl` on its own monotonic clock; the takeover is then a compare-and-set on exactly
/// that record, so a renewal that lands first defeats it. The store's clock decides nothing:
/// an NTP step on the store's host, or a store that answers with a stale expiry, cannot end a
/// running term early. Further rules:
/// - **A vanished record restarts the wait.** If the store loses a record (a restart without
///   persistence, a flush, an eviction), a follower waits a full `ttl` from when it first saw
///   it missing: the holder may have renewed just before the loss, unseen.
/// - **Watching must be continuous.** A failed look (an error, a timeout) or a change the
///   store pushes restarts the wait: a term may have been granted and lost meanwhile. (Not
///   covered: a store that cannot push changes, or whose push was lost, granting a term and
///   losing it again entirely between two looks of a follower — one retry interval.)
/// - **A cold start waits.** A node that has seen nothing yet watches the key for `ttl` before
///   it takes a vacant key (or an unchanged record): it cannot know whether a term it never
///   saw still runs. This costs one `ttl` when a whole cluster starts at once.
/// - **A release hands over at once.** A leader that gives up stops acting *first*, then
///   replaces its record by a tombstone (compare-and-set on its holder and token) and the
///   store pushes the change; a follower that sees a tombstone takes it over at once,
///   compare-and-set on the tombstone. A store that lost its data has no tombstone, so the
///   fast path never applies to a lost record. (Not covered: a store that rolls back to an
///   older snapshot taken between a release and the next grant would show that stale
///   tombstone again.)
/// - **Its own record is adopted.** A node that finds a live record naming itself (it
///   restarted, or an acquire's answer was lost) renews it by compare-and-set and leads on.
///
/// The leader renews every `renew_interval`. Its leadership is valid until `renew_deadline`
/// after it *sent* its last successful acquire/renew — before any follower can take over (see
/// [`ElectorConfig`]) — and [`is_leader`](Self::is_leader) checks that deadline against the
/// clock on every call, so a leader that was paused or cut off from the store stops acting on
/// time even if its task has not run since.
///
/// **Suspend and VM pause.** Tokio's clock (`CLOCK_MONOTONIC`) stops while the machine is
/// suspended or the VM paused, so a resumed leader would believe its deadline still runs. The
/// elector also records a clock that counts suspended time (`CLOCK_BOOTTIME`, see
/// [`ElectorBuilder::suspend_clock`]) at each send and refuses leadership once
/// `renew_deadline` has passed on *either* clock; the leader's task, at its next wake-up, ends
/// the term (`LossReason::Expired`) instead of renewing on. What remains: work already past
/// its last check when the machine froze resumes without asking again (fence its writes with
/// the token), and a process that hangs without being suspended (a stuck kernel call, a
/// livelock) keeps its stale belief until a check runs — Patroni pairs its lease with a
/// hardware/softdog watchdog that resets the machine then; this crate has none.
///
/// **A [`Leadership`] is a snapshot.** Its `valid_until` does not learn of a step-down or a
/// loss: long leader work re-asks [`is_leader`](Self::is_leader) (or
/// [`LeadershipGate::still_leads`]) before each step.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use ha_core::{Component, ComponentContext};
/// use ha_election::{Elector, ElectorConfig, MemoryLeaseStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryLeaseStore::new());
/// let elector = Elector::builder(store)
///     .config(ElectorConfig::with_ttl("orders/leader", Duration::from_millis(500), Duration::from_millis(50)))
///     .build()?;
/// let mut role = elector.subscribe();
/// // A fresh node watches the key for a ttl before it takes it.
/// elector.start(ComponentContext::standalone("node-a")).await?;
/// role.wait_for(|r| matches!(r, ha_election::Role::Leader(_))).await.unwrap();
/// let lead = elector.is_leader().expect("leads");
/// println!("leading with token {}", lead.token);
/// elector.shutdown().await; // releases the lease: a follower takes over in milliseconds
/// # Ok(())
/// # }
/// ```
pub struct Elector {
    config: ElectorConfig,
    store: Arc<dyn LeaseStore>,
    role: Arc<watch::Sender<Role>>,
    /// What `is_leader` checks; set before `role` on a gain, cleared before it on a loss.
    term: Arc<Mutex<Option<Term>>>,
    suspend_clock: SuspendClock,
    leader: Arc<watch::Sender<Option<LeaderInfo>>>,
    events: broadcast::Sender<ElectorEvent>,
    commands: mpsc::Sender<Command>,
    pending: Mutex<Option<Pending>>,
    /// Wakes the heartbeat task ([`heartbeat_now`](Self::heartbeat_now)).
    beat_now: Arc<Notify>,
    shared: OnceLock<Arc<Shared>>,
    tasks: ComponentTasks,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("node", &self.node())
            .field("key", &self.config.key)
            .field("store", &self.store.kind())
            .field("role", &*self.role.borrow())
            .finish_non_exhaustive()
    }
}

impl Elector {
    /// Starts building an elector on `store`; the node it campaigns as comes from the
    /// [`ComponentContext`] it is started with.
    pub fn builder(store: Arc<dyn LeaseStore>) -> ElectorBuilder {
        ElectorBuilder {
            store,
            config: ElectorConfig::default(),
            eligibility: None,
            meta: BTreeMap::new(),
            meta_source: None,
            suspend_clock: Arc::new(boottime),
        }
    }

    /// The live members of this election (every elector of the key, leader or not), as the
    /// store knows them: each elector heartbeats every `ttl / 3` with a `ttl` lifetime, so a
    /// dead node drops out within one `ttl`.
    pub async fn members(&self) -> Result<Vec<Member>> {
        self.store
            .members(
                &members_group(&self.config.key),
                self.config.request_timeout,
            )
            .await
    }

    /// Sends this member's membership heartbeat now, with fresh metadata from the
    /// [`member_meta_source`](ElectorBuilder::member_meta_source), instead of at the next
    /// `ttl / 3` beat; the regular beats go on from it. For a change the other members and
    /// operators should see at once (a database promoted or demoted). Called before the
    /// elector started, it is kept for the first beat.
    pub fn heartbeat_now(&self) {
        self.beat_now.notify_one();
    }

    /// Writes `node`'s entry in `group`, a group of small records kept beside this
    /// election's lease (under `<key>/<group>`), living `ttl` by the store's clock: state a
    /// component must keep exactly as durable as the lease, such as the PostgreSQL agent's
    /// synchronous-replication record. Each node has one entry per group; a write replaces it.
    pub async fn put_entry(
        &self,
        group: &str,
        node: &NodeId,
        meta: &BTreeMap<String, String>,
        ttl: Duration,
    ) -> Result<()> {
        self.store
            .heartbeat(
                &entries_group(&self.config.key, group),
                node,
                meta,
                ttl,
                self.config.request_timeout,
            )
            .await
    }

    /// The live entries of `group` (see [`put_entry`](Self::put_entry)), sorted by node.
    pub async fn entries(&self, group: &str) -> Result<Vec<Member>> {
        self.store
            .members(
                &entries_group(&self.config.key, group),
                self.config.request_timeout,
            )
            .await
    }

    /// This node's leadership, if it leads *now*: the deadline is checked at call time, on
    /// tokio's clock and on the [suspend clock](ElectorBuilder::suspend_clock), so a leader
    /// resumed after a suspend or VM pause longer than its remaining term answers `None` at
    /// once.
    ///
    /// The answer is a snapshot: its `valid_until` is an upper bound, not a promise. A
    /// step-down, a lost renewal or a suspend ends the term earlier, and the value handed out
    /// does not change. Long leader work re-asks before each step — this call, or
    /// [`LeadershipGate::still_leads`] with the value it holds (the same term: same token) —
    /// and passes the token to every fenced write.
    pub fn is_leader(&self) -> Option<Leadership> {
        let term = (*lock(&self.term))?;
        term.is_valid(Instant::now(), &self.suspend_clock)
            .then_some(term.lead)
    }

    /// A receiver of role changes (it also sees each renewal's new deadline).
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// A receiver of [`ElectorEvent`]s, renewals included.
    pub fn events(&self) -> broadcast::Receiver<ElectorEvent> {
        self.events.subscribe()
    }

    /// Who leads, as this node last saw it (itself included). `None` until it has seen one.
    pub fn leader(&self) -> Option<LeaderInfo> {
        self.leader.borrow().clone()
    }

    /// A receiver of changes of [`leader`](Self::leader).
    pub fn watch_leader(&self) -> watch::Receiver<Option<LeaderInfo>> {
        self.leader.subscribe()
    }

    /// The node this elector campaigns as, once started.
    pub fn node(&self) -> Option<&NodeId> {
        self.shared.get().map(|shared| &shared.node)
    }

    /// The config in use.
    pub fn config(&self) -> &ElectorConfig {
        &self.config
    }

    /// The kind of lease store (`"redis"`, `"postgres"`, `"memory"`, …).
    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }

    /// Gives up leadership now: stops acting as leader, releases the lease (compare-and-delete,
    /// so followers watching the store learn at once), and stays out of the next campaign for
    /// two retry intervals so another node wins. Returns whether this node was leading.
    pub async fn step_down(&self) -> bool {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::StepDown(reply)).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// Stops campaigning and heartbeating; a leader first stops acting, then releases its
    /// lease. Returns once the elector's tasks have ended. The same as [`Component::stop`].
    pub async fn shutdown(&self) {
        self.tasks.stop().await;
    }
}

#[async_trait::async_trait]
impl Component for Elector {
    fn name(&self) -> &str {
        "election"
    }

    /// Spawns the campaign and the membership heartbeats as `ctx.node`, publishing on
    /// `ctx.bus`, until `ctx.shutdown` is cancelled or [`stop`](Component::stop) is called.
    /// `ctx.leadership` is not consulted: the elector is the node's gate. An elector runs
    /// once: a second start is refused.
    async fn start(&self, ctx: ComponentContext) -> std::result::Result<(), ha_core::Error> {
        let pending = lock(&self.pending).take();
        let Some(pending) = pending else {
            return Err(already_started("election"));
        };
        let shutdown = self.tasks.begin("election", &ctx)?;
        let shared = Arc::new(Shared {
            node: ctx.node,
            config: self.config.clone(),
            store: Arc::clone(&self.store),
            bus: ctx.bus,
            eligibility: pending.eligibility,
            meta: pending.meta,
            meta_source: pending.meta_source,
            beat_now: Arc::clone(&self.beat_now),
            role: Arc::clone(&self.role),
            term: Arc::clone(&self.term),
            suspend_clock: Arc::clone(&self.suspend_clock),
            leader: Arc::clone(&self.leader),
            events: self.events.clone(),
        });
        let _ = self.shared.set(Arc::clone(&shared));
        let span = tracing::info_span!(
            "elector",
            node = %shared.node,
            key = %shared.config.key,
            store = shared.store.kind()
        );
        let runner = Runner {
            shared: Arc::clone(&shared),
            commands: pending.commands,
            shutdown: shutdown.clone(),
            holdoff_until: None,
        };
        self.tasks.spawn(runner.run().instrument(span.clone()));
        self.tasks
            .spawn(heartbeats(shared, shutdown).instrument(span));
        Ok(())
    }

    async fn stop(&self) -> std::result::Result<(), ha_core::Error> {
        self.tasks.stop().await;
        Ok(())
    }

    /// Healthy while running (leader or follower), Unknown before start and after stop.
    fn status(&self) -> Status {
        if self.tasks.is_running() {
            Status::Healthy
        } else {
            Status::Unknown
        }
    }
}

impl LeadershipGate for Elector {
    fn is_leader(&self) -> Option<Leadership> {
        Elector::is_leader(self)
    }
}

/// A forced re-election through [`Elector::step_down`], for callers that know only
/// `ha_core`'s trait (e.g. `ha-failover`'s step-down action).
#[async_trait::async_trait]
impl StepDown for Elector {
    /// Steps down; [`ha_core::Error::NotLeader`] if this node did not lead (or the elector was
    /// shut down).
    async fn step_down(&self) -> std::result::Result<(), ha_core::Error> {
        if Elector::step_down(self).await {
            Ok(())
        } else {
            Err(ha_core::Error::NotLeader {
                node: self
                    .node()
                    .cloned()
                    .unwrap_or_else(|| NodeId::new("unstarted")),
                operation: "step down".into(),
            })
        }
    }
}

impl Drop for Elector {
    fn drop(&mut self) {
        // The task notices the cancellation (and the closed command channel), stops acting
        // and releases.
        self.tasks.cancel();
    }
}

/// The campaign task's state.
struct Runner {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    holdoff_until: Option<Instant>,
}

/// What a follower's wait ended with.
enum Wake {
    Campaign,
    /// The store pushed a change of our key (or may have: a lagged or reconnected feed).
    Changed,
    Stop,
}

/// A follower's observation of the key, on its own monotonic clock (client-go's rule).
///
/// `record` is the record last seen (`None`: the key had no record) and `since` when this
/// follower first received an answer showing it; any different answer restarts the clock.
/// A record that *vanished* restarts it too: a store that lost its data may have lost a
/// renewal this follower never saw, whose holder may still lead for up to a TTL after it.
/// The observation must also be continuous: a failed look, or a change the store pushes,
/// forgets it (the follower cannot know what happened meanwhile — a term may have been
/// granted and then lost by the store).
#[derive(Debug)]
struct Seen {
    record: Option<LeaseRecord>,
    since: Instant,
}

/// What a follower does next.
enum Step {
    /// Take over, conditional on the store still holding exactly this record (`None`: none).
    Take(Option<LeaseRecord>),
    /// The store says this node holds the term: renew it and lead (a restart, or an acquire
    /// or renewal whose answer was lost).
    Adopt(FencingToken),
    /// Read the record and keep watching.
    Look,
}

/// Records an answer received at `now`: a different record (or a vanished one) restarts the
/// clock; the same one keeps it running.
fn saw(seen: &mut Option<Seen>, record: Option<LeaseRecord>, now: Instant) {
    if seen.as_ref().is_none_or(|s| s.record != record) {
        *seen = Some(Seen { record, since: now });
    }
}

impl Runner {
    async fn run(mut self) {
        let key = self.shared.config.key.clone();
        let mut watch = match self.shared.store.watch(&key).await {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!(error = %e, "lease store cannot push changes; followers poll");
                None
            }
        };
        let config = &self.shared.config;
        let mut backoff = Backoff::new(BackoffConfig {
            initial: (config.retry_interval / 4).max(Duration::from_millis(1)),
            max: config.retry_interval,
            ..BackoffConfig::default()
        });
        loop {
            // Every campaign starts from nothing seen: a fresh node (or one whose term just
            // ended) first watches the key for a TTL before it takes anything but a tombstone
            // or its own record.
            let mut seen = None;
            let Some((token, sent)) = self.campaign(&mut watch, &mut backoff, &mut seen).await
            else {
                return;
            };
            if !self.lead(token, sent).await {
                return;
            }
        }
    }

    fn eligible(&self) -> bool {
        self.shared
            .eligibility
            .as_ref()
            .is_none_or(|eligible| eligible())
    }

    /// What the observation allows at `now`.
    fn step(&self, seen: Option<&Seen>, now: Instant) -> Step {
        let Some(seen) = seen else {
            return Step::Look;
        };
        match &seen.record {
            Some(r) if r.released => Step::Take(Some(r.clone())),
            Some(r) if r.holder == self.shared.node => Step::Adopt(r.token),
            _ if now >= seen.since + self.shared.config.ttl => Step::Take(seen.record.clone()),
            _ => Step::Look,
        }
    }

    /// How long to wait before the next look: zero if the observation already allows a
    /// takeover, else a jittered retry interval, cut short when the observed record will
    /// have stayed unchanged for a TTL.
    fn poll_delay(&self, seen: Option<&Seen>) -> Duration {
        let config = &self.shared.config;
        let now = Instant::now();
        if self.eligible() && !matches!(self.step(seen, now), Step::Look) {
            return Duration::ZERO;
        }
        let jittered = rand::rng().random_range(config.retry_interval / 2..=config.retry_interval);
        match seen {
            // Only a node that may take over wakes for the moment it may; an ineligible one
            // just keeps watching at the retry pace.
            Some(seen) if self.eligible() => {
                jittered.min((seen.since + config.ttl).saturating_duration_since(now))
            }
            _ => jittered,
        }
    }

    /// Watches the key and takes it over when the rules allow (see [`Seen`]), until it wins
    /// (returns the token and when the winning request was sent) or is told to stop.
    async fn campaign(
        &mut self,
        watch: &mut Option<LeaseWatch>,
        backoff: &mut Backoff,
        seen: &mut Option<Seen>,
    ) -> Option<(FencingToken, Sent)> {
        let config = self.shared.config.clone();
        let store = Arc::clone(&self.shared.store);
        let node = self.shared.node.clone();
        loop {
            let now = Instant::now();
            let delay = if let Some(until) = self.holdoff_until.filter(|until| now < *until) {
                until - now
            } else {
                let step = if self.eligible() {
                    self.step(seen.as_ref(), now)
                } else {
                    Step::Look
                };
                let sent = Sent::now(&self.shared.suspend_clock);
                match step {
                    Step::Take(expected) => {
                        let outcome = store
                            .acquire(
                                &config.key,
                                &node,
                                config.ttl,
                                expected.as_ref(),
                                config.request_timeout,
                            )
                            .await;
                        match outcome {
                            Ok(Acquire::Acquired(token)) => return self.won(token, sent).await,
                            Ok(Acquire::Held(info)) => {
                                backoff.reset();
                                self.saw_record(seen, Some(&info));
                                self.poll_delay(seen.as_ref())
                            }
                            Ok(Acquire::Vacant) => {
                                backoff.reset();
                                self.saw_record(seen, None);
                                self.poll_delay(seen.as_ref())
                            }
                            Err(e) => {
                                self.store_error("acquire", &e);
                                // What happened meanwhile is unknown: watch afresh.
                                *seen = None;
                                backoff.next().unwrap_or(config.retry_interval)
                            }
                        }
                    }
                    Step::Adopt(token) => {
                        let renewed = store
                            .renew(
                                &config.key,
                                &node,
                                token,
                                config.ttl,
                                config.request_timeout,
                            )
                            .await;
                        match renewed {
                            Ok(true) => {
                                tracing::info!(%token, "adopting this node's own lease found in the store");
                                return self.won(token, sent).await;
                            }
                            Ok(false) => {
                                // It changed under us: look again, after a pause.
                                *seen = None;
                                config.retry_interval / 2
                            }
                            Err(e) => {
                                self.store_error("renew", &e);
                                *seen = None;
                                backoff.next().unwrap_or(config.retry_interval)
                            }
                        }
                    }
                    Step::Look => match store.read(&config.key, config.request_timeout).await {
                        Ok(info) => {
                            backoff.reset();
                            self.saw_record(seen, info.as_ref());
                            self.poll_delay(seen.as_ref())
                        }
                        Err(e) => {
                            self.store_error("read", &e);
                            // What happened meanwhile is unknown: watch afresh.
                            *seen = None;
                            backoff.next().unwrap_or(config.retry_interval)
                        }
                    },
                }
            };
            match self.wait_as_follower(delay, watch).await {
                Wake::Campaign => {}
                // Something happened to the key: whatever was watched, watch afresh. This is
                // what catches a term granted and then lost by the store between two looks.
                Wake::Changed => *seen = None,
                Wake::Stop => return None,
            }
        }
    }

    /// A grant (or an adopted term) arrived: lead, unless the elector is stopping.
    async fn won(&self, token: FencingToken, sent: Sent) -> Option<(FencingToken, Sent)> {
        if self.shutdown.is_cancelled() {
            self.release(token).await;
            return None;
        }
        Some((token, sent))
    }

    /// Records an answer just received (see [`saw`]) and who leads.
    fn saw_record(&self, seen: &mut Option<Seen>, info: Option<&LeaseInfo>) {
        if let Some(info) = info.filter(|i| i.is_held()) {
            self.observe(info);
        }
        saw(seen, info.map(LeaseInfo::record), Instant::now());
    }

    /// Waits `delay`, or less if the store pushes a change of our key; answers commands.
    async fn wait_as_follower(&mut self, delay: Duration, watch: &mut Option<LeaseWatch>) -> Wake {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Wake::Stop,
                command = self.commands.recv() => match command {
                    Some(Command::StepDown(reply)) => { let _ = reply.send(false); }
                    None => return Wake::Stop,
                },
                changed = next_change(watch) => {
                    let ours = changed.is_none_or(|key| key == self.shared.config.key);
                    let held_off = self.holdoff_until.is_some_and(|until| Instant::now() < until);
                    if ours && !held_off {
                        return Wake::Changed;
                    }
                },
                _ = sleep_until(deadline) => return Wake::Campaign,
            }
        }
    }

    /// Leads until the lease is lost (returns `true`: campaign again) or the elector stops
    /// (`false`).
    async fn lead(&mut self, token: FencingToken, sent: Sent) -> bool {
        let config = self.shared.config.clone();
        let mut term = self.term(token, sent);
        let mut valid_until = term.lead.valid_until;
        if !term.is_valid(Instant::now(), &self.shared.suspend_clock) {
            // The grant arrived too late to act on; give it back rather than lead blind.
            tracing::warn!(%token, "acquire answered after the deadline it would grant; releasing");
            self.release(token).await;
            return true;
        }
        self.gained(term);
        let mut next_renew = sent.at + config.renew_interval;
        let mut retry = Backoff::new(BackoffConfig {
            initial: (config.renew_interval / 8).max(Duration::from_millis(1)),
            max: (config.renew_interval / 2).max(Duration::from_millis(1)),
            ..BackoffConfig::default()
        });
        loop {
            tokio::select! {
                biased;
                _ = sleep_until(valid_until) => {
                    self.lost(token, LossReason::Expired);
                    return true;
                }
                _ = self.shutdown.cancelled() => {
                    self.give_up(token, LossReason::SteppedDown).await;
                    return false;
                }
                command = self.commands.recv() => {
                    self.give_up(token, LossReason::SteppedDown).await;
                    match command {
                        Some(Command::StepDown(reply)) => {
                            self.holdoff_until = Some(Instant::now() + config.retry_interval * 2);
                            let _ = reply.send(true);
                            return true;
                        }
                        None => return false,
                    }
                }
                _ = sleep_until(next_renew) => {
                    // Tokio's timers run on a clock that stops during a suspend: after one,
                    // this is the first moment the task can see that the term ran out.
                    if !term.is_valid(Instant::now(), &self.shared.suspend_clock) {
                        self.lost(token, LossReason::Expired);
                        return true;
                    }
                    if !self.eligible() {
                        self.give_up(token, LossReason::NotEligible).await;
                        return true;
                    }
                    let sent = Sent::now(&self.shared.suspend_clock);
                    let timeout = config.request_timeout.min(valid_until.saturating_duration_since(sent.at));
                    let renewal = self.shared.store.renew(&config.key, &self.shared.node, token, config.ttl, timeout);
                    let outcome = tokio::select! {
                        outcome = renewal => Some(outcome),
                        _ = sleep_until(valid_until) => None,
                    };
                    match outcome {
                        None => {
                            self.lost(token, LossReason::Expired);
                            return true;
                        }
                        Some(Ok(true)) => {
                            retry.reset();
                            term = self.term(token, sent);
                            valid_until = term.lead.valid_until;
                            next_renew = sent.at + config.renew_interval;
                            self.renewed(term);
                        }
                        Some(Ok(false)) => {
                            self.lost(token, LossReason::Superseded);
                            return true;
                        }
                        Some(Err(e)) => {
                            self.store_error("renew", &e);
                            next_renew = Instant::now() + retry.next().unwrap_or(config.renew_interval / 2);
                        }
                    }
                }
            }
        }
    }

    /// Leaves leadership on purpose: stops acting first, then releases, in that order, so no
    /// other node can be granted the lease while this one still reports itself as leader.
    async fn give_up(&self, token: FencingToken, reason: LossReason) {
        self.lost(token, reason);
        self.release(token).await;
    }

    /// Best-effort compare-and-delete; the lease expires anyway if this fails.
    async fn release(&self, token: FencingToken) {
        let config = &self.shared.config;
        match self
            .shared
            .store
            .release(
                &config.key,
                &self.shared.node,
                token,
                config.request_timeout,
            )
            .await
        {
            Ok(true) => tracing::info!(%token, "lease released"),
            Ok(false) => tracing::info!(%token, "lease already gone when released"),
            Err(e) => self.store_error("release", &e),
        }
    }

    fn observe(&self, info: &LeaseInfo) {
        self.shared.leader.send_if_modified(|seen| {
            let same = seen
                .as_ref()
                .is_some_and(|s| s.node == info.holder && s.token == info.token);
            if !same {
                tracing::debug!(leader = %info.holder, token = %info.token, "leader observed");
                *seen = Some(LeaderInfo {
                    node: info.holder.clone(),
                    token: info.token,
                    since: SystemTime::now(),
                });
            }
            !same
        });
    }

    /// The term a request sent at `sent` grants: `renew_deadline` on both clocks.
    fn term(&self, token: FencingToken, sent: Sent) -> Term {
        let deadline = self.shared.config.renew_deadline;
        Term {
            lead: Leadership {
                token,
                valid_until: sent.at + deadline,
            },
            suspend_deadline: sent.suspend.map(|t| t + deadline),
        }
    }

    fn gained(&self, term: Term) {
        let shared = &self.shared;
        let key = shared.config.key.clone();
        let Leadership { token, valid_until } = term.lead;
        *lock(&shared.term) = Some(term);
        shared.role.send_replace(Role::Leader(term.lead));
        shared.leader.send_replace(Some(LeaderInfo {
            node: shared.node.clone(),
            token,
            since: SystemTime::now(),
        }));
        tracing::info!(%token, "leadership acquired");
        metrics::gauge!(metric::ELECTION_IS_LEADER, "key" => key.clone()).set(1.0);
        metrics::gauge!(metric::FENCING_TOKEN, "key" => key.clone()).set(token.get() as f64);
        metrics::counter!(metric::ELECTION_TRANSITIONS_TOTAL, "key" => key.clone(), "change" => "acquired", "reason" => "won")
            .increment(1);
        let _ = shared
            .events
            .send(ElectorEvent::Acquired { token, valid_until });
        shared.bus.publish(HaEvent::LeadershipAcquired {
            at: SystemTime::now(),
            node: shared.node.clone(),
            key,
            token,
        });
    }

    fn renewed(&self, term: Term) {
        let Leadership { token, valid_until } = term.lead;
        *lock(&self.shared.term) = Some(term);
        self.shared.role.send_replace(Role::Leader(term.lead));
        tracing::debug!(%token, "lease renewed");
        let _ = self
            .shared
            .events
            .send(ElectorEvent::Renewed { token, valid_until });
    }

    /// Stops acting as leader. Always called before any release, so that no other node can
    /// be granted the lease while this one still reports itself as leader.
    fn lost(&self, token: FencingToken, reason: LossReason) {
        let shared = &self.shared;
        let key = shared.config.key.clone();
        *lock(&shared.term) = None;
        shared.role.send_replace(Role::Follower);
        shared.leader.send_if_modified(|seen| {
            let ours = seen.as_ref().is_some_and(|s| s.node == shared.node);
            if ours {
                *seen = None;
            }
            ours
        });
        tracing::warn!(%token, reason = reason.as_str(), "leadership lost");
        metrics::gauge!(metric::ELECTION_IS_LEADER, "key" => key.clone()).set(0.0);
        metrics::counter!(metric::ELECTION_TRANSITIONS_TOTAL, "key" => key.clone(), "change" => "lost", "reason" => reason.as_str())
            .increment(1);
        let _ = shared.events.send(ElectorEvent::Lost { token, reason });
        shared.bus.publish(HaEvent::LeadershipLost {
            at: SystemTime::now(),
            node: shared.node.clone(),
            key,
            token,
            reason,
        });
    }

    fn store_error(&self, op: &'static str, error: &Error) {
        tracing::warn!(op, error = %error, "lease store error");
        metrics::counter!(metric::ELECTION_STORE_ERRORS_TOTAL, "store" => self.shared.store.kind(), "op" => op)
            .increment(1);
    }
}

/// The membership group of an election key.
fn members_group(key: &str) -> String {
    format!("{key}/members")
}

/// The store group of an election's auxiliary records (see [`Elector::put_entry`]).
fn entries_group(key: &str, group: &str) -> String {
    format!("{key}/{group}")
}

/// Beats every `ttl / 3` until shutdown. A store without membership is told once.
async fn heartbeats(shared: Arc<Shared>, shutdown: CancellationToken) {
    let config = &shared.config;
    let group = members_group(&config.key);
    // A third of the TTL: a live member survives two lost beats, a dead one is gone within a TTL.
    let mut tick = tokio::time::interval((config.ttl / 3).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            () = shared.beat_now.notified() => tick.reset(),
        }
        let meta = match &shared.meta_source {
            Some(source) => {
                let mut meta = shared.meta.clone();
                meta.extend(source());
                std::borrow::Cow::Owned(meta)
            }
            None => std::borrow::Cow::Borrowed(&shared.meta),
        };
        let beat = shared
            .store
            .heartbeat(
                &group,
                &shared.node,
                &meta,
                config.ttl,
                config.request_timeout,
            )
            .await;
        match beat {
            Ok(()) => {}
            Err(e @ Error::Unsupported { .. }) => {
                tracing::warn!(error = %e, "membership unavailable on this store");
                return;
            }
            Err(e) => {
                tracing::warn!(op = "heartbeat", error = %e, "lease store error");
                metrics::counter!(metric::ELECTION_STORE_ERRORS_TOTAL, "store" => shared.store.kind(), "op" => "heartbeat")
                    .increment(1);
            }
        }
    }
}

/// The next pushed change: `Some(key)`, or `None` when changes were missed (lagged) — which
/// callers treat as "maybe ours". Pends forever without a watch; drops a closed one.
async fn next_change(watch: &mut Option<LeaseWatch>) -> Option<String> {
    let Some(receiver) = watch.as_mut() else {
        return std::future::pending().await;
    };
    match receiver.recv().await {
        Ok(change) => Some(change.key),
        Err(broadcast::error::RecvError::Lagged(_)) => None,
        Err(broadcast::error::RecvError::Closed) => {
            *watch = None;
            std::future::pending().await
        }
    }
}
