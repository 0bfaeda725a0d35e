//! `ha_election::Error`: what can go wrong talking to a lease store or running an elector.

use std::time::Duration;

use ha_core::{BoxError, ConfigError, FencingToken};

/// A lease store or elector failure. Says which store, which operation and which key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store did not answer within the operation's timeout. The operation may or may not
    /// have taken effect: a leader must treat a timed-out renewal as "not renewed".
    #[error("{store} lease store: {op} of `{key}` timed out after {after:?}")]
    Timeout {
        /// `redis`, `postgres`, `etcd` or `memory`.
        store: &'static str,
        /// `acquire`, `renew`, `release` or `read`.
        op: &'static str,
        /// The lease key.
        key: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// The store failed (connection refused, protocol error, server error).
    #[error("{store} lease store: {op} of `{key}` failed: {source}")]
    Store {
        /// Which store.
        store: &'static str,
        /// Which operation.
        op: &'static str,
        /// The lease key.
        key: String,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
    /// The store holds something for `key` that is not a lease record this crate wrote.
    #[error("{store} lease store: `{key}` holds an unreadable lease record: {detail}")]
    Corrupt {
        /// Which store.
        store: &'static str,
        /// The lease key.
        key: String,
        /// What was wrong with it.
        detail: String,
    },
    /// A fence refused a write: a greater token has already been admitted for the resource,
    /// so the writer is a deposed leader.
    #[error("stale fencing token {token} for `{resource}`: token {highest} was already admitted")]
    StaleToken {
        /// The fenced resource.
        resource: String,
        /// The rejected token.
        token: FencingToken,
        /// The greatest token admitted so far.
        highest: FencingToken,
    },
    /// The store does not implement this operation.
    #[error("{store} lease store does not support {op} (of `{key}`)")]
    Unsupported {
        /// Which store.
        store: &'static str,
        /// The operation.
        op: &'static str,
        /// The key or group it was asked about.
        key: String,
    },
    /// The store is configured so that it can silently drop lease records, which would let a
    /// lease be granted while its term still runs. Refused at connect unless the store's
    /// options opt out explicitly.
    #[error(
        "{store} lease store at {target}: {setting} is `{value}`, which {why}; change it, or opt out explicitly in the store's options"
    )]
    UnsafeSetting {
        /// Which store.
        store: &'static str,
        /// The server (passwords redacted).
        target: String,
        /// The server setting, e.g. `maxmemory-policy`.
        setting: &'static str,
        /// Its value.
        value: String,
        /// What it can do to leases.
        why: &'static str,
    },
    /// The store applied a write but could not confirm within the operation's time that it
    /// reached a replica, so the write does not count: a master cut off from its replicas (and
    /// possibly from the sentinels, which may be promoting another) must not extend a term.
    #[error(
        "{store} lease store: {op} of `{key}` reached {acked} of the {wanted} replica(s) required within {waited:?}; it does not count"
    )]
    NotReplicated {
        /// Which store.
        store: &'static str,
        /// Which operation.
        op: &'static str,
        /// The lease key.
        key: String,
        /// How many replicas had to acknowledge.
        wanted: u32,
        /// How many did.
        acked: u64,
        /// How long the store waited for them.
        waited: Duration,
    },
    /// A config broke a rule.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. } | Error::Store { .. } | Error::NotReplicated { .. }
        )
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
