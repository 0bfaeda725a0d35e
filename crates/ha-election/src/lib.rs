//! Leader election with fencing tokens.
//!
//! A [`LeaseStore`] holds named leases — each a record naming one holder, a
//! [`FencingToken`](ha_core::FencingToken) that grows with every acquisition and a renewal
//! count — changed only by compare-and-set. The [`Elector`] judges a lease's expiry on the
//! follower's own monotonic clock (Kubernetes client-go's rule), never the store's. Stores:
//! - [`MemoryLeaseStore`]: in-process, the embedded default;
//! - [`RedisLeaseStore`]: Redis standalone or behind Sentinel (fred), one Lua script round trip
//!   per operation;
//! - [`PostgresLeaseStore`]: a table, a token sequence and `LISTEN`/`NOTIFY` in PostgreSQL
//!   (sqlx);
//! - `EtcdLeaseStore` (feature `etcd`): a transaction per operation on an etcd v3 cluster,
//!   terms on etcd leases, tokens from etcd revisions, changes pushed by an etcd watch.
//!
//! Every store passes the same conformance suite ([`testing`]).
//!
//! # Features
//!
//! Each server-backed store is behind a feature, so a service compiles only the client it uses:
//! - `redis` (default): [`RedisLeaseStore`], with fred;
//! - `postgres` (default): [`PostgresLeaseStore`] and [`PgFence`], with sqlx;
//! - `etcd` (not a default): `EtcdLeaseStore`, with etcd-client. Building it runs `protoc`
//!   (Debian: `protobuf-compiler`), which is why it is not on by default.
//!
//! With `--no-default-features` the crate is [`MemoryLeaseStore`], [`MemoryFence`], the
//! [`Elector`] and the conformance suite, and compiles no client.
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
//! // Another node is refused (it expected no record), and learns who holds it.
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
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod fence;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod pg_fence;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
pub mod store;
pub mod testing;

pub use config::ElectorConfig;
pub use elector::{
    Elector, ElectorBuilder, ElectorEvent, Eligibility, LeaderInfo, MetaSource, Role,
};
pub use error::{Error, Result};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdLeaseStore, EtcdLeaseStoreOptions};
pub use fence::MemoryFence;
pub use memory::MemoryLeaseStore;
#[cfg(feature = "postgres")]
pub use pg_fence::PgFence;
#[cfg(feature = "postgres")]
pub use postgres::{Durability, PostgresLeaseStore, PostgresLeaseStoreOptions};
#[cfg(feature = "redis")]
pub use redis::{RedisLeaseStore, RedisLeaseStoreOptions};
pub use store::{
    Acquire, LeaseChange, LeaseInfo, LeaseRecord, LeaseStore, LeaseWatch, Member, with_timeout,
};
