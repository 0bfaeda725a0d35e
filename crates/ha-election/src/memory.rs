//! `MemoryLeaseStore`: the in-process lease store, for single-process services and
//! deterministic tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use ha_core::{FencingToken, NodeId};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::error::Result;
use crate::store::{
    Acquire, LeaseChange, LeaseInfo, LeaseRecord, LeaseStore, LeaseWatch, Member, with_timeout,
};

const KIND: &str = "memory";

/// Leases kept in this process's memory, timed by tokio's monotonic clock.
///
/// This is the embedded default when all electors live in one process (several tasks or
/// components competing for one role), and it is exact under `tokio::time::pause()`, which
/// makes it the store for deterministic model tests. Clones share the same leases.
///
/// Tokens start at 1 and grow per key for the life of the store; the store does not outlive
/// its process, and neither do the leases it grants. A record is forgotten `2 × ttl` after its
/// last write, as the Redis store's are.
///
/// [`testing::lose_records`](crate::testing::lose_records) and
/// [`testing::step_store_clock`](crate::testing::step_store_clock) inject the faults a real
/// store has (data loss, a clock step) for model tests.
#[derive(Clone, Debug)]
pub struct MemoryLeaseStore {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<LeaseChange>,
}

#[derive(Debug, Default)]
struct State {
    /// How far the store's clock was stepped ahead of tokio's (a fault injected by tests).
    clock_offset: Duration,
    leases: HashMap<String, Entry>,
    last_token: HashMap<String, u64>,
    members: HashMap<String, BTreeMap<NodeId, Heartbeat>>,
}

/// A member's last heartbeat.
#[derive(Debug, Clone)]
struct Heartbeat {
    meta: BTreeMap<String, String>,
    expires_at: Instant,
}

#[derive(Debug, Clone)]
struct Entry {
    record: LeaseRecord,
    /// When the term lapses by the store's clock (informational).
    lapses_at: Instant,
    /// When the store forgets the record.
    forget_at: Instant,
}

impl Entry {
    fn new(record: LeaseRecord, now: Instant, ttl: Duration) -> Self {
        Self {
            record,
            lapses_at: now + ttl,
            forget_at: now + ttl * 2,
        }
    }

    fn info(&self, now: Instant) -> LeaseInfo {
        let record = &self.record;
        LeaseInfo {
            holder: record.holder.clone(),
            token: record.token,
            renewals: record.renewals,
            released: record.released,
            remaining: if record.released {
                Duration::ZERO
            } else {
                self.lapses_at.saturating_duration_since(now)
            },
        }
    }
}

impl State {
    /// The record of `key`, forgetting it first if its time is up.
    fn entry(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
        if self.leases.get(key).is_some_and(|e| e.forget_at <= now) {
            self.leases.remove(key);
        }
        self.leases.get_mut(key)
    }
}

impl Default for MemoryLeaseStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLeaseStore {
    /// An empty store.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(64);
        Self {
            state: Arc::default(),
            changes,
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State, Instant) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now() + state.clock_offset;
        f(&mut state, now)
    }

    /// Forgets every lease record (not the token counters: the real stores floor their tokens
    /// so that they keep growing across data loss, and so does this one). For fault tests.
    pub(crate) fn lose_records(&self) {
        self.with_state(|state, _| state.leases.clear());
    }

    /// Steps the store's clock forward by `by`. For fault tests.
    pub(crate) fn step_clock(&self, by: Duration) {
        self.with_state(|state, _| state.clock_offset += by);
    }

    fn notify(&self, key: &str) {
        let _ = self.changes.send(LeaseChange {
            key: key.to_owned(),
        });
    }
}

#[async_trait]
impl LeaseStore for MemoryLeaseStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn acquire(
        &self,
        key: &str,
        holder: &NodeId,
        ttl: Duration,
        expected: Option<&LeaseRecord>,
        timeout: Duration,
    ) -> Result<Acquire> {
        with_timeout(KIND, "acquire", key, timeout, async {
            let outcome = self.with_state(|state, now| {
                match (state.entry(key, now), expected) {
                    (Some(entry), Some(expected)) if entry.record == *expected => {}
                    (Some(entry), _) => return Acquire::Held(entry.info(now)),
                    (None, Some(_)) => return Acquire::Vacant,
                    (None, None) => {}
                }
                let last = state.last_token.entry(key.to_owned()).or_insert(0);
                *last += 1;
                let token = FencingToken(*last);
                let record = LeaseRecord {
                    holder: holder.clone(),
                    token,
                    renewals: 0,
                    released: false,
                };
                state
                    .leases
                    .insert(key.to_owned(), Entry::new(record, now, ttl));
                Acquire::Acquired(token)
            });
            if matches!(outcome, Acquire::Acquired(_)) {
                self.notify(key);
            }
            Ok(outcome)
        })
        .await
    }

    async fn renew(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<bool> {
        with_timeout(KIND, "renew", key, timeout, async {
            Ok(self.with_state(|state, now| match state.entry(key, now) {
                Some(e)
                    if !e.record.released
                        && e.record.holder == *holder
                        && e.record.token == token =>
                {
                    let record = LeaseRecord {
                        renewals: e.record.renewals + 1,
                        ..e.record.clone()
                    };
                    // Never shorten: an older renewal applied late must not pull the term in.
                    let renewed = Entry::new(record, now, ttl);
                    e.record = renewed.record;
                    e.lapses_at = e.lapses_at.max(renewed.lapses_at);
                    e.forget_at = e.forget_at.max(renewed.forget_at);
                    true
                }
                _ => false,
            }))
        })
        .await
    }

    async fn release(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        timeout: Duration,
    ) -> Result<bool> {
        with_timeout(KIND, "release", key, timeout, async {
            let released = self.with_state(|state, now| match state.entry(key, now) {
                Some(e)
                    if !e.record.released
                        && e.record.holder == *holder
                        && e.record.token == token =>
                {
                    e.record.released = true;
                    e.lapses_at = now;
                    true
                }
                _ => false,
            });
            if released {
                self.notify(key);
            }
            Ok(released)
        })
        .await
    }

    async fn read(&self, key: &str, timeout: Duration) -> Result<Option<LeaseInfo>> {
        with_timeout(KIND, "read", key, timeout, async {
            Ok(self.with_state(|state, now| state.entry(key, now).map(|e| e.info(now))))
        })
        .await
    }

    async fn watch(&self, _key: &str) -> Result<Option<LeaseWatch>> {
        Ok(Some(self.changes.subscribe()))
    }

    async fn heartbeat(
        &self,
        group: &str,
        node: &NodeId,
        meta: &BTreeMap<String, String>,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<()> {
        with_timeout(KIND, "heartbeat", group, timeout, async {
            self.with_state(|state, now| {
                let members = state.members.entry(group.to_owned()).or_default();
                // Drop the dead while we are here, so the map stays bounded by live nodes.
                members.retain(|_, beat| now < beat.expires_at);
                members.insert(
                    node.clone(),
                    Heartbeat {
                        meta: meta.clone(),
                        expires_at: now + ttl,
                    },
                );
            });
            Ok(())
        })
        .await
    }

    async fn members(&self, group: &str, timeout: Duration) -> Result<Vec<Member>> {
        with_timeout(KIND, "members", group, timeout, async {
            Ok(self.with_state(|state, now| {
                state
                    .members
                    .get(group)
                    .into_iter()
                    .flatten()
                    .filter(|(_, beat)| now < beat.expires_at)
                    .map(|(node, beat)| Member {
                        node: node.clone(),
                        meta: beat.meta.clone(),
                        remaining: beat.expires_at.saturating_duration_since(now),
                    })
                    .collect()
            }))
        })
        .await
    }
}
