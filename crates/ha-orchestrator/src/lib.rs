//! The `ha` node: one builder, one config file and one binary that run election, health
//! checks, failover, replication and backups together in one process, with an HTTP API and
//! an operator's CLI.
//!
//! - [`HaNode::builder`] composes the parts (application code); [`HaConfig`] is the same in
//!   TOML with environment overrides (`ha-node --config ha.toml`).
//! - [`HaNode::start`] starts every component with one [`ha_core::ComponentContext`] —
//!   election → health → failover → replication → DR → your components — then serves the
//!   HTTP API ([`http`]); [`HaNode::shutdown`] undoes it in reverse, releasing leadership
//!   first.
//! - Every [`ha_core::HaEvent`] on the node's bus becomes a `tracing` line at its
//!   [`ha_core::Severity`] and the `ha_events_total{event,severity}` counter; the HA level
//!   ([`level`]) is recomputed from what is configured and what is true now.
//! - `hactl` talks to nodes' APIs: `list`, `status`, `switchover`, `pause`, `resume`,
//!   `history`, `backup`.
//!
//! The crate owns no algorithm: elections, checks, failovers, replication and backups are
//! the other crates'; this one composes them and shows what they do.
//!
//! # Features
//!
//! Each backend is a feature, forwarded under the same name to the crates that have it, all
//! on by default:
//! - `redis`: the Redis lease store (`redis://`, `redis+sentinel://`) and the `redis` check;
//! - `postgres`: the PostgreSQL lease store, the `postgres` check, replication monitoring,
//!   promotion and the agent (`[replication.postgres]`, `[replication.agent]`);
//! - `http`: the `http` check and the `http` failover action;
//! - `system`: the `cpu` and `memory` checks;
//! - `command`: the `command` failover action;
//! - `sentinel`: Redis Sentinel monitoring (`[replication.sentinel]`,
//!   `HaNodeBuilder::follow_redis_master`);
//! - `files`: directory replication (`[[replication.files]]`);
//! - `etcd` (**not** a default): the etcd lease store (`etcd://host:port[,host:port…]`).
//!   Building it runs `protoc` (Debian: `protobuf-compiler`), so it is opt-in.
//!
//! With `--no-default-features` the node keeps the in-memory lease store, the checker with
//! its TCP, command, disk and closure checks, the failover manager with its step-down and
//! router actions, backups, the HTTP API and `hactl`. A config that names a left-out backend
//! is refused with [`Error::Unsupported`] naming the feature.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use ha_election::{ElectorConfig, MemoryLeaseStore};
//! use ha_health::{CheckConfig, CheckResult, FnCheck};
//! use ha_orchestrator::HaNode;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), ha_orchestrator::Error> {
//! let store = Arc::new(MemoryLeaseStore::new());
//! let node = HaNode::builder()
//!     .node_id("node-a")
//!     .cluster("orders")
//!     .election_with(store, ElectorConfig::with_ttl("ignored", Duration::from_secs(2), Duration::from_millis(200)))
//!     .check(
//!         FnCheck::new("api", || async { CheckResult::healthy("ok") }),
//!         CheckConfig::default().interval(Duration::from_secs(1)),
//!     )
//!     .http("127.0.0.1:0".parse().unwrap())
//!     .build()?;
//! node.start().await?;
//! println!("API on http://{}", node.http_addr().unwrap());
//! node.shutdown().await; // not ready, leadership released, components stopped, API closed
//! # Ok(())
//! # }
//! ```

mod admin;
mod builder;
pub mod config;

mod error;
pub mod http;
pub mod level;
mod node;
mod secret;
mod status;

pub use builder::{EventHook, HaNodeBuilder, MetricsRender, PG_CONNINFO_META};
pub use config::HaConfig;

pub use error::Error;
pub use level::LevelReport;
pub use node::{HaNode, NodeGate, NodeStepDown, Phase, wait_for_signal};
pub use secret::{Redactor, Secret};
pub use status::{Kpis, LeaderView, LevelView, MemberView, NodeStatus};
