//! The `LeaseStore` trait: the compare-and-set operations every election backend provides.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use ha_core::{FencingToken, NodeId};
use tokio::sync::broadcast;

use crate::error::{Error, Result};

/// A lease record as the store holds it: what a follower observes and what a takeover
/// compares-and-sets on. Two observations are the same record exactly when they are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseRecord {
    /// The holder (of the current term, or of the term a tombstone ended).
    pub holder: NodeId,
    /// The term's fencing token.
    pub token: FencingToken,
    /// Successful renewals of this term so far. Every renew adds one, so a follower tells a
    /// lease that is being renewed from an abandoned one without reading any clock but its own.
    pub renewals: u64,
    /// The holder released the term: the record is a tombstone that anyone who observes it may
    /// take over at once (the holder stopped acting before it released).
    pub released: bool,
}

/// A key's record, as the store answered a read or a refused acquire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The holder.
    pub holder: NodeId,
    /// The holder's fencing token.
    pub token: FencingToken,
    /// Renewals of this term so far (see [`LeaseRecord::renewals`]).
    pub renewals: u64,
    /// Whether the record is a release tombstone (see [`LeaseRecord::released`]).
    pub released: bool,
    /// Time left before the term lapses by the *store's* clock; zero once lapsed or released.
    /// Informational only: the elector never decides on it (a store's clock may step).
    pub remaining: Duration,
}

impl LeaseInfo {
    /// The record to compare-and-set on.
    pub fn record(&self) -> LeaseRecord {
        LeaseRecord {
            holder: self.holder.clone(),
            token: self.token,
            renewals: self.renewals,
            released: self.released,
        }
    }

    /// Held by `holder` in a term that was not released (it may still have lapsed).
    pub fn is_held(&self) -> bool {
        !self.released
    }
}

/// The outcome of [`LeaseStore::acquire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// The lease is now ours, under this token.
    Acquired(FencingToken),
    /// Refused: the key holds this record, not the one the caller expected (possibly held by
    /// this same node, from an earlier life or an acquire whose answer was lost).
    Held(LeaseInfo),
    /// Refused: the key has no record (the caller expected one, which the store no longer has).
    Vacant,
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

/// A store of leases: named keys, each with at most one record naming a holder, a fencing
/// token and a renewal count.
///
/// The store does **not** decide when a lease expires: followers do, on their own monotonic
/// clocks (Kubernetes client-go's rule). A follower that watched the same record stay unchanged
/// for a full TTL takes it over with [`acquire`](Self::acquire) conditional on exactly that
/// record, so a store whose clock steps forward, or that answers with stale expiries, cannot end
/// a running term early. The store's clock only estimates [`LeaseInfo::remaining`] and bounds
/// how long an abandoned record is kept.
///
/// To ensure correctness, an implementation must:
/// - grant [`acquire`](Self::acquire) with `expected: None` only if the key has **no** record,
///   and with `expected: Some(record)` only if the key's record is **exactly** `record`
///   (holder, token, renewals and released flag) — whatever the store's clock says about it;
///   otherwise change nothing and answer [`Acquire::Held`] with the record it has, or
///   [`Acquire::Vacant`] if it has none;
/// - hand out a token strictly greater than every token ever returned for that key — also
///   after the store restarted and lost its data;
/// - [`renew`](Self::renew) only if the key's record is held (not released) by exactly
///   `(holder, token)`, adding one to its renewals; [`release`](Self::release) only if it is
///   held by exactly `(holder, token)`, leaving a tombstone (`released: true`, same holder and
///   token) in its place; otherwise change nothing and return `false`;
/// - keep a record (live, lapsed or tombstone) for at least twice the `ttl` of its last write,
///   so followers that watched it can take it over by compare-and-set; it may forget it later;
/// - make each operation atomic (one round trip where the protocol allows) and give up after
///   `timeout` with [`Error::Timeout`].
#[async_trait]
pub trait LeaseStore: Send + Sync + Debug {
    /// A short name for logs, metrics and errors: `memory`, `redis`, `postgres`, `etcd`.
    fn kind(&self) -> &'static str;

    /// Takes `key` for `holder` for `ttl` if its record is exactly `expected` (`None`: if it
    /// has no record). See the trait docs.
    async fn acquire(
        &self,
        key: &str,
        holder: &NodeId,
        ttl: Duration,
        expected: Option<&LeaseRecord>,
        timeout: Duration,
    ) -> Result<Acquire>;

    /// Renews the term of `(holder, token)` for `ttl` from now (and counts the renewal) if that
    /// term still holds the key, lapsed by the store's clock or not. `Ok(false)` means the
    /// lease is lost (taken over, released, or forgotten by the store).
    async fn renew(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<bool>;

    /// Ends the term of `(holder, token)`, leaving a tombstone, if that term still holds the
    /// key. `Ok(false)`: it did not (taken over, released, forgotten), and nothing changed.
    async fn release(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        timeout: Duration,
    ) -> Result<bool>;

    /// The record of `key`, if the store has one: held (check [`LeaseInfo::remaining`] for the
    /// store's estimate of its term), or a tombstone ([`LeaseInfo::released`]).
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
