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
use crate::store::{Acquire, LeaseChange, LeaseInfo, LeaseStore, LeaseWatch, Member, with_timeout};

const KIND: &str = "memory";

/// Leases kept in this process's memory, timed by tokio's monotonic clock.
///
/// This is the embedded default when all electors live in one process (several tasks or
/// components competing for one role), and it is exact under `tokio::time::pause()`, which
/// makes it the store for deterministic model tests. Clones share the same leases.
///
/// Tokens start at 1 and grow per key for the life of the store; the store does not outlive
/// its process, and neither do the leases it grants.
#[derive(Clone, Debug)]
pub struct MemoryLeaseStore {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<LeaseChange>,
}

#[derive(Debug, Default)]
struct State {
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
    holder: NodeId,
    token: FencingToken,
    expires_at: Instant,
}

impl Entry {
    fn live_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }

    fn info(&self, now: Instant) -> LeaseInfo {
        LeaseInfo {
            holder: self.holder.clone(),
            token: self.token,
            remaining: self.expires_at.saturating_duration_since(now),
        }
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
        f(&mut state, Instant::now())
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
        timeout: Duration,
    ) -> Result<Acquire> {
        with_timeout(KIND, "acquire", key, timeout, async {
            let outcome = self.with_state(|state, now| {
                if let Some(entry) = state.leases.get(key).filter(|e| e.live_at(now)) {
                    return Acquire::Held(entry.info(now));
                }
                let last = state.last_token.entry(key.to_owned()).or_insert(0);
                *last += 1;
                let token = FencingToken(*last);
                state.leases.insert(
                    key.to_owned(),
                    Entry {
                        holder: holder.clone(),
                        token,
                        expires_at: now + ttl,
                    },
                );
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
            Ok(
                self.with_state(|state, now| match state.leases.get_mut(key) {
                    Some(e) if e.live_at(now) && e.holder == *holder && e.token == token => {
                        e.expires_at = now + ttl;
                        true
                    }
                    _ => false,
                }),
            )
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
            let released = self.with_state(|state, _| {
                let ours = state
                    .leases
                    .get(key)
                    .is_some_and(|e| e.holder == *holder && e.token == token);
                if ours {
                    state.leases.remove(key);
                }
                ours
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
            Ok(self.with_state(|state, now| {
                state
                    .leases
                    .get(key)
                    .filter(|e| e.live_at(now))
                    .map(|e| e.info(now))
            }))
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
