//! The names of every metric the ha crates record; all start with `ha_`.
//!
//! Names live here, in one place, so that dashboards and alerts have one list to follow and two
//! crates never record the same thing under two names. Units are in the name (`_seconds`,
//! `_bytes`); counters end in `_total`.

/// Counter, label `event`: events published on the bus.
pub const EVENTS_PUBLISHED_TOTAL: &str = "ha_events_published_total";
/// Counter: events dropped for subscribers that lagged.
pub const EVENTS_MISSED_TOTAL: &str = "ha_events_missed_total";

/// Gauge, label `key`: 1 while this node leads, else 0.
pub const ELECTION_IS_LEADER: &str = "ha_election_is_leader";
/// Counter, labels `key`, `change` (`acquired`/`lost`), `reason`: leadership changes.
pub const ELECTION_TRANSITIONS_TOTAL: &str = "ha_election_transitions_total";
/// Counter, labels `store`, `op`: lease store operations that failed or timed out.
pub const ELECTION_STORE_ERRORS_TOTAL: &str = "ha_election_store_errors_total";
/// Gauge, label `key`: the current fencing token.
pub const FENCING_TOKEN: &str = "ha_fencing_token";
/// Histogram, labels `store`, `op`: lease store round-trip time.
pub const LEASE_OP_DURATION_SECONDS: &str = "ha_lease_op_duration_seconds";

/// Gauge, label `component`: 0 healthy, 1 degraded, 2 unknown, 3 unhealthy (see
/// [`crate::Status::badness`]).
pub const HEALTH_STATUS: &str = "ha_health_status";
/// Histogram, label `check`: health check latency.
pub const HEALTH_CHECK_DURATION_SECONDS: &str = "ha_health_check_duration_seconds";
/// Counter, label `check`: health check runs that failed (including timeouts).
pub const HEALTH_CHECK_FAILURES_TOTAL: &str = "ha_health_check_failures_total";
/// Counter, labels `check`, `rule`: anomalies detected.
pub const ANOMALIES_TOTAL: &str = "ha_anomalies_total";

/// Gauge, label `circuit`: 0 closed, 1 half-open, 2 open.
pub const CIRCUIT_STATE: &str = "ha_circuit_state";
/// Counter, labels `circuit`, `outcome` (`success`, `failure`, `slow` — succeeded, slowly —,
/// `rejected`, `cancelled`): calls through a breaker.
pub const CIRCUIT_CALLS_TOTAL: &str = "ha_circuit_calls_total";
/// Counter, labels `circuit`, `from`, `to`: breaker state changes.
pub const CIRCUIT_TRANSITIONS_TOTAL: &str = "ha_circuit_transitions_total";
/// Counter, labels `component`, `outcome` (`completed`, `failed`, `timed_out`,
/// `verify_failed`): failovers run.
pub const FAILOVERS_TOTAL: &str = "ha_failovers_total";
/// Histogram, label `component`: failover duration (failover, verify and any rollback).
pub const FAILOVER_DURATION_SECONDS: &str = "ha_failover_duration_seconds";
/// Counter, label `component`: failure thresholds crossed (failovers asked for).
pub const FAILOVER_TRIGGERS_TOTAL: &str = "ha_failover_triggers_total";
/// Counter, labels `component`, `reason` (`not_leader`, `cooldown`, `queue_full`,
/// `shutdown`): failovers asked for and not run.
pub const FAILOVER_SKIPPED_TOTAL: &str = "ha_failover_skipped_total";
/// Counter, labels `component`, `outcome` (`rolled_back`, `failed`, `timed_out`,
/// `unsupported`): rollbacks of failovers that did not complete.
pub const FAILOVER_ROLLBACKS_TOTAL: &str = "ha_failover_rollbacks_total";
/// Gauge: failovers running now.
pub const FAILOVER_IN_FLIGHT: &str = "ha_failover_in_flight";
/// Gauge: failovers waiting for a free slot.
pub const FAILOVER_QUEUED: &str = "ha_failover_queued";

/// Gauge, label `replica`: replication lag in bytes.
pub const REPLICATION_LAG_BYTES: &str = "ha_replication_lag_bytes";
/// Gauge, label `replica`: replication lag in seconds.
pub const REPLICATION_LAG_SECONDS: &str = "ha_replication_lag_seconds";
/// Counter, label `outcome`: promotions attempted.
pub const PROMOTIONS_TOTAL: &str = "ha_promotions_total";
/// Counter, label `outcome` (`read_only`, `stopped`, `failed`): self-demotions of a primary by
/// its PostgreSQL agent.
pub const PG_AGENT_DEMOTIONS_TOTAL: &str = "ha_pg_agent_demotions_total";
/// Gauge, label `member`: the PostgreSQL agent's watchdog — 1 armed (it fences the database
/// if the agent dies or passes its deadline), 0 disarmed, -1 not running.
pub const PG_AGENT_WATCHDOG: &str = "ha_pg_agent_watchdog";
/// Counter, label `member`: synchronous-replication records the leader's agent wrote.
pub const PG_AGENT_SYNC_RECORDS: &str = "ha_pg_agent_sync_records_total";
/// Counter, label `outcome` (`rewind`, `reclone`, `start`, `failed`): databases the
/// PostgreSQL agent brought back as standbys (rejoin), or failed to.
pub const PG_AGENT_REJOINS_TOTAL: &str = "ha_pg_agent_rejoins_total";
/// Counter, label `outcome` (`restarted`, `failed`, `stepped_down`): restarts in place of a
/// led primary that was down, and leaderships given up when it stayed down.
pub const PG_AGENT_RESTARTS_TOTAL: &str = "ha_pg_agent_restarts_total";
/// Counter, labels `sync`, `outcome` (`complete`, `incomplete` — some entries failed —,
/// `failed`): file sync runs.
pub const REPLICATION_FILE_SYNCS_TOTAL: &str = "ha_replication_file_syncs_total";
/// Histogram, label `sync`: file sync run duration.
pub const REPLICATION_FILE_SYNC_DURATION_SECONDS: &str =
    "ha_replication_file_sync_duration_seconds";
/// Counter, label `sync`: files copied to the target.
pub const REPLICATION_FILE_COPIED_TOTAL: &str = "ha_replication_file_copied_total";
/// Counter, label `sync`: bytes of files copied to the target.
pub const REPLICATION_FILE_COPIED_BYTES_TOTAL: &str = "ha_replication_file_copied_bytes_total";
/// Counter, label `sync`: entries deleted from the target.
pub const REPLICATION_FILE_DELETED_TOTAL: &str = "ha_replication_file_deleted_total";
/// Counter, labels `sync`, `reason`: runs whose deletions were all refused.
pub const REPLICATION_FILE_DELETIONS_REFUSED_TOTAL: &str =
    "ha_replication_file_deletions_refused_total";
/// Counter, label `sync`: entries that failed to sync.
pub const REPLICATION_FILE_FAILURES_TOTAL: &str = "ha_replication_file_failures_total";
/// Gauge, label `sync`: problems the last target verification found (missing, modified,
/// extra or unreadable entries).
pub const REPLICATION_FILE_VERIFY_PROBLEMS: &str = "ha_replication_file_verify_problems";

/// Counter, labels `kind`, `outcome`: backups run.
pub const BACKUPS_TOTAL: &str = "ha_dr_backups_total";
/// Histogram, label `kind`: backup duration.
pub const BACKUP_DURATION_SECONDS: &str = "ha_dr_backup_duration_seconds";
/// Gauge, label `kind`: stored size of the newest backup.
pub const BACKUP_SIZE_BYTES: &str = "ha_dr_backup_bytes";
/// Gauge, labels `kind`, `source`: age of the newest verified backup (the current recovery
/// point).
pub const RPO_SECONDS: &str = "ha_dr_rpo_seconds";
/// Gauge, labels `kind`, `source`: Unix time of the newest verified backup.
pub const BACKUP_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
    "ha_dr_backup_last_success_timestamp_seconds";
/// Counter, labels `source`, `reason` (`not_leader`, `running`): scheduled backups not started.
pub const BACKUP_SKIPPED_TOTAL: &str = "ha_dr_backup_skipped_total";
/// Histogram, label `kind`: restore duration (measured recovery time).
pub const RESTORE_DURATION_SECONDS: &str = "ha_dr_restore_duration_seconds";
/// Counter: restarts of `ha-dr wal-stream`'s `pg_receivewal` (the server went away, or
/// streaming failed).
pub const DR_WAL_STREAM_RESTARTS_TOTAL: &str = "ha_dr_wal_stream_restarts_total";

/// Counter: events seen by a node, labelled `event` (its name) and `severity`.
pub const EVENTS_TOTAL: &str = "ha_events_total";
/// Gauge: the HA level the node delivers now (0 none, 1 basic, 2 standard, 3 enterprise).
pub const HA_LEVEL: &str = "ha_level";
/// Gauge: 1 while the node is ready (started, every critical check healthy), else 0.
pub const NODE_READY: &str = "ha_node_ready";
/// Gauge: 1 while automatic failover is paused for maintenance.
pub const NODE_PAUSED: &str = "ha_node_paused";

/// Every name above, for tests and exporters that want the full list.
pub const ALL: &[&str] = &[
    EVENTS_TOTAL,
    HA_LEVEL,
    NODE_READY,
    NODE_PAUSED,
    EVENTS_PUBLISHED_TOTAL,
    EVENTS_MISSED_TOTAL,
    ELECTION_IS_LEADER,
    ELECTION_TRANSITIONS_TOTAL,
    ELECTION_STORE_ERRORS_TOTAL,
    FENCING_TOKEN,
    LEASE_OP_DURATION_SECONDS,
    HEALTH_STATUS,
    HEALTH_CHECK_DURATION_SECONDS,
    HEALTH_CHECK_FAILURES_TOTAL,
    ANOMALIES_TOTAL,
    CIRCUIT_STATE,
    CIRCUIT_CALLS_TOTAL,
    CIRCUIT_TRANSITIONS_TOTAL,
    FAILOVERS_TOTAL,
    FAILOVER_DURATION_SECONDS,
    FAILOVER_TRIGGERS_TOTAL,
    FAILOVER_SKIPPED_TOTAL,
    FAILOVER_ROLLBACKS_TOTAL,
    FAILOVER_IN_FLIGHT,
    FAILOVER_QUEUED,
    REPLICATION_LAG_BYTES,
    REPLICATION_LAG_SECONDS,
    PROMOTIONS_TOTAL,
    PG_AGENT_DEMOTIONS_TOTAL,
    PG_AGENT_WATCHDOG,
    PG_AGENT_SYNC_RECORDS,
    PG_AGENT_REJOINS_TOTAL,
    PG_AGENT_RESTARTS_TOTAL,
    REPLICATION_FILE_SYNCS_TOTAL,
    REPLICATION_FILE_SYNC_DURATION_SECONDS,
    REPLICATION_FILE_COPIED_TOTAL,
    REPLICATION_FILE_COPIED_BYTES_TOTAL,
    REPLICATION_FILE_DELETED_TOTAL,
    REPLICATION_FILE_DELETIONS_REFUSED_TOTAL,
    REPLICATION_FILE_FAILURES_TOTAL,
    REPLICATION_FILE_VERIFY_PROBLEMS,
    BACKUPS_TOTAL,
    BACKUP_DURATION_SECONDS,
    BACKUP_SIZE_BYTES,
    RPO_SECONDS,
    BACKUP_LAST_SUCCESS_TIMESTAMP_SECONDS,
    BACKUP_SKIPPED_TOTAL,
    RESTORE_DURATION_SECONDS,
    DR_WAL_STREAM_RESTARTS_TOTAL,
];

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn names_are_prefixed_unique_and_prometheus_safe() {
        let mut seen = HashSet::new();
        for name in super::ALL {
            assert!(name.starts_with("ha_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
            assert!(seen.insert(name), "duplicate metric name {name}");
        }
    }
}
