//! Identities: which node, and which leadership term (fencing token).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The identity of one node (process) taking part in high availability.
///
/// Cheap to clone (shared string). Two nodes must never share an id: leases, fencing and
/// audit history are keyed by it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Makes a node id from any string.
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(Arc::from(id.as_ref()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:?})", &*self.0)
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for NodeId {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

/// A fencing token: a number that grows with every change of leadership.
///
/// Every acquisition of a lease yields a token greater than every token handed out before for
/// the same key — also after the lease store restarted. A downstream system that remembers the
/// highest token it has accepted can reject a write from a deposed leader, whose token is
/// smaller (see [`FencingToken::admits`]).
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The token's number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Whether a write carrying `self` may proceed when `highest_seen` is the greatest token
    /// the guarded resource has accepted so far: only a token at least as new is admitted.
    pub fn admits(self, highest_seen: Option<FencingToken>) -> bool {
        highest_seen.is_none_or(|seen| self >= seen)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_serde_as_a_plain_string() {
        let id = NodeId::new("node-a");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"node-a\"");
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        assert_eq!(id.to_string(), "node-a");
    }

    #[test]
    fn stale_token_is_not_admitted() {
        assert!(FencingToken(5).admits(None));
        assert!(FencingToken(5).admits(Some(FencingToken(5))));
        assert!(FencingToken(6).admits(Some(FencingToken(5))));
        assert!(!FencingToken(4).admits(Some(FencingToken(5))));
    }
}
