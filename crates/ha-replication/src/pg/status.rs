//! What the servers say about replication: the primary's view of each standby
//! (`pg_stat_replication`) and each replica's own view (recovery functions,
//! `pg_stat_wal_receiver`).

use std::time::Duration;

use serde::Serialize;
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::pg::member::PgMember;
use crate::{Error, Lsn};

/// The primary's state and its standbys.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrimaryStatus {
    /// `pg_current_wal_lsn()`.
    pub current_lsn: Lsn,
    /// The timeline the primary writes on.
    pub timeline: u32,
    /// One row of `pg_stat_replication` per connected standby.
    pub standbys: Vec<StandbyStatus>,
}

/// One connected standby as the primary sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StandbyStatus {
    /// `application_name` of its WAL receiver.
    pub application_name: String,
    /// Its address, when connected over TCP.
    pub client_addr: Option<String>,
    /// `startup`, `catchup`, `streaming`, `backup` or `stopping`.
    pub state: String,
    /// `async`, `potential`, `sync` or `quorum`.
    pub sync_state: String,
    /// Last WAL position sent.
    pub sent_lsn: Option<Lsn>,
    /// Last position the standby wrote to disk.
    pub write_lsn: Option<Lsn>,
    /// Last position the standby flushed.
    pub flush_lsn: Option<Lsn>,
    /// Last position the standby replayed.
    pub replay_lsn: Option<Lsn>,
    /// WAL bytes between the primary's current position and the standby's replay position.
    pub lag_bytes: Option<u64>,
    /// `write_lag`, `flush_lag`, `replay_lag`: NULL (None) once the standby has caught up
    /// and nothing new was written.
    pub write_lag: Option<Duration>,
    /// See `write_lag`.
    pub flush_lag: Option<Duration>,
    /// See `write_lag`.
    pub replay_lag: Option<Duration>,
    /// Time since the standby's last reply.
    pub reply_age: Option<Duration>,
    /// The replication slot it streams from, if any.
    pub slot_name: Option<String>,
    /// WAL the primary keeps for that slot, in bytes.
    pub slot_retained_bytes: Option<u64>,
}

/// A replica's own view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaStatus {
    /// `pg_is_in_recovery()`: false once promoted.
    pub in_recovery: bool,
    /// Last WAL position received and flushed by streaming.
    pub receive_lsn: Option<Lsn>,
    /// Last WAL position replayed.
    pub replay_lsn: Option<Lsn>,
    /// Time since the last replayed transaction committed on the primary. Grows while the
    /// primary is idle: on its own it is not lag (see [`crate::pg::monitor`]).
    pub last_replay_age: Option<Duration>,
    /// `pg_is_wal_replay_paused()`.
    pub replay_paused: bool,
    /// The WAL receiver, when one runs.
    pub receiver: Option<WalReceiver>,
    /// The timeline being replayed (received timeline, else the last checkpoint's).
    pub timeline: Option<u32>,
}

impl ReplicaStatus {
    /// How far its WAL reaches: the later of received and replayed (what a promotion keeps).
    pub fn position(&self) -> Option<Lsn> {
        self.receive_lsn.max(self.replay_lsn)
    }
}

/// A replica's WAL receiver (`pg_stat_wal_receiver`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalReceiver {
    /// `streaming`, `waiting`, `starting`, …
    pub status: String,
    /// The server it streams from.
    pub sender_host: Option<String>,
    /// Its port.
    pub sender_port: Option<u16>,
    /// The slot it streams from.
    pub slot_name: Option<String>,
}

fn lsn(row: &PgRow, column: &str) -> Result<Option<Lsn>, sqlx::Error> {
    row.try_get::<Option<String>, _>(column)?
        .map(|t| {
            t.parse::<Lsn>().map_err(|e| sqlx::Error::ColumnDecode {
                index: column.to_owned(),
                source: Box::new(e),
            })
        })
        .transpose()
}

fn seconds(row: &PgRow, column: &str) -> Result<Option<Duration>, sqlx::Error> {
    Ok(row
        .try_get::<Option<f64>, _>(column)?
        .map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)))
}

fn bytes(row: &PgRow, column: &str) -> Result<Option<u64>, sqlx::Error> {
    Ok(row
        .try_get::<Option<i64>, _>(column)?
        .map(|b| u64::try_from(b).unwrap_or(0)))
}

const PRIMARY_SQL: &str = "SELECT pg_current_wal_lsn()::text AS current_lsn, \
    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint AS timeline";

const STANDBYS_SQL: &str = "SELECT r.application_name, host(r.client_addr) AS client_addr, \
    r.state, r.sync_state, r.sent_lsn::text AS sent_lsn, r.write_lsn::text AS write_lsn, \
    r.flush_lsn::text AS flush_lsn, r.replay_lsn::text AS replay_lsn, \
    pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::bigint AS lag_bytes, \
    EXTRACT(EPOCH FROM r.write_lag)::float8 AS write_lag, \
    EXTRACT(EPOCH FROM r.flush_lag)::float8 AS flush_lag, \
    EXTRACT(EPOCH FROM r.replay_lag)::float8 AS replay_lag, \
    EXTRACT(EPOCH FROM now() - r.reply_time)::float8 AS reply_age, \
    s.slot_name::text AS slot_name, \
    pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS slot_retained_bytes \
    FROM pg_stat_replication r LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid \
    ORDER BY r.application_name, r.pid";

const REPLICA_SQL: &str = "SELECT pg_is_in_recovery() AS in_recovery, \
    pg_last_wal_receive_lsn()::text AS receive_lsn, \
    pg_last_wal_replay_lsn()::text AS replay_lsn, \
    EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8 AS last_replay_age, \
    CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END AS replay_paused, \
    w.status AS receiver_status, w.sender_host, w.sender_port, w.slot_name::text AS slot_name, \
    COALESCE(w.received_tli, (SELECT timeline_id FROM pg_control_checkpoint()))::bigint AS timeline \
    FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver w ON true";

impl PgMember {
    /// The primary's WAL position, timeline and standbys. Fails on a server in recovery.
    pub async fn primary_status(&self) -> Result<PrimaryStatus, Error> {
        let (current_lsn, timeline, standbys) = self
            .run(
                "reading the primary's replication state",
                |pool| async move {
                    let row = sqlx::query(PRIMARY_SQL).fetch_one(&pool).await?;
                    let current: String = row.try_get("current_lsn")?;
                    let timeline: i64 = row.try_get("timeline")?;
                    let rows = sqlx::query(STANDBYS_SQL).fetch_all(&pool).await?;
                    Ok((current, timeline, rows))
                },
            )
            .await?;
        let decode = |e: sqlx::Error| Error::Query {
            member: self.name().to_owned(),
            what: "decoding pg_stat_replication",
            detail: e.to_string(),
        };
        let standbys = standbys
            .iter()
            .map(|row| {
                Ok(StandbyStatus {
                    application_name: row.try_get("application_name")?,
                    client_addr: row.try_get("client_addr")?,
                    state: row.try_get("state")?,
                    sync_state: row.try_get("sync_state")?,
                    sent_lsn: lsn(row, "sent_lsn")?,
                    write_lsn: lsn(row, "write_lsn")?,
                    flush_lsn: lsn(row, "flush_lsn")?,
                    replay_lsn: lsn(row, "replay_lsn")?,
                    lag_bytes: bytes(row, "lag_bytes")?,
                    write_lag: seconds(row, "write_lag")?,
                    flush_lag: seconds(row, "flush_lag")?,
                    replay_lag: seconds(row, "replay_lag")?,
                    reply_age: seconds(row, "reply_age")?,
                    slot_name: row.try_get("slot_name")?,
                    slot_retained_bytes: bytes(row, "slot_retained_bytes")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(decode)?;
        Ok(PrimaryStatus {
            current_lsn: current_lsn
                .parse()
                .map_err(|e: crate::lsn::ParseLsnError| Error::Query {
                    member: self.name().to_owned(),
                    what: "reading pg_current_wal_lsn()",
                    detail: e.to_string(),
                })?,
            timeline: u32::try_from(timeline).unwrap_or(0),
            standbys,
        })
    }

    /// The replica's own view of its recovery.
    pub async fn replica_status(&self) -> Result<ReplicaStatus, Error> {
        let row = self
            .run("reading the replica's recovery state", |pool| async move {
                sqlx::query(REPLICA_SQL).fetch_one(&pool).await
            })
            .await?;
        let decode = |row: &PgRow| -> Result<ReplicaStatus, sqlx::Error> {
            let receiver_status: Option<String> = row.try_get("receiver_status")?;
            Ok(ReplicaStatus {
                in_recovery: row.try_get("in_recovery")?,
                receive_lsn: lsn(row, "receive_lsn")?,
                replay_lsn: lsn(row, "replay_lsn")?,
                last_replay_age: seconds(row, "last_replay_age")?,
                replay_paused: row.try_get("replay_paused")?,
                receiver: match receiver_status {
                    Some(status) => Some(WalReceiver {
                        status,
                        sender_host: row.try_get("sender_host")?,
                        sender_port: row
                            .try_get::<Option<i32>, _>("sender_port")?
                            .and_then(|p| u16::try_from(p).ok()),
                        slot_name: row.try_get("slot_name")?,
                    }),
                    None => None,
                },
                timeline: row
                    .try_get::<Option<i64>, _>("timeline")?
                    .and_then(|t| u32::try_from(t).ok()),
            })
        };
        decode(&row).map_err(|e| Error::Query {
            member: self.name().to_owned(),
            what: "decoding the replica's recovery state",
            detail: e.to_string(),
        })
    }
}
