//! `HaEvent`: every state change the ha crates report, with when and where it happened.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::id::{FencingToken, NodeId};
use crate::status::{CircuitState, Status};

/// Why a node stopped being the leader.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LossReason {
    /// The node gave the lease up on purpose (step-down or shutdown).
    SteppedDown,
    /// The local validity deadline passed without a successful renewal (store unreachable,
    /// process paused, renewals too slow).
    Expired,
    /// The store says another holder or a newer token owns the lease.
    Superseded,
    /// The node's eligibility hook said it may no longer lead (e.g. it is unhealthy).
    NotEligible,
}

impl LossReason {
    /// A stable snake-case name, used in logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            LossReason::SteppedDown => "stepped_down",
            LossReason::Expired => "expired",
            LossReason::Superseded => "superseded",
            LossReason::NotEligible => "not_eligible",
        }
    }
}

/// How urgently a person should hear about an event, so alert routing needs no guesswork.
///
/// The seed's table: **critical** — a service down, a database failover, disaster recovery
/// invoked; **warning** — high replication lag, a failed backup, degraded performance;
/// **info** — a completed failover or backup, health recovered.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Page someone now.
    Critical,
    /// Look at it soon.
    Warning,
    /// For the record.
    Info,
}

impl Severity {
    /// A stable lower-case name (`critical`, `warning`, `info`), the `severity` metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// How much high availability a node delivers: the seed's levels, each with the availability
/// it targets.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum HaLevel {
    /// Nothing watches the service.
    None,
    /// Health checks (99.5 %).
    Basic,
    /// Health checks, automatic failover and replication (99.9 %).
    Standard,
    /// All of the above, an election with at least two live members, and disaster recovery
    /// with a verified backup inside its RPO (99.99 %).
    Enterprise,
}

impl HaLevel {
    /// Every level, lowest first.
    pub const ALL: [HaLevel; 4] = [
        HaLevel::None,
        HaLevel::Basic,
        HaLevel::Standard,
        HaLevel::Enterprise,
    ];

    /// A stable lower-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            HaLevel::None => "none",
            HaLevel::Basic => "basic",
            HaLevel::Standard => "standard",
            HaLevel::Enterprise => "enterprise",
        }
    }

    /// The availability the level targets, in percent (`None` targets nothing: 0).
    pub const fn availability_target_percent(self) -> f64 {
        match self {
            HaLevel::None => 0.0,
            HaLevel::Basic => 99.5,
            HaLevel::Standard => 99.9,
            HaLevel::Enterprise => 99.99,
        }
    }

    /// The level as a number (0 = none … 3 = enterprise), the `ha_level` gauge's value.
    pub const fn rank(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for HaLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened in the high-availability machinery.
///
/// Every variant carries `at` (wall-clock time, for humans and audit logs) and `node` (the node
/// that observed or caused it). New variants may be added in any release, so matches need a
/// wildcard arm.
#[derive(Clone, PartialEq, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum HaEvent {
    /// This node became the leader for `key`.
    LeadershipAcquired {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The new leader.
        node: NodeId,
        /// The lease key (which leadership).
        key: String,
        /// The fencing token of this term.
        token: FencingToken,
    },
    /// This node stopped being the leader for `key`.
    LeadershipLost {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The former leader.
        node: NodeId,
        /// The lease key.
        key: String,
        /// The fencing token of the term that ended.
        token: FencingToken,
        /// Why it ended.
        reason: LossReason,
    },
    /// A component's health status changed.
    HealthChanged {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that ran the check.
        node: NodeId,
        /// The checked component.
        component: String,
        /// The status before.
        from: Status,
        /// The status now.
        to: Status,
        /// Why, when known (e.g. "dependency postgres is unhealthy").
        cause: Option<String>,
    },
    /// An anomaly rule fired for a component (reported, not a status change).
    AnomalyDetected {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that detected it.
        node: NodeId,
        /// The component.
        component: String,
        /// The rule's name, e.g. `latency_over_p95`.
        rule: String,
        /// What was observed.
        detail: String,
    },
    /// A circuit breaker changed state.
    CircuitStateChanged {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node running the breaker.
        node: NodeId,
        /// The breaker's name.
        circuit: String,
        /// The state before.
        from: CircuitState,
        /// The state now.
        to: CircuitState,
    },
    /// A failover of a component began.
    FailoverStarted {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The leader running the failover.
        node: NodeId,
        /// The component failed over.
        component: String,
        /// The leader's fencing token, if it leads by election.
        token: Option<FencingToken>,
    },
    /// A failover finished and was verified.
    FailoverCompleted {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The leader that ran it.
        node: NodeId,
        /// The component failed over.
        component: String,
        /// The leader's fencing token.
        token: Option<FencingToken>,
        /// How long it took.
        #[serde(serialize_with = "ser::human")]
        duration: Duration,
    },
    /// A failover failed (after any rollback was attempted).
    FailoverFailed {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The leader that ran it.
        node: NodeId,
        /// The component.
        component: String,
        /// The leader's fencing token.
        token: Option<FencingToken>,
        /// What went wrong.
        reason: String,
    },
    /// A failed failover was rolled back.
    FailoverRolledBack {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The leader that ran it.
        node: NodeId,
        /// The component.
        component: String,
        /// The leader's fencing token.
        token: Option<FencingToken>,
        /// Why it was rolled back.
        reason: String,
    },
    /// A failover was asked for but not run: this node did not lead, the component was in
    /// its cooldown, or the waiting queue was full. Nothing was changed.
    FailoverSkipped {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that skipped it.
        node: NodeId,
        /// The component.
        component: String,
        /// Why, e.g. "not the leader".
        reason: String,
    },
    /// A replica's lag went over its bound.
    ReplicationLagBreached {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that measured it.
        node: NodeId,
        /// The replica.
        replica: String,
        /// Lag in bytes of WAL (or replication offset), when measured.
        lag_bytes: Option<u64>,
        /// Lag in time, when measured.
        #[serde(serialize_with = "ser::human_opt")]
        lag: Option<Duration>,
    },
    /// A replica's lag came back within its bound.
    ReplicationLagRecovered {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that measured it.
        node: NodeId,
        /// The replica.
        replica: String,
        /// Lag in bytes, when measured.
        lag_bytes: Option<u64>,
        /// Lag in time, when measured.
        #[serde(serialize_with = "ser::human_opt")]
        lag: Option<Duration>,
    },
    /// A replica was promoted to primary.
    ReplicaPromoted {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The leader that promoted it.
        node: NodeId,
        /// The promoted replica.
        replica: String,
        /// The leader's fencing token.
        token: Option<FencingToken>,
    },
    /// Redis Sentinel switched a monitored master (`+switch-master`).
    RedisMasterSwitched {
        /// When it was observed.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that observed it.
        node: NodeId,
        /// The monitored master's name in Sentinel.
        master: String,
        /// The old master's `ip:port`.
        from: String,
        /// The new master's `ip:port`.
        to: String,
    },
    /// Redis Sentinel marked an instance down or up again (`+sdown`, `-sdown`, `+odown`,
    /// `-odown`).
    RedisInstanceStatus {
        /// When it was observed.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that observed it.
        node: NodeId,
        /// The monitored master's name in Sentinel.
        master: String,
        /// The instance's `ip:port`.
        instance: String,
        /// `master`, `slave` or `sentinel`.
        kind: String,
        /// Down (`+`) or up again (`-`).
        down: bool,
        /// Objectively (a quorum of sentinels agrees) rather than subjectively (one sentinel).
        objective: bool,
    },
    /// A backup was written and verified.
    BackupCompleted {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that ran it.
        node: NodeId,
        /// The backup's id.
        backup_id: String,
        /// What was backed up (e.g. `postgres`, `files`, `config`).
        kind: String,
        /// Stored size in bytes.
        bytes: u64,
        /// How long it took.
        #[serde(serialize_with = "ser::human")]
        duration: Duration,
    },
    /// A backup failed; nothing partial was kept.
    BackupFailed {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that ran it.
        node: NodeId,
        /// What was being backed up.
        kind: String,
        /// What went wrong.
        reason: String,
    },
    /// A restore finished.
    RestoreCompleted {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that ran it.
        node: NodeId,
        /// The restored backup.
        backup_id: String,
        /// How long it took (a measured RTO).
        #[serde(serialize_with = "ser::human")]
        duration: Duration,
    },
    /// The newest good backup of a kind is older than its recovery point objective.
    RpoBreached {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node that noticed.
        node: NodeId,
        /// The backup kind.
        kind: String,
        /// Age of the newest good backup (`None`: there is none).
        #[serde(serialize_with = "ser::human_opt")]
        since_last_backup: Option<Duration>,
        /// The objective.
        #[serde(serialize_with = "ser::human")]
        rpo: Duration,
    },
    /// The HA level this node delivers changed (configured parts came up or went down).
    HaLevelChanged {
        /// When.
        #[serde(serialize_with = "ser::rfc3339")]
        at: SystemTime,
        /// The node.
        node: NodeId,
        /// The level before.
        from: HaLevel,
        /// The level now.
        to: HaLevel,
        /// Why the level is not higher (empty at the configured level).
        reason: String,
    },
}

impl HaEvent {
    /// When the event happened.
    pub fn at(&self) -> SystemTime {
        match self {
            HaEvent::LeadershipAcquired { at, .. }
            | HaEvent::LeadershipLost { at, .. }
            | HaEvent::HealthChanged { at, .. }
            | HaEvent::AnomalyDetected { at, .. }
            | HaEvent::CircuitStateChanged { at, .. }
            | HaEvent::FailoverStarted { at, .. }
            | HaEvent::FailoverCompleted { at, .. }
            | HaEvent::FailoverFailed { at, .. }
            | HaEvent::FailoverRolledBack { at, .. }
            | HaEvent::FailoverSkipped { at, .. }
            | HaEvent::ReplicationLagBreached { at, .. }
            | HaEvent::ReplicationLagRecovered { at, .. }
            | HaEvent::ReplicaPromoted { at, .. }
            | HaEvent::RedisMasterSwitched { at, .. }
            | HaEvent::RedisInstanceStatus { at, .. }
            | HaEvent::BackupCompleted { at, .. }
            | HaEvent::BackupFailed { at, .. }
            | HaEvent::RestoreCompleted { at, .. }
            | HaEvent::RpoBreached { at, .. }
            | HaEvent::HaLevelChanged { at, .. } => *at,
        }
    }

    /// The node that observed or caused the event.
    pub fn node(&self) -> &NodeId {
        match self {
            HaEvent::LeadershipAcquired { node, .. }
            | HaEvent::LeadershipLost { node, .. }
            | HaEvent::HealthChanged { node, .. }
            | HaEvent::AnomalyDetected { node, .. }
            | HaEvent::CircuitStateChanged { node, .. }
            | HaEvent::FailoverStarted { node, .. }
            | HaEvent::FailoverCompleted { node, .. }
            | HaEvent::FailoverFailed { node, .. }
            | HaEvent::FailoverRolledBack { node, .. }
            | HaEvent::FailoverSkipped { node, .. }
            | HaEvent::ReplicationLagBreached { node, .. }
            | HaEvent::ReplicationLagRecovered { node, .. }
            | HaEvent::ReplicaPromoted { node, .. }
            | HaEvent::RedisMasterSwitched { node, .. }
            | HaEvent::RedisInstanceStatus { node, .. }
            | HaEvent::BackupCompleted { node, .. }
            | HaEvent::BackupFailed { node, .. }
            | HaEvent::RestoreCompleted { node, .. }
            | HaEvent::RpoBreached { node, .. }
            | HaEvent::HaLevelChanged { node, .. } => node,
        }
    }

    /// A stable snake-case name of the variant, used as the `event` metric label and in logs.
    pub const fn name(&self) -> &'static str {
        match self {
            HaEvent::LeadershipAcquired { .. } => "leadership_acquired",
            HaEvent::LeadershipLost { .. } => "leadership_lost",
            HaEvent::HealthChanged { .. } => "health_changed",
            HaEvent::AnomalyDetected { .. } => "anomaly_detected",
            HaEvent::CircuitStateChanged { .. } => "circuit_state_changed",
            HaEvent::FailoverStarted { .. } => "failover_started",
            HaEvent::FailoverCompleted { .. } => "failover_completed",
            HaEvent::FailoverFailed { .. } => "failover_failed",
            HaEvent::FailoverRolledBack { .. } => "failover_rolled_back",
            HaEvent::FailoverSkipped { .. } => "failover_skipped",
            HaEvent::ReplicationLagBreached { .. } => "replication_lag_breached",
            HaEvent::ReplicationLagRecovered { .. } => "replication_lag_recovered",
            HaEvent::ReplicaPromoted { .. } => "replica_promoted",
            HaEvent::RedisMasterSwitched { .. } => "redis_master_switched",
            HaEvent::RedisInstanceStatus { .. } => "redis_instance_status",
            HaEvent::BackupCompleted { .. } => "backup_completed",
            HaEvent::BackupFailed { .. } => "backup_failed",
            HaEvent::RestoreCompleted { .. } => "restore_completed",
            HaEvent::RpoBreached { .. } => "rpo_breached",
            HaEvent::HaLevelChanged { .. } => "ha_level_changed",
        }
    }

    /// How urgently a person should hear about this event (see [`Severity`]).
    pub fn severity(&self) -> Severity {
        use Severity::{Critical, Info, Warning};
        match self {
            HaEvent::HealthChanged { to, .. } => match to {
                Status::Unhealthy => Critical,
                Status::Degraded | Status::Unknown => Warning,
                Status::Healthy => Info,
            },
            HaEvent::CircuitStateChanged { to, .. } => match to {
                CircuitState::Open => Warning,
                _ => Info,
            },
            HaEvent::RedisInstanceStatus { down, .. } => {
                if *down {
                    Warning
                } else {
                    Info
                }
            }
            HaEvent::HaLevelChanged { from, to, .. } => {
                if to < from {
                    Warning
                } else {
                    Info
                }
            }
            // A database failover, a failover that did not complete, disaster recovery.
            HaEvent::FailoverStarted { .. }
            | HaEvent::FailoverFailed { .. }
            | HaEvent::ReplicaPromoted { .. }
            | HaEvent::RedisMasterSwitched { .. }
            | HaEvent::RestoreCompleted { .. } => Critical,
            HaEvent::LeadershipLost { .. }
            | HaEvent::AnomalyDetected { .. }
            | HaEvent::FailoverRolledBack { .. }
            | HaEvent::FailoverSkipped { .. }
            | HaEvent::ReplicationLagBreached { .. }
            | HaEvent::BackupFailed { .. }
            | HaEvent::RpoBreached { .. } => Warning,
            HaEvent::LeadershipAcquired { .. }
            | HaEvent::FailoverCompleted { .. }
            | HaEvent::ReplicationLagRecovered { .. }
            | HaEvent::BackupCompleted { .. } => Info,
        }
    }
}

/// How events render times and durations in JSON: RFC 3339 instants (UTC, milliseconds)
/// and human durations (`1s 500ms`), as logs and `/status` show them.
mod ser {
    use std::time::{Duration, SystemTime};

    use serde::Serializer;

    pub(super) fn rfc3339<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*at))
    }

    pub(super) fn human<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub(super) fn human_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => human(d, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_and_serialized_tag_agree_with_the_variant() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(7);
        let e = HaEvent::HealthChanged {
            at,
            node: NodeId::new("n1"),
            component: "postgres".into(),
            from: Status::Healthy,
            to: Status::Unhealthy,
            cause: None,
        };
        assert_eq!(e.at(), at);
        assert_eq!(e.node().as_str(), "n1");
        assert_eq!(e.name(), "health_changed");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["event"], "health_changed");
        assert_eq!(json["to"], "unhealthy");
        assert_eq!(json["at"], "1970-01-01T00:00:07.000Z");
        assert_eq!(e.severity(), Severity::Critical);
    }

    #[test]
    fn severities_follow_the_alert_table() {
        let at = SystemTime::UNIX_EPOCH;
        let node = NodeId::new("n1");
        let health = |to| HaEvent::HealthChanged {
            at,
            node: node.clone(),
            component: "db".into(),
            from: Status::Healthy,
            to,
            cause: None,
        };
        assert_eq!(health(Status::Unhealthy).severity(), Severity::Critical);
        assert_eq!(health(Status::Degraded).severity(), Severity::Warning);
        assert_eq!(health(Status::Healthy).severity(), Severity::Info);
        let lag = HaEvent::ReplicationLagBreached {
            at,
            node: node.clone(),
            replica: "r1".into(),
            lag_bytes: Some(1),
            lag: None,
        };
        assert_eq!(lag.severity(), Severity::Warning);
        let done = HaEvent::FailoverCompleted {
            at,
            node: node.clone(),
            component: "db".into(),
            token: None,
            duration: Duration::ZERO,
        };
        assert_eq!(done.severity(), Severity::Info);
        let restore = HaEvent::RestoreCompleted {
            at,
            node: node.clone(),
            backup_id: "b".into(),
            duration: Duration::ZERO,
        };
        assert_eq!(restore.severity(), Severity::Critical);
        let down = HaEvent::HaLevelChanged {
            at,
            node,
            from: HaLevel::Enterprise,
            to: HaLevel::Standard,
            reason: "only 1 live member".into(),
        };
        assert_eq!(down.severity(), Severity::Warning);
        assert_eq!(serde_json::to_value(&down).unwrap()["to"], "standard");
        assert_eq!(HaLevel::Enterprise.availability_target_percent(), 99.99);
        assert!(HaLevel::ALL.windows(2).all(|w| w[0] < w[1]));
    }
}
