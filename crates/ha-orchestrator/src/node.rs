//! [`HaNode`]: one process's components, started in dependency order with one context, its
//! event observer (logs, metrics, level, routing hooks), and its graceful shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use ha_core::sync::lock;
use ha_core::{
    AlwaysLeader, Component, ComponentContext, ComponentTasks, EventBus, HaEvent, HaLevel,
    Leadership, LeadershipGate, NodeId, RecvError, Severity, Status, metric,
};
use ha_dr::BackupScheduler;
use ha_election::{Elector, ElectorConfig, LeaseStore, Member};
use ha_failover::FailoverManager;
use ha_health::HealthChecker;
#[cfg(all(unix, feature = "files"))]
use ha_replication::FileSync;
#[cfg(feature = "sentinel")]
use ha_replication::SentinelMonitor;
#[cfg(feature = "postgres")]
use ha_replication::{PgAgent, PgReplicationMonitor};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::builder::{EventHook, HaNodeBuilder, MetricsRender};
use crate::error::Error;
use crate::level::{self, LevelFacts, LevelReport};
use crate::secret::{Redactor, Secret};

/// The components of one node, by kind (the node reads their state for `/status`).
pub(crate) struct Parts {
    pub(crate) health: Option<Arc<HealthChecker>>,
    pub(crate) failover: Option<Arc<FailoverManager>>,
    #[cfg(feature = "postgres")]
    pub(crate) postgres: Option<Arc<PgReplicationMonitor>>,
    #[cfg(feature = "postgres")]
    pub(crate) pg_agent: Option<Arc<PgAgent>>,
    #[cfg(feature = "sentinel")]
    pub(crate) sentinel: Option<Arc<SentinelMonitor>>,
    #[cfg(all(unix, feature = "files"))]
    pub(crate) files: Vec<Arc<FileSync>>,
    pub(crate) backups: Option<Arc<BackupScheduler>>,
    pub(crate) extra: Vec<Arc<dyn Component>>,
}

/// What [`HaNodeBuilder::build`] hands over.
pub(crate) struct Settings {
    pub(crate) node_id: NodeId,
    pub(crate) cluster: String,
    pub(crate) election: Option<(Arc<dyn LeaseStore>, ElectorConfig)>,
    /// Where the elector goes once started (actions built before it refer to it).
    pub(crate) elector_slot: Arc<OnceLock<Arc<Elector>>>,
    /// The node's pause flag (shared with the agent, which it suspends).
    pub(crate) paused: Arc<AtomicBool>,
    /// Until when the node keeps out of campaigns (shared with the agent's report).
    pub(crate) hold_until: Arc<Mutex<Option<Instant>>>,
    pub(crate) parts: Parts,
    pub(crate) member_meta: Vec<(String, String)>,
    pub(crate) hooks: Vec<EventHook>,
    pub(crate) http: Option<SocketAddr>,
    pub(crate) admin_token: Option<Secret>,
    pub(crate) metrics: Option<MetricsRender>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) secrets: Vec<Secret>,
}

/// Where a node is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Built, not started.
    Built,
    /// Starting its components.
    Starting,
    /// Every component started.
    Running,
    /// Shutting down: not ready any more.
    Stopping,
    /// Stopped; a node does not start twice.
    Stopped,
}

/// What the node saw on its bus, for `/status` and the KPIs.
#[derive(Default)]
pub(crate) struct Observed {
    /// Last state of every circuit breaker that reported a transition.
    pub(crate) breakers: BTreeMap<String, ha_core::CircuitState>,
    pub(crate) backups_completed: u64,
    pub(crate) backups_failed: u64,
    /// The newest events, newest last (bounded).
    pub(crate) recent: std::collections::VecDeque<HaEvent>,
}

/// How many events `/status` keeps.
const RECENT_EVENTS: usize = 50;

/// The leadership gate of a node: its elector once started, or always-leader for a single
/// node. Cheap to clone; valid before start (answers `None` until the elector leads).
/// Once the node shuts down it answers `None`, a single node included: nothing acts as
/// leader while components stop.
#[derive(Clone, Debug)]
pub struct NodeGate {
    elector: Arc<OnceLock<Arc<Elector>>>,
    single: bool,
    released: Arc<AtomicBool>,
}

impl LeadershipGate for NodeGate {
    fn is_leader(&self) -> Option<Leadership> {
        if self.released.load(Ordering::SeqCst) {
            return None;
        }
        if self.single {
            return AlwaysLeader::default().is_leader();
        }
        self.elector.get().and_then(|e| e.is_leader())
    }
}

/// The node's elector as a [`StepDown`](ha_core::StepDown) target, usable before the elector
/// exists (it is built at start): a failover action that forces a re-election.
#[derive(Clone, Debug)]
pub struct NodeStepDown {
    elector: Arc<OnceLock<Arc<Elector>>>,
}

#[async_trait::async_trait]
impl ha_core::StepDown for NodeStepDown {
    async fn step_down(&self) -> Result<(), ha_core::Error> {
        match self.elector.get() {
            Some(elector) => ha_core::StepDown::step_down(elector.as_ref()).await,
            None => Err(ha_core::Error::NotLeader {
                node: NodeId::new("unstarted"),
                operation: "step down".into(),
            }),
        }
    }
}

impl NodeStepDown {
    pub(crate) fn new(elector: Arc<OnceLock<Arc<Elector>>>) -> Self {
        Self { elector }
    }
}

/// The gate handed to automatic failover and promotion: the node's gate, closed while the
/// node is paused for maintenance.
#[derive(Debug)]
struct PausableGate {
    inner: NodeGate,
    paused: Arc<AtomicBool>,
}

impl LeadershipGate for PausableGate {
    fn is_leader(&self) -> Option<Leadership> {
        if self.paused.load(Ordering::SeqCst) {
            None
        } else {
            self.inner.is_leader()
        }
    }
}

pub(crate) struct Inner {
    pub(crate) node_id: NodeId,
    pub(crate) cluster: String,
    pub(crate) bus: EventBus,
    pub(crate) parts: Parts,
    election: Mutex<Option<(Arc<dyn LeaseStore>, ElectorConfig)>>,
    pub(crate) election_configured: bool,
    pub(crate) elector: Arc<OnceLock<Arc<Elector>>>,
    pub(crate) gate: NodeGate,
    pub(crate) paused: Arc<AtomicBool>,
    /// Until when this node keeps out of campaigns (a switchover to another node).
    pub(crate) hold_until: Arc<Mutex<Option<Instant>>>,
    pub(crate) phase: watch::Sender<Phase>,
    pub(crate) level: watch::Sender<LevelReport>,
    pub(crate) members: Mutex<Option<Vec<Member>>>,
    pub(crate) observed: Mutex<Observed>,
    hooks: Vec<EventHook>,
    member_meta: Vec<(String, String)>,
    http_bind: Option<SocketAddr>,
    pub(crate) http_addr: OnceLock<SocketAddr>,
    pub(crate) admin_token: Option<Secret>,
    pub(crate) metrics: Option<MetricsRender>,
    shutdown_timeout: Duration,
    pub(crate) redactor: Redactor,
    pub(crate) started_at: OnceLock<SystemTime>,
    /// Started components, in start order, for the reverse stop.
    started: Mutex<Vec<Arc<dyn Component>>>,
    shutdown: CancellationToken,
    tasks: ComponentTasks,
    http_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// One HA node: a process's election, health checks, failover, replication, backups and HTTP
/// API, started together and stopped together. Cheap to clone (a handle).
///
/// Start order: election → health → failover → replication → DR → your components → HTTP
/// ready. [`shutdown`](Self::shutdown): not ready → leadership released (followers take over
/// in milliseconds) → components stopped in reverse → HTTP closed, within the shutdown
/// timeout.
#[derive(Clone)]
pub struct HaNode {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for HaNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaNode")
            .field("node", &self.inner.node_id)
            .field("cluster", &self.inner.cluster)
            .field("phase", &*self.inner.phase.borrow())
            .finish_non_exhaustive()
    }
}

impl HaNode {
    /// Starts building a node.
    pub fn builder() -> HaNodeBuilder {
        HaNodeBuilder::default()
    }

    pub(crate) fn new(settings: Settings) -> Self {
        let elector = settings.elector_slot;
        let election_configured = settings.election.is_some();
        let gate = NodeGate {
            elector: Arc::clone(&elector),
            single: !election_configured,
            released: Arc::new(AtomicBool::new(false)),
        };
        let inner = Inner {
            node_id: settings.node_id,
            cluster: settings.cluster,
            bus: EventBus::default(),
            parts: settings.parts,
            election: Mutex::new(settings.election),
            election_configured,
            elector,
            gate,
            paused: settings.paused,
            hold_until: settings.hold_until,
            phase: watch::Sender::new(Phase::Built),
            level: watch::Sender::new(LevelReport {
                level: HaLevel::None,
                configured: HaLevel::None,
                target_percent: 0.0,
                reasons: vec!["not started".to_owned()],
            }),
            members: Mutex::new(None),
            observed: Mutex::new(Observed::default()),
            hooks: settings.hooks,
            member_meta: settings.member_meta,
            http_bind: settings.http,
            http_addr: OnceLock::new(),
            admin_token: settings.admin_token,
            metrics: settings.metrics,
            shutdown_timeout: settings.shutdown_timeout,
            redactor: Redactor::new(settings.secrets),
            started_at: OnceLock::new(),
            started: Mutex::new(Vec::new()),
            shutdown: CancellationToken::new(),
            tasks: ComponentTasks::default(),
            http_task: Mutex::new(None),
        };
        let node = Self {
            inner: Arc::new(inner),
        };
        let report = node.compute_level();
        node.inner.level.send_replace(report);
        node
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.node_id
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.inner.cluster
    }

    /// The node's event bus: every component publishes here; subscribe to watch.
    pub fn bus(&self) -> &EventBus {
        &self.inner.bus
    }

    /// The node's leadership gate, for leader-only work of the application's own: pass
    /// `is_leader()?.token` to every write it makes.
    pub fn leadership(&self) -> Arc<dyn LeadershipGate> {
        Arc::new(self.inner.gate.clone())
    }

    /// This node's leadership now (deadline checked at call time).
    pub fn is_leader(&self) -> Option<Leadership> {
        self.inner.gate.is_leader()
    }

    /// The elector, once started (`None` for a single node).
    pub fn elector(&self) -> Option<&Arc<Elector>> {
        self.inner.elector.get()
    }

    /// The health checker, if checks are configured.
    pub fn health(&self) -> Option<&Arc<HealthChecker>> {
        self.inner.parts.health.as_ref()
    }

    /// The failover manager, if failovers are configured.
    pub fn failover(&self) -> Option<&Arc<FailoverManager>> {
        self.inner.parts.failover.as_ref()
    }

    /// The backup scheduler, if backups are configured.
    pub fn backups(&self) -> Option<&Arc<BackupScheduler>> {
        self.inner.parts.backups.as_ref()
    }

    /// Where the node is in its life.
    pub fn phase(&self) -> Phase {
        *self.inner.phase.borrow()
    }

    /// A receiver of phase changes.
    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.inner.phase.subscribe()
    }

    /// The address the HTTP API listens on, once started.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.inner.http_addr.get().copied()
    }

    /// The HA level the node delivers now and why.
    pub fn level(&self) -> LevelReport {
        self.inner.level.borrow().clone()
    }

    /// A receiver of level changes.
    pub fn watch_level(&self) -> watch::Receiver<LevelReport> {
        self.inner.level.subscribe()
    }

    /// Liveness: the node's loops run (no dependency checks — the Kubernetes convention).
    pub fn is_live(&self) -> bool {
        matches!(self.phase(), Phase::Running | Phase::Starting) && self.inner.tasks.is_running()
    }

    /// Readiness: started, not stopping, and every critical health check healthy (or
    /// degraded: it still serves).
    pub fn is_ready(&self) -> bool {
        if self.phase() != Phase::Running {
            return false;
        }
        match &self.inner.parts.health {
            None => true,
            Some(health) => health
                .report()
                .checks
                .iter()
                .filter(|c| c.criticality == ha_core::Criticality::Critical)
                .all(|c| matches!(c.status, Status::Healthy | Status::Degraded)),
        }
    }

    /// Whether automatic failover and promotion are paused for maintenance.
    pub fn is_paused(&self) -> bool {
        self.inner.paused.load(Ordering::SeqCst)
    }

    /// Pauses automatic failover and promotion on this node (maintenance): the failover
    /// manager and replication see "not leader" until [`resume`](Self::resume). Leadership
    /// itself, health checks, backups and the API go on.
    pub fn pause(&self) {
        self.set_paused(true);
    }

    /// Ends a [`pause`](Self::pause).
    pub fn resume(&self) {
        self.set_paused(false);
    }

    fn set_paused(&self, paused: bool) {
        let was = self.inner.paused.swap(paused, Ordering::SeqCst);
        if was != paused {
            tracing::warn!(
                paused,
                "automatic failover {}",
                if paused { "paused" } else { "resumed" }
            );
            metrics::gauge!(metric::NODE_PAUSED).set(if paused { 1.0 } else { 0.0 });
            self.refresh_level();
        }
    }

    /// Keeps this node out of elections for `duration` (a switchover to another member).
    pub fn hold(&self, duration: Duration) {
        *lock(&self.inner.hold_until) = Some(Instant::now() + duration);
        tracing::info!(?duration, "holding off elections");
    }

    /// Gives up leadership now (graceful step-down): `Ok(true)` if this node led.
    pub async fn step_down(&self) -> Result<bool, Error> {
        match self.inner.elector.get() {
            Some(elector) => Ok(elector.step_down().await),
            None => Err(Error::Unsupported {
                what: "switchover".into(),
                why: if self.inner.election_configured {
                    "the node has not started".into()
                } else {
                    "a single node has no election to hand over".into()
                },
            }),
        }
    }

    /// The live members of the election (empty for a single node), as the store knows them.
    pub async fn members(&self) -> Vec<Member> {
        match self.inner.elector.get() {
            Some(elector) => match elector.members().await {
                Ok(members) => {
                    *lock(&self.inner.members) = Some(members.clone());
                    members
                }
                Err(e) => {
                    tracing::warn!(error = %self.inner.redactor.redact(&e.to_string()), "cannot list members");
                    lock(&self.inner.members).clone().unwrap_or_default()
                }
            },
            None => Vec::new(),
        }
    }

    /// Starts every component in dependency order with one context, then the HTTP API.
    /// On a failure, stops what had started (in reverse) and returns the error.
    pub async fn start(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let began = inner.phase.send_if_modified(|phase| {
            let built = *phase == Phase::Built;
            if built {
                *phase = Phase::Starting;
            }
            built
        });
        if !began {
            return Err(Error::Lifecycle("was already started"));
        }
        let _ = inner.started_at.set(SystemTime::now());
        let ctx = ComponentContext {
            node: inner.node_id.clone(),
            bus: inner.bus.clone(),
            leadership: Arc::new(inner.gate.clone()),
            shutdown: inner.shutdown.clone(),
        };
        // Subscribed before anything starts: the observer misses no event.
        let events = inner.bus.subscribe();
        let stop = inner.tasks.begin("node", &ctx)?;
        let listener = match self.bind().await {
            Ok(listener) => listener,
            Err(e) => {
                self.fail_start().await;
                return Err(e);
            }
        };
        if let Err(e) = self.start_components(&ctx).await {
            self.fail_start().await;
            return Err(e);
        }
        let observer = Observer { node: self.clone() };
        inner.tasks.spawn(observer.run(events, stop.clone()));
        #[cfg(feature = "postgres")]
        if let (Some(agent), Some(elector)) = (&inner.parts.pg_agent, inner.elector.get()) {
            inner.tasks.spawn(publish_report_changes(
                Arc::clone(agent),
                Arc::clone(elector),
                stop.clone(),
            ));
        }
        if let Some(listener) = listener {
            let serve = crate::http::serve(self.clone(), listener, stop);
            *lock(&inner.http_task) = Some(tokio::spawn(serve));
        }
        inner.phase.send_replace(Phase::Running);
        self.refresh_level();
        tracing::info!(node = %inner.node_id, cluster = %inner.cluster, "node started");
        Ok(())
    }

    async fn bind(&self) -> Result<Option<tokio::net::TcpListener>, Error> {
        let Some(addr) = self.inner.http_bind else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let _ = self.inner.http_addr.set(local);
        Ok(Some(listener))
    }

    async fn start_components(&self, ctx: &ComponentContext) -> Result<(), Error> {
        let inner = &self.inner;
        let paused: Arc<dyn LeadershipGate> = Arc::new(PausableGate {
            inner: inner.gate.clone(),
            paused: Arc::clone(&inner.paused),
        });
        let gated = ctx.clone().with_leadership(Arc::clone(&paused));
        let mut order: Vec<(Arc<dyn Component>, &ComponentContext)> = Vec::new();
        let election = lock(&inner.election).take();
        if let Some((store, config)) = election {
            let hold = Arc::clone(&inner.hold_until);
            // Only a member whose database may lead campaigns (and keeps the lease).
            #[cfg(feature = "postgres")]
            let agent = inner.parts.pg_agent.clone();
            #[cfg(feature = "postgres")]
            let database_may_lead = move || agent.as_ref().is_none_or(|a| a.eligible());
            #[cfg(not(feature = "postgres"))]
            let database_may_lead = || true;
            let mut meta: BTreeMap<String, String> = inner.member_meta.iter().cloned().collect();
            if let Some(addr) = inner.http_addr.get() {
                meta.insert("api".into(), format!("http://{addr}"));
            }
            #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
            let mut builder = Elector::builder(store).config(config).member_meta(meta);
            // The agent's report (role, state, timeline, WAL positions), fresh at every beat.
            #[cfg(feature = "postgres")]
            if let Some(agent) = inner.parts.pg_agent.clone() {
                builder = builder.member_meta_source(move || {
                    agent
                        .member_report()
                        .map(|r| r.to_meta())
                        .unwrap_or_default()
                });
            }
            let elector = builder
                .eligibility(move || {
                    lock(&hold).is_none_or(|until| Instant::now() >= until) && database_may_lead()
                })
                .build()
                .map_err(|e| Error::Setup {
                    path: "election".into(),
                    source: Box::new(e),
                })?;
            let elector = Arc::new(elector);
            let _ = inner.elector.set(Arc::clone(&elector));
            order.push((elector, ctx));
        }
        let parts = &inner.parts;
        if let Some(health) = &parts.health {
            order.push((health.clone(), ctx));
        }
        if let Some(failover) = &parts.failover {
            order.push((failover.clone(), &gated));
        }
        #[cfg(feature = "postgres")]
        if let Some(pg) = &parts.postgres {
            order.push((pg.clone(), &gated));
        }
        #[cfg(feature = "postgres")]
        if let Some(agent) = &parts.pg_agent {
            // The elector itself: a paused gate would read as "not leader" and demote.
            order.push((agent.clone(), ctx));
        }
        #[cfg(feature = "sentinel")]
        if let Some(sentinel) = &parts.sentinel {
            order.push((sentinel.clone(), ctx));
        }
        #[cfg(all(unix, feature = "files"))]
        for files in &parts.files {
            order.push((files.clone(), ctx));
        }
        if let Some(backups) = &parts.backups {
            order.push((backups.clone(), ctx));
        }
        for extra in &parts.extra {
            order.push((extra.clone(), ctx));
        }
        for (component, ctx) in order {
            let name = component.name().to_owned();
            tracing::info!(component = %name, "starting");
            component
                .start(ctx.clone())
                .await
                .map_err(Error::Component)?;
            lock(&inner.started).push(component);
        }
        Ok(())
    }

    /// Undoes a start that failed half-way in the order of a shutdown: not ready, leadership
    /// released, then what had started stopped in reverse.
    async fn fail_start(&self) {
        self.inner.phase.send_replace(Phase::Stopping);
        self.release_leadership().await;
        self.stop_components().await;
        self.inner.tasks.stop().await;
        self.inner.phase.send_replace(Phase::Stopped);
        self.refresh_level();
    }

    /// Stops the elector, which releases the lease, before anything else stops: followers
    /// take over at once and no component stops while this node still acts as leader.
    /// Before this node gives its lease up on purpose (switchover, shutdown): the agent
    /// beside its PostgreSQL, if any, demotes the database first, while the lease still
    /// keeps every other member from promoting (see `PgAgent::hand_over_to`: with `to`, it
    /// waits for that member's standby to flush everything). Nothing to do without an agent,
    /// or when this node does not lead.
    pub(crate) async fn hand_over_database(&self, to: Option<&str>) -> Result<(), String> {
        #[cfg(feature = "postgres")]
        if let Some(agent) = &self.inner.parts.pg_agent
            && self.is_leader().is_some()
        {
            return agent.hand_over_to(to).await.map_err(|e| e.to_string());
        }
        #[cfg(not(feature = "postgres"))]
        let _ = to;
        Ok(())
    }

    /// Undoes [`hand_over_database`](Self::hand_over_database) when the step-down it
    /// prepared did not happen.
    pub(crate) fn abort_hand_over(&self) {
        #[cfg(feature = "postgres")]
        if let Some(agent) = &self.inner.parts.pg_agent {
            agent.abort_hand_over();
        }
    }

    async fn release_leadership(&self) {
        // The database stops taking writes before the lease can pass to another member; a
        // demotion that could not be confirmed has stopped PostgreSQL (or the agent is
        // paused, and leaves its database as it is): the lease is released either way.
        if let Err(e) = self.hand_over_database(None).await {
            tracing::warn!(error = %e, "handing the database over before the release failed");
        }
        self.inner.gate.released.store(true, Ordering::SeqCst);
        if let Some(elector) = self.inner.elector.get() {
            let _ = elector.stop().await;
            tracing::info!("leadership released");
        }
    }

    async fn stop_components(&self) {
        let started = std::mem::take(&mut *lock(&self.inner.started));
        for component in started.into_iter().rev() {
            if let Err(e) = component.stop().await {
                tracing::warn!(component = component.name(), error = %e, "stop failed");
            }
        }
    }

    /// Shuts the node down gracefully: readiness fails first, then leadership is released
    /// (followers take over in milliseconds), then components stop in reverse start order,
    /// then the HTTP API closes — all within the shutdown timeout (what is left then is
    /// abandoned, and logged). Idempotent.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        let stopping = inner.phase.send_if_modified(|phase| {
            let run = matches!(phase, Phase::Running | Phase::Starting | Phase::Built);
            if run {
                *phase = Phase::Stopping;
            }
            run
        });
        if !stopping {
            return;
        }
        metrics::gauge!(metric::NODE_READY).set(0.0);
        tracing::info!("shutting down: not ready");
        let graceful = async {
            self.release_leadership().await;
            self.stop_components().await;
            inner.tasks.stop().await;
            let http = lock(&inner.http_task).take();
            if let Some(http) = http {
                let _ = http.await;
            }
        };
        if tokio::time::timeout(inner.shutdown_timeout, graceful)
            .await
            .is_err()
        {
            tracing::error!(timeout = ?inner.shutdown_timeout, "shutdown timed out; abandoning what is left");
            inner.shutdown.cancel();
            if let Some(http) = lock(&inner.http_task).take() {
                http.abort();
            }
        }
        inner.shutdown.cancel();
        inner.phase.send_replace(Phase::Stopped);
        // A stopped node delivers no level: `watch_level` must not keep the last one.
        self.refresh_level();
        tracing::info!("node stopped");
    }

    /// Runs the node until SIGTERM or Ctrl-C, then shuts it down gracefully.
    pub async fn run_until_signal(&self) -> Result<(), Error> {
        self.start().await?;
        wait_for_signal().await;
        self.shutdown().await;
        Ok(())
    }

    /// The facts the level is computed from, now.
    pub(crate) fn level_facts(&self) -> LevelFacts {
        let inner = &self.inner;
        let parts = &inner.parts;
        #[allow(unused_mut)] // empty without the replication features
        let mut replication: Vec<Status> = Vec::new();
        #[cfg(feature = "postgres")]
        replication.extend(parts.postgres.iter().map(|c| c.status()));
        #[cfg(feature = "postgres")]
        replication.extend(parts.pg_agent.iter().map(|c| c.status()));
        #[cfg(feature = "sentinel")]
        replication.extend(parts.sentinel.iter().map(|c| c.status()));
        #[cfg(all(unix, feature = "files"))]
        replication.extend(parts.files.iter().map(|c| c.status()));
        let live_members = if inner.election_configured {
            lock(&inner.members).as_ref().map(Vec::len)
        } else {
            None
        };
        let dr_within_rpo = parts.backups.as_ref().is_some_and(|b| {
            let statuses = b.statuses();
            !statuses.is_empty()
                && statuses
                    .iter()
                    .all(|s| s.last_verified_id.is_some() && !s.rpo_breached)
        });
        let started = matches!(self.phase(), Phase::Running);
        LevelFacts {
            health_configured: parts.health.is_some(),
            // Running means every component started (a failed start ends in Stopped), so a
            // configured checker and manager run exactly while the node does: no report is
            // built on this path, which every event takes.
            health_running: started && parts.health.is_some(),
            failover_configured: parts.failover.is_some(),
            failover_running: started && parts.failover.is_some(),
            paused: self.is_paused(),
            replication_configured: !replication.is_empty(),
            replication_working: !replication.is_empty()
                && replication
                    .iter()
                    .all(|s| matches!(s, Status::Healthy | Status::Degraded)),
            election_configured: inner.election_configured,
            live_members,
            dr_configured: parts.backups.is_some(),
            dr_within_rpo,
        }
    }

    fn compute_level(&self) -> LevelReport {
        level::compute(&self.level_facts())
    }

    /// Recomputes the level; publishes `HaLevelChanged` and sets `ha_level` on a change.
    pub(crate) fn refresh_level(&self) {
        let report = self.compute_level();
        let mut previous = None;
        self.inner.level.send_if_modified(|current| {
            if *current == report {
                return false;
            }
            if current.level != report.level {
                previous = Some(current.level);
            }
            *current = report.clone();
            true
        });
        metrics::gauge!(metric::HA_LEVEL).set(f64::from(report.level.rank()));
        metrics::gauge!(metric::NODE_READY).set(if self.is_ready() { 1.0 } else { 0.0 });
        if let Some(from) = previous
            && self.phase() == Phase::Running
        {
            self.inner.bus.publish(HaEvent::HaLevelChanged {
                at: SystemTime::now(),
                node: self.inner.node_id.clone(),
                from,
                to: report.level,
                reason: report.reasons.join("; "),
            });
        }
    }
}

/// Reads the bus: every event becomes a log line at its severity and a metric, runs the
/// routing hooks, and updates what `/status` shows; the level is recomputed on events and on
/// a one-second tick (members are re-read every few ticks).
struct Observer {
    node: HaNode,
}

/// Sends a membership heartbeat as soon as the agent's report changes shape (role, state,
/// timeline, eligibility, synchronous standby), so that the other members' candidate rule
/// and `hactl list` see a promotion or a demotion within about 100 ms instead of at the next
/// `ttl / 3` beat. WAL positions alone do not count: they change all the time and ride on
/// the regular beats.
#[cfg(feature = "postgres")]
async fn publish_report_changes(
    agent: Arc<PgAgent>,
    elector: Arc<Elector>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let shape = agent
            .member_report()
            .map(|r| (r.role, r.state, r.timeline, r.eligible, r.sync_standby));
        if shape != published {
            elector.heartbeat_now();
            published = shape;
        }
    }
}

impl Observer {
    async fn run(self, mut events: ha_core::EventSubscriber, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                event = events.recv() => match event {
                    Ok(event) => self.observe(&event),
                    Err(RecvError::Lagged { missed }) => {
                        tracing::warn!(missed, "node observer fell behind the event bus");
                    }
                    Err(_) => return,
                },
                _ = tick.tick() => {
                    if ticks.is_multiple_of(3) && self.node.inner.election_configured {
                        let members = self.node.members();
                        tokio::select! {
                            () = stop.cancelled() => return,
                            _ = members => {}
                        }
                    }
                    ticks += 1;
                    self.node.refresh_level();
                }
            }
        }
    }

    fn observe(&self, event: &HaEvent) {
        let inner = &self.node.inner;
        let severity = event.severity();
        metrics::counter!(metric::EVENTS_TOTAL, "event" => event.name(), "severity" => severity.as_str())
            .increment(1);
        let text = inner
            .redactor
            .redact(&serde_json::to_string(event).unwrap_or_else(|_| event.name().to_owned()));
        match severity {
            Severity::Critical => {
                tracing::error!(event = event.name(), severity = "critical", detail = %text)
            }
            Severity::Warning => {
                tracing::warn!(event = event.name(), severity = "warning", detail = %text)
            }
            Severity::Info => {
                tracing::info!(event = event.name(), severity = "info", detail = %text)
            }
        }
        {
            let mut observed = lock(&inner.observed);
            match event {
                HaEvent::CircuitStateChanged { circuit, to, .. } => {
                    observed.breakers.insert(circuit.clone(), *to);
                }
                HaEvent::BackupCompleted { .. } => observed.backups_completed += 1,
                HaEvent::BackupFailed { .. } => observed.backups_failed += 1,
                _ => {}
            }
            if observed.recent.len() == RECENT_EVENTS {
                observed.recent.pop_front();
            }
            observed.recent.push_back(event.clone());
        }
        for hook in &inner.hooks {
            hook(event);
        }
        if !matches!(event, HaEvent::HaLevelChanged { .. }) {
            self.node.refresh_level();
        }
    }
}

/// Waits for SIGTERM or Ctrl-C (SIGINT).
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
