//! The `LeaseStore` trait: the compare-and-set operations every election backend provides.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use ha_core::{FencingToken, NodeId};
use tokio::sync::broadcast;

use crate::error::{Error, Result};

/// Who holds a lease, as the store sees it at the moment of a read or a refused acquire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The holder.
    pub holder: NodeId,
    /// The holder's fencing token.
    pub token: FencingToken,
    /// Time left before the lease expires, by the store's clock. Only an estimate for the
    /// reader: it was true when the store answered.
    pub remaining: Duration,
}

/// The outcome of [`LeaseStore::acquire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// The lease is now ours, under this token.
    Acquired(FencingToken),
    /// Someone (possibly this same node, from an earlier life) holds an unexpired lease.
    Held(LeaseInfo),
}

/// A live member of a group, as [`LeaseStore::members`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The node.
    pub node: NodeId,
    /// What the node said about itself in its last heartbeat (address, version, zone, …).
    pub meta: BTreeMap<String, String>,
    /// Time left before the member drops out unless it beats again, by the store's clock.
    pub remaining: Duration,
}

/// A notification that a lease key changed hands or was freed, so followers can campaign at
/// once instead of waiting for their next poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseChange {
    /// The key that changed.
    pub key: String,
}

/// A stream of [`LeaseChange`]s from a store that can push them.
pub type LeaseWatch = broadcast::Receiver<LeaseChange>;

/// A store of leases: named keys, each held by at most one node at a time, with a TTL and a
/// fencing token.
///
/// To ensure correctness, an implementation must:
/// - measure time with the *store's* clock (Redis `PX`, PostgreSQL `now()`, the process's
///   monotonic clock for the in-memory store), never the client's wall clock;
/// - grant [`acquire`](Self::acquire) only if the key is free or its lease has expired, and
///   hand out a token strictly greater than every token ever returned for that key — also
///   after the store restarted and lost its data;
/// - [`renew`](Self::renew) only if the key is still held by exactly `(holder, token)` and has
///   not expired; [`release`](Self::release) only if it is still held by `(holder, token)`;
///   otherwise change nothing and return `false`;
/// - make each operation atomic (one round trip where the protocol allows) and give up after
///   `timeout` with [`Error::Timeout`].
#[async_trait]
pub trait LeaseStore: Send + Sync + Debug {
    /// A short name for logs, metrics and errors: `memory`, `redis`, `postgres`.
    fn kind(&self) -> &'static str;

    /// Takes `key` for `holder` for `ttl` if it is free or expired.
    async fn acquire(
        &self,
        key: &str,
        holder: &NodeId,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<Acquire>;

    /// Extends the lease to `ttl` from now if `(holder, token)` still holds it. `Ok(false)`
    /// means the lease is lost (expired, or someone else holds it).
    async fn renew(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<bool>;

    /// Frees the lease if `(holder, token)` still holds it. `Ok(false)`: it did not (already
    /// expired or taken), and nothing was changed.
    async fn release(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        timeout: Duration,
    ) -> Result<bool>;

    /// The current holder of `key`, if the lease is held and unexpired.
    async fn read(&self, key: &str, timeout: Duration) -> Result<Option<LeaseInfo>>;

    /// Subscribes to changes of `key` (release, takeover), if the store can push them.
    /// `Ok(None)` means it cannot: followers then poll.
    async fn watch(&self, key: &str) -> Result<Option<LeaseWatch>> {
        let _ = key;
        Ok(None)
    }

    /// Records that `node` is alive in `group` for `ttl` (store clock), with `meta`; each call
    /// replaces the previous meta and restarts the TTL. A store without membership returns
    /// [`Error::Unsupported`].
    async fn heartbeat(
        &self,
        group: &str,
        node: &NodeId,
        meta: &BTreeMap<String, String>,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<()> {
        let _ = (node, meta, ttl, timeout);
        Err(Error::Unsupported {
            store: self.kind(),
            op: "heartbeat",
            key: group.to_owned(),
        })
    }

    /// The members of `group` whose last heartbeat has not expired, sorted by node id. A store
    /// without membership returns [`Error::Unsupported`].
    async fn members(&self, group: &str, timeout: Duration) -> Result<Vec<Member>> {
        let _ = timeout;
        Err(Error::Unsupported {
            store: self.kind(),
            op: "members",
            key: group.to_owned(),
        })
    }
}

/// Runs one store operation under `timeout`, turning expiry into [`Error::Timeout`] naming the
/// store, operation and key. Every store uses this, so the rule lives in one place.
pub async fn with_timeout<T>(
    store: &'static str,
    op: &'static str,
    key: &str,
    timeout: Duration,
    operation: impl Future<Output = Result<T>>,
) -> Result<T> {
    let started = tokio::time::Instant::now();
    let outcome = tokio::time::timeout(timeout, operation).await;
    metrics::histogram!(ha_core::metric::LEASE_OP_DURATION_SECONDS, "store" => store, "op" => op)
        .record(started.elapsed().as_secs_f64());
    outcome.unwrap_or_else(|_| {
        Err(Error::Timeout {
            store,
            op,
            key: key.to_owned(),
            after: timeout,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_hung_operation_becomes_a_timeout_naming_store_op_and_key() {
        let err = with_timeout(
            "redis",
            "renew",
            "leader",
            Duration::from_millis(50),
            std::future::pending::<Result<()>>(),
        )
        .await
        .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(
            err.to_string(),
            "redis lease store: renew of `leader` timed out after 50ms"
        );
    }
}
