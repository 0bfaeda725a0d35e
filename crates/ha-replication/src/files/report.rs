//! What a sync run and a target verification did and found, as serializable reports.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::digest::Sha256;
use super::error::FileSyncError;
use super::target::SpecialKind;

/// What one [`FileReplicator::sync`](super::FileReplicator::sync) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SyncReport {
    /// Regular files written to the target (new or changed content).
    pub files_copied: u64,
    /// Bytes of those files.
    pub bytes_copied: u64,
    /// Files and symlinks already up to date (size and mtime matched the manifest, or the
    /// content hashed equal and the attributes were already right).
    pub unchanged: u64,
    /// Files whose content hashed equal to the target's, but whose mode or mtime differed and
    /// were set (no data written).
    pub metadata_updated: u64,
    /// Bytes read to compare files whose size matched but whose mtime (or the manifest) did
    /// not prove them unchanged, on both sides (copies not counted). Zero when every file took
    /// the fast path.
    pub bytes_hashed: u64,
    /// Symlinks created or replaced on the target (copied as links, never followed).
    pub symlinks_written: u64,
    /// Directories created on the target.
    pub dirs_created: u64,
    /// Entries removed from the target (files, links and directories, each counted) because
    /// the source no longer has them.
    pub deleted: u64,
    /// Set when the target has entries the source does not, and they were kept: why, and how
    /// many.
    pub deletions_refused: Option<DeletionsRefused>,
    /// Source entries that were not synced on purpose (special files, links leaving the tree,
    /// names that cannot be represented), each with the reason.
    pub refused: Vec<Refused>,
    /// Entries that failed (read or write errors, a copy that did not hash equal, a source
    /// file that changed mid-copy, a directory that could not be listed). Each is tried again
    /// on the next run; the target keeps its previous version meanwhile.
    pub failed: Vec<Failure>,
    /// Set when the target's manifest could not be parsed and was rebuilt (files are then
    /// compared by hashing both sides, so nothing is copied needlessly).
    pub manifest_discarded: Option<String>,
    /// How long the run took.
    #[serde(with = "ha_core::config::duration")]
    pub duration: Duration,
}

impl SyncReport {
    /// Whether the target now mirrors the whole source: nothing failed, nothing was refused,
    /// and no deletion was held back.
    pub fn is_clean(&self) -> bool {
        self.failed.is_empty() && self.refused.is_empty() && self.deletions_refused.is_none()
    }
}

/// Deletions that were held back for a whole run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletionsRefused {
    /// How many target entries would have been removed.
    pub pending: u64,
    /// Why none were.
    pub reason: DeletionRefusal,
}

/// Why a run removed nothing from the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeletionRefusal {
    /// `delete` is off in the config.
    Disabled,
    /// Part of the source could not be listed, so absence from the listing proves nothing.
    SourceIncomplete {
        /// How many listing errors there were (see [`SyncReport::failed`]).
        errors: u64,
    },
    /// The source is empty (an unmounted or wiped source looks like this) and
    /// `allow_empty_source` is off.
    EmptySource,
    /// More deletions were due than `max_deletions` allows in one run.
    OverCap {
        /// The configured cap.
        max: u64,
    },
}

/// A source entry that was not synced on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The entry, relative to the source root (non-UTF-8 bytes shown as U+FFFD).
    pub path: String,
    /// Why.
    pub reason: RefusalReason,
}

/// Why a source entry was not synced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefusalReason {
    /// A symlink holding an absolute path: on the target it would point outside the tree.
    SymlinkAbsolute {
        /// The link's text.
        target: String,
    },
    /// A symlink whose relative path climbs out of the tree (with `..`, possibly through
    /// other links in the tree).
    SymlinkEscapes {
        /// The link's text.
        target: String,
    },
    /// A symlink that resolves through too many links (a loop).
    SymlinkLoop {
        /// The link's text.
        target: String,
    },
    /// A symlink whose text is not UTF-8.
    SymlinkNotUtf8,
    /// A fifo, socket or device: not copied.
    Special {
        /// Which kind.
        kind: SpecialKind,
    },
    /// The entry's name is not UTF-8 (the manifest is JSON and keys paths as text).
    NameNotUtf8,
    /// The name starts with `.ha-sync`, which the replicator reserves for its own files on the
    /// target.
    ReservedName,
    /// The target has a directory where the source has a file or link; replacing it means
    /// deleting the directory's contents, and deletions were refused this run.
    NeedsDeletion,
}

/// An entry that failed this run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The entry, relative to the roots.
    pub path: String,
    /// The error, naming the file and the operation.
    pub error: String,
    /// Whether the next run may well succeed ([`FileSyncError::is_retryable`]).
    pub retryable: bool,
}

impl Failure {
    pub(crate) fn new(path: impl Into<String>, error: &FileSyncError) -> Self {
        Self {
            path: path.into(),
            error: error.to_string(),
            retryable: error.is_retryable(),
        }
    }
}

/// What [`FileReplicator::verify_target`](super::FileReplicator::verify_target) found: the
/// target compared with its own manifest, every file re-hashed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Manifest entries checked.
    pub checked: u64,
    /// Bytes read and hashed on the target.
    pub bytes_hashed: u64,
    /// In the manifest, not on the target.
    pub missing: Vec<String>,
    /// On the target, but not as the manifest says.
    pub modified: Vec<Modified>,
    /// On the target, not in the manifest.
    pub extra: Vec<String>,
    /// Entries that could not be checked (e.g. unreadable files).
    pub failed: Vec<Failure>,
    /// Set when there is no usable manifest (never synced, or unparseable): then every entry
    /// counts as extra.
    pub manifest_problem: Option<String>,
    /// How long the verification took.
    #[serde(with = "ha_core::config::duration")]
    pub duration: Duration,
}

impl VerifyReport {
    /// Whether the target is exactly what its manifest records.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.modified.is_empty()
            && self.extra.is_empty()
            && self.failed.is_empty()
            && self.manifest_problem.is_none()
    }

    /// How many problems were found (missing + modified + extra + failed).
    pub fn problems(&self) -> usize {
        self.missing.len() + self.modified.len() + self.extra.len() + self.failed.len()
    }
}

/// A target entry that differs from its manifest record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Modified {
    /// The entry, relative to the target root.
    pub path: String,
    /// How it differs.
    pub mismatch: Mismatch,
}

/// How a target entry differs from its manifest record. Modification times are not compared:
/// a touched file with the same bytes is not corrupt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Mismatch {
    /// Another kind of entry (e.g. a directory where a file was written).
    Kind {
        /// Recorded kind.
        expected: String,
        /// Kind found.
        actual: String,
    },
    /// A file of another length (truncated or grown).
    Size {
        /// Recorded size.
        expected: u64,
        /// Size found.
        actual: u64,
    },
    /// A file of the recorded length whose bytes hash differently.
    Content {
        /// Recorded SHA-256.
        expected: Sha256,
        /// SHA-256 found.
        actual: Sha256,
    },
    /// A symlink holding another path.
    LinkTarget {
        /// Recorded link text.
        expected: String,
        /// Link text found.
        actual: String,
    },
    /// Other permission bits.
    Mode {
        /// Recorded mode.
        expected: u32,
        /// Mode found.
        actual: u32,
    },
}
