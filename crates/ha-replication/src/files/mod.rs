//! Hash-verified one-way file replication: a source directory mirrored onto a [`SyncTarget`].
//!
//! ```
//! use ha_replication::files::{FileReplicator, FileSyncConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let source = tempfile::tempdir()?;
//! let target = tempfile::tempdir()?;
//! std::fs::create_dir(source.path().join("conf"))?;
//! std::fs::write(source.path().join("conf/app.toml"), "port = 8080\n")?;
//! std::os::unix::fs::symlink("conf/app.toml", source.path().join("current"))?;
//!
//! let replicator = FileReplicator::local(source.path(), target.path(), FileSyncConfig::default())?;
//! let report = replicator.sync_blocking()?; // or `replicator.sync().await` under Tokio
//! assert_eq!((report.files_copied, report.symlinks_written), (1, 1));
//! assert!(report.is_clean());
//! assert_eq!(std::fs::read_link(target.path().join("current"))?.to_str(), Some("conf/app.toml"));
//!
//! let again = replicator.sync_blocking()?;
//! assert_eq!((again.files_copied, again.unchanged), (0, 2)); // nothing read: size+mtime matched
//! assert!(replicator.verify_target_blocking()?.is_clean());
//! # Ok(())
//! # }
//! ```
//!
//! # What a run does
//!
//! 1. Takes the target's lock ([`SyncTarget::lock`]; a second run fails with
//!    [`FileSyncError::TargetBusy`]) and lists both trees with `lstat`: links are read, never
//!    followed. Temporary files an interrupted run left on the target are removed.
//! 2. Removes target entries the source no longer has — only if all of these hold, otherwise
//!    it removes none and says why in [`SyncReport::deletions_refused`]:
//!    `delete` is on; the source listing finished without error; the source is not empty
//!    (unless `allow_empty_source`); and at most `max_deletions` entries (default 100) would go.
//!    An emptied or unmounted source therefore never wipes the target.
//! 3. Creates directories, then hashes and copies files and writes links on `parallelism`
//!    threads. A file whose size and mtime equal the manifest's record on both sides is
//!    skipped without being read — unless that mtime was within two seconds of the run that
//!    recorded it, when a same-size rewrite in the same timestamp tick could hide behind it
//!    (git's "racily clean" files); such files are hashed once more. Otherwise, if the sizes
//!    match, both sides are hashed (the target's hash comes from the manifest when the target
//!    file is as recorded); equal content only gets its mode and mtime fixed. Anything else
//!    is copied: streamed from the source through SHA-256 into a temporary file in the target
//!    directory, fsynced with its mode and mtime, renamed over the old file, the directory
//!    fsynced — then the target file is hashed again and must match the bytes read
//!    ([`FileSyncError::CopyMismatch`] otherwise). A source file that changes during its copy
//!    fails that file and leaves the old copy in place. Memory is `buffer_size` per thread
//!    whatever the file sizes (plus the listings and manifest: a few hundred bytes per entry).
//! 4. Writes the manifest (after making every change durable), then sets directory modes and
//!    mtimes.
//!
//! Entries that fail are listed in [`SyncReport::failed`] and retried by the next run; the
//! run as a whole fails only when it cannot go on safely.
//!
//! # What is copied
//!
//! Regular files (content, permission bits, mtime to the nanosecond), directories (permission
//! bits, mtime) and symbolic links (as links, holding the same text). Not copied:
//! - **links that would leave the tree** — absolute, or relative with `..` climbing above the
//!   root, also when resolved through other links of the tree — are refused with
//!   [`RefusalReason::SymlinkAbsolute`]/[`RefusalReason::SymlinkEscapes`] in
//!   [`SyncReport::refused`], so a sync never gives a target a way out of its root
//!   (whatever the target already has at that path is left alone: neither replaced nor
//!   deleted, and nothing is ever written beneath it);
//! - links that resolve through a loop of links ([`RefusalReason::SymlinkLoop`]);
//! - fifos, sockets and devices ([`RefusalReason::Special`]);
//! - names that are not UTF-8, and names starting with `.ha-sync` (reserved for the manifest,
//!   the lock and temporary files);
//! - owners, ACLs, extended attributes, symlink mtimes, hard links (each link's file is
//!   copied on its own), holes in sparse files.
//!
//! # Corruption on the target
//!
//! [`FileReplicator::verify_target`] re-hashes every file and compares the target with the
//! manifest: entries missing, modified (content, size, kind, link text, mode) or extra.
//! A sync repairs whatever changed a file's size or mtime (the usual result of any write).
//! A same-size change that also kept the mtime (a bit flip on disk, a write followed by
//! `touch -d`) passes the fast path: plain syncs trust it and only `verify_target` finds it;
//! with `checksum = true` every sync hashes both sides and repairs it.
//!
//! # Blocking core, async wrapper
//!
//! The work is blocking file I/O, so the core is synchronous
//! ([`FileReplicator::sync_blocking`]) and parallel on scoped threads; [`FileReplicator::sync`]
//! runs it once on Tokio's blocking pool. [`SyncTarget`] is a blocking trait for the same
//! reason. [`FileSync`] is the [`Component`](ha_core::Component) that runs a replicator every
//! interval (on every node, or on the leader only).
//!
//! # Remote targets
//!
//! [`SyncTarget`] names every operation by relative path, streams file data through a reader
//! and hashes on the target's side, so a remote target can implement it. Compressing the
//! transport (e.g. zstd) would be the remote target's business inside
//! [`SyncTarget::write_file`]; no remote target and no compression are provided yet. Every
//! target runs the conformance suite in [`testing`].

mod config;
mod digest;
mod error;
mod local;
mod manifest;
mod periodic;
mod replicator;
mod report;
mod source;
mod target;
pub mod testing;

pub use config::{FileSyncConfig, MAX_BUFFER_SIZE, MAX_PARALLELISM, MIN_BUFFER_SIZE};
pub use digest::{DEFAULT_BUFFER_SIZE, ParseSha256Error, Sha256, hash_reader};
pub use error::FileSyncError;
pub use local::LocalTarget;
pub use periodic::FileSync;
pub use replicator::FileReplicator;
pub use report::{
    DeletionRefusal, DeletionsRefused, Failure, Mismatch, Modified, RefusalReason, Refused,
    SyncReport, VerifyReport,
};
pub use target::{
    EntryMeta, FileAttrs, LOCK_NAME, MANIFEST_NAME, Mtime, RESERVED_PREFIX, SpecialKind,
    SyncTarget, TEMP_PREFIX, TargetLock,
};
