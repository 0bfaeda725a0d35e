//! Fences: downstream resources that reject writes carrying a stale fencing token.
//!
//! Why a lease alone is not enough: a leader can be paused (GC, SIGSTOP, a slow disk) after it
//! checked [`Elector::is_leader`](crate::Elector::is_leader) and before its write lands. While
//! it sleeps, its lease expires and another node leads with a greater token. When the first
//! one wakes, its write is already in flight. Only the resource can stop it: it remembers the
//! greatest token it has accepted and refuses anything smaller. Every write a leader makes
//! carries its [`FencingToken`]; the resource admits it through a fence first.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use ha_core::FencingToken;

use crate::error::{Error, Result};

/// An in-process fence: the greatest token accepted so far per resource.
///
/// ```
/// use ha_core::FencingToken;
/// use ha_election::MemoryFence;
///
/// let fence = MemoryFence::default();
/// fence.admit("orders", FencingToken(7)).unwrap();   // the current leader writes
/// fence.admit("orders", FencingToken(8)).unwrap();   // a new leader takes over
/// let stale = fence.admit("orders", FencingToken(7)); // the old one wakes up
/// assert!(stale.is_err());
/// ```
#[derive(Debug, Default)]
pub struct MemoryFence {
    highest: Mutex<HashMap<String, FencingToken>>,
}

impl MemoryFence {
    /// Admits a write to `resource` under `token` if no greater token was admitted before,
    /// and records it; otherwise [`Error::StaleToken`]. Equal tokens pass: one leader makes
    /// many writes in its term.
    pub fn admit(&self, resource: &str, token: FencingToken) -> Result<()> {
        let mut highest = self.highest.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = highest.get(resource).copied();
        if !token.admits(seen) {
            tracing::warn!(resource, %token, highest = ?seen, "stale fencing token rejected");
            return Err(Error::StaleToken {
                resource: resource.to_owned(),
                token,
                highest: seen.unwrap_or(token),
            });
        }
        highest.insert(resource.to_owned(), token);
        Ok(())
    }

    /// The greatest token admitted for `resource`.
    pub fn highest(&self, resource: &str) -> Option<FencingToken> {
        self.highest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(resource)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn admits_exactly_the_tokens_not_below_the_running_max(tokens in proptest::collection::vec(0u64..20, 1..50)) {
            let fence = MemoryFence::default();
            let mut max = None::<u64>;
            for t in tokens {
                let admitted = fence.admit("r", FencingToken(t)).is_ok();
                prop_assert_eq!(admitted, max.is_none_or(|m| t >= m));
                if admitted {
                    max = Some(t);
                }
                prop_assert_eq!(fence.highest("r").map(FencingToken::get), max);
            }
            prop_assert_eq!(fence.highest("other"), None);
        }
    }
}
