//! [`HaConfig`]: a whole node in TOML, with environment overrides — everything the builder
//! can express, including the seed's "Production HA Configuration".
//!
//! Loading layers the file under the environment with [figment]: `HA_NODE_ID`,
//! `HA_CLUSTER`, `HA_ADMIN_TOKEN` (→ `http.admin_token`), `HA_STORE_URL`
//! (→ `redundancy.store`), `HA_HTTP_LISTEN` (→ `http.listen`), and any nested key spelled
//! with `__` (e.g. `HA_REDUNDANCY__TTL=5s`). Secrets belong in the environment, per-node
//! values too; the file can be shared by the whole cluster. Unknown keys are refused; every
//! error names the file, the dotted path and the rule:
//! `ha.toml: failover.components[2].depends_on: unknown check "cache"`.
//!
//! ```
//! use ha_orchestrator::HaConfig;
//!
//! let config = HaConfig::from_toml_str(r#"
//!     node_id = "a"
//!     cluster = "orders"
//!     [redundancy]
//!     store = "memory"
//!     [[checks]]
//!     name = "api"
//!     kind = "tcp"
//!     address = "127.0.0.1:8080"
//! "#, "inline").unwrap();
//! assert_eq!(config.checks[0].name, "api");
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ha_core::config::duration;
use ha_core::{ConfigError, Criticality, Validate};
use ha_dr::{
    BackupScheduler, KeyRing, LocalStore, MasterKey, PgTools, Repository, RetentionPolicy,
    ScheduleConfig, Source, SourceSchedule, WalRpoConfig, WalRpoMonitor,
};
#[cfg(feature = "postgres")]
use ha_election::PostgresLeaseStore;
#[cfg(feature = "redis")]
use ha_election::RedisLeaseStore;
use ha_election::{ElectorConfig, LeaseStore, MemoryLeaseStore};
#[cfg(feature = "command")]
use ha_failover::CommandAction;
use ha_failover::{ComponentConfig, FailoverAction, FailoverConfig};
#[cfg(feature = "http")]
use ha_failover::{HttpAction, HttpMethod};
use ha_health::{CheckConfig, CheckerConfig, HealthCheck};
#[cfg(all(unix, feature = "files"))]
use ha_replication::FileSync;
#[cfg(feature = "sentinel")]
use ha_replication::SentinelMonitor;
#[cfg(all(unix, feature = "files"))]
use ha_replication::files::{FileReplicator, FileSyncConfig, LocalTarget};
#[cfg(feature = "postgres")]
use ha_replication::pg::PgAgentConfig;
#[cfg(feature = "postgres")]
use ha_replication::{LagConfig, PgAgent, PgMember, PgReplicationMonitor};
use serde::Deserialize;

use crate::builder::HaNodeBuilder;
use crate::error::Error;

// Without the feature that builds a section, its settings are still read (any value), so
// such a config is refused as `Unsupported`, naming the feature, rather than as unknown keys.
#[cfg(not(feature = "postgres"))]
type LagConfig = serde::de::IgnoredAny;
#[cfg(not(feature = "postgres"))]
type PgAgentConfig = serde::de::IgnoredAny;
#[cfg(not(all(unix, feature = "files")))]
type FileSyncConfig = serde::de::IgnoredAny;

/// A whole node, as `ha-node --config` reads it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaConfig {
    /// This node's id (`HA_NODE_ID`). Required.
    pub node_id: String,
    /// The cluster's name (default `ha`).
    pub cluster: String,
    /// Which parts run (the seed's enable switches; all on by default, and a part also needs
    /// its own section).
    pub enable: EnableConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// Leader election.
    pub redundancy: RedundancyConfig,
    /// Health checks.
    pub checks: Vec<CheckEntry>,
    /// Health checker settings.
    pub checker: CheckerConfig,
    /// Automatic failover.
    pub failover: FailoverSection,
    /// Replication monitoring.
    pub replication: ReplicationConfig,
    /// Backups.
    pub disaster_recovery: Option<DrConfig>,
    /// How long a graceful shutdown may take (default 10 s).
    #[serde(with = "duration")]
    pub shutdown_timeout: Option<Duration>,
    /// Logs: `human` (default) or `json`.
    pub log_format: LogFormat,
}

/// Log line format of `ha-node`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One readable line per event (no colours unless the output is a terminal).
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// The seed's switches.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnableConfig {
    /// Leader election.
    pub redundancy: bool,
    /// Health checks.
    pub health: bool,
    /// Automatic failover.
    pub failover: bool,
    /// Replication monitoring.
    pub replication: bool,
    /// Backups.
    pub disaster_recovery: bool,
}

impl Default for EnableConfig {
    fn default() -> Self {
        Self {
            redundancy: true,
            health: true,
            failover: true,
            replication: true,
            disaster_recovery: true,
        }
    }
}

/// The HTTP API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Where to listen (`HA_HTTP_LISTEN`), e.g. `127.0.0.1:8008`. Unset: no API.
    pub listen: Option<SocketAddr>,
    /// Bearer token of the admin routes (`HA_ADMIN_TOKEN`); required on a non-loopback
    /// address.
    pub admin_token: Option<String>,
}

/// Leader election.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedundancyConfig {
    /// `single_node = true`: this node always leads, no election.
    pub single_node: bool,
    /// The lease store (`HA_STORE_URL`): `memory` (one process only), `redis://…`,
    /// `redis+sentinel://host:port[,host:port…]/MASTER`, `postgres://…`,
    /// `etcd://host:port[,host:port…]` (feature `etcd`).
    pub store: Option<String>,
    /// Lease time to live (default 15 s).
    #[serde(with = "duration")]
    pub ttl: Option<Duration>,
    /// How often the leader renews (the seed's heartbeat; default ttl / 3).
    #[serde(with = "duration")]
    pub heartbeat: Option<Duration>,
    /// How often followers try (default ttl / 7.5).
    #[serde(with = "duration")]
    pub retry: Option<Duration>,
}

/// What a health check probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// `PING` + `ROLE` (`url`).
    Redis,
    /// `SELECT 1`, recovery state, connections (`url`).
    Postgres,
    /// A TCP connect (`address`).
    Tcp,
    /// An HTTP GET expecting 2xx (`url`).
    Http,
    /// A program's exit code (`command`: argv, no shell).
    Command,
    /// Disk usage of a file system (`path`).
    Disk,
    /// Memory usage.
    Memory,
    /// CPU usage.
    Cpu,
}

/// One health check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckEntry {
    /// Unique name; a failover component of the same name is failed over when it goes down.
    pub name: String,
    /// What it probes.
    pub kind: CheckKind,
    /// For `redis`, `postgres`, `http`.
    #[serde(default)]
    pub url: Option<String>,
    /// For `tcp`: `host:port`.
    #[serde(default)]
    pub address: Option<String>,
    /// For `command`: program and arguments.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// For `disk`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Time between runs (default 10 s).
    #[serde(default, with = "duration")]
    pub interval: Option<Duration>,
    /// Per-run timeout (default 1 s).
    #[serde(default, with = "duration")]
    pub timeout: Option<Duration>,
    /// `critical` (default), `high`, `medium`, `low`.
    #[serde(default)]
    pub criticality: Option<Criticality>,
    /// Checks this one depends on.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Named groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Consecutive failures to go unhealthy (default 3).
    #[serde(default)]
    pub failure_threshold: Option<u32>,
    /// Consecutive passes to come back (default 1).
    #[serde(default)]
    pub success_threshold: Option<u32>,
}

/// Automatic failover.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverSection {
    /// The seed's `check_interval`: the default interval of checks that set none.
    #[serde(with = "duration")]
    pub check_interval: Option<Duration>,
    /// The seed's `failure_threshold`: the default of components that set none.
    pub failure_threshold: Option<u32>,
    /// The seed's `max_concurrent`.
    pub max_concurrent: Option<usize>,
    /// Components and their actions.
    pub components: Vec<FailoverEntry>,
}

/// One failover component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverEntry {
    /// The component: must be the name of a health check.
    pub name: String,
    /// What to do.
    pub action: ActionEntry,
    /// Components that must be failed over first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Failures in a row that trigger it (default: `failover.failure_threshold`, else 3).
    #[serde(default)]
    pub failure_threshold: Option<u32>,
    /// Step timeout (default 30 s).
    #[serde(default, with = "duration")]
    pub timeout: Option<Duration>,
    /// Minimum time between two failovers of it (default 5 min).
    #[serde(default, with = "duration")]
    pub cooldown: Option<Duration>,
}

/// A failover action.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ActionEntry {
    /// Runs a program (no shell); `rollback` optional.
    Command {
        /// Program and arguments.
        command: Vec<String>,
        /// Program and arguments that undo it.
        #[serde(default)]
        rollback: Option<Vec<String>>,
    },
    /// Sends an HTTP request carrying the fencing token.
    Http {
        /// Where.
        url: String,
        /// `post` (default), `put` or `get`.
        #[serde(default)]
        method: Option<String>,
    },
    /// Gives up this node's leadership (forces a re-election).
    StepDown,
}

/// Replication monitoring.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// PostgreSQL streaming replication.
    pub postgres: Option<PgConfig>,
    /// The agent beside this node's PostgreSQL (promotes it when this node leads, demotes it
    /// when it stops leading).
    pub agent: Option<AgentConfig>,
    /// Redis Sentinel.
    pub sentinel: Option<SentinelConfig>,
    /// Directory replication.
    pub files: Vec<FilesConfig>,
}

/// A PostgreSQL member.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgMemberConfig {
    /// Its name.
    pub name: String,
    /// Its connection URL.
    pub url: String,
}

/// PostgreSQL replication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    /// The primary.
    pub primary: PgMemberConfig,
    /// The replicas.
    #[serde(default)]
    pub replicas: Vec<PgMemberConfig>,
    /// Lag bounds and sampling.
    #[serde(default)]
    pub lag: LagConfig,
}

/// The agent beside this node's PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The database beside this node (a superuser connection: `ALTER SYSTEM`,
    /// `pg_promote`, `pg_terminate_backend`).
    pub member: PgMemberConfig,
    /// Loop, demotion and promotion settings.
    #[serde(default)]
    pub settings: PgAgentConfig,
}

/// Redis Sentinel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The master's name.
    pub master: String,
    /// Sentinel addresses.
    pub sentinels: Vec<String>,
    /// Interval between keepalive `PING`s on the subscription (default 1 s): a half-open
    /// subscription is noticed within this plus the 1 s command timeout.
    #[serde(default, with = "duration")]
    pub keepalive: Option<Duration>,
    /// Interval between comparisons of the sentinels' quorum view with the last announced
    /// master (default 10 s).
    #[serde(default, with = "duration")]
    pub reconcile: Option<Duration>,
}

/// Directory replication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// The source directory.
    pub source: PathBuf,
    /// The target directory.
    pub target: PathBuf,
    /// Time between runs.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Run only on the leader (default false: every node).
    #[serde(default)]
    pub leader_only: bool,
    /// Replication settings.
    #[serde(default)]
    pub settings: FileSyncConfig,
}

/// Backups (the seed's disaster recovery).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrConfig {
    /// The local backup repository.
    pub repository: PathBuf,
    /// The environment variable holding the master key (hex or base64).
    #[serde(default)]
    pub key_env: Option<String>,
    /// A file holding the master key (`ha-dr keygen`).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Only `aes-256-gcm` (the format's cipher; stated so a config says what it gets).
    #[serde(default = "default_encryption")]
    pub encryption: String,
    /// Only `zstd`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Default recovery point objective of sources that set none.
    #[serde(default, with = "duration")]
    pub rpo: Option<Duration>,
    /// Default recovery time objective of sources that set none.
    #[serde(default, with = "duration")]
    pub rto: Option<Duration>,
    /// Sources by name.
    pub sources: BTreeMap<String, DrSourceConfig>,
}

fn default_encryption() -> String {
    "aes-256-gcm".into()
}

fn default_compression() -> String {
    "zstd".into()
}

/// What a backup source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrSourceKind {
    /// A directory tree (`path`).
    Dir,
    /// One file (`path`).
    File,
    /// A database through `pg_dump` (`url`).
    Postgres,
    /// A whole PostgreSQL cluster through `pg_basebackup` (`url` of a role with the
    /// `REPLICATION` attribute), for point-in-time recovery with the WAL the server archives
    /// into the same repository (`ha-dr wal-push` as its `archive_command`, or `ha-dr
    /// wal-stream`).
    PgBase,
}

/// One backup source and its schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrSourceConfig {
    /// What it reads.
    pub kind: DrSourceKind,
    /// For `dir` and `file`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// For `postgres` and `pg_base`.
    #[serde(default)]
    pub url: Option<String>,
    /// For `pg_base`: the objective for the archived WAL (the newest archived segment may be
    /// at most this old), watched by a `wal_rpo` component on the leader, which publishes
    /// `RpoBreached` (kind `wal`). One source per repository at most: the WAL archive is the
    /// repository's.
    #[serde(default, with = "duration")]
    pub wal_rpo: Option<Duration>,
    /// Time between backups (or `cron`).
    #[serde(default, with = "duration")]
    pub interval: Option<Duration>,
    /// A cron expression (UTC).
    #[serde(default)]
    pub cron: Option<String>,
    /// Recovery point objective.
    #[serde(default, with = "duration")]
    pub rpo: Option<Duration>,
    /// Recovery time objective.
    #[serde(default, with = "duration")]
    pub rto: Option<Duration>,
    /// Restore-test each backup instead of only verifying it.
    #[serde(default)]
    pub restore_test: bool,
    /// Which backups to keep.
    #[serde(default)]
    pub retention: Option<RetentionPolicy>,
}

/// Environment variables with a name of their own, and the key each sets.
const ENV_KEYS: &[(&str, &str)] = &[
    ("NODE_ID", "node_id"),
    ("CLUSTER", "cluster"),
    ("ADMIN_TOKEN", "http.admin_token"),
    ("STORE_URL", "redundancy.store"),
    ("HTTP_LISTEN", "http.listen"),
    ("LOG_FORMAT", "log_format"),
];

impl HaConfig {
    /// Reads `path` (TOML) under the environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut figment = Figment::from(Toml::file_exact(path)).merge(nested_env_overrides());
        for (name, key) in ENV_KEYS {
            // Taken as written, not parsed as a TOML value like the nested keys: a node id
            // `7` or an admin token of digits only is a string, not a number that fails to
            // deserialize (with the token printed in the error).
            if let Ok(value) = std::env::var(format!("HA_{name}")) {
                figment = figment.merge(Serialized::default(key, value));
            }
        }
        Self::extract(figment, path)
    }

    /// Parses `text` (TOML, no environment) and validates it; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, Error> {
        Self::extract(Figment::from(Toml::string(text)), Path::new(origin))
    }

    fn extract(figment: Figment, path: &Path) -> Result<Self, Error> {
        let file_error = |message: String| Error::ConfigFile {
            path: path.to_owned(),
            message,
        };
        let config: HaConfig = figment.extract().map_err(|e| {
            let messages: Vec<String> = e.into_iter().map(describe_figment).collect();
            file_error(messages.join("; "))
        })?;
        config.validate().map_err(|e| file_error(e.to_string()))?;
        Ok(config)
    }

    /// Builds the node this config describes: connects its lease store and checks, opens
    /// its backup repository. Config errors name the dotted path; connection errors name
    /// the part that failed.
    pub async fn into_builder(self) -> Result<HaNodeBuilder, Error> {
        let mut b = HaNodeBuilder::default()
            .node_id(self.node_id.as_str())
            .cluster(self.cluster_name());
        if let Some(timeout) = self.shutdown_timeout {
            b = b.shutdown_timeout(timeout);
        }
        if let Some(listen) = self.http.listen {
            b = b.http(listen);
        }
        if let Some(token) = &self.http.admin_token {
            b = b.admin_token(token.clone());
        }
        b = self.add_election(b).await?;
        if self.enable.health {
            b = b.checker_config(self.checker.clone());
            for (i, entry) in self.checks.iter().enumerate() {
                let check = build_check(entry)
                    .await
                    .map_err(|source| setup(format!("checks[{i}]"), source))?;
                b = b.check_arc(check, self.check_config(entry));
            }
        }
        if self.enable.failover && !self.failover.components.is_empty() {
            let mut config = FailoverConfig::default();
            if let Some(max) = self.failover.max_concurrent {
                config.max_concurrent_failovers = max;
            }
            b = b.failover_config(config);
            for (i, entry) in self.failover.components.iter().enumerate() {
                if matches!(entry.action, ActionEntry::StepDown) {
                    b = b.failover_step_down(entry.name.clone(), self.component_config(entry));
                    continue;
                }
                let action = build_action(&entry.action)
                    .map_err(|source| setup(format!("failover.components[{i}].action"), source))?;
                b = b.failover_arc(entry.name.clone(), action, self.component_config(entry));
            }
        }
        if self.enable.replication {
            b = self.add_replication(b)?;
        }
        if self.enable.disaster_recovery
            && let Some(dr) = &self.disaster_recovery
        {
            let (scheduler, wal_rpo) = build_backups(dr)?;
            b = b.backups(scheduler);
            if let Some(monitor) = wal_rpo {
                b = b.component(Arc::new(monitor));
            }
        }
        Ok(b)
    }

    fn cluster_name(&self) -> String {
        if self.cluster.is_empty() {
            "ha".into()
        } else {
            self.cluster.clone()
        }
    }

    async fn add_election(&self, b: HaNodeBuilder) -> Result<HaNodeBuilder, Error> {
        let r = &self.redundancy;
        if r.single_node || !self.enable.redundancy {
            return Ok(b.single_node());
        }
        let Some(url) = &r.store else {
            return Ok(b);
        };
        let store = connect_store(url)
            .await
            .map_err(|source| setup("redundancy.store".into(), source))?;
        Ok(b.election_with(store, self.elector_config()))
    }

    fn elector_config(&self) -> ElectorConfig {
        let r = &self.redundancy;
        let ttl = r.ttl.unwrap_or(Duration::from_secs(15));
        let retry = r.retry.unwrap_or(ttl.mul_f64(2.0 / 15.0));
        let mut config =
            ElectorConfig::with_ttl(format!("{}/leader", self.cluster_name()), ttl, retry);
        if let Some(heartbeat) = r.heartbeat {
            config.renew_interval = heartbeat;
        }
        config
    }

    fn check_config(&self, entry: &CheckEntry) -> CheckConfig {
        let mut c = CheckConfig::default();
        if let Some(interval) = entry.interval.or(self.failover.check_interval) {
            c.interval = interval;
        }
        if let Some(timeout) = entry.timeout {
            c.timeout = timeout;
        }
        if let Some(criticality) = entry.criticality {
            c.criticality = criticality;
        }
        c.depends_on = entry.depends_on.clone();
        c.groups = entry.groups.clone();
        if let Some(n) = entry.failure_threshold {
            c.failure_threshold = n;
        }
        if let Some(n) = entry.success_threshold {
            c.success_threshold = n;
        }
        c
    }

    fn component_config(&self, entry: &FailoverEntry) -> ComponentConfig {
        let mut c = ComponentConfig::default();
        if let Some(n) = entry.failure_threshold.or(self.failover.failure_threshold) {
            c.failure_threshold = n;
        }
        c.depends_on = entry.depends_on.clone();
        if let Some(timeout) = entry.timeout {
            c.timeout = timeout;
        }
        if let Some(cooldown) = entry.cooldown {
            c.cooldown = cooldown;
        }
        c
    }

    #[allow(unused_mut)] // never reassigned without the replication features
    fn add_replication(&self, mut b: HaNodeBuilder) -> Result<HaNodeBuilder, Error> {
        let rep = &self.replication;
        #[cfg(not(feature = "postgres"))]
        if rep.postgres.is_some() || rep.agent.is_some() {
            let what = if rep.postgres.is_some() {
                "replication.postgres"
            } else {
                "replication.agent"
            };
            return Err(without_feature(what, "postgres"));
        }
        #[cfg(not(feature = "sentinel"))]
        if rep.sentinel.is_some() {
            return Err(without_feature("replication.sentinel", "sentinel"));
        }
        #[cfg(not(all(unix, feature = "files")))]
        if !rep.files.is_empty() {
            return Err(without_feature("replication.files", "files"));
        }
        #[cfg(feature = "postgres")]
        if let Some(pg) = &rep.postgres {
            let member = |path: String, m: &PgMemberConfig| {
                PgMember::new(m.name.clone(), &m.url).map_err(|e| setup(path, Box::new(e)))
            };
            let primary = member("replication.postgres.primary".into(), &pg.primary)?;
            let replicas = pg
                .replicas
                .iter()
                .enumerate()
                .map(|(i, r)| member(format!("replication.postgres.replicas[{i}]"), r))
                .collect::<Result<Vec<_>, _>>()?;
            let monitor = PgReplicationMonitor::new(primary, replicas, pg.lag.clone())
                .map_err(|e| setup("replication.postgres".into(), Box::new(e)))?;
            b = b.postgres(monitor);
        }
        #[cfg(feature = "postgres")]
        if let Some(agent) = &rep.agent {
            let member = PgMember::new(agent.member.name.clone(), &agent.member.url)
                .map_err(|e| setup("replication.agent.member".into(), Box::new(e)))?;
            let agent = PgAgent::new(member, agent.settings.clone())
                .map_err(|e| setup("replication.agent".into(), Box::new(e)))?;
            b = b.pg_agent(agent);
        }
        #[cfg(feature = "sentinel")]
        if let Some(s) = &rep.sentinel {
            let mut monitor = SentinelMonitor::new(s.master.clone(), &s.sentinels)
                .map_err(|e| setup("replication.sentinel".into(), Box::new(e)))?;
            if let Some(every) = s.keepalive {
                monitor = monitor.keepalive(every);
            }
            if let Some(every) = s.reconcile {
                monitor = monitor.reconcile(every);
            }
            b = b.sentinel(monitor);
        }
        #[cfg(all(unix, feature = "files"))]
        for (i, f) in rep.files.iter().enumerate() {
            let path = format!("replication.files[{i}]");
            let replicator =
                FileReplicator::new(&f.source, LocalTarget::new(&f.target), f.settings.clone())
                    .map_err(|e| setup(path.clone(), Box::new(e)))?;
            let sync = FileSync::new(replicator, f.interval)
                .map_err(|e| setup(path, Box::new(e)))?
                .leader_only(f.leader_only);
            b = b.file_sync(sync);
        }
        Ok(b)
    }
}

impl Validate for HaConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ha_core::config::non_empty("node_id", &self.node_id)?;
        let r = &self.redundancy;
        if r.single_node && r.store.is_some() {
            return Err(ConfigError::new(
                "redundancy.store",
                "must not be set with single_node = true",
            ));
        }
        if let Some(store) = &r.store {
            store_scheme(store).map_err(|rule| ConfigError::new("redundancy.store", rule))?;
        }
        if r.store.is_some() {
            self.elector_config()
                .validate()
                .map_err(|e| e.within("redundancy"))?;
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, check) in self.checks.iter().enumerate() {
            let path = format!("checks[{i}]");
            ha_core::config::non_empty("name", &check.name).map_err(|e| e.within(&path))?;
            if !names.insert(check.name.as_str()) {
                return Err(ConfigError::new(
                    format!("{path}.name"),
                    format!("duplicate check \"{}\"", check.name),
                ));
            }
            check.validate_fields().map_err(|e| e.within(&path))?;
            self.check_config(check)
                .validate()
                .map_err(|e| e.within(&path))?;
        }
        for (i, check) in self.checks.iter().enumerate() {
            for dep in &check.depends_on {
                if !names.contains(dep.as_str()) {
                    return Err(ConfigError::new(
                        format!("checks[{i}].depends_on"),
                        format!("unknown check \"{dep}\""),
                    ));
                }
            }
        }
        let components: std::collections::BTreeSet<&str> = self
            .failover
            .components
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        for (i, entry) in self.failover.components.iter().enumerate() {
            let path = format!("failover.components[{i}]");
            if !names.contains(entry.name.as_str()) {
                return Err(ConfigError::new(
                    format!("{path}.name"),
                    format!(
                        "no health check named \"{}\": nothing would trigger its failover",
                        entry.name
                    ),
                ));
            }
            for dep in &entry.depends_on {
                if !components.contains(dep.as_str()) {
                    return Err(ConfigError::new(
                        format!("{path}.depends_on"),
                        format!("unknown component \"{dep}\""),
                    ));
                }
            }
            if let ActionEntry::Command { command, rollback } = &entry.action {
                if command.is_empty() {
                    return Err(ConfigError::new(
                        format!("{path}.action.command"),
                        "must name a program",
                    ));
                }
                if rollback.as_ref().is_some_and(Vec::is_empty) {
                    return Err(ConfigError::new(
                        format!("{path}.action.rollback"),
                        "must name a program",
                    ));
                }
            }
            if matches!(entry.action, ActionEntry::StepDown) && r.store.is_none() {
                return Err(ConfigError::new(
                    format!("{path}.action"),
                    "step_down needs an election (redundancy.store)",
                ));
            }
            self.component_config(entry)
                .validate()
                .map_err(|e| e.within(&path))?;
        }
        let leader_only = !self.failover.components.is_empty()
            || self.replication.postgres.is_some()
            || self.replication.agent.is_some()
            || self.disaster_recovery.is_some();
        if leader_only && !r.single_node && r.store.is_none() && self.enable.redundancy {
            return Err(ConfigError::new(
                "redundancy",
                "set `store` or `single_node = true`: failover, promotion and scheduled backups are leader-only work",
            ));
        }
        if let Some(listen) = self.http.listen
            && !listen.ip().is_loopback()
            && self.http.admin_token.is_none()
        {
            return Err(ConfigError::new(
                "http.admin_token",
                format!(
                    "must be set when http.listen is not a loopback address ({listen}); use HA_ADMIN_TOKEN"
                ),
            ));
        }
        if let Some(token) = &self.http.admin_token
            && token.len() < 16
        {
            return Err(ConfigError::new(
                "http.admin_token",
                "must be at least 16 characters",
            ));
        }
        #[cfg(feature = "postgres")]
        if let Some(pg) = &self.replication.postgres {
            pg.lag
                .validate()
                .map_err(|e| e.within("replication.postgres.lag"))?;
        }
        if let Some(s) = &self.replication.sentinel
            && s.sentinels.is_empty()
        {
            return Err(ConfigError::new(
                "replication.sentinel.sentinels",
                "must name at least one sentinel",
            ));
        }
        for (i, f) in self.replication.files.iter().enumerate() {
            ha_core::config::positive("interval", f.interval)
                .map_err(|e| e.within(&format!("replication.files[{i}]")))?;
        }
        if let Some(dr) = &self.disaster_recovery {
            dr.validate().map_err(|e| e.within("disaster_recovery"))?;
        }
        Ok(())
    }
}

impl CheckEntry {
    fn validate_fields(&self) -> Result<(), ConfigError> {
        let needs = |field: &str, present: bool| {
            if present {
                Ok(())
            } else {
                Err(ConfigError::new(
                    field,
                    format!("is required for kind \"{}\"", kind_name(self.kind)),
                ))
            }
        };
        let forbids = |field: &str, present: bool| {
            if present {
                Err(ConfigError::new(
                    field,
                    format!("does not apply to kind \"{}\"", kind_name(self.kind)),
                ))
            } else {
                Ok(())
            }
        };
        let (url, address, command, path) = (
            self.url.is_some(),
            self.address.is_some(),
            self.command.as_ref().is_some_and(|c| !c.is_empty()),
            self.path.is_some(),
        );
        let wanted = match self.kind {
            CheckKind::Redis | CheckKind::Postgres | CheckKind::Http => "url",
            CheckKind::Tcp => "address",
            CheckKind::Command => "command",
            CheckKind::Disk => "path",
            CheckKind::Memory | CheckKind::Cpu => "",
        };
        for (field, present) in [
            ("url", url),
            ("address", address),
            ("command", command),
            ("path", path),
        ] {
            if field == wanted {
                needs(field, present)?;
            } else {
                forbids(
                    field,
                    present && !(field == "command" && self.command.is_none()),
                )?;
            }
        }
        Ok(())
    }
}

impl Validate for DrConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.key_env, &self.key_file) {
            (None, None) => {
                return Err(ConfigError::new(
                    "key_env",
                    "set key_env or key_file: backups are always encrypted",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "key_file",
                    "give key_env or key_file, not both",
                ));
            }
            _ => {}
        }
        if self.encryption != "aes-256-gcm" {
            return Err(ConfigError::new(
                "encryption",
                "must be \"aes-256-gcm\" (the only cipher of the format)",
            ));
        }
        if self.compression != "zstd" {
            return Err(ConfigError::new(
                "compression",
                "must be \"zstd\" (the only compression of the format)",
            ));
        }
        if self.sources.is_empty() {
            return Err(ConfigError::new("sources", "must name at least one source"));
        }
        let watched: Vec<&String> = self
            .sources
            .iter()
            .filter(|(_, s)| s.wal_rpo.is_some())
            .map(|(name, _)| name)
            .collect();
        if let [_, second, ..] = watched.as_slice() {
            return Err(ConfigError::new(
                format!("sources.{second}.wal_rpo"),
                format!(
                    "is set on {} sources; the repository has one WAL archive, so set it on one",
                    watched.len()
                ),
            ));
        }
        for (name, source) in &self.sources {
            let path = format!("sources.{name}");
            let (wanted, given) = match source.kind {
                DrSourceKind::Dir | DrSourceKind::File => ("path", source.path.is_some()),
                DrSourceKind::Postgres | DrSourceKind::PgBase => ("url", source.url.is_some()),
            };
            if !given {
                return Err(ConfigError::new(
                    format!("{path}.{wanted}"),
                    "is required for this kind",
                ));
            }
            if let Some(wal_rpo) = source.wal_rpo {
                if source.kind != DrSourceKind::PgBase {
                    return Err(ConfigError::new(
                        format!("{path}.wal_rpo"),
                        "is only for kind \"pg_base\" (the WAL archive of a whole cluster)",
                    ));
                }
                wal_rpo_config(wal_rpo)
                    .validate()
                    .map_err(|_| ConfigError::new(format!("{path}.wal_rpo"), "must be positive"))?;
            }
            self.schedule(source)
                .validate()
                .map_err(|e| e.within(&path))?;
        }
        Ok(())
    }
}

impl DrConfig {
    fn schedule(&self, source: &DrSourceConfig) -> SourceSchedule {
        SourceSchedule {
            interval: source.interval,
            cron: source.cron.clone(),
            rpo: source.rpo.or(self.rpo),
            rto_target: source.rto.or(self.rto),
            restore_test: source.restore_test,
            retention: source.retention,
            ..SourceSchedule::default()
        }
    }
}

fn kind_name(kind: CheckKind) -> &'static str {
    match kind {
        CheckKind::Redis => "redis",
        CheckKind::Postgres => "postgres",
        CheckKind::Tcp => "tcp",
        CheckKind::Http => "http",
        CheckKind::Command => "command",
        CheckKind::Disk => "disk",
        CheckKind::Memory => "memory",
        CheckKind::Cpu => "cpu",
    }
}

fn setup(path: String, source: ha_core::BoxError) -> Error {
    // A part this build leaves out is `Unsupported` whatever the path it was met on.
    match source.downcast::<Error>() {
        Ok(e) => match *e {
            Error::Unsupported { what, why } => Error::Unsupported {
                what: format!("{path}: {what}"),
                why,
            },
            e => Error::Setup {
                path,
                source: Box::new(e),
            },
        },
        Err(source) => Error::Setup { path, source },
    }
}

/// `what` needs a cargo feature of ha-orchestrator that this build does not have.
#[allow(dead_code)] // only called when a feature is off
fn without_feature(what: impl Into<String>, feature: &str) -> Error {
    Error::Unsupported {
        what: what.into(),
        why: format!("this build of ha-orchestrator lacks its `{feature}` cargo feature"),
    }
}

/// The environment layer of nested keys: `HA_A__B` for any key `a.b` (values parsed as TOML
/// values, so `HA_ENABLE__FAILOVER=false` is a bool). The named variables are read apart.
fn nested_env_overrides() -> Env {
    Env::prefixed("HA_")
        .filter(|key| key.as_str().contains("__"))
        .map(|key| key.as_str().to_ascii_lowercase().replace("__", ".").into())
}

/// Turns figment's error into `path: rule`.
fn describe_figment(e: figment::Error) -> String {
    let path = e.path.join(".");
    let kind = e.kind.to_string();
    if path.is_empty() {
        kind
    } else {
        format!("{path}: {kind}")
    }
}

fn store_scheme(url: &str) -> Result<&'static str, String> {
    if url == "memory" {
        Ok("memory")
    } else if url.starts_with("redis+sentinel://") {
        Ok("redis+sentinel")
    } else if url.starts_with("redis://") || url.starts_with("rediss://") {
        Ok("redis")
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok("postgres")
    } else if let Some(rest) = url.strip_prefix("etcd://") {
        // Checked here whatever the build's features, so a typo is a config error everywhere.
        let endpoints: Vec<&str> = rest.trim_end_matches('/').split(',').collect();
        let valid = endpoints.iter().all(|endpoint| {
            endpoint.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
            })
        });
        if valid {
            Ok("etcd")
        } else {
            Err("etcd:// needs host:port[,host:port…] (every member's client address)".into())
        }
    } else {
        Err("must be `memory`, redis://…, redis+sentinel://host:port[,host:port…]/MASTER, postgres://… or etcd://host:port[,host:port…]".into())
    }
}

async fn connect_store(url: &str) -> Result<Arc<dyn LeaseStore>, ha_core::BoxError> {
    Ok(match store_scheme(url)? {
        "memory" => Arc::new(MemoryLeaseStore::new()),
        #[cfg(not(feature = "redis"))]
        "redis" | "redis+sentinel" => {
            return Err(Box::new(without_feature("a Redis lease store", "redis")));
        }
        #[cfg(feature = "redis")]
        "redis" => Arc::new(RedisLeaseStore::connect(url).await?),
        #[cfg(feature = "redis")]
        "redis+sentinel" => {
            let rest = &url["redis+sentinel://".len()..];
            let (hosts, master) = rest
                .split_once('/')
                .ok_or("redis+sentinel:// needs /MASTER after the sentinel addresses")?;
            let mut addrs = Vec::new();
            for host in hosts.split(',') {
                addrs.push(
                    host.parse()
                        .map_err(|e| format!("sentinel address {host:?}: {e}"))?,
                );
            }
            Arc::new(RedisLeaseStore::connect_sentinel(&addrs, master).await?)
        }
        #[cfg(feature = "postgres")]
        "postgres" => Arc::new(PostgresLeaseStore::connect(url).await?),
        #[cfg(not(feature = "postgres"))]
        "postgres" => {
            return Err(Box::new(without_feature(
                "a PostgreSQL lease store",
                "postgres",
            )));
        }
        #[cfg(feature = "etcd")]
        // Boxed: the gRPC client's connect future is large, and every caller would carry it.
        "etcd" => Arc::new(Box::pin(ha_election::EtcdLeaseStore::connect_url(url)).await?),
        #[cfg(not(feature = "etcd"))]
        "etcd" => return Err(Box::new(without_feature("an etcd lease store", "etcd"))),
        other => return Err(format!("unsupported store {other}").into()),
    })
}

async fn build_check(entry: &CheckEntry) -> Result<Arc<dyn HealthCheck>, ha_core::BoxError> {
    #[cfg(feature = "http")]
    use ha_health::HttpCheck;
    #[cfg(feature = "postgres")]
    use ha_health::PostgresCheck;
    #[cfg(feature = "redis")]
    use ha_health::RedisCheck;
    use ha_health::{CommandCheck, DiskCheck, TcpCheck};
    #[cfg(feature = "system")]
    use ha_health::{CpuCheck, MemoryCheck};
    let name = entry.name.clone();
    let missing = |field: &str| format!("`{field}` is required");
    Ok(match entry.kind {
        #[cfg(not(feature = "redis"))]
        CheckKind::Redis => return Err(Box::new(without_feature("a redis check", "redis"))),
        #[cfg(feature = "redis")]
        CheckKind::Redis => Arc::new(
            RedisCheck::connect(name, entry.url.as_deref().ok_or_else(|| missing("url"))?).await?,
        ),
        #[cfg(not(feature = "postgres"))]
        CheckKind::Postgres => {
            return Err(Box::new(without_feature("a postgres check", "postgres")));
        }
        #[cfg(feature = "postgres")]
        CheckKind::Postgres => Arc::new(
            PostgresCheck::connect(name, entry.url.as_deref().ok_or_else(|| missing("url"))?)
                .await?,
        ),
        CheckKind::Tcp => Arc::new(TcpCheck::new(
            name,
            entry.address.clone().ok_or_else(|| missing("address"))?,
        )?),
        #[cfg(not(feature = "http"))]
        CheckKind::Http => return Err(Box::new(without_feature("an http check", "http"))),
        #[cfg(feature = "http")]
        CheckKind::Http => Arc::new(HttpCheck::new(
            name,
            entry.url.as_deref().ok_or_else(|| missing("url"))?,
        )?),
        CheckKind::Command => {
            let argv = entry.command.clone().unwrap_or_default();
            let (program, args) = argv.split_first().ok_or_else(|| missing("command"))?;
            Arc::new(CommandCheck::new(name, program.clone(), args.to_vec()))
        }
        CheckKind::Disk => Arc::new(DiskCheck::new(
            name,
            entry.path.clone().ok_or_else(|| missing("path"))?,
        )),
        #[cfg(feature = "system")]
        CheckKind::Memory => Arc::new(MemoryCheck::new(name)),
        #[cfg(feature = "system")]
        CheckKind::Cpu => Arc::new(CpuCheck::new(name)),
        #[cfg(not(feature = "system"))]
        CheckKind::Memory | CheckKind::Cpu => {
            return Err(Box::new(without_feature("a memory or cpu check", "system")));
        }
    })
}

fn build_action(entry: &ActionEntry) -> Result<Arc<dyn FailoverAction>, ha_core::BoxError> {
    Ok(match entry {
        #[cfg(not(feature = "command"))]
        ActionEntry::Command { .. } => {
            return Err(Box::new(without_feature("a command action", "command")));
        }
        #[cfg(feature = "command")]
        ActionEntry::Command { command, rollback } => {
            let (program, args) = command
                .split_first()
                .ok_or("`command` must name a program")?;
            let mut action = CommandAction::new(program, args);
            if let Some(rollback) = rollback {
                let (program, args) = rollback
                    .split_first()
                    .ok_or("`rollback` must name a program")?;
                action = action.rollback_command(program, args);
            }
            Arc::new(action)
        }
        #[cfg(not(feature = "http"))]
        ActionEntry::Http { .. } => {
            return Err(Box::new(without_feature("an http action", "http")));
        }
        #[cfg(feature = "http")]
        ActionEntry::Http { url, method } => {
            let method = match method.as_deref().unwrap_or("post") {
                "post" | "POST" => HttpMethod::Post,
                "put" | "PUT" => HttpMethod::Put,
                "get" | "GET" => HttpMethod::Get,
                other => return Err(format!("method {other:?}: must be post, put or get").into()),
            };
            Arc::new(HttpAction::new(method, url)?)
        }
        ActionEntry::StepDown => unreachable_step_down()?,
    })
}

/// `step_down` is wired by [`HaConfig::into_builder`] through
/// [`HaNodeBuilder::failover_step_down`]; it never reaches [`build_action`].
fn unreachable_step_down() -> Result<Arc<dyn FailoverAction>, ha_core::BoxError> {
    Err("step_down is built by the node builder".into())
}

/// The WAL RPO monitor's settings for an objective of `rpo`: checked four times per
/// objective, at least every 30 s.
fn wal_rpo_config(rpo: Duration) -> WalRpoConfig {
    WalRpoConfig {
        rpo,
        check_interval: (rpo / 4).min(Duration::from_secs(30)),
    }
}

/// The backup scheduler of `dr`, and the WAL RPO monitor when a source sets `wal_rpo`.
fn build_backups(dr: &DrConfig) -> Result<(BackupScheduler, Option<WalRpoMonitor>), Error> {
    let path = |p: &str| format!("disaster_recovery.{p}");
    let key = match (&dr.key_env, &dr.key_file) {
        (Some(var), _) => {
            MasterKey::from_env(var).map_err(|e| setup(path("key_env"), Box::new(e)))?
        }
        (None, Some(file)) => {
            MasterKey::load(file).map_err(|e| setup(path("key_file"), Box::new(e)))?
        }
        (None, None) => {
            return Err(ConfigError::new(path("key_env"), "set key_env or key_file").into());
        }
    };
    let store =
        LocalStore::open(&dr.repository).map_err(|e| setup(path("repository"), Box::new(e)))?;
    let repo = Repository::new(store, KeyRing::new(key));
    let mut schedule = ScheduleConfig::default();
    let mut builder_sources = Vec::new();
    let mut wal_rpo = None;
    for (name, source) in &dr.sources {
        schedule.sources.insert(name.clone(), dr.schedule(source));
        let src = match source.kind {
            DrSourceKind::Dir => Source::dir(source.path.clone().unwrap_or_default()),
            DrSourceKind::File => Source::file(source.path.clone().unwrap_or_default()),
            DrSourceKind::Postgres => {
                Source::postgres(source.url.clone().unwrap_or_default(), PgTools::default())
            }
            DrSourceKind::PgBase => {
                Source::pg_base(source.url.clone().unwrap_or_default(), PgTools::default())
            }
        };
        if let Some(rpo) = source.wal_rpo {
            let monitor = WalRpoMonitor::new(repo.clone(), wal_rpo_config(rpo))
                .map_err(|e| e.within(&path(&format!("sources.{name}"))))?;
            wal_rpo = Some(monitor);
        }
        builder_sources.push((name.clone(), src));
    }
    let mut builder = BackupScheduler::builder(repo).config(schedule);
    for (name, source) in builder_sources {
        builder = builder.source(name, source);
    }
    let scheduler = builder
        .build()
        .map_err(|e| setup("disaster_recovery".into(), Box::new(e)))?;
    Ok((scheduler, wal_rpo))
}
