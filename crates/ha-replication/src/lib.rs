//! Replication monitoring and safe promotion.
//!
//! This crate will hold the PostgreSQL streaming-replication monitor (lag in bytes and time,
//! with the idle-primary caveat handled) and safe promotion of the most advanced eligible
//! replica after fencing the old primary, the Redis Sentinel monitor, and hash-verified
//! file/directory replication (temp file, fsync, rename).
//!
//! Status: not built yet (issue 6). The crate exists so that the workspace layout is final.
//!
//! # Files
//!
//! [`files`] mirrors a source directory onto a target one way: [`FileReplicator`] copies only
//! what changed (size+mtime fast path, SHA-256 to confirm), writes each file to a temporary
//! file, fsyncs and renames it, then re-hashes it on the target; copies links as links and
//! refuses those that would leave the tree; deletes on the target only within safety limits
//! (never for an empty or partly unreadable source, at most `max_deletions` per run); and
//! keeps a manifest on the target so that `verify_target` can find target-side corruption.
//! Unix only.

#[cfg(unix)]
pub mod files;

#[cfg(unix)]
pub use files::{
    FileReplicator, FileSyncConfig, FileSyncError, LocalTarget, SyncReport, SyncTarget,
};
