//! [`HaNodeBuilder`]: composes the components of one node and validates the whole of it.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ha_core::{Component, ConfigError, HaEvent, NodeId, Validate};
use ha_dr::BackupScheduler;
use ha_election::{Elector, ElectorConfig, LeaseStore};
use ha_failover::{
    ComponentConfig, FailoverAction, FailoverConfig, FailoverManager, Router, StepDownAction,
    Target,
};
use ha_health::{CheckConfig, CheckerConfig, HealthCheck, HealthChecker};
#[cfg(all(unix, feature = "files"))]
use ha_replication::FileSync;
#[cfg(feature = "sentinel")]
use ha_replication::SentinelMonitor;
#[cfg(feature = "postgres")]
use ha_replication::{PgAgent, PgReplicationMonitor};

use crate::error::Error;
use crate::node::{HaNode, NodeStepDown, Parts};
use crate::secret::Secret;

/// Renders the process's metrics in Prometheus text (the binary's recorder handle).
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Reacts to every event this process observes (client routing in every process, not only on
/// the leader).
pub type EventHook = Arc<dyn Fn(&HaEvent) + Send + Sync>;

/// How this node decides whether it leads.
enum Leadership {
    /// Not said: leader-only work is refused at build time.
    Unset,
    /// An explicit single node: always leads.
    Single,
    /// Elected on a lease store.
    Elected {
        store: Arc<dyn LeaseStore>,
        config: Option<ElectorConfig>,
    },
}

/// Builds an [`HaNode`]: `HaNode::builder()`, then consuming setters, then
/// [`build`](Self::build), which validates the whole node.
///
/// ```
/// use std::time::Duration;
/// use ha_health::{CheckConfig, CheckResult, FnCheck};
/// use ha_orchestrator::HaNode;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), ha_orchestrator::Error> {
/// let node = HaNode::builder()
///     .node_id("node-a")
///     .cluster("orders")
///     .single_node()
///     .check(
///         FnCheck::new("api", || async { CheckResult::healthy("ok") }),
///         CheckConfig::default().interval(Duration::from_secs(1)),
///     )
///     .build()?;
/// node.start().await?;
/// assert_eq!(node.level().level, ha_core::HaLevel::Basic);
/// node.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct HaNodeBuilder {
    node_id: Option<NodeId>,
    cluster: String,
    leadership: Leadership,
    member_meta: Vec<(String, String)>,
    checks: Vec<(Arc<dyn HealthCheck>, CheckConfig)>,
    checker_config: CheckerConfig,
    failovers: Vec<(String, Arc<dyn FailoverAction>, ComponentConfig)>,
    failover_config: FailoverConfig,
    #[cfg(feature = "postgres")]
    postgres: Option<Arc<PgReplicationMonitor>>,
    #[cfg(feature = "postgres")]
    pg_agent: Option<PgAgent>,
    #[cfg(feature = "sentinel")]
    sentinel: Option<Arc<SentinelMonitor>>,
    #[cfg(all(unix, feature = "files"))]
    files: Vec<Arc<FileSync>>,
    backups: Option<Arc<BackupScheduler>>,
    extra: Vec<Arc<dyn Component>>,
    hooks: Vec<EventHook>,
    http: Option<SocketAddr>,
    admin_token: Option<Secret>,
    metrics: Option<MetricsRender>,
    shutdown_timeout: Duration,
    secrets: Vec<Secret>,
    elector_slot: Arc<OnceLock<Arc<Elector>>>,
}

impl fmt::Debug for HaNodeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HaNodeBuilder")
            .field("node_id", &self.node_id)
            .field("cluster", &self.cluster)
            .field("checks", &self.checks.len())
            .field("failovers", &self.failovers.len())
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

impl Default for HaNodeBuilder {
    fn default() -> Self {
        Self {
            node_id: None,
            cluster: "ha".to_owned(),
            leadership: Leadership::Unset,
            member_meta: Vec::new(),
            checks: Vec::new(),
            checker_config: CheckerConfig::default(),
            failovers: Vec::new(),
            failover_config: FailoverConfig::default(),
            #[cfg(feature = "postgres")]
            postgres: None,
            #[cfg(feature = "postgres")]
            pg_agent: None,
            #[cfg(feature = "sentinel")]
            sentinel: None,
            #[cfg(all(unix, feature = "files"))]
            files: Vec::new(),
            backups: None,
            extra: Vec::new(),
            hooks: Vec::new(),
            http: None,
            admin_token: None,
            metrics: None,
            shutdown_timeout: Duration::from_secs(10),
            secrets: Vec::new(),
            elector_slot: Arc::new(OnceLock::new()),
        }
    }
}

impl HaNodeBuilder {
    /// This node's id: unique in the cluster; it is the holder name in the lease and the
    /// `node` of every event. Required.
    pub fn node_id(mut self, id: impl Into<NodeId>) -> Self {
        self.node_id = Some(id.into());
        self
    }

    /// The cluster's name (default `ha`); the election key is `{cluster}/leader`.
    pub fn cluster(mut self, name: impl Into<String>) -> Self {
        self.cluster = name.into();
        self
    }

    /// Elects the leader on `store` with the default timing (ttl 15 s, as
    /// [`ElectorConfig::default`]); the key is `{cluster}/leader`.
    pub fn election(mut self, store: Arc<dyn LeaseStore>) -> Self {
        self.leadership = Leadership::Elected {
            store,
            config: None,
        };
        self
    }

    /// Elects the leader on `store` with `config`'s timing; its key is replaced by
    /// `{cluster}/leader`.
    pub fn election_with(mut self, store: Arc<dyn LeaseStore>, config: ElectorConfig) -> Self {
        self.leadership = Leadership::Elected {
            store,
            config: Some(config),
        };
        self
    }

    /// This node runs alone and always leads (fencing token 0): leader-only work runs here
    /// without an election. Say so explicitly: a cluster that forgot its election must not
    /// fail over from every node at once.
    pub fn single_node(mut self) -> Self {
        self.leadership = Leadership::Single;
        self
    }

    /// Adds `key = value` to what this node announces in its membership heartbeats (its API
    /// address is announced as `api` on its own).
    pub fn member_meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.member_meta.push((key.into(), value.into()));
        self
    }

    /// Adds a health check.
    pub fn check(self, check: impl HealthCheck, config: CheckConfig) -> Self {
        self.check_arc(Arc::new(check), config)
    }

    /// Adds a health check that is already shared.
    pub fn check_arc(mut self, check: Arc<dyn HealthCheck>, config: CheckConfig) -> Self {
        self.checks.push((check, config));
        self
    }

    /// Settings of the health checker as a whole.
    pub fn checker_config(mut self, config: CheckerConfig) -> Self {
        self.checker_config = config;
        self
    }

    /// Fails `component` over with `action` when the health check of the same name goes
    /// down (leader only).
    pub fn failover(
        self,
        component: impl Into<String>,
        action: impl FailoverAction,
        config: ComponentConfig,
    ) -> Self {
        self.failover_arc(component, Arc::new(action), config)
    }

    /// [`failover`](Self::failover) with an action that is already shared.
    pub fn failover_arc(
        mut self,
        component: impl Into<String>,
        action: Arc<dyn FailoverAction>,
        config: ComponentConfig,
    ) -> Self {
        self.failovers.push((component.into(), action, config));
        self
    }

    /// Fails `component` over by giving up this node's leadership (a forced re-election:
    /// another member, whose view of the component may be healthy, takes over). Needs an
    /// election.
    pub fn failover_step_down(self, component: impl Into<String>, config: ComponentConfig) -> Self {
        let target = NodeStepDown::new(Arc::clone(&self.elector_slot));
        self.failover(component, StepDownAction::new(Arc::new(target)), config)
    }

    /// Settings of the failover manager as a whole.
    pub fn failover_config(mut self, config: FailoverConfig) -> Self {
        self.failover_config = config;
        self
    }

    /// Monitors PostgreSQL streaming replication.
    #[cfg(feature = "postgres")]
    pub fn postgres(mut self, monitor: PgReplicationMonitor) -> Self {
        self.postgres = Some(Arc::new(monitor));
        self
    }

    /// Runs the agent beside this node's PostgreSQL (Patroni's model): the leader's database
    /// is the primary; an agent that loses leadership demotes its own database before the
    /// deadline. It asks the elector itself, never the paused gate; `pause` suspends it
    /// (neither promotion nor demotion) through [`PgAgent::paused_by`].
    ///
    /// The node also publishes the database's host and port as the member metadata
    /// `pg_conninfo` (unless set by [`member_meta`](Self::member_meta)); a following agent
    /// re-points its replica at the leader's `pg_conninfo` ([`PgAgent::follow`]). The
    /// elector campaigns, and keeps leading, only while [`PgAgent::eligible`] holds.
    #[cfg(feature = "postgres")]
    pub fn pg_agent(mut self, agent: PgAgent) -> Self {
        self.pg_agent = Some(agent);
        self
    }

    /// Watches Redis Sentinel (every node, not only the leader: routing moves everywhere).
    #[cfg(feature = "sentinel")]
    pub fn sentinel(mut self, monitor: SentinelMonitor) -> Self {
        self.sentinel = Some(Arc::new(monitor));
        self
    }

    /// Replicates a directory.
    #[cfg(all(unix, feature = "files"))]
    pub fn file_sync(mut self, sync: FileSync) -> Self {
        self.files.push(Arc::new(sync));
        self
    }

    /// Takes scheduled backups (leader only).
    pub fn backups(mut self, scheduler: BackupScheduler) -> Self {
        self.backups = Some(Arc::new(scheduler));
        self
    }

    /// Runs one more component of the application's own, after every built-in one.
    pub fn component(mut self, component: Arc<dyn Component>) -> Self {
        self.extra.push(component);
        self
    }

    /// Calls `hook` with every event this process observes, on every node (leader or not).
    pub fn on_event(mut self, hook: impl Fn(&HaEvent) + Send + Sync + 'static) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// Moves `router` in this process whenever `select` picks a target for an event (e.g. to
    /// the secondary on `RedisMasterSwitched` or `ReplicaPromoted`): client routing happens
    /// in every process that observes the change, not only on the leader.
    pub fn route<T: Send + Sync + 'static>(
        self,
        router: Router<T>,
        select: impl Fn(&HaEvent) -> Option<Target> + Send + Sync + 'static,
    ) -> Self {
        self.on_event(move |event| {
            if let Some(target) = select(event)
                && router.switch(target.other(), target)
            {
                tracing::info!(event = event.name(), %target, "router switched in this process");
            }
        })
    }

    /// Moves `router` in this process to whichever of its two targets is the Redis master
    /// `master` switched to, as this process's own sentinel monitor observes it
    /// (`RedisMasterSwitched`; see [`ha_replication::sentinel::switched_to`]). `addr_of`
    /// names a target's `ip:port`. Every node follows the master, leader or not, and back
    /// again on the next switch; a switch to an address neither target has is logged and
    /// ignored.
    #[cfg(feature = "sentinel")]
    pub fn follow_redis_master<T: Send + Sync + 'static>(
        self,
        master: impl Into<String>,
        router: Router<T>,
        addr_of: impl Fn(&T) -> &str + Send + Sync + 'static,
    ) -> Self {
        let master = master.into();
        let targets = router.clone();
        self.route(router, move |event| {
            let to = ha_replication::sentinel::switched_to(event, &master)?;
            let target = [Target::Primary, Target::Secondary]
                .into_iter()
                .find(|t| addr_of(targets.target(*t)) == to);
            if target.is_none() {
                tracing::warn!(%master, %to, "the new Redis master is neither router target");
            }
            target
        })
    }

    /// Serves the HTTP API on `addr` (port 0 picks a free one; [`HaNode::http_addr`] tells).
    pub fn http(mut self, addr: SocketAddr) -> Self {
        self.http = Some(addr);
        self
    }

    /// The bearer token admin endpoints require. Without one they answer 401 to everyone;
    /// a non-loopback HTTP address without one is refused at build time.
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        let token = Secret::new(token.into());
        self.secrets.push(token.clone());
        self.admin_token = Some(token);
        self
    }

    /// Serves `/metrics` with `render` (the Prometheus recorder's handle, installed by the
    /// binary; a library never installs a recorder).
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// How long a graceful shutdown may take in all (default 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// A secret (a password in a URL, a key) that must never appear in `/status`, logs or
    /// errors the node renders: every occurrence is replaced by `***`.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        let secret = secret.into();
        if !secret.is_empty() {
            self.secrets.push(Secret::new(secret));
        }
        self
    }

    /// Validates the whole node and builds it (not started: [`HaNode::start`]).
    ///
    /// Every error names the dotted path and the rule it broke, e.g.
    /// `failover.components[1]` naming a component without a health check of that name.
    pub fn build(self) -> Result<HaNode, Error> {
        let node_id = self
            .node_id
            .clone()
            .ok_or_else(|| ConfigError::new("node_id", "must be set"))?;
        ha_core::config::non_empty("cluster", &self.cluster)?;
        if self.cluster.contains(char::is_whitespace) {
            return Err(ConfigError::new("cluster", "must not contain whitespace").into());
        }
        self.validate_composition()?;

        let election = match self.leadership {
            Leadership::Elected { store, config } => {
                let mut config = config.unwrap_or_default();
                config.key = format!("{}/leader", self.cluster);
                config.validate().map_err(|e| e.within("election"))?;
                Some((store, config))
            }
            Leadership::Single | Leadership::Unset => None,
        };
        let health = if self.checks.is_empty() {
            None
        } else {
            let mut builder = HealthChecker::builder().config(self.checker_config);
            for (check, config) in self.checks {
                builder = builder.check_arc(check, config);
            }
            Some(Arc::new(builder.build().map_err(|e| Error::Setup {
                path: "checks".into(),
                source: Box::new(e),
            })?))
        };
        let failover = if self.failovers.is_empty() {
            None
        } else {
            let mut builder = FailoverManager::builder().config(self.failover_config);
            for (name, action, config) in self.failovers {
                builder = builder.component_arc(name, action, config);
            }
            Some(Arc::new(builder.build().map_err(|e| Error::Setup {
                path: "failover".into(),
                source: Box::new(e),
            })?))
        };
        // One pause flag for the node: its paused gate (failover, promotion) and the agent.
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Until when the node keeps out of campaigns (a switchover to another member).
        let hold_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>> = Arc::default();
        // The agent publishes where its database is (`pg_conninfo`, no credential) and, not
        // leading, follows the database that the leader's member published.
        #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
        let mut member_meta = self.member_meta;
        #[cfg(feature = "postgres")]
        let pg_agent = self.pg_agent.map(|agent| {
            if !member_meta.iter().any(|(k, _)| k == PG_CONNINFO_META) {
                member_meta.push((PG_CONNINFO_META.into(), agent.upstream().conninfo()));
            }
            let elector = Arc::clone(&self.elector_slot);
            let members = Arc::clone(&self.elector_slot);
            let known = UpstreamCache::default();
            let hold = Arc::clone(&hold_until);
            let sync = ElectionSyncState {
                elector: Arc::clone(&self.elector_slot),
            };
            // A led primary that stays down past `rejoin.primary_start_timeout`: the agent
            // gives the node's lease up at once (not only at the elector's next renewal).
            let step_down = NodeStepDown::new(Arc::clone(&self.elector_slot));
            Arc::new(
                agent
                    .paused_by(Arc::clone(&paused))
                    .follow(move || leader_upstream(Arc::clone(&elector), Arc::clone(&known)))
                    .peers(move || peer_reports(Arc::clone(&members)))
                    .sync_state(Arc::new(sync))
                    .held_off(move || {
                        ha_core::sync::lock(&hold)
                            .is_some_and(|until| tokio::time::Instant::now() < until)
                    })
                    .step_down_by(Arc::new(step_down)),
            )
        });
        let parts = Parts {
            #[cfg(feature = "postgres")]
            pg_agent,
            health,
            failover,
            #[cfg(feature = "postgres")]
            postgres: self.postgres,
            #[cfg(feature = "sentinel")]
            sentinel: self.sentinel,
            #[cfg(all(unix, feature = "files"))]
            files: self.files,
            backups: self.backups,
            extra: self.extra,
        };
        Ok(HaNode::new(crate::node::Settings {
            node_id,
            cluster: self.cluster,
            election,
            elector_slot: self.elector_slot,
            paused,
            hold_until,
            parts,
            member_meta,
            hooks: self.hooks,
            http: self.http,
            admin_token: self.admin_token,
            metrics: self.metrics,
            shutdown_timeout: self.shutdown_timeout,
            secrets: self.secrets,
        }))
    }

    /// The rules that span components.
    fn validate_composition(&self) -> Result<(), ConfigError> {
        let checks: BTreeSet<&str> = self.checks.iter().map(|(c, _)| c.name()).collect();
        for (i, (check, config)) in self.checks.iter().enumerate() {
            for dep in &config.depends_on {
                if !checks.contains(dep.as_str()) {
                    return Err(ConfigError::new(
                        format!("checks[{i}].depends_on"),
                        format!("unknown check \"{dep}\" (needed by \"{}\")", check.name()),
                    ));
                }
            }
        }
        for (i, (name, _, _)) in self.failovers.iter().enumerate() {
            if !checks.contains(name.as_str()) {
                return Err(ConfigError::new(
                    format!("failover.components[{i}]"),
                    format!(
                        "component \"{name}\" has no health check of that name: nothing would \
                         ever trigger its failover"
                    ),
                ));
            }
        }
        let leader_only = [
            (!self.failovers.is_empty(), "failover"),
            #[cfg(feature = "postgres")]
            (self.postgres.is_some(), "replication.postgres (promotion)"),
            #[cfg(feature = "postgres")]
            (
                self.pg_agent.is_some(),
                "replication.agent (promotion and demotion)",
            ),
            (
                self.backups.is_some(),
                "disaster_recovery (scheduled backups)",
            ),
        ];
        if matches!(self.leadership, Leadership::Unset)
            && let Some((_, what)) = leader_only.iter().find(|(on, _)| *on)
        {
            return Err(ConfigError::new(
                "election",
                format!(
                    "must be set, or the node declared single_node: {what} is leader-only work"
                ),
            ));
        }
        if let Some(addr) = self.http
            && !addr.ip().is_loopback()
            && self.admin_token.is_none()
        {
            return Err(ConfigError::new(
                "http.admin_token",
                format!(
                    "must be set when the API listens on a non-loopback address ({addr}): \
                     admin endpoints would be open to the network"
                ),
            ));
        }
        if let Some(token) = &self.admin_token
            && token.expose().len() < 16
        {
            return Err(ConfigError::new(
                "http.admin_token",
                "must be at least 16 characters",
            ));
        }
        if self.shutdown_timeout.is_zero() {
            return Err(ConfigError::new(
                "shutdown_timeout",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// The member metadata key under which a node with a [`PgAgent`] publishes where its
/// database is reached (`host=… port=…`, no credential).
pub const PG_CONNINFO_META: &str = "pg_conninfo";

/// Every member's published database report (the `pg_*` member metadata), for the
/// agent's candidate rule.
#[cfg(feature = "postgres")]
async fn peer_reports(
    elector: Arc<OnceLock<Arc<Elector>>>,
) -> Vec<ha_replication::pg::MemberReport> {
    let Some(elector) = elector.get().cloned() else {
        return Vec::new();
    };
    let Ok(members) = elector.members().await else {
        return Vec::new();
    };
    members
        .iter()
        .filter_map(|m| ha_replication::pg::MemberReport::from_meta(m.node.as_str(), &m.meta))
        .collect()
}

/// The election's group holding the PostgreSQL agents' synchronous-replication records.
#[cfg(feature = "postgres")]
const SYNC_GROUP: &str = "sync";

/// How long the store keeps a sync record nobody wrote again (the leader's agent rewrites
/// its own every few minutes).
#[cfg(feature = "postgres")]
const SYNC_RECORD_TTL: Duration = Duration::from_secs(24 * 3600);

/// The PostgreSQL agent's synchronous-replication record, kept in the election's lease
/// store ([`Elector::put_entry`], group `sync`): one entry per primary that wrote one, the
/// greatest token wins. As durable and as available as the leases.
#[cfg(feature = "postgres")]
struct ElectionSyncState {
    elector: Arc<OnceLock<Arc<Elector>>>,
}

#[cfg(feature = "postgres")]
impl fmt::Debug for ElectionSyncState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElectionSyncState").finish_non_exhaustive()
    }
}

#[cfg(feature = "postgres")]
impl ElectionSyncState {
    fn elector(&self, what: &'static str) -> Result<Arc<Elector>, ha_replication::Error> {
        self.elector
            .get()
            .cloned()
            .ok_or_else(|| ha_replication::Error::SyncState {
                what,
                detail: "the election has not started".into(),
            })
    }
}

#[cfg(feature = "postgres")]
#[ha_core::async_trait]
impl ha_replication::pg::SyncStateStore for ElectionSyncState {
    async fn read(&self) -> Result<Option<ha_replication::pg::SyncState>, ha_replication::Error> {
        let entries = self
            .elector("read")?
            .entries(SYNC_GROUP)
            .await
            .map_err(|e| ha_replication::Error::SyncState {
                what: "read",
                detail: e.to_string(),
            })?;
        Ok(entries
            .iter()
            .filter_map(|m| ha_replication::pg::SyncState::from_meta(&m.meta))
            .max_by_key(|r| r.token))
    }

    async fn write(
        &self,
        state: &ha_replication::pg::SyncState,
    ) -> Result<(), ha_replication::Error> {
        // Keyed by the primary: a deposed primary's late write only replaces its own entry,
        // whose token is smaller than the new primary's.
        self.elector("write")?
            .put_entry(
                SYNC_GROUP,
                &NodeId::from(state.primary.as_str()),
                &state.to_meta(),
                SYNC_RECORD_TTL,
            )
            .await
            .map_err(|e| ha_replication::Error::SyncState {
                what: "write",
                detail: e.to_string(),
            })
    }
}

/// The leader's database of the last term looked up, by its fencing token.
#[cfg(feature = "postgres")]
type UpstreamCache =
    Arc<std::sync::Mutex<Option<(ha_core::FencingToken, ha_replication::pg::Upstream)>>>;

/// The leader's database as its member published it, when another node leads. A member's
/// `pg_conninfo` is set once when its node is built, so it is read from the store once per
/// term (a new term, even of the same node, has a new token), not at every agent loop.
#[cfg(feature = "postgres")]
async fn leader_upstream(
    elector: Arc<OnceLock<Arc<Elector>>>,
    known: UpstreamCache,
) -> Option<ha_replication::pg::Upstream> {
    let elector = Arc::clone(elector.get()?);
    let leader = elector.leader()?;
    if elector.is_leader().is_some() {
        return None;
    }
    if let Some((token, upstream)) = &*ha_core::sync::lock(&known)
        && *token == leader.token
    {
        return Some(upstream.clone());
    }
    let members = elector.members().await.ok()?;
    let meta = members.into_iter().find(|m| m.node == leader.node)?.meta;
    let upstream = ha_replication::pg::Upstream::from_conninfo(meta.get(PG_CONNINFO_META)?)?;
    *ha_core::sync::lock(&known) = Some((leader.token, upstream.clone()));
    Some(upstream)
}
