//! [`Progress`]: a shared count of plaintext bytes a repository has moved, for progress bars.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Plaintext bytes written into backups or read out of them (verified) by a [`Repository`]
/// given this counter, across all its operations. Cheap to clone; clones share the count.
///
/// [`Repository`]: crate::Repository
#[derive(Clone, Debug, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes so far.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}
