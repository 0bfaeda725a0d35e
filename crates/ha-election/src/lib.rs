//! Leader election with fencing tokens.
//!
//! A [`LeaseStore`] holds named leases — each held by at most one node, with a TTL measured by
//! the store's own clock and a [`FencingToken`](ha_core::FencingToken) that grows with every
//! acquisition. Stores:
//! - [`MemoryLeaseStore`]: in-process, the embedded default;
//! - [`RedisLeaseStore`]: Redis standalone or behind Sentinel (fred), one Lua script round trip
//!   per operation, timed by Redis's `PX` expiry;
//! - [`PostgresLeaseStore`]: a table, a token sequence and `LISTEN`/`NOTIFY` in PostgreSQL
//!   (sqlx), timed by the database's `now()`.
//!
//! Every store passes the same conformance suite ([`testing`]).
//!
//! ```
//! use std::time::Duration;
//! use ha_core::NodeId;
//! use ha_election::{Acquire, LeaseStore, MemoryLeaseStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), ha_election::Error> {
//! let store = MemoryLeaseStore::new();
//! let ttl = Duration::from_secs(2);
//! let timeout = Duration::from_millis(500);
//! let Acquire::Acquired(token) = store.acquire("orders/leader", &NodeId::new("a"), ttl, None, timeout).await? else {
//!     unreachable!("a fresh store has no holder");
//! };
//! // Another node is refused while the lease lives, and learns who holds it.
//! let Acquire::Held(info) = store.acquire("orders/leader", &NodeId::new("b"), ttl, None, timeout).await? else {
//!     unreachable!("the lease is held");
//! };
//! assert_eq!((info.holder.as_str(), info.token), ("a", token));
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod elector;
pub mod error;
pub mod fence;
pub mod memory;
pub mod pg_fence;
pub mod postgres;
pub mod redis;
pub mod store;
pub mod testing;

pub use config::ElectorConfig;
pub use elector::{Elector, ElectorBuilder, ElectorEvent, Eligibility, LeaderInfo, Role};
pub use error::{Error, Result};
pub use fence::MemoryFence;
pub use memory::MemoryLeaseStore;
pub use pg_fence::PgFence;
pub use postgres::{PostgresLeaseStore, PostgresLeaseStoreOptions};
pub use redis::RedisLeaseStore;
pub use store::{
    Acquire, LeaseChange, LeaseInfo, LeaseRecord, LeaseStore, LeaseWatch, Member, with_timeout,
};
