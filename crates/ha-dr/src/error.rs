//! `ha_dr::Error`: everything a backup, verify, restore or prune can fail with.

use std::path::PathBuf;

use crate::key::KeyId;

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the backup machinery. Every variant names what it was about: the
/// backup id, the file, the key id.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a file or directory.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "read", "create", "rename".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error on a stream that is not a named file (a pipe, a child's stdout).
    #[error("{context}: {source}")]
    Stream {
        /// What was being read or written.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backup data or its manifest failed authentication or a consistency check: a bit
    /// flip, truncation, reordered, dropped or spliced segments, a size or SHA-256 mismatch.
    /// Nothing was written to the restore target.
    #[error("backup {backup_id} is corrupt or was tampered with: {detail}")]
    Corrupt {
        /// The backup.
        backup_id: String,
        /// What did not check out.
        detail: String,
    },
    /// The backup was written with a key that is not in the key ring.
    #[error(
        "backup {backup_id} needs key {key_id}, which is not in the key ring (it holds: {available})"
    )]
    MissingKey {
        /// The backup.
        backup_id: String,
        /// The key it was written with.
        key_id: KeyId,
        /// The ids the ring holds, comma-separated.
        available: String,
    },
    /// A key file or key text is not a valid master key.
    #[error("invalid key {origin}: {detail}")]
    InvalidKey {
        /// Where the key came from (a file path or an environment variable).
        origin: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A text is not a valid backup id.
    #[error("invalid backup id {id:?}: expected 1 to 128 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidBackupId {
        /// The text.
        id: String,
    },
    /// The store holds no backup (with a manifest) of this id.
    #[error("no backup {backup_id} in the store")]
    NotFound {
        /// The id asked for.
        backup_id: String,
    },
    /// The data is not in a format (version) this build reads.
    #[error("backup {backup_id}: unsupported format: {detail}")]
    UnsupportedFormat {
        /// The backup (or `?` when the header did not get as far as the id).
        backup_id: String,
        /// What is unsupported.
        detail: String,
    },
    /// The operation is not built (yet).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The restore target holds data and `force` was not given.
    #[error("refusing to restore into {target}: {reason} (pass force to overwrite)")]
    TargetNotEmpty {
        /// The directory, file or database.
        target: String,
        /// Why it counts as holding data.
        reason: String,
    },
    /// A tar entry would land outside the restore target, or is of a kind that is refused.
    #[error("backup {backup_id}: refusing tar entry {entry:?}: {reason}")]
    UnsafeEntry {
        /// The backup.
        backup_id: String,
        /// The entry's path as stored.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A child process (`pg_dump`, `pg_restore`, `psql`) failed or could not be started.
    #[error("{program} failed: {detail}")]
    Command {
        /// The program.
        program: String,
        /// Exit status and the tail of its stderr, or why it did not start.
        detail: String,
    },
    /// A PostgreSQL query failed.
    #[error("PostgreSQL {context}: {source}")]
    Postgres {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A manifest could not be encoded or decoded.
    #[error("manifest of backup {backup_id}: {detail}")]
    Manifest {
        /// The backup.
        backup_id: String,
        /// What went wrong.
        detail: String,
    },
    /// The archived WAL a point-in-time restore needs is incomplete: a segment is missing,
    /// or the timelines do not lead from the base backup to the newest WAL.
    #[error("WAL chain of base backup {backup_id} is broken: {detail}")]
    WalChain {
        /// The base backup.
        backup_id: String,
        /// The first missing segment's name, when one is missing.
        missing: Option<String>,
        /// What is wrong, naming the segment or timeline.
        detail: String,
    },
    /// A config or argument broke a rule.
    #[error(transparent)]
    Config(#[from] ha_core::ConfigError),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
    /// A backup the scheduler was asked to run now did not run (not started, not the leader,
    /// a run of that source in progress, an unknown source, stopped meanwhile).
    #[error("backup of source {name:?} not run: {reason}")]
    NotRun {
        /// The source asked for.
        name: String,
        /// Why.
        reason: String,
        /// Whether asking again later may succeed (e.g. once this node leads).
        retryable: bool,
    },
}

impl Error {
    /// Whether the same call may succeed later without a change of data, keys or config:
    /// I/O and connection trouble may pass; corruption, a missing key or a refused target
    /// will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { .. } | Error::Stream { .. } | Error::Command { .. } | Error::Task(_) => {
                true
            }
            Error::NotRun { retryable, .. } => *retryable,
            Error::Postgres { source, .. } => matches!(
                source,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)
            ),
            Error::Corrupt { .. }
            | Error::MissingKey { .. }
            | Error::InvalidKey { .. }
            | Error::NotFound { .. }
            | Error::InvalidBackupId { .. }
            | Error::UnsupportedFormat { .. }
            | Error::Unsupported(_)
            | Error::TargetNotEmpty { .. }
            | Error::UnsafeEntry { .. }
            | Error::Manifest { .. }
            | Error::WalChain { .. }
            | Error::Config(_) => false,
        }
    }

    /// Whether this error says the backup itself is bad (as opposed to the environment).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(backup_id: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            backup_id: backup_id.into(),
            detail: detail.into(),
        }
    }
}

/// Errors cross `std::io::Read`/`Write` boundaries (tar, zstd, `io::copy`) as `io::Error`s;
/// this wraps ours so that [`from_io`] can take them out again unchanged.
#[derive(Debug)]
pub(crate) struct Carried(pub(crate) Error);

impl std::fmt::Display for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Carried {}

/// Wraps `error` into an `io::Error` for a trip through a `Read`/`Write` consumer.
pub(crate) fn into_io(error: Error) -> std::io::Error {
    std::io::Error::other(Carried(error))
}

/// Takes our error back out of an `io::Error`, or describes a plain one with `context`.
pub(crate) fn from_io(error: std::io::Error, context: impl FnOnce() -> String) -> Error {
    if error.get_ref().is_some_and(|inner| inner.is::<Carried>()) {
        if let Some(Ok(carried)) = error.into_inner().map(|inner| inner.downcast::<Carried>()) {
            return carried.0;
        }
        return Error::Task(format!("{}: an error lost its payload", context()));
    }
    Error::Stream {
        context: context(),
        source: error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_errors_survive_a_trip_through_io() {
        let io = into_io(Error::corrupt("b1", "bad tag"));
        let back = from_io(io, || "reading".into());
        assert!(back.is_corruption(), "{back}");
        assert!(!back.is_retryable());
        let plain = from_io(std::io::Error::other("disk"), || "reading x".into());
        assert_eq!(plain.to_string(), "reading x: disk");
        assert!(plain.is_retryable());
    }
}
