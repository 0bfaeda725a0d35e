//! `LocalTarget`: the built-in sync target, a directory on a local filesystem.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, DirBuilder, File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::digest::{self, DEFAULT_BUFFER_SIZE, Sha256};
use super::error::FileSyncError;
use super::target::{
    self, EntryMeta, FileAttrs, LOCK_NAME, MANIFEST_NAME, Mtime, RESERVED_PREFIX, SyncTarget,
    TEMP_PREFIX, TargetLock,
};

/// A directory on a local filesystem as a [`SyncTarget`].
///
/// Files are written to a temporary file in the same directory (so the rename stays on one
/// filesystem), fsynced with their mode and mtime set, renamed over the old file, and the
/// directory is fsynced. Directory creations, links and removals are made durable by
/// [`flush`](SyncTarget::flush), which the replicator calls before it writes the manifest.
/// The lock is an advisory `flock` on `.ha-sync.lock` in the root.
///
/// The root must exist: a missing root is an error, never created, so that an unmounted
/// target filesystem is not silently filled on the disk underneath.
///
/// The tree under the root belongs to the replicator while a run holds the lock; other
/// writers in it at the same time can make a run fail an entry, but never make it write
/// outside the root through a link it did not check.
#[derive(Debug)]
pub struct LocalTarget {
    root: PathBuf,
    buffer_size: usize,
    dirty_dirs: Mutex<BTreeSet<PathBuf>>,
    next_temp: AtomicU64,
}

impl LocalTarget {
    /// A target writing under `root` (which must exist when a run starts).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            buffer_size: DEFAULT_BUFFER_SIZE,
            dirty_dirs: Mutex::new(BTreeSet::new()),
            next_temp: AtomicU64::new(0),
        }
    }

    /// The size of the buffer used to copy and hash files (default 256 KiB, at least 4 KiB).
    #[must_use]
    pub fn with_buffer_size(mut self, bytes: usize) -> Self {
        self.buffer_size = bytes.max(4096);
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, rel: &str) -> Result<PathBuf, FileSyncError> {
        target::check_rel_path(rel)?;
        Ok(if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        })
    }

    fn non_root(&self, rel: &str) -> Result<PathBuf, FileSyncError> {
        if rel.is_empty() {
            return Err(FileSyncError::InvalidPath {
                path: String::new(),
                reason: "the root cannot be replaced or removed",
            });
        }
        self.path(rel)
    }

    /// A fresh temporary name in `dir`. Unique within the process; the lock keeps other
    /// processes out, and `create_new` refuses to reuse a leftover.
    fn temp_in(&self, dir: &Path) -> PathBuf {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()))
    }

    fn mark_dirty(&self, dir: &Path) {
        self.dirty_dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir.to_path_buf());
    }

    fn write_temp(
        &self,
        temp: &Path,
        data: &mut dyn Read,
        attrs: FileAttrs,
    ) -> Result<u64, FileSyncError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(temp)
            .map_err(|e| FileSyncError::io("create temporary file", temp, e))?;
        let written = digest::with_buffer(self.buffer_size, |buffer| {
            let mut written = 0u64;
            loop {
                let n = match data.read(buffer) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(FileSyncError::io("read the data for", temp, e)),
                };
                file.write_all(&buffer[..n])
                    .map_err(|e| FileSyncError::io("write temporary file", temp, e))?;
                written += n as u64;
            }
            Ok(written)
        })?;
        file.set_times(FileTimes::new().set_modified(attrs.mtime.to_system_time()))
            .map_err(|e| FileSyncError::io("set the mtime of", temp, e))?;
        file.set_permissions(Permissions::from_mode(attrs.mode))
            .map_err(|e| FileSyncError::io("set the mode of", temp, e))?;
        file.sync_all()
            .map_err(|e| FileSyncError::io("fsync temporary file", temp, e))?;
        Ok(written)
    }
}

/// Fsyncs a directory, so that the entries created, renamed or removed in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), FileSyncError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileSyncError::io("fsync directory", dir, e))
}

/// The [`EntryMeta`] of the entry at `path` with `lstat` metadata `metadata`.
pub(crate) fn entry_meta(path: &Path, metadata: &Metadata) -> io::Result<EntryMeta> {
    let file_type = metadata.file_type();
    Ok(if file_type.is_file() {
        EntryMeta::File {
            size: metadata.len(),
            mtime: Mtime::of(metadata),
            mode: metadata.mode() & 0o7777,
        }
    } else if file_type.is_dir() {
        EntryMeta::Dir {
            mode: metadata.mode() & 0o7777,
            mtime: Mtime::of(metadata),
        }
    } else if file_type.is_symlink() {
        match fs::read_link(path)?.into_os_string().into_string() {
            Ok(target) => EntryMeta::Symlink { target },
            Err(_) => EntryMeta::Other,
        }
    } else {
        EntryMeta::Other
    })
}

impl SyncTarget for LocalTarget {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn lock(&self) -> Result<TargetLock, FileSyncError> {
        let unavailable = |source| FileSyncError::TargetUnavailable {
            target: self.describe(),
            source,
        };
        let root = fs::metadata(&self.root).map_err(unavailable)?;
        if !root.is_dir() {
            return Err(unavailable(io::Error::new(
                io::ErrorKind::NotADirectory,
                "the target root is not a directory",
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.root.join(LOCK_NAME))
            .map_err(unavailable)?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(file)),
            Err(fs::TryLockError::WouldBlock) => Err(FileSyncError::TargetBusy {
                target: self.describe(),
            }),
            Err(fs::TryLockError::Error(e)) => Err(unavailable(e)),
        }
    }

    fn list(&self) -> Result<BTreeMap<String, EntryMeta>, FileSyncError> {
        let root = fs::metadata(&self.root).map_err(|source| FileSyncError::TargetUnavailable {
            target: self.describe(),
            source,
        })?;
        let mut entries = BTreeMap::new();
        entries.insert(
            String::new(),
            entry_meta(&self.root, &root)
                .map_err(|e| FileSyncError::io("stat", self.root.clone(), e))?,
        );
        let mut dirs = vec![String::new()];
        while let Some(dir) = dirs.pop() {
            let abs = self.path(&dir)?;
            let read = match fs::read_dir(&abs) {
                Ok(read) => read,
                // Removed under us: nothing left to list there.
                Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.is_empty() => continue,
                Err(e) => return Err(FileSyncError::io("list directory", abs, e)),
            };
            for entry in read {
                let entry = entry.map_err(|e| FileSyncError::io("list directory", &abs, e))?;
                let file_name = entry.file_name();
                let Some(name) = file_name.to_str() else {
                    tracing::warn!(dir = %abs.display(), name = ?file_name,
                        "target entry with a non-UTF-8 name left alone");
                    continue;
                };
                if name.starts_with(RESERVED_PREFIX) {
                    if name.starts_with(TEMP_PREFIX) {
                        // A temporary file of an interrupted run: never part of the tree.
                        match fs::remove_file(entry.path()) {
                            Ok(()) => {
                                tracing::debug!(path = %entry.path().display(),
                                    "removed a temporary file left by an interrupted run");
                                self.mark_dirty(&abs);
                            }
                            Err(e) => tracing::warn!(path = %entry.path().display(),
                                error = %e, "could not remove a leftover temporary file"),
                        }
                    }
                    continue;
                }
                let path = entry.path();
                let metadata = match entry.metadata() {
                    Ok(metadata) => metadata,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(FileSyncError::io("stat", path, e)),
                };
                let meta = entry_meta(&path, &metadata)
                    .map_err(|e| FileSyncError::io("read link", &path, e))?;
                let rel = target::join(&dir, name);
                if meta.is_dir() {
                    dirs.push(rel.clone());
                }
                entries.insert(rel, meta);
            }
        }
        Ok(entries)
    }

    fn write_file(
        &self,
        path: &str,
        data: &mut dyn Read,
        attrs: FileAttrs,
    ) -> Result<u64, FileSyncError> {
        let dest = self.non_root(path)?;
        let dir = dest.parent().unwrap_or(&self.root);
        let temp = self.temp_in(dir);
        let result = self.write_temp(&temp, data, attrs).and_then(|written| {
            fs::rename(&temp, &dest)
                .map_err(|e| FileSyncError::io("rename into place", &dest, e))?;
            sync_dir(dir)?;
            Ok(written)
        });
        if result.is_err() {
            // The old file (if any) is untouched; only the temporary file goes. If even this
            // fails, the next listing removes it.
            let _ = fs::remove_file(&temp);
        }
        result
    }

    fn set_attrs(&self, path: &str, attrs: FileAttrs) -> Result<(), FileSyncError> {
        let abs = self.path(path)?;
        let metadata =
            fs::symlink_metadata(&abs).map_err(|e| FileSyncError::io("stat", &abs, e))?;
        if !metadata.is_file() && !metadata.is_dir() {
            return Err(FileSyncError::io(
                "set the attributes of",
                abs,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file or directory (links are never followed)",
                ),
            ));
        }
        let open = || File::open(&abs);
        let file = match open() {
            Ok(file) => file,
            // An owner without read permission (mode 0o000, say) may still change it: grant
            // read for the moment; the mode is set to the wanted one below.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                fs::set_permissions(&abs, Permissions::from_mode(metadata.mode() | 0o500))
                    .and_then(|()| open())
                    .map_err(|e| FileSyncError::io("open", &abs, e))?
            }
            Err(e) => return Err(FileSyncError::io("open", &abs, e)),
        };
        file.set_times(FileTimes::new().set_modified(attrs.mtime.to_system_time()))
            .map_err(|e| FileSyncError::io("set the mtime of", &abs, e))?;
        file.set_permissions(Permissions::from_mode(attrs.mode))
            .map_err(|e| FileSyncError::io("set the mode of", &abs, e))
    }

    fn create_dir(&self, path: &str) -> Result<(), FileSyncError> {
        let abs = self.non_root(path)?;
        DirBuilder::new()
            .mode(0o700)
            .create(&abs)
            .map_err(|e| FileSyncError::io("create directory", &abs, e))?;
        self.mark_dirty(abs.parent().unwrap_or(&self.root));
        Ok(())
    }

    fn symlink(&self, path: &str, link_target: &str) -> Result<(), FileSyncError> {
        let abs = self.non_root(path)?;
        let dir = abs.parent().unwrap_or(&self.root);
        let temp = self.temp_in(dir);
        std::os::unix::fs::symlink(link_target, &temp)
            .map_err(|e| FileSyncError::io("create symlink", &temp, e))?;
        // rename(2) replaces a file or link at `abs` without following it.
        if let Err(e) = fs::rename(&temp, &abs) {
            let _ = fs::remove_file(&temp);
            return Err(FileSyncError::io("rename symlink into place", abs, e));
        }
        self.mark_dirty(dir);
        Ok(())
    }

    fn remove(&self, path: &str) -> Result<(), FileSyncError> {
        let abs = self.non_root(path)?;
        let metadata = match fs::symlink_metadata(&abs) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(FileSyncError::io("stat", abs, e)),
        };
        let removed = if metadata.is_dir() {
            fs::remove_dir(&abs)
        } else {
            fs::remove_file(&abs)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FileSyncError::io("remove", abs, e)),
        }
        self.mark_dirty(abs.parent().unwrap_or(&self.root));
        Ok(())
    }

    fn hash_file(&self, path: &str) -> Result<Sha256, FileSyncError> {
        let abs = self.non_root(path)?;
        // Check before opening, so that a link (to a device, say) is never followed.
        let metadata =
            fs::symlink_metadata(&abs).map_err(|e| FileSyncError::io("stat", &abs, e))?;
        if !metadata.is_file() {
            return Err(FileSyncError::io(
                "hash",
                abs,
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        let mut file = File::open(&abs).map_err(|e| FileSyncError::io("open", &abs, e))?;
        let (sha, _) = digest::with_buffer(self.buffer_size, |buffer| {
            digest::hash_reader(&mut file, buffer)
        })
        .map_err(|e| FileSyncError::io("read", &abs, e))?;
        Ok(sha)
    }

    fn read_manifest(&self) -> Result<Option<Vec<u8>>, FileSyncError> {
        let path = self.root.join(MANIFEST_NAME);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FileSyncError::io("read manifest", path, e)),
        }
    }

    fn write_manifest(&self, bytes: &[u8]) -> Result<(), FileSyncError> {
        self.flush()?;
        let path = self.root.join(MANIFEST_NAME);
        let temp = self.temp_in(&self.root);
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
                .map_err(|e| FileSyncError::io("create temporary file", &temp, e))?;
            file.write_all(bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| FileSyncError::io("write manifest", &temp, e))?;
            fs::rename(&temp, &path).map_err(|e| FileSyncError::io("rename into place", &path, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result?;
        sync_dir(&self.root)
    }

    fn flush(&self) -> Result<(), FileSyncError> {
        let dirs = std::mem::take(
            &mut *self
                .dirty_dirs
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for dir in dirs {
            match File::open(&dir).and_then(|d| d.sync_all()) {
                Ok(()) => {}
                // Removed (or an ancestor replaced by a file) after it was changed: the fsync
                // of the directory where that happened covers it.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) => {}
                Err(e) => return Err(FileSyncError::io("fsync directory", dir, e)),
            }
        }
        Ok(())
    }
}
