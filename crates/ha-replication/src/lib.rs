//! Replication monitoring and safe promotion: PostgreSQL streaming replication (lag, and the
//! promotion of the best replica), and Redis Sentinel (who is master, what Sentinel says).
//!
//! ```no_run
//! use std::sync::Arc;
//! use ha_core::{AlwaysLeader, Component, ComponentContext, EventBus, FencingToken, NodeId};
//! use ha_replication::pg::{CommandFence, LagConfig, PgAgent, PgAgentConfig, PgMember,
//!     PgReplicationMonitor, PromoteConfig, Promoter};
//!
//! # async fn demo() -> Result<(), ha_replication::Error> {
//! let bus = EventBus::default();
//! let primary = PgMember::new("pg0", "postgres://postgres@10.0.0.1:5432/postgres")?;
//! let replicas = vec![
//!     PgMember::new("pg1", "postgres://postgres@10.0.0.2:5432/postgres")?,
//!     PgMember::new("pg2", "postgres://postgres@10.0.0.3:5432/postgres")?.priority(0),
//! ];
//! let monitor = PgReplicationMonitor::new(primary.clone(), replicas.clone(), LagConfig::default())?;
//! // A component: the node starts it with its context (node, bus, leadership, shutdown); it
//! // then samples every second and publishes lag breaches and recoveries on the bus.
//! let ctx = ComponentContext::standalone("node-a").with_bus(bus.clone());
//! monitor.start(ctx).await.expect("started once");
//! let sample = monitor.sample().await?; // one sample on demand
//! for replica in &sample.replicas {
//!     println!("{}: {:?} bytes, {:?} behind", replica.replica, replica.lag_bytes, replica.lag);
//! }
//!
//! // Beside each database, an agent keeps its role in line with this node's leadership (the
//! // node's elector is `ctx.leadership`): it promotes a replica when the node leads and
//! // demotes its own primary before the leadership deadline when it does not.
//! let agent = PgAgent::new(primary.clone(), PgAgentConfig::default())?;
//! agent.start(ComponentContext::standalone("node-a")).await.expect("started once");
//!
//! // Later, when the primary is gone, on the leader (the elector is the gate in production):
//! let promoter = Promoter::new(
//!     PromoteConfig::default(),
//!     Arc::new(AlwaysLeader::new(FencingToken(7))),
//!     // A primary that does not answer is fenced from outside (power, network) first.
//!     Arc::new(CommandFence::new("/usr/local/bin/fence-db-host", ["--power-off"])),
//! )?
//! .with_bus(NodeId::new("node-a"), bus);
//! let last = monitor.last_sample();
//! let report = promoter
//!     .promote_best(&primary, &replicas, last.as_ref().map(|s| &s.primary))
//!     .await?;
//! println!("promoted {} in {:?}; {} needs pg_rewind", report.promoted, report.promote_time,
//!     report.needs_rewind);
//! # Ok(())
//! # }
//! ```
//!
//! # What is here
//!
//! - [`pg`] — [`PgMember`] (a server with a small lazy pool and a timeout on every query),
//!   [`pg::status`] (the primary's `pg_stat_replication` with slot retention, each replica's
//!   recovery view), [`PgReplicationMonitor`] (lag in bytes and time measured on WAL
//!   positions, so an idle primary shows no lag; breach/recovery events with hysteresis), and
//!   [`Promoter`] (leader only, old primary down or fenced, most advanced eligible replica,
//!   proof of a write, the others re-pointed; every refusal has a reason). The monitor is an
//!   [`ha_core::Component`] (`postgres-replication`) started with the node's
//!   [`ha_core::ComponentContext`].
//! - [`PgAgent`] — the component beside one database (`postgres-agent`): promotes it when
//!   this node leads and it is an eligible replica, and demotes it *itself* before the
//!   leadership deadline when this node does not lead (read-only plus terminated sessions,
//!   else PostgreSQL is stopped); see [`pg::agent`] for the mechanism and what is still open.
//! - [`sentinel`] — [`SentinelMonitor`]: the master a quorum of sentinels names at the newest
//!   config epoch (confirmed with `ROLE`), replicas and sentinels by field name, `CKQUORUM`
//!   from every sentinel, a manual failover sent once (an unknown outcome is its own error),
//!   and Sentinel's announcements as `HaEvent`s once started as a [`ha_core::Component`]
//!   (`redis-sentinel`) — a keepalive notices a half-open subscription, and a missed switch
//!   is caught up from the quorum view, never backwards. [`sentinel::switched_to`] maps a
//!   switch to the address every process should follow.
//! - [`files`] — [`FileReplicator`]: one-way mirror of a source directory onto a target:
//!   copies only what changed (size+mtime fast path, SHA-256 to confirm), writes each file to
//!   a temporary file, fsyncs and renames it, then re-hashes it on the target; copies links as
//!   links and refuses those that would leave the tree; deletes on the target only within
//!   safety limits (never for an empty or partly unreadable source, at most `max_deletions`
//!   per run); keeps a manifest on the target so that `verify_target` finds target-side
//!   corruption. Unix only; [`SyncTarget`] is the seam for a remote target (only the local
//!   one, [`LocalTarget`], is built; no transport compression yet). [`FileSync`] is the
//!   component that runs a replicator every interval on a blocking thread.
//! - [`Lsn`] — WAL positions; [`Error`] — the error type of the PostgreSQL and Sentinel parts
//!   ([`FileSyncError`] for files).
//!
//! # Features
//!
//! Each part is behind a feature, all on by default, so a service compiles only the clients
//! it uses:
//! - `postgres`: [`pg`] — the monitor, the promoter and [`PgAgent`] (sqlx);
//! - `sentinel`: [`sentinel`] — [`SentinelMonitor`] (fred);
//! - `files`: [`files`] — file replication (ring, nix; Unix only).
//!
//! With `--no-default-features` the crate is [`Lsn`] and [`Error`] only.

pub mod error;
#[cfg(all(unix, feature = "files"))]
pub mod files;
pub mod lsn;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "sentinel")]
pub mod sentinel;

pub use error::Error;
#[cfg(all(unix, feature = "files"))]
pub use files::{
    FileReplicator, FileSync, FileSyncConfig, FileSyncError, LocalTarget, SyncReport, SyncTarget,
};
pub use lsn::Lsn;
#[cfg(feature = "postgres")]
pub use pg::{LagConfig, PgAgent, PgMember, PgReplicationMonitor, Promoter};
#[cfg(feature = "sentinel")]
pub use sentinel::SentinelMonitor;
