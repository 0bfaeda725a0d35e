//! `LeadershipGate`: "does this node lead right now, and with which fencing token?"

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::Error;
use crate::id::FencingToken;

/// Proof of leadership at the moment it was asked for — a snapshot, not a lease of its own.
///
/// It does not learn of a step-down, a lost renewal or a suspended machine: `valid_until` is
/// an upper bound that such events cut short. Long leader work re-asks the gate before each
/// step ([`LeadershipGate::is_leader`], or [`LeadershipGate::still_leads`] with the value it
/// holds) and passes `token` to every write, so a fence rejects what slips through.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Leadership {
    /// The fencing token of the current term; pass it to every write the leader makes so that
    /// stale leaders can be rejected downstream.
    pub token: FencingToken,
    /// The local monotonic deadline after which this node must no longer act as leader unless
    /// it has renewed. The term may end before it (see the type's docs): long-running leader
    /// work re-checks with the gate before each step; checking this field alone is not enough.
    pub valid_until: Instant,
}

impl Leadership {
    /// Whether the leadership is still valid at `now`.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.valid_until
    }
}

/// Answers whether this node is the leader, checked at call time.
///
/// Implemented by `ha-election`'s elector; consumed by failover, promotion and scheduled
/// backups so that only the leader acts, without those crates depending on `ha-election`.
///
/// To ensure correctness, an implementation must:
/// - return `Some` only while the leadership is valid, i.e. before its local deadline, which is
///   computed from when the acquire/renew request was *sent*;
/// - never return a token smaller than one it returned before.
pub trait LeadershipGate: Send + Sync + Debug {
    /// The current leadership, checked against its deadline at call time, or `None` if this
    /// node does not lead right now.
    fn is_leader(&self) -> Option<Leadership>;

    /// Whether the term `lead` came from still runs now: the gate answers a leadership with
    /// the same token (the token names the term). `false` after a step-down or a loss, even
    /// if `lead.valid_until` has not passed, and for a later term too: work started under
    /// one term does not carry over into the next one unasked.
    fn still_leads(&self, lead: &Leadership) -> bool {
        self.is_leader().is_some_and(|now| now.token == lead.token)
    }
}

/// Gives up this node's leadership on purpose, so that another node is elected: a forced
/// re-election.
///
/// Implemented by `ha-election`'s elector; used by `ha-failover`'s step-down action, so that
/// neither crate depends on the other.
///
/// To ensure correctness, an implementation must:
/// - stop acting as leader (its [`LeadershipGate`] answers `None`) *before* it gives the
///   leadership up in the shared store, so that two nodes never act at once;
/// - return `Ok` only if this node was leading and has now stopped;
/// - return [`Error::NotLeader`] if this node did not lead (there was nothing to give up).
#[async_trait]
pub trait StepDown: Send + Sync + Debug {
    /// Gives up the leadership now.
    async fn step_down(&self) -> Result<(), Error>;
}

/// A gate for single-node use: this node always leads, with one fixed token.
#[derive(Clone, Copy, Debug, Default)]
pub struct AlwaysLeader {
    token: FencingToken,
}

/// How far ahead [`AlwaysLeader`] puts its deadline on each call. It is recomputed per call,
/// so it never runs out; a bounded value keeps `Instant` arithmetic far from overflow.
const ALWAYS_LEADER_HORIZON: Duration = Duration::from_secs(24 * 60 * 60);

impl AlwaysLeader {
    /// An always-leader gate that reports `token`.
    pub const fn new(token: FencingToken) -> Self {
        Self { token }
    }
}

impl LeadershipGate for AlwaysLeader {
    fn is_leader(&self) -> Option<Leadership> {
        Some(Leadership {
            token: self.token,
            valid_until: Instant::now() + ALWAYS_LEADER_HORIZON,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn always_leader_is_valid_whenever_asked() {
        let gate: &dyn LeadershipGate = &AlwaysLeader::new(FencingToken(7));
        let first = gate.is_leader().unwrap();
        assert_eq!(first.token, FencingToken(7));
        tokio::time::advance(ALWAYS_LEADER_HORIZON * 3).await;
        let later = gate.is_leader().unwrap();
        assert!(later.is_valid_at(Instant::now()));
        assert!(!first.is_valid_at(Instant::now()), "an old proof expires");
    }
}
