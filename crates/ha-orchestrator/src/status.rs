//! [`NodeStatus`]: what `GET /status` answers and `hactl` reads — who the node is, who leads,
//! the members, the level and why, health, breakers, failover history, replication lag,
//! backups with RPO/RTO, and the KPIs computed from what the node saw.

use std::collections::BTreeMap;

#[cfg(any(
    feature = "postgres",
    feature = "sentinel",
    all(unix, feature = "files")
))]
use ha_core::Component;
use ha_core::HaLevel;
use ha_core::sync::lock;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::node::{HaNode, Phase};

/// The answer of `GET /status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeStatus {
    /// This node.
    pub node: String,
    /// The cluster.
    pub cluster: String,
    /// Where the node is in its life.
    pub phase: Phase,
    /// Whether it is ready (see `GET /ready`).
    pub ready: bool,
    /// Whether automatic failover is paused here.
    pub paused: bool,
    /// `leader`, `follower`, or `single` (a single node always leads).
    pub role: String,
    /// The fencing token of this node's term while it leads.
    pub token: Option<u64>,
    /// Who leads, as this node last saw it.
    pub leader: Option<LeaderView>,
    /// The live members of the election.
    pub members: Vec<MemberView>,
    /// The level the node delivers, its configured level, and why they differ.
    pub level: LevelView,
    /// The health report (every check with its status, cause and statistics).
    pub health: Option<Value>,
    /// The last state of every circuit breaker that reported a transition.
    pub breakers: BTreeMap<String, String>,
    /// Failover: components and the audit history.
    pub failover: Option<Value>,
    /// Replication: PostgreSQL lag per replica, Sentinel, file sync.
    pub replication: Value,
    /// Backups per source, with RPO and RTO.
    pub backups: Option<Value>,
    /// The KPIs computed from what this node saw.
    pub kpis: Kpis,
    /// Seconds since the node started.
    pub uptime_seconds: f64,
    /// The newest events this node saw, oldest first.
    pub recent_events: Vec<Value>,
}

/// Who leads.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaderView {
    /// The leader.
    pub node: String,
    /// Its fencing token.
    pub token: u64,
}

/// One live member.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberView {
    /// The node.
    pub node: String,
    /// `leader` or `follower`, as this node sees it.
    pub role: String,
    /// Its HTTP API, when it announced one.
    pub api: Option<String>,
    /// What it announced about itself.
    pub meta: BTreeMap<String, String>,
}

/// The HA level.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LevelView {
    /// Delivered now.
    pub level: HaLevel,
    /// What the configuration could deliver.
    pub configured: HaLevel,
    /// The availability target of the delivered level, in percent.
    pub target_percent: f64,
    /// Why the delivered level is lower.
    pub reasons: Vec<String>,
    /// E.g. `standard: only 1 live member`.
    pub summary: String,
}

/// The seed's KPIs, from what this node saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Kpis {
    /// Mean time to recovery: the mean of (failover ended − outage detected) over completed
    /// failovers in the history.
    pub mttr_seconds: Option<f64>,
    /// Failovers completed / failovers run.
    pub failover_success_rate: Option<f64>,
    /// Backups completed / backups attempted, as seen on this node's bus.
    pub backup_success_rate: Option<f64>,
    /// The mean success rate of the health checks over their sample windows.
    pub health_check_success_rate: Option<f64>,
    /// The largest replication lag in the last sample, in bytes.
    pub max_replication_lag_bytes: Option<u64>,
    /// The largest replication lag in the last sample, in seconds.
    pub max_replication_lag_seconds: Option<f64>,
}

/// A JSON value of anything serializable (`null` if it cannot be).
fn json(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

impl HaNode {
    /// The node's status now (reads the store for the members).
    pub async fn status(&self) -> NodeStatus {
        let members = self.members().await;
        let inner = &self.inner;
        let lead = self.is_leader();
        let single = !inner.election_configured;
        let leader = if single {
            Some(LeaderView {
                node: inner.node_id.to_string(),
                token: 0,
            })
        } else {
            inner
                .elector
                .get()
                .and_then(|e| e.leader())
                .map(|l| LeaderView {
                    node: l.node.to_string(),
                    token: l.token.get(),
                })
        };
        let members = members
            .into_iter()
            .map(|m| {
                let is_leader = leader.as_ref().is_some_and(|l| l.node == m.node.as_str());
                MemberView {
                    node: m.node.to_string(),
                    role: if is_leader { "leader" } else { "follower" }.to_owned(),
                    api: m.meta.get("api").cloned(),
                    meta: m.meta,
                }
            })
            .collect();
        let level = self.level();
        let parts = &inner.parts;
        let health = parts.health.as_ref().map(|h| h.report());
        let observed = lock(&inner.observed);
        let breakers = observed
            .breakers
            .iter()
            .map(|(name, state)| (name.clone(), state.as_str().to_owned()))
            .collect();
        let backups_seen = observed.backups_completed + observed.backups_failed;
        let backup_success_rate =
            (backups_seen > 0).then(|| observed.backups_completed as f64 / backups_seen as f64);
        let recent_events = observed.recent.iter().map(json).collect();
        drop(observed);

        let mut kpis = Kpis {
            backup_success_rate,
            ..Kpis::default()
        };
        if let Some(report) = &health {
            let rates: Vec<f64> = report
                .checks
                .iter()
                .filter_map(|c| c.success_rate)
                .collect();
            if !rates.is_empty() {
                kpis.health_check_success_rate =
                    Some(rates.iter().sum::<f64>() / rates.len() as f64);
            }
        }
        let failover = parts.failover.as_ref().map(|manager| {
            let history = manager.history();
            let ran: Vec<_> = history.iter().filter(|r| r.outcome.ran()).collect();
            let completed: Vec<f64> = ran
                .iter()
                .filter(|r| matches!(r.outcome, ha_failover::Outcome::Completed))
                .filter_map(|r| {
                    let ended = r.ended_at;
                    ended
                        .duration_since(r.trigger.at)
                        .ok()
                        .map(|d| d.as_secs_f64())
                })
                .collect();
            if !completed.is_empty() {
                kpis.mttr_seconds = Some(completed.iter().sum::<f64>() / completed.len() as f64);
            }
            if !ran.is_empty() {
                kpis.failover_success_rate = Some(completed.len() as f64 / ran.len() as f64);
            }
            let components: BTreeMap<String, Value> = manager
                .components()
                .filter_map(|name| {
                    let state = manager.component_state(name)?;
                    Some((
                        name.to_owned(),
                        serde_json::json!({
                            "failed": state.failed,
                            "phase": format!("{:?}", state.phase).to_lowercase(),
                            "consecutive_failures": state.consecutive_failures,
                            "consecutive_successes": state.consecutive_successes,
                        }),
                    ))
                })
                .collect();
            serde_json::json!({
                "paused": self.is_paused(),
                "in_flight": manager.in_flight(),
                "queued": manager.queued(),
                "components": components,
                "history": json(&history),
            })
        });
        #[allow(unused_mut)] // empty without the replication features
        let mut replication = serde_json::Map::new();
        #[cfg(feature = "postgres")]
        if let Some(pg) = &parts.postgres {
            let sample = pg.last_sample();
            if let Some(sample) = &sample {
                for replica in &sample.replicas {
                    if let Some(bytes) = replica.lag_bytes {
                        kpis.max_replication_lag_bytes =
                            Some(kpis.max_replication_lag_bytes.unwrap_or(0).max(bytes));
                    }
                    if let Some(lag) = replica.lag {
                        let secs = lag.as_secs_f64();
                        kpis.max_replication_lag_seconds =
                            Some(kpis.max_replication_lag_seconds.unwrap_or(0.0).max(secs));
                    }
                }
            }
            replication.insert(
                "postgres".into(),
                serde_json::json!({
                    "status": pg.status(),
                    "replicas": sample.as_ref().map(|s| s.replicas.iter().map(|r| serde_json::json!({
                        "replica": r.replica,
                        "link": json(&r.link),
                        "lag_bytes": r.lag_bytes,
                        "lag_seconds": r.lag.map(|d| d.as_secs_f64()),
                        "breached": r.breached,
                    })).collect::<Vec<_>>()),
                }),
            );
        }
        #[cfg(feature = "postgres")]
        if let Some(agent) = &parts.pg_agent {
            replication.insert(
                "agent".into(),
                serde_json::json!({
                    "status": agent.status(),
                    "paused": agent.is_paused(),
                    "report": json(&agent.agent_status()),
                }),
            );
        }
        #[cfg(feature = "sentinel")]
        if let Some(sentinel) = &parts.sentinel {
            replication.insert(
                "sentinel".into(),
                serde_json::json!({
                    "master_name": sentinel.master_name(),
                    "status": sentinel.status(),
                }),
            );
        }
        #[cfg(all(unix, feature = "files"))]
        if !parts.files.is_empty() {
            let files: Vec<Value> = parts
                .files
                .iter()
                .map(|f| serde_json::json!({ "name": f.name(), "status": f.status() }))
                .collect();
            replication.insert("files".into(), Value::Array(files));
        }
        let backups = parts.backups.as_ref().map(|b| json(&b.statuses()));
        let uptime_seconds = inner
            .started_at
            .get()
            .and_then(|at| at.elapsed().ok())
            .map_or(0.0, |d| d.as_secs_f64());
        NodeStatus {
            node: inner.node_id.to_string(),
            cluster: inner.cluster.clone(),
            phase: self.phase(),
            ready: self.is_ready(),
            paused: self.is_paused(),
            role: if single {
                "single"
            } else if lead.is_some() {
                "leader"
            } else {
                "follower"
            }
            .to_owned(),
            token: lead.map(|l| l.token.get()),
            leader,
            members,
            level: LevelView {
                summary: level.summary(),
                level: level.level,
                configured: level.configured,
                target_percent: level.target_percent,
                reasons: level.reasons,
            },
            health: health.as_ref().map(json),
            breakers,
            failover,
            replication: Value::Object(replication),
            backups,
            kpis,
            uptime_seconds,
            recent_events,
        }
    }
}
