//! The `SyncTarget` trait: where a sync writes to, and the entry metadata it speaks.

use std::any::Any;
use std::collections::BTreeMap;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::digest::Sha256;
use super::error::FileSyncError;

/// Names starting with this are the replicator's own (manifest, lock, temporary files) on the
/// target, and are refused on the source.
pub const RESERVED_PREFIX: &str = ".ha-sync";
/// Temporary files on the target start with this; a listing removes leftovers of an
/// interrupted run.
pub const TEMP_PREFIX: &str = ".ha-sync-tmp-";
/// The manifest's name, in the target root.
pub const MANIFEST_NAME: &str = ".ha-sync-manifest.json";
/// The lock file's name, in the target root.
pub const LOCK_NAME: &str = ".ha-sync.lock";

/// A modification time with nanoseconds, as the filesystem keeps it. Ordered; may be before
/// 1970.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mtime {
    /// Whole seconds since the Unix epoch (negative before it).
    pub secs: i64,
    /// Nanoseconds within that second, `0..1_000_000_000`.
    pub nanos: u32,
}

impl Mtime {
    /// The modification time in `metadata` (of the entry itself, when it was read with
    /// `symlink_metadata`).
    pub fn of(metadata: &Metadata) -> Self {
        Self {
            secs: metadata.mtime(),
            nanos: u32::try_from(metadata.mtime_nsec()).unwrap_or(0),
        }
    }

    /// The same instant as a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        let nanos = Duration::from_nanos(u64::from(self.nanos));
        if self.secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(self.secs.unsigned_abs()) + nanos
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs()) + nanos
        }
    }
}

impl From<SystemTime> for Mtime {
    fn from(time: SystemTime) -> Self {
        match time.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) => Self {
                secs: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
                nanos: after.subsec_nanos(),
            },
            Err(before) => {
                let before = before.duration();
                let secs = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
                match before.subsec_nanos() {
                    0 => Self {
                        secs: -secs,
                        nanos: 0,
                    },
                    n => Self {
                        secs: -secs - 1,
                        nanos: 1_000_000_000 - n,
                    },
                }
            }
        }
    }
}

/// What kind of special file was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SpecialKind {
    /// A named pipe.
    Fifo,
    /// A Unix domain socket.
    Socket,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// Anything else the OS reports.
    Unknown,
}

impl SpecialKind {
    /// The kind of the entry with this metadata (which is not a file, directory or link).
    pub fn of(metadata: &Metadata) -> Self {
        use std::os::unix::fs::FileTypeExt;
        let file_type = metadata.file_type();
        if file_type.is_fifo() {
            SpecialKind::Fifo
        } else if file_type.is_socket() {
            SpecialKind::Socket
        } else if file_type.is_char_device() {
            SpecialKind::CharDevice
        } else if file_type.is_block_device() {
            SpecialKind::BlockDevice
        } else {
            SpecialKind::Unknown
        }
    }
}

/// One entry of a tree, as `lstat` sees it (links are never followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryMeta {
    /// A regular file.
    File {
        /// Length in bytes.
        size: u64,
        /// Modification time.
        mtime: Mtime,
        /// Permission bits (`mode & 0o7777`).
        mode: u32,
    },
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
        /// Modification time.
        mtime: Mtime,
    },
    /// A symbolic link and the path it holds (UTF-8).
    Symlink {
        /// The link's text, as `readlink` gives it.
        target: String,
    },
    /// Anything else: a special file, or a link whose text is not UTF-8. The replicator never
    /// writes these; on the target they are replaced or deleted like any other entry.
    Other,
}

impl EntryMeta {
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self, EntryMeta::Dir { .. })
    }

    /// A short word for messages: `file`, `directory`, `symlink`, `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            EntryMeta::File { .. } => "file",
            EntryMeta::Dir { .. } => "directory",
            EntryMeta::Symlink { .. } => "symlink",
            EntryMeta::Other => "other",
        }
    }
}

/// The attributes the replicator keeps on files and directories: permission bits and
/// modification time. (Owners, ACLs and extended attributes are not kept.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileAttrs {
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Modification time.
    pub mtime: Mtime,
}

/// Held for the length of one sync or verification; dropping it releases the target.
pub type TargetLock = Box<dyn Any + Send>;

/// Where a [`FileReplicator`](super::FileReplicator) writes: a tree of files addressed by
/// relative paths. [`LocalTarget`](super::LocalTarget) (a local directory) is the built-in;
/// the trait is shaped so that a remote target (an agent on another host, an object store
/// with a tree layout) can implement it: every call names one entry, file contents are
/// streamed, and hashing happens where the data is.
///
/// The methods block; the replicator calls them from its worker threads (several at once, on
/// different paths), never from an async task. A remote implementation may drive its own
/// runtime, e.g. with `tokio::runtime::Handle::block_on`.
///
/// Paths are relative to the target root, `/`-separated, UTF-8, with no empty, `.` or `..`
/// components; the root itself is `""`. Implementations must refuse other paths
/// ([`FileSyncError::InvalidPath`]) rather than resolve them.
///
/// To be correct, an implementation must:
/// - never follow a symbolic link on the target: a link is listed, replaced and removed as a
///   link, and no write goes through one;
/// - make [`write_file`](Self::write_file) atomic and durable: the old file (if any) stays
///   whole until the new one, complete and flushed to stable storage with its attributes, takes
///   its place; on any error (including the reader's) the old file is left as it was and no
///   partial file is visible under the path;
/// - make [`write_manifest`](Self::write_manifest) atomic and durable in the same way, and
///   every change made before it durable by the time it returns ([`flush`](Self::flush) may
///   do that);
/// - keep its own bookkeeping (the manifest, the lock, temporary files) out of
///   [`list`](Self::list), and remove temporary files an interrupted run left behind when
///   listing under the lock;
/// - let [`lock`](Self::lock) succeed for only one holder at a time, across processes.
pub trait SyncTarget: Send + Sync + 'static {
    /// A short description for logs and errors, e.g. the root path or a URL without
    /// credentials.
    fn describe(&self) -> String;

    /// Takes the target's exclusive lock for one run, or fails with
    /// [`FileSyncError::TargetBusy`] at once (never waits) when someone else holds it. Fails
    /// with [`FileSyncError::TargetUnavailable`] when the target root does not exist.
    fn lock(&self) -> Result<TargetLock, FileSyncError>;

    /// Every entry under the root, the root itself as `""`, keyed by relative path (sorted, so
    /// a directory comes before its contents). Entries whose names are not UTF-8 are left out
    /// (the replicator can neither name nor delete them).
    fn list(&self) -> Result<BTreeMap<String, EntryMeta>, FileSyncError>;

    /// Writes the whole of `data` as the regular file `path` with `attrs`, replacing a file,
    /// link or special file there (not a directory), atomically and durably (see the trait
    /// docs). The parent directory exists. Returns the number of bytes written.
    fn write_file(
        &self,
        path: &str,
        data: &mut dyn Read,
        attrs: FileAttrs,
    ) -> Result<u64, FileSyncError>;

    /// Sets the permission bits and modification time of the file or directory `path` (never
    /// of a link's target).
    fn set_attrs(&self, path: &str, attrs: FileAttrs) -> Result<(), FileSyncError>;

    /// Creates the directory `path` (its parent exists; nothing is at `path`). Its attributes
    /// are set later with [`set_attrs`](Self::set_attrs).
    fn create_dir(&self, path: &str) -> Result<(), FileSyncError>;

    /// Makes `path` a symbolic link holding `link_target`, replacing a file, link or special
    /// file there (not a directory), atomically.
    fn symlink(&self, path: &str, link_target: &str) -> Result<(), FileSyncError>;

    /// Removes the file, link or special file `path`, or the directory `path` if it is empty.
    fn remove(&self, path: &str) -> Result<(), FileSyncError>;

    /// The SHA-256 of the regular file `path`, computed where the file is (streamed, bounded
    /// memory).
    fn hash_file(&self, path: &str) -> Result<Sha256, FileSyncError>;

    /// The manifest's bytes, or `None` if there is none.
    fn read_manifest(&self) -> Result<Option<Vec<u8>>, FileSyncError>;

    /// Replaces the manifest with `bytes`, atomically and durably, after making every earlier
    /// change durable.
    fn write_manifest(&self, bytes: &[u8]) -> Result<(), FileSyncError>;

    /// Makes the structural changes made so far ([`create_dir`](Self::create_dir),
    /// [`symlink`](Self::symlink), [`remove`](Self::remove)) durable. The default does
    /// nothing, for targets whose operations are durable when they return.
    fn flush(&self) -> Result<(), FileSyncError> {
        Ok(())
    }
}

/// Checks that `path` is a relative path the replicator produces.
pub(crate) fn check_rel_path(path: &str) -> Result<(), FileSyncError> {
    let invalid = |reason| FileSyncError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    if path.is_empty() {
        return Ok(());
    }
    if path.starts_with('/') {
        return Err(invalid("must be relative"));
    }
    for component in path.split('/') {
        match component {
            "" => return Err(invalid("must not have empty components")),
            "." | ".." => return Err(invalid("must not have `.` or `..` components")),
            _ if component.contains('\0') => return Err(invalid("must not contain NUL")),
            _ => {}
        }
    }
    Ok(())
}

/// The parent of a relative path (`""` for top-level entries and for the root).
pub(crate) fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// `dir` joined with `name` as a relative path.
pub(crate) fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_checked() {
        for good in ["", "a", "a/b", "a b/.c", "..a"] {
            assert!(check_rel_path(good).is_ok(), "{good}");
        }
        for bad in ["/a", "a//b", "a/", "./a", "a/../b", ".."] {
            assert!(check_rel_path(bad).is_err(), "{bad}");
        }
        assert_eq!(parent("a/b/c"), "a/b");
        assert_eq!(parent("a"), "");
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a", "b"), "a/b");
    }

    #[test]
    fn mtimes_round_trip_through_system_time() {
        for (secs, nanos) in [(0, 0), (1_700_000_000, 123), (-1, 999_999_999), (-5, 0)] {
            let mtime = Mtime { secs, nanos };
            assert_eq!(Mtime::from(mtime.to_system_time()), mtime);
        }
    }
}
