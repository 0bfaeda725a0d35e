//! `FileSyncError`: what can stop a file sync or a target verification, or fail one entry.

use std::io;
use std::path::PathBuf;

use ha_core::{BoxError, ConfigError};

use super::digest::Sha256;

/// Everything that can go wrong in file replication.
///
/// A whole run fails with one of these only when it cannot go on safely (the source root is
/// missing, the target is unavailable or locked, the manifest cannot be written). A failure of
/// one entry (a file that cannot be read, a copy whose re-hash does not match) does not stop
/// the run: it is listed in [`SyncReport::failed`](super::SyncReport::failed) with this error's
/// text, and the entry is tried again on the next run.
///
/// New variants may be added in any release, so matches need a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileSyncError {
    /// The [`FileSyncConfig`](super::FileSyncConfig) broke one of its rules.
    #[error("invalid file sync config: {0}")]
    Config(#[from] ConfigError),
    /// The source root is missing, not a directory, or cannot be listed (an unmounted
    /// filesystem looks like this). Nothing was changed on the target.
    #[error("source directory {} is unavailable: {source}", path.display())]
    SourceUnavailable {
        /// The source root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The target root is missing or cannot be opened. Nothing was changed on it.
    #[error("sync target {target} is unavailable: {source}")]
    TargetUnavailable {
        /// The target, as [`SyncTarget::describe`](super::SyncTarget::describe) puts it.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another sync or verification holds the target's lock.
    #[error("sync target {target} is busy: another sync or verification holds its lock")]
    TargetBusy {
        /// The target.
        target: String,
    },
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `read source file`, `rename into place`.
        op: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file was copied, but hashing it on the target gave a different digest than the
    /// source bytes that were sent: the target (disk, memory, transport) corrupted it.
    #[error(
        "{path}: the copy on the target does not match the source (source sha256 {expected}, target sha256 {actual})"
    )]
    CopyMismatch {
        /// The file, relative to the roots.
        path: String,
        /// SHA-256 of the bytes read from the source.
        expected: Sha256,
        /// SHA-256 of the file on the target after the copy.
        actual: Sha256,
    },
    /// A source file changed (size, modification time, or the file itself was replaced)
    /// between the listing and the end of its copy. The old target file was kept.
    #[error("source file {path} changed while it was being synced; kept the old copy")]
    SourceChanged {
        /// The file, relative to the source root.
        path: String,
    },
    /// A relative path handed to a target is not one the replicator produces (absolute,
    /// empty, or with `.`/`..`/empty components).
    #[error("invalid relative path {path:?}: {reason}")]
    InvalidPath {
        /// The path.
        path: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// An operation of a [`SyncTarget`](super::SyncTarget) implementation failed in a way
    /// that is not a local I/O error (for example a remote target's transport).
    #[error("sync target {target}: {op} {path}: {source}")]
    Target {
        /// The target.
        target: String,
        /// What was being done.
        op: &'static str,
        /// The entry, relative to the target root.
        path: String,
        /// Why.
        #[source]
        source: BoxError,
        /// Whether the same operation may succeed later.
        retryable: bool,
    },
    /// The blocking task that ran the sync was cancelled (the runtime shut down).
    #[error("file sync task did not finish: {detail}")]
    Task {
        /// What happened to it.
        detail: String,
    },
}

impl FileSyncError {
    /// Whether the same call may succeed later without a change of config or code: a missing
    /// mount may come back, a busy target frees up, a changed source file settles, a corrupted
    /// copy is made again. Bad config, bad paths and permission errors do not fix themselves.
    pub fn is_retryable(&self) -> bool {
        match self {
            FileSyncError::Config(_) | FileSyncError::InvalidPath { .. } => false,
            FileSyncError::SourceUnavailable { .. }
            | FileSyncError::TargetUnavailable { .. }
            | FileSyncError::TargetBusy { .. }
            | FileSyncError::CopyMismatch { .. }
            | FileSyncError::SourceChanged { .. } => true,
            FileSyncError::Io { source, .. } => !matches!(
                source.kind(),
                io::ErrorKind::PermissionDenied
                    | io::ErrorKind::InvalidInput
                    | io::ErrorKind::InvalidData
                    | io::ErrorKind::Unsupported
                    | io::ErrorKind::ReadOnlyFilesystem
            ),
            FileSyncError::Target { retryable, .. } => *retryable,
            FileSyncError::Task { .. } => false,
        }
    }

    /// An [`FileSyncError::Io`] about `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        FileSyncError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_path_and_say_whether_to_retry() {
        let e = FileSyncError::io(
            "open source file",
            "/src/a.txt",
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert!(e.to_string().starts_with("open source file /src/a.txt: "));
        assert!(!e.is_retryable());
        let e = FileSyncError::io(
            "write temporary file",
            "/dst/a.txt",
            io::Error::from(io::ErrorKind::StorageFull),
        );
        assert!(e.is_retryable());
        let e = FileSyncError::CopyMismatch {
            path: "a/b.bin".into(),
            expected: Sha256::of(b"a"),
            actual: Sha256::of(b"b"),
        };
        assert!(e.to_string().starts_with("a/b.bin: the copy on the target"));
        assert!(e.is_retryable());
        let e: FileSyncError = ConfigError::new("max_deletions", "must be at least 1").into();
        assert!(!e.is_retryable());
    }
}
